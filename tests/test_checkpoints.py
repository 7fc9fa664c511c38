"""Tests for lightflax.checkpoints: exact round trips, latest/best bookkeeping, damage, exports."""

import math
import os
import shutil

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest

from lightflax import checkpoints
from lightflax.errors import CheckpointError


class _Tiny(nn.Module):
    """Conv + BatchNorm + Dense: params, batch_stats, and several shapes."""

    width: int = 4
    classes: int = 3

    @nn.compact
    def __call__(self, x, train: bool):
        x = nn.Conv(self.width, (3, 3))(x)
        x = nn.BatchNorm(use_running_average=not train, momentum=0.9)(x)
        x = nn.relu(x).reshape(x.shape[0], -1)
        return nn.Dense(self.classes)(x)


_TX = optax.inject_hyperparams(optax.adam)(learning_rate=1e-2)


def _init(seed=0, width=4):
    model = _Tiny(width=width)
    v = model.init(jax.random.key(seed), jnp.zeros((1, 6, 6, 1)), train=False)
    return model, {"step": jnp.int32(0), "params": v["params"], "batch_stats": v["batch_stats"],
                   "opt_state": _TX.init(v["params"])}


def _make_step(model):
    @jax.jit
    def step(state, x, y):
        def loss_fn(params):
            logits, upd = model.apply({"params": params, "batch_stats": state["batch_stats"]}, x, train=True,
                                      mutable=["batch_stats"])
            return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean(), upd

        (_, upd), grads = jax.value_and_grad(loss_fn, has_aux=True)(state["params"])
        updates, opt_state = _TX.update(grads, state["opt_state"], state["params"])
        return {"step": state["step"] + 1, "params": optax.apply_updates(state["params"], updates),
                "batch_stats": upd["batch_stats"], "opt_state": opt_state}

    return step


def _batch(i):
    k = jax.random.fold_in(jax.random.key(42), i)
    return jax.random.normal(k, (5, 6, 6, 1)), jax.random.randint(k, (5,), 0, 3)


def _train(state, model, start, stop):
    step = _make_step(model)
    for i in range(start, stop):
        state = step(state, *_batch(i))
    return state


@pytest.fixture(scope="module")
def trained():
    model, state = _init()
    return model, _train(state, model, 0, 2)


def _assert_bitwise_equal(a, b):
    assert jax.tree_util.tree_structure(a) == jax.tree_util.tree_structure(b)
    for (path, x), y in zip(jax.tree_util.tree_leaves_with_path(a), jax.tree_util.tree_leaves(b)):
        x, y = np.asarray(x), np.asarray(y)
        assert x.dtype == y.dtype and x.shape == y.shape, path
        assert x.tobytes() == y.tobytes(), path


def _largest_file(folder):
    files = [os.path.join(d, f) for d, _, fs in os.walk(folder) for f in fs]
    return max(files, key=os.path.getsize)


def _array_file(step_dir):
    """The largest OCDBT data file (array bytes) of a saved state."""
    data = [os.path.join(d, f) for d, _, fs in os.walk(step_dir / "state") for f in fs
            if os.path.basename(d) == "d"]
    return max(data, key=os.path.getsize)


def test_round_trip_is_bitwise_exact(tmp_path, trained):
    _, state = trained
    ckpt = checkpoints.Checkpointer(str(tmp_path))
    assert ckpt.latest_step() is None and ckpt.restore_latest(state) is None and ckpt.restore_selected(state) is None
    meta = {"epoch": 2, "best_loss": [math.inf, 0.25], "history": [{"epoch": 1, "loss": 1.5}]}
    assert ckpt.save_latest(2, state, meta)
    _, target = _init(seed=1)
    restored, meta2 = checkpoints.Checkpointer(str(tmp_path)).restore_latest(target)
    _assert_bitwise_equal(state, restored)
    assert isinstance(restored["opt_state"], type(state["opt_state"]))  # namedtuples kept
    assert int(restored["opt_state"].inner_state[0].count) == 2
    assert meta2 == meta


def test_restore_into_shape_dtype_structs(tmp_path, trained):
    _, state = trained
    ckpt = checkpoints.Checkpointer(str(tmp_path))
    ckpt.save_selected(2, state, {})
    abstract = jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state)
    restored, _ = ckpt.restore_selected(abstract)
    _assert_bitwise_equal(state, restored)


