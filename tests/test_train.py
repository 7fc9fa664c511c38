"""The shared train step and loop: 1 vs 8 devices, shard_map vs pmap, resume, multi-seed."""

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from conftest import REPO, run_launch, run_python
from lightflax._testing import FAULT_KILL_ENV

# Runs a few steps of the real Trainer on tiny synthetic data, for each of a list
# of settings, and prints each one's losses and parameters as a JSON line. SGD (momentum 0.9): Adam's first updates are
# +-lr whatever the gradient's size, so float reassociation noise in a near-zero
# gradient flips whole updates and the comparison would test Adam, not the step.
STEPS_SCRIPT = textwrap.dedent(
    """
    import json, sys, jax, numpy as np, jax.numpy as jnp
    from lightflax import data, train, parallel
    from lightflax.config import RunConfig
    d = data.load("synthetic", synthetic_shape=(20, 20, 1), synthetic_sizes={{"train": 256, "val": 16, "test": 16}},
                  num_classes=2, seed=0)
    flat = lambda s: [np.asarray(l, np.float64).ravel().tolist()
                      for l in jax.tree_util.tree_leaves((s.params, s.batch_stats))]
    for mode, num_seeds, model, replica_mode, seed in {specs!r}:
        kwargs = {{"k": 2}} if "light" in model else {{}}
        cfg = RunConfig.flat(workdir="unused", model=model, model_kwargs=kwargs, batch_size=64, image_size=24,
                        channels=3, parallel=mode, num_seeds=num_seeds, l2=1e-4, optimizer="sgd",
                        replica_mode=replica_mode, learning_rate=0.01, seed=seed)
        tr = train.Trainer(cfg, d)
        state = tr.init_state()
        before = flat(state)
        keys = tr.data_keys()
        images, labels = tr.device_split("train")
        losses = []
        perm = tr.permutations(0)
        for _ in range(3):
            state, m = tr.train_step(state, images, labels, perm, keys, tr.dev_ids)
            losses.append(np.asarray(m["loss"]).tolist())
        print("RUN", json.dumps({{"losses": losses, "before": before, "after": flat(state),
                                 "devices": jax.device_count(), "step": np.asarray(state.step).tolist()}}), flush=True)
    """
)


def _steps_many(devices, specs):
    """Runs each (mode, num_seeds, model, replica_mode, seed) of ``specs`` in one process on ``devices``
    devices (each run builds its own Trainer from the same data; one import and one set of eager
    helper compilations instead of one per run). Returns {spec: run}."""
    proc = run_python(STEPS_SCRIPT.format(specs=[tuple(s) for s in specs]), devices=devices)
    lines = [line[4:] for line in proc.stdout.splitlines() if line.startswith("RUN ")]
    assert len(lines) == len(specs), proc.stdout[-3000:]
    return {tuple(s): json.loads(line) for s, line in zip(specs, lines)}


def _spec(mode="shard_map", num_seeds=1, model="xray_light", replica_mode="vmap", seed=0):
    return (mode, num_seeds, model, replica_mode, seed)


def _updates(run):
    """Per-leaf parameter (and BN statistic) change over the steps."""
    return [np.asarray(x1) - np.asarray(x0) for x0, x1 in zip(run["before"], run["after"])]


def _assert_same_run(a, b, b_replica=None, rtol=1e-5, update_tol=1e-3):
    losses_a, losses_b = np.asarray(a["losses"]), np.asarray(b["losses"])
    if b_replica is not None:  # a is a single-seed run: its replica axis has length 1
        losses_a, losses_b = losses_a[:, 0], losses_b[:, b_replica]
    np.testing.assert_allclose(losses_a, losses_b, rtol=rtol, atol=1e-6)
    ua, ub = _updates(a), _updates(b)
    assert len(ua) == len(ub)
    scale = max(np.max(np.abs(u)) for u in ua)
    for x, y in zip(ua, ub):
        if b_replica is not None:
            y = y.reshape(3, -1)[b_replica]
        # the same update, up to float noise (a wrong reduction is off by >10 %)
        np.testing.assert_allclose(x, y, rtol=0, atol=update_tol * scale)


