"""Checkpoints: the latest and the selected training state (Orbax), and exported weights.

Layout under a run's ``workdir``::

  checkpoints/latest/<step>/{state,meta}     the most recent states (2 kept)
  checkpoints/selected/<step>/{state,meta}   the state the run reports and exports (1 kept): the best
                                             validation loss with keep="best", the last epoch with
                                             keep="last" (runs written before this name: checkpoints/best)
  model.msgpack                            exported variables (export_variables)

``state`` is any pytree of arrays (params, batch_stats, optimiser state with
its counts, step), saved with ``StandardSave``; ``meta`` is a JSON dict
(epoch, history rows, best validation loss, RNG key data as lists of ints...)
saved with ``JsonSave`` together with a CRC-32 of every leaf's bytes.

Safety:

* Saving is explicit and synchronous: ``save_*`` returns only once the
  checkpoint is finalised on disk (``enable_async_checkpointing=False``), so a
  SIGKILL right after it returns cannot lose it. States here are at most a few
  hundred MB, written once per epoch, so async saving would buy little.
  Nothing is saved implicitly: a caller that sees a non-finite loss simply does
  not call ``save_*`` and the last good checkpoint stays.
* Orbax writes a step into ``<step>.orbax-checkpoint-tmp-*`` and renames it
  when complete, and deletes the older step only after that; so a crash
  mid-save leaves the previous checkpoint intact. Leftover tmp directories are
  never listed as steps, and are deleted when a Checkpointer opens the folder
  or a save fails.
  ``latest`` and ``selected`` are separate folders: saving one never touches the other.
* Restoring first compares the saved tree (leaf paths, shapes, dtypes) with
  the target, then checks the CRC-32: a damaged or mismatching checkpoint gives
  a one-line :class:`CheckpointError` (a flipped byte in an array file would
  otherwise restore silently as wrong numbers).
"""

from __future__ import annotations

import contextlib
import gc
import hashlib
import json
import logging
import os
import re
import shutil
import sys
import tempfile
import zlib
from typing import Any, Dict, Iterator, List, Optional, Tuple

import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging as absl_logging
from flax import serialization, traverse_util

from lightflax import files
from lightflax.errors import CheckpointError

_FORMAT = 1
_STATE, _META = "state", "meta"


# ----------------------------------------------------------------------------
# Small pure helpers.

def _key_str(entry: Any) -> str:
    for attr in ("key", "name", "idx"):
        if hasattr(entry, attr):
            return str(getattr(entry, attr))
    return str(entry)


def path_str(path: Tuple[Any, ...]) -> str:
    """A key path as ``a.b.0.c`` (dict keys, attribute names and indices alike)."""
    return ".".join(_key_str(e) for e in path)


def _is_array_like(x: Any) -> bool:
    return hasattr(x, "shape") and hasattr(x, "dtype")


def leaf_specs(tree: Any) -> List[Tuple[str, Tuple[int, ...], str]]:
    """``[(path, shape, dtype), ...]`` of a pytree's array leaves, in flattening order.

    Works for jax/numpy arrays, ``jax.ShapeDtypeStruct`` and Orbax array
    metadata; a namedtuple field and a dict key of the same name give the same path.
    """
    leaves, _ = jax.tree_util.tree_flatten_with_path(tree, is_leaf=_is_array_like)
    out = []
    for path, leaf in leaves:
        if _is_array_like(leaf):
            out.append((path_str(path), tuple(int(d) for d in leaf.shape), str(leaf.dtype)))
        else:  # Python scalars
            a = np.asarray(leaf)
            out.append((path_str(path), tuple(a.shape), str(a.dtype)))
    return out


def first_mismatch(expected: List[Tuple[str, Tuple[int, ...], str]],
                   found: List[Tuple[str, Tuple[int, ...], str]]) -> Optional[str]:
    """Describes the first difference between two :func:`leaf_specs` lists, or None."""
    found_by_path = {p: (s, d) for p, s, d in found}
    for path, shape, dtype in expected:
        if path not in found_by_path:
            return f"{path} (shape {shape} {dtype}) is missing from it"
        f_shape, f_dtype = found_by_path[path]
        if f_shape != shape or f_dtype != dtype:
            return f"{path} expected shape {shape} {dtype}, found {f_shape} {f_dtype}"
    expected_paths = {p for p, _, _ in expected}
    for path, shape, dtype in found:
        if path not in expected_paths:
            return f"it holds {path} (shape {shape} {dtype}) that the model does not have"
    return None


