"""Scoring a finished run on external images (the `predict` experiment).

    p, y = predict.predict_npz("runs/a", "in.npz", "out.npz")   # every replica, averaged
    p, y = predict.predict_npz("runs/a", "in.npz", "out.npz", seed_index=1)   # one replica

A multi-seed run (``--num_seeds`` R) is scored as the ensemble of its R replicas: the mean of
their class probabilities. The predicted class follows the run's decision rule, results.json's
``decision`` entry: ``{"rule": "argmax" | "prior_corrected", "threshold": float | null,
"train_prior": [...], "model_prior": [...], "target_prior": [...] | null}``. With a threshold (binary
tasks) class 1 is predicted when p(class 1) > threshold; ``prior_corrected`` without one takes the
argmax of p(c) * target_prior(c) / model_prior(c) (a uniform target prior when it is null;
model_prior is the class balance the model's probabilities carry: uniform after a class-balanced
loss, else train_prior, which stands in for it in runs written before model_prior existed); a run
without the entry (older runs) uses the argmax. ``probabilities`` are written as the models
output them (averaged, not prior-corrected; after AdaBN and the temperature when those ran).

Test-time adaptation (:func:`adaptation_options`, :func:`adapted_probabilities`; each off unless
asked for or stored in the run's ``predict_defaults``): ``adapt_bn`` re-estimates every BatchNorm
layer's statistics on all the images of the call (:func:`lightflax.adapt.adapt_bn`);
``calibrate="temperature"`` divides the logits by the decision entry's validation-fitted
temperature (1 for runs without one) before any threshold; ``label_shift="em"`` replaces the
target prior by the EM estimate of the images' class prior (:func:`lightflax.adapt.em_prior`) and
decides by the prior correction to it. Fewer than :data:`lightflax.adapt.MIN_IMAGES` images: one
line says so and the unadapted rule is used.
"""

from __future__ import annotations

import json
import os
import sys
from typing import Any, Dict, Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from lightflax import adapt, checkpoints, decision as decision_lib, files, interrupts, metrics as metrics_lib, models
from lightflax.data.types import TINY
from lightflax.errors import CheckpointError, DataError, UserError


def load_replicas(workdir: str, seed_index: Optional[int] = None):
    """(module, [variables of each replica used], results, replica indices) of a finished run:
    every replica when ``seed_index`` is None, else that one."""
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
    if seed_index is not None and not 0 <= seed_index < n:
        raise UserError(f"--seed_index {seed_index} is out of range: the run trained {n} replica(s); use 0 to "
                        f"{n - 1}, or leave it out to average them all")
    decision_lib.read(results, path)  # a damaged decision entry stops here, before any work
    module = models.create(cfg["model"], num_classes=results["dataset"]["num_classes"], **model_kwargs)
    target = jax.eval_shape(lambda: module.init(jax.random.key(0), jnp.zeros((1, *input_shape)), train=False))
    indices = list(range(n)) if seed_index is None else [seed_index]
    variables = []
    for r in indices:
        name = (results.get("model_path") if n == 1 else None) or f"model{f'_seed{r}' if n > 1 else ''}.msgpack"
        variables.append(checkpoints.load_exported(os.path.join(workdir, name), target))
    return module, variables, results, indices


def _describe_rule(decision: Dict[str, Any]) -> str:
    if decision["threshold"] is not None:
        return f"{decision['rule']} (class 1 when p(class 1) > {decision['threshold']:.4g})"
    if decision["rule"] == "prior_corrected":
        return "prior_corrected (argmax of p * target prior / model prior)"
    return "argmax"


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


def _explained(explain: Optional[Dict[str, Any]]) -> str:
    if not explain:
        return ""
    where = f", overlays in {explain['explain_dir']}" if explain.get("explain_dir") else ""
    return f", heatmaps ({explain['method']}){where}"


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


