"""Evaluation outputs (predictions.npz, shift proxies, ensembles, decision), the robust-recipe knobs
(--class_weighting, --lr_schedule, --decision) and --recipe."""

import csv
import json

import numpy as np
import pytest

from conftest import run_launch
from lightflax._testing import FAULT_KILL_ENV

TINY = ["--dataset=synthetic", "--epochs=1", "--steps_per_epoch=1", "--batch_size=16", "--synthetic_size=32",
        "--progress=quiet"]
SHIFT_CHANGES = {"augment"}  # what --recipe=shift changes over robust (docs/robust.md, "The shift recipe")


# ----------------------------------------------------------------------------
# metrics helpers against brute-force definitions
# ----------------------------------------------------------------------------


def test_ensemble_log_probs_is_the_log_of_the_mean_probability():
    from lightflax import metrics

    rng = np.random.default_rng(0)
    logits = rng.normal(size=(3, 7, 4)) * 5
    lp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    want = np.log(np.mean(np.exp(lp), axis=0))
    np.testing.assert_allclose(metrics.ensemble_log_probs(lp), want, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(np.exp(metrics.ensemble_log_probs(lp)).sum(-1), 1.0, rtol=1e-12)
    with pytest.raises(ValueError):
        metrics.ensemble_log_probs(lp[0])


def test_threshold_metrics_brute_force():
    from lightflax import metrics

    rng = np.random.default_rng(1)
    p1 = rng.uniform(size=50)
    y = rng.integers(0, 2, size=50)
    lp = np.log(np.stack([1 - p1, p1], -1))
    for t in (0.2, 0.5, 0.7):
        m = metrics.threshold_metrics(lp, y, t)
        pred = [1 if p > t else 0 for p in p1]
        assert m["accuracy"] == pytest.approx(sum(int(a == b) for a, b in zip(pred, y)) / 50)
        tp = sum(1 for a, b in zip(pred, y) if a == 1 and b == 1)
        tn = sum(1 for a, b in zip(pred, y) if a == 0 and b == 0)
        assert m["sensitivity"] == pytest.approx(tp / sum(y))
        assert m["specificity"] == pytest.approx(tn / (50 - sum(y)))
    # 0.5 is the argmax decision
    assert metrics.threshold_metrics(lp, y, 0.5)["accuracy"] == metrics.classification_metrics(lp, y)["accuracy"]


# ----------------------------------------------------------------------------
# A. evaluation outputs of a run
# ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def two_seed_run(tmp_path_factory):
    """One --recipe=robust run with two seeds (the recipe's --decision=prior_corrected, no class
    weighting): both the evaluation-output checks and the robust recipe's end-to-end checks read it."""
    wd = tmp_path_factory.mktemp("recipe") / "run"
    run_launch(["--experiment=xray_light", "--k=2", "--image_size=28", "--recipe=robust", "--num_seeds=2",
                f"--workdir={wd}", *TINY], check=0)
    return wd, json.loads((wd / "results.json").read_text())


def _recompute(lp, y, decision):
    from lightflax import metrics

    out = metrics.classification_metrics(lp, y)
    out.update(metrics.shift_proxies(lp, y, source_prior=decision["model_prior"],
                                     target_prior=decision["target_prior"]))
    corrected = metrics.threshold_metrics(lp, y, decision["threshold"])
    out.update({f"{k}_prior_corrected": v for k, v in corrected.items()})
    return out


def _assert_same(got, want):
    assert set(got) == set(want), set(got) ^ set(want)
    for k, v in want.items():
        if v is None:
            assert got[k] is None, k
        else:
            assert got[k] == pytest.approx(v, rel=1e-6, abs=1e-9), k


def test_predictions_npz_reproduces_the_reported_metrics(two_seed_run):
    from lightflax import metrics

    wd, r = two_seed_run
    z = np.load(wd / "predictions.npz")
    assert sorted(z.files) == ["test_labels", "test_log_probs", "val_labels", "val_log_probs"]
    decision = r["decision"]
    assert set(decision) == {"rule", "threshold", "train_prior", "model_prior", "target_prior", "temperature"}
    from lightflax import adapt  # the temperature: fitted on the validation split's averaged probabilities

    assert decision["temperature"] == pytest.approx(
        adapt.fit_temperature(metrics.ensemble_log_probs(z["val_log_probs"]), z["val_labels"]), rel=1e-6)
    assert decision["model_prior"] == decision["train_prior"]  # no class weighting
    assert decision["rule"] == "prior_corrected"
    np.testing.assert_allclose(decision["target_prior"], metrics.PNEUMONIA_TEST_PRIOR)
    assert decision["threshold"] == pytest.approx(metrics.prior_threshold(decision["model_prior"],
                                                                          decision["target_prior"]))
    for split in ("val", "test"):
        lp, y = z[f"{split}_log_probs"], z[f"{split}_labels"]
        assert lp.dtype == np.float32 and lp.shape == (2, r["dataset"]["splits"][split], 2)
        assert y.shape == (lp.shape[1],)
        for rep in range(2):  # every replica's reported metrics, shift proxies included
            _assert_same(r["replicas"][rep][split], _recompute(lp[rep], y, decision))
        # the ensemble by hand: log of the mean of the replicas' probabilities
        by_hand = np.log((np.exp(lp[0].astype(np.float64)) + np.exp(lp[1].astype(np.float64))) / 2)
        _assert_same(r["select_ensemble" if split == "val" else "test_ensemble"],
                     _recompute(by_hand, y, decision))
    sel = r["select_metrics"]
    for key in ("balanced_accuracy", "target_prior_accuracy", "ece", "prior_corrected_target_prior_accuracy",
                "accuracy_prior_corrected"):
        assert sel[key] == pytest.approx(np.mean([r["replicas"][i]["val"][key] for i in range(2)]))
        assert key + "_std" in sel
    # both decision rules' headline figures, neither replacing the other
    assert r["test_accuracy"] == pytest.approx(r["test_metrics"]["accuracy"])
    assert r["test_accuracy_prior_corrected"] == pytest.approx(r["test_metrics"]["accuracy_prior_corrected"])
    assert r["sensitivity_prior_corrected"] == pytest.approx(r["test_metrics"]["sensitivity_prior_corrected"])
    assert r["config"]["decision"] == "prior_corrected"


def test_ten_classes_have_no_shift_proxies_and_refuse_prior_correction(tmp_path):
    wd = tmp_path / "run"
    run_launch(["--experiment=fashion_mnist", "--method=conv2d", f"--workdir={wd}", *TINY], check=0)
    r = json.loads((wd / "results.json").read_text())
    assert r["decision"] == {"rule": "argmax", "threshold": None, "train_prior": r["decision"]["train_prior"],
                             "model_prior": r["decision"]["train_prior"], "target_prior": None,
                             "temperature": r["decision"]["temperature"]}
    assert 0.05 <= r["decision"]["temperature"] <= 20  # fitted on the validation split
    assert len(r["decision"]["train_prior"]) == 10
    assert "balanced_accuracy" not in r["select_metrics"] and "ece" not in r["select_metrics"]
    assert "select_ensemble" not in r  # one seed: no ensemble
    z = np.load(wd / "predictions.npz")
    assert z["val_log_probs"].shape[2] == 10
    proc = run_launch(["--experiment=fashion_mnist", "--method=conv2d", "--decision=prior_corrected",
                       f"--workdir={tmp_path / 'b'}", *TINY], check=2)
    assert "--decision=prior_corrected is for two-class data" in proc.stderr + proc.stdout


# ----------------------------------------------------------------------------
# B. knobs
# ----------------------------------------------------------------------------


def test_class_weights_and_weighted_cross_entropy_against_float64_reference():
    import jax
    import jax.numpy as jnp

    from lightflax import steps

    labels = np.array([0] * 30 + [1] * 10 + [2] * 20)
    w = steps.class_weights(labels, 3)
    np.testing.assert_allclose(w, [60 / (3 * 30), 60 / (3 * 10), 60 / (3 * 20)], rtol=1e-6)
    assert np.mean(w[labels]) == pytest.approx(1.0)  # unbiased: the weights average to 1 over the split
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(16, 3)) * 3
    y = rng.integers(0, 3, size=16)
    z = logits - logits.max(-1, keepdims=True)
    logp = z - np.log(np.exp(z).sum(-1, keepdims=True))
    ref = np.mean(w[y].astype(np.float64) * -logp[np.arange(16), y])
    ref_grad = (w[y].astype(np.float64)[:, None] / 16) * (np.exp(logp) - np.eye(3)[y])
    f = lambda lg: steps.weighted_cross_entropy(lg, jnp.asarray(y), jnp.asarray(w))  # noqa: E731
    assert float(f(jnp.asarray(logits, jnp.float32))) == pytest.approx(ref, rel=1e-5)
    np.testing.assert_allclose(np.asarray(jax.grad(f)(jnp.asarray(logits, jnp.float32))), ref_grad,
                               rtol=1e-4, atol=1e-7)