def test_a_run_written_before_the_slot_rename_keeps_its_best_folder(tmp_path, trained):
    """Runs written before ``best`` was renamed ``selected`` hold checkpoints/best: it is read, and
    written on (so a --resume continues the same slot), and no empty ``selected`` is created."""
    model, s1 = trained
    s2 = _train(s1, model, 2, 3)
    with checkpoints.Checkpointer(str(tmp_path)) as ckpt:
        ckpt.save_selected(1, s1, {"which": 1})
    os.rename(tmp_path / "checkpoints" / "selected", tmp_path / "checkpoints" / "best")  # the old layout
    with checkpoints.Checkpointer(str(tmp_path)) as ckpt:
        restored, meta = ckpt.restore_selected(s2)
        _assert_bitwise_equal(s1, restored)
        assert meta == {"which": 1}
        assert ckpt.save_selected(2, s2, {"which": 2})
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["best", "latest"]
    assert sorted(os.listdir(tmp_path / "checkpoints" / "best")) == ["2"]


def test_resume_continues_exactly(tmp_path):
    model, state = _init()
    straight = _train(state, model, 0, 4)
    _, state = _init()
    half = _train(state, model, 0, 2)
    checkpoints.Checkpointer(str(tmp_path)).save_latest(2, half, {"next_batch": 2})
    _, fresh = _init(seed=3)
    restored, meta = checkpoints.Checkpointer(str(tmp_path)).restore_latest(fresh)
    resumed = _train(restored, model, meta["next_batch"], 4)
    _assert_bitwise_equal(straight, resumed)


def test_latest_and_selected_are_kept_apart(tmp_path, trained):
    model, s1 = trained
    s2 = _train(s1, model, 2, 3)
    s3 = _train(s2, model, 3, 4)
    ckpt = checkpoints.Checkpointer(str(tmp_path))
    assert ckpt.save_selected(1, s1, {"which": 1})
    for i, s in [(1, s1), (2, s2), (3, s3)]:
        assert ckpt.save_latest(i, s, {"which": i})
    assert ckpt.latest_step() == 3
    assert sorted(os.listdir(tmp_path / "checkpoints" / "latest")) == ["2", "3"]  # two kept
    best, meta = ckpt.restore_selected(s1)
    _assert_bitwise_equal(s1, best)
    assert meta == {"which": 1}
    assert ckpt.save_selected(3, s3, {"which": 3})
    assert sorted(os.listdir(tmp_path / "checkpoints" / "selected")) == ["3"]
    _assert_bitwise_equal(s3, ckpt.restore_selected(s1)[0])
    # A step that is not newer is not written and changes nothing.
    assert not ckpt.save_latest(3, s1, {"which": "again"})
    assert not ckpt.save_latest(2, s1, {})
    latest, meta = ckpt.restore_latest(s1)
    _assert_bitwise_equal(s3, latest)
    assert meta == {"which": 3}


def test_meta_must_be_json(tmp_path, trained):
    _, state = trained
    with pytest.raises(TypeError):
        checkpoints.Checkpointer(str(tmp_path)).save_latest(1, state, {"x": object()})


def _read(path):
    with open(path, "rb") as f:
        return f.read()


def test_typed_prng_key_in_state_is_refused(tmp_path):
    with pytest.raises(TypeError, match="key_data"):
        checkpoints.Checkpointer(str(tmp_path)).save_latest(1, {"rng": jax.random.key(0)}, {})