# Every step run of the tests below, one process per device count (module fixtures: built once).
MODELS = ("xray_light", "cifar_conv2d", "cifar_separable")


@pytest.fixture(scope="module")
def on_one():
    return _steps_many(1, [_spec(model=m) for m in MODELS])


@pytest.fixture(scope="module")
def on_eight():
    return _steps_many(8, [_spec(model=m) for m in MODELS] + [_spec("pmap")])


@pytest.fixture(scope="module")
def on_two():
    """3 replicas on 2 devices, vmapped and looped, and the plain run of seed 2 there (shared by
    the multi-seed tests)."""
    return _steps_many(2, [_spec(num_seeds=3), _spec(num_seeds=3, replica_mode="loop"), _spec(seed=2)])


@pytest.fixture(scope="module")
def one_device(on_one):
    return on_one[_spec()]


@pytest.fixture(scope="module")
def three_vmapped(on_two):
    return on_two[_spec(num_seeds=3)]


# Tolerances: float32 reassociation (8 partial sums instead of 1) is ~1e-6 in
# the losses of 3 steps here and ~1e-4 of the largest update in the parameters;
# a wrong reduction (gradients averaged twice, BN statistics left per device)
# is off by >1e-2 from the second step on. Longer runs on random data diverge
# chaotically through BatchNorm, so the comparison is kept to 3 steps.


def test_eight_devices_equal_one_device_shard_map(one_device, on_eight):
    eight = on_eight[_spec()]
    assert one_device["devices"] == 1 and eight["devices"] == 8
    assert one_device["step"] == eight["step"] == [3]  # one replica: the replica axis has length 1
    _assert_same_run(one_device, eight)
    # the run actually trains: losses change
    assert len(set(np.round(np.asarray(one_device["losses"])[:, 0], 6))) > 1


def test_pmap_equals_shard_map_on_eight_devices(one_device, on_eight):
    pm = on_eight[_spec("pmap")]
    _assert_same_run(one_device, pm)


def test_conv2d_residual_model_eight_devices(on_one, on_eight):
    spec = _spec(model="cifar_conv2d")
    _assert_same_run(on_one[spec], on_eight[spec])


def test_separable_residual_model_eight_devices(on_one, on_eight):
    """SeparableConv2D's fused depthwise taps: 1 vs 8 devices agree to ~1e-6 of the largest
    update (the grouped lax.conv path, impl='conv', drifted to ~5e-4 on XLA:CPU)."""
    spec = _spec(model="cifar_separable")
    _assert_same_run(on_one[spec], on_eight[spec], update_tol=1e-4)


def test_multi_seed_replicas_differ_and_first_matches_plain_run(one_device, three_vmapped):
    three = three_vmapped
    losses = np.array(three["losses"])  # (steps, replicas)
    assert losses.shape == (3, 3)
    # N independently initialised replicas: different losses and initialisations
    assert not np.allclose(losses[:, 0], losses[:, 1]) and not np.allclose(losses[:, 1], losses[:, 2])
    inits = [np.asarray(leaf).reshape(3, -1) for leaf in three["before"]]
    assert max(np.max(np.abs(w[0] - w[1])) for w in inits) > 0.1
    assert max(np.max(np.abs(w[1] - w[2])) for w in inits) > 0.1
    # replica 0 (seed 0) is the plain run, also on a different device count
    for w, plain in zip(inits, one_device["before"]):
        np.testing.assert_array_equal(w[0], plain)
    # vmap turns the replicas' convolutions into grouped ones (another summation
    # order) on top of the 2-device split: looser float tolerance, still far
    # below what a wrong reduction or a mixed-up replica gives (>1e-1 here).
    _assert_same_run(one_device, three, b_replica=0, rtol=2e-3, update_tol=2e-2)


