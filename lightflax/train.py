"""The training loop shared by every experiment.

    results = train.train_and_evaluate(config, data)

One compiled train step (lightflax.steps, wrapped once by lightflax.parallel)
reads batches from the device-resident dataset; compilation is ahead-of-time
and timed apart; every step is synchronised before the clock is read; the
selected checkpoint (each seed's best epoch by the selection split's loss, or
with ``keep="last"`` its last) and the latest are kept with Orbax and a run
resumes exactly (parameters, optimiser state, step, RNG, data order). Every
state carries a leading seed axis (``num_seeds``, also 1).

The loop is one :class:`Loop` object passed whole through its parts, in order:
:func:`start_or_resume` (creates it), :func:`prepare`, :func:`run_epoch` per
epoch with ``lightflax.plateau`` (per-seed reduce-LR-on-plateau and early
stopping), :func:`export_models`, ``report.build_results``. The decision rule
is ``lightflax.decision``, the memory check ``lightflax.memory``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import os
import time
from typing import Any, Callable, Dict, List, Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from lightflax import (_testing, averaging, checkpoints, decision as decision_lib, files, interrupts, memory,
                       metrics as metrics_lib, models, native, param_counts, parallel, plateau, progress, report,
                       reuse_alloc, steps, tensorboard, timing)
from lightflax.config import RunConfig
from lightflax.data import pipeline
from lightflax.errors import CheckpointError, NonFiniteLossError, UserError

Array = jax.Array


# Whole-tree copies and choices: ONE jitted program each (leaf by leaf, each shape compiled its own).
@jax.jit
def _copy_tree(tree):
    """New buffers for every leaf (the state is donated to the train step; its copy must survive)."""
    return jax.tree_util.tree_map(jnp.copy, tree)


@jax.jit
def _select(mask: Array, new, old):
    """Per-replica choice between two replica-stacked states."""
    return jax.tree_util.tree_map(lambda a, b: jnp.where(mask.reshape((-1,) + (1,) * (a.ndim - 1)), a, b), new, old)


def _check_model_input(model, cfg: RunConfig, stored_shape: Tuple[int, ...]) -> Tuple[int, ...]:
    """The model's input shape without the batch; clear errors for sizes it cannot take."""
    if len(stored_shape) == 1:  # feature vectors
        return tuple(stored_shape)
    h, w = (cfg.image_size, cfg.image_size) if cfg.image_size else tuple(stored_shape[:2])
    min_size = model.min_input_size()
    if min(h, w) < min_size:
        raise UserError(
            f"--image_size {h}x{w} is too small for {cfg.model.name}: it needs at least "
            f"{min_size}x{min_size}; pass --image_size={min_size} or larger"
        )
    if cfg.eval_image_size and cfg.eval_image_size < min_size:
        raise UserError(
            f"--eval_image_size {cfg.eval_image_size} is too small for {cfg.model.name}: it needs at least {min_size}"
        )
    return (h, w, cfg.channels)


def _state_tree(state: steps.TrainState) -> Dict[str, Any]:
    return {"step": state.step, "params": state.params, "batch_stats": state.batch_stats,
            "opt_state": state.opt_state}


def _from_tree(state: steps.TrainState, tree: Dict[str, Any]) -> steps.TrainState:
    return state.replace(step=tree["step"], params=tree["params"], batch_stats=tree["batch_stats"],
                         opt_state=tree["opt_state"])


