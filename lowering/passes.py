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
grouped GEMM kernel or a slower one (XPU, CUDA before compute capability 9.0, the CPU), and
everywhere to the two GEMMs of a gate/up -> SwiGLU -> down pair, which pass 3 then fuses. A
lone GEMM on Hopper stays aten's: our bf16 forward measured 1.01-1.14x aten's at prefill
(benchmarks/results/forward_h100_s19_prefill.md) and our wgrad 0.81-1.0x
(training_h100_s19.md), too close to swap under autograd, while the fused layer measured 1.46x
(moe_layer_h100.md). Pass 2 always applies (aten has no fused form).

3. ``grouped_mm`` (ours, after 1) -> ``chunk(2)`` -> ``silu(gate) * up`` -> ``grouped_mm``
   on the same ``offs`` and format -> ``expert_mlp`` with identity routing (top_k 1, weight 1):
   the ``[M, 2I]`` gate/up output and the SwiGLU pass disappear. Inference graphs only: where the
   pair's outputs require grad, the pair stays two GEMMs (the fused operator's backward
   recomputes the gate/up GEMM and measured slower than the composition's, as ``moe_ops.MoE``'s
   ``fused="auto"`` decides).
4. ``zeros_like(x).index_add_(0, order // k, y * w.reshape(-1)[order].unsqueeze(1))`` (the
   weighted combine of rows sorted by ``order = argsort(ids.reshape(-1))``, ``w`` ``[T, k]``)
   -> ``unpermute(y, order, w)``; and where ``y`` is an identity-routed ``expert_mlp`` of
   ``x[order // k]``, both become one ``expert_mlp(x, w, order, offs, ...)`` whose kernels
   gather the token rows and scatter the weighted rows themselves. transformers' form of the
   combine (``inv[perm] = arange``, ``(y * w.reshape(-1)[perm].unsqueeze(-1))[inv]
   .view(T, k, H).sum(1)``) is matched too.
"""
from __future__ import annotations

import torch
import torch.fx

import operator

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


POLICIES = ("auto", "always")


def check_policy(policy: str) -> None:
    """``policy`` is one of :data:`POLICIES`, else a ValueError naming it."""
    if policy not in POLICIES:
        raise ValueError(f"policy: expected 'auto' or 'always', got {policy!r}")


def rewrite_grouped_mm(graph: torch.fx.Graph, policy: str = "auto") -> int:
    """Passes 1 and 2 on ``graph`` in place; returns the number of rewritten nodes."""
    check_policy(policy)
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


def fuse_moe_patterns(graph: torch.fx.Graph) -> int:
    """Passes 3 and 4 on ``graph`` in place (run after :func:`rewrite_grouped_mm`); returns the
    number of rewrites."""
    count = 0
    for node in list(graph.nodes):
        if _is_our_grouped_mm(node):
            count += _fuse_swiglu(graph, node)
    if count:
        graph.eliminate_dead_code()  # the replaced gate/up GEMMs, so that use counts are real
    for node in list(graph.nodes):
        if node.op == "call_method" and node.target == "index_add_":
            count += _fuse_combine(graph, node)
        elif node.op == "call_method" and node.target == "sum":
            count += _fuse_slot_sum(graph, node)
    if count:
        graph.eliminate_dead_code()
    return count


# ----------------------------------------------------------------------------- pass 3 and 4
def _args(node, names):
    a = dict(zip(names, node.args))
    a.update(node.kwargs)
    return a


_GMM_ARGS = ("x", "w", "w_scale", "w_zero", "offs", "w_format", "granularity", "group_size", "act_quant", "recipe")
_GMM_DEFAULTS = dict(w_format="none", granularity="none", group_size=0, act_quant="none", recipe="none")


def _gmm(node):
    a = _args(node, _GMM_ARGS)
    return {**_GMM_DEFAULTS, **a}


def _is(node, op, target) -> bool:
    return isinstance(node, torch.fx.Node) and node.op == op and (node.target == target or node.target is target)


def _chunk_half(node, source):
    """``node`` is ``chunk(source, 2, dim=-1)[i]``: returns i, else None."""
    if not (_is(node, "call_function", operator.getitem) and isinstance(node.args[1], int)):
        return None
    ch = node.args[0]
    if _is(ch, "call_method", "chunk") or _is(ch, "call_function", torch.chunk):
        a = _args(ch, ("input", "chunks", "dim"))
        if a.get("input") is source and a.get("chunks") == 2 and a.get("dim", 0) in (-1, 1):
            return node.args[1]
    return None


def _swiglu_source(h, is_gmm):
    """``g1`` when ``h`` is ``silu(g1.chunk(2)[0]) * g1.chunk(2)[1]`` with ``is_gmm(g1)``."""
    if not (_is(h, "call_function", operator.mul) or _is(h, "call_function", torch.mul)):
        return None
    lhs, rhs = h.args[0], h.args[1]
    for silu, up in ((lhs, rhs), (rhs, lhs)):
        if _is(silu, "call_function", torch.nn.functional.silu) and isinstance(up, torch.fx.Node):
            gate = silu.args[0]
            if not _is(gate, "call_function", operator.getitem):
                continue
            g1 = gate.args[0].args[0] if isinstance(gate.args[0], torch.fx.Node) and gate.args[0].args else None
            if isinstance(g1, torch.fx.Node) and is_gmm(g1) and _chunk_half(gate, g1) == 0 \
                    and _chunk_half(up, g1) == 1:
                return g1
    return None


def _is_aten_gmm(node) -> bool:
    return _is(node, "call_function", torch._grouped_mm)


def _is_any_gmm(node) -> bool:  # the gate/up GEMM may already be rewritten when the down one is seen
    return _is_aten_gmm(node) or _is_our_grouped_mm(node)


def _in_swiglu_pair(node) -> bool:
    """An aten ``_grouped_mm`` that is either GEMM of a gate/up -> SwiGLU -> down pair."""
    x = _args(node, ("mat_a",)).get("mat_a")
    if isinstance(x, torch.fx.Node) and _swiglu_source(_skip_noop_cast(x), _is_any_gmm) is not None:
        return True
    for user in node.users:  # node -> chunk -> getitem -> silu / mul -> mul -> _grouped_mm
        for item in user.users:
            for op in item.users:
                for h in ([op] if _is(op, "call_function", operator.mul) else list(op.users)):
                    downs = [v for u in h.users for v in (u, *u.users)]  # directly or after a cast
                    if _swiglu_source(h, _is_aten_gmm) is node and any(_is_aten_gmm(v) for v in downs):
                        return True
    return False


def _skip_noop_cast(node):
    """The input of ``node`` when ``node`` is ``t.to(dtype)`` that keeps t's dtype (model code
    casts defensively; transformers' grouped-mm experts do), else ``node``."""
    if _is(node, "call_method", "to") and len(node.args) == 2 and not node.kwargs and len(node.users) == 1:
        src, dtype = node.args
        sv = _val(src)
        if isinstance(dtype, torch.dtype) and sv is not None and sv.dtype == dtype:
            return src
    return node


def _wants_grad(*nodes) -> bool:
    """Whether any of ``nodes``' example values requires grad: outputs traced with autograd
    recording (under ``no_grad`` they do not, whatever the weights say). Pass 3 leaves those
    pairs unfused: the fused operator's backward recomputes the gate/up GEMM, and the
    composition measured faster under autograd (``moe_ops.MoE``'s ``fused="auto"``)."""
    return any(getattr(_val(n), "requires_grad", False) for n in nodes)


def _fuse_swiglu(graph, g2) -> int:
    b = _gmm(g2)
    h = _skip_noop_cast(b["x"]) if isinstance(b["x"], torch.fx.Node) else b["x"]
    if not isinstance(h, torch.fx.Node) or len(h.users) != 1:
        return 0
    g1 = _swiglu_source(h, _is_our_grouped_mm)
    if g1 is None:
        return 0
    a = _gmm(g1)
    a["x"] = _skip_noop_cast(a["x"]) if isinstance(a["x"], torch.fx.Node) else a["x"]
    same = all(a[k] == b[k] for k in ("offs", "w_format", "granularity", "act_quant", "recipe"))
    if not same or a["recipe"] != "none" or _wants_grad(g1, g2):
        return 0
    with graph.inserting_before(g2):
        xs = a["x"]
        dev = _val(xs).device
        m = graph.call_method("size", (xs, 0))
        rows = graph.call_function(torch.arange, (m,), {"dtype": torch.int32, "device": dev})
        ones = graph.call_function(torch.ones, ((m, 1),), {"dtype": torch.float32, "device": dev})
        new = graph.call_function(torch.ops.moe_ops.expert_mlp.default, (
            xs, ones, rows, a["offs"], a["w"], a["w_scale"], a["w_zero"], b["w"], b["w_scale"], b["w_zero"],
            a["w_format"], a["granularity"], a["group_size"], b["group_size"], a["act_quant"], "none"))
    new.meta.update(g2.meta)
    g2.replace_all_uses_with(new)
    graph.erase_node(g2)
    return 1


def _fuse_combine(graph, node) -> int:
    """``zeros_like(x).index_add_(0, order // k, y * w.reshape(-1)[order].unsqueeze(1)[.to()])``."""
    a = _args(node, ("self", "dim", "index", "source"))
    base, tok, src = a.get("self"), a.get("index"), a.get("source")
    if a.get("dim") != 0 or not _is(base, "call_function", torch.zeros_like) or len(base.users) != 1:
        return 0
    if not (_is(tok, "call_function", operator.floordiv) and isinstance(tok.args[1], int)):
        return 0
    order, k = tok.args
    found = _weighted_rows(src, order, k)
    if found is None or _val(base.args[0]) is None:
        return 0
    _emit_combine(graph, node, found[0], order, k, found[1])
    return 1


def _fuse_slot_sum(graph, node) -> int:
    """transformers' combine: ``inv[perm] = arange(S)``; ``(y * w.reshape(-1)[perm]
    .unsqueeze(-1))[inv].view(T, k, H).sum(dim=1)``."""
    if node.kwargs.get("dim", node.args[1] if len(node.args) > 1 else None) != 1:
        return 0
    view = node.args[0]
    if not (_is(view, "call_method", "view") or _is(view, "call_method", "reshape")) or len(view.users) != 1:
        return 0
    vv = _val(view)
    if vv is None or vv.dim() != 3:
        return 0
    gathered = view.args[0]
    if not _is(gathered, "call_function", operator.getitem) or len(gathered.users) != 1:
        return 0
    weighted, inv = gathered.args
    if not _is(inv, "call_function", torch.empty_like):
        return 0
    perm = inv.args[0]
    setters = [u for u in inv.users if _is(u, "call_function", operator.setitem)]
    if len(setters) != 1 or set(inv.users) != {setters[0], gathered}:
        return 0
    st = setters[0]
    fill = st.args[2]
    if st.args[1] is not perm or not _is(fill, "call_function", torch.arange):
        return 0
    found = _weighted_rows(weighted, perm, vv.shape[1])
    if found is None:
        return 0
    _emit_combine(graph, node, found[0], perm, vv.shape[1], found[1])
    graph.erase_node(st)  # the in-place inverse permutation is dead now, but impure for DCE
    return 1


def _weighted_rows(mul, order, k):
    """``(y, w)`` when ``mul`` is ``y * w.reshape(-1)[order].unsqueeze(-1)`` (optionally cast
    with ``.to``) with ``w`` ``[T, k]`` and ``y`` 2-D, else None."""
    if not (_is(mul, "call_function", operator.mul) or _is(mul, "call_function", torch.mul)):
        return None
    for y, scale in ((mul.args[0], mul.args[1]), (mul.args[1], mul.args[0])):
        n = scale.args[0] if _is(scale, "call_method", "to") else scale
        if not (_is(n, "call_method", "unsqueeze") and n.args[1] in (1, -1)):
            continue
        sel = n.args[0]
        if not (_is(sel, "call_function", operator.getitem) and sel.args[1] is order):
            continue
        flat = sel.args[0]
        if not (_is(flat, "call_method", "reshape") and tuple(flat.args[1:]) in ((-1,), ((-1,),))):
            continue
        w, wv, yv = flat.args[0], _val(flat.args[0]), _val(y)
        if wv is not None and yv is not None and wv.dim() == 2 and wv.shape[1] == k and yv.dim() == 2:
            return y, w
    return None


def _emit_combine(graph, node, y, order, k, w):
    """Replace ``node`` (the combined ``[T, H]`` output) by ``unpermute(y, order, w)``, or by
    one routed ``expert_mlp`` when ``y`` is pass 3's identity-routed one of ``x[order // k]``."""
    with graph.inserting_before(node):
        rows = graph.call_method("to", (order, torch.int32))
        x = _routed_source(y, order, k)
        if x is not None:  # gather and scatter fused into its kernels
            new = graph.call_function(torch.ops.moe_ops.expert_mlp.default, (x, w, rows, *list(y.args)[3:]))
        else:
            new = graph.call_function(torch.ops.moe_ops.unpermute.default, (y, rows, w))
    new.meta.update(node.meta)
    node.replace_all_uses_with(new)
    graph.erase_node(node)


def _routed_source(y, order, k):
    """``x`` when ``y`` is pass 3's identity-routed ``expert_mlp`` of ``x[order // k]`` used
    only here, else None."""
    if not _is(y, "call_function", torch.ops.moe_ops.expert_mlp.default) or len(y.users) != 1:
        return None
    xs = y.args[0]
    if not _is(xs, "call_function", operator.getitem):
        return None
    tok = xs.args[1]
    if not (_is(tok, "call_function", operator.floordiv) and tok.args[0] is order and tok.args[1] == k):
        return None
    others = [u for u in xs.users if u is not y and not _is(u, "call_method", "size")]
    return None if others else xs.args[0]


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
    if not (_prefer_ours(xv.device, policy) or _in_swiglu_pair(node)):
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