def test_train_step_uses_the_balanced_loss():
    """The train step's loss on an imbalanced batch equals the float64 weighted reference computed
    from the model's own logits for that batch."""
    import jax
    import jax.numpy as jnp

    from lightflax import data, models, parallel, steps
    from lightflax.config import RunConfig

    d = data.load("synthetic", synthetic_shape=(28, 28, 1), synthetic_sizes={"train": 40, "val": 8, "test": 8},
                  num_classes=2)
    images = np.asarray(d.splits["train"].images)
    labels = np.array([0] * 30 + [1] * 10, np.int32)
    np.random.default_rng(0).shuffle(labels)
    cfg = RunConfig.flat(workdir="unused", model="xray_light", model_kwargs={"k": 2}, batch_size=16, image_size=28,
                    class_weighting="balanced", shuffle=False)
    model = models.create("xray_light", num_classes=2, bn_axis_name=parallel.AXIS, k=2)
    w = steps.class_weights(labels, 2)
    state = steps.create_state(model, steps.make_optimizer(1e-3), jax.random.key(0), (1, 28, 28, 3))
    step = steps.make_train_step(model, cfg, 16, w)
    key = jax.random.key(1)
    # compiled: op by op, the step took minutes under a loaded CI
    run = jax.jit(jax.vmap(step, in_axes=(None, None, None, None, None, None, 0), axis_name=parallel.AXIS))
    _, m = run(state, jnp.asarray(images), jnp.asarray(labels), jnp.arange(40, dtype=jnp.int32), jnp.int32(0), key,
               jnp.zeros((1, 1), jnp.int32))

    def logits_fn(dev):
        x = steps.preprocess(jnp.asarray(images[:16]), 28, cfg)
        k = jax.random.fold_in(jax.random.fold_in(key, state.step), dev[0])
        _, drop_key = jax.random.split(k)
        out, _ = model.apply({"params": state.params, "batch_stats": state.batch_stats}, x, train=True,
                             mutable=["batch_stats"], rngs={"dropout": drop_key})
        return out

    lg = np.asarray(jax.jit(jax.vmap(logits_fn, axis_name=parallel.AXIS))(jnp.zeros((1, 1), jnp.int32))[0],
                    np.float64)
    y = labels[:16]
    logp = lg - lg.max(-1, keepdims=True)
    logp = logp - np.log(np.exp(logp).sum(-1, keepdims=True))
    ref = np.mean(w[y] * -logp[np.arange(16), y])
    assert float(m["loss"][0]) == pytest.approx(ref, rel=1e-5)
    assert abs(ref - np.mean(-logp[np.arange(16), y])) > 1e-4  # the weighting changes the loss here


