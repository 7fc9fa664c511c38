"""Checkpoints: the latest and the selected training state (Orbax), and exported weights.

One module per concept: ``slots`` (the Checkpointer: Orbax I/O and the latest/selected slot
policy), ``integrity`` (tree comparison and CRC-32), ``exported`` (model.msgpack with its
sha256), ``orbax_quiet`` (keeping Orbax's logging and leftovers to our one-line errors).

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

from lightflax.checkpoints.exported import digest_path, export_variables, load_exported
from lightflax.checkpoints.integrity import first_mismatch, leaf_specs, path_str, tree_crc32
from lightflax.checkpoints.slots import Checkpointer, remove_tmp_dirs, selected_dir

__all__ = ["Checkpointer", "digest_path", "export_variables", "first_mismatch", "leaf_specs", "load_exported",
           "path_str", "remove_tmp_dirs", "selected_dir", "tree_crc32"]
