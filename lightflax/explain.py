"""What a model looks at: occlusion and Grad-CAM heatmaps, the deletion test, overlay figures.

    maps = explain.occlusion(prob_fn, images)                 # (N, H, W) float32, any model
    maps = explain.gradcam(module, [variables], prep, images)  # conv models of the zoo
    maps = explain.explain_run(module, variables, results, images, "gradcam")   # a finished run
    figures = explain.deletion_test(prob_fn, images, maps)    # faithfulness of the maps

``images`` are uint8 (N, H, W, C) as predict reads them; every map is (N, H, W) float32 at that
resolution, larger = more important for the explained class (the predicted one unless
``classes`` says otherwise).

* occlusion (Zeiler & Fergus 2014; Kermany et al. 2018's figures): a ``patch`` x ``patch``
  square slides with ``stride`` over the image and is filled with the image's mean (per channel,
  rounded to uint8); a pixel's value is the mean drop of the class probability over the patches
  covering it. All patches of all images go through the model in a few fixed-size jitted batches.
  Defaults: patch = round(min(H, W) / 7), stride = patch // 2 (both at least 1).
* gradcam (Selvaraju et al. 2017) on the last convolutional block's output before global
  pooling (the input of the zoo models' ``classify``, captured with ``nn.intercept_methods``, no
  model change): ReLU(sum_k mean_hw(d logit_c / d A_k) * A_k), bilinearly upsampled to (H, W).
  Values are in logit units (not normalised); the replicas of a multi-seed run are averaged.
"""

from __future__ import annotations

import os
from typing import Callable, Dict, List, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from lightflax.errors import UserError

METHODS = ("occlusion", "gradcam")
# occluded images per model call (one compiled shape): bounded by pixels so large images stay small
_BATCH_PIXELS = 1 << 20


class ExplainError(UserError):
    """An explanation that cannot be computed as asked (one line; launch.py exits 2)."""


def check_method(method: str) -> str:
    if method not in METHODS:
        raise ExplainError(f"--explain={method!r} is not a known method; use one of: {', '.join(METHODS)}")
    return method


def default_patch(height: int, width: int) -> int:
    """The occlusion patch side for an image: about a seventh of its smaller side."""
    return max(1, int(round(min(height, width) / 7)))


