"""Scores a finished run on an external npz, without retraining.

    python launch.py --experiment=predict --workdir=RUN_DIR --input_npz=IN.npz --output_npz=OUT.npz

Reads the run's model configuration and decision rule from RUN_DIR/results.json
and its exported weights (model.msgpack, or model_seed<r>.msgpack of each replica
of a --num_seeds run), applies the run's own preprocessing (resize to its input
resolution, gray->RGB, /255, mean subtraction) to ``images`` of IN.npz (uint8,
(N,H,W) or (N,H,W,C)) and writes ``probabilities`` (N, num_classes; a
multi-seed run's replicas averaged unless --seed_index picks one) and
``predictions`` (N,; the run's decision rule, argmax for runs without one) to
OUT.npz, with one summary line. --explain=occlusion|gradcam adds ``heatmaps``
(N, H, W) float32 of the predicted class at the input's resolution
(--explain_patch/--explain_stride for occlusion; --explain_dir=DIR: one overlay
PNG per image); see docs/explain.md.
"""

from absl import flags

from lightflax import predict

WORKDIR = flags.DEFINE_string("workdir", None, "Directory of a finished training run.")
INPUT = flags.DEFINE_string("input_npz", None, "npz with an 'images' array, uint8 (N,H,W) or (N,H,W,C).")
OUTPUT = flags.DEFINE_string("output_npz", None, "Where to write 'probabilities' (N, num_classes) and "
                             "'predictions' (N,).")
BATCH = flags.DEFINE_integer("batch_size", 64, "Images per forward pass.", lower_bound=1)
EXPLAIN = flags.DEFINE_enum("explain", None, ["occlusion", "gradcam"], "Also write 'heatmaps' (N, H, W) float32 "
                            "of the predicted class: sliding-patch occlusion or Grad-CAM (conv models).")
EXPLAIN_PATCH = flags.DEFINE_integer("explain_patch", None, "Occlusion patch side in pixels (default: about "
                                     "min(H, W) / 7).", lower_bound=1)
EXPLAIN_STRIDE = flags.DEFINE_integer("explain_stride", None, "Occlusion stride (default: patch // 2).", lower_bound=1)
EXPLAIN_DIR = flags.DEFINE_string("explain_dir", None, "With --explain: one overlay PNG per image here.")
SEED_INDEX = flags.DEFINE_integer("seed_index", None, "Score only this replica of a --num_seeds run (0-based); "
                                  "default: the mean of every replica's probabilities.", lower_bound=0)


def main(argv):
    del argv
    explain = None
    if EXPLAIN.value:
        explain = {"method": EXPLAIN.value, "patch": EXPLAIN_PATCH.value, "stride": EXPLAIN_STRIDE.value,
                   "explain_dir": EXPLAIN_DIR.value}
    elif EXPLAIN_DIR.value or EXPLAIN_PATCH.value or EXPLAIN_STRIDE.value:
        raise predict.UserError("--explain_dir/--explain_patch/--explain_stride need --explain=occlusion or gradcam")
    predict.predict_npz(WORKDIR.value, INPUT.value, OUTPUT.value, batch_size=BATCH.value,
                        seed_index=SEED_INDEX.value, explain=explain)
