"""--weight_averaging measured offline on a finished run's per-epoch checkpoints (same trajectory).

    python benchmarks/average_snapshots.py SNAPSHOTS RUN_DIR OUT_DIR --mode=swa|ema [--window=5]

Weight averaging does not change training (the loop trains on from the raw weights; only what is
evaluated, selected and exported changes: lightflax.averaging), so a run trained WITHOUT it already
holds the trajectory that ``--weight_averaging`` would average, if its per-epoch "latest"
checkpoints were kept: SNAPSHOTS is a folder of copies of ``RUN_DIR/checkpoints/latest/<step>``
(one per epoch, copied while the run trained). This script replays the loop's rule with the
library's own :func:`lightflax.averaging.update`: after each epoch the running average of params and
BatchNorm statistics, its validation loss per replica, each replica's best (strictly lowest) epoch;
and writes OUT_DIR as a run folder (results.json of RUN_DIR, noted, and one model_seed<r>.msgpack per
replica) that predict, shift_eval.py and proxy_eval.py score like any run. An EMA needs every epoch
from the first; a missing first epoch starts the average at the first snapshot (recorded).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import jax
import numpy as np

from lightflax import averaging, checkpoints, data as data_lib, predict


def _restore(path: str):
    import orbax.checkpoint as ocp

    tree = ocp.PyTreeCheckpointer().restore(os.path.join(path, "state"))
    return {"params": jax.tree_util.tree_map(np.asarray, tree["params"]),
            "batch_stats": jax.tree_util.tree_map(np.asarray, tree["batch_stats"])}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("snapshots")
    parser.add_argument("run")
    parser.add_argument("out")
    parser.add_argument("--mode", choices=averaging.MODES[1:], required=True)
    parser.add_argument("--window", type=int, default=5)
    args = parser.parse_args(argv)
    module, _, results, _ = predict.load_replicas(args.run)
    steps_per_epoch, epochs = results["steps_per_epoch"], results["config"]["epochs"]
    steps = sorted(int(s) for s in os.listdir(args.snapshots) if s.isdigit())
    have = [s // steps_per_epoch for s in steps]
    if args.mode == "swa" and not set(range(max(1, epochs - args.window + 1), epochs + 1)) <= set(have):
        raise SystemExit(f"the SWA window needs epochs {epochs - args.window + 1}-{epochs}; have {have}")
    val = data_lib.load("pneumonia_mnist").splits["val"]
    x = predict.model_inputs(results, np.asarray(val.images))
    y = np.asarray(val.labels)
    avg, best, best_loss, losses = None, {}, None, []
    for step, epoch in zip(steps, have):
        avg = averaging.update(avg, _restore(os.path.join(args.snapshots, str(step))), args.mode, epoch - 1,
                               epochs, args.window)
        n = avg["params"]["head"]["bias"].shape[0]
        per = [jax.tree_util.tree_map(lambda a, r=r: np.asarray(a[r]), avg) for r in range(n)]
        loss = np.array([-np.mean(np.log(np.clip(predict.probabilities_of_inputs(module, [v], results, x)[
            np.arange(len(y)), y], 1e-12, 1))) for v in per])
        losses.append(loss.tolist())
        improved = loss < best_loss if best_loss is not None else np.ones(n, bool)
        best_loss = loss if best_loss is None else np.where(improved, loss, best_loss)
        for r in np.flatnonzero(improved):
            best[int(r)] = (epoch, per[r])
        print(f"epoch {epoch}: {args.mode} val loss {np.round(loss, 4).tolist()}", flush=True)
    os.makedirs(args.out, exist_ok=True)
    for r, (epoch, v) in sorted(best.items()):
        checkpoints.export_variables(os.path.join(args.out, f"model_seed{r}.msgpack"), v)
    results = dict(results, offline_weight_averaging={
        "mode": args.mode, "window": args.window, "source_run": os.path.basename(os.path.normpath(args.run)),
        "epochs_available": have, "best_epoch": [best[r][0] for r in sorted(best)], "val_loss": losses})
    results["config"] = dict(results["config"], weight_averaging=args.mode, averaging_epochs=args.window)
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump(results, f, indent=1)
    print(f"wrote {args.out}: best epochs {[best[r][0] for r in sorted(best)]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
