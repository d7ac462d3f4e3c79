"""Pass 5: the softmax top-k routing and expert sort that model code writes -> ``moe_ops::route``.

Matched on Dynamo's graph, every piece or nothing (the graph is left alone otherwise)::

    p = softmax(logits.float(), -1)            # or softmax(logits, -1, dtype=float32), fp32 logits
    w, ids = topk(p, k, dim=-1)
    w = w / w.sum(-1, keepdim=True)            # optional: renormalisation
    flat = ids.reshape(-1)                     # or view(-1)
    order = argsort(flat, stable=True)
    counts = zeros(E, dtype=int32).scatter_add_(0, flat, ones_like(flat, dtype=int32))
    offs = cumsum(counts, 0, dtype=int32)      # or cumsum(counts, 0).to(int32)

-> ``w, ids, rows, offs = route(logits, k, "softmax", renormalize)``: ``order`` is ``rows``
(``order.to(int32)``, as pass 4 feeds the fused expert MLP, becomes ``rows`` itself),
``ids`` and ``order``'s other uses get int64 casts. The whole chain (softmax, top-k, sort,
histogram, cumsum) becomes one launch at decode sizes. Numerics: the same weights up to
float32 rounding; top-k ties go to the lower expert (``torch.topk`` leaves ties unspecified).
Differentiable in ``logits`` through the weights, as the matched graph.

The router GEMM folds in too where ``logits = F.linear(x, router_weight)`` (no bias) and
nothing in the graph wants gradients (``router_route`` has no autograd): ``router_route(x,
router_weight, k, "softmax", renormalize, None, semaphore)``, the GEMM and the routing in one
launch at decode sizes, ``logits``' other uses reading its logits output. ``semaphore`` is a
zeroed int32 ``[1]`` buffer that the pass registers on the graph's module (one per device;
AOTAutograd lifts it as a buffer, so CUDA graphs take its in-place update as they take a
module buffer's); every launch leaves it at 0. As for ``moe_ops.MoE``'s buffer, two launches of
one compiled graph must not run concurrently on two streams. Policy ``"auto"`` folds on GPUs
only (on the CPU ``router_route`` is ``F.linear`` then ``route``: nothing to gain),
``"always"`` everywhere.
"""
from __future__ import annotations

import operator

import torch
import torch.fx

from .passes import _args, _is, _val, check_policy


def fuse_routing(graph: torch.fx.Graph, policy: str = "auto") -> int:
    """Pass 5 on ``graph`` in place; returns the number of rewrites (a routing chain with its
    router GEMM folded counts once). ``policy``: where the router GEMM folds (module docstring)."""
    check_policy(policy)
    count = 0
    for node in list(graph.nodes):
        if _is(node, "call_function", torch.topk) or _is(node, "call_method", "topk"):
            count += _fuse_route(graph, node, policy)
    return count


_LINEAR = (torch._C._nn.linear, torch.nn.functional.linear)


def _router_gemm(logits, policy):
    """``(x, router_weight)`` when ``logits`` is ``F.linear(x, router_weight)`` without bias,
    2-D operands of one floating dtype, on a device the policy folds on, traced without
    autograd recording; else None."""
    if not (logits.op == "call_function" and logits.target in _LINEAR):
        return None
    a = _args(logits, ("input", "weight", "bias"))
    x, w = a.get("input"), a.get("weight")
    xv, wv, lv = _val(x), _val(w), _val(logits)
    if a.get("bias") is not None or xv is None or wv is None or lv is None or lv.requires_grad:
        return None
    if xv.dim() != 2 or wv.dim() != 2 or xv.dtype != wv.dtype or xv.dtype not in (torch.bfloat16, torch.float16,
                                                                                    torch.float32):
        return None
    return (x, w) if policy == "always" or xv.device.type in ("cuda", "xpu") else None