def _warn_if_tiny(path: str, images: np.ndarray, results) -> None:
    """As training does for tiny image files: images with a side under 32 pixels (or under the run's
    own stored side, if smaller, e.g. 28 for PneumoniaMNIST) are scored, upscaled, with a warning."""
    stored = [int(d) for d in results["dataset"]["stored_shape"][:2]]
    limit = min([TINY, *stored])
    h, w = images.shape[1:3]
    if min(h, w) < limit:
        print(f"WARNING: {path}: images are {h}x{w} pixels, smaller than {limit}x{limit} (kept, upscaled to the "
              f"run's input; it trained on {stored[0]}x{stored[1]}); no real chest X-ray is that small",
              file=sys.stderr, flush=True)


def model_inputs(results, images: np.ndarray) -> np.ndarray:
    """What the run's model is fed for uint8 ``images``: the images themselves (grayscale when the
    run trained on 1-channel images and RGB came: ITU-R 601-2 luma rounded to uint8, Pillow's "L"),
    or for a transfer run the backbone's features of them (the expensive part; compute once and
    score every replica on them with :func:`probabilities_of_inputs`)."""
    stored_c = results["dataset"]["stored_shape"][-1]
    if images.shape[-1] == 3 and stored_c == 1:
        gray = images.astype(np.float32) @ np.array([0.299, 0.587, 0.114], np.float32)
        images = np.clip(np.round(gray), 0, 255).astype(np.uint8)[..., None]
    if results.get("backbone"):
        return _backbone_inputs(results, images)
    return images


def preprocess_fn(results):
    """uint8 images -> the run's model input (its own resize, channels and mean subtraction), jittable."""
    from lightflax.data import pipeline

    cfg = results["config"]
    size = cfg.get("eval_image_size") or cfg.get("image_size")
    mean = tuple(cfg["mean"]) if cfg.get("mean") else None
    return lambda x: pipeline.preprocess(x, out_size=size, channels=cfg["channels"], mean=mean)


def probability_fn(module, results):
    """The run's jitted ``(variables, inputs) -> (B, C) float32`` probabilities of
    :func:`model_inputs`' output (its own preprocessing included); build it once, call it often."""
    prep = None if results.get("backbone") else preprocess_fn(results)  # backbone outputs feed the head as they are

    @jax.jit
    def probs(v, x):
        x = x if prep is None else prep(x)
        return jax.nn.softmax(module.apply(v, x, train=False).astype(jnp.float32), axis=-1)

    return probs


def probabilities_of_inputs(module, variables, results, inputs: np.ndarray, batch_size: int = 64,
                            fn=None) -> np.ndarray:
    """(N, C) probabilities of :func:`model_inputs`' output under one model (``variables``), or the
    mean over several (a list); ``fn``: :func:`probability_fn`'s function, to reuse its compilation."""
    replicas = variables if isinstance(variables, list) else [variables]
    probs = fn or probability_fn(module, results)
    total = None
    for v in replicas:  # one compiled function for every replica (same shapes)
        out = []
        for start in range(0, len(inputs), batch_size):
            interrupts.check()
            chunk = inputs[start:start + batch_size]
            pad = batch_size - len(chunk)
            if pad:
                chunk = np.concatenate([chunk, np.repeat(chunk[-1:], pad, axis=0)])
            out.append(np.asarray(probs(v, chunk))[: batch_size - pad])
        p = np.concatenate(out).astype(np.float64)
        total = p if total is None else total + p
    return (total / len(replicas)).astype(np.float32)


def predict_probabilities(module, variables, results, images: np.ndarray, batch_size: int = 64) -> np.ndarray:
    """(N, C) probabilities of uint8 ``images`` under one model (``variables``), or the mean over
    several (a list)."""
    return probabilities_of_inputs(module, variables, results, model_inputs(results, images), batch_size)


