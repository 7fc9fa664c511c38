"""Transfer learning with a frozen backbone: cached features + the shared trainer.

    results = transfer.run_transfer(data, cfg)   # cfg.transfer: the backbone and the stages (TransferConfig)

``cfg`` (a RunConfig) carries the protocol (epochs, batch, seeds, workdir); the
head and fine-tuning stages are trained with new configs derived from it by
``cfg.replace`` (model, workdir, learning rate), never by mutation.
"""

from __future__ import annotations

import dataclasses
import os
import sys
import time
from typing import Any, Dict, Optional

import numpy as np

from lightflax import files, report, param_counts, train
from lightflax.config import RunConfig
from lightflax.errors import UserError


def default_cache_dir() -> str:
    """Feature cache: $LIGHTFLAX_CACHE_DIR/features, else the user cache's lightflax/features."""
    return files.cache_dir("features")


def warn_ignored_flags(cfg: RunConfig) -> None:
    """One console line for settings a head on backbone outputs cannot use."""
    if cfg.eval_image_size:
        print(f"WARNING: --eval_image_size {cfg.eval_image_size} is ignored: the transfer head sees backbone "
              f"outputs computed at the backbone's own resolution", file=sys.stderr, flush=True)


def _on_features(cfg: RunConfig, **fields) -> RunConfig:
    """``cfg`` for a model fed with cached backbone outputs: no image preprocessing or augmentation."""
    kwargs = {"dropout": cfg.model_kwargs["dropout"]} if cfg.model_kwargs.get("dropout") else {}
    return cfg.replace(model_kwargs=kwargs, image_size=None, eval_image_size=None, mean=None,
                       augment="none", **fields)


def extract_features(bb, data, *, cache_dir: Optional[str] = None, backbone: str = "") -> tuple:
    """(DatasetSplits of feature vectors, seconds, per-split info) — cached on disk."""
    from lightflax.pretrained import features

    cache_dir = cache_dir or default_cache_dir()
    splits, info = {}, {}
    t0 = time.perf_counter()
    for name, split in data.splits.items():
        if split is None:
            splits[name] = None
            continue
        ts = time.perf_counter()
        feats = features.extract_cached(
            bb, split.images, cache_dir=cache_dir,
            key_parts={"backbone": backbone, "dataset": data.name, "source": str(getattr(data, "source", "")),
                       "synthetic": bool(data.synthetic), "split": name, "n": int(len(split.labels)),
                       "stored_shape": list(split.images.shape[1:])},
        )
        info[name] = {"seconds": time.perf_counter() - ts, "n": int(len(split.labels)),
                      "dim": int(feats.shape[-1])}
        splits[name] = dataclasses.replace(split, images=np.asarray(feats, np.float32))
    return dataclasses.replace(data, splits=splits), time.perf_counter() - t0, info


def _with_backbone(results: Dict[str, Any], bb, backbone: str, feature_s: float, info) -> Dict[str, Any]:
    """Stage 1's results with the frozen backbone counted in: parameters, size, feature-extraction time."""
    from flax import serialization

    bcounts = param_counts.variables_counts(bb.variables)
    backbone_bytes = len(serialization.to_bytes(bb.variables))
    results.update({
        "backbone": backbone,
        "backbone_params": bcounts["total"],
        "head_params": results["total_params"],
        "total_params": bcounts["total"] + results["total_params"],
        "trainable_params": results["trainable_params"],
        "non_trainable_params": bcounts["total"] + results["non_trainable_params"],
        "head_size_bytes": results["size_bytes"],
        "size_bytes": results["size_bytes"] + backbone_bytes,
        "feature_extraction_s": feature_s,
        "feature_splits": info,
        "backbone_weights_path": bb.weights_path,
        "backbone_weights_sha256": bb.weights_sha256,
        "head_total_time_s": results["total_time_s"],
        "total_time_s": results["total_time_s"] + feature_s,
    })
    results["notes"] = list(results.get("notes", [])) + [
        "transfer: backbone frozen; features computed once per split and cached "
        f"(feature extraction {feature_s:.1f} s, included in total_time_s; cache hits take ~0 s); "
        "size_bytes = backbone variables + head as msgpack"]
    return results


