"""lightflax.metrics against brute-force definitions (loops over pairs, examples, bins)."""

import itertools
import math

import numpy as np
import pytest

from lightflax import metrics


def _random_case(seed, n=60, ties=True):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 2, n)
    scores = rng.random(n)
    if ties:  # coarse scores: many ties, within and across classes
        scores = np.round(scores * 4) / 4
    return scores, labels


def _auc_all_pairs(scores, labels):
    pos = [s for s, y in zip(scores, labels) if y == 1]
    neg = [s for s, y in zip(scores, labels) if y == 0]
    if not pos or not neg:
        return None
    total = 0.0
    for a, b in itertools.product(pos, neg):
        total += 1.0 if a > b else 0.5 if a == b else 0.0
    return total / (len(pos) * len(neg))


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("ties", [True, False])
def test_roc_auc_equals_all_pairs_count(seed, ties):
    scores, labels = _random_case(seed, ties=ties)
    assert metrics.roc_auc(scores, labels) == pytest.approx(_auc_all_pairs(scores, labels), abs=1e-12)


def test_roc_auc_edge_cases():
    assert metrics.roc_auc([0.3, 0.3, 0.3, 0.3], [0, 1, 0, 1]) == 0.5  # all tied
    assert metrics.roc_auc([0.1, 0.2, 0.8, 0.9], [0, 0, 1, 1]) == 1.0
    assert metrics.roc_auc([0.9, 0.8, 0.2, 0.1], [0, 0, 1, 1]) == 0.0
    assert metrics.roc_auc([0.1, 0.5, 0.9], [1, 1, 1]) is None  # one class absent
    assert metrics.roc_auc([0.1, 0.5, 0.9], [0, 0, 0]) is None


def _log_probs(p1):
    p1 = np.asarray(p1, np.float64)
    with np.errstate(divide="ignore"):
        return np.log(np.stack([1 - p1, p1], axis=-1))


@pytest.mark.parametrize("seed", range(4))
def test_classification_metrics_brute_force(seed):
    scores, labels = _random_case(seed, n=41, ties=False)
    scores = np.clip(scores, 1e-3, 1 - 1e-3)
    lp = _log_probs(scores)
    got = metrics.classification_metrics(lp, labels)
    pred = [1 if s > 0.5 else 0 for s in scores]
    tp = sum(p == 1 and y == 1 for p, y in zip(pred, labels))
    tn = sum(p == 0 and y == 0 for p, y in zip(pred, labels))
    n_pos, n_neg = int(sum(labels)), int(len(labels) - sum(labels))
    assert got["accuracy"] == pytest.approx((tp + tn) / len(labels))
    assert got["sensitivity"] == pytest.approx(tp / n_pos)
    assert got["specificity"] == pytest.approx(tn / n_neg)
    nll = -sum(math.log(s if y == 1 else 1 - s) for s, y in zip(scores, labels)) / len(labels)
    assert got["loss"] == pytest.approx(nll, rel=1e-12)
    assert got["roc_auc"] == pytest.approx(_auc_all_pairs(scores, labels))
    # balanced accuracy = (sensitivity + specificity) / 2 for two classes
    assert metrics.balanced_accuracy(np.array(pred), labels) == pytest.approx((tp / n_pos + tn / n_neg) / 2)


def test_classification_metrics_one_class_absent():
    lp = _log_probs([0.2, 0.7, 0.9])
    got = metrics.classification_metrics(lp, np.array([1, 1, 1]))
    assert got["sensitivity"] == pytest.approx(2 / 3) and got["specificity"] is None and got["roc_auc"] is None
    got = metrics.classification_metrics(lp, np.array([0, 0, 0]))
    assert got["specificity"] == pytest.approx(1 / 3) and got["sensitivity"] is None and got["roc_auc"] is None
    # balanced accuracy averages over the classes present only
    assert metrics.balanced_accuracy(np.array([0, 1, 1]), np.array([1, 1, 1]), 2) == pytest.approx(2 / 3)
    assert metrics.balanced_accuracy(np.array([], int), np.array([], int), 2) is None


