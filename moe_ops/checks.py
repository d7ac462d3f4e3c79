"""The one set of input checks shared by the eager implementations and the fake kernels.

Every check raises ``ValueError`` (bad value, shape or dtype) or ``RuntimeError`` (device
mismatch) naming the argument, before any kernel runs. Shapes may be SymInts (fake mode).
"""
from __future__ import annotations

from typing import Optional

import torch

from . import formats
from .activations import ACT_QUANT_MODES
from .recipes import RECIPES, gemm_modes

FP8_RECIPES = tuple(r for r in RECIPES if r != "none")

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


def check_group_size(granularity: str, group_size: int, K, arg: str = "group_size") -> None:
    if granularity == "group":
        if not isinstance(group_size, int) or group_size <= 0:
            raise ValueError(f"{arg}: must be a positive int for granularity='group', got {group_size!r}")
        if K % group_size != 0:
            raise ValueError(f"{arg}: {group_size} does not divide K={K}")


def check_weight(w: torch.Tensor, w_scale: Optional[torch.Tensor], w_zero: Optional[torch.Tensor],
                 w_format: str, granularity: str, group_size: int, ref: torch.Tensor, ref_arg: str,
                 arg: str = "w"):
    """Stored weights of ``w_format`` (``"none"``: a plain ``[E, N, K]`` float tensor), named
    ``arg`` (its scales ``{arg}_scale``, zero points ``{arg}_zero``) in messages.

    Returns ``(E, N, K)`` with K the logical in-features.
    """
    sa, za = f"{arg}_scale", f"{arg}_zero"
    if w.dim() != 3:
        raise ValueError(f"{arg}: expected a 3-D [E, N, K] tensor, got shape {tuple(w.shape)}")
    check_same_device(w, ref, arg, ref_arg)
    if w_format == "none":
        if w.dtype != ref.dtype:
            raise ValueError(f"{arg}: dtype {w.dtype} does not match {ref_arg}'s dtype {ref.dtype}")
        for t, name in ((w_scale, sa), (w_zero, za)):
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
        raise ValueError(f"{arg}: format {w_format} stores {spec.storage}, got {w.dtype}")
    E, N, K = w.shape[0], w.shape[1], w.shape[2] * spec.pack
    check_group_size(granularity, group_size, K, "group_size" if arg == "w" else f"group_size{arg[1:]}")
    expected = formats.scale_shape(granularity, E, N, K, group_size)
    if w_scale is None:
        raise ValueError(f"{sa}: format {w_format} needs float32 scales of shape {expected}")
    if w_scale.dtype != torch.float32:
        raise ValueError(f"{sa}: expected dtype torch.float32, got {w_scale.dtype}")
    if tuple(w_scale.shape) != tuple(expected):
        raise ValueError(f"{sa}: expected shape {tuple(expected)} for {granularity} granularity, "
                         f"got {tuple(w_scale.shape)}")
    check_same_device(w_scale, ref, sa, ref_arg)
    if spec.has_zero:
        if w_zero is None:
            raise ValueError(f"{za}: format {w_format} needs uint8 zero points of shape {tuple(expected)}")
        if w_zero.dtype != torch.uint8:
            raise ValueError(f"{za}: expected dtype torch.uint8, got {w_zero.dtype}")
        if tuple(w_zero.shape) != tuple(expected):
            raise ValueError(f"{za}: expected shape {tuple(expected)}, got {tuple(w_zero.shape)}")
        check_same_device(w_zero, ref, za, ref_arg)
    elif w_zero is not None:
        raise ValueError(f"{za}: must be None for symmetric format {w_format}")
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


def check_recipe_weights(w: torch.Tensor, recipe: str) -> None:
    """Checks of ``recipe_weights``: plain float ``[E, N, K]`` weights, an FP8 recipe."""
    if w.dim() != 3:
        raise ValueError(f"w: expected a 3-D [E, N, K] tensor, got shape {tuple(w.shape)}")
    check_float_input(w, "w")
    check_choice(recipe, FP8_RECIPES, "recipe")


