"""The one set of input checks shared by the eager implementations and the fake kernels.

Every check raises ``ValueError`` (bad value, shape or dtype) or ``RuntimeError`` (device
mismatch) naming the argument, before any kernel runs. Shapes may be SymInts (fake mode).
"""
from __future__ import annotations

from typing import Optional

import torch

from . import formats
from .activations import ACT_QUANT_MODES
from .recipes import RECIPES

_GPU_X_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
_CPU_X_DTYPES = _GPU_X_DTYPES + (torch.float64,)


def check_choice(value, choices, arg: str) -> None:
    if not isinstance(value, str) or value not in choices:
        raise ValueError(f"{arg}: expected one of {tuple(choices)}, got {value!r}")


def check_float_input(t: torch.Tensor, arg: str) -> None:
    """A 16/32-bit activation-like tensor (float64 allowed on the CPU only)."""
    allowed = _CPU_X_DTYPES if t.device.type == "cpu" else _GPU_X_DTYPES
    if t.dtype not in allowed:
        raise ValueError(f"{arg}: unsupported dtype {t.dtype} on {t.device.type}; expected one of {allowed}")


def check_2d(t: torch.Tensor, arg: str) -> None:
    if t.dim() != 2:
        raise ValueError(f"{arg}: expected a 2-D tensor, got shape {tuple(t.shape)}")


def check_same_device(t: torch.Tensor, ref: torch.Tensor, arg: str, ref_arg: str) -> None:
    if t.device != ref.device:
        raise RuntimeError(f"{arg} is on {t.device} but {ref_arg} is on {ref.device}; they must be on one device")


def check_offs(offs: torch.Tensor, E, ref: torch.Tensor, ref_arg: str) -> None:
    """``offs``: int32, 1-D, ``[E]``, on ``ref``'s device."""
    if offs.dtype != torch.int32:
        raise ValueError(f"offs: expected dtype torch.int32, got {offs.dtype}")
    if offs.dim() != 1:
        raise ValueError(f"offs: expected a 1-D tensor, got shape {tuple(offs.shape)}")
    if offs.shape[0] != E:
        raise ValueError(f"offs: expected length {E} (one end row per expert), got {offs.shape[0]}")
    check_same_device(offs, ref, "offs", ref_arg)


def check_group_size(granularity: str, group_size: int, K) -> None:
    if granularity == "group":
        if not isinstance(group_size, int) or group_size <= 0:
            raise ValueError(f"group_size: must be a positive int for granularity='group', got {group_size!r}")
        if K % group_size != 0:
            raise ValueError(f"group_size: {group_size} does not divide K={K}")


def check_weight(w: torch.Tensor, w_scale: Optional[torch.Tensor], w_zero: Optional[torch.Tensor],
                 w_format: str, granularity: str, group_size: int, ref: torch.Tensor, ref_arg: str):
    """Stored weights of ``w_format`` (``"none"``: a plain ``[E, N, K]`` float tensor).

    Returns ``(E, N, K)`` with K the logical in-features.
    """
    if w.dim() != 3:
        raise ValueError(f"w: expected a 3-D [E, N, K] tensor, got shape {tuple(w.shape)}")
    check_same_device(w, ref, "w", ref_arg)
    if w_format == "none":
        if w.dtype != ref.dtype:
            raise ValueError(f"w: dtype {w.dtype} does not match {ref_arg}'s dtype {ref.dtype}")
        for t, name in ((w_scale, "w_scale"), (w_zero, "w_zero")):
            if t is not None:
                raise ValueError(f"{name}: must be None for plain weights (w_format='none')")
        if granularity != "none":
            raise ValueError(f"granularity: must be 'none' for plain weights, got {granularity!r}")
        return w.shape[0], w.shape[1], w.shape[2]
    spec = formats.get_format(w_format, "w_format")
    if spec.kind == "float":
        raise ValueError(f"w_format: {w_format!r} is a plain format; pass w_format='none'")
    check_choice(granularity, spec.granularities, "granularity")
    if w.dtype != spec.storage:
        raise ValueError(f"w: format {w_format} stores {spec.storage}, got {w.dtype}")
    E, N, K = w.shape[0], w.shape[1], w.shape[2] * spec.pack
    check_group_size(granularity, group_size, K)
    expected = formats.scale_shape(granularity, E, N, K, group_size)
    if w_scale is None:
        raise ValueError(f"w_scale: format {w_format} needs float32 scales of shape {expected}")
    if w_scale.dtype != torch.float32:
        raise ValueError(f"w_scale: expected dtype torch.float32, got {w_scale.dtype}")
    if tuple(w_scale.shape) != tuple(expected):
        raise ValueError(f"w_scale: expected shape {tuple(expected)} for {granularity} granularity, "
                         f"got {tuple(w_scale.shape)}")
    check_same_device(w_scale, ref, "w_scale", ref_arg)
    if spec.has_zero:
        if w_zero is None:
            raise ValueError(f"w_zero: format {w_format} needs uint8 zero points of shape {tuple(expected)}")
        if w_zero.dtype != torch.uint8:
            raise ValueError(f"w_zero: expected dtype torch.uint8, got {w_zero.dtype}")
        if tuple(w_zero.shape) != tuple(expected):
            raise ValueError(f"w_zero: expected shape {tuple(expected)}, got {tuple(w_zero.shape)}")
        check_same_device(w_zero, ref, "w_zero", ref_arg)
    elif w_zero is not None:
        raise ValueError(f"w_zero: must be None for symmetric format {w_format}")
    return E, N, K