def predict_npz(workdir: str, input_npz: str, output_npz: str, batch_size: int = 64,
                seed_index: Optional[int] = None, explain: Optional[Dict[str, Any]] = None,
                adapt_options: Optional[Dict[str, Any]] = None) -> Tuple[np.ndarray, np.ndarray]:
    """Writes ``probabilities`` (N, C) float32 and ``predictions`` (N,) int64 to ``output_npz``
    and prints one line; returns both. ``seed_index`` None: the mean over every replica.
    ``explain``: {"method", "patch", "stride", "explain_dir"} adds ``heatmaps`` (N, H, W) float32
    of the predicted classes (:func:`lightflax.explain.for_predict`). ``adapt_options``:
    {"adapt_bn", "label_shift", "calibrate"}, None values taken from the run's ``predict_defaults``
    (:func:`adaptation_options`)."""
    if not output_npz:
        raise UserError("--output_npz is required: where to write the probabilities")
    _check_output(output_npz)
    images = load_images(input_npz)
    module, variables, results, indices = load_replicas(workdir, seed_index)
    if explain:
        from lightflax import explain as explaining

        explaining.check_request(explain["method"], explain.get("patch"), explain.get("stride"), images.shape,
                                 results, module, explain.get("explain_dir"))
    _warn_if_tiny(input_npz, images, results)
    options = adaptation_options(results, adapt_options)
    p, decision, done = adapted_probabilities(module, variables, results, images, batch_size, options)
    y = decision_lib.apply(p, decision)
    arrays = {"probabilities": p, "predictions": y}
    if explain:
        arrays["heatmaps"] = explaining.for_predict(module, variables, results, images, p, y, explain["method"],
                                                    patch=explain.get("patch"), stride=explain.get("stride"),
                                                    explain_dir=explain.get("explain_dir"))
    try:
        files.atomic_write(output_npz, lambda f: np.savez(f, **arrays))
    except OSError as e:  # atomic_write leaves neither a temporary file nor a partial output
        raise UserError(f"--output_npz {output_npz} cannot be written ({e.strerror or e}); check free disk space "
                        f"and permissions") from None
    names = list(results["dataset"].get("class_names") or [])
    names = names if len(names) == p.shape[1] else [str(c) for c in range(p.shape[1])]
    counts = {names[c]: int(np.sum(y == c)) for c in range(p.shape[1])}
    models_used = (f"ensemble of {len(indices)} replicas" if seed_index is None and len(indices) > 1
                   else f"replica {indices[0]}")
    print(f"wrote {output_npz}: {len(y)} images, {models_used}, rule {_describe_rule(decision)}, "
          f"predicted class counts {counts}{_explained(explain)}{adapt.describe(done)}", flush=True)
    return p, y


ADAPT_DEFAULTS = {"adapt_bn": False, "label_shift": "none", "calibrate": "none"}
ADAPT_CHOICES = {"adapt_bn": (False, True), "label_shift": ("none", "em"), "calibrate": ("none", "temperature")}


def adaptation_options(results, given: Optional[Dict[str, Any]] = None, path: str = "results.json"
                       ) -> Dict[str, Any]:
    """{"adapt_bn", "label_shift", "calibrate"}: each given value (not None), else the run's stored
    ``predict_defaults`` (set by its recipe), else off (:data:`ADAPT_DEFAULTS`)."""
    stored = results.get("predict_defaults") or {}
    if not isinstance(stored, dict) or any(k not in ADAPT_CHOICES or v not in ADAPT_CHOICES[k]
                                           for k, v in stored.items()):
        raise UserError(f"{path}: its predict_defaults entry is damaged ({stored!r}); re-run the training or "
                        f"restore the file")
    out = dict(ADAPT_DEFAULTS, **stored)
    for key, value in (given or {}).items():
        if value is not None:
            if value not in ADAPT_CHOICES[key]:
                raise UserError(f"--{key} must be one of {', '.join(map(str, ADAPT_CHOICES[key]))}, got {value!r}")
            out[key] = value
    return out