def test_multi_seed_loop_mode_is_the_plain_run_per_replica(one_device, on_one, on_two, three_vmapped):
    """--replica_mode=loop: the replicas run one after the other inside the same compiled
    step, with plain (ungrouped) convolutions, so replica r matches the plain run of
    --seed=r on the same devices at the tight tolerance of the device-count tests (replica 0
    also against one device), and all match the vmapped replicas at vmap's looser one. (Seed 2's
    plain run on ONE device differs from replica 2 on two by 2.2e-4 of the loss at step 2 with
    the native kernels on an AVX2-only host: a device-count effect on an ill-conditioned seed,
    not a replica effect; XLA's kernels stay within 1e-5 there.)"""
    mapped = on_two[_spec(num_seeds=3, replica_mode="loop")]
    losses = np.array(mapped["losses"])
    assert losses.shape == (3, 3) and not np.allclose(losses[:, 0], losses[:, 1])
    _assert_same_run(one_device, mapped, b_replica=0)
    _assert_same_run(on_two[_spec(seed=2)], mapped, b_replica=2)
    vmapped = three_vmapped
    for a, b in zip(vmapped["before"], mapped["before"]):
        np.testing.assert_array_equal(a, b)  # the same initialisations
    np.testing.assert_allclose(losses, np.array(vmapped["losses"]), rtol=2e-3, atol=1e-5)