def _cosine(t, lr, total, warmup):
    if t < warmup:
        return lr * t / warmup
    return lr * 0.5 * (1 + np.cos(np.pi * (t - warmup) / (total - warmup)))


@pytest.mark.parametrize("warmup_epochs", [0, 1])
def test_cosine_schedule_is_the_rate_adam_applies(warmup_epochs):
    """With a constant gradient Adam's bias-corrected step is -lr_t * g / (|g| + eps): the update
    reveals the learning rate the optimiser really used at step t."""
    import jax.numpy as jnp

    from lightflax import steps
    from lightflax.config import RunConfig

    cfg = RunConfig.flat(workdir="unused", model="xray_light", epochs=4, learning_rate=2e-3, lr_schedule="cosine",
                    warmup_epochs=warmup_epochs)
    spe = 5
    tx = steps.make_optimizer(steps.learning_rate_schedule(cfg, spe))
    params = {"w": jnp.zeros((3,))}
    opt_state = tx.init(params)
    grads = {"w": jnp.ones((3,))}
    for t in range(cfg.epochs * spe):
        updates, opt_state = tx.update(grads, opt_state, params)
        want = _cosine(t, 2e-3, 20, warmup_epochs * spe)
        np.testing.assert_allclose(-np.asarray(updates["w"]), want, rtol=1e-5, atol=1e-10)
        assert float(opt_state.hyperparams["learning_rate"]) == pytest.approx(want, rel=1e-5, abs=1e-10)
    assert want == pytest.approx(_cosine(19, 2e-3, 20, warmup_epochs * spe))


