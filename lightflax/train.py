"""The training loop shared by every experiment.

    results = train.train_and_evaluate(config, data)

One compiled train step (lightflax.steps, wrapped once by lightflax.parallel)
reads batches from the device-resident dataset; compilation is ahead-of-time
and timed apart; every step is synchronised before the clock is read; the
best checkpoint by validation loss and the latest are kept with Orbax and a
run resumes exactly (parameters, optimiser state, step, RNG, data order).
"""

from __future__ import annotations

import dataclasses
import math
import os
import signal
import time
from typing import Any, Dict, List, Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from lightflax import checkpoints, metrics as metrics_lib, models, parallel, report, steps, summary, timing
from lightflax.errors import UserError

Array = jax.Array


# Fault injection for the resume test: SIGKILL this process after that many
# training steps of the run (counting from step 0 of epoch 0).
_KILL_ENV = "LIGHTFLAX_FAULT_KILL_AFTER_STEP"


class NonFiniteLossError(RuntimeError):
    """Training produced a NaN/inf loss (the last good checkpoint is kept)."""


@dataclasses.dataclass
class RunConfig:
    """Everything a run needs besides the data. Defaults: the study's protocol."""

    workdir: str
    model: str
    model_kwargs: Dict[str, Any] = dataclasses.field(default_factory=dict)
    experiment: str = ""
    batch_size: int = 64
    epochs: int = 20
    learning_rate: float = 1e-3
    optimizer: str = "adam"
    l2: float = 0.0
    seed: int = 0
    num_seeds: int = 1
    replica_mode: str = "vmap"  # how --num_seeds replicas share a step: vmap or loop (steps.REPLICA_MODES)
    parallel: str = "shard_map"
    dtype: str = "float32"
    image_size: Optional[int] = None  # model input resolution; None = stored size
    channels: int = 3
    mean: Optional[Tuple[float, ...]] = None
    augment: Any = None  # AugmentConfig or None
    eval_image_size: Optional[int] = None
    select_split: str = "val"
    shuffle: bool = True  # False: every epoch in the stored order (the LightLayers paper's protocol)
    early_stopping_patience: int = 0  # 0 = off
    reduce_lr_patience: int = 0  # 0 = off
    reduce_lr_factor: float = 0.1
    steps_per_epoch: Optional[int] = None  # cap (smoke runs); None = full epochs
    profile_dir: Optional[str] = None
    profile_start_step: int = 3
    profile_steps: int = 3
    resume: bool = False
    flags: Dict[str, Any] = dataclasses.field(default_factory=dict)

    def validate(self) -> None:
        for name in ("batch_size", "epochs", "num_seeds", "channels"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise UserError(f"--{name} must be an integer >= 1, got {value!r}")
        if not self.learning_rate > 0:
            raise UserError(f"--learning_rate must be > 0, got {self.learning_rate!r}")
        if self.l2 < 0:
            raise UserError(f"--l2 must be >= 0, got {self.l2!r}")
        if self.dtype not in ("float32", "bfloat16"):
            raise UserError(f"--dtype must be float32 or bfloat16, got {self.dtype!r}")
        if self.replica_mode not in steps.REPLICA_MODES:
            raise UserError(f"--replica_mode must be one of {', '.join(steps.REPLICA_MODES)}, "
                            f"got {self.replica_mode!r}")
        if self.parallel not in parallel.MODES:
            raise UserError(f"--parallel must be one of {', '.join(parallel.MODES)}, got {self.parallel!r}")
        if self.select_split not in ("val", "test"):
            raise UserError(f"--select_split must be val or test, got {self.select_split!r}")
        for name in ("image_size", "eval_image_size", "steps_per_epoch"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value < 1):
                raise UserError(f"--{name} must be an integer >= 1, got {value!r}")


# ----------------------------------------------------------------------------
# Helpers
# ----------------------------------------------------------------------------


def _stack(trees: List[Any]) -> Any:
    return jax.tree_util.tree_map(lambda *xs: jnp.stack(xs), *trees)


def _unstack(tree: Any, n: int) -> List[Any]:
    return [jax.tree_util.tree_map(lambda a, i=i: a[i], tree) for i in range(n)]


def _as_replicas(x, num_seeds: int) -> np.ndarray:
    """Host array with a leading replica axis, also for num_seeds == 1."""
    x = np.asarray(x)
    return x[None] if num_seeds == 1 else x


def _select(mask: Array, new, old, num_seeds: int):
    """Per-replica choice between two (stacked) states."""
    if num_seeds == 1:
        return jax.tree_util.tree_map(lambda a, b: jnp.where(mask[0], a, b), new, old)

    def pick(a, b):
        m = mask.reshape((-1,) + (1,) * (a.ndim - 1))
        return jnp.where(m, a, b)

    return jax.tree_util.tree_map(pick, new, old)


def _check_model_input(model, cfg: RunConfig, stored_shape: Tuple[int, ...]) -> Tuple[int, ...]:
    """The model's input shape without the batch; clear errors for sizes it cannot take."""
    if len(stored_shape) == 1:  # feature vectors
        return tuple(stored_shape)
    h, w = (cfg.image_size, cfg.image_size) if cfg.image_size else tuple(stored_shape[:2])
    min_size = model.min_input_size()
    if min(h, w) < min_size:
        raise UserError(
            f"--image_size {h}x{w} is too small for {cfg.model}: it needs at least "
            f"{min_size}x{min_size}; pass --image_size={min_size} or larger"
        )
    if cfg.eval_image_size and cfg.eval_image_size < min_size:
        raise UserError(
            f"--eval_image_size {cfg.eval_image_size} is too small for {cfg.model}: it needs at least {min_size}"
        )
    return (h, w, cfg.channels)


def _state_tree(state: steps.TrainState) -> Dict[str, Any]:
    return {"step": state.step, "params": state.params, "batch_stats": state.batch_stats,
            "opt_state": state.opt_state}


def _from_tree(state: steps.TrainState, tree: Dict[str, Any]) -> steps.TrainState:
    return state.replace(step=tree["step"], params=tree["params"], batch_stats=tree["batch_stats"],
                         opt_state=tree["opt_state"])


# ----------------------------------------------------------------------------
# The run
# ----------------------------------------------------------------------------


class Trainer:
    """Builds the compiled steps for one run and drives epochs."""

    def __init__(self, cfg: RunConfig, data, init_variables=None, devices=None):
        cfg.validate()
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
            cfg.model, num_classes=data.num_classes, bn_axis_name=parallel.AXIS, dtype=dtype,
            **cfg.model_kwargs,
        )
        self.input_shape = _check_model_input(self.model, cfg, tuple(train.images.shape[1:]))
        self.step_cfg = steps.StepConfig(
            global_batch=cfg.batch_size,
            local_batch=self.local_batch,
            image_size=cfg.image_size,
            channels=cfg.channels,
            mean=cfg.mean,
            l2=cfg.l2,
            augment=cfg.augment,
            eval_image_size=cfg.eval_image_size,
        )
        self.steps_per_epoch = len(train.labels) // cfg.batch_size  # drop_remainder
        if cfg.steps_per_epoch:
            self.steps_per_epoch = min(self.steps_per_epoch, cfg.steps_per_epoch)
        self.tx = steps.make_optimizer(cfg.learning_rate, cfg.optimizer)
        self.num_seeds = cfg.num_seeds
        self._build()

    # -- construction ------------------------------------------------------

    def init_state(self):
        shape = (1, *self.input_shape)
        states = [
            steps.create_state(self.model, self.tx, jax.random.key(self.cfg.seed + r), shape,
                               init_variables=self.init_variables)
            for r in range(self.num_seeds)
        ]
        state = states[0] if self.num_seeds == 1 else _stack(states)
        return parallel.replicate(state, self.mesh)

    def _build(self):
        cfg, n = self.cfg, self.num_seeds
        rep = parallel.REPLICATED
        train_fn = steps.make_train_step(self.model, self.step_cfg)
        train_fn = steps.replicate_over_seeds(train_fn, n, in_axes=(0, None, None, 0, None, 0, None),
                                              mode=cfg.replica_mode)
        spe = self.steps_per_epoch
        sh = parallel.SHARDED
        self.dev_ids = parallel.device_ids(self.mesh)

        def per_device_train(state, images, labels, perm, key, dev_id):
            step_in_epoch = (state.step if n == 1 else state.step[0]) % spe
            return train_fn(state, images, labels, perm, step_in_epoch, key, dev_id)

        distributed = parallel.distribute(
            per_device_train, self.mesh, in_specs=(rep, rep, rep, rep, rep, sh), out_specs=(rep, rep),
            mode=cfg.parallel, donate_argnums=(0,),
        )
        self.train_step = lambda state, images, labels, perm, key: distributed(
            state, images, labels, perm, key, self.dev_ids)
        self.train_step_lower = lambda *a: distributed.lower(*a, self.dev_ids)
        eval_fn = steps.make_eval_step(self.model, self.step_cfg)
        eval_fn = steps.replicate_over_seeds(eval_fn, n, in_axes=(0, None, None, None, None),
                                             out_axes=(0, None, None), mode=cfg.replica_mode)
        spec_b = parallel.SHARDED
        # With replicas, log-probs are (replicas, batch, classes): shard axis 1.
        lp_spec = spec_b if n == 1 else jax.sharding.PartitionSpec(None, parallel.AXIS)
        eval_distributed = parallel.distribute(
            eval_fn, self.mesh, in_specs=(rep, rep, rep, rep, spec_b), out_specs=(lp_spec, spec_b, spec_b),
            mode=cfg.parallel if n == 1 else "shard_map",
        )
        self.eval_step = lambda state, images, labels, start: eval_distributed(
            state, images, labels, start, self.dev_ids)
        num_train = len(self.data.splits["train"].labels)

        shuffle = cfg.shuffle

        def permutations(keys, epoch):
            def one(key):
                if not shuffle:
                    return jnp.arange(num_train, dtype=jnp.int32)
                return jax.random.permutation(jax.random.fold_in(key, epoch), num_train).astype(jnp.int32)

            return one(keys) if n == 1 else jax.vmap(one)(keys)

        self.permutations = jax.jit(permutations)

    def lower(self, state, images, labels, perm, keys):
        """Ahead-of-time lowering of the train step (``timing.aot_compile(trainer, ...)``);
        the compiled step takes (state, images, labels, perm, keys, trainer.dev_ids)."""
        return self.train_step_lower(state, images, labels, perm, keys)

    def data_keys(self):
        keys = [jax.random.key(self.cfg.seed + r) for r in range(self.num_seeds)]
        keys = keys[0] if self.num_seeds == 1 else jnp.stack(keys)
        return parallel.replicate(keys, self.mesh)

    def device_split(self, split: str):
        s = self.data.splits[split]
        return parallel.replicate((np.asarray(s.images), np.asarray(s.labels, np.int32)), self.mesh)

    # -- evaluation ---------------------------------------------------------

    def evaluate(self, state, split_arrays) -> List[Dict[str, Optional[float]]]:
        images, labels = split_arrays
        n = images.shape[0]
        gb = self.cfg.batch_size
        lps, ys, ms = [], [], []
        for start in range(0, n, gb):
            lp, y, m = self.eval_step(state, images, labels, jnp.int32(start))
            lps.append(lp), ys.append(y), ms.append(m)
        if jax.process_count() > 1:  # sharded outputs span processes: gather them everywhere
            from jax.experimental import multihost_utils

            lps, ys, ms = multihost_utils.process_allgather((lps, ys, ms), tiled=True)
        y = np.concatenate([np.asarray(a) for a in ys])
        m = np.concatenate([np.asarray(a) for a in ms]).astype(bool)
        lp = np.concatenate([_as_replicas(a, self.num_seeds) for a in lps], axis=1)
        return [metrics_lib.classification_metrics(lp[r][m], y[m]) for r in range(self.num_seeds)]


