"""Speed study: layers and whole models, forward and forward+backward, side by side.

    python launch.py --experiment=speed_study --workdir=runs/speed
    python launch.py --experiment=speed_study --sizes=28,128,299 --batches=64 --ks=1,5 --widths=8,32
    python launch.py --experiment=speed_study --models=xray_light:5,xray_conv2d --model_sizes=128,299 --layers=false

For every (size, batch, width, mode) point, each layer variant (Conv2D,
SeparableConv2D, LightConv2D conv and einsum impls, LowRankConv2D) is compiled
ahead of time and measured in interleaved rounds; rows carry XLA's FLOPs and
bytes next to the measured time (a roofline-style table) and the ratio to
Conv2D measured in the same rounds. Model rows time the trainer's own train
step. Writes <workdir>/layers.csv, models.csv, *.md tables and plots.
"""

import os

from absl import flags

from experiments import default_workdir
from lightflax import speed, timing
from lightflax.errors import UserError

FLAGS = flags.FLAGS
WORKDIR = flags.DEFINE_string("workdir", None, "Output directory (default runs/speed_study-<time>).")
LAYERS = flags.DEFINE_boolean("layers", True, "Run the per-layer sweep.")
SIZES = flags.DEFINE_list("sizes", ["28", "128", "299"], "Input resolutions of the layer sweep.")
BATCHES = flags.DEFINE_list("batches", ["64"], "Batch sizes.")
KS = flags.DEFINE_list("ks", ["1", "3", "5"], "LightLayers ranks.")
WIDTHS = flags.DEFINE_list("widths", ["3:8", "8:8", "16:32"], "c_in:c_out pairs of the layer sweep.")
MODES = flags.DEFINE_list("modes", ["fwd", "fwd+bwd"], "fwd and/or fwd+bwd.")
KINDS = flags.DEFINE_list("kinds", list(speed.LAYER_KINDS), "Layer variants.")
MODELS = flags.DEFINE_list("models", ["xray_light:5", "xray_lowrank:5", "xray_conv2d"],
                           "Whole models (name[:k]) timed with the trainer's train step.")
MODEL_SIZES = flags.DEFINE_list("model_sizes", ["128"], "Resolutions of the model sweep.")
ROUNDS = flags.DEFINE_integer("rounds", 5, "Interleaved measurement rounds.", lower_bound=1)
DTYPE = flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "Compute dtype.")
PARALLEL = flags.DEFINE_enum("parallel", "shard_map", ["shard_map", "pmap"], "Wrapper of the train step.")


def _ints(flag):
    try:
        return [int(v) for v in flag.value]
    except ValueError:
        raise UserError(f"--{flag.name} must be a comma-separated list of integers, got {flag.value}") \
            from None


def main(argv):
    del argv
    workdir = WORKDIR.value or default_workdir("speed_study")
    os.makedirs(workdir, exist_ok=True)
    import jax.numpy as jnp

    dtype = jnp.bfloat16 if DTYPE.value == "bfloat16" else None
    for kind in KINDS.value:
        if kind not in speed.LAYER_KINDS + ("conv2d_einsum",):
            raise UserError(f"--kinds: unknown layer {kind!r}; choose from {', '.join(speed.LAYER_KINDS)}")
    if LAYERS.value:
        rows = []
        widths = []
        for w in WIDTHS.value:
            try:
                c_in, c_out = (int(v) for v in w.split(":"))
            except ValueError:
                raise UserError(f"--widths entries must be c_in:c_out, got {w!r}") from None
            widths.append((c_in, c_out))
        for size in _ints(SIZES):
            for batch in _ints(BATCHES):
                for c_in, c_out in widths:
                    for mode in MODES.value:
                        group = []
                        for kind in KINDS.value:
                            for k in (_ints(KS) if kind in ("light_conv", "light_einsum", "lowrank") else [None]):
                                group.append(speed.layer_variant(kind, mode, batch=batch, size=size, c_in=c_in,
                                                                 c_out=c_out, k=k or 1, dtype=dtype))
                        got = timing.measure_interleaved(group, rounds=ROUNDS.value, baseline="conv2d")
                        rows += got
                        print(speed.markdown(got), flush=True)
        speed.write_csv(os.path.join(workdir, "layers.csv"), rows)
        with open(os.path.join(workdir, "layers.md"), "w") as f:
            f.write(speed.markdown(rows) + "\n")
        speed.roofline_plot(os.path.join(workdir, "layers_roofline.png"), rows, "layers")
        speed.time_plot(os.path.join(workdir, "layers_time_by_size.png"), rows, "size", "layers")
    mrows = []
    for size in _ints(MODEL_SIZES):
        for batch in _ints(BATCHES):
            group = []
            for spec in MODELS.value:
                name, _, k = spec.partition(":")
                group.append(speed.model_variant(name, {"k": int(k)} if k else {}, batch=batch, size=size,
                                                 parallel=PARALLEL.value, dtype=DTYPE.value))
            got = timing.measure_interleaved(group, rounds=ROUNDS.value, baseline=group[-1].name)
            mrows += got
            print(speed.markdown(got), flush=True)
    if mrows:
        speed.write_csv(os.path.join(workdir, "models.csv"), mrows)
        with open(os.path.join(workdir, "models.md"), "w") as f:
            f.write(speed.markdown(mrows) + "\n")
        speed.roofline_plot(os.path.join(workdir, "models_roofline.png"), mrows, "train step")
    print(f"wrote {workdir}", flush=True)