def run_transfer(data, cfg: RunConfig, *, extra: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
    """Stage 1: frozen backbone + linear head on cached features. With
    ``cfg.transfer.finetune_blocks`` = N > 0, stage 2 then unfreezes the backbone's last N
    blocks and trains them with the head at ``cfg.transfer.finetune_learning_rate`` for
    ``cfg.transfer.finetune_epochs``, fed with the cached activations of the frozen trunk.
    Stage 1 then lives in ``workdir/head``, stage 2 in ``workdir/finetune``, and
    ``workdir/results.json`` reports the final (stage-2) model. ``extra``: see
    ``train.train_and_evaluate``."""
    from lightflax import pretrained

    workdir, t = cfg.workdir, cfg.transfer
    if t is None:
        raise ValueError("run_transfer needs cfg.transfer (a TransferConfig)")
    warn_ignored_flags(cfg)
    bb = pretrained.load(t.backbone, path=t.pretrained_path, include_top=False)
    names = bb.block_names()
    if not 0 <= t.finetune_blocks < len(names):
        raise UserError(f"--finetune_blocks must be in 0..{len(names) - 1} for {t.backbone} (blocks, input to "
                        f"output: {', '.join(names)}), got {t.finetune_blocks}")
    if t.finetune_blocks and cfg.num_seeds != 1:
        raise UserError("--finetune_blocks needs --num_seeds=1 (every replica would start from one stage-1 head)")
    stage1_dir = os.path.join(workdir, "head") if t.finetune_blocks else workdir
    fdata, feature_s, info = extract_features(bb, data, cache_dir=t.cache_dir, backbone=t.backbone)
    results = train.train_and_evaluate(_on_features(cfg, model="linear_head", workdir=stage1_dir), fdata,
                                       extra=extra)
    results = _with_backbone(results, bb, t.backbone, feature_s, info)
    report.write_json(os.path.join(stage1_dir, "results.json"), results)
    if not t.finetune_blocks:
        return results
    stage2 = _on_features(cfg, workdir=os.path.join(workdir, "finetune"), epochs=t.finetune_epochs,
                          learning_rate=t.finetune_learning_rate)
    final = finetune(bb, data, stage1_dir, stage2, blocks=t.finetune_blocks, cache_dir=t.cache_dir, extra=extra)
    final["stage1"] = {k: results.get(k) for k in (
        "select_metrics", "test_metrics", "test_accuracy", "trainable_params", "total_time_s",
        "feature_extraction_s", "time_per_epoch_s", "best_epoch")}
    final["total_time_s"] = final["total_time_s"] + results["total_time_s"]
    final["model_path"] = os.path.join("finetune", "model.msgpack")  # relative to workdir (predict)
    final["notes"] = list(final.get("notes", [])) + [
        f"two-stage transfer: stage 1 (head on frozen features, {stage1_dir}) then stage 2 "
        f"(last {t.finetune_blocks} block(s) + head, lr {t.finetune_learning_rate:g}, {t.finetune_epochs} epochs); "
        "total_time_s covers both stages"]
    report.write_json(os.path.join(workdir, "results.json"), final)
    return final


def finetune(bb, data, stage1_dir: str, cfg: RunConfig, *, blocks: int, cache_dir: Optional[str] = None,
             extra: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
    """Stage 2: the last ``blocks`` blocks + stage 1's head, trained on cached trunk activations.

    The trunk (every block before the cut) stays frozen, so its output is
    computed once per split and cached like the pooled features; the backbone's
    BatchNorm stays in inference mode (Keras' fine-tuning recipe). ``cfg``: stage 2's
    protocol (workdir, epochs, learning rate); its model is set here."""
    import jax
    import jax.numpy as jnp

    from lightflax import checkpoints, models
    from flax import serialization

    names = bb.block_names()
    cut = len(names) - blocks
    trunk = bb.trunk(cut)
    adata, act_s, info = extract_features(trunk, data, cache_dir=cache_dir, backbone=bb.name)
    head_module = models.create("linear_head", num_classes=data.num_classes)
    target = jax.eval_shape(lambda: head_module.init(jax.random.key(0), jnp.zeros((1, bb.feature_dim)), train=False))
    head = checkpoints.load_exported(os.path.join(stage1_dir, "model.msgpack"), target)
    tail = set(names[cut:])
    init = {"params": {"backbone": {n: v for n, v in bb.variables["params"].items() if n in tail},
                       "head": head["params"]["head"]},
            "batch_stats": {"backbone": {n: v for n, v in bb.variables.get("batch_stats", {}).items() if n in tail}}}
    channels = int(adata.splits["train"].images.shape[-1])
    kwargs = dict(cfg.model_kwargs, backbone=bb.name, first_block=cut)
    cfg = cfg.replace(model="backbone_tail", model_kwargs=kwargs, channels=channels)
    results = train.train_and_evaluate(cfg, adata, init_variables=init, extra=extra)
    frozen = {c: {n: v for n, v in bb.variables.get(c, {}).items() if n not in tail} for c in ("params", "batch_stats")}
    fcounts = param_counts.variables_counts(frozen)
    frozen_bytes = len(serialization.to_bytes(frozen))
    results.update({
        "backbone": bb.name,
        "finetune_blocks": blocks,
        "backbone_weights_path": bb.weights_path,
        "backbone_weights_sha256": bb.weights_sha256,
        "finetuned_block_names": list(names[cut:]),
        "frozen_trunk_params": fcounts["total"],
        "total_params": fcounts["total"] + results["total_params"],
        "non_trainable_params": fcounts["total"] + results["non_trainable_params"],
        "size_bytes": frozen_bytes + results["size_bytes"],
        "trunk_activation_s": act_s,
        "trunk_activation_splits": info,
        "stage2_total_time_s": results["total_time_s"],
        "total_time_s": results["total_time_s"] + act_s,
    })
    results["notes"] = list(results.get("notes", [])) + [
        f"fine-tuning: trunk ({names[0]}..{names[cut - 1]}) frozen, its activations cached "
        f"({act_s:.1f} s); size_bytes = frozen trunk + tuned tail and head as msgpack"]
    report.write_json(os.path.join(cfg.workdir, "results.json"), results)
    return results
