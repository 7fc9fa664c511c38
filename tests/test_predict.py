"""predict on a multi-seed run: the replicas' mean, --seed_index, the run's decision rule."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lightflax import checkpoints, decision, models, predict
from lightflax.errors import UserError

N_SEEDS, SIZE = 3, 16


def _write_run(folder, decision=None):
    """A finished 3-replica run as predict reads it: results.json and model_seed<r>.msgpack with
    different random weights (no training needed to test how they are combined)."""
    folder.mkdir(parents=True, exist_ok=True)
    module = models.create("xray_light", num_classes=2, k=1)
    shapes = jax.eval_shape(lambda: module.init(jax.random.key(0), jnp.zeros((1, SIZE, SIZE, 3)), train=False))
    for r in range(N_SEEDS):
        rng = np.random.default_rng(r)
        variables = jax.tree_util.tree_map_with_path(
            lambda path, s: (np.ones(s.shape, np.float32) if "var" in jax.tree_util.keystr(path) else
                             (0.3 * rng.normal(size=s.shape)).astype(np.float32)), shapes)
        checkpoints.export_variables(str(folder / f"model_seed{r}.msgpack"), variables)
    results = {"num_seeds": N_SEEDS,
               "config": {"model": "xray_light", "model_kwargs": {"k": 1}, "image_size": SIZE, "channels": 3,
                          "mean": None, "eval_image_size": None},
               "dataset": {"num_classes": 2, "stored_shape": [SIZE, SIZE, 1], "class_names": ["normal", "pneumonia"]}}
    if decision is not None:
        results["decision"] = decision
    (folder / "results.json").write_text(json.dumps(results))
    return folder


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    base = tmp_path_factory.mktemp("predict")
    np.savez(base / "in.npz", images=np.random.default_rng(7).integers(0, 256, (40, SIZE, SIZE), dtype=np.uint8))
    return _write_run(base / "run"), base / "in.npz"


def _predict(workdir, images, out, **kw):
    p, y = predict.predict_npz(str(workdir), str(images), str(out), batch_size=16, **kw)
    with np.load(out) as z:
        np.testing.assert_array_equal(z["probabilities"], p)
        np.testing.assert_array_equal(z["predictions"], y)
        assert z["probabilities"].dtype == np.float32 and z["probabilities"].shape == (40, 2)
        assert z["predictions"].shape == (40,) and np.issubdtype(z["predictions"].dtype, np.integer)
    return p, y


def test_ensemble_is_the_mean_of_the_replicas(run, tmp_path, capsys):
    workdir, images = run
    singles = [_predict(workdir, images, tmp_path / f"s{r}.npz", seed_index=r)[0] for r in range(N_SEEDS)]
    assert "replica 2" in capsys.readouterr().out
    assert not np.allclose(singles[0], singles[1], atol=1e-3)  # the replicas differ: the mean is a real test
    p, y = _predict(workdir, images, tmp_path / "ens.npz")
    np.testing.assert_allclose(p, np.mean(np.stack(singles).astype(np.float64), axis=0), rtol=1e-6, atol=1e-7)
    # no decision entry (runs before it existed): argmax
    np.testing.assert_array_equal(y, np.argmax(p, axis=1))
    line = capsys.readouterr().out.strip()
    counts = {"normal": int(np.sum(y == 0)), "pneumonia": int(np.sum(y == 1))}
    assert line == (f"wrote {tmp_path / 'ens.npz'}: 40 images, ensemble of 3 replicas, rule argmax, "
                    f"predicted class counts {counts}, adaptations: none")


def test_threshold_and_prior_correction_are_applied(run, tmp_path):
    workdir, images = run
    p, _ = _predict(workdir, images, tmp_path / "plain.npz")
    p1 = p[:, 1].astype(np.float64)
    # a threshold that moves some predictions away from the argmax
    threshold = float(np.quantile(p1, 0.25)) if np.mean(p1 > 0.5) < 0.6 else float(np.quantile(p1, 0.9))
    wd = _write_run(tmp_path / "thr", {"rule": "prior_corrected", "threshold": threshold,
                                       "train_prior": [0.26, 0.74], "target_prior": [0.375, 0.625]})
    p2, y = _predict(wd, images, tmp_path / "thr.npz")
    np.testing.assert_array_equal(p2, p)  # the rule changes the predictions, not the probabilities
    np.testing.assert_array_equal(y, (p1 > threshold).astype(int))
    assert np.any(y != np.argmax(p, axis=1))
    # prior correction without a threshold: argmax of p * target / train
    train, target = np.array([0.1, 0.9]), np.array([0.5, 0.5])
    wd = _write_run(tmp_path / "prior", {"rule": "prior_corrected", "threshold": None, "train_prior": train.tolist(),
                                         "target_prior": target.tolist()})
    _, y = _predict(wd, images, tmp_path / "prior.npz")
    np.testing.assert_array_equal(y, np.argmax(p * target / train, axis=1))
    np.testing.assert_array_equal(y, (p1 * 0.1 / 0.9 > (1 - p1)).astype(int))  # by hand, binary


def test_apply_rule_brute_force():
    rng = np.random.default_rng(0)
    p = rng.dirichlet(np.ones(3), size=50)
    train, target = np.array([0.5, 0.3, 0.2]), np.array([0.2, 0.2, 0.6])
    got = decision.apply(p, {"rule": "prior_corrected", "threshold": None, "train_prior": train,
                                 "target_prior": target})
    want = [max(range(3), key=lambda c: p[i, c] * target[c] / train[c]) for i in range(50)]
    np.testing.assert_array_equal(got, want)
    got = decision.apply(p, {"rule": "prior_corrected", "threshold": None, "train_prior": train,
                                 "target_prior": None})  # uniform target
    np.testing.assert_array_equal(got, np.argmax(p / train, axis=1))
    # a class-balanced loss: the probabilities carry the uniform model_prior, not the training split's
    model = np.full(3, 1 / 3)
    got = decision.apply(p, {"rule": "prior_corrected", "threshold": None, "train_prior": train,
                                 "model_prior": model, "target_prior": target})
    want = [max(range(3), key=lambda c: p[i, c] * target[c] / model[c]) for i in range(50)]
    np.testing.assert_array_equal(got, want)
    assert np.any(got != np.argmax(p * target / train, axis=1))


def test_seed_index_out_of_range_is_one_line(run, tmp_path):
    workdir, images = run
    with pytest.raises(UserError, match=r"--seed_index 3 is out of range: the run trained 3 replica\(s\)") as e:
        predict.predict_npz(str(workdir), str(images), str(tmp_path / "x.npz"), seed_index=3)
    assert "\n" not in str(e.value) and not (tmp_path / "x.npz").exists()


@pytest.mark.parametrize("decision", [{"rule": "vote"}, {"rule": "argmax", "threshold": 2.0},
                                      {"rule": "prior_corrected", "threshold": None},
                                      {"rule": "prior_corrected", "train_prior": [0.5, -1.0]},
                                      {"rule": "prior_corrected", "train_prior": [0.5, 0.5], "model_prior": [1.0]},
                                      ["argmax"]])
def test_damaged_decision_entry_is_one_line(tmp_path, decision):
    wd = tmp_path / "run"
    wd.mkdir()
    (wd / "results.json").write_text(json.dumps(
        {"num_seeds": 1, "config": {"model": "xray_light", "model_kwargs": {"k": 1}, "image_size": SIZE,
                                    "channels": 3}, "dataset": {"num_classes": 2, "stored_shape": [SIZE, SIZE, 1]},
         "decision": decision}))
    with pytest.raises(UserError, match="decision entry is damaged") as e:
        predict.load_replicas(str(wd))
    assert "\n" not in str(e.value)