def patch_and_stride(height: int, width: int, patch: Optional[int] = None,
                     stride: Optional[int] = None) -> tuple:
    """(patch, stride) with the defaults filled in, checked against the image size."""
    patch = default_patch(height, width) if patch is None else int(patch)
    stride = max(1, patch // 2) if stride is None else int(stride)
    if patch < 1 or stride < 1:
        raise ExplainError(f"--explain_patch ({patch}) and --explain_stride ({stride}) must be >= 1")
    if patch > min(height, width):
        raise ExplainError(f"--explain_patch {patch} is larger than the images ({height}x{width}); use at most "
                           f"{min(height, width)} (default for this size: {default_patch(height, width)})")
    return patch, stride


def _origins(size: int, patch: int, stride: int) -> List[int]:
    """Patch starts along one axis: every ``stride``, plus one flush with the far edge."""
    starts = list(range(0, size - patch + 1, stride))
    if starts[-1] != size - patch:
        starts.append(size - patch)
    return starts


def occlusion_masks(height: int, width: int, patch: int, stride: int) -> np.ndarray:
    """(P, H, W) bool: one mask per patch position, row-major."""
    rows, cols = _origins(height, patch, stride), _origins(width, patch, stride)
    masks = np.zeros((len(rows) * len(cols), height, width), bool)
    for i, (r, c) in enumerate((r, c) for r in rows for c in cols):
        masks[i, r:r + patch, c:c + patch] = True
    return masks


def mean_fill(images: np.ndarray) -> np.ndarray:
    """(N, 1, 1, C) uint8: each image's per-channel mean, rounded (the occlusion/deletion fill)."""
    return np.round(images.astype(np.float64).mean(axis=(1, 2), keepdims=True)).astype(np.uint8)


def _class_of(probs: np.ndarray, classes: Optional[np.ndarray]) -> np.ndarray:
    return np.argmax(probs, axis=1) if classes is None else np.asarray(classes, np.int64)


def _checked_images(images: np.ndarray) -> np.ndarray:
    images = np.asarray(images)
    if images.ndim != 4 or images.dtype != np.uint8 or images.shape[0] == 0:
        raise ExplainError(f"explanations need uint8 images (N, H, W, C) with N >= 1, got {images.dtype} "
                           f"{images.shape}")
    return images


def occlusion(prob_fn: Callable[[np.ndarray], np.ndarray], images: np.ndarray, *, patch: Optional[int] = None,
              stride: Optional[int] = None, classes: Optional[np.ndarray] = None) -> np.ndarray:
    """(N, H, W) float32 occlusion maps; ``prob_fn``: uint8 (B, H, W, C) -> (B, C) probabilities."""
    images = _checked_images(images)
    n, h, w, _ = images.shape
    patch, stride = patch_and_stride(h, w, patch, stride)
    masks = occlusion_masks(h, w, patch, stride)
    base = np.asarray(prob_fn(images), np.float64)
    cls = _class_of(base, classes)
    fill = mean_fill(images)
    per_call = max(1, (64 * _BATCH_PIXELS) // (len(masks) * h * w))  # images per prob_fn call (<= 64 MPx)
    drops = np.zeros((n, len(masks)), np.float64)
    for s in range(0, n, per_call):
        block = images[s:s + per_call]
        occluded = np.where(masks[None, :, :, :, None], fill[s:s + per_call, None], block[:, None])
        p = np.asarray(prob_fn(occluded.reshape(-1, h, w, images.shape[3])), np.float64)
        p = p.reshape(len(block), len(masks), -1)
        rows = np.arange(len(block))
        drops[s:s + len(block)] = base[s + rows, cls[s:s + len(block)]][:, None] - p[rows, :, cls[s:s + len(block)]]
    flat = masks.reshape(len(masks), h * w).astype(np.float64)
    maps = (drops @ flat) / np.maximum(flat.sum(0), 1.0)
    return maps.reshape(n, h, w).astype(np.float32)


def _capture_classify_input(delta=None):
    """An interceptor (and its store) that records the input of the zoo models' ``classify``
    (the last block's feature map, before global pooling), adding ``delta`` to it when given."""
    store = {}

    def interceptor(next_fun, args, kwargs, context):
        if context.method_name == "classify" and args:
            store["features"] = args[0]
            if delta is not None:
                args = (args[0] + delta.astype(args[0].dtype),) + tuple(args[1:])
        return next_fun(*args, **kwargs)

    return interceptor, store


def _feature_shape(module, variables, x) -> tuple:
    def run(v, x):
        interceptor, store = _capture_classify_input()
        with nn.intercept_methods(interceptor):
            module.apply(v, x, train=False)
        return store.get("features")

    try:
        feats = jax.eval_shape(run, variables, x)
    except ValueError:  # a model that does not take images (a head on backbone features)
        feats = None
    if feats is None or len(feats.shape) != 4:
        raise ExplainError(f"--explain=gradcam needs a model with convolutional layers on the image; "
                           f"{getattr(module, 'model_name', type(module).__name__)} has none; use "
                           f"--explain=occlusion")
    return tuple(feats.shape)


def _cam_fn(module, preprocess: Callable, out_hw: tuple):
    """jitted (variables, uint8 images, classes) -> (B, H, W) Grad-CAM maps."""

    def logit_sum(delta, v, x, classes):
        interceptor, store = _capture_classify_input(delta)
        with nn.intercept_methods(interceptor):
            logits = module.apply(v, x, train=False).astype(jnp.float32)
        return jnp.sum(jnp.take_along_axis(logits, classes[:, None], axis=1)), store["features"]

    @jax.jit
    def cam(v, images, classes):
        x = preprocess(images)
        interceptor, store = _capture_classify_input()
        with nn.intercept_methods(interceptor):
            module.apply(v, x, train=False)
        zero = jnp.zeros(store["features"].shape, jnp.float32)
        grads, feats = jax.grad(logit_sum, has_aux=True)(zero, v, x, classes)
        weights = jnp.mean(grads, axis=(1, 2), keepdims=True)  # alpha_k
        maps = jax.nn.relu(jnp.sum(weights * feats.astype(jnp.float32), axis=-1))
        return jax.image.resize(maps, (maps.shape[0], *out_hw), method="bilinear")

    return cam


def gradcam(module, variables: Sequence, preprocess: Callable, images: np.ndarray, *,
            classes: Optional[np.ndarray] = None, prob_fn: Optional[Callable] = None,
            batch_size: int = 64) -> np.ndarray:
    """(N, H, W) float32 Grad-CAM maps of ``module`` (the mean over ``variables``' replicas);
    ``preprocess``: uint8 images -> the model's input (jittable); the explained class is
    ``classes``, else the argmax of ``prob_fn(images)`` (required then)."""
    images = _checked_images(images)
    n, h, w, _ = images.shape
    _feature_shape(module, variables[0], jax.eval_shape(preprocess, jax.ShapeDtypeStruct((1, h, w, images.shape[3]),
                                                                                       jnp.uint8)))
    if classes is None:
        if prob_fn is None:
            raise ValueError("gradcam needs classes or prob_fn")
        classes = np.argmax(np.asarray(prob_fn(images)), axis=1)
    classes = np.asarray(classes, np.int32)
    cam = _cam_fn(module, preprocess, (h, w))
    total = np.zeros((n, h, w), np.float64)
    for v in variables:
        for s in range(0, n, batch_size):
            chunk, cls = images[s:s + batch_size], classes[s:s + batch_size]
            pad = batch_size - len(chunk) if n > batch_size else 0
            if pad:  # one compiled shape for every chunk
                chunk, cls = np.concatenate([chunk, chunk[-1:].repeat(pad, 0)]), np.pad(cls, (0, pad), mode="edge")
            total[s:s + batch_size] += np.asarray(cam(v, chunk, cls))[:len(chunk) - pad]
    return (total / len(variables)).astype(np.float32)


# ----------------------------------------------------------------------------
# a finished run (predict, xray_compare)
# ----------------------------------------------------------------------------


def run_prob_fn(module, variables: Sequence, results) -> Callable[[np.ndarray], np.ndarray]:
    """uint8 images -> (B, C) probabilities of a finished run (replicas averaged), compiled once;
    a transfer run's images go through its backbone first."""
    from lightflax import predict

    fn = predict.probability_fn(module, results)

    def prob_fn(images):
        h, w = images.shape[1:3]
        batch = int(np.clip(_BATCH_PIXELS // (h * w), 16, 2048))
        batch = min(batch, len(images))  # small calls: no padding to a large batch
        inputs = predict.model_inputs(results, images)
        return predict.probabilities_of_inputs(module, list(variables), results, inputs, batch, fn=fn)

    return prob_fn


def explain_run(module, variables, results, images: np.ndarray, method: str, *, patch: Optional[int] = None,
                stride: Optional[int] = None, classes: Optional[np.ndarray] = None) -> np.ndarray:
    """(N, H, W) float32 maps of a finished run (:func:`lightflax.predict.load_replicas`) for uint8
    ``images`` as predict reads them; ``classes``: the class explained per image (default argmax)."""
    from lightflax import predict

    check_method(method)
    variables = variables if isinstance(variables, list) else [variables]
    images = _checked_images(images)
    if method == "occlusion":
        return occlusion(run_prob_fn(module, variables, results), images, patch=patch, stride=stride,
                         classes=classes)
    if results.get("backbone"):
        raise ExplainError(f"--explain=gradcam needs a model with convolutional layers on the image; this "
                           f"transfer run's {results['config']['model']} sees {results['backbone']} features; use "
                           f"--explain=occlusion")
    prob_fn = None if classes is not None else run_prob_fn(module, variables, results)
    return gradcam(module, variables, predict.preprocess_fn(results), _model_channels(results, images),
                   classes=classes, prob_fn=prob_fn)


def _model_channels(results, images: np.ndarray) -> np.ndarray:
    """RGB images for a run trained on grey ones: predict's luma conversion (model_inputs)."""
    from lightflax import predict

    return images if results.get("backbone") else predict.model_inputs(results, images)


def check_request(method: str, patch: Optional[int], stride: Optional[int], image_shape: Sequence[int],
                  results, module, explain_dir: Optional[str] = None) -> None:
    """predict's --explain flags checked before any work: the method, the patch against the images'
    size, gradcam against the model, --explain_dir creatable."""
    check_method(method)
    if method == "occlusion":
        patch_and_stride(int(image_shape[1]), int(image_shape[2]), patch, stride)
    elif patch is not None or stride is not None:
        raise ExplainError("--explain_patch and --explain_stride apply to --explain=occlusion only; drop them "
                           "for gradcam")
    elif results.get("backbone") or not hasattr(module, "classify"):
        what = f"this transfer run's head sees {results['backbone']} features" if results.get("backbone") else \
            f"{results['config']['model']} has none"
        raise ExplainError(f"--explain=gradcam needs a model with convolutional layers on the image; {what}; use "
                           f"--explain=occlusion")
    if explain_dir:
        try:
            os.makedirs(explain_dir, exist_ok=True)
        except OSError as e:
            raise ExplainError(f"--explain_dir {explain_dir} cannot be created ({e.strerror or e}); choose "
                               f"another folder") from None
        if not os.access(explain_dir, os.W_OK | os.X_OK):
            raise ExplainError(f"--explain_dir {explain_dir} is not writable; choose another folder")


def for_predict(module, variables, results, images: np.ndarray, probabilities: np.ndarray,
                predictions: np.ndarray, method: str, *, patch: Optional[int] = None,
                stride: Optional[int] = None, explain_dir: Optional[str] = None) -> np.ndarray:
    """predict's heatmaps of the predicted classes, and with ``explain_dir`` one overlay PNG per
    image titled with the predicted class and its probability."""
    maps = explain_run(module, variables, results, images, method, patch=patch, stride=stride,
                       classes=predictions)
    if explain_dir:
        names = list(results["dataset"].get("class_names") or [])
        names = names if len(names) == probabilities.shape[1] else [str(c) for c in range(probabilities.shape[1])]
        titles = [f"{i}: {names[c]} p={probabilities[i, c]:.3f} ({method})" for i, c in enumerate(predictions)]
        overlay_pngs(explain_dir, images, maps, titles)
    return maps


# ----------------------------------------------------------------------------
# faithfulness: the deletion test
# ----------------------------------------------------------------------------


def _delete(images: np.ndarray, order: np.ndarray, count: int) -> np.ndarray:
    """Images with the pixels ``order[:, :count]`` (flat H*W indices) set to the image's mean."""
    n, h, w, c = images.shape
    mask = np.zeros((n, h * w), bool)
    np.put_along_axis(mask, order[:, :count], True, axis=1)
    return np.where(mask.reshape(n, h, w, 1), mean_fill(images), images)


def deletion_test(prob_fn: Callable[[np.ndarray], np.ndarray], images: np.ndarray, maps: np.ndarray, *,
                  fraction: float = 0.2, draws: int = 5, seed: int = 0,
                  classes: Optional[np.ndarray] = None) -> Dict[str, float]:
    """Replaces the ``fraction`` of pixels ``maps`` rank highest with each image's mean, then the
    ``fraction`` they rank lowest, then ``draws`` times a random ``fraction``; returns the mean drop
    of the explained class's probability: ``map_drop``, ``lowest_drop``, ``random_drop`` (mean over
    draws), ``random_std`` (std over the draws' means), ``random_draws``, ``images``, ``base``."""
    images = _checked_images(images)
    n, h, w, _ = images.shape
    if maps.shape != (n, h, w):
        raise ValueError(f"maps {maps.shape} do not match images {images.shape[:3]}")
    count = int(round(fraction * h * w))
    base = np.asarray(prob_fn(images), np.float64)
    cls = _class_of(base, classes)
    p0 = base[np.arange(n), cls]
    order = np.argsort(-maps.reshape(n, -1), axis=1, kind="stable")
    rng = np.random.default_rng(seed)
    orders = [order, order[:, ::-1]] + [np.argsort(rng.random((n, h * w)), axis=1) for _ in range(draws)]
    batch = np.concatenate([_delete(images, o, count) for o in orders])
    p = np.asarray(prob_fn(batch), np.float64).reshape(len(orders), n, -1)[:, np.arange(n), cls]
    drops = (p0[None] - p).mean(axis=1)  # (2 + draws,)
    return {"map_drop": float(drops[0]), "lowest_drop": float(drops[1]), "random_drop": float(drops[2:].mean()),
            "random_std": float(drops[2:].std(ddof=1)) if draws > 1 else 0.0,
            "random_draws": [float(d) for d in drops[2:]], "images": n, "base": float(p0.mean())}


# ----------------------------------------------------------------------------
# figures: one overlay per image (predict --explain_dir), the comparison's grid
# ----------------------------------------------------------------------------


def _show(ax, image: np.ndarray, heatmap: Optional[np.ndarray], title: str) -> None:
    grey = image.astype(np.float32).mean(axis=-1) if image.ndim == 3 else image
    ax.imshow(grey, cmap="gray", vmin=0, vmax=255)
    if heatmap is not None:  # scaled to its maximum; negative values (occlusion) clipped
        top = float(np.max(np.abs(heatmap))) or 1.0
        norm = np.clip(heatmap / top, 0.0, 1.0)  # opacity follows the value: unimportant pixels stay grey
        ax.imshow(norm, cmap="jet", alpha=0.15 + 0.5 * norm, vmin=0.0, vmax=1.0)
    ax.set_title(title, fontsize=8)
    ax.set_xticks([])
    ax.set_yticks([])


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def overlay_pngs(folder: str, images: np.ndarray, maps: np.ndarray, titles: Sequence[str]) -> List[str]:
    """One PNG per image (``folder``/explain_00000.png, ...): the image in grey, its map in
    colour (scaled to its maximum, negative values clipped), ``titles[i]`` above; returns the paths."""
    plt = _pyplot()
    os.makedirs(folder, exist_ok=True)
    paths = []
    for i, (image, heatmap, title) in enumerate(zip(images, maps, titles)):
        fig, ax = plt.subplots(figsize=(3.2, 3.4))
        _show(ax, image, heatmap, title)
        fig.tight_layout()
        paths.append(os.path.join(folder, f"explain_{i:05d}.png"))
        fig.savefig(paths[-1], dpi=100)
        plt.close(fig)
    return paths


def explanation_grid(path: str, images: np.ndarray, row_labels: Sequence[str],
                     columns: Sequence[tuple], title: str = "") -> str:
    """One figure: an image per row, a model per column; ``columns``: [(name, maps (N, H, W),
    titles per image)]. The image itself is the first column."""
    plt = _pyplot()
    n, cols = len(images), len(columns) + 1
    fig, axes = plt.subplots(n, cols, figsize=(1.9 * cols, 2.0 * n + 0.4), squeeze=False)
    for r in range(n):
        _show(axes[r, 0], images[r], None, row_labels[r])
        for c, (name, maps, titles) in enumerate(columns, start=1):
            _show(axes[r, c], images[r], maps[r], f"{name}\n{titles[r]}" if r == 0 else titles[r])
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def pick_images(images: np.ndarray, labels: np.ndarray, per_class: int) -> tuple:
    """(images, labels): the first ``per_class`` images of each class present, class by class."""
    keep = np.concatenate([np.flatnonzero(labels == c)[:per_class] for c in np.unique(labels)])
    return images[keep], labels[keep]


def _grid_column(run_dir: str, images: np.ndarray, names: Sequence[str]) -> tuple:
    """(method, maps, titles) of one finished run: Grad-CAM where it applies, else occlusion (a
    transfer run: coarse 4x4 patches, each one a pass through the backbone)."""
    from lightflax import predict

    module, variables, results, _ = predict.load_replicas(run_dir)
    prob_fn = run_prob_fn(module, variables, results)
    p = prob_fn(images)
    cls = np.argmax(p, axis=1)
    if results.get("backbone") or not hasattr(module, "classify"):
        side = max(1, min(images.shape[1:3]) // 4)
        method, maps = "occlusion", occlusion(prob_fn, images, patch=side, stride=side, classes=cls)
    else:
        method, maps = "gradcam", explain_run(module, variables, results, images, "gradcam", classes=cls)
    titles = [f"{names[c] if c < len(names) else c} {p[i, c]:.2f}" for i, c in enumerate(cls)]
    return method, maps, titles


def comparison_grid(path: str, results: Sequence[Dict], labels: Sequence[str], data, per_class: int = 2) -> str:
    """xray_compare's explanations.png: ``per_class`` validation X-rays of each class (rows; the test
    split when there is no validation split) by model (columns, one per finished run of ``results``,
    found in its ``config.workdir``), each cell the model's map of its predicted class with that
    class and its probability. Returns a one-line note of what was drawn."""
    split_name = "val" if data.splits.get("val") is not None else "test"
    split = data.splits.get(split_name)
    if split is None:
        return "explanations.png not written: no validation or test split"
    names = list(getattr(data, "class_names", None) or [str(c) for c in range(int(np.max(split.labels)) + 1)])
    images, truth = pick_images(split.images, split.labels, per_class)
    columns, methods = [], []
    for r, label in zip(results, labels):
        method, maps, titles = _grid_column(r["config"]["workdir"], images, names)
        columns.append((f"{label}\n({method})", maps, titles))
        methods.append(method)
    rows = [f"true: {names[c] if c < len(names) else c}" for c in truth]
    explanation_grid(path, images, rows, columns, title=f"{split_name} X-rays: each model's map of its predicted "
                                                          f"class (class, probability above)")
    return (f"{os.path.basename(path)}: {len(images)} {split_name} X-rays x {len(columns)} models "
            f"({', '.join(sorted(set(methods)))})")
