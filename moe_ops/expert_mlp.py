"""The fused expert MLP operator ``moe_ops::expert_mlp``: a SwiGLU MoE's experts in two GEMMs.

``out[t] = sum_j topk_weights[t, j] * W2[e] @ (silu(g) * u)``, ``[g; u] = W1[e] @ x[t]``, for the
expert e of each of token t's slots j. Inputs in the layouts of :mod:`moe_ops.routing`:
x ``[T, H]``; topk_weights ``[T, top_k]``; sorted_rows int32 ``[T * top_k]``; offs int32 ``[E]``;
w1 logically ``[E, 2I, H]`` (gate rows, then up rows: Qwen3-MoE / transformers' fused
``gate_up_proj``), w2 logically ``[E, H, I]``, both in one format (``w_format``, granularity;
group sizes per weight since H and I differ). ``act_quant`` quantizes both GEMMs' inputs (W8A8,
W4A8, fp8); ``recipe`` an FP8 training recipe on plain weights. Output ``[T, H]`` in x's dtype.

GPU (:func:`moe_ops.kernels.dispatch.expert_mlp`): two launches of the grouped GEMM kernel.
The first gathers token rows in its loads and applies SwiGLU in its epilogue (the ``[M, 2I]``
gate/up output never goes to memory, only ``h`` ``[M, I]``); under ``int8_token`` it quantizes
x once per token (T rows, not T * top_k) and writes per-row absmax partials of h, from which
the second launch quantizes h to int8 while loading it (no separate quantization pass). The
second multiplies by the routing weight and stores each row at its token-major slot; the
combine is a sum over the top_k slots. 16-bit and packed int4/int2 weight-only at decode sizes (the
``combine`` config of :func:`moe_ops.lowering.kernel_choice.choose_expert_mlp_configs`): the
gate/up launch also writes each slot's row of ``h``, and the down launch is token-major, one
program per token and column block summing the token's slots in float32 (combine included:
one launch fewer, the ``[T * top_k, H]`` rows never written). Elsewhere at up to 8 rows
(``T * top_k``; the ``slot_sum`` config) the row-tile down launch sums the slots itself: the last
program of each column block, counted on int32 counters that the gate/up launch zeroes, adds
every token's rows of that block in slot order (again one launch fewer). Training recipes, combinations
without a fused kernel, weight-only quantized experts above 512 rows per expert, and packed
int4/int2 ones above 16 where the composition's GEMMs can take x by TMA (Hopper; where the
composition measured faster: :func:`moe_ops.lowering.kernel_choice.fused_expert_mlp_pays`) run
:func:`composed`, the same math through the unfused operators.

Backward recomputes rather than saves: the ``[M, 2I]`` gate/up output is recomputed (one
grouped GEMM, a third of the forward FLOPs) instead of being kept alive from forward to
backward (``M * 2I`` elements per layer: 100 MB at Qwen3-30B-A3B's T=4096, 48 layers). The
routing-weight gradient needs the unweighted down output ``y_r``; it uses
``<dout_t, y_r> = <dout_t @ W2, h_r>``, and ``dout_t @ W2`` is the down GEMM's dgrad that
backward computes anyway, so the down GEMM is not recomputed. That identity needs the down GEMM
linear in (h, W2); with quantized activations or an FP8 recipe it is not, and backward
recomputes ``y_r`` with the forward's own quantization instead. Activation quantization is
straight-through, as in ``grouped_mm``. On GPUs the backward's row gathers and slot sums are the
row kernels of :mod:`moe_ops.kernels.row_ops`, and its SwiGLU step (the gate and up gradients,
``<dout_t @ W2, h_r>``, h) is one kernel (:func:`swiglu_backward`). The recompute costs a
gate/up GEMM: ``moe_ops.MoE`` uses this operator for inference and, by default, the unfused
composition when training (measured faster; more activation memory), see its docstring.

With an FP8 recipe, backward casts each weight once (``recipe_weights``: W's and W^T's fp8 codes;
for ``fp8_blockwise`` from one read of W) and runs its four weight GEMMs on those codes: the
gate/up recompute and the ``y_r`` recompute on W's, the two dgrads on W^T's (four casts of a
weight before, two of them of W^T). Forward keeps its own casts and saves none of them: holding
W1's and W2's codes in both layouts from forward to backward would keep ``2 * (E*2I*H + E*H*I)``
bytes per layer alive (1.2 GB at Qwen3-30B-A3B), so backward casts again.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch.library import triton_op

from . import checks
from .recipes import gemm_modes
from .routing import gather_rows, inverse_rows, sum_slots


def composed(x, topk_weights, sorted_rows, offs, w1, w1_scale, w1_zero, w2, w2_scale, w2_zero, w_format,
             granularity, group_size1, group_size2, act_quant, recipe):
    """The unfused composition (the reference path): permute, gate/up grouped GEMM, SwiGLU in
    x's dtype, down grouped GEMM, weighted combine."""
    top_k = topk_weights.shape[1]
    xs = gather_rows(x, sorted_rows, top_k)[0]
    gu = torch.ops.moe_ops.grouped_mm(xs, w1, w1_scale, w1_zero, offs, w_format, granularity, group_size1,
                                      act_quant, recipe)
    gate, up = gu.chunk(2, dim=-1)
    h = F.silu(gate) * up
    y = torch.ops.moe_ops.grouped_mm(h, w2, w2_scale, w2_zero, offs, w_format, granularity, group_size2,
                                     act_quant, recipe)
    return sum_slots(y, sorted_rows, top_k, topk_weights)