def _adapt_bn(module, variables, results, inputs: np.ndarray, batch_size: int):
    """(variables of each replica with AdaBN statistics, the description) or (variables, None) with a
    one-line reason when it does not adapt."""
    if len(inputs) < adapt.MIN_IMAGES:
        print(f"--adapt_bn: {len(inputs)} images, fewer than {adapt.MIN_IMAGES}: BatchNorm statistics are not "
              f"re-estimated (the run's own are used); give at least {adapt.MIN_IMAGES} images to adapt", flush=True)
        return variables, None
    prep = None if results.get("backbone") else preprocess_fn(results)

    def apply_fn(v, x):
        return module.apply(v, x if prep is None else prep(x), train=False)

    adapted = [adapt.adapt_bn(apply_fn, v, inputs, batch_size) for v in variables]
    if adapted[0][1] == 0:
        print("--adapt_bn: the model has no BatchNorm layer: nothing to adapt", flush=True)
        return variables, None
    return [a[0] for a in adapted], f"AdaBN ({adapted[0][1]} BatchNorm layers, {len(inputs)} images)"


def _label_shift(p: np.ndarray, decision: Dict[str, Any]):
    """(the decision with the EM-estimated target prior, the description), or (decision, None) with a
    one-line reason when it does not adapt."""
    source = decision["model_prior"] if decision["model_prior"] is not None else decision["train_prior"]
    if len(p) < adapt.MIN_IMAGES:
        print(f"--label_shift=em: {len(p)} images, fewer than {adapt.MIN_IMAGES}: the class prior is not "
              f"re-estimated (the run's decision rule is used); give at least {adapt.MIN_IMAGES} images", flush=True)
        return decision, None
    if source is None:
        print("--label_shift=em: the run stored no class prior (its results.json has no decision entry): the "
              "class prior is not re-estimated; re-train to use it", flush=True)
        return decision, None
    q = np.clip(adapt.em_prior(p, source), 1e-6, None)
    q = q / q.sum()
    threshold = metrics_lib.prior_threshold(source, q) if len(q) == 2 else None
    out = dict(decision, rule="prior_corrected", target_prior=q, threshold=threshold)
    return out, f"EM label shift (prior {[round(float(v), 3) for v in q]})"


def adapted_probabilities(module, variables, results, images: np.ndarray, batch_size: int,
                          options: Dict[str, Any]):
    """(probabilities (N, C), the decision to apply, [descriptions of the adaptations that ran]):
    AdaBN, then the temperature, then EM on the calibrated probabilities."""
    decision, done = decision_lib.read(results), []
    inputs = model_inputs(results, images)
    if options["adapt_bn"]:
        variables, note = _adapt_bn(module, variables, results, inputs, batch_size)
        done += [note] if note else []
    p = probabilities_of_inputs(module, variables, results, inputs, batch_size)
    if options["calibrate"] == "temperature":
        t = decision["temperature"]
        p = adapt.temperature_scale(p, t).astype(np.float32)
        done.append(f"temperature {t:.4g}" + ("" if (results.get("decision") or {}).get("temperature") else
                                              " (the run stored none)"))
    if options["label_shift"] == "em":
        decision, note = _label_shift(p.astype(np.float64), decision)
        done += [note] if note else []
    return p, decision, done


def prediction_spread(workdir: str, n: int = 16, seed: int = 0) -> float:
    """How much a finished run's model (replica 0) tells inputs apart: the largest standard deviation,
    over the classes, of its probabilities on ``n`` random uint8 images of the run's stored shape.

    A network that is dead (constant logits; a K=1 LightLayers model can be dead at init, and stays
    dead: no gradient passes its ReLUs) gives 0. Checks that compare a resumed run with an
    uninterrupted one need a live model, else a wrong restore of the layers below the dead ReLU
    would go unnoticed; they require a spread above ~1e-6 (benchmarks/dead_init.py's threshold).
    """
    module, variables, results, _ = load_replicas(workdir, seed_index=0)
    shape = [int(d) for d in results["dataset"]["stored_shape"]]
    images = np.random.default_rng(seed).integers(0, 256, (n, *shape), dtype=np.uint8)
    probs = predict_probabilities(module, variables, results, images)
    return float(np.std(probs.astype(np.float64), axis=0).max())