def test_knob_validation():
    from lightflax.config import RunConfig
    from lightflax.errors import UserError
    from lightflax.train import check_resume_settings

    base = dict(workdir="unused", model="xray_light")
    with pytest.raises(UserError, match="cannot be combined with --reduce_lr_patience"):
        RunConfig.flat(**base, lr_schedule="cosine", reduce_lr_patience=2)
    with pytest.raises(UserError, match="--warmup_epochs needs --lr_schedule=cosine"):
        RunConfig.flat(**base, warmup_epochs=1)
    with pytest.raises(UserError, match="smaller than --epochs"):
        RunConfig.flat(**base, lr_schedule="cosine", warmup_epochs=3, epochs=3)
    for name in ("class_weighting", "lr_schedule", "decision"):
        with pytest.raises(UserError, match=f"--{name} must be one of"):
            RunConfig.flat(**base, **{name: "bogus"})
    cosine = RunConfig.flat(**base, lr_schedule="cosine", epochs=4)
    with pytest.raises(UserError, match="--epochs 4 -> 6"):  # the schedule spans the run's epochs
        check_resume_settings(RunConfig.flat(**base, lr_schedule="cosine", epochs=6), cosine.to_json())
    check_resume_settings(RunConfig.flat(**base, epochs=6), RunConfig.flat(**base, epochs=4).to_json())  # constant: may


def test_cosine_schedule_survives_resume(tmp_path):
    """Killed in epoch 2 and resumed: the per-epoch learning rates are the schedule's at the last
    step of each epoch (the step count is in the optimiser state of the checkpoint)."""
    wd = tmp_path / "run"
    args = ["--experiment=xray_light", "--k=2", "--image_size=28", "--dataset=synthetic", "--epochs=3",
            "--steps_per_epoch=2", "--batch_size=16", "--synthetic_size=32", "--progress=quiet",
            "--lr_schedule=cosine", "--learning_rate=0.01", f"--workdir={wd}"]
    proc = run_launch(args, env={FAULT_KILL_ENV: "3"})
    assert proc.returncode != 0
    run_launch(args + ["--resume"], check=0)
    r = json.loads((wd / "results.json").read_text())
    with open(wd / "history.csv") as f:
        lrs = [float(row["learning_rate"]) for row in csv.DictReader(f)]
    assert lrs == pytest.approx([_cosine(2 * e + 1, 0.01, 6, 0) for e in range(3)], rel=1e-5, abs=1e-9)
    assert r["config"]["lr_schedule"] == "cosine"


# ----------------------------------------------------------------------------
# C. --recipe
# ----------------------------------------------------------------------------


def _config(experiment="xray_light", **fields):
    """configs/<experiment>.py with ``fields`` ({"schedule.epochs": 3}) set as the command line would."""
    import importlib

    from ml_collections.config_flags import config_path

    config = importlib.import_module(f"configs.{experiment}").get_config()
    for path, value in fields.items():
        config_path.set_value(path, config, value)
    return config, frozenset(fields)


def test_study_recipe_is_todays_defaults():
    from experiments import recipes

    for experiment in recipes.EXPERIMENTS:
        config, _ = _config(experiment)
        assert recipes.study(config).to_dict() == config.to_dict(), experiment
    config, _ = _config()
    robust = recipes.robust(config)
    assert robust is not config and config.schedule.lr_schedule == "constant"  # a new config, the input unchanged
    changed = {f for f, p in recipes.KNOBS.items() if recipes.get(robust, p) != recipes.get(config, p)}
    assert changed == {"lr_schedule", "num_seeds", "decision"}  # one switch, the same knobs


