"""Parameter counts as Keras counts them, and a Keras-like per-layer table.

    python -m lightflax.param_counts --model=xray_light --k=5 --input_shape=1,299,299,3
    python -m lightflax.param_counts --model=xray_conv2d --se_ratio=0.25   # with squeeze-and-excitation

Trainable = the ``params`` collection; non-trainable = every other collection
(BatchNorm moving mean/variance in ``batch_stats``), as Keras' model.summary().
Nothing is allocated: shapes come from ``jax.eval_shape``.
"""

from __future__ import annotations

import math
import sys
from typing import Any, Dict, List, Sequence, Tuple

import jax
import jax.numpy as jnp
from flax import linen as nn
from flax.core import unfreeze


def _count(tree) -> int:
    return int(sum(math.prod(leaf.shape) for leaf in jax.tree_util.tree_leaves(tree)))


def _abstract_variables(module: nn.Module, input_shape: Sequence[int], dtype=jnp.float32):
    input_shape = tuple(int(d) for d in input_shape)
    if len(input_shape) != 4:
        raise ValueError(
            f"input_shape must be NHWC with the batch, e.g. (1, 299, 299, 3); got {input_shape}"
        )
    x = jax.ShapeDtypeStruct(input_shape, dtype)
    return jax.eval_shape(
        lambda rng, x: module.init(rng, x, train=False), jax.random.key(0), x
    )


def param_counts(module: nn.Module, input_shape: Sequence[int]) -> Dict[str, int]:
    """{'total', 'trainable', 'non_trainable'} for ``module`` on ``input_shape`` (NHWC)."""
    variables = unfreeze(_abstract_variables(module, input_shape))
    trainable = _count(variables.get("params", {}))
    total = _count(variables)
    return {"total": total, "trainable": trainable, "non_trainable": total - trainable}


def variables_counts(variables) -> Dict[str, int]:
    """The same counts from concrete variables."""
    variables = unfreeze(variables)
    trainable = _count(variables.get("params", {}))
    total = _count(variables)
    return {"total": total, "trainable": trainable, "non_trainable": total - trainable}


def layer_table(module: nn.Module, input_shape: Sequence[int]) -> List[Tuple[str, str, Tuple[int, ...], int]]:
    """Rows (path, layer type, output shape, params incl. non-trainable) per leaf layer."""
    variables = unfreeze(_abstract_variables(module, input_shape))
    records: List[Tuple[Tuple[str, ...], str, Tuple[int, ...]]] = []

    def interceptor(next_fun, args, kwargs, context):
        out = next_fun(*args, **kwargs)
        if context.method_name == "__call__" and context.module.path:
            shape = tuple(out.shape) if hasattr(out, "shape") else ()
            records.append((context.module.path, type(context.module).__name__, shape))
        return out

    def run(variables, x):
        with nn.intercept_methods(interceptor):
            return module.apply(variables, x, train=False)

    x = jax.ShapeDtypeStruct(tuple(input_shape), jnp.float32)
    jax.eval_shape(run, variables, x)

    def sub_count(path: Tuple[str, ...]) -> int:
        total = 0
        for collection in variables.values():
            node = collection
            for key in path:
                node = node.get(key, {}) if isinstance(node, dict) else {}
            total += _count(node)
        return total

    paths = [r[0] for r in records]
    leaves = [r for r in records if not any(p != r[0] and p[: len(r[0])] == r[0] for p in paths)]
    return [("/".join(p), kind, shape, sub_count(p)) for p, kind, shape in leaves]


def format_table(module: nn.Module, input_shape: Sequence[int], title: str = "") -> str:
    rows = layer_table(module, input_shape)
    counts = param_counts(module, input_shape)
    head = ("Layer (type)", "Output Shape", "Param #")
    body = [(f"{name} ({kind})", str((None,) + shape[1:]), f"{n:,}") for name, kind, shape, n in rows]
    widths = [max(len(r[i]) for r in [head] + body) for i in range(3)]
    line = "  ".join(w * "-" for w in widths)
    out = [f'Model: "{title}"' if title else "Model", line]
    out.append("  ".join(h.ljust(w) for h, w in zip(head, widths)))
    out.append(line.replace("-", "="))
    out += ["  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in body]
    out.append(line.replace("-", "="))
    out.append(f"Total params: {counts['total']:,}")
    out.append(f"Trainable params: {counts['trainable']:,}")
    out.append(f"Non-trainable params: {counts['non_trainable']:,}")
    return "\n".join(out)


def main(argv: Sequence[str] | None = None) -> int:
    import argparse

    from lightflax import models

    parser = argparse.ArgumentParser(description="Keras-like summary of a registered lightflax model")
    parser.add_argument("--model", required=True, help=f"one of: {', '.join(models.names())}")
    parser.add_argument("--k", type=int, default=None, help="LightLayers rank (light/lowrank models)")
    parser.add_argument("--num_classes", type=int, default=None)
    parser.add_argument("--se_ratio", type=float, default=0.0,
                        help="squeeze-and-excitation bottleneck ratio per block (zoo models; 0: off)")
    parser.add_argument("--input_shape", default=None,
                        help="NHWC with batch, e.g. 1,299,299,3 (default: the published setting)")
    args = parser.parse_args(argv)
    try:
        meta = models.info(args.model)
        kwargs: Dict[str, Any] = {}
        if args.num_classes is not None:
            kwargs["num_classes"] = args.num_classes
        if args.se_ratio:
            kwargs["se_ratio"] = args.se_ratio
        if meta.needs_k:
            kwargs["k"] = args.k if args.k is not None else 1
        elif args.k is not None:
            raise ValueError(f"--k applies to LightLayers models only, not {args.model}")
        shape = (
            tuple(int(s) for s in args.input_shape.split(","))
            if args.input_shape
            else (1,) + meta.input_shape
        )
        module = models.create(args.model, **kwargs)
        print(format_table(module, shape, title=args.model))
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
