"""The shared train step and loop: 1 vs 8 devices, shard_map vs pmap, resume, multi-seed."""

import json
import textwrap

import numpy as np
import pytest

from conftest import run_launch, run_python

# Runs a few steps of the real Trainer on tiny synthetic data and prints losses
# and a parameter checksum vector as JSON.
STEPS_SCRIPT = textwrap.dedent(
    """
    import json, sys, jax, numpy as np, jax.numpy as jnp
    from lightflax import data, train, parallel
    mode, num_seeds, model = {mode!r}, {num_seeds}, {model!r}
    kwargs = {{"k": 2}} if model != "xray_conv2d" else {{}}
    d = data.load("synthetic", synthetic_shape=(20, 20, 1), synthetic_sizes={{"train": 64, "val": 16, "test": 16}},
                  num_classes=2, seed=0)
    cfg = train.RunConfig(workdir="unused", model=model, model_kwargs=kwargs, batch_size=16, image_size=24,
                          channels=3, parallel=mode, num_seeds=num_seeds, l2=1e-4)
    tr = train.Trainer(cfg, d)
    state = tr.init_state()
    keys = tr.data_keys()
    images, labels = tr.device_split("train")
    losses = []
    for epoch in range(2):
        perm = tr.permutations(keys, jnp.int32(epoch))
        for _ in range(tr.steps_per_epoch):
            state, m = tr.train_step(state, images, labels, perm, keys)
            losses.append(np.asarray(m["loss"]).tolist())
    leaves = jax.tree_util.tree_leaves((state.params, state.batch_stats))
    print(json.dumps({{"losses": losses, "params": [np.asarray(l, np.float64).ravel().tolist() for l in leaves],
                      "devices": jax.device_count(), "step": np.asarray(state.step).tolist()}}))
    """
)


def _steps(mode, devices, num_seeds=1, model="xray_light"):
    proc = run_python(STEPS_SCRIPT.format(mode=mode, num_seeds=num_seeds, model=model), devices=devices)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _assert_same_run(a, b, rtol=2e-4, atol=1e-6):
    np.testing.assert_allclose(a["losses"], b["losses"], rtol=rtol, atol=atol)
    assert len(a["params"]) == len(b["params"])
    for x, y in zip(a["params"], b["params"]):
        np.testing.assert_allclose(x, y, rtol=rtol, atol=atol)


@pytest.fixture(scope="module")
def one_device():
    return _steps("shard_map", 1)


def test_eight_devices_equal_one_device_shard_map(one_device):
    eight = _steps("shard_map", 8)
    assert one_device["devices"] == 1 and eight["devices"] == 8
    assert one_device["step"] == eight["step"] == 8
    _assert_same_run(one_device, eight)
    # the run actually trains: losses change
    assert len(set(np.round(one_device["losses"], 6))) > 1


def test_pmap_equals_shard_map_on_eight_devices(one_device):
    pm = _steps("pmap", 8)
    _assert_same_run(one_device, pm)


def test_conv2d_model_eight_devices():
    _assert_same_run(_steps("shard_map", 1, model="xray_conv2d"), _steps("shard_map", 8, model="xray_conv2d"))


def test_multi_seed_replicas_differ_and_first_matches_plain_run(one_device):
    three = _steps("shard_map", 2, num_seeds=3)
    losses = np.array(three["losses"])  # (steps, replicas)
    assert losses.shape == (8, 3)
    # N independently initialised replicas: different losses
    assert not np.allclose(losses[:, 0], losses[:, 1]) and not np.allclose(losses[:, 1], losses[:, 2])
    # replica 0 (seed 0) is the plain run, also on a different device count
    np.testing.assert_allclose(losses[:, 0], one_device["losses"], rtol=2e-4, atol=1e-6)
    for stacked, plain in zip(three["params"], one_device["params"]):
        stacked = np.asarray(stacked).reshape(3, -1)
        np.testing.assert_allclose(stacked[0], plain, rtol=2e-4, atol=1e-6)
        assert stacked.shape[1] == len(plain)


def test_single_seed_vmapped_equals_plain():
    """N=1 through vmap (the multi-seed path) equals the plain step."""
    code = textwrap.dedent(
        """
        import jax, jax.numpy as jnp, numpy as np
        from lightflax import data, train, steps, parallel
        d = data.load("synthetic", synthetic_shape=(16, 16, 1), synthetic_sizes={"train": 32, "val": 8, "test": 8},
                      num_classes=2, seed=0)
        cfg = train.RunConfig(workdir="unused", model="xray_light", model_kwargs={"k": 1}, batch_size=8,
                              image_size=16, channels=3)
        tr = train.Trainer(cfg, d)
        fn = steps.make_train_step(tr.model, tr.step_cfg)
        vfn = jax.vmap(fn, in_axes=(0, None, None, 0, None, 0, None))
        rep, sh = parallel.REPLICATED, parallel.SHARDED
        plain = parallel.distribute(fn, tr.mesh, (rep,) * 6 + (sh,), (rep, rep))
        vm = parallel.distribute(vfn, tr.mesh, (rep,) * 6 + (sh,), (rep, rep))
        state = tr.init_state(); keys = tr.data_keys()
        images, labels = tr.device_split("train")
        perm = tr.permutations(keys, jnp.int32(0))
        s1, m1 = plain(state, images, labels, perm, jnp.int32(0), keys, tr.dev_ids)
        add = lambda t: jax.tree_util.tree_map(lambda a: a[None], t)
        s2, m2 = vm(add(tr.init_state()), images, labels, perm[None], jnp.int32(0), keys[None], tr.dev_ids)
        np.testing.assert_allclose(np.asarray(m1["loss"]), np.asarray(m2["loss"])[0], rtol=1e-6)
        for a, b in zip(jax.tree_util.tree_leaves(s1.params), jax.tree_util.tree_leaves(s2.params)):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b)[0], rtol=1e-5, atol=1e-7)
        print("ok")
        """
    )
    assert run_python(code).stdout.strip().endswith("ok")


TINY = ["--dataset=synthetic", "--image_size=16", "--synthetic_size=32", "--batch_size=8"]


def test_resume_after_sigkill_matches_uninterrupted_run(tmp_path):
    args = ["--experiment=xray_light", "--k=1", *TINY, "--epochs=3", "--steps_per_epoch=3"]
    full = tmp_path / "full"
    run_launch(args + [f"--workdir={full}"], check=0)
    killed = tmp_path / "killed"
    proc = run_launch(args + [f"--workdir={killed}"], env={"LIGHTFLAX_FAULT_KILL_AFTER_STEP": "5"})
    assert proc.returncode == -9, proc.stderr[-2000:]  # SIGKILL mid epoch 2
    assert not (killed / "results.json").exists()
    # without --resume the existing run is protected
    proc = run_launch(args + [f"--workdir={killed}"], check=2)
    assert "already holds a run" in proc.stderr and "Traceback" not in proc.stderr
    proc = run_launch(args + [f"--workdir={killed}", "--resume"], check=0)
    assert "resumed" in proc.stdout
    a = json.loads((full / "results.json").read_text())
    b = json.loads((killed / "results.json").read_text())
    assert a["epochs_run"] == b["epochs_run"] == 3
    assert a["select_metrics"] == b["select_metrics"]
    assert a["test_accuracy"] == b["test_accuracy"] and a["test_loss"] == b["test_loss"]
    fa = (full / "history.csv").read_text().splitlines()
    fb = (killed / "history.csv").read_text().splitlines()
    strip = lambda rows: [",".join(r.split(",")[:6]) for r in rows]  # drop the timing column
    assert strip(fa) == strip(fb)
