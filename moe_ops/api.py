"""The public Python API: quantize, dequantize, grouped GEMM (thin wrappers over the operators)."""
from __future__ import annotations

from typing import Optional, Union

import torch

from . import checks, formats
from .quantized_weight import QuantizedWeight

WeightLike = Union[torch.Tensor, QuantizedWeight]


def quantize_weight(w: torch.Tensor, format: str, granularity: str = "group",
                    group_size: int = 128) -> QuantizedWeight:
    """Quantize expert weights ``w`` ``[E, N, K]`` to ``format`` (see :mod:`moe_ops.formats`).

    ``granularity`` is ``group`` (``group_size`` a positive divisor of K), ``channel``,
    ``tensor`` or ``block`` (fp8 only); plain formats (``bf16``, ``fp16``, ``fp32``) ignore it.
    """
    spec = formats.get_format(format)
    checks.check_quantize_weight(w, format, granularity, group_size)
    shape = tuple(w.shape)
    if spec.kind == "float":
        return QuantizedWeight(w.detach().to(spec.storage), None, None, format, "none", 0, shape, spec.storage)
    gs = group_size if granularity == "group" else 0
    parts = torch.ops.moe_ops.quantize_weight(w.detach(), format, granularity, gs)
    zero = parts[2] if len(parts) == 3 else None
    return QuantizedWeight(parts[0], parts[1], zero, format, granularity, gs, shape, w.dtype)


def dequantize_weight(qw: QuantizedWeight, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """``[E, N, K]`` weights in ``dtype`` (default: ``qw.dtype``, the original weights' dtype)."""
    if not isinstance(qw, QuantizedWeight):
        raise TypeError(f"qw: expected a QuantizedWeight, got {type(qw).__name__}")
    dtype = qw.dtype if dtype is None else dtype
    if qw.is_plain:
        return qw.data.to(dtype)
    return torch.ops.moe_ops.dequantize_weight(qw.data, qw.scale, qw.zero, qw.format, qw.granularity,
                                               qw.group_size, dtype)


def grouped_mm(x: torch.Tensor, w: WeightLike, offs: torch.Tensor, *, act_quant: Optional[str] = None,
               recipe: Optional[str] = None) -> torch.Tensor:
    """Grouped GEMM ``y[g] = x[g] @ W[e]^T`` (as ``torch._grouped_mm(x, W.transpose(-2, -1), offs)``).

    x ``[M, K]`` with rows sorted by expert; ``offs`` ``[E]`` int32, the cumulative end row of
    each expert (rows at or past ``offs[-1]`` give zeros); ``w`` a plain ``[E, N, K]`` tensor
    (trainable, optionally with ``recipe`` ``fp8_rowwise``/``fp8_blockwise``) or a
    :class:`QuantizedWeight` (optionally with ``act_quant`` ``int8_token``/``fp8_token``/
    ``fp8_1x128``). Returns ``[M, N]`` in ``x.dtype``. Differentiable in ``x`` always and in
    plain ``w``. With ``recipe='fp8_blockwise'`` under autograd, W is cast once for forward and
    dgrad (``recipe_weights`` + ``grouped_mm_recipe``: the same numbers as ``grouped_mm`` with
    the recipe, W^T's fp8 codes held until backward).
    """
    act = "none" if act_quant is None else act_quant
    rec = "none" if recipe is None else recipe
    if isinstance(w, QuantizedWeight):
        if rec != "none":
            raise ValueError(f"recipe: training recipe {rec!r} needs plain trainable weights, not a QuantizedWeight")
        args = w.op_args()
        for t, name in ((args[1], "scale"), (args[2], "zero")):
            if t is not None and t.requires_grad:
                raise RuntimeError(f"w.{name}: quantized weights get no gradient; pass tensors that do not require grad")
    elif isinstance(w, torch.Tensor):
        args = (w, None, None, "none", "none", 0)
    else:
        raise TypeError(f"w: expected a torch.Tensor or a QuantizedWeight, got {type(w).__name__}")
    wd, ws, wz, fmt, gran, gs = args
    if rec == "fp8_blockwise" and torch.is_grad_enabled() and (w.requires_grad or x.requires_grad):
        # training: W's and W^T's codes from one read of W, W^T's kept for the dgrad GEMM
        # (E*N*K bytes held until backward) instead of a second cast of W there
        wq, wq_scale, wtq, wtq_scale = torch.ops.moe_ops.recipe_weights(w.detach(), rec)
        return torch.ops.moe_ops.grouped_mm_recipe(x, w, wq, wq_scale, wtq, wtq_scale, offs, rec)
    return torch.ops.moe_ops.grouped_mm(x, wd, ws, wz, offs, fmt, gran, gs, act, rec)


def quantize_act(x: torch.Tensor, mode: str):
    """``(q, scale)`` of activations ``x`` ``[M, K]``; see :mod:`moe_ops.activations`."""
    q, s = torch.ops.moe_ops.quantize_act(x, mode)
    return q, s
