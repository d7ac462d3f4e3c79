"""Activation quantization: the written spec (dynamic, computed from the data at every call).

Modes (``act_quant`` of :func:`moe_ops.grouped_mm`):
``int8_token``  per row, symmetric: s = absmax(row) / 127, q = int8(clamp(round(x / s), -127, 127)),
                scale float32 ``[M, 1]``. The GEMM multiplies q by integer weight values with int32
                accumulation (exact integer products) and applies the scales after.
``fp8_token``   per row, e4m3: s = absmax(row) / 448, q = float8_e4m3fn(clamp(x / s, -448, 448)),
                scale ``[M, 1]``.
``fp8_1x128``   as ``fp8_token`` over each row and 128 columns of K: scale ``[M, ceil(K/128)]``.

A unit that is all zeros has scale 0 and codes 0 (safe denominator: no NaN). Arithmetic is
float32 (float64 for float64 inputs, used only by the float64 oracle).

The same per-row/per-block rule quantizes the operands of the FP8 training recipes
(:mod:`moe_ops.recipes`), through :func:`quantize_blocks_lastdim`.
"""
from __future__ import annotations

import torch

from .formats import BLOCK

ACT_QUANT_MODES = ("none", "int8_token", "fp8_token", "fp8_1x128")
E4M3 = torch.float8_e4m3fn
E4M3_MAX = 448.0


def _work(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def quantize_blocks_lastdim(x: torch.Tensor, block: int, target: torch.dtype):
    """Quantize ``x`` ``[..., C]`` symmetrically over blocks of ``block`` columns.

    ``target`` is ``torch.int8`` (qmax 127, rounded) or a float8 dtype (qmax its max).
    Returns ``(q, scale)`` with ``scale`` float32 ``[..., ceil(C / block)]``.
    """
    C = x.shape[-1]
    nb = -(-C // block) if C > 0 else 0
    xf = x.to(_work(x))
    pad = nb * block - C
    xp = torch.nn.functional.pad(xf, (0, pad)) if pad else xf
    blocks = xp.reshape(*x.shape[:-1], nb, block)
    qmax = 127.0 if target == torch.int8 else float(torch.finfo(target).max)
    scale = blocks.abs().amax(dim=-1) / qmax
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))
    v = blocks / safe.unsqueeze(-1)
    v = torch.round(v).clamp(-127, 127) if target == torch.int8 else v.clamp(-qmax, qmax)
    q = v.reshape(*x.shape[:-1], nb * block)[..., :C].to(target)
    return q, scale.to(torch.float32)


def quantize_act(x: torch.Tensor, mode: str):
    """``(q, scale)`` of 2-D activations ``x`` ``[M, K]`` for ``mode`` (see the module doc)."""
    K = x.shape[-1]
    if mode == "int8_token":
        return quantize_blocks_lastdim(x, max(K, 1), torch.int8)
    if mode == "fp8_token":
        return quantize_blocks_lastdim(x, max(K, 1), E4M3)
    if mode == "fp8_1x128":
        return quantize_blocks_lastdim(x, BLOCK, E4M3)
    raise ValueError(f"act_quant: unknown mode {mode!r}; expected one of {ACT_QUANT_MODES}")


def dequantize_blocks_lastdim(q: torch.Tensor, scale: torch.Tensor, block: int,
                              dtype: torch.dtype) -> torch.Tensor:
    """``q * scale`` with each scale broadcast over its ``block`` columns, in ``dtype``."""
    full = scale.to(dtype).repeat_interleave(block, dim=-1)[..., : q.shape[-1]]
    return q.to(dtype) * full


def act_block(mode: str, K: int) -> int:
    """Columns covered by one activation scale for ``mode``."""
    return BLOCK if mode == "fp8_1x128" else max(K, 1)