def _damage(path, how):
    data = _read(path)
    if how == "flip":
        b = bytearray(data)
        b[len(b) // 2] ^= 0xFF
        data = bytes(b)
    elif how == "truncate":
        data = data[: len(data) // 2]
    elif how == "delete":
        os.remove(path)
        return
    with open(path, "wb") as f:
        f.write(data)


@pytest.mark.parametrize("target, how", [
    ("state/array", "flip"),
    ("state/array", "truncate"),
    ("state/array", "delete"),
    ("state/_METADATA", "truncate"),
    ("meta/metadata", "truncate"),
    ("meta/metadata", "delete"),
])
def test_damaged_checkpoint_gives_one_line(tmp_path, trained, target, how):
    _, state = trained
    checkpoints.Checkpointer(str(tmp_path)).save_latest(5, state, {"epoch": 1})
    step_dir = tmp_path / "checkpoints" / "latest" / "5"
    path = _array_file(step_dir) if target == "state/array" else step_dir / target
    _damage(path, how)
    with pytest.raises(CheckpointError) as e:
        checkpoints.Checkpointer(str(tmp_path)).restore_latest(state)
    msg = str(e.value)
    assert "\n" not in msg and len(msg) < 600, msg
    assert str(step_dir) in msg and "damaged" in msg and "without --resume" in msg
    # launch.py prints one line; no chained traceback either.
    assert e.value.__cause__ is None and (e.value.__context__ is None or e.value.__suppress_context__)


def test_damaged_newest_points_to_older_step(tmp_path, trained):
    model, s1 = trained
    ckpt = checkpoints.Checkpointer(str(tmp_path))
    ckpt.save_latest(1, s1, {})
    ckpt.save_latest(2, _train(s1, model, 2, 3), {})
    newest = tmp_path / "checkpoints" / "latest" / "2"
    _damage(_array_file(newest), "flip")
    with pytest.raises(CheckpointError, match=f"delete {newest} to resume from step 1"):
        ckpt.restore_latest(s1)
    shutil.rmtree(newest)
    restored, _ = checkpoints.Checkpointer(str(tmp_path)).restore_latest(s1)
    _assert_bitwise_equal(s1, restored)


def test_structure_mismatch_names_the_leaf(tmp_path, trained):
    _, state = trained
    ckpt = checkpoints.Checkpointer(str(tmp_path))
    ckpt.save_latest(1, state, {})
    _, other = _init(width=8)
    with pytest.raises(CheckpointError) as e:
        ckpt.restore_latest(other)
    msg = str(e.value)
    assert "\n" not in msg and "does not fit" in msg
    assert "batch_stats.BatchNorm_0.mean expected shape (8,) float32, found (4,) float32" in msg
    # A target with a leaf the checkpoint lacks.
    extra = dict(state, ema=jnp.zeros(3))
    with pytest.raises(CheckpointError, match=r"ema \(shape \(3,\) float32\) is missing"):
        ckpt.restore_latest(extra)
    wrong_dtype = dict(state, step=jnp.float32(0))
    with pytest.raises(CheckpointError, match="step expected shape \\(\\) float32, found \\(\\) int32"):
        ckpt.restore_latest(wrong_dtype)


def test_leftover_tmp_directory_is_ignored_and_cleaned(tmp_path, trained):
    _, state = trained
    ckpt = checkpoints.Checkpointer(str(tmp_path))
    ckpt.save_latest(2, state, {"epoch": 2})
    latest = tmp_path / "checkpoints" / "latest"
    # What a crash mid-save leaves behind: a half-written step in a tmp folder.
    leftover = latest / "9.orbax-checkpoint-tmp-1234567"
    shutil.copytree(latest / "2", leftover)
    _damage(_array_file(leftover), "truncate")
    reopened = checkpoints.Checkpointer(str(tmp_path))
    assert not leftover.exists()
    assert reopened.latest_step() == 2
    restored, meta = reopened.restore_latest(state)
    _assert_bitwise_equal(state, restored)
    assert meta == {"epoch": 2}
    assert reopened.save_latest(9, state, {"epoch": 9})
    assert sorted(os.listdir(latest)) == ["2", "9"]


def test_crash_mid_save_keeps_previous_checkpoint(tmp_path, trained, monkeypatch):
    model, state = trained
    ckpt = checkpoints.Checkpointer(str(tmp_path))
    ckpt.save_latest(1, state, {"epoch": 1})

    def boom(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(ocp.JsonCheckpointHandler, "save", boom)
    monkeypatch.setattr(ocp.JsonCheckpointHandler, "async_save", boom)
    with pytest.raises(CheckpointError, match="previous one is kept") as e:
        ckpt.save_latest(2, _train(state, model, 2, 3), {"epoch": 2})
    assert "\n" not in str(e.value)
    monkeypatch.undo()
    reopened = checkpoints.Checkpointer(str(tmp_path))
    assert reopened.latest_step() == 1  # the half-written step 2 is not listed
    assert os.listdir(tmp_path / "checkpoints" / "latest") == ["1"]  # and its tmp folder is gone
    restored, meta = reopened.restore_latest(state)
    _assert_bitwise_equal(state, restored)
    assert meta == {"epoch": 1}
    # Saving step 2 again works and the leftover tmp folder is gone.
    assert reopened.save_latest(2, state, {"epoch": 2})
    assert sorted(os.listdir(tmp_path / "checkpoints" / "latest")) == ["1", "2"]


def test_orbax_stays_quiet(tmp_path, trained, caplog):
    from absl import logging as absl_logging

    _, state = trained
    old = absl_logging.get_verbosity()
    absl_logging.set_verbosity(absl_logging.INFO)
    try:
        with caplog.at_level("INFO"):
            ckpt = checkpoints.Checkpointer(str(tmp_path))
            ckpt.save_latest(1, state, {})
            ckpt.restore_latest(state)
        assert absl_logging.get_verbosity() == absl_logging.INFO  # the caller's level is restored
    finally:
        absl_logging.set_verbosity(old)
    assert [r.getMessage() for r in caplog.records if r.name == "absl"] == []


# -- exported variables ---------------------------------------------------------

def test_export_round_trip(tmp_path, trained):
    model, state = trained
    variables = {"params": state["params"], "batch_stats": state["batch_stats"]}
    path = str(tmp_path / "model.msgpack")
    size = checkpoints.export_variables(path, variables)
    assert size == os.path.getsize(path) > 0
    assert sorted(os.listdir(tmp_path)) == ["model.msgpack", "model.msgpack.sha256"]  # no tmp file left
    target = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 6, 6, 1)), train=False))
    loaded = checkpoints.load_exported(path, target)
    _assert_bitwise_equal(variables, loaded)