def test_recipe_sets_the_values_and_an_explicit_flag_wins():
    from experiments import recipes

    config, explicit = _config(recipe="robust", **{"schedule.epochs": 3, "model.dropout": 0.1})
    out, record = recipes.apply(config, explicit)
    assert (out.schedule.epochs, out.model.dropout, out.runtime.num_seeds, out.schedule.lr_schedule,
            out.callbacks.decision) == (3, 0.1, 3, "cosine", "prior_corrected")
    assert record["recipe"] == "robust"
    assert record["recipe_overrides"] == {"epochs": 3, "dropout": 0.1}
    assert record["recipe_values"]["epochs"] == 3 and record["recipe_values"]["num_seeds"] == 3
    assert config.runtime.num_seeds == 1  # the input config is not overwritten
    # xray_transfer: augment does not apply to cached features and is left alone ...
    config, explicit = _config("xray_transfer", recipe="robust", **{"data.augment": "study"})
    out, record = recipes.apply(config, explicit)
    assert out.data.augment == "study" and out.runtime.num_seeds == 3
    assert set(record["recipe_skipped"]) == {"augment"}
    # ... and its linear head trains to convergence: 100 epochs, study keeps 20
    assert out.schedule.epochs == 100 and record["recipe_values"]["epochs"] == 100
    config, explicit = _config("xray_transfer", recipe="robust", **{"schedule.epochs": 7})
    assert recipes.apply(config, explicit)[1]["recipe_overrides"] == {"epochs": 7}
    assert recipes.apply(_config("xray_transfer")[0], frozenset())[0].schedule.epochs == 20
    # --finetune_blocks: one seed, the recipe's --num_seeds is skipped
    config, explicit = _config("xray_transfer", recipe="robust", **{"transfer.finetune_blocks": 1})
    out, record = recipes.apply(config, explicit)
    assert out.runtime.num_seeds == 1 and "num_seeds" in record["recipe_skipped"]


def test_study_and_robust_store_no_predict_defaults(monkeypatch):
    """predict's test-time adaptation stays off for study and robust runs (they stay reproducible as
    documented); a recipe with predict defaults stores them in its record (results.json)."""
    from experiments import recipes

    for name in ("study", "robust"):
        config, explicit = _config(recipe=name)
        assert "predict_defaults" not in recipes.apply(config, explicit)[1], name
    monkeypatch.setitem(recipes.PREDICT_DEFAULTS, "robust", {"adapt_bn": True, "label_shift": "em"})
    config, explicit = _config(recipe="robust")
    assert recipes.apply(config, explicit)[1]["predict_defaults"] == {"adapt_bn": True, "label_shift": "em"}


def test_shift_recipe_is_robust_plus_its_choices_and_stores_predicts_procedure():
    """--recipe=shift: robust's values plus the acquisition ablations' choices; its record carries
    predict's whole default procedure (AdaBN, no EM, no temperature; the stored decision)."""
    from experiments import recipes

    config, explicit = _config(recipe="shift")
    out, record = recipes.apply(config, explicit)
    robust, _ = recipes.apply(_config(recipe="robust")[0], frozenset())
    changed = {f for f, p in recipes.KNOBS.items() if recipes.get(out, p) != recipes.get(robust, p)}
    assert changed == SHIFT_CHANGES
    assert (out.runtime.num_seeds, out.schedule.lr_schedule, out.callbacks.decision) == (3, "cosine", "prior_corrected")
    assert record["predict_defaults"] == {"adapt_bn": True, "label_shift": "none", "calibrate": "none"}
    # an explicit flag still wins, and is recorded as an override
    config, explicit = _config(recipe="shift", **{"data.augment": "none"})
    out, record = recipes.apply(config, explicit)
    assert out.data.augment == "none" and record["recipe_overrides"] == {"augment": "none"}
    # xray_transfer: the augmentation is skipped (cached features), predict's defaults are stored
    out, record = recipes.apply(*_config("xray_transfer", recipe="shift"))
    assert out.data.augment == "none" and "augment" in record["recipe_skipped"] and out.schedule.epochs == 100