@triton_op("moe_ops::expert_mlp", mutates_args=())
def expert_mlp(x: torch.Tensor, topk_weights: torch.Tensor, sorted_rows: torch.Tensor, offs: torch.Tensor,
               w1: torch.Tensor, w1_scale: Optional[torch.Tensor], w1_zero: Optional[torch.Tensor],
               w2: torch.Tensor, w2_scale: Optional[torch.Tensor], w2_zero: Optional[torch.Tensor],
               w_format: str = "none", granularity: str = "none", group_size1: int = 0, group_size2: int = 0,
               act_quant: str = "none", recipe: str = "none") -> torch.Tensor:
    """The experts of a SwiGLU MoE layer for routed tokens; ``[T, H]`` in ``x.dtype`` (see the
    module docstring)."""
    args = (x, topk_weights, sorted_rows, offs, w1, w1_scale, w1_zero, w2, w2_scale, w2_zero, w_format,
            granularity, group_size1, group_size2, act_quant, recipe)
    checks.check_expert_mlp(*args)
    if x.device.type in ("cuda", "xpu"):
        from .kernels import dispatch
        out = dispatch.expert_mlp(*args)
        if out is not None:
            return out
    return composed(*args)


def _setup_context(ctx, inputs, output):
    (x, tw, sorted_rows, offs, w1, w1_scale, w1_zero, w2, w2_scale, w2_zero, w_format, granularity,
     group_size1, group_size2, act_quant, recipe) = inputs
    ctx.meta = (w_format, granularity, group_size1, group_size2, act_quant, recipe)
    ctx.save_for_backward(x, tw, sorted_rows, offs, w1, w1_scale, w1_zero, w2, w2_scale, w2_zero)


def _weight_gemms(w, w_scale, w_zero, offs, w_format, gran, group_size, act_quant, recipe):
    """``(mm, dgrad)``: ``rows -> rows @ W^T`` as the forward computed it and ``rows -> rows @ W``
    as ``grouped_mm_dgrad`` computes it. With an FP8 recipe both read codes from one
    ``recipe_weights`` cast of W (the recipe's forward GEMM on W's codes, its dgrad as the
    forward GEMM on W^T's codes: the same numbers as ``grouped_mm`` / ``grouped_mm_dgrad`` with
    the recipe, which would each cast W again)."""
    ops = torch.ops.moe_ops
    if recipe == "none":
        return (lambda a: ops.grouped_mm(a, w, w_scale, w_zero, offs, w_format, gran, group_size, act_quant,
                                         "none"),
                lambda a: ops.grouped_mm_dgrad(a, w, w_scale, w_zero, offs, w_format, gran, group_size, "none"))
    wq, wq_scale, wtq, wtq_scale = ops.recipe_weights(w.detach(), recipe)
    act, wgran = gemm_modes(recipe)
    return (lambda a: ops.grouped_mm(a, wq, wq_scale, None, offs, "fp8_e4m3", wgran, 0, act, "none"),
            lambda a: ops.grouped_mm(a, wtq, wtq_scale, None, offs, "fp8_e4m3", wgran, 0, act, "none"))