@pytest.mark.parametrize("seed", range(4))
def test_balanced_accuracy_multiclass_brute_force(seed):
    rng = np.random.default_rng(seed)
    labels, pred = rng.integers(0, 4, 50), rng.integers(0, 4, 50)
    recalls = []
    for c in range(4):
        idx = [i for i in range(50) if labels[i] == c]
        if idx:
            recalls.append(sum(pred[i] == c for i in idx) / len(idx))
    assert metrics.balanced_accuracy(pred, labels, 4) == pytest.approx(sum(recalls) / len(recalls))


@pytest.mark.parametrize("seed", range(4))
def test_reweighted_accuracy_equals_accuracy_of_a_resampled_set(seed):
    """Replicate each class so the set has exactly the target balance, then count."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 2, 30)
    pred = np.where(rng.random(30) < 0.7, labels, 1 - labels)
    n0, n1 = int((labels == 0).sum()), int((labels == 1).sum())
    q = (3, 5)  # 3/8 normal, as the test split's 37.5 %
    reps = {0: q[0] * n1, 1: q[1] * n0}  # class c has n_c * reps[c] copies: ratio q0 : q1
    big_labels, big_pred = [], []
    for y, p in zip(labels, pred):
        big_labels += [y] * reps[int(y)]
        big_pred += [p] * reps[int(y)]
    assert np.mean(np.array(big_labels) == 0) == pytest.approx(3 / 8)
    brute = np.mean(np.array(big_pred) == np.array(big_labels))
    assert metrics.reweighted_accuracy(pred, labels, (3 / 8, 5 / 8)) == pytest.approx(brute, abs=1e-12)
    # and the importance weights give the same figure as a weighted mean
    w = metrics.label_shift_weights(labels, (3 / 8, 5 / 8))
    assert np.average(pred == labels, weights=w) == pytest.approx(brute, abs=1e-12)
    assert np.mean(w) == pytest.approx(1.0)


def test_reweighted_accuracy_absent_class_and_bad_prior():
    assert metrics.reweighted_accuracy(np.array([1, 1]), np.array([1, 1]), (0.375, 0.625)) is None
    assert metrics.reweighted_accuracy(np.array([1, 0]), np.array([1, 1]), (0.0, 1.0)) == 0.5
    with pytest.raises(ValueError, match="target_prior"):
        metrics.reweighted_accuracy(np.array([1]), np.array([1]), (np.nan, 1.0))
    with pytest.raises(ValueError, match="absent"):
        metrics.label_shift_weights(np.array([1, 1]), (0.5, 0.5))
    assert metrics.PNEUMONIA_TEST_PRIOR[0] == pytest.approx(0.375)


def _ece_brute(probs, labels, bins, weights=None):
    weights = [1.0] * len(labels) if weights is None else list(weights)
    total = sum(weights)
    ece = 0.0
    for b in range(bins):
        lo, hi = b / bins, (b + 1) / bins
        members = [i for i in range(len(labels))
                   if (lo < max(probs[i]) <= hi) or (b == 0 and max(probs[i]) <= lo)]
        wsum = sum(weights[i] for i in members)
        if not members or wsum == 0:
            continue
        acc = sum(weights[i] * (int(np.argmax(probs[i])) == labels[i]) for i in members) / wsum
        conf = sum(weights[i] * max(probs[i]) for i in members) / wsum
        ece += wsum / total * abs(acc - conf)
    return ece


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("bins", [1, 10, 15])
def test_expected_calibration_error_brute_force(seed, bins):
    rng = np.random.default_rng(seed)
    probs = rng.dirichlet([1, 1, 1], size=40)
    probs[:5] = [0.5, 0.3, 0.2]  # confidences exactly on a bin edge for bins=10
    labels = rng.integers(0, 3, 40)
    assert metrics.expected_calibration_error(probs, labels, bins) == pytest.approx(
        _ece_brute(probs, labels, bins), abs=1e-12)
    w = rng.random(40)
    assert metrics.expected_calibration_error(probs, labels, bins, weights=w) == pytest.approx(
        _ece_brute(probs, labels, bins, w), abs=1e-12)


def test_expected_calibration_error_known_values():
    # perfectly calibrated: confidence 0.75, 3 of 4 right
    probs = np.array([[0.25, 0.75]] * 4)
    assert metrics.expected_calibration_error(probs, np.array([1, 1, 1, 0]), 10) == pytest.approx(0.0)
    # always confident (1.0) and always wrong: ECE 1
    assert metrics.expected_calibration_error(np.array([[1.0, 0.0]] * 3), np.array([1, 1, 1])) == 1.0


@pytest.mark.parametrize("seed", range(4))
def test_prior_correction_is_bayes_rule(seed):
    rng = np.random.default_rng(seed)
    probs = rng.dirichlet([1, 1], size=25)
    src, tgt = (1214 / 4708, 3494 / 4708), (0.375, 0.625)
    got = np.exp(metrics.prior_corrected_log_probs(np.log(probs), src, tgt))
    for i in range(25):
        num = [probs[i][c] * tgt[c] / src[c] for c in range(2)]
        for c in range(2):
            assert got[i, c] == pytest.approx(num[c] / sum(num), rel=1e-12)
    # the same decision as a logit shift and as a threshold on the uncorrected p1
    shift = metrics.prior_logit_shift(src, tgt)
    assert shift == pytest.approx(math.log(0.625 / 0.375) - math.log(3494 / 1214))
    t = metrics.prior_threshold(src, tgt)
    assert t > 0.5  # the target has more normals: pneumonia needs more evidence
    for i in range(25):
        logit = math.log(probs[i][1] / probs[i][0])
        assert (got[i, 1] > 0.5) == (logit + shift > 0) == (probs[i][1] > t)
    # no shift when the priors agree
    np.testing.assert_allclose(metrics.prior_corrected_log_probs(np.log(probs), src, src), np.log(probs),
                               atol=1e-12)
    assert metrics.prior_threshold(src, src) == pytest.approx(0.5)


def test_prior_correction_three_classes_and_errors():
    probs = np.array([[0.2, 0.3, 0.5]])
    got = np.exp(metrics.prior_corrected_log_probs(np.log(probs), (0.5, 0.25, 0.25), (0.2, 0.4, 0.4)))
    num = np.array([0.2 * 0.2 / 0.5, 0.3 * 0.4 / 0.25, 0.5 * 0.4 / 0.25])
    np.testing.assert_allclose(got[0], num / num.sum(), rtol=1e-12)
    with pytest.raises(ValueError, match="zero class"):
        metrics.prior_corrected_log_probs(np.log(probs), (0.0, 0.5, 0.5), (0.2, 0.4, 0.4))
    with pytest.raises(ValueError, match="for 3 classes"):
        metrics.prior_corrected_log_probs(np.log(probs), (0.5, 0.5), (0.5, 0.5))
    with pytest.raises(ValueError, match="two classes"):
        metrics.prior_threshold((0.2, 0.4, 0.4), (0.2, 0.4, 0.4))


def test_shift_proxies_brute_force():
    rng = np.random.default_rng(7)
    labels = rng.integers(0, 2, 80)
    p1 = np.clip(np.where(labels == 1, rng.beta(4, 2, 80), rng.beta(2, 4, 80)), 1e-6, 1 - 1e-6)
    lp = _log_probs(p1)
    src, tgt = (0.258, 0.742), metrics.PNEUMONIA_TEST_PRIOR
    got = metrics.shift_proxies(lp, labels, source_prior=src, target_prior=tgt)
    assert set(got) == {"balanced_accuracy", "ece", "target_prior_accuracy", "target_prior_ece",
                        "prior_corrected_balanced_accuracy", "prior_corrected_target_prior_accuracy",
                        "prior_corrected_target_prior_ece", "prior_threshold"}

    def recalls(pred):
        sens = sum(p == 1 and y == 1 for p, y in zip(pred, labels)) / sum(labels == 1)
        spec = sum(p == 0 and y == 0 for p, y in zip(pred, labels)) / sum(labels == 0)
        return sens, spec

    sens, spec = recalls([int(p > 0.5) for p in p1])
    assert got["balanced_accuracy"] == pytest.approx((sens + spec) / 2)
    assert got["target_prior_accuracy"] == pytest.approx(tgt[0] * spec + tgt[1] * sens)
    t = got["prior_threshold"]
    sens_c, spec_c = recalls([int(p > t) for p in p1])
    assert got["prior_corrected_balanced_accuracy"] == pytest.approx((sens_c + spec_c) / 2)
    assert got["prior_corrected_target_prior_accuracy"] == pytest.approx(tgt[0] * spec_c + tgt[1] * sens_c)
    probs = np.exp(lp)
    assert got["ece"] == pytest.approx(_ece_brute(probs, labels, 15))
    w = [tgt[y] / np.mean(labels == y) for y in labels]
    assert got["target_prior_ece"] == pytest.approx(_ece_brute(probs, labels, 15, w))
    # one class absent: re-weighted figures are unknown, not made up
    only = metrics.shift_proxies(lp[labels == 1], labels[labels == 1], source_prior=src, target_prior=tgt)
    assert only["target_prior_accuracy"] is None and only["target_prior_ece"] is None
    assert only["balanced_accuracy"] == pytest.approx(np.mean(p1[labels == 1] > 0.5))


def test_majority_class_accuracy_and_nan_auc():
    train = np.array([1, 1, 0, 1])
    assert metrics.majority_class_accuracy(train, np.array([0, 1, 1, 1, 0])) == pytest.approx(3 / 5)
    assert metrics.majority_class_accuracy(np.array([0, 1]), np.array([0, 0, 1])) == pytest.approx(2 / 3)
    assert metrics.majority_class_accuracy(train, np.array([], int)) is None
    # the PneumoniaMNIST train majority (pneumonia) on a set with the test split's balance: 390 / 624
    train_pm = np.array([0] * 1214 + [1] * 3494)
    assert metrics.majority_class_accuracy(train_pm, np.array([0] * 234 + [1] * 390)) == pytest.approx(0.625)
    assert metrics.roc_auc([0.1, np.nan, 0.3], [0, 1, 1]) is None


@pytest.mark.parametrize("seed", range(3))
def test_classification_metrics_with_tied_probabilities(seed):
    """Coarse probabilities, many exactly 0.5: the argmax of a tie is class 0 (p1 > 0.5 predicts 1),
    and tied scores count half a pair in the AUC."""
    scores, labels = _random_case(seed, n=48, ties=True)
    scores = np.clip(scores, 0.25, 0.75)  # 0.25, 0.5, 0.75 only
    assert np.sum(scores == 0.5) > 3
    got = metrics.classification_metrics(_log_probs(scores), labels)
    pred = [1 if s > 0.5 else 0 for s in scores]
    assert got["accuracy"] == pytest.approx(sum(p == y for p, y in zip(pred, labels)) / len(labels))
    pos = [p for p, y in zip(pred, labels) if y == 1]
    neg = [p for p, y in zip(pred, labels) if y == 0]
    assert got["sensitivity"] == pytest.approx(sum(pos) / len(pos))
    assert got["specificity"] == pytest.approx(sum(1 - p for p in neg) / len(neg))
    assert got["roc_auc"] == pytest.approx(_auc_all_pairs(scores, labels), abs=1e-12)


@pytest.mark.parametrize("seed", range(3))
def test_classification_metrics_multiclass_brute_force(seed):
    rng = np.random.default_rng(seed)
    probs = rng.dirichlet([1, 1, 1, 1], size=30)
    labels = rng.integers(0, 3, 30)  # class 3 never occurs
    got = metrics.classification_metrics(np.log(probs), labels)
    assert set(got) == {"loss", "accuracy"}  # sensitivity, specificity and AUC are binary figures
    assert got["loss"] == pytest.approx(-sum(math.log(probs[i][labels[i]]) for i in range(30)) / 30, rel=1e-12)
    assert got["accuracy"] == pytest.approx(sum(int(np.argmax(probs[i])) == labels[i] for i in range(30)) / 30)
    pred = np.argmax(probs, axis=1)
    recall = metrics.per_class_recall(pred, labels, 4)
    for c in range(3):
        members = [i for i in range(30) if labels[i] == c]
        assert recall[c] == pytest.approx(sum(pred[i] == c for i in members) / len(members))
    assert math.isnan(recall[3])  # absent class: no recall, not 0
    np.testing.assert_allclose(metrics.class_prior(labels, 4), [np.mean(labels == c) for c in range(4)])
    with pytest.raises(ValueError, match="empty split"):
        metrics.classification_metrics(np.zeros((0, 2)), np.zeros(0, int))