class Trainer:
    """Builds the compiled steps for one run; every state has a leading replica axis."""

    def __init__(self, cfg: RunConfig, data, init_variables=None, devices=None):
        self.cfg = cfg
        self.data = data
        self.init_variables = init_variables  # replaces random init in every replica (fine-tuning)
        self.mesh = parallel.make_mesh(devices)  # default: every device (a subset: scaling benchmarks)
        self.n_devices = self.mesh.devices.size
        try:
            self.local_batch = parallel.local_batch_size(cfg.batch_size, self.mesh)
        except ValueError as e:
            raise UserError(f"--batch_size: {e}") from None
        train = data.splits["train"]
        if len(train.labels) < cfg.batch_size:
            raise UserError(
                f"--batch_size {cfg.batch_size} is larger than the training split "
                f"({len(train.labels)} examples); use a smaller --batch_size"
            )
        dtype = jnp.bfloat16 if cfg.dtype == "bfloat16" else None
        self.model = models.create(
            cfg.model.name, num_classes=data.num_classes, bn_axis_name=parallel.AXIS, dtype=dtype,
            **cfg.model_kwargs,
        )
        self.input_shape = _check_model_input(self.model, cfg, tuple(train.images.shape[1:]))
        self.steps_per_epoch = len(train.labels) // cfg.batch_size  # drop_remainder
        if cfg.steps_per_epoch:
            self.steps_per_epoch = min(self.steps_per_epoch, cfg.steps_per_epoch)
        self.tx = steps.make_optimizer(steps.learning_rate_schedule(cfg, self.steps_per_epoch), cfg.optimizer.name)
        self.class_weights = (steps.class_weights(train.labels, data.num_classes)
                              if cfg.class_weighting == "balanced" else None)
        self.num_seeds = cfg.num_seeds
        memory.check_memory(self.model, self.input_shape, self.local_batch, self.num_seeds)
        self.seeds = np.arange(cfg.seed, cfg.seed + cfg.num_seeds)
        self.dev_ids = parallel.device_ids(self.mesh)
        self._build()

    def _stacked_state(self):
        shape = (1, *self.input_shape)
        create = functools.partial(steps.create_state, self.model, self.tx, input_shape=shape,
                                   init_variables=self.init_variables)

        def stacked():
            states = [create(jax.random.key(int(s))) for s in self.seeds]
            return jax.tree_util.tree_map(lambda *xs: jnp.stack(xs), *states)

        # A random init is one jitted program (bit-identical to op by op: tests/test_train.py), which a
        # persistent compilation cache can serve; given variables would become constants under jit.
        return stacked() if self.init_variables is not None else jax.jit(stacked)()

    def init_state(self):
        """The replica-stacked initial state (replica r from seed + r), on every device."""
        return parallel.replicate(self._stacked_state(), self.mesh)

    def abstract_compile(self) -> Optional[timing.CompiledStep]:
        """The train step compiled ahead of time on abstract shapes (``jax.ShapeDtypeStruct`` with the
        shardings the real arguments get): no parameter, optimiser state or device copy of the data
        exists yet, and the executable is the one the loop then runs (no second compilation). None
        where the step cannot be lowered abstractly (pmap, several processes)."""
        if self.cfg.parallel != "shard_map" or jax.process_count() > 1:
            return None
        rep = jax.sharding.NamedSharding(self.mesh, parallel.REPLICATED)

        def abstract(a):
            return jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=rep)

        state = jax.tree_util.tree_map(abstract, jax.eval_shape(self._stacked_state))
        train = self.data.splits["train"]
        arrays = (abstract(np.asarray(train.images)), jax.ShapeDtypeStruct(train.labels.shape, np.int32,
                                                                            sharding=rep))
        return timing.aot_compile(self, state, *arrays, self.permutations(0), self.data_keys())

    def _build(self):
        cfg, rep, sharded = self.cfg, parallel.REPLICATED, parallel.SHARDED
        train_fn = steps.over_seeds(steps.make_train_step(self.model, cfg, self.local_batch, self.class_weights),
                                    cfg.num_seeds, in_axes=(0, None, None, 0, None, 0, None),
                                    mode=cfg.replica_mode)
        steps_per_epoch = self.steps_per_epoch

        def per_device_train(state, images, labels, perm, key, dev_id):
            return train_fn(state, images, labels, perm, state.step[0] % steps_per_epoch, key, dev_id)

        self.train_step = parallel.distribute(
            per_device_train, self.mesh, in_specs=(rep, rep, rep, rep, rep, sharded), out_specs=(rep, rep),
            mode=cfg.parallel, donate_argnums=(0,),
        )
        eval_fn = steps.over_seeds(steps.make_eval_step(self.model, cfg, self.local_batch),
                                   cfg.num_seeds, in_axes=(0, None, None, None, None),
                                   out_axes=(0, None, None), mode=cfg.replica_mode)
        # Log-probabilities are (replicas, batch, classes): sharded on axis 1, which
        # pmap cannot express, so evaluation always runs under shard_map.
        by_example = jax.sharding.PartitionSpec(None, parallel.AXIS)
        self.eval_step = parallel.distribute(eval_fn, self.mesh, in_specs=(rep, rep, rep, rep, sharded),
                                             out_specs=(by_example, sharded, sharded))
        num_train, shuffle = len(self.data.splits["train"].labels), cfg.shuffle

        def permutations(seeds, epoch):
            if not shuffle:
                return jnp.broadcast_to(jnp.arange(num_train, dtype=jnp.int32), (len(seeds), num_train))
            return jax.vmap(lambda s: pipeline.epoch_permutation(s, epoch, num_train))(seeds)

        jitted = jax.jit(permutations)
        self.permutations = lambda epoch: jitted(jnp.asarray(self.seeds, jnp.int32), jnp.int32(epoch))

    def lower(self, state, images, labels, perm, keys):
        """Ahead-of-time lowering of the train step (``timing.aot_compile(trainer, ...)``);
        the compiled step takes (state, images, labels, perm, keys, trainer.dev_ids)."""
        return self.train_step.lower(state, images, labels, perm, keys, self.dev_ids)

    def data_keys(self):
        """(replicas,) PRNG keys of the data order, dropout and augmentation."""
        return parallel.replicate(jnp.stack([jax.random.key(int(s)) for s in self.seeds]), self.mesh)

    def device_split(self, split: str):
        s = self.data.splits[split]
        return parallel.replicate((np.asarray(s.images), np.asarray(s.labels, np.int32)), self.mesh)

    def log_probs(self, state, split_arrays) -> Tuple[np.ndarray, np.ndarray]:
        """The raw per-replica log-probabilities of a device-resident split: ((replicas, N, classes)
        float32, labels (N,) int32), in the split's stored order (padding removed)."""
        images, labels = split_arrays
        lps, ys, masks = [], [], []
        with progress.bar(-(-images.shape[0] // self.cfg.batch_size), "eval", unit="batch") as bar:
            for start in range(0, images.shape[0], self.cfg.batch_size):
                interrupts.check()
                lp, y, m = self.eval_step(state, images, labels, jnp.int32(start), self.dev_ids)
                lps.append(lp), ys.append(y), masks.append(m)
                bar.update()
        if jax.process_count() > 1:  # sharded outputs span processes: gather them everywhere
            from jax.experimental import multihost_utils

            lps, ys, masks = multihost_utils.process_allgather((lps, ys, masks), tiled=True)
        y = np.concatenate([np.asarray(a) for a in ys])
        m = np.concatenate([np.asarray(a) for a in masks]).astype(bool)
        lp = np.concatenate([np.asarray(a) for a in lps], axis=1)
        return lp[:, m], y[m]

    def evaluate(self, state, split_arrays) -> List[Dict[str, Optional[float]]]:
        """Metrics of every replica on a device-resident split."""
        lp, y = self.log_probs(state, split_arrays)
        return [metrics_lib.classification_metrics(lp[r], y) for r in range(self.num_seeds)]


@dataclasses.dataclass
class RunTimes:
    """Training time that survives --resume: saved with every checkpoint, continued after it.

    ``loop_s`` is the wall time of the epoch loop (steps, selection-split evaluation,
    checkpoint saves; compilation excluded) summed over every segment of the run."""

    epoch_s: List[float] = dataclasses.field(default_factory=list)
    loop_s: float = 0.0
    checkpoint_s: float = 0.0

    def start(self) -> None:
        self._base, self._t0 = self.loop_s, time.perf_counter()

    def tick(self) -> None:
        self.loop_s = self._base + time.perf_counter() - self._t0

    def to_json(self) -> Dict[str, Any]:
        return {"epoch_s": self.epoch_s, "loop_s": self.loop_s, "checkpoint_s": self.checkpoint_s}


# Settings --resume may change; every other RunConfig field must equal the interrupted run's.
RESUMABLE = ("epochs", "resume", "workdir", "profile_dir", "profile_start_step", "profile_steps", "checkpoint_every")


def check_resume_settings(cfg: RunConfig, saved: Optional[Dict[str, Any]]) -> None:
    """One line listing every setting that differs from the run being resumed."""
    if not saved:
        return
    now = json.loads(json.dumps(cfg.to_json()))
    fixed = ("epochs",) if saved.get("lr_schedule", "constant") != "constant" else ()  # the schedule spans them
    changed = [f"--{k} {saved.get(k)!r} -> {now[k]!r}" for k in now
               if (k not in RESUMABLE or k in fixed) and k in saved and saved[k] != now[k]]
    if changed:
        raise UserError(f"--resume with settings that differ from the run in {cfg.workdir}: {', '.join(changed)}; "
                        f"resume with the original values (only --epochs, not under --lr_schedule=cosine, "
                        f"--profile_* and --checkpoint_every may change) or choose another --workdir")


@dataclasses.dataclass
class Loop:
    """One run's epoch loop: everything its parts read and update, passed whole.

    ``state`` is the training state, ``selected`` the state the run reports and exports (each seed's
    best epoch by the selection split's loss, or its last with ``keep="last"``: the checkpoint slot
    of that name). The epoch loop updates ``state``, ``selected``, ``history``, ``tracker`` and
    ``times`` in place; a NonFiniteLossError leaves them at the last saved epoch. The fields after
    ``times`` are set by :func:`prepare` (device arrays, the compiled step, timers)."""

    trainer: Trainer
    ckpt: checkpoints.Checkpointer
    state: Any
    selected: Any
    first_epoch: int
    history: List[Dict[str, Any]]
    tracker: plateau.PlateauTracker
    times: RunTimes
    counts: Dict[str, int] = None  # variables of one seed (param_counts.variables_counts)
    keys: Any = None  # (seeds,) PRNG keys of the data order, dropout and augmentation
    train_arrays: Any = None
    select_arrays: Any = None
    compiled: Any = None  # timing.aot_compile's result
    eval_compile_s: float = 0.0
    step_timer: Optional[timing.StepTimer] = None
    profile: Optional[timing.ProfileWindow] = None
    hook: Optional[Callable[[int], None]] = None  # lightflax._testing.fault_hook
    selected_unsaved: bool = False  # the selected state changed since the last checkpoint (checkpoint_every)
    average: Any = None  # --weight_averaging's running average of params and batch_stats
    evaluated: Any = None  # the state evaluated and selected this epoch: ``state``, or its average

    @property
    def cfg(self) -> RunConfig:
        return self.trainer.cfg


def start_or_resume(trainer: Trainer, ckpt: checkpoints.Checkpointer) -> Loop:
    """The loop's state: fresh, or restored from ``workdir`` with --resume."""
    cfg = trainer.cfg
    state = trainer.init_state()
    latest = ckpt.latest_step()
    if latest is not None and not cfg.resume:
        raise UserError(
            f"--workdir {cfg.workdir} already holds a run (checkpoint at step {latest}); pass --resume "
            f"to continue it or choose another --workdir"
        )
    if latest is None:
        if cfg.resume:
            print(f"--resume: {cfg.workdir} holds no checkpoint yet; starting a fresh run there", flush=True)
        return Loop(trainer, ckpt, state, _copy_tree(state), 0, [],
                    plateau.from_config(cfg), RunTimes())
    check_resume_settings(cfg, (ckpt.latest_meta() or {}).get("progress", {}).get("config"))
    restored, meta = ckpt.restore_latest(_state_tree(state))
    state = parallel.replicate(_from_tree(state, restored), trainer.mesh)
    progress, selected = meta["progress"], ckpt.restore_selected(_state_tree(state))
    tracker = plateau.from_config(cfg, progress["tracker"])
    if selected is None and max(tracker.best_epoch) > 0:
        raise CheckpointError(
            f"the selected checkpoint of {cfg.workdir} is missing "
            f"({os.path.relpath(checkpoints.selected_dir(ckpt.root), cfg.workdir)} is empty, but epoch "
            f"{max(tracker.best_epoch)} was the best so far); restore it, or start again in another --workdir"
        )
    selected = (parallel.replicate(_from_tree(state, selected[0]), trainer.mesh) if selected
                else _copy_tree(state))
    logging.info("resumed from step %d (epoch %d)", latest, progress["epoch"])
    print(f"resumed {cfg.workdir} at epoch {progress['epoch']} (step {latest})", flush=True)
    return Loop(trainer, ckpt, state, selected, progress["epoch"], progress["history"], tracker,
                RunTimes(**progress["times"]))


def run_epoch(loop: Loop, epoch: int, bar=None):
    """One epoch of train steps from ``loop.state``; returns (state, mean loss (seeds,), mean accuracy
    (seeds,)). ``bar``: a :class:`lightflax.progress.Bar`, given the running loss (read only when it redraws)."""
    trainer, (images, labels), state = loop.trainer, loop.train_arrays, loop.state
    perm = timing.sync(trainer.permutations(epoch))
    step_metrics = []
    for i in range(trainer.steps_per_epoch):
        global_step = epoch * trainer.steps_per_epoch + i
        interrupts.check()  # a signal recorded where it could not be raised surfaces here
        with loop.profile.step(global_step):
            state, m = loop.step_timer.run(loop.compiled.compiled, state, images, labels, perm, loop.keys,
                                           trainer.dev_ids)
        step_metrics.append(m)
        if loop.hook is not None:
            loop.hook(global_step)
        if bar is not None:  # the step is already synchronised: its loss is ready
            bar.update(loss=lambda: float(np.mean([np.mean(np.asarray(x["loss"])) for x in step_metrics])))
    loss = np.mean(np.stack([np.asarray(m["loss"]) for m in step_metrics]), axis=0)
    accuracy = np.mean(np.stack([np.asarray(m["accuracy"]) for m in step_metrics]), axis=0)
    if not np.all(np.isfinite(loss)):
        raise NonFiniteLossError(f"non-finite training loss {loss.tolist()} in epoch {epoch + 1}")
    return state, loss, accuracy


def _set_learning_rates(trainer: Trainer, state, lrs: np.ndarray):
    hyper = dict(state.opt_state.hyperparams,
                 learning_rate=parallel.replicate(jnp.asarray(lrs, jnp.float32), trainer.mesh))
    return state.replace(opt_state=state.opt_state._replace(hyperparams=hyper))


def export_models(trainer: Trainer, selected) -> List[int]:
    """Writes each replica's selected variables (model.msgpack, or model_seed<r>.msgpack); returns their sizes."""
    n, primary = trainer.num_seeds, jax.process_index() == 0
    paths = [os.path.join(trainer.cfg.workdir, f"model{f'_seed{r}' if n > 1 else ''}.msgpack") for r in range(n)]
    if primary:  # one writer; every process holds the same replicated values
        host = jax.device_get({"params": selected.params, "batch_stats": selected.batch_stats})  # not opt_state
        for r, path in enumerate(paths):  # NumPy views per replica: no device ops
            checkpoints.export_variables(path, jax.tree_util.tree_map(lambda a: a[r], host))
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices("lightflax:export")
    return [os.path.getsize(p) for p in paths]


def _print_epoch(cfg: RunConfig, row: Dict[str, Any], steps_per_epoch: int, improved: bool) -> None:
    select = cfg.select_split
    progress.epoch_line(
        f"epoch {row['epoch']}/{cfg.epochs}  {steps_per_epoch / row['train_s']:.2f} steps/s  "
        f"loss {np.mean(row['train_loss']):.4f}  acc {np.mean(row['train_accuracy']):.4f}  "
        f"{select}_loss {np.mean(row['select_loss']):.4f}  {select}_acc {np.mean(row['select_accuracy']):.4f}  "
        f"{row['epoch_s']:.2f} s" + ("  *" if improved else ""))


def _compile(trainer: Trainer, state, train_arrays, keys, first_epoch: int, select_arrays, compiled=None):
    """Ahead-of-time compilation of the train step (``compiled``: already done by ``memory.check_train_step``),
    and of evaluation by one pass, before the clock starts."""
    if compiled is None:
        compiled = timing.aot_compile(trainer, state, *train_arrays, trainer.permutations(first_epoch), keys)
    print(
        f"compiled train step in {compiled.compile_s:.2f} s (lowering {compiled.lower_s:.2f} s); "
        f"{(compiled.flops or 0) * trainer.n_devices / 1e9:.3f} GFLOP/step; {trainer.n_devices} device(s), "
        f"{trainer.steps_per_epoch} steps/epoch of {trainer.cfg.batch_size}",
        flush=True,
    )
    t0 = time.perf_counter()
    trainer.evaluate(state, select_arrays)
    return compiled, time.perf_counter() - t0


def train_and_evaluate(cfg: RunConfig, data, init_variables=None,
                       extra: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
    """Trains, selects the best checkpoint by the selection split's loss, tests it, reports.

    ``init_variables``: start from these variables instead of a random
    initialisation (fine-tuning). ``extra``: entries recorded in results.json as
    given (the entry layer records its flags there). Returns the results dict
    written to ``workdir/results.json``. The workdir is locked for the run
    (``files.workdir_lock``): a second run on it stops with one line.
    """
    if data.splits.get(cfg.select_split) is None:
        other = next((s for s in ("val", "test") if s != cfg.select_split and data.splits.get(s) is not None), None)
        raise UserError(f"dataset {data.name} has no {cfg.select_split} split to select the best checkpoint on; "
                        f"add one (chest_xray: a {cfg.select_split}/ folder with NORMAL/ and PNEUMONIA/ beside train/)"
                        + (f" or pass --select_split={other}" if other else ""))
    if os.path.exists(cfg.workdir) and not os.path.isdir(cfg.workdir):
        raise UserError(f"--workdir {cfg.workdir} is a file, not a folder; choose another --workdir")
    try:
        os.makedirs(cfg.workdir, exist_ok=True)
    except OSError as e:
        raise UserError(f"--workdir {cfg.workdir} cannot be created ({e.strerror}); choose a writable folder") \
            from None
    lock = files.workdir_lock(cfg.workdir) if jax.process_index() == 0 else contextlib.nullcontext()
    with lock, native.kernels(cfg.kernels):  # read when the steps are traced, inside _train
        return _train(cfg, data, init_variables, dict(extra or {}, kernels=native.status(),
                                                         allocator=reuse_alloc.status()))


def _train(cfg: RunConfig, data, init_variables, extra) -> Dict[str, Any]:
    decision_lib.build(cfg, data)  # a decision the data cannot take stops the run before training
    _announce(cfg, data)
    trainer = Trainer(cfg, data, init_variables=init_variables)
    compiled = memory.check_train_step(trainer)
    loop = start_or_resume(trainer, checkpoints.Checkpointer(cfg.workdir))
    prepare(loop, compiled)
    try:
        _epochs(loop)
    except NonFiniteLossError as e:
        if not loop.history:
            raise NonFiniteLossError(f"{e}; stopped before the first checkpoint, nothing was kept "
                                     f"(try a lower --learning_rate)") from None
        _finish(loop, data, extra)
        raise NonFiniteLossError(f"{e}; stopped: the {cfg.keep} checkpoint (epoch "
                                 f"{max(plateau.kept_epochs(cfg, loop.tracker, len(loop.history)))}) is kept in "
                                 f"{cfg.workdir} and model.msgpack/results.json were written from it (try a lower "
                                 f"--learning_rate)") from None
    return _finish(loop, data, extra)


def prepare(loop: Loop, compiled: Optional[timing.CompiledStep] = None) -> None:
    """Counts the variables, puts the splits on the devices, compiles (unless ``compiled`` is the train
    step already compiled by ``memory.check_train_step``), and starts the loop's clock."""
    trainer, cfg = loop.trainer, loop.cfg
    one_replica = lambda a: jax.ShapeDtypeStruct(a.shape[1:], a.dtype)  # noqa: E731  (shapes: no device work)
    loop.counts = param_counts.variables_counts(jax.tree_util.tree_map(
        one_replica, {"params": loop.state.params, "batch_stats": loop.state.batch_stats}))
    loop.keys, loop.train_arrays = trainer.data_keys(), trainer.device_split("train")
    loop.select_arrays = trainer.device_split(cfg.select_split)
    loop.compiled, loop.eval_compile_s = _compile(trainer, loop.state, loop.train_arrays, loop.keys,
                                                  loop.first_epoch, loop.select_arrays, compiled)
    interrupts.check()
    loop.step_timer, loop.hook = timing.StepTimer(warmup=1), _testing.fault_hook()
    loop.profile = timing.ProfileWindow(cfg.profile_dir, cfg.profile_start_step, cfg.profile_steps)
    loop.times.start()


def _epochs(loop: Loop) -> None:
    """The epoch loop, from ``loop.first_epoch`` until ``cfg.epochs`` or every seed stopped early."""
    cfg, trainer = loop.cfg, loop.trainer
    tb = tensorboard.Writer(cfg.workdir, enabled=jax.process_index() == 0)
    with loop.profile, tb:
        for epoch in range(loop.first_epoch, cfg.epochs):
            interrupts.check()
            if loop.tracker.all_stopped:
                break
            t0, n_timed = time.perf_counter(), len(loop.step_timer.durations)
            with progress.bar(trainer.steps_per_epoch, f"epoch {epoch + 1}/{cfg.epochs}") as bar:
                loop.state, train_loss, train_acc = run_epoch(loop, epoch, bar)
            train_s = time.perf_counter() - t0
            loop.evaluated = _averaged(loop, epoch)
            selected = trainer.evaluate(loop.evaluated, loop.select_arrays)
            loop.times.epoch_s.append(time.perf_counter() - t0)
            row = _end_epoch(loop, epoch, train_loss, train_acc, train_s, selected)
            tb.epoch((epoch + 1) * trainer.steps_per_epoch, tensorboard.epoch_scalars(
                row, selected, cfg.select_split, float(np.median(loop.step_timer.durations[n_timed:])),
                trainer.steps_per_epoch * cfg.batch_size * cfg.num_seeds))


def _averaged(loop: Loop, epoch: int):
    """``loop.state``, or with --weight_averaging the state carrying the running average of its
    params and batch_stats (lightflax.averaging)."""
    cfg = loop.cfg
    if cfg.weight_averaging == "none":
        return loop.state
    loop.average = averaging.update(loop.average, {"params": loop.state.params, "batch_stats": loop.state.batch_stats},
                                    cfg.weight_averaging, epoch, cfg.epochs, cfg.averaging_epochs)
    return loop.state.replace(**loop.average)


def _end_epoch(loop: Loop, epoch: int, train_loss, train_acc, train_s: float, selected) -> Dict[str, Any]:
    """After an epoch's steps and evaluation: the plateau tracker, the selected state, the history
    row, the checkpoints and the epoch line. Returns the row."""
    cfg = loop.cfg
    select_loss = np.array([m["loss"] for m in selected])
    lrs = np.asarray(loop.state.opt_state.hyperparams["learning_rate"], float)
    active = ~np.array(loop.tracker.stopped)  # the seeds that trained this epoch
    improved, new_lrs = loop.tracker.update(epoch + 1, select_loss, lrs)
    if cfg.lr_schedule == "constant":  # a schedule sets the rate itself, at every step
        loop.state = _set_learning_rates(loop.trainer, loop.state, new_lrs)
    kept = improved if cfg.keep == "best" else active  # keep=last: the selected slot holds the last epoch
    if kept.any():
        loop.selected = _select(jnp.asarray(kept), loop.evaluated, loop.selected)
    row = {"epoch": epoch + 1, "train_loss": train_loss.tolist(), "train_accuracy": train_acc.tolist(),
           "select_loss": select_loss.tolist(), "select_accuracy": [m["accuracy"] for m in selected],
           "learning_rate": new_lrs.tolist(), "train_s": train_s, "epoch_s": loop.times.epoch_s[-1]}
    loop.history.append(row)
    loop.selected_unsaved |= bool(kept.any())
    every, last = cfg.checkpoint_every, epoch + 1 == cfg.epochs or loop.tracker.all_stopped
    if last or (every and (epoch + 1) % every == 0):
        _save(loop, epoch, selected_changed=loop.selected_unsaved)
        loop.selected_unsaved = False
    else:
        loop.times.tick()
    _print_epoch(cfg, row, loop.trainer.steps_per_epoch, bool(improved.any()))
    return row


PREDICTIONS_FILE = "predictions.npz"


def write_predictions(path: str, predictions: Dict[str, Tuple[np.ndarray, np.ndarray]]) -> None:
    """``predictions.npz``: per split ``<split>_log_probs`` (R, N, C) float32 and ``<split>_labels`` (N,)."""
    arrays = {}
    for split, (lp, y) in predictions.items():
        arrays[f"{split}_log_probs"] = np.asarray(lp, np.float32)
        arrays[f"{split}_labels"] = np.asarray(y)
    files.atomic_write(path, lambda f: np.savez(f, **arrays))


def _finish(loop: Loop, data, extra) -> Dict[str, Any]:
    """Tests the selected state, exports it and writes results.json, predictions.npz and the run's report."""
    cfg, trainer, selected = loop.cfg, loop.trainer, loop.selected
    predictions = {cfg.select_split: trainer.log_probs(selected, loop.select_arrays)}
    if data.splits.get("test") and "test" not in predictions:
        predictions["test"] = trainer.log_probs(selected, trainer.device_split("test"))
    decision = decision_lib.build(cfg, data, predictions.get("val"))  # temperature fitted on validation only
    per_seed = {split: [decision_lib.split_metrics(lp[r], y, decision) for r in range(trainer.num_seeds)]
                for split, (lp, y) in predictions.items()}
    ensemble = ({split: decision_lib.split_metrics(metrics_lib.ensemble_log_probs(lp), y, decision)
                 for split, (lp, y) in predictions.items()} if trainer.num_seeds > 1 else {})
    outcome = report.RunOutcome(
        counts=loop.counts, size_bytes=export_models(trainer, selected), compiled=loop.compiled,
        eval_compile_s=loop.eval_compile_s, step_stats=loop.step_timer.stats(), epoch_times=loop.times.epoch_s,
        total_s=loop.times.loop_s, checkpoint_s=loop.times.checkpoint_s, history=loop.history,
        best_epoch=loop.tracker.best_epoch, select_metrics=per_seed[cfg.select_split],
        test_metrics=per_seed.get("test"), n_devices=trainer.n_devices, steps_per_epoch=trainer.steps_per_epoch,
        decision=decision, select_ensemble=ensemble.get(cfg.select_split), test_ensemble=ensemble.get("test"))
    epochs = plateau.kept_epochs(cfg, loop.tracker, len(loop.history))
    extra = dict(extra, kept_checkpoint=cfg.keep, kept_epoch=epochs if cfg.num_seeds > 1 else epochs[0])
    results = report.build_results(cfg, data, outcome, extra)
    if jax.process_index() == 0:
        write_predictions(os.path.join(cfg.workdir, PREDICTIONS_FILE), predictions)
    if jax.process_index() == 0:
        report.write_run(cfg.workdir, results, loop.history, select_split=cfg.select_split,
                         title=cfg.experiment)
    print(f"wrote {os.path.join(cfg.workdir, 'results.json')}: {report.summary_line(results)}", flush=True)
    return results


def _save(loop: Loop, epoch: int, selected_changed: bool) -> None:
    """The latest (and, when it changed, the selected) checkpoint after ``epoch``, with the progress
    a resume needs: history, plateau tracker, the run's times so far and its settings."""
    cfg, times = loop.cfg, loop.times
    t0 = time.perf_counter()
    times.tick()
    progress = {"epoch": epoch + 1, "history": loop.history, "tracker": loop.tracker.to_json(),
                "times": times.to_json(), "config": cfg.to_json()}
    step = int(np.asarray(loop.state.step)[0])
    if selected_changed:
        loop.ckpt.save_selected(step, _state_tree(loop.selected), {"progress": progress})
    loop.ckpt.save_latest(step, _state_tree(loop.state), {"progress": progress})
    times.checkpoint_s += time.perf_counter() - t0
    times.tick()


def _announce(cfg: RunConfig, data) -> None:
    if data.synthetic:
        print("NOTE: training on SYNTHETIC data (random images); accuracy figures are meaningless.", flush=True)
    print(f"{cfg.experiment}: model {cfg.model.name} {cfg.model_kwargs}, dataset {data.name} "
          f"({'synthetic' if data.synthetic else data.source}), workdir {cfg.workdir}", flush=True)
    k = native.status()
    print(f"kernels: {k['kernels']} ({k['reason']})", flush=True)