def check_grouped_mm_recipe(x, w, wq, wq_scale, wtq, wtq_scale, offs, recipe):
    """Checks of ``grouped_mm_recipe``: x and plain w as ``grouped_mm`` with ``recipe``, and the
    recipe's fp8 e4m3 operands of W ``[E, N, K]`` and of W^T ``[E, K, N]`` (as
    ``recipe_weights`` returns them). Returns ``(M, N, K, E)``."""
    check_choice(recipe, FP8_RECIPES, "recipe")
    M, N, K, E = check_grouped_mm(x, w, None, None, offs, "none", "none", 0, "none", recipe)
    gran = gemm_modes(recipe)[1]
    for data, scale, arg, shape in ((wq, wq_scale, "wq", (E, N, K)), (wtq, wtq_scale, "wtq", (E, K, N))):
        got = check_weight(data, scale, None, "fp8_e4m3", gran, 0, x, "x", arg=arg)
        if tuple(got) != shape:
            raise ValueError(f"{arg}: expected the recipe's codes of shape {shape} (w {tuple(w.shape)}), got {tuple(got)}")
    return M, N, K, E


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


# ----------------------------------------------------------------------------- routing
SCORINGS = ("softmax", "sigmoid")  # router score functions of moe_ops::topk_route


def _check_top_k_and_bias(top_k: int, E, bias: Optional[torch.Tensor], ref: torch.Tensor, ref_arg: str) -> None:
    if not isinstance(top_k, int) or not 1 <= top_k <= E:
        raise ValueError(f"top_k: must be an int in [1, {E}] (the number of experts), got {top_k!r}")
    if bias is not None:
        if bias.dim() != 1 or bias.shape[0] != E:
            raise ValueError(f"bias: expected shape ({E},) (one per expert), got {tuple(bias.shape)}")
        check_same_device(bias, ref, "bias", ref_arg)


