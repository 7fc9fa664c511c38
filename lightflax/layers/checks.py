"""Argument checks of the layers: one line naming the argument (or the input) and the allowed range."""

from __future__ import annotations

from typing import Any, Optional, Sequence, Tuple, Union

import jax
from flax import linen as nn

Array = jax.Array
Dtype = Any
IntPair = Union[int, Sequence[int]]

IMPLS = ("conv", "einsum")


def pair(value: IntPair, name: str) -> Tuple[int, int]:
    if isinstance(value, int):
        value = (value, value)
    value = tuple(value)
    if len(value) != 2 or not all(isinstance(v, int) for v in value):
        raise ValueError(f"{name} must be an int or a pair of ints, got {value!r}")
    if min(value) < 1:
        raise ValueError(f"{name} must be >= 1, got {value!r}")
    return value  # type: ignore[return-value]


def check_positive(value: int, name: str) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name} must be an integer >= 1, got {value!r}")


def check_padding(padding: str) -> str:
    padding = padding.upper() if isinstance(padding, str) else padding
    if padding not in ("SAME", "VALID"):
        raise ValueError(f"padding must be 'SAME' or 'VALID', got {padding!r}")
    return padding


def check_impl(impl: str) -> str:
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    return impl


def check_input(x: Array, layer: str, channels: Optional[int]) -> None:
    if x.ndim != 4:
        raise ValueError(
            f"{layer} expects NHWC input of rank 4, got rank {x.ndim} with shape {tuple(x.shape)}"
        )
    if channels is not None and x.shape[-1] != channels:
        raise ValueError(
            f"{layer} was initialised for {channels} input channels but got {x.shape[-1]} "
            f"(input shape {tuple(x.shape)})"
        )


def initialised_channels(module: nn.Module, name: str, axis: int) -> Optional[int]:
    if module.has_variable("params", name):
        return module.get_variable("params", name).shape[axis]
    return None


def check_fits(
    shape: Sequence[int], kernel: Tuple[int, int], padding: str, layer: str
) -> None:
    if padding == "VALID" and (shape[1] < kernel[0] or shape[2] < kernel[1]):
        raise ValueError(
            f"{layer}: kernel_size {kernel[0]}x{kernel[1]} is larger than the input "
            f"{shape[1]}x{shape[2]} under padding='VALID'; use a larger input or padding='SAME'"
        )


def check_conv_fields(m: nn.Module) -> None:
    """The ``__post_init__`` checks every convolution layer shares."""
    check_positive(m.features, "features")
    pair(m.kernel_size, "kernel_size")
    pair(m.strides, "strides")
    check_padding(m.padding)


def conv_geometry(m: nn.Module, x: Array, first_param: str) -> Tuple[str, Tuple[int, int], Tuple[int, int], str]:
    """Checks ``x`` against a convolution layer; returns (name, kernel, strides, padding)."""
    name = type(m).__name__
    check_input(x, name, initialised_channels(m, first_param, 2))
    kernel = pair(m.kernel_size, "kernel_size")
    padding = check_padding(m.padding)
    check_fits(x.shape, kernel, padding, name)
    return name, kernel, pair(m.strides, "strides"), padding
