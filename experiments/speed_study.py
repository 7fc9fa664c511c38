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

from experiments.plan import default_workdir
from lightflax import speed, timing
from lightflax.errors import UserError


def _list(config, path):
    section, _, field = path.rpartition(".")
    value = (config[section] if section else config)[field]
    return [v for v in value.split(",") if v]


def _ints(config, path, flag=None):
    try:
        return [int(v) for v in _list(config, path)]
    except ValueError:
        raise UserError(f"--{flag or path} must be a comma-separated list of integers, got "
                        f"{','.join(_list(config, path))}") from None


def main(config, explicit=frozenset()):
    del explicit
    workdir = config.workdir or default_workdir("speed_study")
    os.makedirs(workdir, exist_ok=True)
    kinds = _list(config, "kinds") if config.kinds else list(speed.LAYER_KINDS)
    for kind in kinds:
        if kind not in speed.LAYER_KINDS + ("conv2d_einsum",):
            raise UserError(f"--kinds: unknown layer {kind!r}; choose from {', '.join(speed.LAYER_KINDS)}")
    if config.layers:
        _layer_sweep(config, kinds, workdir)
    _model_sweep(config, workdir)
    print(f"wrote {workdir}", flush=True)


def _widths(config):
    widths = []
    for w in _list(config, "widths"):
        try:
            c_in, c_out = (int(v) for v in w.split(":"))
        except ValueError:
            raise UserError(f"--widths entries must be c_in:c_out, got {w!r}") from None
        widths.append((c_in, c_out))
    return widths


def _layer_sweep(config, kinds, workdir):
    import jax.numpy as jnp

    dtype = jnp.bfloat16 if config.runtime.dtype == "bfloat16" else None
    rows, widths = [], _widths(config)
    for size in _ints(config, "sizes"):
        for batch in _ints(config, "batches"):
            for c_in, c_out in widths:
                for mode in _list(config, "modes"):
                    group = []
                    for kind in kinds:
                        ranks = _ints(config, "model.ks", "ks") if kind in ("light_conv", "light_einsum", "lowrank") \
                            else [None]
                        for k in ranks:
                            group.append(speed.layer_variant(kind, mode, batch=batch, size=size, c_in=c_in,
                                                             c_out=c_out, k=k or 1, dtype=dtype))
                    got = timing.measure_interleaved(group, rounds=config.rounds, baseline="conv2d")
                    rows += got
                    print(speed.markdown(got), flush=True)
    speed.write_csv(os.path.join(workdir, "layers.csv"), rows)
    with open(os.path.join(workdir, "layers.md"), "w") as f:
        f.write(speed.markdown(rows) + "\n")
    speed.roofline_plot(os.path.join(workdir, "layers_roofline.png"), rows, "layers")
    speed.time_plot(os.path.join(workdir, "layers_time_by_size.png"), rows, "size", "layers")


def _model_sweep(config, workdir):
    mrows = []
    for size in _ints(config, "model_sizes"):
        for batch in _ints(config, "batches"):
            group = []
            for spec in _list(config, "models"):
                name, _, k = spec.partition(":")
                group.append(speed.model_variant(name, {"k": int(k)} if k else {}, batch=batch, size=size,
                                                 parallel=config.runtime.parallel, dtype=config.runtime.dtype))
            got = timing.measure_interleaved(group, rounds=config.rounds, baseline=group[-1].name)
            mrows += got
            print(speed.markdown(got), flush=True)
    if mrows:
        speed.write_csv(os.path.join(workdir, "models.csv"), mrows)
        with open(os.path.join(workdir, "models.md"), "w") as f:
            f.write(speed.markdown(mrows) + "\n")
        speed.roofline_plot(os.path.join(workdir, "models_roofline.png"), mrows, "train step")
