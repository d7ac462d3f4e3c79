"""Backward formulas of ``moe_ops::grouped_mm`` and ``moe_ops::grouped_mm_recipe``, wired with
``register_autograd``.

``dx = grouped_mm_dgrad(dy, W)`` for every weight format (frozen quantized experts still pass
gradients to earlier layers; activation quantization is straight-through: dx uses the
dequantized weights, unquantized dy); ``dW = grouped_mm_wgrad(dy, x)`` for plain weights that
require grad. A training recipe's dgrad and wgrad quantize their own operands (see
:mod:`moe_ops.recipes`). Stored quantized data, scales and zero points get no gradient: asking
for one is a ``RuntimeError``.
"""
from __future__ import annotations

import torch

from .recipes import gemm_modes


def _setup_context(ctx, inputs, output):
    x, w, w_scale, w_zero, offs, w_format, granularity, group_size, act_quant, recipe = inputs
    ctx.meta = (w_format, granularity, group_size, recipe)
    ctx.save_for_backward(x, w, w_scale, w_zero, offs)


def _backward(ctx, dy):
    x, w, w_scale, w_zero, offs = ctx.saved_tensors
    w_format, granularity, group_size, recipe = ctx.meta
    need_x, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
    if w_format != "none" and (need_w or ctx.needs_input_grad[2]):
        raise RuntimeError("w: quantized expert weights get no gradient; train plain weights "
                           "(optionally with recipe=...) and quantize after training")
    dy = dy.contiguous()
    dx = dw = None
    if need_x:
        dx = torch.ops.moe_ops.grouped_mm_dgrad(dy, w, w_scale, w_zero, offs, w_format, granularity,
                                                group_size, recipe)
    if need_w:
        dw = torch.ops.moe_ops.grouped_mm_wgrad(dy, x, offs, recipe).to(w.dtype)
    return dx, dw, None, None, None, None, None, None, None, None


def _setup_context_recipe(ctx, inputs, output):
    x, w, wq, wq_scale, wtq, wtq_scale, offs, recipe = inputs
    ctx.recipe = recipe
    ctx.w_dtype = w.dtype
    ctx.save_for_backward(x, wtq, wtq_scale, offs)


def _backward_recipe(ctx, dy):
    """``grouped_mm_recipe``: dx by the forward kernel on W^T's operands cast in forward (the
    recipe's dgrad, no second cast of W), dW by the recipe's wgrad; the cast operands get none."""
    x, wtq, wtq_scale, offs = ctx.saved_tensors
    if any(ctx.needs_input_grad[2:6]):
        raise RuntimeError("wq, wq_scale, wtq, wtq_scale: the recipe's cast weights get no gradient; "
                           "the gradient goes to w")
    act, gran = gemm_modes(ctx.recipe)
    dy = dy.contiguous()
    dx = dw = None
    if ctx.needs_input_grad[0]:
        dx = torch.ops.moe_ops.grouped_mm(dy, wtq, wtq_scale, None, offs, "fp8_e4m3", gran, 0, act, "none")
    if ctx.needs_input_grad[1]:
        dw = torch.ops.moe_ops.grouped_mm_wgrad(dy, x, offs, ctx.recipe).to(ctx.w_dtype)
    return dx, dw, None, None, None, None, None, None


def register() -> None:
    torch.library.register_autograd("moe_ops::grouped_mm", _backward, setup_context=_setup_context)
    torch.library.register_autograd("moe_ops::grouped_mm_recipe", _backward_recipe,
                                    setup_context=_setup_context_recipe)
