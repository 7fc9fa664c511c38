"""Data-layer benchmark: chest_xray preparation speed and the device-resident path.

    python benchmarks/bench_data.py --jpegs 200 --resolution 299
    python benchmarks/bench_data.py --skip_prepare --n 2048 --batch 64 --size 299

1. Preparation: writes ``--jpegs`` synthetic X-ray-like JPEGs (``--jpeg_size``,
   default 1500x1200, grayscale saved as RGB like many Kermany files, smooth
   structure plus noise so the files are of realistic size) in the Kaggle layout
   into a temporary folder and times ``lightflax.data.load('chest_xray', ...)``
   (Pillow decode -> grayscale -> bilinear resize -> array_record -> read back).
   Reports seconds per 1,000 JPEGs. Generation time is excluded.
2. Device-resident path: a uint8 (N, S, S, 1) split on the default device; times
   (a) the jitted batch gather alone and (b) gather + preprocess to float32
   (S, S, 3) in [0, 1], per batch, steady state (compile excluded); images/s.
Synthetic data; the numbers say nothing about accuracy.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import numpy as np



def write_jpegs(root: Path, count: int, size, seed: int = 0) -> float:
    """Kaggle layout with ``count`` JPEGs split over train/test x NORMAL/PNEUMONIA; returns mean bytes."""
    from PIL import Image, ImageFilter

    rng = np.random.default_rng(seed)
    w, h = size
    yy, xx = np.mgrid[0:h, 0:w]
    base = 110 + 60 * np.sin(xx / w * 3.1) * np.cos(yy / h * 2.3)  # smooth "anatomy"
    total = 0
    for split in ("train", "val", "test"):
        for cls in ("NORMAL", "PNEUMONIA"):
            (root / "chest_xray" / split / cls).mkdir(parents=True, exist_ok=True)
    for i in range(count):
        split = "train" if i % 4 else "test"
        cls = ("NORMAL", "PNEUMONIA")[(i // 4) % 2 if i % 4 == 0 else i % 2]
        d = root / "chest_xray" / split / cls
        d.mkdir(parents=True, exist_ok=True)
        noise = rng.normal(0, 18, (h // 4, w // 4))
        noise = np.kron(noise, np.ones((4, 4)))[:h, :w]
        img = np.clip(base + noise + rng.normal(0, 6, (h, w)), 0, 255).astype(np.uint8)
        im = Image.fromarray(img, "L").filter(ImageFilter.GaussianBlur(1.2)).convert("RGB")
        path = d / f"img_{i:05d}.jpeg"
        im.save(path, quality=85)
        total += path.stat().st_size
    return total / max(1, count)


def bench_prepare(args) -> dict:
    from lightflax import data

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        t = time.perf_counter()
        mean_bytes = write_jpegs(tmp / "src", args.jpegs, tuple(args.jpeg_size))
        gen_s = time.perf_counter() - t
        os.environ["LIGHTFLAX_DATA_DIR"] = str(tmp / "cache")
        t = time.perf_counter()
        d = data.load("chest_xray", manual_dir=str(tmp / "src"), image_size=args.resolution)
        prep_s = time.perf_counter() - t
        t = time.perf_counter()
        data.load("chest_xray", manual_dir=str(tmp / "src"), image_size=args.resolution)
        reload_s = time.perf_counter() - t
        n = sum(len(s) for s in d.splits.values() if s is not None)
    return {"jpegs": n, "jpeg_size": list(args.jpeg_size), "mean_jpeg_kb": round(mean_bytes / 1024, 1),
            "resolution": args.resolution, "generate_s": round(gen_s, 2), "prepare_s": round(prep_s, 2),
            "prepare_s_per_1000": round(prep_s / n * 1000, 2), "reload_prepared_s": round(reload_s, 2),
            "reload_s_per_1000": round(reload_s / n * 1000, 3)}


def _time(fn, reps: int) -> float:
    out = fn(0)
    import jax

    jax.block_until_ready(out)
    t = time.perf_counter()
    for i in range(reps):
        out = fn(i)
    jax.block_until_ready(out)
    return (time.perf_counter() - t) / reps


def bench_device(args) -> dict:
    import jax
    import jax.numpy as jnp

    from lightflax import data
    from lightflax.data import pipeline

    d = data.load("synthetic", synthetic_shape=(args.size, args.size, 1), synthetic_sizes={"train": args.n})
    split = d.splits["train"]
    images, labels = jax.device_put(split.images), jax.device_put(split.labels)
    perm = pipeline.epoch_permutation(0, 0, len(split.labels))
    nb = len(split.labels) // args.batch

    @jax.jit
    def gather_pre(images, labels, perm, step):
        x, y = pipeline.get_batch(images, labels, perm, step, args.batch)
        return pipeline.preprocess(x, out_size=None, channels=3, mean=(0.5, 0.5, 0.5)), y

    gather = jax.jit(pipeline.get_batch, static_argnums=4)
    t_gather = _time(lambda i: gather(images, labels, perm, jnp.int32(i % nb), args.batch), args.reps)
    t_pre = _time(lambda i: gather_pre(images, labels, perm, jnp.int32(i % nb)), args.reps)
    return {"device": str(jax.devices()[0]), "n": args.n, "size": args.size, "batch": args.batch,
            "split_mb": round(split.images.nbytes / 2**20, 1),
            "gather_images_per_s": round(args.batch / t_gather), "gather_ms_per_batch": round(t_gather * 1e3, 3),
            "gather_preprocess_images_per_s": round(args.batch / t_pre),
            "gather_preprocess_ms_per_batch": round(t_pre * 1e3, 3)}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--jpegs", type=int, default=200)
    p.add_argument("--jpeg_size", type=int, nargs=2, default=[1500, 1200], metavar=("W", "H"))
    p.add_argument("--resolution", type=int, default=299)
    p.add_argument("--n", type=int, default=1024)
    p.add_argument("--size", type=int, default=299)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--reps", type=int, default=20)
    p.add_argument("--skip_prepare", action="store_true")
    p.add_argument("--skip_device", action="store_true")
    args = p.parse_args(argv)
    result = {"machine": f"{platform.node()} {platform.machine()} cpus={os.cpu_count()}",
              "date": time.strftime("%Y-%m-%d %H:%M:%S %Z")}
    if not args.skip_prepare:
        result["prepare"] = bench_prepare(args)
    if not args.skip_device:
        result["device_path"] = bench_device(args)
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
