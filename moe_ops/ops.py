"""``torch.library`` definitions of the ``moe_ops`` operators and their device implementations.

Each operator is a ``torch.library.triton_op``: one device-agnostic body that runs the shared
checks, then the CPU reference (``cpu``) or the Triton kernels (``cuda``, ``xpu``). Under
``torch.compile`` Inductor traces the body, so a GPU graph launches our Triton kernels itself.
Fake kernels live in :mod:`moe_ops.meta`; autograd formulas in :mod:`moe_ops.autograd`.

Weights are passed as ``(w, w_scale, w_zero, w_format, granularity, group_size)``:
``w_format='none'`` means ``w`` is a plain float ``[E, N, K]`` tensor (scale and zero None,
granularity ``'none'``); otherwise ``w`` is the stored data of a quantized format
(:mod:`moe_ops.formats`).
"""
from __future__ import annotations

from typing import List, Optional

import torch
from torch.library import triton_op

from . import checks, formats, reference
from .activations import quantize_act as _quantize_act_ref
from .recipes import gemm_modes


def _on_gpu(t: torch.Tensor) -> bool:
    return t.device.type in ("cuda", "xpu")


def _grouped_mm(x, w, w_scale, w_zero, offs, w_format, granularity, group_size, act_quant, recipe):
    """grouped_mm's body after its checks: the Triton kernels on a GPU, else the reference."""
    if _on_gpu(x):
        from .kernels import dispatch
        y = dispatch.grouped_mm(x, w, w_scale, w_zero, offs, w_format, granularity, group_size, act_quant, recipe)
        if y is not None:
            return y
    return reference.grouped_mm(x, w, w_scale, w_zero, offs, w_format, granularity, group_size, act_quant, recipe)


@triton_op("moe_ops::grouped_mm", mutates_args=())
def grouped_mm(x: torch.Tensor, w: torch.Tensor, w_scale: Optional[torch.Tensor], w_zero: Optional[torch.Tensor],
               offs: torch.Tensor, w_format: str = "none", granularity: str = "none", group_size: int = 0,
               act_quant: str = "none", recipe: str = "none") -> torch.Tensor:
    """Grouped forward ``y[g] = x[g] @ W[e]^T``: x ``[M, K]``, offs ``[E]`` int32 -> ``[M, N]``
    in ``x.dtype``; rows at or past ``offs[-1]`` are zeros."""
    checks.check_grouped_mm(x, w, w_scale, w_zero, offs, w_format, granularity, group_size, act_quant, recipe)
    return _grouped_mm(x, w, w_scale, w_zero, offs, w_format, granularity, group_size, act_quant, recipe)


@triton_op("moe_ops::recipe_weights", mutates_args=())
def recipe_weights(w: torch.Tensor, recipe: str) -> List[torch.Tensor]:
    """``[wq, wq_scale, wtq, wtq_scale]``: an FP8 recipe's fp8 e4m3 weight operands of
    plain ``w`` ``[E, N, K]``, for the forward GEMM (W's codes ``[E, N, K]``) and for the
    dgrad GEMM (W^T's ``[E, K, N]``), as :func:`moe_ops.formats.quantize` of W and of W^T:
    ``channel`` scales for ``fp8_rowwise`` (W^T's per (e, k) over N), ``block`` 128x128 for
    ``fp8_blockwise`` (W's tiles transposed; on a GPU both from one read of W)."""
    checks.check_recipe_weights(w, recipe)
    gran = gemm_modes(recipe)[1]
    if _on_gpu(w):
        from .kernels.weight_quant import fp8_weight_quant
        if gran == "block":
            return list(fp8_weight_quant(w, "block", pair=True))
        return [*fp8_weight_quant(w, "channel"), *fp8_weight_quant(w, "channel", transpose=True)]
    data, scale, _ = formats.quantize(w, "fp8_e4m3", gran, 0)
    data_t, scale_t, _ = formats.quantize(w.transpose(1, 2).contiguous(), "fp8_e4m3", gran, 0)
    return [data, scale, data_t, scale_t]


