"""Scoring a saved model on external images (the `predict` experiment)."""

from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import numpy as np

from lightflax import checkpoints, files, models
from lightflax.errors import CheckpointError, DataError, UserError


def load_run(workdir: str, seed_index: int = 0):
    """(module, variables, results) of a finished run's best model."""
    if not workdir:
        raise UserError("--workdir is required: the directory of a finished training run")
    path = os.path.join(workdir, "results.json")
    if not os.path.isfile(path):
        raise UserError(f"{path} not found: --workdir must name a finished training run (it has results.json)")
    try:
        with open(path) as f:
            results = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"{path} is damaged ({e}); re-run the training or restore the file") from None
    try:
        cfg, n, input_shape, model_kwargs = _run_shape(results)
    except (KeyError, IndexError, TypeError, ValueError, AttributeError) as e:
        raise UserError(f"{path} does not have the shape of a lightflax results.json ({type(e).__name__}: {e}); "
                        f"re-run the training or restore the file") from None
    if seed_index >= n:
        raise UserError(f"--seed_index {seed_index} is out of range: the run trained {n} replica(s)")
    suffix = f"_seed{seed_index}" if n > 1 else ""
    module = models.create(cfg["model"], num_classes=results["dataset"]["num_classes"], **model_kwargs)
    target = jax.eval_shape(lambda: module.init(jax.random.key(0), jnp.zeros((1, *input_shape)), train=False))
    path = os.path.join(workdir, results.get("model_path") or f"model{suffix}.msgpack")
    variables = checkpoints.load_exported(path, target)
    return module, variables, results


def _run_shape(results):
    """(config, replicas, model input shape, model kwargs) of a results.json; KeyError/TypeError/...
    when it does not have the expected shape."""
    cfg, dataset = results["config"], results["dataset"]
    if not isinstance(cfg, dict) or not isinstance(dataset, dict) or not isinstance(cfg["model"], str):
        raise TypeError("'config' and 'dataset' must be objects and config.model a name")
    n = int(results.get("num_seeds", 1))
    int(dataset["num_classes"])
    stored = [int(d) for d in dataset["stored_shape"]]
    if results.get("backbone"):  # transfer run: the head (or tail) sees backbone outputs
        input_shape = tuple(stored)
    else:
        hw = int(cfg.get("image_size") or stored[0])
        input_shape = (hw, hw, int(cfg["channels"]))
    return cfg, n, input_shape, dict(cfg.get("model_kwargs") or {})


def _check_output(path: str) -> None:
    """--output_npz must be a file path in an existing, writable folder (checked before any work)."""
    if os.path.isdir(path):
        raise UserError(f"--output_npz {path} is a directory; give a file name such as {os.path.join(path, 'p.npz')}")
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise UserError(f"--output_npz {path}: the folder {folder} does not exist; create it first")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise UserError(f"--output_npz {path}: the folder {folder} is not writable; choose another path")


def _backbone_inputs(results, images: np.ndarray) -> np.ndarray:
    """Transfer runs: pooled features (head) or trunk activations (fine-tuned tail) of
    ``images``, computed by the run's own backbone and weights."""
    from lightflax import pretrained
    from lightflax.pretrained import features

    bb = pretrained.load(results["backbone"], path=results.get("backbone_weights_path"))
    want = results.get("backbone_weights_sha256")
    if want and bb.weights_sha256 != want:
        raise CheckpointError(f"the {results['backbone']} weights found ({bb.weights_path}) are not the ones this "
                              f"run used (sha256 {want[:12]}...); provide those weights with --pretrained_path")
    if results["config"]["model"] == "backbone_tail":
        bb = bb.trunk(int(results["config"]["model_kwargs"]["first_block"]))
    return features.compute(bb, images)


def load_images(path: str) -> np.ndarray:
    if not path:
        raise UserError("--input_npz is required: an npz file with an 'images' array")
    if not os.path.isfile(path):
        raise DataError(f"--input_npz {path} does not exist")
    try:
        with np.load(path) as z:
            if "images" not in z.files:
                raise DataError(f"{path} has no 'images' array (it has: {', '.join(z.files) or 'nothing'})")
            images = z["images"]
    except DataError:
        raise
    except Exception as e:  # zipfile/pickle errors of a damaged file
        raise DataError(f"{path} is not a readable npz file ({type(e).__name__}: {e})") from None
    if images.dtype != np.uint8:
        raise DataError(f"{path}: 'images' must be uint8 (0-255), got {images.dtype}")
    if images.ndim == 3:
        images = images[..., None]
    if images.ndim != 4 or images.shape[-1] not in (1, 3) or images.shape[0] == 0:
        raise DataError(f"{path}: 'images' must be (N,H,W) or (N,H,W,C) with C in (1, 3) and N >= 1, "
                        f"got shape {images.shape}")
    return images


def predict_probabilities(module, variables, results, images: np.ndarray, batch_size: int = 64) -> np.ndarray:
    from lightflax.data import pipeline

    cfg = results["config"]
    stored_c = results["dataset"]["stored_shape"][-1]
    if images.shape[-1] == 3 and stored_c == 1:
        # The run trained on grayscale: convert like Pillow's "L" (ITU-R 601-2).
        gray = images.astype(np.float32) @ np.array([0.299, 0.587, 0.114], np.float32)
        images = np.clip(np.round(gray), 0, 255).astype(np.uint8)[..., None]
    size = cfg.get("eval_image_size") or cfg.get("image_size")
    mean = tuple(cfg["mean"]) if cfg.get("mean") else None
    transfer = bool(results.get("backbone"))
    if transfer:
        images = _backbone_inputs(results, images)

    @jax.jit
    def probs(x):
        if not transfer:  # backbone outputs are already the head's inputs
            x = pipeline.preprocess(x, out_size=size, channels=cfg["channels"], mean=mean)
        return jax.nn.softmax(module.apply(variables, x, train=False).astype(jnp.float32), axis=-1)

    out = []
    for start in range(0, len(images), batch_size):
        chunk = images[start:start + batch_size]
        pad = batch_size - len(chunk)
        if pad:
            chunk = np.concatenate([chunk, np.repeat(chunk[-1:], pad, axis=0)])
        out.append(np.asarray(probs(chunk))[: batch_size - pad])
    return np.concatenate(out)


def predict_npz(workdir: str, input_npz: str, output_npz: str, batch_size: int = 64,
                seed_index: int = 0) -> np.ndarray:
    if not output_npz:
        raise UserError("--output_npz is required: where to write the probabilities")
    _check_output(output_npz)
    images = load_images(input_npz)
    module, variables, results = load_run(workdir, seed_index)
    p = predict_probabilities(module, variables, results, images, batch_size)
    try:
        files.atomic_write(output_npz, lambda f: np.savez(f, probabilities=p.astype(np.float32)))
    except OSError as e:  # atomic_write leaves neither a temporary file nor a partial output
        raise UserError(f"--output_npz {output_npz} cannot be written ({e.strerror or e}); check free disk space "
                        f"and permissions") from None
    print(f"wrote {output_npz}: probabilities {p.shape}", flush=True)
    return p