def test_recipe_only_where_it_is_applied():
    from experiments import recipes
    from lightflax.errors import UserError

    config, _ = _config("mnist")
    assert "recipe" not in config and recipes.apply(config, frozenset()) == (config, {})  # no field, no flag
    config.recipe = "robust"
    with pytest.raises(UserError, match="--recipe applies to"):
        recipes.apply(config, frozenset())


def test_robust_recipe_end_to_end(two_seed_run):
    _, r = two_seed_run
    c = r["config"]
    assert r["recipe"] == "robust"
    assert (c["augment"], c["model_kwargs"].get("dropout", 0.0), c["class_weighting"], c["lr_schedule"],
            c["decision"]) == ("none", 0.0, "none", "cosine", "prior_corrected")
    assert (c["epochs"], c["num_seeds"]) == (1, 2)  # explicit flags win over the recipe's 20 and 3
    assert r["recipe_overrides"] == {"epochs": 1, "num_seeds": 2}
    assert r["recipe_values"]["epochs"] == 1 and r["recipe_values"]["lr_schedule"] == "cosine"
    assert r["decision"]["rule"] == "prior_corrected" and "test_ensemble" in r


def test_shift_recipe_end_to_end_and_predict_applies_its_procedure(tmp_path, capsys):
    """A --recipe=shift run trains with the acquisition augmentation and stores predict's procedure;
    predict then applies AdaBN by default, and an explicit adapt_bn=False turns it off."""
    from lightflax import predict

    wd = tmp_path / "run"
    run_launch(["--experiment=xray_light", "--k=2", "--image_size=28", "--recipe=shift", "--num_seeds=2",
                f"--workdir={wd}", *TINY], check=0)
    r = json.loads((wd / "results.json").read_text())
    assert r["recipe"] == "shift" and r["config"]["augment"] == "acquisition"
    assert r["predict_defaults"] == {"adapt_bn": True, "label_shift": "none", "calibrate": "none"}
    np.savez(tmp_path / "in.npz", images=np.random.default_rng(0).integers(0, 256, (40, 28, 28), dtype=np.uint8))
    adapted, _ = predict.predict_npz(str(wd), str(tmp_path / "in.npz"), str(tmp_path / "a.npz"))
    assert "AdaBN" in capsys.readouterr().out
    plain, _ = predict.predict_npz(str(wd), str(tmp_path / "in.npz"), str(tmp_path / "p.npz"),
                                   adapt_options={"adapt_bn": False})
    assert "AdaBN" not in capsys.readouterr().out and np.abs(adapted - plain).max() > 1e-4


def test_unknown_recipe_is_a_flag_error(tmp_path):
    proc = run_launch(["--experiment=xray_conv2d", "--recipe=fancy", f"--workdir={tmp_path / 'x'}", *TINY],
                      check=2)
    assert "recipe" in proc.stderr and "robust" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "x").exists()


def test_a_balanced_loss_is_corrected_from_a_uniform_prior():
    """class_weighting=balanced trains at a uniform prior: the prior-corrected threshold must start from
    it (0.375 for the X-ray test balance), not from the training split's prior (0.633)."""
    from types import SimpleNamespace

    from lightflax import decision, metrics
    from lightflax.config import RunConfig

    labels = np.array([0] * 26 + [1] * 74)
    data = SimpleNamespace(num_classes=2, name="x", splits={"train": SimpleNamespace(labels=labels)})
    plain = decision.build(RunConfig.flat(workdir="w", model="xray_light", decision="prior_corrected"), data)
    balanced = decision.build(RunConfig.flat(workdir="w", model="xray_light", decision="prior_corrected",
                                        class_weighting="balanced"), data)
    assert plain["threshold"] == pytest.approx(metrics.prior_threshold([0.26, 0.74], metrics.PNEUMONIA_TEST_PRIOR))
    assert balanced["model_prior"] == [0.5, 0.5] and balanced["train_prior"] == [0.26, 0.74]
    assert balanced["threshold"] == pytest.approx(0.375)
    assert plain["threshold"] > 0.6 > balanced["threshold"]