def test_over_seeds_loop_equals_vmap():
    """The unrolled-loop form of the replica axis against vmap, with shared (None) inputs and
    an output that is the same for every replica (out_axes None)."""
    import jax
    import jax.numpy as jnp

    from lightflax import steps

    def fn(w, x, k, b):
        return jnp.tanh(x @ w + b) * k, x.sum()

    rng = np.random.default_rng(0)
    w = jnp.asarray(rng.normal(size=(4, 5, 3)), jnp.float32)
    x = jnp.asarray(rng.normal(size=(6, 5)), jnp.float32)
    k = jnp.asarray(rng.normal(size=(4,)), jnp.float32)
    args = (w, x, k, jnp.float32(0.5))
    in_axes, out_axes = (0, None, 0, None), (0, None)
    want = steps.over_seeds(fn, 4, in_axes, out_axes)(*args)
    got = jax.jit(steps.over_seeds(fn, 4, in_axes, out_axes, mode="loop"))(*args)
    assert got[0].shape == want[0].shape == (4, 6, 3) and got[1].shape == want[1].shape == ()
    np.testing.assert_allclose(got[0], want[0], rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(got[1], want[1], rtol=1e-6)
    # replica r of the loop form is fn on replica r's slice, exactly
    np.testing.assert_array_equal(got[0][2], fn(w[2], x, k[2], 0.5)[0])
    with pytest.raises(ValueError, match="replica mode must be one of vmap, loop"):
        steps.over_seeds(fn, 4, in_axes, mode="scan")


def test_single_seed_replica_axis_is_the_plain_step():
    """One seed carries a replica axis of length 1 (one convention throughout); the
    trainer's step on it equals the plain per-device step on the unstacked state, bitwise."""
    code = textwrap.dedent(
        """
        import jax, jax.numpy as jnp, numpy as np
        from lightflax import data, train, steps, parallel
        from lightflax.config import RunConfig
        d = data.load("synthetic", synthetic_shape=(16, 16, 1), synthetic_sizes={"train": 32, "val": 8, "test": 8},
                      num_classes=2, seed=0)
        cfg = RunConfig.flat(workdir="unused", model="xray_light", model_kwargs={"k": 1}, batch_size=8, image_size=16,
                        channels=3)
        tr = train.Trainer(cfg, d)
        fn = steps.make_train_step(tr.model, cfg, tr.local_batch)
        rep, sh = parallel.REPLICATED, parallel.SHARDED
        plain = parallel.distribute(fn, tr.mesh, (rep,) * 6 + (sh,), (rep, rep))
        keys = tr.data_keys()
        images, labels = tr.device_split("train")
        perm = tr.permutations(0)
        assert perm.shape == (1, 32) and keys.shape == (1,)
        first = lambda t: jax.tree_util.tree_map(lambda a: a[0], t)
        s1, m1 = plain(first(tr.init_state()), images, labels, perm[0], jnp.int32(0), keys[0], tr.dev_ids)
        s2, m2 = tr.train_step(tr.init_state(), images, labels, perm, keys, tr.dev_ids)
        assert np.asarray(m2["loss"]).shape == (1,)
        np.testing.assert_array_equal(np.asarray(m1["loss"]), np.asarray(m2["loss"])[0])
        for a, b in zip(jax.tree_util.tree_leaves(s1.params), jax.tree_util.tree_leaves(s2.params)):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b)[0])
        print("ok")
        """
    )
    assert run_python(code).stdout.strip().endswith("ok")


TINY = ["--dataset=synthetic", "--image_size=16", "--synthetic_size=32", "--batch_size=8"]
# The resume checks train xray_light K=2 seed 0, a network alive at initialisation: K=1 with seed 0
# is dead (docs/results.md, benchmarks/dead_init.py): no gradient reaches the layers below its dead
# ReLU, so a resume that restored them wrongly would go unnoticed. Each check also asserts it.
ALIVE = ["--experiment=xray_light", "--k=2"]


def assert_alive(workdir):
    """The run's model tells inputs apart (a dead network's probabilities are constant)."""
    from lightflax import predict

    spread = predict.prediction_spread(str(workdir))
    assert spread > 1e-6, f"the model of {workdir} is dead (probability spread {spread:.1e}): pick a live K/seed"


RESUMED = [*ALIVE, *TINY, "--epochs=3", "--steps_per_epoch=3"]


@pytest.fixture(scope="module")
def full_run(tmp_path_factory):
    """The uninterrupted run the resume checks compare with (a finished run folder; do not modify it)."""
    full = tmp_path_factory.mktemp("full") / "w"
    run_launch(RESUMED + [f"--workdir={full}"], check=0)
    assert_alive(full)
    return full


def test_resume_after_sigkill_matches_uninterrupted_run(tmp_path, full_run):
    args, full = RESUMED, full_run
    killed = tmp_path / "killed"
    proc = run_launch(args + [f"--workdir={killed}"], env={FAULT_KILL_ENV: "5"})
    assert proc.returncode == -9, proc.stderr[-2000:]  # SIGKILL mid epoch 2
    assert not (killed / "results.json").exists()
    # without --resume the existing run is protected
    proc = run_launch(args + [f"--workdir={killed}"], check=2)
    assert "already holds a run" in proc.stderr and "Traceback" not in proc.stderr
    # --resume with other settings is refused, naming each one (--epochs may change)
    proc = run_launch(args + [f"--workdir={killed}", "--resume", "--batch_size=4", "--learning_rate=0.01"], check=2)
    err = proc.stderr.strip().splitlines()
    assert len(err) == 1 and "--batch_size 8 -> 4" in err[0] and "--learning_rate 0.001 -> 0.01" in err[0], err
    # the killed run as the code before the checkpoint slot rename wrote it (checkpoints/best): it resumes exactly
    os.rename(killed / "checkpoints" / "selected", killed / "checkpoints" / "best")
    proc = run_launch(args + [f"--workdir={killed}", "--resume"], check=0)
    assert "resumed" in proc.stdout
    assert sorted(os.listdir(killed / "checkpoints")) == ["best", "latest"]
    a = json.loads((full / "results.json").read_text())
    b = json.loads((killed / "results.json").read_text())
    assert a["epochs_run"] == b["epochs_run"] == 3
    # the interrupted run's epoch times survive the resume: 3 epochs timed, total / epochs
    assert len(b["epoch_times_s"]) == 3 and all(t > 0 for t in b["epoch_times_s"])
    assert b["time_per_epoch_s"] == pytest.approx(b["total_time_s"] / 3)
    assert b["total_time_s"] >= sum(b["epoch_times_s"]) and b["time_per_epoch_median_s"] > 0
    assert a["select_metrics"] == b["select_metrics"]
    assert a["test_accuracy"] == b["test_accuracy"] and a["test_loss"] == b["test_loss"]
    fa = (full / "history.csv").read_text().splitlines()
    fb = (killed / "history.csv").read_text().splitlines()
    strip = lambda rows: [",".join(r.split(",")[:6]) for r in rows]  # drop the timing column
    assert strip(fa) == strip(fb)


def test_checkpoint_every_saves_less_often_and_resume_is_still_exact(tmp_path, full_run):
    """--checkpoint_every=2 over 3 epochs saves after epochs 2 and 3 only; a kill in epoch 3 resumes from
    epoch 2 and ends equal to an uninterrupted run with the default (every epoch)."""
    args, full, sparse = RESUMED, full_run, tmp_path / "sparse"
    proc = run_launch(args + [f"--workdir={sparse}", "--checkpoint_every=2"], env={FAULT_KILL_ENV: "8"})
    assert proc.returncode == -9, proc.stderr[-2000:]  # SIGKILL after step 8, in epoch 3
    assert sorted(os.listdir(sparse / "checkpoints" / "latest")) == ["6"]  # epoch 2's, not epoch 1's
    proc = run_launch(args + [f"--workdir={sparse}", "--checkpoint_every=2", "--resume"], check=0)
    assert "resumed" in proc.stdout and "at epoch 2" in proc.stdout
    a = json.loads((full / "results.json").read_text())
    b = json.loads((sparse / "results.json").read_text())
    assert a["select_metrics"] == b["select_metrics"] and a["test_loss"] == b["test_loss"]
    strip = lambda rows: [",".join(r.split(",")[:6]) for r in rows]  # drop the timing column
    assert strip((full / "history.csv").read_text().splitlines()) == strip(
        (sparse / "history.csv").read_text().splitlines())
    assert sorted(os.listdir(sparse / "checkpoints" / "latest")) == ["6", "9"]


def test_eval_image_size_evaluates_at_another_resolution():
    """FixRes: --eval_image_size feeds evaluation at its own resolution (models with global pooling)."""
    code = textwrap.dedent(
        """
        import jax, numpy as np
        from lightflax import data, train
        from lightflax.config import RunConfig
        d = data.load("synthetic", synthetic_shape=(20, 20, 1), synthetic_sizes={"train": 16, "val": 8, "test": 8},
                      num_classes=2, seed=0)
        def trainer(eval_size):
            cfg = RunConfig.flat(workdir="unused", model="xray_light", model_kwargs={"k": 1}, batch_size=8,
                            image_size=16, eval_image_size=eval_size, channels=3)
            return train.Trainer(cfg, d)
        base, fixres, same = trainer(None), trainer(32), trainer(16)
        state = base.init_state()
        val = base.device_split("val")
        a, b, c = base.evaluate(state, val)[0], fixres.evaluate(state, val)[0], same.evaluate(state, val)[0]
        assert a == c, (a, c)
        assert abs(a["loss"] - b["loss"]) > 1e-6, (a, b)
        print("ok")
        """
    )
    assert run_python(code).stdout.strip().endswith("ok")


def test_resume_notices_a_deleted_selected_checkpoint(tmp_path, full_run):
    shutil.copytree(full_run, tmp_path / "w", ignore=shutil.ignore_patterns(".lock"))  # a finished run
    args = [*ALIVE, *TINY, "--steps_per_epoch=3", f"--workdir={tmp_path / 'w'}"]
    # written as a run before the slot rename would have it (checkpoints/best): that folder is the one named
    os.rename(tmp_path / "w" / "checkpoints" / "selected", tmp_path / "w" / "checkpoints" / "best")
    for step in (tmp_path / "w" / "checkpoints" / "best").iterdir():
        shutil.rmtree(step)
    proc = run_launch(args + ["--epochs=4", "--resume"], check=2)
    assert "selected checkpoint" in proc.stderr and "checkpoints/best is empty" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_a_second_run_on_a_locked_workdir_stops(tmp_path):
    from lightflax import files

    wd = tmp_path / "w"
    wd.mkdir()
    with files.workdir_lock(str(wd)):  # as a first run would hold it
        proc = run_launch(["--experiment=xray_light", "--k=1", *TINY, "--epochs=1", f"--workdir={wd}"], check=2)
    assert f"is in use by another run (pid {os.getpid()})" in proc.stderr and "Traceback" not in proc.stderr
    assert not (wd / "checkpoints").exists()
    run_launch(["--experiment=xray_light", "--k=1", *TINY, "--epochs=1", "--steps_per_epoch=2",
                f"--workdir={wd}"], check=0)  # free again


def test_sigterm_ends_with_exit_130_and_the_run_resumes(tmp_path):
    wd = tmp_path / "w"
    args = [sys.executable, str(REPO / "launch.py"), *ALIVE, *TINY, "--epochs=50",
            f"--workdir={wd}"]
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1", JAX_PLATFORMS="cpu",
               PYTHONUNBUFFERED="1", JAX_DISABLE_MOST_OPTIMIZATIONS="1", PYTHONFAULTHANDLER="1")
    proc = subprocess.Popen(args, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    for line in proc.stdout:  # wait for the first finished (checkpointed) epoch
        if line.startswith("epoch 1/50"):
            break
    proc.send_signal(signal.SIGTERM)
    try:
        _, err = proc.communicate(timeout=300)
    except subprocess.TimeoutExpired:  # once in a CI run (2026-11-30), not reproduced: say where it hangs
        proc.send_signal(signal.SIGABRT)  # faulthandler prints every thread's stack
        _, err = proc.communicate(timeout=60)
        pytest.fail("no exit 300 s after SIGTERM; the child's threads:\n" + err[-8000:])
    assert proc.returncode == 130, err[-2000:]
    assert err.strip().splitlines()[-1] == "error: interrupted; resume with --resume" and "Traceback" not in err
    done = run_launch([*ALIVE, *TINY, "--epochs=2", f"--workdir={wd}", "--resume"], check=0)
    assert "resumed" in done.stdout
    assert_alive(wd)


@pytest.mark.parametrize("model, k, size", [("mnist_light", 2, 28), ("xray_light", 5, 32)])
def test_initial_replicas_equal_plain_init_of_their_seeds(model, k, size):
    """Trainer.init_state's replica r is steps.create_state with key seed + r (op by op), exactly:
    the trainer runs the whole init as one jitted program (one compilation, which a persistent cache
    serves to later runs), and the documented runs were initialised op by op. (A compiled init was
    1 ulp off on 2026-11-30; with the bucketed draws every model was bit-identical on 2026-12-03.)"""
    import jax

    from lightflax import data, steps, train
    from lightflax.config import RunConfig

    d = data.load("synthetic", synthetic_shape=(8, 8, 1), synthetic_sizes={"train": 8, "val": 4, "test": 4},
                  num_classes=2, seed=0)
    cfg = RunConfig.flat(workdir="unused", model=model, model_kwargs={"k": k}, batch_size=4, image_size=size,
                    channels=1, num_seeds=2, seed=7)
    tr = train.Trainer(cfg, d)
    state = tr.init_state()
    fast = jax.tree_util.tree_leaves((state.params, state.batch_stats))
    for r in range(2):
        ref = steps.create_state(tr.model, tr.tx, jax.random.key(7 + r), (1, size, size, 1))
        for a, b in zip(fast, jax.tree_util.tree_leaves((ref.params, ref.batch_stats))):
            a, b = np.asarray(a)[r], np.asarray(b)
            assert a.shape == b.shape
            np.testing.assert_array_equal(a, b)

