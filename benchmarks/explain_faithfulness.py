"""The deletion test of docs/explain.md: per finished run and method, the mean drop of the predicted
class's probability when the 20 % of pixels a map ranks highest are replaced with the image's mean,
vs a random 20 % (mean and spread over random draws), and vs the 20 % the map ranks lowest.

    python launch.py --experiment=xray_light --k=5 --workdir=runs/light_k5     # the study's defaults
    python launch.py --experiment=xray_conv2d --workdir=runs/conv2d
    python benchmarks/explain_faithfulness.py runs/light_k5 runs/conv2d [--images=200] [--draws=5]

Images: the first ``--images`` of the embedded PneumoniaMNIST validation split, as stored (28 px;
each run resizes them to its own input size). Prints one markdown table row per run and method.
"""

import argparse
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from lightflax import data, explain, predict  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("runs", nargs="+", help="finished run folders (results.json, model.msgpack)")
    ap.add_argument("--images", type=int, default=200)
    ap.add_argument("--draws", type=int, default=5)
    ap.add_argument("--fraction", type=float, default=0.2)
    ap.add_argument("--methods", default="gradcam,occlusion")
    args = ap.parse_args()
    val = data.load("pneumonia_mnist", download=False).splits["val"]
    images = val.images[:args.images]
    print(f"{len(images)} images of the embedded PneumoniaMNIST validation split; {args.draws} random draws; "
          f"{args.fraction:.0%} of the pixels deleted (set to the image's mean)")
    print("| run | model | val AUC of the run | method | drop, map's top 20 % | drop, random 20 % (mean +- std over "
          "draws) | map / random | drop, map's bottom 20 % | map time (s) |")
    print("|---|---|---|---|---|---|---|---|---|")
    for run in args.runs:
        module, variables, results, _ = predict.load_replicas(run)
        prob_fn = explain.run_prob_fn(module, variables, results)
        model = f"{results['config']['model']} {results['config'].get('model_kwargs') or ''}".strip()
        auc = results.get("select_metrics", {}).get("roc_auc")
        for method in args.methods.split(","):
            t = time.perf_counter()
            maps = explain.explain_run(module, variables, results, images, method)
            seconds = time.perf_counter() - t
            out = explain.deletion_test(prob_fn, images, maps, fraction=args.fraction, draws=args.draws)
            print(f"| {os.path.basename(os.path.normpath(run))} | {model} | {auc if auc is None else f'{auc:.3f}'} "
                  f"| {method} | {out['map_drop']:.4f} | {out['random_drop']:.4f} +- {out['random_std']:.4f} | "
                  f"{out['map_drop'] / max(out['random_drop'], 1e-12):.2f} | {out['lowest_drop']:.4f} | "
                  f"{seconds:.1f} |", flush=True)


if __name__ == "__main__":
    main()