@triton_op("moe_ops::grouped_mm_recipe", mutates_args=())
def grouped_mm_recipe(x: torch.Tensor, w: torch.Tensor, wq: torch.Tensor, wq_scale: torch.Tensor,
                      wtq: torch.Tensor, wtq_scale: torch.Tensor, offs: torch.Tensor, recipe: str) -> torch.Tensor:
    """An FP8 recipe's training forward on weight operands cast beforehand by
    :func:`recipe_weights`: ``y`` equals ``grouped_mm(x, w, ..., recipe=recipe)``. ``w`` (plain,
    trainable) only receives the gradient (the recipe's wgrad); the dgrad GEMM reads
    ``wtq`` / ``wtq_scale``, so backward does not cast W again."""
    checks.check_grouped_mm_recipe(x, w, wq, wq_scale, wtq, wtq_scale, offs, recipe)
    act, gran = gemm_modes(recipe)
    return _grouped_mm(x, wq, wq_scale, None, offs, "fp8_e4m3", gran, 0, act, "none")


@triton_op("moe_ops::grouped_mm_dgrad", mutates_args=())
def grouped_mm_dgrad(dy: torch.Tensor, w: torch.Tensor, w_scale: Optional[torch.Tensor],
                     w_zero: Optional[torch.Tensor], offs: torch.Tensor, w_format: str = "none",
                     granularity: str = "none", group_size: int = 0, recipe: str = "none") -> torch.Tensor:
    """Grouped dgrad ``dx[g] = dy[g] @ W[e]``: dy ``[M, N]`` -> ``[M, K]`` in ``dy.dtype``."""
    checks.check_dgrad(dy, w, w_scale, w_zero, offs, w_format, granularity, group_size, recipe)
    if _on_gpu(dy):
        from .kernels import dispatch
        dx = dispatch.grouped_mm_dgrad(dy, w, w_scale, w_zero, offs, w_format, granularity, group_size, recipe)
        if dx is not None:
            return dx
    return reference.grouped_mm_dgrad(dy, w, w_scale, w_zero, offs, w_format, granularity, group_size, recipe)


@triton_op("moe_ops::grouped_mm_wgrad", mutates_args=())
def grouped_mm_wgrad(dy: torch.Tensor, x: torch.Tensor, offs: torch.Tensor, recipe: str = "none") -> torch.Tensor:
    """Grouped wgrad ``dW[e] = dy[g]^T @ x[g]``: dy ``[M, N]``, x ``[M, K]`` -> ``[E, N, K]`` in
    ``dy.dtype``; experts with no rows get exact zeros."""
    checks.check_wgrad(dy, x, offs, recipe)
    if _on_gpu(dy):
        from .kernels import dispatch
        dw = dispatch.grouped_mm_wgrad(dy, x, offs, recipe)
        if dw is not None:
            return dw
    return reference.grouped_mm_wgrad(dy, x, offs, recipe)


@triton_op("moe_ops::quantize_weight", mutates_args=())
def quantize_weight(w: torch.Tensor, format: str, granularity: str = "group",
                    group_size: int = 128) -> List[torch.Tensor]:
    """``[data, scale]`` (sym) or ``[data, scale, zero]`` (asym) of ``w`` ``[E, N, K]`` in a
    quantized ``format`` (:mod:`moe_ops.formats`)."""
    checks.check_quantize_weight(w, format, granularity, group_size)
    if formats.get_format(format).kind == "float":
        raise ValueError(f"format: {format!r} is a plain format; quantize_weight takes a quantized one")
    data, scale, zero = formats.quantize(w, format, granularity, group_size)
    return [data, scale] if zero is None else [data, scale, zero]


@triton_op("moe_ops::dequantize_weight", mutates_args=())
def dequantize_weight(data: torch.Tensor, scale: Optional[torch.Tensor], zero: Optional[torch.Tensor],
                      format: str, granularity: str, group_size: int, dtype: torch.dtype) -> torch.Tensor:
    """``[E, N, K]`` weights in ``dtype`` from stored ``data``/``scale``/``zero``."""
    ref = torch.empty(0, dtype=dtype, device=data.device)
    checks.check_weight(data, scale, zero, format, granularity, group_size, ref, "data")
    return formats.dequantize(data, scale, zero, format, granularity, group_size, dtype)


@triton_op("moe_ops::quantize_act", mutates_args=())
def quantize_act(x: torch.Tensor, mode: str) -> List[torch.Tensor]:
    """``[q, scale]`` of activations ``x`` ``[M, K]`` for ``mode`` in ``int8_token``,
    ``fp8_token``, ``fp8_1x128`` (:mod:`moe_ops.activations`)."""
    checks.check_act_quant(x, mode)
    if _on_gpu(x):
        from .kernels import dispatch
        q, s = dispatch.quantize_act(x, mode)
    else:
        q, s = _quantize_act_ref(x, mode)
    return [q, s]
