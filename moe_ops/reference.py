"""The reference path: plain PyTorch, exact to the written spec; the CPU implementation of
every operator and the oracle of every test (call it with float64 inputs for a float64 oracle).

The only opaque piece is ``moe_ops::_segment_mm``, the per-expert GEMM over row segments given
by ``offs``; everything around it (dequantization, activation and recipe quantization, scaling)
is traceable, so Inductor compiles it on the CPU. Compute precision: float32 for 16/32-bit
inputs (float64 for integer accumulations, which stay exact), float64 for float64 inputs.
"""
from __future__ import annotations

import torch

from . import formats, recipes
from .activations import act_block, dequantize_blocks_lastdim, quantize_act

@torch.library.custom_op("moe_ops::_segment_mm", mutates_args=())
def segment_mm(a: torch.Tensor, b: torch.Tensor, offs: torch.Tensor, layout: str) -> torch.Tensor:
    """Per-expert GEMM over row segments ``[offs[e-1], offs[e])`` (the segment of e = 0 starts at 0).

    ``nt``: a ``[M, K]``, b ``[E, N, K]`` -> ``[M, N]``, ``out[g] = a[g] @ b[e]^T``.
    ``nn``: a ``[M, N]``, b ``[E, N, K]`` -> ``[M, K]``, ``out[g] = a[g] @ b[e]``.
    ``tn``: a ``[M, N]``, b ``[M, K]``, E = len(offs) -> ``[E, N, K]``, ``out[e] = a[g]^T @ b[g]``.
    Rows at or past ``offs[-1]`` give zero rows (``nt``/``nn``) and are ignored (``tn``);
    experts with no rows give zeros. a and b share a float dtype, which is the output's.
    """
    if a.device.type != "cpu":
        return _segment_mm_grouped(a, b, offs, layout)
    ends = offs.tolist()  # CPU tensor: no device synchronisation
    E = len(ends)
    if layout == "tn":
        out = a.new_zeros(E, a.shape[1], b.shape[1])
    else:
        out = a.new_zeros(a.shape[0], b.shape[1] if layout == "nt" else b.shape[2])
    start = 0
    for e, end in enumerate(ends):
        if end > start:
            if layout == "nt":
                out[start:end] = a[start:end] @ b[e].t()
            elif layout == "nn":
                out[start:end] = a[start:end] @ b[e]
            else:
                out[e] = a[start:end].t() @ b[start:end]
        start = max(start, end)
    return out


def _segment_mm_grouped(a, b, offs, layout):
    """GPU fallback through ``torch._grouped_mm`` in bf16 (float32 accumulation); used only for
    combinations that have no Triton kernel yet. Sync-free."""
    a16, b16 = a.to(torch.bfloat16), b.to(torch.bfloat16)
    M = a.shape[0]
    if layout == "tn":
        return torch._grouped_mm(a16.t(), b16, offs=offs).to(a.dtype)
    bb = b16.transpose(-2, -1) if layout == "nt" else b16
    out = torch._grouped_mm(a16, bb.contiguous() if layout == "nn" else bb, offs=offs)
    rows = torch.arange(M, device=a.device)
    valid = (rows < offs[-1].to(rows.dtype)).unsqueeze(1)
    return torch.where(valid, out, torch.zeros((), dtype=out.dtype, device=out.device)).to(a.dtype)


