"""The training loop shared by every experiment.

    results = train.train_and_evaluate(config, data)

One compiled train step (lightflax.steps, wrapped once by lightflax.parallel)
reads batches from the device-resident dataset; compilation is ahead-of-time
and timed apart; every step is synchronised before the clock is read; the
best checkpoint by the selection split's loss (or, with ``keep="last"``, each
replica's last epoch, in the same slot) and the latest are kept with
Orbax and a run resumes exactly (parameters, optimiser state, step, RNG, data
order). Every state carries a leading replica axis (``num_seeds``, also 1).

The loop's parts, in order: :func:`start_or_resume`, :func:`run_epoch`,
:class:`PlateauTracker` (per-seed reduce-LR-on-plateau and early stopping),
:func:`export_models`, ``report.build_results``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import math
import os
import signal
import time
from typing import Any, Callable, Dict, List, Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from lightflax import (checkpoints, decision as decision_lib, files, metrics as metrics_lib, models, native,
                       param_counts, parallel, progress, report, steps, tensorboard, timing)
from lightflax.config import RunConfig
from lightflax.data import pipeline
from lightflax.errors import CheckpointError, UserError

Array = jax.Array

# The one debug hook: SIGKILL this process after that many training steps of the
# run (counting from step 0 of epoch 0). Used by the resume-after-kill tests.
FAULT_KILL_ENV = "LIGHTFLAX_FAULT_KILL_AFTER_STEP"


class NonFiniteLossError(RuntimeError):
    """Training produced a NaN/inf loss. The message says what was kept: after good epochs the
    best checkpoint, and model.msgpack/results.json written from it."""


def _first_replica(tree: Any) -> Any:
    return jax.tree_util.tree_map(lambda a: a[0], tree)


def _replicas(tree: Any, n: int) -> List[Any]:
    return [jax.tree_util.tree_map(lambda a, i=i: a[i], tree) for i in range(n)]


def _select(mask: Array, new, old):
    """Per-replica choice between two replica-stacked states."""
    def pick(a, b):
        return jnp.where(mask.reshape((-1,) + (1,) * (a.ndim - 1)), a, b)

    return jax.tree_util.tree_map(pick, new, old)


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


def available_memory_bytes(device=None) -> Optional[int]:
    """Memory of one device: an accelerator's own limit, else the host's physical memory (None: unknown)."""
    device = device or jax.devices()[0]
    stats = device.memory_stats() if device.platform != "cpu" else None
    if stats and stats.get("bytes_limit"):
        return int(stats["bytes_limit"])
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def memory_lower_bound(trainer) -> int:
    """Bytes one device needs at least: per replica four float32 copies of the variables (parameters,
    gradients, Adam's two moments) plus one float32 batch of inputs and of the first layer's outputs."""
    shapes = jax.eval_shape(lambda: trainer.model.init(jax.random.key(0), jnp.zeros((1, *trainer.input_shape)),
                                                       train=False))
    n_vars = sum(int(np.prod(a.shape)) for a in jax.tree_util.tree_leaves(shapes))
    batch = trainer.local_batch * int(np.prod(trainer.input_shape)) * 4 * 2
    return trainer.num_seeds * (16 * n_vars + batch)


def check_memory(trainer) -> None:
    """Refuses (one line) a --num_seeds whose lower-bound estimate exceeds the device's memory."""
    need, have = memory_lower_bound(trainer), available_memory_bytes()
    if have and need > have:
        per = need / trainer.num_seeds
        raise UserError(f"--num_seeds {trainer.num_seeds} needs at least {need / 2**30:.1f} GiB "
                        f"({per / 2**20:.0f} MiB per replica) but the device has {have / 2**30:.1f} GiB; use "
                        f"--num_seeds={max(1, int(have // per))} or fewer, or a smaller --batch_size")


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
        check_memory(self)
        self.seeds = np.arange(cfg.seed, cfg.seed + cfg.num_seeds)
        self.dev_ids = parallel.device_ids(self.mesh)
        self._build()

    def init_state(self):
        """The replica-stacked initial state (replica r from seed + r), on every device."""
        shape = (1, *self.input_shape)
        create = functools.partial(steps.create_state, self.model, self.tx, input_shape=shape,
                                   init_variables=self.init_variables)
        states = [create(jax.random.key(int(s))) for s in self.seeds]
        return parallel.replicate(jax.tree_util.tree_map(lambda *xs: jnp.stack(xs), *states), self.mesh)

    def _build(self):
        cfg, rep, sharded = self.cfg, parallel.REPLICATED, parallel.SHARDED
        train_fn = steps.replicate_over_seeds(steps.make_train_step(self.model, cfg, self.local_batch,
                                                                    self.class_weights),
                                              cfg.num_seeds, in_axes=(0, None, None, 0, None, 0, None),
                                              mode=cfg.replica_mode)
        steps_per_epoch = self.steps_per_epoch

        def per_device_train(state, images, labels, perm, key, dev_id):
            return train_fn(state, images, labels, perm, state.step[0] % steps_per_epoch, key, dev_id)

        self.train_step = parallel.distribute(
            per_device_train, self.mesh, in_specs=(rep, rep, rep, rep, rep, sharded), out_specs=(rep, rep),
            mode=cfg.parallel, donate_argnums=(0,),
        )
        eval_fn = steps.replicate_over_seeds(steps.make_eval_step(self.model, cfg, self.local_batch),
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
class PlateauTracker:
    """Per-seed Keras ReduceLROnPlateau + EarlyStopping on the selection split's loss.

    Keras semantics, per replica: a loss below the best so far is an improvement
    (resets both counters); otherwise after ``reduce_patience`` epochs the learning
    rate is multiplied by ``factor`` (and that counter restarts) and after
    ``stop_patience`` epochs the replica stops (its state is frozen as its best).
    Not ``optax.contrib.reduce_on_plateau``: that transform scales the updates
    inside the optimiser from losses fed to every update step, whereas the study
    (Keras callbacks) changes Adam's learning rate once per epoch from the
    validation loss, and early stopping shares the same counter.
    """

    num_seeds: int
    reduce_patience: int = 0  # 0 = off
    factor: float = 0.1
    stop_patience: int = 0  # 0 = off
    best_loss: List[float] = None
    best_epoch: List[int] = None
    since_best: List[int] = None
    since_lr_change: List[int] = None
    stopped: List[bool] = None

    def __post_init__(self):
        n = self.num_seeds
        for name, value in (("best_loss", math.inf), ("best_epoch", 0), ("since_best", 0),
                            ("since_lr_change", 0), ("stopped", False)):
            if getattr(self, name) is None:
                setattr(self, name, [value] * n)

    @property
    def all_stopped(self) -> bool:
        return all(self.stopped)

    def update(self, epoch: int, losses: np.ndarray, lrs: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
        """After epoch ``epoch`` (1-based): returns (improved mask, new learning rates)."""
        lrs = np.array(lrs, dtype=float)
        improved = (np.asarray(losses) < np.array(self.best_loss)) & ~np.array(self.stopped)
        for r in range(self.num_seeds):
            if self.stopped[r]:
                continue
            if improved[r]:
                self.best_loss[r], self.best_epoch[r] = float(losses[r]), epoch
                self.since_best[r] = self.since_lr_change[r] = 0
                continue
            self.since_best[r] += 1
            self.since_lr_change[r] += 1
            if self.reduce_patience and self.since_lr_change[r] >= self.reduce_patience:
                lrs[r] *= self.factor
                self.since_lr_change[r] = 0
            if self.stop_patience and self.since_best[r] >= self.stop_patience:
                self.stopped[r] = True
        return improved, lrs

    def to_json(self) -> Dict[str, Any]:
        return {k: getattr(self, k) for k in ("best_loss", "best_epoch", "since_best", "since_lr_change", "stopped")}


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
RESUMABLE = ("epochs", "resume", "workdir", "profile_dir", "profile_start_step", "profile_steps")


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
                        f"resume with the original values (only --epochs, not under --lr_schedule=cosine, and "
                        f"--profile_* may change) or choose another --workdir")


def _tracker(cfg: RunConfig, saved: Optional[Dict[str, Any]] = None) -> PlateauTracker:
    return PlateauTracker(cfg.num_seeds, cfg.reduce_lr_patience, cfg.reduce_lr_factor, cfg.early_stopping_patience,
                          **(saved or {}))


def fault_hook() -> Optional[Callable[[int], None]]:
    """The debug hook of :data:`FAULT_KILL_ENV` (None when unset): called after each global step."""
    value = os.environ.get(FAULT_KILL_ENV)
    if not value:
        return None
    kill_after = int(value)

    def hook(global_step: int) -> None:
        if global_step + 1 == kill_after:
            os.kill(os.getpid(), signal.SIGKILL)

    return hook


def start_or_resume(trainer: Trainer, ckpt: checkpoints.Checkpointer):
    """(state, best_state, epoch, history, tracker, times): fresh, or restored from ``workdir`` with --resume."""
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
        return state, jax.tree_util.tree_map(jnp.copy, state), 0, [], _tracker(cfg), RunTimes()
    check_resume_settings(cfg, (ckpt.latest_meta() or {}).get("progress", {}).get("config"))
    restored, meta = ckpt.restore_latest(_state_tree(state))
    state = parallel.replicate(_from_tree(state, restored), trainer.mesh)
    progress, best = meta["progress"], ckpt.restore_selected(_state_tree(state))
    tracker = _tracker(cfg, progress["tracker"])
    if best is None and max(tracker.best_epoch) > 0:
        raise CheckpointError(
            f"the selected checkpoint of {cfg.workdir} is missing ({os.path.relpath(checkpoints.selected_dir(ckpt.root), cfg.workdir)} "
            f"is empty, but epoch {max(tracker.best_epoch)} was the best so far); restore it, or start again in "
            f"another --workdir"
        )
    best_state = (parallel.replicate(_from_tree(state, best[0]), trainer.mesh) if best
                  else jax.tree_util.tree_map(jnp.copy, state))
    logging.info("resumed from step %d (epoch %d)", latest, progress["epoch"])
    print(f"resumed {cfg.workdir} at epoch {progress['epoch']} (step {latest})", flush=True)
    return state, best_state, progress["epoch"], progress["history"], tracker, RunTimes(**progress["times"])


def run_epoch(trainer: Trainer, compiled, state, epoch: int, train_arrays, keys, step_timer: timing.StepTimer,
              profile: timing.ProfileWindow, hook: Optional[Callable[[int], None]], bar=None):
    """One epoch of train steps; returns (state, mean loss (replicas,), mean accuracy (replicas,)).
    ``bar``: a :class:`lightflax.progress.Bar`, given the running loss (read only when it redraws)."""
    images, labels = train_arrays
    perm = timing.sync(trainer.permutations(epoch))
    step_metrics = []
    for i in range(trainer.steps_per_epoch):
        global_step = epoch * trainer.steps_per_epoch + i
        with profile.step(global_step):
            state, m = step_timer.run(compiled.compiled, state, images, labels, perm, keys, trainer.dev_ids)
        step_metrics.append(m)
        if hook is not None:
            hook(global_step)
        if bar is not None:  # the step is already synchronised: its loss is ready
            bar.update(loss=lambda: float(np.mean([np.mean(np.asarray(x["loss"])) for x in step_metrics])))
    loss = np.mean(np.stack([np.asarray(m["loss"]) for m in step_metrics]), axis=0)
    accuracy = np.mean(np.stack([np.asarray(m["accuracy"]) for m in step_metrics]), axis=0)
    if not np.all(np.isfinite(loss)):
        raise NonFiniteLossError(f"non-finite training loss {loss.tolist()} in epoch {epoch + 1}")
    return state, loss, accuracy


def kept_epochs(cfg: RunConfig, tracker: PlateauTracker, epochs_run: int) -> List[int]:
    """The epoch whose weights each replica reports and exports: its best (``keep="best"``) or its
    last (``keep="last"``: the epoch early stopping stopped it, best + patience, else the last run)."""
    if cfg.keep == "best":
        return list(tracker.best_epoch)
    return [min(b + cfg.early_stopping_patience, epochs_run) if stopped else epochs_run
            for b, stopped in zip(tracker.best_epoch, tracker.stopped)]


def _set_learning_rates(trainer: Trainer, state, lrs: np.ndarray):
    hyper = dict(state.opt_state.hyperparams,
                 learning_rate=parallel.replicate(jnp.asarray(lrs, jnp.float32), trainer.mesh))
    return state.replace(opt_state=state.opt_state._replace(hyperparams=hyper))


def export_models(trainer: Trainer, best_state) -> List[int]:
    """Writes each replica's best variables (model.msgpack, or model_seed<r>.msgpack); returns their sizes."""
    n, primary = trainer.num_seeds, jax.process_index() == 0
    paths = [os.path.join(trainer.cfg.workdir, f"model{f'_seed{r}' if n > 1 else ''}.msgpack") for r in range(n)]
    for path, tree in zip(paths, _replicas(_state_tree(best_state), n)):
        if primary:  # one writer; every process holds the same replicated values
            checkpoints.export_variables(path, {"params": tree["params"], "batch_stats": tree["batch_stats"]})
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


def _compile(trainer: Trainer, state, train_arrays, keys, first_epoch: int, select_arrays):
    """Ahead-of-time compilation of the train step, and of evaluation by one pass, before the clock starts."""
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
        raise UserError(f"dataset {data.name} has no {cfg.select_split} split to select the best checkpoint on")
    if os.path.exists(cfg.workdir) and not os.path.isdir(cfg.workdir):
        raise UserError(f"--workdir {cfg.workdir} is a file, not a folder; choose another --workdir")
    try:
        os.makedirs(cfg.workdir, exist_ok=True)
    except OSError as e:
        raise UserError(f"--workdir {cfg.workdir} cannot be created ({e.strerror}); choose a writable folder") \
            from None
    lock = files.workdir_lock(cfg.workdir) if jax.process_index() == 0 else contextlib.nullcontext()
    with lock, native.kernels(cfg.kernels):  # read when the steps are traced, inside _train
        return _train(cfg, data, init_variables, dict(extra or {}, kernels=native.status()))


def _train(cfg: RunConfig, data, init_variables, extra) -> Dict[str, Any]:
    decision_lib.build(cfg, data)  # a decision the data cannot take stops the run before training
    _announce(cfg, data)
    trainer = Trainer(cfg, data, init_variables=init_variables)
    ckpt = checkpoints.Checkpointer(cfg.workdir)
    state, best_state, first_epoch, history, tracker, times = start_or_resume(trainer, ckpt)
    counts = param_counts.variables_counts({"params": _first_replica(state.params),
                                       "batch_stats": _first_replica(state.batch_stats)})
    keys, train_arrays = trainer.data_keys(), trainer.device_split("train")
    select_arrays = trainer.device_split(cfg.select_split)
    compiled, eval_compile_s = _compile(trainer, state, train_arrays, keys, first_epoch, select_arrays)
    step_timer, hook = timing.StepTimer(warmup=1), fault_hook()
    profile = timing.ProfileWindow(cfg.profile_dir, cfg.profile_start_step, cfg.profile_steps)
    times.start()
    best = {"state": best_state}  # the epoch loop keeps it current, also when it stops on a NaN
    loop = (trainer, ckpt, compiled, state, best, first_epoch, history, tracker, times, keys, train_arrays,
            select_arrays, step_timer, profile, hook)
    try:
        _epochs(*loop)
    except NonFiniteLossError as e:
        if not history:
            raise NonFiniteLossError(f"{e}; stopped before the first checkpoint, nothing was kept "
                                     f"(try a lower --learning_rate)") from None
        _finish(cfg, data, trainer, best["state"], counts, compiled, eval_compile_s, step_timer, times, history,
                tracker, select_arrays, extra)
        raise NonFiniteLossError(f"{e}; stopped: the {cfg.keep} checkpoint (epoch "
                                 f"{max(kept_epochs(cfg, tracker, len(history)))}) is kept in "
                                 f"{cfg.workdir} and model.msgpack/results.json were written from it (try a lower "
                                 f"--learning_rate)") from None
    return _finish(cfg, data, trainer, best["state"], counts, compiled, eval_compile_s, step_timer, times, history,
                   tracker, select_arrays, extra)


def _epochs(trainer: Trainer, ckpt, compiled, state, best: Dict[str, Any], first_epoch: int, history, tracker,
            times, keys, train_arrays, select_arrays, step_timer, profile, hook) -> None:
    """The epoch loop. ``best['state']``, ``history``, ``tracker`` and ``times`` are updated in place
    (a NonFiniteLossError leaves them at the last saved epoch)."""
    cfg = trainer.cfg
    tb = tensorboard.Writer(cfg.workdir, enabled=jax.process_index() == 0)
    with profile, tb:
        for epoch in range(first_epoch, cfg.epochs):
            if tracker.all_stopped:
                break
            t0, n_timed = time.perf_counter(), len(step_timer.durations)
            with progress.bar(trainer.steps_per_epoch, f"epoch {epoch + 1}/{cfg.epochs}") as bar:
                state, train_loss, train_acc = run_epoch(trainer, compiled, state, epoch, train_arrays, keys,
                                                         step_timer, profile, hook, bar)
            train_s = time.perf_counter() - t0
            selected = trainer.evaluate(state, select_arrays)
            times.epoch_s.append(time.perf_counter() - t0)
            select_loss = np.array([m["loss"] for m in selected])
            lrs = np.asarray(state.opt_state.hyperparams["learning_rate"], float)
            active = ~np.array(tracker.stopped)  # the replicas that trained this epoch
            improved, new_lrs = tracker.update(epoch + 1, select_loss, lrs)
            if cfg.lr_schedule == "constant":  # a schedule sets the rate itself, at every step
                state = _set_learning_rates(trainer, state, new_lrs)
            kept = improved if cfg.keep == "best" else active  # keep=last: the selected slot holds the last epoch
            if kept.any():
                best["state"] = _select(jnp.asarray(kept), state, best["state"])
            row = {"epoch": epoch + 1, "train_loss": train_loss.tolist(), "train_accuracy": train_acc.tolist(),
                   "select_loss": select_loss.tolist(), "select_accuracy": [m["accuracy"] for m in selected],
                   "learning_rate": new_lrs.tolist(), "train_s": train_s, "epoch_s": times.epoch_s[-1]}
            history.append(row)
            _save(ckpt, cfg, state, best["state"] if kept.any() else None, epoch, history, tracker, times)
            _print_epoch(cfg, row, trainer.steps_per_epoch, bool(improved.any()))
            tb.epoch((epoch + 1) * trainer.steps_per_epoch, tensorboard.epoch_scalars(
                row, selected, cfg.select_split, float(np.median(step_timer.durations[n_timed:])),
                trainer.steps_per_epoch * cfg.batch_size * cfg.num_seeds))


PREDICTIONS_FILE = "predictions.npz"


def write_predictions(path: str, predictions: Dict[str, Tuple[np.ndarray, np.ndarray]]) -> None:
    """``predictions.npz``: per split ``<split>_log_probs`` (R, N, C) float32 and ``<split>_labels`` (N,)."""
    arrays = {}
    for split, (lp, y) in predictions.items():
        arrays[f"{split}_log_probs"] = np.asarray(lp, np.float32)
        arrays[f"{split}_labels"] = np.asarray(y)
    files.atomic_write(path, lambda f: np.savez(f, **arrays))


def _finish(cfg: RunConfig, data, trainer: Trainer, best_state, counts, compiled, eval_compile_s, step_timer,
            times, history, tracker, select_arrays, extra) -> Dict[str, Any]:
    """Tests the best state, exports it and writes results.json, predictions.npz and the run's report."""
    decision = decision_lib.build(cfg, data)
    predictions = {cfg.select_split: trainer.log_probs(best_state, select_arrays)}
    if data.splits.get("test") and "test" not in predictions:
        predictions["test"] = trainer.log_probs(best_state, trainer.device_split("test"))
    per_replica = {split: [decision_lib.split_metrics(lp[r], y, decision) for r in range(trainer.num_seeds)]
                   for split, (lp, y) in predictions.items()}
    ensemble = ({split: decision_lib.split_metrics(metrics_lib.ensemble_log_probs(lp), y, decision)
                 for split, (lp, y) in predictions.items()} if trainer.num_seeds > 1 else {})
    outcome = report.RunOutcome(
        counts=counts, size_bytes=export_models(trainer, best_state), compiled=compiled,
        eval_compile_s=eval_compile_s, step_stats=step_timer.stats(), epoch_times=times.epoch_s,
        total_s=times.loop_s, checkpoint_s=times.checkpoint_s, history=history, best_epoch=tracker.best_epoch,
        select_metrics=per_replica[cfg.select_split], test_metrics=per_replica.get("test"),
        n_devices=trainer.n_devices, steps_per_epoch=trainer.steps_per_epoch, decision=decision,
        select_ensemble=ensemble.get(cfg.select_split), test_ensemble=ensemble.get("test"))
    epochs = kept_epochs(cfg, tracker, len(history))
    extra = dict(extra, kept_checkpoint=cfg.keep, kept_epoch=epochs if cfg.num_seeds > 1 else epochs[0])
    results = report.build_results(cfg, data, outcome, extra)
    if jax.process_index() == 0:
        write_predictions(os.path.join(cfg.workdir, PREDICTIONS_FILE), predictions)
    if jax.process_index() == 0:
        report.write_run(cfg.workdir, results, history, select_split=cfg.select_split,
                         title=cfg.experiment)
    print(f"wrote {os.path.join(cfg.workdir, 'results.json')}: {report.summary_line(results)}", flush=True)
    return results


def _save(ckpt, cfg: RunConfig, state, best_state, epoch: int, history, tracker: PlateauTracker,
          times: RunTimes) -> None:
    """The latest (and, when it improved, the best) checkpoint after ``epoch``, with the progress
    a resume needs: history, plateau tracker, the run's times so far and its settings."""
    t0 = time.perf_counter()
    times.tick()
    progress = {"epoch": epoch + 1, "history": history, "tracker": tracker.to_json(), "times": times.to_json(),
                "config": cfg.to_json()}
    step = int(np.asarray(state.step)[0])
    if best_state is not None:
        ckpt.save_selected(step, _state_tree(best_state), {"progress": progress})
    ckpt.save_latest(step, _state_tree(state), {"progress": progress})
    times.checkpoint_s += time.perf_counter() - t0
    times.tick()


def _announce(cfg: RunConfig, data) -> None:
    if data.synthetic:
        print("NOTE: training on SYNTHETIC data (random images); accuracy figures are meaningless.", flush=True)
    print(f"{cfg.experiment}: model {cfg.model} {cfg.model_kwargs}, dataset {data.name} "
          f"({'synthetic' if data.synthetic else data.source}), workdir {cfg.workdir}", flush=True)
    k = native.status()
    print(f"kernels: {k['kernels']} ({k['reason']})", flush=True)