def _semaphore(graph, device):
    """A ``get_attr`` node of the zeroed int32 ``[1]`` buffer that the graph's module holds for
    ``router_route`` launches on ``device`` (registered on first use)."""
    from torch._subclasses.fake_tensor import unset_fake_temporarily
    gm = graph.owning_module
    name = f"moe_ops_router_semaphore_{device.type}{'' if device.index is None else device.index}"
    if not hasattr(gm, name):
        # a normal tensor even when compiling under inference_mode (an inference tensor could
        # not be updated in place by a later call outside it)
        with unset_fake_temporarily(), torch.inference_mode(False):
            gm.register_buffer(name, torch.zeros(1, dtype=torch.int32, device=device), persistent=False)
        # Where the pass runs before AOTAutograd lifts the module's buffers (torch 2.11), AOT
        # asks Dynamo's record for each one's source (its dedup and static-input bookkeeping).
        # Where it runs after the lifting (2.13), the buffer is traced as a constant that the
        # launch updates in place (or on a clone, if Inductor does not reinplace it): 0 either way.
        sources = getattr(gm, "_param_name_to_source", None)
        if isinstance(sources, dict):
            from torch._dynamo.source import ConstantSource
            sources[name] = ConstantSource(name)
    return graph.get_attr(name)


def _softmax_logits(p):
    """``logits`` when ``p`` is a float32 softmax over the last dim of 2-D ``logits`` (cast to
    float32 by ``.float()``/``.to(torch.float32)`` or softmax's ``dtype``), else None."""
    if _is(p, "call_function", torch.softmax) or _is(p, "call_function", torch.nn.functional.softmax) \
            or _is(p, "call_method", "softmax"):
        a = _args(p, ("input", "dim", "dtype") if p.op == "call_method" or p.target is torch.softmax
                  else ("input", "dim", "_stacklevel", "dtype"))
    else:
        return None
    src, pv = a.get("input"), _val(p)
    if pv is None or pv.dtype != torch.float32 or pv.dim() != 2 or a.get("dim") not in (-1, 1):
        return None
    if _is(src, "call_method", "float") and len(src.args) == 1:
        src = src.args[0]
    elif _is(src, "call_method", "to") and len(src.args) == 2 and src.args[1] == torch.float32:
        src = src.args[0]
    sv = _val(src)
    return src if sv is not None and sv.dtype in (torch.bfloat16, torch.float16, torch.float32) else None


def _items(node):
    """``{index: getitem node}`` of ``node``'s users, or None if any user is not a getitem."""
    out = {}
    for u in node.users:
        if not (_is(u, "call_function", operator.getitem) and isinstance(u.args[1], int)):
            return None
        out[u.args[1]] = u
    return out


def _renormalized(w):
    """``w / w.sum(-1, keepdim=True)`` when that is all ``w`` feeds, else None."""
    if len(w.users) != 2:
        return None
    s = next((u for u in w.users if _is(u, "call_method", "sum")), None)
    d = next((u for u in w.users if _is(u, "call_function", operator.truediv)
              or _is(u, "call_function", torch.div)), None)
    if s is None or d is None or d.args[:2] != (w, s) or d.kwargs:
        return None
    a = _args(s, ("self", "dim", "keepdim"))
    return d if a.get("dim") in (-1, 1, (-1,), (1,)) and a.get("keepdim") is True else None


def _flat(ids):
    """``ids.reshape(-1)`` / ``ids.view(-1)``, the only user of ``ids``, else None."""
    if len(ids.users) != 1:
        return None
    f = next(iter(ids.users))
    if (_is(f, "call_method", "reshape") or _is(f, "call_method", "view")) and tuple(f.args[1:]) in ((-1,), ((-1,),)):
        return f
    return None