@pytest.mark.parametrize("how", ["truncate", "garbage", "missing"])
def test_damaged_export_names_the_file(tmp_path, trained, how):
    _, state = trained
    variables = {"params": state["params"], "batch_stats": state["batch_stats"]}
    path = str(tmp_path / "model.msgpack")
    checkpoints.export_variables(path, variables)
    if how == "truncate":
        _damage(path, "truncate")
    elif how == "garbage":
        with open(path, "wb") as f:
            f.write(b"\x93not a msgpack file\xc1\xc1")
    else:
        os.remove(path)
    with pytest.raises(CheckpointError) as e:
        checkpoints.load_exported(path, variables)
    assert path in str(e.value) and "\n" not in str(e.value)


def test_a_flipped_byte_in_an_export_is_caught_by_its_sha256(tmp_path, trained, capsys):
    _, state = trained
    variables = {"params": state["params"], "batch_stats": state["batch_stats"]}
    path = str(tmp_path / "model.msgpack")
    checkpoints.export_variables(path, variables)
    data = bytearray(_read(path))
    data[-3] ^= 0x01  # inside the last float: msgpack still decodes, the value changes
    with open(path, "wb") as f:
        f.write(bytes(data))
    with pytest.raises(CheckpointError, match="sha256") as e:
        checkpoints.load_exported(path, variables)
    assert path in str(e.value) and "\n" not in str(e.value)
    os.remove(path + ".sha256")  # an export without a sidecar (older runs): read with a warning
    checkpoints.load_exported(path, variables)
    assert "cannot be checked" in capsys.readouterr().err


def test_export_mismatch_names_the_leaf(tmp_path, trained):
    _, state = trained
    path = str(tmp_path / "model.msgpack")
    checkpoints.export_variables(path, {"params": state["params"], "batch_stats": state["batch_stats"]})
    _, other = _init(width=8)
    with pytest.raises(CheckpointError, match=r"params\.Conv_0\.kernel expected shape \(3, 3, 1, 8\) float32, "
                                              r"found \(3, 3, 1, 4\) float32"):
        checkpoints.load_exported(path, {"params": other["params"], "batch_stats": other["batch_stats"]})


def test_failed_export_keeps_the_old_file(tmp_path, trained, monkeypatch):
    _, state = trained
    path = str(tmp_path / "model.msgpack")
    checkpoints.export_variables(path, {"params": state["params"]})
    before = _read(path)

    def fail(src, dst):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", fail)
    with pytest.raises(CheckpointError, match="could not write"):
        checkpoints.export_variables(path, {"params": jax.tree_util.tree_map(jnp.zeros_like, state["params"])})
    assert _read(path) == before
    assert sorted(os.listdir(tmp_path)) == ["model.msgpack", "model.msgpack.sha256"]
