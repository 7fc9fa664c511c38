"""Test-time adaptation (lightflax.adapt and predict's --adapt_bn/--label_shift/--calibrate):
AdaBN against flax's own whole-set BatchNorm, EM against the maximum-likelihood prior, temperature
scaling against a grid search; the options' defaults, fallbacks and summary line."""

import json

import numpy as np
import pytest

from lightflax import adapt, decision, metrics, predict
from lightflax.errors import UserError

from test_predict import SIZE, _write_run


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    base = tmp_path_factory.mktemp("adapt")
    np.savez(base / "in.npz", images=np.random.default_rng(7).integers(0, 256, (40, SIZE, SIZE), dtype=np.uint8))
    np.savez(base / "few.npz", images=np.random.default_rng(8).integers(0, 256, (20, SIZE, SIZE), dtype=np.uint8))
    dec = {"rule": "prior_corrected", "threshold": None, "train_prior": [0.26, 0.74], "model_prior": [0.26, 0.74],
           "target_prior": [0.375, 0.625], "temperature": 2.0}
    return _write_run(base / "run", decision=dec), base


def _predict(workdir, images, out, batch_size=16, **options):
    return predict.predict_npz(str(workdir), str(images), str(out), batch_size=batch_size, seed_index=0,
                               adapt_options=options)


def test_adabn_is_flax_batchnorm_on_the_whole_set():
    """Layer by layer AdaBN in inference mode == flax's training-mode BatchNorm on all the images at
    once (each layer normalised by its input's population statistics, earlier layers already so)."""
    import pathlib
    import tempfile

    folder = _write_run(pathlib.Path(tempfile.mkdtemp()) / "run")
    module, variables, results, _ = predict.load_replicas(str(folder), seed_index=0)
    prep = predict.preprocess_fn(results)
    images = np.random.default_rng(3).integers(0, 256, (40, SIZE, SIZE, 1), dtype=np.uint8)

    def apply_fn(v, x):
        return module.apply(v, prep(x), train=False)

    adapted, n = adapt.adapt_bn(apply_fn, variables[0], images, batch_size=16)
    assert n == 9
    reference, _ = module.apply(variables[0], prep(images), train=True, mutable=["batch_stats"])
    got = np.asarray(apply_fn(adapted, images))
    np.testing.assert_allclose(got, np.asarray(reference), atol=1e-5, rtol=1e-5)
    assert np.abs(got - np.asarray(apply_fn(variables[0], images))).max() > 1e-2  # adaptation changed something


def test_combine_moments_is_the_population_moments():
    x = np.random.default_rng(0).normal(5.0, 0.01, (12, 30, 4))  # large mean against the spread
    mean, var = adapt.combine_moments(x.mean(axis=1), np.sum((x - x.mean(axis=1, keepdims=True)) ** 2, axis=1), 30)
    np.testing.assert_allclose(mean, x.reshape(-1, 4).mean(axis=0), rtol=1e-12)
    np.testing.assert_allclose(var, x.reshape(-1, 4).var(axis=0), rtol=1e-9)


def test_adapt_bn_does_not_depend_on_batch_size(run, tmp_path, capsys):
    workdir, base = run
    plain, _ = _predict(workdir, base / "in.npz", tmp_path / "p.npz")
    a, _ = _predict(workdir, base / "in.npz", tmp_path / "a.npz", adapt_bn=True)
    b, _ = _predict(workdir, base / "in.npz", tmp_path / "b.npz", batch_size=7, adapt_bn=True)
    c, _ = _predict(workdir, base / "in.npz", tmp_path / "c.npz", batch_size=64, adapt_bn=True)
    np.testing.assert_allclose(a, b, atol=2e-6)
    np.testing.assert_allclose(a, c, atol=2e-6)
    assert np.abs(a - plain).max() > 1e-3
    assert "adaptations: AdaBN (9 BatchNorm layers, 40 images)" in capsys.readouterr().out


def test_too_few_images_fall_back_in_one_line(run, tmp_path, capsys):
    workdir, base = run
    plain = _predict(workdir, base / "few.npz", tmp_path / "p.npz")
    capsys.readouterr()
    got = _predict(workdir, base / "few.npz", tmp_path / "a.npz", adapt_bn=True, label_shift="em")
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 3 and "--adapt_bn: 20 images, fewer than 32" in out[0]
    assert "--label_shift=em: 20 images, fewer than 32" in out[1] and out[2].endswith("adaptations: none")
    np.testing.assert_array_equal(got[0], plain[0])
    np.testing.assert_array_equal(got[1], plain[1])


def _loglik_argmax(p, source):
    """Reference: the two-class prior q maximising the marginal likelihood sum_i log sum_c p_ic q_c / s_c
    (concave in q), by grids refined around the best point down to 1e-7."""
    lo, hi = 1e-6, 1 - 1e-6
    while hi - lo > 1e-7:
        q1 = np.linspace(lo, hi, 101)
        ll = np.sum(np.log((p / source) @ np.stack([1 - q1, q1])), axis=0)
        best = q1[np.argmax(ll)]
        step = q1[1] - q1[0]
        lo, hi = max(best - step, 1e-9), min(best + step, 1 - 1e-9)
    return np.array([1 - best, best])


