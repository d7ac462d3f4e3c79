"""FP8 training recipes on plain (trainable) weights: which operand is quantized along which dim.

Every operand is quantized to float8_e4m3fn with float32 scales s = absmax / 448 over its unit
(the rule of :func:`moe_ops.activations.quantize_blocks_lastdim`); each GEMM reduces fp8 x fp8
products in float32 and applies the two scales. The functions here return the *dequantized*
operands (q * s, in float32, or float64 for float64 inputs): the emulation that the CPU
reference multiplies and that the GPU kernels must match up to float32 summation order.

``fp8_rowwise``
    forward  ``y = x @ W^T``: x per row (over K), W per output channel (per (e, n), over K).
    dgrad    ``dx = dy @ W``: dy per row (over N), W per (e, k) column (over N).
    wgrad    ``dW = dy^T @ x``: dy and x per column, over all the rows of one expert.
``fp8_blockwise`` (DeepSeek-V3 / DeepGEMM)
    forward  x in 1x128 blocks (a row, 128 columns of K); W in 128x128 tiles.
    dgrad    dy in 1x128 blocks along N; the same 128x128 W tiles, read transposed.
    wgrad    dy and x per column over 128-row blocks that start at each expert's first row and
             never cross an expert boundary (an expert's last block may be short).

Rows at or past ``offs[-1]`` belong to no expert; their values never reach an output.
"""
from __future__ import annotations

import torch

from . import formats
from .activations import E4M3, E4M3_MAX, dequantize_blocks_lastdim, quantize_blocks_lastdim

RECIPES = ("none", "fp8_rowwise", "fp8_blockwise")
BLOCK = formats.BLOCK


def gemm_modes(recipe: str):
    """``(act_quant, granularity)`` of a recipe's forward and dgrad GEMMs: x (or dy) quantized
    per ``act_quant``, fp8 e4m3 weights of ``granularity``."""
    return ("fp8_token", "channel") if recipe == "fp8_rowwise" else ("fp8_1x128", "block")


def _work(t: torch.Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def _rows(t: torch.Tensor, block: int) -> torch.Tensor:
    q, s = quantize_blocks_lastdim(t, block, E4M3)
    return dequantize_blocks_lastdim(q, s, block, _work(t))


def _weight_blocks(w: torch.Tensor) -> torch.Tensor:
    data, scale, _ = formats.quantize(w, "fp8_e4m3", "block", 0)
    return formats.dequantize(data, scale, None, "fp8_e4m3", "block", 0, _work(w))


def forward_operands(x: torch.Tensor, w: torch.Tensor, recipe: str):
    """Dequantized ``(x_hat [M, K], w_hat [E, N, K])`` of the forward GEMM."""
    K = x.shape[-1]
    if recipe == "fp8_rowwise":
        return _rows(x, max(K, 1)), _rows(w, max(K, 1))
    return _rows(x, BLOCK), _weight_blocks(w)


def dgrad_operands(dy: torch.Tensor, w: torch.Tensor, recipe: str):
    """Dequantized ``(dy_hat [M, N], w_hat [E, N, K])`` of the dgrad GEMM."""
    N = dy.shape[-1]
    if recipe == "fp8_rowwise":
        return _rows(dy, max(N, 1)), _rows(w.transpose(1, 2), max(N, 1)).transpose(1, 2)
    return _rows(dy, BLOCK), _weight_blocks(w)


def token_blocks(offs: torch.Tensor, M: int, block: int):
    """Device-side map of rows to token blocks that never cross an expert boundary.

    Returns ``(blk [M] int64, num_blocks)``: ``num_blocks = ceil(M / block) + E + 1`` is a
    static upper bound; rows at or past ``offs[-1]`` map to the last (spare) block.
    ``block <= 0`` means one block per expert (the rowwise recipe).
    """
    E = offs.shape[0]
    rows = torch.arange(M, device=offs.device, dtype=torch.int64)
    offs64 = offs.to(torch.int64)
    eid = torch.searchsorted(offs64, rows, right=True)  # expert of each row; E past the end
    if block <= 0:
        return eid, E + 1
    starts = torch.cat([offs64.new_zeros(1), offs64[:-1]])
    sizes = offs64 - starts
    nblk = (sizes + block - 1) // block
    first = torch.cumsum(nblk, 0) - nblk  # first block index of each expert
    num_blocks = -(-M // block) + E + 1
    e_c = eid.clamp(max=E - 1)
    blk = first[e_c] + (rows - starts[e_c]) // block
    blk = torch.where(eid < E, blk, torch.full_like(blk, num_blocks - 1))
    return blk, num_blocks


def quantize_token_blocks(t: torch.Tensor, offs: torch.Tensor, block: int):
    """fp8 e4m3 ``(q [M, C], scale [num_blocks, C], blk [M])`` per column over token blocks."""
    M, C = t.shape
    blk, nb = token_blocks(offs, M, block)
    tf = t.to(_work(t))
    amax = torch.zeros(nb, C, dtype=tf.dtype, device=t.device)
    amax = amax.scatter_reduce(0, blk.unsqueeze(1).expand(M, C), tf.abs(), reduce="amax", include_self=True)
    scale = amax / E4M3_MAX
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))
    q = (tf / safe[blk]).clamp(-E4M3_MAX, E4M3_MAX).to(E4M3)
    return q, scale.to(torch.float32), blk


def wgrad_operands(dy: torch.Tensor, x: torch.Tensor, offs: torch.Tensor, recipe: str):
    """Dequantized ``(dy_hat [M, N], x_hat [M, K])`` of the wgrad GEMM."""
    block = 0 if recipe == "fp8_rowwise" else BLOCK
    out = []
    for t in (dy, x):
        q, s, blk = quantize_token_blocks(t, offs, block)
        out.append(q.to(_work(t)) * s.to(_work(t))[blk])
    return out[0], out[1]