def swiglu_backward(gu: torch.Tensor, dzh: torch.Tensor, rw: torch.Tensor, write_h: bool):
    """``(dgu, per_row, h)`` of the SwiGLU step from the gate/up rows ``gu`` ``[M, 2I]``, the
    gradient at h before the routing weight ``dzh`` ``[M, I]`` and the rows' routing weights
    ``rw`` ``[M]``: ``dgu`` ``[M, 2I]`` in gu's dtype (the gate and up gradients of ``rw * dzh``),
    ``per_row[r] = <dzh[r], h[r]>`` (float32; float64 for float64) and ``h = silu(gate) * up``
    rounded to gu's dtype as the forward rounds it (None unless ``write_h``). One Triton kernel
    on GPUs (:func:`moe_ops.kernels.row_ops.swiglu_backward`)."""
    from .routing import rows_on_gpu
    if rows_on_gpu(gu):
        from .kernels.row_ops import swiglu_backward as kernel
        return kernel(gu, dzh, rw, write_h)
    work = torch.float64 if gu.dtype == torch.float64 else torch.float32
    gate, up = gu.to(work).chunk(2, dim=-1)
    sig = torch.sigmoid(gate)
    silu = gate * sig
    h = (silu * up).to(gu.dtype)
    d = dzh.to(work)
    per_row = (d * h.to(work)).sum(dim=1)
    dh = d * rw.to(work).unsqueeze(1)
    dgu = torch.cat([dh * up * sig * (1 + gate * (1 - sig)), dh * silu], dim=1).to(gu.dtype)
    return dgu, per_row, (h if write_h else None)


def _backward(ctx, dout):
    x, tw, sorted_rows, offs, w1, s1, z1, w2, s2, z2 = ctx.saved_tensors
    w_format, gran, gs1, gs2, act_quant, recipe = ctx.meta
    need = ctx.needs_input_grad
    if w_format != "none" and any(need[i] for i in (4, 5, 6, 7, 8, 9)):
        raise RuntimeError("w1/w2: quantized expert weights get no gradient; train plain weights "
                           "(optionally with recipe=...) and quantize after training")
    ops = torch.ops.moe_ops
    T, top_k = tw.shape
    w1_mm, w1_dgrad = _weight_gemms(w1, s1, z1, offs, w_format, gran, gs1, act_quant, recipe)
    w2_mm, w2_dgrad = _weight_gemms(w2, s2, z2, offs, w_format, gran, gs2, act_quant, recipe)
    xs = gather_rows(x, sorted_rows, top_k)[0]
    gu = w1_mm(xs)  # recomputed
    rw = tw.reshape(-1)[sorted_rows.long()]
    # each row's token gradient dz (rows past offs[-1] are ignored) and, for dW2, rw * dz
    dz, dzw = gather_rows(dout.to(x.dtype), sorted_rows, top_k, rw if need[7] else None)
    dzh = w2_dgrad(dz)  # dout @ W2
    # <dout_t, y_r> = <dout_t @ W2, h_r> needs the down GEMM linear in (h, W2); with quantized
    # operands recompute the forward's y_r instead
    linear = act_quant == "none" and recipe == "none"
    dgu, per_row, h = swiglu_backward(gu, dzh, rw, write_h=need[7] or (need[1] and not linear))
    dx = dtw = dw1 = dw2 = None
    if need[1]:
        if not linear:
            y = w2_mm(h)
            per_row = (dz.float() * y.float()).sum(dim=1)
        dtw = per_row[inverse_rows(sorted_rows)].reshape(T, top_k).to(tw.dtype)
    if need[7]:
        dw2 = ops.grouped_mm_wgrad(dzw, h, offs, recipe).to(w2.dtype)
    if need[4]:
        dw1 = ops.grouped_mm_wgrad(dgu, xs, offs, recipe).to(w1.dtype)
    if need[0]:
        dx = sum_slots(w1_dgrad(dgu), sorted_rows, top_k)
    # one entry per argument as called (trailing defaults are not passed to autograd)
    return (dx, dtw, None, None, dw1, None, None, dw2) + (None,) * (len(need) - 8)


def register() -> None:
    torch.library.register_autograd("moe_ops::expert_mlp", _backward, setup_context=_setup_context)