def _metric_summary(per_replica: List[Optional[Dict[str, Any]]]) -> Dict[str, Any]:
    """Mean and sample standard deviation (ddof=1, as ``lightflax.tables``; 0 for one
    replica) over replicas for every numeric metric."""
    out: Dict[str, Any] = {}
    if not per_replica or per_replica[0] is None:
        return out
    for key in per_replica[0]:
        vals = [r[key] for r in per_replica if r.get(key) is not None]
        if len(vals) == len(per_replica):
            out[key] = float(np.mean(vals))
            out[key + "_std"] = float(np.std(vals, ddof=1)) if len(vals) > 1 else 0.0
    return out


def train_and_evaluate(cfg: RunConfig, data, init_variables=None) -> Dict[str, Any]:
    """Trains, selects the best checkpoint by validation loss, tests it, reports.

    ``init_variables``: start from these variables instead of a random
    initialisation (fine-tuning). Returns the results dict written to
    ``workdir/results.json``.
    """
    os.makedirs(cfg.workdir, exist_ok=True)
    trainer = Trainer(cfg, data, init_variables=init_variables)
    n = trainer.num_seeds
    ckpt = checkpoints.Checkpointer(cfg.workdir)
    state = trainer.init_state()
    counts = summary.variables_counts(
        {"params": _unstack(state.params, n)[0] if n > 1 else state.params,
         "batch_stats": _unstack(state.batch_stats, n)[0] if n > 1 else state.batch_stats}
    )
    best_state = jax.tree_util.tree_map(jnp.copy, state)  # the step donates `state`
    keys = trainer.data_keys()
    images, labels = trainer.device_split("train")
    select = cfg.select_split
    if data.splits.get(select) is None:
        raise UserError(f"dataset {data.name} has no {select} split to select the best checkpoint on")
    sel_arrays = trainer.device_split(select)

    # Bookkeeping that a resume restores.
    book: Dict[str, Any] = {
        "epoch": 0,
        "history": [],
        "best_val_loss": [math.inf] * n,
        "best_epoch": [0] * n,
        "since_best": [0] * n,
        "since_lr_change": [0] * n,
        "stopped": [False] * n,
    }
    latest = ckpt.latest_step()
    if latest is not None and not cfg.resume:
        raise UserError(
            f"--workdir {cfg.workdir} already holds a run (checkpoint at step {latest}); pass --resume "
            f"to continue it or choose another --workdir"
        )
    if cfg.resume and latest is not None:
        restored, meta = ckpt.restore_latest(_state_tree(state))
        state = parallel.replicate(_from_tree(state, restored), trainer.mesh)
        book = meta["book"]
        best = ckpt.restore_best(_state_tree(state))
        best_state = (parallel.replicate(_from_tree(state, best[0]), trainer.mesh) if best
                      else jax.tree_util.tree_map(jnp.copy, state))
        logging.info("resumed from step %d (epoch %d)", latest, book["epoch"])
        print(f"resumed {cfg.workdir} at epoch {book['epoch']} (step {latest})", flush=True)

    # Ahead-of-time compilation, timed apart from execution.
    perm = trainer.permutations(keys, jnp.int32(book["epoch"]))
    compiled = timing.aot_compile(trainer, state, images, labels, perm, keys)
    print(
        f"compiled train step in {compiled.compile_s:.2f} s (lowering {compiled.lower_s:.2f} s); "
        f"{(compiled.flops or 0) * trainer.n_devices / 1e9:.3f} GFLOP/step; {trainer.n_devices} device(s), "
        f"{trainer.steps_per_epoch} steps/epoch of {cfg.batch_size}",
        flush=True,
    )
    # Compile the evaluation step before the clock starts (one pass over the
    # selection split), so epoch times hold no compilation.
    t_eval = time.perf_counter()
    trainer.evaluate(state, sel_arrays)
    eval_compile_s = time.perf_counter() - t_eval
    step_timer = timing.StepTimer(warmup=1)
    profile = timing.ProfileWindow(cfg.profile_dir, cfg.profile_start_step, cfg.profile_steps)
    epoch_times: List[float] = []
    kill_after = int(os.environ[_KILL_ENV]) if os.environ.get(_KILL_ENV) else None
    checkpoint_s = 0.0
    run_start = time.perf_counter()
    try:
        for epoch in range(book["epoch"], cfg.epochs):
            if all(book["stopped"]):
                break
            t0 = time.perf_counter()
            perm = timing.sync(trainer.permutations(keys, jnp.int32(epoch)))
            step_metrics = []
            for i in range(trainer.steps_per_epoch):
                global_step = epoch * trainer.steps_per_epoch + i
                with profile.step(global_step):
                    state, m = step_timer.run(compiled.compiled, state, images, labels, perm, keys,
                                              trainer.dev_ids)
                step_metrics.append(m)
                if kill_after is not None and global_step + 1 == kill_after:
                    os.kill(os.getpid(), signal.SIGKILL)
            train_loss = _as_replicas(np.mean(np.stack([np.asarray(m["loss"]) for m in step_metrics]), axis=0), n)
            train_acc = _as_replicas(np.mean(np.stack([np.asarray(m["accuracy"]) for m in step_metrics]), axis=0), n)
            train_s = time.perf_counter() - t0
            if not np.all(np.isfinite(train_loss)):
                raise NonFiniteLossError(
                    f"non-finite training loss {train_loss.tolist()} in epoch {epoch + 1}; stopped, the last good "
                    f"checkpoint in {cfg.workdir} is kept (try a lower --learning_rate)"
                )
            val = trainer.evaluate(state, sel_arrays)
            epoch_s = time.perf_counter() - t0
            epoch_times.append(epoch_s)
            val_loss = np.array([v["loss"] for v in val])
            improved = val_loss < np.array(book["best_val_loss"])
            improved &= ~np.array(book["stopped"])
            lrs = _as_replicas(state.opt_state.hyperparams["learning_rate"], n).astype(float)
            for r in range(n):
                if book["stopped"][r]:
                    continue
                if improved[r]:
                    book["best_val_loss"][r] = float(val_loss[r])
                    book["best_epoch"][r] = epoch + 1
                    book["since_best"][r] = 0
                    book["since_lr_change"][r] = 0
                else:
                    book["since_best"][r] += 1
                    book["since_lr_change"][r] += 1
                    if cfg.reduce_lr_patience and book["since_lr_change"][r] >= cfg.reduce_lr_patience:
                        lrs[r] *= cfg.reduce_lr_factor
                        book["since_lr_change"][r] = 0
                    if cfg.early_stopping_patience and book["since_best"][r] >= cfg.early_stopping_patience:
                        book["stopped"][r] = True
            new_lr = jnp.asarray(lrs[0] if n == 1 else lrs, jnp.float32)
            hyper = dict(state.opt_state.hyperparams, learning_rate=parallel.replicate(new_lr, trainer.mesh))
            state = state.replace(opt_state=state.opt_state._replace(hyperparams=hyper))
            if improved.any():
                best_state = _select(jnp.asarray(improved), state, best_state, n)
            row = {
                "epoch": epoch + 1,
                "train_loss": train_loss.tolist(),
                "train_accuracy": train_acc.tolist(),
                "val_loss": val_loss.tolist(),
                "val_accuracy": [v["accuracy"] for v in val],
                "learning_rate": lrs.tolist(),
                "train_s": train_s,
                "epoch_s": epoch_s,
            }
            book["history"].append(row)
            book["epoch"] = epoch + 1
            step = int(np.asarray(state.step).reshape(-1)[0])
            t_ckpt = time.perf_counter()
            if improved.any():
                ckpt.save_best(step, _state_tree(best_state), {"book": book})
            ckpt.save_latest(step, _state_tree(state), {"book": book})
            checkpoint_s += time.perf_counter() - t_ckpt
            sps = trainer.steps_per_epoch / train_s
            print(
                f"epoch {epoch + 1}/{cfg.epochs}  {sps:.2f} steps/s  "
                f"loss {np.mean(train_loss):.4f}  acc {np.mean(train_acc):.4f}  "
                f"{select}_loss {np.mean(val_loss):.4f}  {select}_acc {np.mean(row['val_accuracy']):.4f}  "
                f"{epoch_s:.2f} s" + ("  *" if improved.any() else ""),
                flush=True,
            )
    finally:
        profile.close()
    total_s = time.perf_counter() - run_start

    # The best checkpoint (by validation loss), tested at the end.
    test_split = data.splits.get("test")
    test = trainer.evaluate(best_state, trainer.device_split("test")) if test_split is not None else None
    best_val = trainer.evaluate(best_state, sel_arrays)
    size_bytes = []
    primary = jax.process_index() == 0
    for r, tree in enumerate(_unstack(_state_tree(best_state), n) if n > 1 else [_state_tree(best_state)]):
        path = os.path.join(cfg.workdir, f"model{f'_seed{r}' if n > 1 else ''}.msgpack")
        if primary:  # one writer; every process holds the same replicated values
            checkpoints.export_variables(path, {"params": tree["params"], "batch_stats": tree["batch_stats"]})
        size_bytes.append(path)
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices("lightflax:export")
    size_bytes = [os.path.getsize(p) for p in size_bytes]
    step_stats = step_timer.stats()
    results = report.build_results(
        cfg=cfg,
        data=data,
        counts=counts,
        size_bytes=size_bytes,
        compiled=compiled,
        eval_compile_s=eval_compile_s,
        step_stats=step_stats,
        epoch_times=epoch_times,
        total_s=total_s,
        checkpoint_s=checkpoint_s,
        history=book["history"],
        best_epoch=book["best_epoch"],
        select_metrics=best_val,
        test_metrics=test,
        n_devices=trainer.n_devices,
        steps_per_epoch=trainer.steps_per_epoch,
        summarize=_metric_summary,
    )
    if primary:
        report.write_run(cfg.workdir, results, book["history"], title=f"{cfg.experiment} ({cfg.model})")
    return results