def test_em_recovers_a_shifted_prior():
    rng = np.random.default_rng(0)
    source, target = np.array([0.7, 0.3]), np.array([0.25, 0.75])
    y = (rng.random(20000) < target[1]).astype(int)
    x = rng.normal(np.where(y == 1, 1.0, -1.0), 1.0)  # class-conditional N(+-1, 1)
    lik = np.stack([np.exp(-(x + 1) ** 2 / 2), np.exp(-(x - 1) ** 2 / 2)], axis=1)
    p = lik * source / np.sum(lik * source, axis=1, keepdims=True)  # exact posteriors at the source prior
    q = adapt.em_prior(p, source)
    np.testing.assert_allclose(q, _loglik_argmax(p, source), atol=2e-5)
    np.testing.assert_allclose(q, target, atol=0.02)
    assert abs(q.sum() - 1) < 1e-12


def test_temperature_fit_lowers_nll_and_keeps_argmax():
    rng = np.random.default_rng(1)
    z = rng.normal(0, 1.5, (4000, 3))
    p = np.exp(z) / np.exp(z).sum(axis=1, keepdims=True)
    y = np.array([rng.choice(3, p=row) for row in p])
    over = 3.0 * z  # overconfident logits
    log_probs = over - np.log(np.exp(over).sum(axis=1, keepdims=True))
    t = adapt.fit_temperature(log_probs, y)
    grid = np.linspace(0.5, 6, 5501)
    best = grid[np.argmin([adapt.nll(log_probs, y, g) for g in grid])]
    assert abs(t - best) < 2e-3 and 2.5 < t < 3.5
    assert adapt.nll(log_probs, y, t) < adapt.nll(log_probs, y, 1.0) - 0.1
    scaled = adapt.temperature_scale(np.exp(log_probs), t)
    np.testing.assert_allclose(scaled.sum(axis=1), 1, atol=1e-12)
    np.testing.assert_array_equal(np.argmax(scaled, axis=1), np.argmax(log_probs, axis=1))
    np.testing.assert_allclose(np.log(scaled), log_probs / t - np.log(np.exp(log_probs / t).sum(axis=1))[:, None],
                               atol=1e-9)


def test_build_stores_the_validation_temperature():
    from types import SimpleNamespace

    from lightflax.config import RunConfig

    data = SimpleNamespace(num_classes=2, name="x", splits={"train": SimpleNamespace(labels=np.array([0, 1, 1]))})
    cfg = RunConfig.flat(workdir="w", model="xray_light", decision="argmax")
    assert decision.build(cfg, data)["temperature"] is None
    rng = np.random.default_rng(2)
    lp = np.log(rng.dirichlet([0.3, 0.3], size=(2, 50)))
    y = rng.integers(0, 2, 50)
    entry = decision.build(cfg, data, (lp, y))
    assert entry["temperature"] == pytest.approx(adapt.fit_temperature(metrics.ensemble_log_probs(lp), y))
    results = {"dataset": {"num_classes": 2}, "decision": json.loads(json.dumps(entry))}
    assert decision.read(results)["temperature"] == pytest.approx(entry["temperature"])


@pytest.mark.parametrize("entry,want", [(None, 1.0), ({"rule": "argmax"}, 1.0),
                                        ({"rule": "argmax", "temperature": 1.5}, 1.5)])
def test_older_runs_read_as_temperature_one(entry, want):
    results = {"dataset": {"num_classes": 2}}
    if entry is not None:
        results["decision"] = entry
    assert decision.read(results)["temperature"] == want


def test_damaged_temperature_is_a_user_error():
    with pytest.raises(UserError, match="decision entry is damaged"):
        decision.read({"dataset": {"num_classes": 2}, "decision": {"rule": "argmax", "temperature": -1}})


def test_calibrate_and_label_shift_in_predict(run, tmp_path, capsys):
    workdir, base = run
    plain, _ = _predict(workdir, base / "in.npz", tmp_path / "p.npz")
    capsys.readouterr()
    cal, _ = _predict(workdir, base / "in.npz", tmp_path / "c.npz", calibrate="temperature")
    np.testing.assert_allclose(cal, adapt.temperature_scale(plain, 2.0), atol=1e-6)
    assert "adaptations: temperature 2" in capsys.readouterr().out
    p, y = _predict(workdir, base / "in.npz", tmp_path / "e.npz", label_shift="em")
    q = adapt.em_prior(plain.astype(np.float64), [0.26, 0.74])
    np.testing.assert_array_equal(y, (plain[:, 1] > metrics.prior_threshold([0.26, 0.74], q)).astype(int))
    assert "adaptations: EM label shift (prior [" in capsys.readouterr().out


def test_stored_predict_defaults_and_overrides(run):
    results = json.loads((run[0] / "results.json").read_text())
    assert predict.adaptation_options(results) == {"adapt_bn": False, "label_shift": "none", "calibrate": "none"}
    stored = dict(results, predict_defaults={"adapt_bn": True, "label_shift": "em"})
    assert predict.adaptation_options(stored) == {"adapt_bn": True, "label_shift": "em", "calibrate": "none"}
    assert predict.adaptation_options(stored, {"adapt_bn": False, "label_shift": None, "calibrate": "temperature"}
                                      ) == {"adapt_bn": False, "label_shift": "em", "calibrate": "temperature"}
    with pytest.raises(UserError, match="predict_defaults entry is damaged"):
        predict.adaptation_options(dict(results, predict_defaults={"label_shift": "bbse"}))
    with pytest.raises(UserError, match="--calibrate must be one of none, temperature"):
        predict.adaptation_options(results, {"calibrate": "platt"})
