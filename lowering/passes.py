"""Graph passes that rewrite grouped GEMMs model code already writes into moe_ops operators.

They run on Dynamo's graph before AOTAutograd (Inductor's ``pre_grad_custom_pass``), so the
rewritten operators bring their own autograd formulas: forward and backward both run ours.

1. ``torch._grouped_mm(x, b, offs=offs)`` with 2-D ``x`` and 3-D 16/32-bit ``b`` (``[E, K, N]``,
   typically ``w.transpose(-2, -1)`` of ``[E, N, K]`` weights, as transformers' grouped-mm
   experts and torchtitan write it) -> ``moe_ops.grouped_mm(x, w, offs)``; where ``b`` is not
   a transpose, the transpose is inserted (a view: the kernels take any strides).
2. The same with ``b`` (or our own ``grouped_mm``'s plain weight) coming from
   ``moe_ops.dequantize_weight`` in x's dtype -> the fused quantized ``grouped_mm`` on the
   stored data, scales and zero points.

A node is left alone unless every fact the rewrite needs is known from its example values
(dims, dtypes, no ``bias``/``out_dtype``); graphs without a match come out unchanged.
``policy`` says where pass 1 applies: ``"always"``, or ``"auto"``: devices where aten has no
grouped GEMM kernel or a slower one (XPU, CUDA before compute capability 9.0, the CPU); on
Hopper our bf16 kernels measured 1.04x aten's at prefill (benchmarks/results/forward_h100.md),
too close to swap by default. Pass 2 always applies (aten has no fused form).

Not here yet: the SwiGLU (silu(gate) * up) and the weighted ``index_add_`` combine patterns.
"""
from __future__ import annotations

import torch
import torch.fx

_TRANSPOSE_DIMS = {(-2, -1), (-1, -2), (1, 2), (2, 1)}
_FLOATS = (torch.bfloat16, torch.float16, torch.float32)


def _val(node):
    return node.meta.get("example_value", node.meta.get("val")) if isinstance(node, torch.fx.Node) else None


def _is_dequantize(node) -> bool:
    return (isinstance(node, torch.fx.Node) and node.op == "call_function"
            and node.target in (torch.ops.moe_ops.dequantize_weight, torch.ops.moe_ops.dequantize_weight.default))


def _is_our_grouped_mm(node) -> bool:
    return node.op == "call_function" and node.target in (torch.ops.moe_ops.grouped_mm,
                                                          torch.ops.moe_ops.grouped_mm.default)


def _untransposed(b: torch.fx.Node):
    """``w`` when ``b`` is ``w.transpose`` of the last two dims of a 3-D ``w``, else None."""
    if b.op == "call_method" and b.target == "transpose" and len(b.args) == 3:
        src, d0, d1 = b.args
    elif b.op == "call_function" and b.target is torch.transpose and len(b.args) == 3:
        src, d0, d1 = b.args
    else:
        return None
    return src if (d0, d1) in _TRANSPOSE_DIMS else None


def _dequantize_args(w, dtype):
    """``(data, scale, zero, format, granularity, group_size)`` of a ``dequantize_weight`` node
    that produces ``dtype``, else None."""
    if not _is_dequantize(w):
        return None
    names = ("data", "scale", "zero", "format", "granularity", "group_size", "dtype")
    a = dict(zip(names, w.args))
    a.update(w.kwargs)
    if a.get("dtype") != dtype:
        return None
    return tuple(a[n] for n in names[:6])


def _prefer_ours(device: torch.device, policy: str) -> bool:
    if policy == "always":
        return True
    if device.type == "cuda":
        return torch.cuda.get_device_capability(device) < (9, 0)
    return device.type in ("xpu", "cpu")


def rewrite_grouped_mm(graph: torch.fx.Graph, policy: str = "auto") -> int:
    """Passes 1 and 2 on ``graph`` in place; returns the number of rewritten nodes."""
    if policy not in ("auto", "always"):
        raise ValueError(f"policy: expected 'auto' or 'always', got {policy!r}")
    count = 0
    for node in list(graph.nodes):
        if node.op != "call_function":
            continue
        if node.target is torch._grouped_mm:
            count += _rewrite_aten(graph, node, policy)
        elif _is_our_grouped_mm(node):
            count += _fuse_dequantize(graph, node)
    if count:
        graph.eliminate_dead_code()
    return count


def _rewrite_aten(graph, node, policy) -> int:
    names = ("mat_a", "mat_b", "offs", "bias", "out_dtype")
    a = dict(zip(names, node.args))
    a.update(node.kwargs)
    x, b, offs = a.get("mat_a"), a.get("mat_b"), a.get("offs")
    if offs is None or a.get("bias") is not None or a.get("out_dtype") is not None:
        return 0
    xv, bv, ov = _val(x), _val(b), _val(offs)
    if xv is None or bv is None or ov is None or xv.dim() != 2 or bv.dim() != 3:
        return 0
    if xv.dtype not in _FLOATS or bv.dtype != xv.dtype or ov.dtype != torch.int32 or ov.dim() != 1:
        return 0
    if not _prefer_ours(xv.device, policy):
        return 0
    w = _untransposed(b)
    with graph.inserting_before(node):
        if w is None:
            w = graph.call_function(torch.transpose, (b, -2, -1))
            w.meta["example_value"] = bv.transpose(-2, -1)
        q = _dequantize_args(w, xv.dtype)
        wargs = q if q is not None else (w, None, None, "none", "none", 0)
        new = graph.call_function(torch.ops.moe_ops.grouped_mm.default,
                                  (x, wargs[0], wargs[1], wargs[2], offs, *wargs[3:], "none", "none"))
    new.meta.update(node.meta)
    node.replace_all_uses_with(new)
    graph.erase_node(node)
    return 1


def _fuse_dequantize(graph, node) -> int:
    """``grouped_mm(x, dequantize_weight(...), None, None, offs, 'none', ...)`` -> fused."""
    names = ("x", "w", "w_scale", "w_zero", "offs", "w_format", "granularity", "group_size", "act_quant", "recipe")
    a = dict(zip(names, node.args))
    a.update(node.kwargs)
    if a.get("w_format", "none") != "none" or a.get("recipe", "none") != "none":
        return 0
    xv = _val(a["x"])
    q = _dequantize_args(a["w"], None if xv is None else xv.dtype)
    if q is None:
        return 0
    with graph.inserting_before(node):
        new = graph.call_function(torch.ops.moe_ops.grouped_mm.default,
                                  (a["x"], q[0], q[1], q[2], a["offs"], *q[3:], a.get("act_quant", "none"), "none"))
    new.meta.update(node.meta)
    node.replace_all_uses_with(new)
    graph.erase_node(node)
    return 1