def check_act_recipe(w_format: str, act_quant: str, recipe: str) -> None:
    check_choice(act_quant, ACT_QUANT_MODES, "act_quant")
    check_choice(recipe, RECIPES, "recipe")
    if recipe != "none":
        if w_format != "none":
            raise ValueError(f"recipe: training recipe {recipe!r} needs plain trainable weights, "
                             f"not a QuantizedWeight of format {w_format!r}")
        if act_quant != "none":
            raise ValueError("act_quant: cannot be combined with a training recipe (the recipe quantizes x)")
    if act_quant == "int8_token" and not (w_format.startswith("int")):
        raise ValueError(f"act_quant: 'int8_token' needs int8/int4/int2 weights, got w_format={w_format!r}")
    if act_quant in ("fp8_token", "fp8_1x128") and not w_format.startswith("fp8"):
        raise ValueError(f"act_quant: {act_quant!r} needs fp8 weights, got w_format={w_format!r}")


def check_grouped_mm(x, w, w_scale, w_zero, offs, w_format, granularity, group_size, act_quant, recipe):
    """Checks of ``grouped_mm`` (forward). Returns ``(M, N, K, E)``."""
    check_2d(x, "x")
    check_float_input(x, "x")
    check_act_recipe(w_format, act_quant, recipe)
    E, N, K = check_weight(w, w_scale, w_zero, w_format, granularity, group_size, x, "x")
    if x.shape[1] != K:
        raise ValueError(f"x: has {x.shape[1]} columns but the weights have K={K} in-features")
    check_offs(offs, E, x, "x")
    return x.shape[0], N, K, E


def check_dgrad(dy, w, w_scale, w_zero, offs, w_format, granularity, group_size, recipe):
    """Checks of ``grouped_mm_dgrad``. Returns ``(M, N, K, E)``."""
    check_2d(dy, "dy")
    check_float_input(dy, "dy")
    check_act_recipe(w_format, "none", recipe)
    E, N, K = check_weight(w, w_scale, w_zero, w_format, granularity, group_size, dy, "dy")
    if dy.shape[1] != N:
        raise ValueError(f"dy: has {dy.shape[1]} columns but the weights have N={N} out-features")
    check_offs(offs, E, dy, "dy")
    return dy.shape[0], N, K, E


def check_wgrad(dy, x, offs, recipe):
    """Checks of ``grouped_mm_wgrad``. Returns ``(M, N, K, E)``."""
    check_2d(dy, "dy")
    check_2d(x, "x")
    check_float_input(dy, "dy")
    check_float_input(x, "x")
    check_choice(recipe, RECIPES, "recipe")
    check_same_device(x, dy, "x", "dy")
    if x.dtype != dy.dtype:
        raise ValueError(f"x: dtype {x.dtype} does not match dy's dtype {dy.dtype}")
    if x.shape[0] != dy.shape[0]:
        raise ValueError(f"x: has {x.shape[0]} rows but dy has {dy.shape[0]}")
    if offs.dim() != 1:
        raise ValueError(f"offs: expected a 1-D tensor, got shape {tuple(offs.shape)}")
    E = offs.shape[0]
    check_offs(offs, E, dy, "dy")
    return dy.shape[0], dy.shape[1], x.shape[1], E


def check_quantize_weight(w: torch.Tensor, fmt: str, granularity: str, group_size: int) -> None:
    """Checks of weight quantization: ``w`` a float ``[E, N, K]`` tensor."""
    spec = formats.get_format(fmt)
    if w.dim() != 3:
        raise ValueError(f"w: expected a 3-D [E, N, K] tensor, got shape {tuple(w.shape)}")
    if not w.is_floating_point() or w.dtype in (torch.float8_e4m3fn, torch.float8_e5m2):
        raise ValueError(f"w: expected a 16/32/64-bit float tensor, got {w.dtype}")
    if spec.kind == "float":
        return
    check_choice(granularity, spec.granularities, "granularity")
    K = w.shape[2]
    if K % spec.pack != 0:
        raise ValueError(f"w: K={K} is not divisible by the packing factor {spec.pack} of {fmt}")
    check_group_size(granularity, group_size, K)


def check_act_quant(x: torch.Tensor, mode: str) -> None:
    check_2d(x, "x")
    check_float_input(x, "x")
    check_choice(mode, ACT_QUANT_MODES[1:], "mode")
