"""Scores a finished run on an external npz, without retraining.

    python launch.py --experiment=predict --workdir=RUN_DIR --input_npz=IN.npz --output_npz=OUT.npz

Reads the run's model configuration and decision rule from RUN_DIR/results.json
and its exported weights (model.msgpack, or model_seed<r>.msgpack of each replica
of a --num_seeds run), applies the run's own preprocessing (resize to its input
resolution, gray->RGB, /255, mean subtraction) to ``images`` of IN.npz (uint8,
(N,H,W) or (N,H,W,C)) and writes ``probabilities`` (N, num_classes; a
multi-seed run's replicas averaged unless --seed_index picks one) and
``predictions`` (N,; the run's decision rule, argmax for runs without one) to
OUT.npz, with one summary line.
"""

from absl import flags

from lightflax import predict

WORKDIR = flags.DEFINE_string("workdir", None, "Directory of a finished training run.")
INPUT = flags.DEFINE_string("input_npz", None, "npz with an 'images' array, uint8 (N,H,W) or (N,H,W,C).")
OUTPUT = flags.DEFINE_string("output_npz", None, "Where to write 'probabilities' (N, num_classes) and "
                             "'predictions' (N,).")
BATCH = flags.DEFINE_integer("batch_size", 64, "Images per forward pass.", lower_bound=1)
SEED_INDEX = flags.DEFINE_integer("seed_index", None, "Score only this replica of a --num_seeds run (0-based); "
                                  "default: the mean of every replica's probabilities.", lower_bound=0)


def main(argv):
    del argv
    predict.predict_npz(WORKDIR.value, INPUT.value, OUTPUT.value, batch_size=BATCH.value,
                        seed_index=SEED_INDEX.value)
