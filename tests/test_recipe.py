"""Evaluation outputs (predictions.npz, shift proxies, ensembles, decision), the robust-recipe knobs
(--class_weighting, --lr_schedule, --decision) and --recipe."""

import csv
import json

import numpy as np
import pytest

from conftest import run_launch

TINY = ["--dataset=synthetic", "--epochs=1", "--steps_per_epoch=1", "--batch_size=16", "--synthetic_size=32",
        "--progress=quiet"]


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
    wd = tmp_path_factory.mktemp("recipe") / "run"
    run_launch(["--experiment=xray_light", "--k=2", "--image_size=28", "--num_seeds=2",
                "--decision=prior_corrected", f"--workdir={wd}", *TINY], check=0)
    return wd, json.loads((wd / "results.json").read_text())


def _recompute(lp, y, decision):
    from lightflax import metrics

    out = metrics.classification_metrics(lp, y)
    out.update(metrics.shift_proxies(lp, y, source_prior=decision["train_prior"],
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
    assert set(decision) == {"rule", "threshold", "train_prior", "target_prior"}
    assert decision["rule"] == "prior_corrected"
    np.testing.assert_allclose(decision["target_prior"], metrics.PNEUMONIA_TEST_PRIOR)
    assert decision["threshold"] == pytest.approx(metrics.prior_threshold(decision["train_prior"],
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
                             "target_prior": None}
    assert len(r["decision"]["train_prior"]) == 10
    assert "balanced_accuracy" not in r["select_metrics"] and "ece" not in r["select_metrics"]
    assert "select_ensemble" not in r  # one seed: no ensemble
    z = np.load(wd / "predictions.npz")
    assert z["val_log_probs"].shape[2] == 10
    proc = run_launch(["--experiment=fashion_mnist", "--method=conv2d", "--decision=prior_corrected",
                       f"--workdir={tmp_path / 'b'}", *TINY], check=2)
    assert "--decision=prior_corrected is for two-class data" in proc.stderr + proc.stdout