def _work(t: torch.Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def _row_experts(offs: torch.Tensor, M: int) -> torch.Tensor:
    """Expert index of each row (``E`` for rows at or past ``offs[-1]``), int64 ``[M]``."""
    rows = torch.arange(M, device=offs.device, dtype=torch.int64)
    return torch.searchsorted(offs.to(torch.int64), rows, right=True)


def integer_weight_values(w, w_zero, w_format, granularity, group_size):
    """Integer values ``q - z`` of int weights as float64 ``[E, N, K]`` (exact)."""
    spec = formats.get_format(w_format)
    N = w.shape[1]
    K = w.shape[2] * spec.pack
    if spec.symmetric and spec.bits == 8:
        return w.to(torch.float64)
    q = formats.unpack_codes(w, spec.bits).to(torch.float64)
    if spec.has_zero:
        return q - formats.expand_scale(w_zero.to(torch.float64), granularity, N, K, group_size)
    return q - spec.implicit_zero


def _int8_token_mm(x, w, w_scale, w_zero, offs, w_format, granularity, group_size):
    """W8A8 / W4A8: exact integer accumulation, then the scales (see ``grouped_mm``)."""
    M, K = x.shape
    E, N = w.shape[0], w.shape[1]
    work = _work(x)
    qx, sx = quantize_act(x, "int8_token")
    qx64 = qx.to(torch.float64)
    wv = integer_weight_values(w, w_zero, w_format, granularity, group_size)
    eid = _row_experts(offs, M).clamp(max=max(E - 1, 0))
    if granularity == "group":
        G = K // group_size
        y = torch.zeros(M, N, dtype=work, device=x.device)
        for g in range(G):
            sl = slice(g * group_size, (g + 1) * group_size)
            acc = segment_mm(qx64[:, sl].contiguous(), wv[:, :, sl].contiguous(), offs, "nt")
            y = y + acc.to(work) * w_scale[:, :, g].to(work)[eid]
        y = y * sx.to(work)
    else:
        acc = segment_mm(qx64, wv, offs, "nt")
        sw = w_scale.to(work).expand(E, N, 1)[:, :, 0][eid]
        y = (acc.to(work) * sx.to(work)) * sw
    return y


def grouped_mm(x, w, w_scale, w_zero, offs, w_format, granularity, group_size, act_quant, recipe):
    """``y[g] = x[g] @ W[e]^T`` per the spec; ``[M, N]`` in ``x.dtype``.

    * plain weights, no recipe: ``x @ W^T`` in float32 (float64 for float64 x).
    * quantized weights, ``act_quant='none'``: W dequantized to ``x.dtype`` (rounded once), then
      as above.
    * ``int8_token``: acc = sum_k qx * (u - z), exact; channel/tensor scales:
      ``y = (float32(acc) * sx) * sw``; group scales: ``y = sx * sum_g float32(acc_g) * s_g``.
    * ``fp8_token`` / ``fp8_1x128``: ``dequant(qx) @ dequant(W)^T`` in float32.
    * recipes: the dequantized operands of :func:`moe_ops.recipes.forward_operands`.
    """
    work = _work(x)
    if recipe != "none":
        xh, wh = recipes.forward_operands(x, w, recipe)
        y = segment_mm(xh.to(work), wh.to(work), offs, "nt")
    elif act_quant == "int8_token":
        y = _int8_token_mm(x, w, w_scale, w_zero, offs, w_format, granularity, group_size)
    elif act_quant != "none":
        qx, sx = quantize_act(x, act_quant)
        xh = dequantize_blocks_lastdim(qx, sx, act_block(act_quant, x.shape[1]), work)
        wh = formats.dequantize(w, w_scale, w_zero, w_format, granularity, group_size, work)
        y = segment_mm(xh, wh, offs, "nt")
    else:
        wh = w if w_format == "none" else formats.dequantize(w, w_scale, w_zero, w_format, granularity,
                                                             group_size, x.dtype)
        y = segment_mm(x.to(work), wh.to(work), offs, "nt")
    if recipe == "none" and act_quant == "int8_token":
        M = x.shape[0]
        valid = (_row_experts(offs, M) < w.shape[0]).unsqueeze(1)
        y = torch.where(valid, y, torch.zeros((), dtype=y.dtype, device=y.device))
    return y.to(x.dtype)


def grouped_mm_dgrad(dy, w, w_scale, w_zero, offs, w_format, granularity, group_size, recipe):
    """``dx[g] = dy[g] @ W[e]``; ``[M, K]`` in ``dy.dtype``. Quantized W is dequantized to
    ``dy.dtype``; recipes use :func:`moe_ops.recipes.dgrad_operands`."""
    work = _work(dy)
    if recipe != "none":
        dyh, wh = recipes.dgrad_operands(dy, w, recipe)
    else:
        dyh = dy
        wh = w if w_format == "none" else formats.dequantize(w, w_scale, w_zero, w_format, granularity,
                                                             group_size, dy.dtype)
    return segment_mm(dyh.to(work), wh.to(work), offs, "nn").to(dy.dtype)


def grouped_mm_wgrad(dy, x, offs, recipe):
    """``dW[e] = dy[g]^T @ x[g]``; ``[E, N, K]`` in ``dy.dtype``, zeros for empty experts;
    recipes use :func:`moe_ops.recipes.wgrad_operands`."""
    work, out_dtype = _work(dy), dy.dtype
    if recipe != "none":
        dy, x = recipes.wgrad_operands(dy, x, offs, recipe)
    return segment_mm(dy.to(work), x.to(work), offs, "tn").to(out_dtype)
