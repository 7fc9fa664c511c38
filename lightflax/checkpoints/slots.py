"""The Checkpointer: a run's latest and selected training states, written and read with Orbax.

``latest`` keeps the newest steps (2), ``selected`` the state the run reports and exports (1);
each step holds ``state`` (StandardSave) and ``meta`` (JsonSave, with a CRC-32 of the state).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import threading
from typing import Any, Dict, List, Optional, Tuple

import orbax.checkpoint as ocp
from absl import logging as absl_logging

from lightflax.checkpoints.integrity import first_mismatch, leaf_specs, tree_crc32
from lightflax.checkpoints.orbax_quiet import (CapturedStderr, one_line, quiet, read_reason,
                                               join_threads, silence_failed_read_leftovers,
                                               silence_failed_write_leftovers, write_reason)
from lightflax import interrupts
from lightflax.errors import CheckpointError

_FORMAT = 1
_STATE, _META = "state", "meta"
# The longest a failed save waits for threads that Orbax started during it to end (on a full disk
# they had ended by the time they were looked for, in every run checked on 2026-12-03).
_SETTLE_SECONDS = 5.0


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
            with quiet():
                handlers = {_STATE: ocp.StandardCheckpointHandler(), _META: ocp.JsonCheckpointHandler()}
                manager = ocp.CheckpointManager(directory, options=options, item_handlers=handlers)
        except Exception as e:
            raise CheckpointError(
                f"cannot open checkpoint folder {directory} ({one_line(e)}); fix its permissions or move it away"
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
        noise = CapturedStderr()
        reason: Optional[str] = None
        before = set(threading.enumerate())
        # Orbax's writer threads log every failed write with a traceback (disk full: dozens), and
        # tensorstore's C++ threads print "Event loop is closed" tracebacks straight to file
        # descriptor 2; our CheckpointError below is the one line the user sees. A failed save is
        # settled inside the same capture and the same raised log level: Orbax's threads, finishing
        # the abandoned writes, are waited for, and the exception (whose traceback holds the abandoned
        # coroutines) is dropped before they are collected, so none of their reports comes later.
        with interrupts.deferred(), quiet(absl_logging.FATAL), noise:
            try:
                saved = manager.save(step, args=ocp.args.Composite(
                    **{_STATE: ocp.args.StandardSave(state), _META: ocp.args.JsonSave(meta_blob)}))
                manager.wait_until_finished()
            except Exception as e:
                reason = write_reason(e)
            if reason is not None:
                noise.drop()
                join_threads(set(threading.enumerate()) - before, _SETTLE_SECONDS)
                silence_failed_write_leftovers()
        if reason is not None:
            with contextlib.suppress(OSError):
                remove_tmp_dirs(str(manager.directory))
            kept = "the previous one is kept" if existing is not None else "there is no earlier one"
            raise CheckpointError(
                f"could not write the {which} checkpoint {directory} ({reason}); {kept}; "
                f"check free disk space and permissions"
            )
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
            with quiet(absl_logging.ERROR):
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
            with quiet(absl_logging.ERROR):
                saved = manager.item_metadata(step)[_STATE]
        except Exception as e:
            raise damaged(one_line(e)) from None
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
        with quiet(absl_logging.ERROR):
            try:
                restored = manager.restore(step, args=ocp.args.Composite(
                    **{_STATE: ocp.args.StandardRestore(target), _META: ocp.args.JsonRestore()}))
                state, blob = restored[_STATE], restored[_META]
            except Exception as e:
                failure = read_reason(e)
        if failure is not None:
            silence_failed_read_leftovers()
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