def check_topk_route(logits: torch.Tensor, top_k: int, scoring: str, bias: Optional[torch.Tensor],
                     num_groups: int = 1, topk_groups: int = 1) -> None:
    check_2d(logits, "logits")
    check_float_input(logits, "logits")
    check_choice(scoring, SCORINGS, "scoring")
    E = logits.shape[1]
    if not isinstance(num_groups, int) or num_groups < 1 or E % num_groups != 0:
        raise ValueError(f"num_groups: must be a positive int dividing the {E} experts, got {num_groups!r}")
    if not isinstance(topk_groups, int) or not 1 <= topk_groups <= num_groups:
        raise ValueError(f"topk_groups: must be an int in [1, num_groups={num_groups}], got {topk_groups!r}")
    if num_groups > 1 and top_k > topk_groups * (E // num_groups):
        raise ValueError(f"top_k: {top_k} exceeds the {topk_groups * (E // num_groups)} experts of the "
                         f"{topk_groups} kept groups")
    _check_top_k_and_bias(top_k, E, bias, logits, "logits")


def check_router_route(x: torch.Tensor, router_weight: torch.Tensor, top_k: int, scoring: str,
                       bias: Optional[torch.Tensor], semaphore: Optional[torch.Tensor]) -> None:
    """``x`` ``[T, H]``, ``router_weight`` ``[E, H]`` of ``x``'s dtype and device, the routing
    arguments as :func:`check_topk_route` (no group-limited selection), ``semaphore`` int32
    ``[1]`` on the same device."""
    check_2d(x, "x")
    check_float_input(x, "x")
    check_2d(router_weight, "router_weight")
    if router_weight.dtype != x.dtype:
        raise ValueError(f"router_weight: expected x's dtype {x.dtype}, got {router_weight.dtype}")
    if router_weight.shape[1] != x.shape[1]:
        raise ValueError(f"router_weight: expected [E, {x.shape[1]}] (x's hidden size), got "
                         f"{tuple(router_weight.shape)}")
    check_same_device(router_weight, x, "router_weight", "x")
    E = router_weight.shape[0]
    check_choice(scoring, SCORINGS, "scoring")
    _check_top_k_and_bias(top_k, E, bias, x, "x")
    if semaphore is not None:
        if semaphore.dtype != torch.int32 or semaphore.numel() != 1:
            raise ValueError(f"semaphore: expected one int32 element, got {semaphore.dtype} of shape "
                             f"{tuple(semaphore.shape)}")
        check_same_device(semaphore, x, "semaphore", "x")


def check_row_index(t: torch.Tensor, arg: str, allowed=(torch.int32,)) -> None:
    if t.dtype not in allowed:
        raise ValueError(f"{arg}: expected dtype in {allowed}, got {t.dtype}")


def check_sort_rows(topk_ids: torch.Tensor, num_experts: int) -> None:
    check_2d(topk_ids, "topk_ids")
    check_row_index(topk_ids, "topk_ids", (torch.int32, torch.int64))
    if not isinstance(num_experts, int) or num_experts < 1:
        raise ValueError(f"num_experts: must be a positive int, got {num_experts!r}")


def check_sorted_rows(sorted_rows: torch.Tensor, T, top_k: int, ref: torch.Tensor, ref_arg: str) -> None:
    """``sorted_rows``: int32 ``[T * top_k]`` on ``ref``'s device."""
    check_row_index(sorted_rows, "sorted_rows")
    if sorted_rows.dim() != 1 or sorted_rows.shape[0] != T * top_k:
        raise ValueError(f"sorted_rows: expected shape ({T} * {top_k},) (tokens * top_k), "
                         f"got {tuple(sorted_rows.shape)}")
    check_same_device(sorted_rows, ref, "sorted_rows", ref_arg)


def check_topk_weights(topk_weights: torch.Tensor, T, ref: torch.Tensor, ref_arg: str) -> int:
    """``topk_weights``: float ``[T, top_k]``. Returns top_k."""
    check_2d(topk_weights, "topk_weights")
    if not topk_weights.is_floating_point():
        raise ValueError(f"topk_weights: expected a float tensor, got {topk_weights.dtype}")
    if topk_weights.shape[0] != T:
        raise ValueError(f"topk_weights: has {topk_weights.shape[0]} rows but there are {T} tokens")
    check_same_device(topk_weights, ref, "topk_weights", ref_arg)
    return topk_weights.shape[1]


def check_permute(x: torch.Tensor, sorted_rows: torch.Tensor, top_k: int) -> None:
    check_2d(x, "x")
    if not isinstance(top_k, int) or top_k < 1:
        raise ValueError(f"top_k: must be a positive int, got {top_k!r}")
    check_sorted_rows(sorted_rows, x.shape[0], top_k, x, "x")


def check_unpermute(y: torch.Tensor, sorted_rows: torch.Tensor, topk_weights: torch.Tensor) -> None:
    check_2d(y, "y")
    check_float_input(y, "y")
    T = topk_weights.shape[0] if topk_weights.dim() == 2 else -1
    top_k = check_topk_weights(topk_weights, T, y, "y")
    if y.shape[0] != T * top_k:
        raise ValueError(f"y: has {y.shape[0]} rows but topk_weights {tuple(topk_weights.shape)} "
                         f"needs {T} * {top_k}")
    check_sorted_rows(sorted_rows, T, top_k, y, "y")


def check_expert_mlp(x, topk_weights, sorted_rows, offs, w1, w1_scale, w1_zero, w2, w2_scale, w2_zero,
                     w_format, granularity, group_size1, group_size2, act_quant, recipe):
    """Checks of ``expert_mlp``. Returns ``(T, H, I, E, top_k)``."""
    check_2d(x, "x")
    check_float_input(x, "x")
    T, H = x.shape[0], x.shape[1]
    top_k = check_topk_weights(topk_weights, T, x, "x")
    check_sorted_rows(sorted_rows, T, top_k, x, "x")
    check_act_recipe(w_format, act_quant, recipe)
    E, N1, K1 = check_weight(w1, w1_scale, w1_zero, w_format, granularity, group_size1, x, "x", "w1")
    if K1 != H:
        raise ValueError(f"w1: has K={K1} in-features but x has {H} columns")
    if N1 % 2 != 0:
        raise ValueError(f"w1: needs 2 * I out-features ([gate; up]), got {N1}")
    I = N1 // 2
    E2, N2, K2 = check_weight(w2, w2_scale, w2_zero, w_format, granularity, group_size2, x, "x", "w2")
    if (E2, N2, K2) != (E, H, I):
        raise ValueError(f"w2: expected logical shape {(E, H, I)} ([E, H, I]) to match w1, got {(E2, N2, K2)}")
    check_offs(offs, E, x, "x")
    return T, H, I, E, top_k