def tree_crc32(tree: Any) -> int:
    """CRC-32 over every leaf's shape, dtype and bytes, in flattening order (host copy)."""
    crc = 0
    for leaf in jax.tree_util.tree_leaves(tree):
        a = np.ascontiguousarray(np.asarray(leaf))
        crc = zlib.crc32(f"{a.shape}{a.dtype}".encode(), crc)
        crc = zlib.crc32(a.view(np.uint8).reshape(-1) if a.size else b"", crc)
    return crc


_TMP_DIR = re.compile(r"^\d+\.orbax-checkpoint-tmp")


def remove_tmp_dirs(directory: str) -> List[str]:
    """Deletes unfinished step folders (``<step>.orbax-checkpoint-tmp*``) left by a crash; returns them.

    Orbax writes each step under such a name and renames it when complete, so
    these never hold the only copy of anything. Only one process may write a
    run's checkpoints at a time.
    """
    if not os.path.isdir(directory):
        return []
    removed = [os.path.join(directory, n) for n in sorted(os.listdir(directory)) if _TMP_DIR.match(n)]
    for path in removed:
        shutil.rmtree(path)
    return removed


def _one_line(e: BaseException, limit: int = 160) -> str:
    text = " ".join(str(e).split()) or type(e).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _reason(e: BaseException) -> str:
    """One line saying why Orbax/TensorStore failed (the root cause when the top is generic)."""
    while "See full TensorStore details" in str(e) and (e.__cause__ or e.__context__) is not None:
        e = e.__cause__ or e.__context__
    if "See full TensorStore details" in str(e):
        return "an array file cannot be read"
    return _one_line(e)


def _write_reason(e: BaseException) -> str:
    """One line saying why a save failed; a full disk is named as such, whatever layer noticed it."""
    seen = e
    while seen is not None:
        if getattr(seen, "errno", None) == 28 or "No space left on device" in str(seen):
            return "No space left on device"
        seen = seen.__cause__ or seen.__context__
    return _one_line(e)


def _is_failed_read_leftover(unraisable: Any) -> bool:
    exc = unraisable.exc_value
    if isinstance(exc, RuntimeError) and str(exc) == "Event loop is closed":
        return True
    return getattr(unraisable.object, "__qualname__", "").endswith("_read_array_index_and_device_put")


class _UnraisableFilter:
    """sys.unraisablehook that drops the leftovers of a failed Orbax read, passes on the rest."""

    def __init__(self, previous: Any):
        self.previous = previous

    def __call__(self, unraisable: Any) -> None:
        if not _is_failed_read_leftover(unraisable):
            self.previous(unraisable)


def _silence_failed_read_leftovers() -> None:
    """Keeps a failed restore to our one line.

    When one array of a damaged checkpoint fails to read, Orbax abandons the
    other read coroutines, and TensorStore reads still in flight later call
    back into Orbax's closed event loop. Python would print each of these
    ("Exception ignored in: <coroutine ...>" / "RuntimeError: Event loop is
    closed") after our one-line error, at garbage collection or at exit. This
    installs (once) an unraisable hook that drops exactly those two kinds and
    collects the abandoned coroutines now.
    """
    if not isinstance(sys.unraisablehook, _UnraisableFilter):
        sys.unraisablehook = _UnraisableFilter(sys.unraisablehook)
    gc.collect()


