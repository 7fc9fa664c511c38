"""benchmarks/proxy_eval.py's parts: the far-from-training subset against a brute-force loop, the
unseen acquisition changes (uint8, deterministic, what they claim), the test-balance accuracy."""

import importlib.util
import sys

import numpy as np

from conftest import REPO

sys.path.insert(0, str(REPO / "benchmarks"))
_spec = importlib.util.spec_from_file_location("proxy_eval", REPO / "benchmarks" / "proxy_eval.py")
proxy_eval = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(proxy_eval)


def test_far_subset_is_the_brute_force_farthest_quarter():
    rng = np.random.default_rng(0)
    train = rng.integers(0, 256, (40, 8, 8, 1), dtype=np.uint8)
    val = rng.integers(0, 256, (12, 8, 8, 1), dtype=np.uint8)
    got = proxy_eval.far_subset(train, val, frac=0.25, k=3)

    def small(a):
        return a[..., 0].astype(np.float64).reshape(len(a), 4, 2, 4, 2).mean(axis=(2, 4)).reshape(len(a), -1) / 255

    dist = [np.mean(sorted(np.linalg.norm(small(train) - v, axis=1))[:3]) for v in small(val)]
    assert list(got) == sorted(np.argsort(dist)[::-1][:3])


def test_unseen_changes():
    rng = np.random.default_rng(1)
    x = rng.integers(40, 200, (3, 28, 28, 1), dtype=np.uint8)
    for c in proxy_eval.UNSEEN:
        a, b = proxy_eval.unseen(x, c), proxy_eval.unseen(x, c)
        assert a.dtype == np.uint8 and a.shape == x.shape and np.array_equal(a, b), c
        assert not np.array_equal(a, x), c
    eq = proxy_eval.unseen(x, "equalize")
    assert eq.min() == 0 and eq.max() == 255  # the full range, whatever the input's
    ramp = proxy_eval.unseen(x, "ramp").astype(float)
    assert ramp[:, :, 0].mean() < x[:, :, 0].mean() and ramp[:, :, -1].mean() > x[:, :, -1].mean()
    assert np.array_equal(proxy_eval.unseen(x, "clean"), x)


def test_test_balance_accuracy_is_the_weighted_recalls():
    labels = np.array([0, 0, 0, 0, 1, 1, 1, 1, 1, 1])
    pred = np.array([0, 0, 0, 1, 1, 1, 1, 1, 0, 0])
    f = proxy_eval.figures(pred, pred.astype(float), labels)
    assert np.isclose(f["tb_acc"], 234 / 624 * 3 / 4 + 390 / 624 * 4 / 6)
    assert np.isclose(f["balanced_accuracy"], (3 / 4 + 4 / 6) / 2) and np.isclose(f["accuracy"], 0.7)
