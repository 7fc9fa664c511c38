"""The deletion test on the suite's live model (tests/test_explain.py: xray_light K=5, 250 Adam steps on
class-balanced embedded X-rays) re-trained with several seeds: one JSON line per seed with the model's
validation ROC AUC and, for gradcam and occlusion, (top-20 % drop, bottom-20 % drop, random-20 % drop)
on the first 48 validation images (3 random draws).

    python benchmarks/explain_live_seeds.py 0,1,2,3                        # native kernels
    LIGHTFLAX_KERNELS=xla python benchmarks/explain_live_seeds.py 0,1,2,3  # XLA's kernels

Results of 2026-12-02: benchmarks/results/explain/live_seeds_2026-12-02.jsonl (docs/explain.md).
"""
import json
import os
import sys

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [os.path.join(REPO, "tests"), REPO]
from lightflax import data, explain, predict, checkpoints, metrics
import test_explain as te
d = data.load("pneumonia_mnist", download=False)
train, val = d.splits["train"], d.splits["val"]
normal = np.flatnonzero(train.labels == 0)
keep = np.concatenate([normal, np.random.default_rng(0).choice(np.flatnonzero(train.labels == 1), len(normal), replace=False)])
import tempfile, pathlib
for seed in [int(s) for s in sys.argv[1].split(",")]:
    module, variables = te._train_live(train.images[keep], train.labels[keep], seed=seed)
    wd = pathlib.Path(tempfile.mkdtemp()) / "run"; wd.mkdir()
    checkpoints.export_variables(str(wd / "model.msgpack"), variables)
    (wd / "results.json").write_text(json.dumps({
        "config": {"model": "xray_light", "model_kwargs": {"k": 5}, "image_size": 28, "channels": 3, "mean": None},
        "dataset": {"num_classes": 2, "stored_shape": [28, 28, 1], "class_names": ["normal", "pneumonia"]}}))
    module, variables, results, _ = predict.load_replicas(str(wd))
    prob_fn = explain.run_prob_fn(module, variables, results)
    held = val.images[:200]; p = prob_fn(held)
    auc = metrics.roc_auc(p[:, 1], val.labels[:200])
    row = {"kernels": os.environ.get("LIGHTFLAX_KERNELS", "native"), "seed": seed, "auc": round(float(auc), 3)}
    for m in ("gradcam", "occlusion"):
        maps = explain.explain_run(module, variables, results, held[:48], m)
        o = explain.deletion_test(prob_fn, held[:48], maps, fraction=0.2, draws=3, seed=0)
        row[m] = (round(o["map_drop"], 3), round(o["lowest_drop"], 3), round(o["random_drop"], 3))
    print(json.dumps(row), flush=True)
