"""--weight_averaging (lightflax.averaging and the loop's use of it): EMA and SWA over epochs equal a
float64 NumPy reference of the averaging; the loop evaluates and selects the average; bad settings
are one-line errors."""

import json
import types

import jax.numpy as jnp
import numpy as np
import optax
import pytest

from conftest import run_launch


def _trees(epochs, seed=0):
    rng = np.random.default_rng(seed)
    return [{"params": {"w": rng.normal(size=(3, 4, 2)), "b": rng.normal(size=(3, 2))},
             "batch_stats": {"mean": rng.normal(size=(3, 2))}} for _ in range(epochs)]


def _reference(trees, mode, window):
    """After each epoch, in float64: ema a_0 = x_0, a_t = (1 - 1/N) a_{t-1} + x_t / N; swa = the plain
    mean of the epochs of the last N so far (the raw weights before the window)."""
    epochs, out, avg = len(trees), [], None
    leaves = [np.concatenate([np.ravel(v) for v in (t["params"]["w"], t["params"]["b"], t["batch_stats"]["mean"])])
              for t in trees]
    for e, x in enumerate(leaves):
        if mode == "ema":
            avg = x if e == 0 else (1 - 1 / window) * avg + x / window
        else:
            start = max(0, epochs - window)
            avg = x if e < start else np.mean(leaves[start:e + 1], axis=0)
        out.append(avg)
    return out


@pytest.mark.parametrize("mode, window, epochs", [("ema", 3, 7), ("ema", 1, 4), ("swa", 3, 7), ("swa", 5, 5),
                                                   ("swa", 9, 4)])
def test_update_equals_the_numpy_averaging(mode, window, epochs):
    from lightflax import averaging

    trees = _trees(epochs)
    want = _reference(trees, mode, window)
    avg = None
    for e, t in enumerate(trees):
        avg = averaging.update(avg, {k: {n: jnp.asarray(v, jnp.float32) for n, v in d.items()} for k, d in t.items()},
                               mode, e, epochs, window)
        got = np.concatenate([np.ravel(avg["params"]["w"]), np.ravel(avg["params"]["b"]),
                              np.ravel(avg["batch_stats"]["mean"])])
        np.testing.assert_allclose(got, want[e], rtol=1e-5, atol=1e-6, err_msg=f"epoch {e}")


def test_the_loop_evaluates_the_average_and_none_is_the_state():
    from lightflax import steps, train
    from lightflax.config import RunConfig

    trees = _trees(4, seed=1)
    want = _reference(trees, "swa", 2)
    state = steps.TrainState.create(apply_fn=None, params=trees[0]["params"], tx=optax.sgd(0.1),
                                    batch_stats=trees[0]["batch_stats"])
    cfg = RunConfig.flat(workdir="w", model="xray_light", epochs=4, weight_averaging="swa", averaging_epochs=2)
    loop = types.SimpleNamespace(cfg=cfg, state=state, average=None)
    for e, t in enumerate(trees):
        loop.state = state.replace(params=t["params"], batch_stats=t["batch_stats"])
        ev = train._averaged(loop, e)
        got = np.concatenate([np.ravel(ev.params["w"]), np.ravel(ev.params["b"]), np.ravel(ev.batch_stats["mean"])])
        np.testing.assert_allclose(got, want[e], rtol=1e-6)
        assert ev.opt_state is loop.state.opt_state  # training continues from the raw weights
    loop = types.SimpleNamespace(cfg=cfg.replace(weight_averaging="none"), state=state, average=None)
    assert train._averaged(loop, 0) is state


def test_bad_settings_are_one_line_errors():
    from lightflax.config import RunConfig
    from lightflax.errors import UserError

    with pytest.raises(UserError, match="--weight_averaging must be one of"):
        RunConfig.flat(workdir="w", model="xray_light", weight_averaging="polyak")
    with pytest.raises(UserError, match="--averaging_epochs must be an integer >= 1"):
        RunConfig.flat(workdir="w", model="xray_light", averaging_epochs=0)
    with pytest.raises(UserError, match="cannot --resume"):
        RunConfig.flat(workdir="w", model="xray_light", weight_averaging="ema", resume=True)


def test_a_run_with_averaging_and_acquisition_augment_end_to_end(tmp_path):
    wd = tmp_path / "run"
    run_launch(["--experiment=xray_light", "--k=2", "--image_size=28", "--weight_averaging=swa", "--averaging_epochs=2",
                "--augment=acquisition", "--dataset=synthetic", "--epochs=3", "--steps_per_epoch=1", "--batch_size=16",
                "--synthetic_size=32", "--progress=quiet", f"--workdir={wd}"], check=0)
    c = json.loads((wd / "results.json").read_text())["config"]
    assert (c["weight_averaging"], c["averaging_epochs"], c["augment"]) == ("swa", 2, "acquisition")