def _counts(flat, E):
    """``(counts, nodes)``: the per-expert histogram of ``flat`` over ``E`` bins and the nodes
    that build it, else None. (``bincount`` has a data-dependent length: no static graph.)"""
    for u in flat.users:
        if _is(u, "call_method", "scatter_add_"):
            a = _args(u, ("self", "dim", "index", "src"))
            base, ones = a.get("self"), a.get("src")
            if a.get("dim") != 0 or a.get("index") is not flat or not _is(base, "call_function", torch.zeros):
                continue
            if not (_is(ones, "call_function", torch.ones_like) and ones.args[0] is flat) or len(ones.users) != 1:
                continue
            bv = _val(base)
            if bv is None or tuple(bv.shape) != (E,) or len(base.users) != 1:
                continue
            return u, [u, ones, base]
    return None


def _offsets(counts):
    """``(offs int32, nodes)`` when ``counts`` feeds only ``cumsum(counts, 0[, dtype=int32])``
    (then ``.to(torch.int32)`` where the cumsum is int64), else None."""
    if len(counts.users) != 1:
        return None
    c = next(iter(counts.users))
    if not (_is(c, "call_function", torch.cumsum) or _is(c, "call_method", "cumsum")):
        return None
    if _args(c, ("input", "dim", "dtype")).get("dim") not in (0, -1):
        return None
    cv = _val(c)
    if cv is not None and cv.dtype == torch.int32:
        return c, [c]
    if len(c.users) == 1:
        t = next(iter(c.users))
        if _is(t, "call_method", "to") and len(t.args) == 2 and t.args[1] == torch.int32:
            return t, [t, c]
    return None


def _fuse_route(graph, topk, policy) -> int:
    a = _args(topk, ("input", "k", "dim", "largest", "sorted"))
    logits = _softmax_logits(a.get("input"))
    k = a.get("k")
    if logits is None or not isinstance(k, int) or a.get("dim", -1) not in (-1, 1) or not a.get("largest", True):
        return 0
    items = _items(topk)
    if items is None or set(items) != {0, 1}:
        return 0
    w, ids = items[0], items[1]
    E = _val(logits).shape[-1]
    flat = _flat(ids)
    order = next((u for u in flat.users if _is(u, "call_function", torch.argsort)), None) if flat else None
    if order is None or not _args(order, ("input", "dim", "descending", "stable")).get("stable") \
            or _args(order, ("input", "dim", "descending")).get("descending", False):
        return 0
    hist = _counts(flat, E)
    offs = _offsets(hist[0]) if hist else None
    if offs is None or set(flat.users) != {order, *hist[1][:2]}:
        return 0
    norm = _renormalized(w)
    weights = norm if norm is not None else w
    gemm = _router_gemm(logits, policy) if graph.owning_module is not None else None
    if gemm is not None:
        with graph.inserting_before(logits):
            sem = _semaphore(graph, _val(logits).device)
            r = graph.call_function(torch.ops.moe_ops.router_route.default,
                                    (*gemm, k, "softmax", norm is not None, None, sem))
            new = [graph.call_function(operator.getitem, (r, i)) for i in range(5)]
        logits.replace_all_uses_with(new[0])
        graph.erase_node(logits)
        new = new[1:]
    else:
        with graph.inserting_before(a["input"]):
            r = graph.call_function(torch.ops.moe_ops.route.default, (logits, k, "softmax", norm is not None))
            new = [graph.call_function(operator.getitem, (r, i)) for i in range(4)]
    weights.replace_all_uses_with(new[0])
    offs[0].replace_all_uses_with(new[3])
    for u in list(order.users):  # pass 4's order.to(int32) is the kernel's row order itself
        if _is(u, "call_method", "to") and u.args[1:] == (torch.int32,) and not u.kwargs:
            u.replace_all_uses_with(new[2])
            graph.erase_node(u)
    if order.users:
        with graph.inserting_after(new[2]):
            order.replace_all_uses_with(graph.call_method("long", (new[2],)))
    # the matched chain, last first (the in-place scatter_add_ is not dead code to FX)
    for n in [*offs[1], *hist[1], order, flat, ids, *([norm, *w.users] if norm is not None else []), w, topk,
              a["input"]]:
        if n in graph.nodes and not n.users:
            graph.erase_node(n)
    graph.eliminate_dead_code()
    return 1