class _DropAbandonedTasks(logging.Filter):
    """Drops asyncio's "Task/Future exception was never retrieved" reports (with their tracebacks)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "exception was never retrieved" not in str(record.msg).split("\n", 1)[0]


def _silence_failed_write_leftovers() -> None:
    """Keeps a failed save (disk full, permissions) to our one line.

    Orbax writes each array in its own asyncio task; when one write fails the
    others are abandoned, and asyncio logs each one's exception with a traceback
    when it is garbage collected ("Future exception was never retrieved"), dozens
    of them after our one-line error. This filters exactly that message from the
    asyncio logger (once) and collects the abandoned tasks now.
    """
    log = logging.getLogger("asyncio")
    if not any(isinstance(f, _DropAbandonedTasks) for f in log.filters):
        log.addFilter(_DropAbandonedTasks())
    _silence_failed_read_leftovers()


class _CapturedStderr:
    """Captures file descriptor 2 (also C++ threads' prints) while active; what was captured
    is passed on to stderr at the end unless :meth:`drop` was called (a failed save, whose
    one-line error replaces the noise). Re-entrant in sequence, not nested."""

    def __init__(self):
        self._file = tempfile.TemporaryFile()
        self._dropped = False

    def __enter__(self):
        sys.stderr.flush()
        self._saved_fd = os.dup(2)
        os.dup2(self._file.fileno(), 2)
        return self

    def __exit__(self, *exc):
        sys.stderr.flush()
        os.dup2(self._saved_fd, 2)
        os.close(self._saved_fd)
        if not self._dropped and exc[0] is None:
            self._replay()
        else:
            self._file.seek(0), self._file.truncate()
        return False

    def _replay(self):
        self._file.seek(0)
        text = self._file.read()
        self._file.seek(0), self._file.truncate()
        if text:
            sys.stderr.write(text.decode(errors="replace"))
            sys.stderr.flush()

    def drop(self):
        """From now on, what is captured is discarded."""
        self._dropped = True


@contextlib.contextmanager
def _quiet(level: int = absl_logging.WARNING) -> Iterator[None]:
    """Raises absl's verbosity to ``level`` while Orbax runs (it logs every save at INFO).

    Reading uses ERROR: Orbax's warnings about unreadable items are replaced
    by our one-line CheckpointError.
    """
    old = absl_logging.get_verbosity()
    if old > level:
        absl_logging.set_verbosity(level)
    try:
        yield
    finally:
        absl_logging.set_verbosity(old)


# ----------------------------------------------------------------------------
# Orbax-managed training checkpoints.

SELECTED, LEGACY_SELECTED = "selected", "best"  # the slot's folder; its name before the rename


def selected_dir(root: str) -> str:
    """The selected slot's folder under ``root`` (``workdir/checkpoints``): ``selected``, or ``best``
    for a run written before the rename (it keeps its folder, so --resume finds its state)."""
    legacy = os.path.join(root, LEGACY_SELECTED)
    if os.path.isdir(legacy) and not os.path.isdir(os.path.join(root, SELECTED)):
        return legacy
    return os.path.join(root, SELECTED)


class Checkpointer:
    """The latest and the selected training state of one run, under ``workdir/checkpoints``.

    Args:
      workdir: the run directory.
      keep_latest: how many latest steps to keep (2: if the newest is damaged,
        deleting it lets ``--resume`` continue from the one before).
    """

    def __init__(self, workdir: str, keep_latest: int = 2):
        self.root = os.path.abspath(os.path.join(workdir, "checkpoints"))
        self._managers = {
            "latest": self._open(os.path.join(self.root, "latest"), keep_latest),
            "selected": self._open(selected_dir(self.root), 1),
        }

    @staticmethod
    def _open(directory: str, max_to_keep: int) -> ocp.CheckpointManager:
        options = ocp.CheckpointManagerOptions(
            max_to_keep=max_to_keep,
            enable_async_checkpointing=False,
            cleanup_tmp_directories=False,  # done synchronously (and quietly) by remove_tmp_dirs
            create=True,
        )
        try:
            remove_tmp_dirs(directory)
            with _quiet():
                handlers = {_STATE: ocp.StandardCheckpointHandler(), _META: ocp.JsonCheckpointHandler()}
                manager = ocp.CheckpointManager(directory, options=options, item_handlers=handlers)
        except Exception as e:
            raise CheckpointError(
                f"cannot open checkpoint folder {directory} ({_one_line(e)}); fix its permissions or move it away"
            ) from None
        return manager

    # -- saving ---------------------------------------------------------------

    def _save(self, which: str, step: int, state: Any, meta: Dict[str, Any]) -> bool:
        manager = self._managers[which]
        for path, _, dtype in leaf_specs(state):
            if dtype.startswith("key<"):
                raise TypeError(f"state leaf {path} is a typed PRNG key, which Orbax stores as raw data: save "
                                f"jax.random.key_data(key) in the state instead")
        meta_blob = {"format": _FORMAT, "crc32": tree_crc32(state), "meta": meta}
        json.dumps(meta_blob)  # a TypeError here names the value that is not JSON
        existing = manager.latest_step()
        if existing is not None and step <= existing:
            # Orbax refuses (silently) to write a step that is not newer; a resumed run can
            # meet its own earlier save here, which holds the same state by construction.
            absl_logging.warning("%s checkpoint at step %d not written: step %d is already saved",
                                 which, step, existing)
            return False
        directory = os.path.join(manager.directory, str(step))
        noise = _CapturedStderr()
        try:
            # Orbax's writer threads log every failed write with a traceback (disk full: dozens),
            # and tensorstore's C++ threads print "Event loop is closed" tracebacks straight to
            # file descriptor 2; our CheckpointError below is the one line the user sees.
            with _quiet(absl_logging.FATAL), noise:
                saved = manager.save(step, args=ocp.args.Composite(
                    **{_STATE: ocp.args.StandardSave(state), _META: ocp.args.JsonSave(meta_blob)}))
                manager.wait_until_finished()
        except Exception as e:
            noise.drop()
            with noise:
                _silence_failed_write_leftovers()
            with contextlib.suppress(OSError):
                remove_tmp_dirs(str(manager.directory))
            kept = "the previous one is kept" if existing is not None else "there is no earlier one"
            raise CheckpointError(
                f"could not write the {which} checkpoint {directory} ({_write_reason(e)}); {kept}; "
                f"check free disk space and permissions"
            ) from None
        return bool(saved)

    def save_latest(self, step: int, state: Any, meta: Dict[str, Any]) -> bool:
        """Saves ``state`` and JSON ``meta`` as the latest checkpoint at ``step``.

        Returns False (and writes nothing) when a checkpoint at ``step`` or a
        later step already exists. Raises CheckpointError if writing fails; the
        previous checkpoint is then untouched.
        """
        return self._save("latest", step, state, meta)

    def save_selected(self, step: int, state: Any, meta: Dict[str, Any]) -> bool:
        """Saves ``state`` as the selected checkpoint (replacing the previous one). See save_latest."""
        return self._save("selected", step, state, meta)

    # -- reading ----------------------------------------------------------------

    def latest_step(self) -> Optional[int]:
        """Step of the newest latest checkpoint, or None when there is none."""
        return self._managers["latest"].latest_step()

    def latest_meta(self) -> Optional[Dict[str, Any]]:
        """The JSON meta of the newest latest checkpoint without its arrays (None when there is
        none or it cannot be read: :meth:`restore_latest` then names the problem)."""
        manager = self._managers["latest"]
        step = manager.latest_step()
        if step is None:
            return None
        try:
            with _quiet(absl_logging.ERROR):
                blob = manager.restore(step, args=ocp.args.Composite(**{_META: ocp.args.JsonRestore()}))[_META]
        except Exception:  # damaged: the full restore reports it
            return None
        return blob.get("meta") if isinstance(blob, dict) else None

    def _restore(self, which: str, target: Any) -> Optional[Tuple[Any, Dict[str, Any]]]:
        manager = self._managers[which]
        steps = sorted(manager.all_steps())
        if not steps:
            return None
        step = steps[-1]
        directory = os.path.join(str(manager.directory), str(step))
        fix = (f"delete {directory} to resume from step {steps[-2]}" if len(steps) > 1
               else f"delete {directory} or start again without --resume")

        def damaged(reason: str) -> CheckpointError:
            return CheckpointError(f"checkpoint {directory} is damaged ({reason}); {fix}")

        try:
            with _quiet(absl_logging.ERROR):
                saved = manager.item_metadata(step)[_STATE]
        except Exception as e:
            raise damaged(_one_line(e)) from None
        if saved is None:
            raise damaged("its state/_METADATA is missing or unreadable")
        tree = getattr(saved, "tree", saved)
        mismatch = first_mismatch(leaf_specs(target), leaf_specs(tree))
        if mismatch is not None:
            raise CheckpointError(
                f"checkpoint {directory} does not fit this model: {mismatch}; it was written by a different "
                f"--model/settings: use another --workdir or start again without --resume"
            )
        failure = None
        with _quiet(absl_logging.ERROR):
            try:
                restored = manager.restore(step, args=ocp.args.Composite(
                    **{_STATE: ocp.args.StandardRestore(target), _META: ocp.args.JsonRestore()}))
                state, blob = restored[_STATE], restored[_META]
            except Exception as e:
                failure = _reason(e)
        if failure is not None:
            _silence_failed_read_leftovers()
            raise damaged(failure)
        if not isinstance(blob, dict) or blob.get("format") != _FORMAT or "meta" not in blob:
            raise damaged("its meta item is not a lightflax checkpoint record")
        if tree_crc32(state) != blob.get("crc32"):
            raise damaged("array data fail the CRC-32 check")
        return state, blob["meta"]

    def restore_latest(self, target: Any) -> Optional[Tuple[Any, Dict[str, Any]]]:
        """Restores the newest latest checkpoint into the structure/shardings of ``target``.

        ``target`` is a pytree of arrays or ``jax.ShapeDtypeStruct`` like the
        saved state. Returns ``(state, meta)``, or None when there is no
        checkpoint. Raises CheckpointError (one line) when the checkpoint is
        damaged or does not fit ``target``. Nothing is saved or deleted.
        """
        return self._restore("latest", target)

    def restore_selected(self, target: Any) -> Optional[Tuple[Any, Dict[str, Any]]]:
        """Restores the selected checkpoint; see restore_latest."""
        return self._restore("selected", target)

    def close(self) -> None:
        for manager in self._managers.values():
            manager.close()

    def __enter__(self) -> "Checkpointer":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


# ----------------------------------------------------------------------------
# Exported model variables: one msgpack file.

def export_variables(path: str, variables: Any) -> int:
    """Writes ``variables`` (e.g. ``{'params', 'batch_stats'}``) to ``path`` as msgpack, atomically.

    Written with ``files.atomic_write``: an interrupted export leaves the old file intact.
    Its sha256 goes to ``path + '.sha256'`` (``sha256sum -c`` format), which
    :func:`load_exported` verifies. Returns the file size in bytes (the model's size on disk).
    """
    data = serialization.to_bytes(jax.device_get(variables))
    line = f"{hashlib.sha256(data).hexdigest()}  {os.path.basename(path)}\n"
    try:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        files.atomic_write(path, lambda f: f.write(data))
        files.atomic_write(digest_path(path), lambda f: f.write(line), mode="w")
    except OSError as e:
        raise CheckpointError(f"could not write {path} ({e.strerror}); check free disk space and permissions") \
            from None
    return len(data)


def digest_path(path: str) -> str:
    """The sha256 sidecar of an exported model file."""
    return path + ".sha256"


def _verify_digest(path: str, data: bytes) -> None:
    """Compares ``data`` (the bytes of ``path``) with the sha256 written beside it at export.

    A file exported before the sidecar existed is read with a one-line warning."""
    sidecar = digest_path(path)
    if not os.path.exists(sidecar):
        print(f"WARNING: {sidecar} not found; {path} cannot be checked for damage (export it again by "
              f"re-running the training to get one)", file=sys.stderr, flush=True)
        return
    try:
        with open(sidecar) as f:
            want = f.read().split()[0].lower()
    except (OSError, UnicodeDecodeError, IndexError):
        want = ""
    if len(want) != 64:
        raise CheckpointError(f"{sidecar} is damaged (no sha256 in it); export the model again by re-running "
                              f"the training")
    got = hashlib.sha256(data).hexdigest()
    if got != want:
        raise CheckpointError(f"{path} is damaged: its sha256 {got[:12]}... differs from the {want[:12]}... "
                              f"recorded at export in {os.path.basename(sidecar)}; restore the file or re-run "
                              f"the training")


def load_exported(path: str, target: Any) -> Any:
    """Reads a file written by :func:`export_variables` into the structure of ``target``.

    ``target`` is a pytree of arrays or ``jax.ShapeDtypeStruct`` (e.g. from
    ``jax.eval_shape(model.init, ...)``). Returns the variables as jax arrays.
    Raises CheckpointError naming the file when it is missing, damaged,
    truncated, or holds other shapes than ``target``.
    """
    if not os.path.isfile(path):
        raise CheckpointError(f"{path} does not exist; train the model first or check --workdir")
    with open(path, "rb") as f:
        data = f.read()
    _verify_digest(path, data)
    try:
        state = serialization.msgpack_restore(data)
    except Exception as e:
        raise CheckpointError(f"{path} is damaged ({_one_line(e)}); export it again by re-running the training") \
            from None
    if not isinstance(state, dict):
        raise CheckpointError(f"{path} is damaged (it holds a {type(state).__name__}, not variables); "
                              f"export it again by re-running the training")
    target_dict = serialization.to_state_dict(target)
    expected = [(".".join(k), tuple(int(d) for d in v.shape), str(np.dtype(v.dtype)))
                for k, v in traverse_util.flatten_dict(target_dict).items()]
    found = []
    for k, v in traverse_util.flatten_dict(state).items():
        a = np.asarray(v)
        found.append((".".join(str(p) for p in k), tuple(a.shape), str(a.dtype)))
    mismatch = first_mismatch(expected, found)
    if mismatch is not None:
        raise CheckpointError(f"{path} does not fit this model: {mismatch}; it was exported from a different "
                              f"model or settings")
    restored = serialization.from_state_dict(target, state)
    return jax.tree_util.tree_map(jax.numpy.asarray, restored)
