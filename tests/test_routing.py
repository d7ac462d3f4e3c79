"""Routing operators against straightforward references: top-k (ties, renormalisation,
sigmoid with selection bias), sorting (stable, dropped ids), permute/unpermute, their
gradients (gradcheck in float64), opcheck, and errors from eager and fake kernels alike."""
import pytest
import torch

import moe_ops
from test_errors import _both
from test_opcheck import _check

ops = torch.ops.moe_ops


def _ref_topk(logits, k, scoring, renorm, bias=None):
    """Per token: score every expert, pick the k best by (score + bias, then lower index)."""
    p = torch.softmax(logits.double(), -1) if scoring == "softmax" else torch.sigmoid(logits.double())
    sel = p if bias is None else p + bias.double()
    T, E = p.shape
    w = torch.zeros(T, k, dtype=torch.float64)
    ids = torch.zeros(T, k, dtype=torch.int32)
    for t in range(T):
        order = sorted(range(E), key=lambda e: (-float(sel[t, e]), e))[:k]
        ids[t] = torch.tensor(order)
        w[t] = p[t, order]
        if renorm:
            w[t] = w[t] / w[t].sum()
    return w, ids


@pytest.mark.parametrize("scoring,renorm,use_bias", [("softmax", True, False), ("softmax", False, False),
                                                     ("sigmoid", True, True), ("sigmoid", False, False)])
def test_topk_route_matches_reference(scoring, renorm, use_bias):
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(33, 8, generator=g)
    bias = torch.randn(8, generator=g) * 0.1 if use_bias else None
    w, ids = ops.topk_route(logits, 3, scoring, renorm, bias)
    rw, rids = _ref_topk(logits, 3, scoring, renorm, bias)
    assert ids.dtype == torch.int32 and w.dtype == torch.float32
    assert torch.equal(ids, rids)
    torch.testing.assert_close(w.double(), rw, rtol=1e-6, atol=1e-7)


def test_group_limited_topk_matches_reference():
    """DeepSeek-V3: sigmoid + bias keys, groups scored by their two best keys, experts only
    from the best topk_groups groups."""
    g = torch.Generator().manual_seed(8)
    T, E, G, TG, k = 21, 16, 4, 2, 3
    logits = torch.randn(T, E, generator=g)
    bias = torch.randn(E, generator=g) * 0.2
    w, ids = ops.topk_route(logits, k, "sigmoid", True, bias, G, TG)
    p = torch.sigmoid(logits.double())
    key = p + bias.double()
    for t in range(T):
        gs = [sorted(key[t, i * 4:(i + 1) * 4].tolist(), reverse=True)[:2] for i in range(G)]
        best = sorted(range(G), key=lambda i: (-sum(gs[i]), i))[:TG]
        allowed = [e for e in range(E) if e // 4 in best]
        want = sorted(allowed, key=lambda e: (-float(key[t, e]), e))[:k]
        assert ids[t].tolist() == want
        ref = p[t, want] / p[t, want].sum()
        torch.testing.assert_close(w[t].double(), ref, rtol=1e-6, atol=1e-7)
    logits64 = logits.double().requires_grad_()
    torch.autograd.gradcheck(lambda l: ops.topk_route(l, k, "sigmoid", True, bias.double(), G, TG)[0], (logits64,))


def test_topk_ties_go_to_the_lower_expert():
    logits = torch.zeros(4, 6)
    logits[:, 4] = 1.0  # one clear winner, then a five-way tie
    w, ids = ops.topk_route(logits, 3, "softmax", True)
    assert ids.tolist() == [[4, 0, 1]] * 4
    torch.testing.assert_close(w.sum(-1), torch.ones(4))


@pytest.mark.parametrize("scoring,renorm", [("softmax", True), ("softmax", False), ("sigmoid", True)])
def test_topk_route_gradient(scoring, renorm):
    g = torch.Generator().manual_seed(2)
    logits = torch.randn(9, 6, generator=g, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(6, generator=g, dtype=torch.float64) * 0.1
    torch.autograd.gradcheck(lambda l: ops.topk_route(l, 2, scoring, renorm, bias)[0], (logits,))


def test_sort_rows_stable_with_dropped_ids():
    ids = torch.tensor([[2, 0], [0, 2], [5, 1], [2, -1], [1, 0]], dtype=torch.int32)
    rows, offs = ops.sort_rows(ids, 3)
    # expert 0: flat rows 1, 2, 9; expert 1: 5, 8; expert 2: 0, 3, 6; dropped (5, -1): 4, 7
    assert rows.tolist() == [1, 2, 9, 5, 8, 0, 3, 6, 4, 7]
    assert offs.tolist() == [3, 5, 8] and offs.dtype == torch.int32
    # every flat row appears once; within an expert, token order is kept
    assert sorted(rows.tolist()) == list(range(10))


def _routing(T=13, E=5, k=2, seed=3, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    w, ids = ops.topk_route(torch.randn(T, E, generator=g), k, "softmax", True)
    rows, offs = ops.sort_rows(ids, E)
    return w.to(dtype), ids, rows, offs


def test_permute_unpermute_match_loops():
    w, ids, rows, offs = _routing()
    T, k = w.shape
    x = torch.randn(T, 7, dtype=torch.float64)
    xs = ops.permute(x, rows, k)
    for r in range(T * k):
        assert torch.equal(xs[r], x[int(rows[r]) // k])
    y = torch.randn(T * k, 7, dtype=torch.float64)
    out = ops.unpermute(y, rows, w)
    ref = torch.zeros(T, 7, dtype=torch.float64)
    for r in range(T * k):
        t, j = divmod(int(rows[r]), k)
        ref[t] += w[t, j] * y[r]
    torch.testing.assert_close(out, ref)
    # permute then unpermute with unit weights: each token times top_k
    torch.testing.assert_close(ops.unpermute(xs, rows, torch.ones_like(w)), x * k)


def test_permute_unpermute_gradients():
    w, ids, rows, offs = _routing()
    T, k = w.shape
    x = torch.randn(T, 4, dtype=torch.float64, requires_grad=True)
    y = torch.randn(T * k, 4, dtype=torch.float64, requires_grad=True)
    w = w.detach().requires_grad_()
    torch.autograd.gradcheck(lambda a: ops.permute(a, rows, k), (x,))
    torch.autograd.gradcheck(lambda a, b: ops.unpermute(a, rows, b), (y, w))


@pytest.mark.parametrize("scoring,bias,groups", [("softmax", False, (1, 1)), ("sigmoid", True, (1, 1)),
                                                 ("sigmoid", True, (3, 2))])
def test_route_is_topk_route_then_sort_rows(scoring, bias, groups):
    g = torch.Generator().manual_seed(7)
    logits = torch.randn(9, 6, generator=g, dtype=torch.float64, requires_grad=True)
    b = torch.randn(6, generator=g, dtype=torch.float64) if bias else None
    w, ids, rows, offs = ops.route(logits, 2, scoring, True, b, *groups)
    rw, rids = ops.topk_route(logits, 2, scoring, True, b, *groups)
    rrows, roffs = ops.sort_rows(rids, 6)
    assert torch.equal(w, rw) and torch.equal(ids, rids) and torch.equal(rows, rrows) and torch.equal(offs, roffs)
    torch.autograd.gradcheck(lambda l: ops.route(l, 2, scoring, True, b, *groups)[0], (logits,))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_router_route_is_linear_then_route(dtype):
    """CPU: the router GEMM in x's dtype, then :func:`route` of those logits; the semaphore is
    left alone (the one-launch GPU kernel runs in tests/interpret and tests/gpu)."""
    g = torch.Generator().manual_seed(11)
    x = torch.randn(7, 24, generator=g).to(dtype)
    wr = torch.randn(10, 24, generator=g).to(dtype)
    b = torch.randn(10, generator=g)
    sem = torch.zeros(1, dtype=torch.int32)
    logits, w, ids, rows, offs = ops.router_route(x, wr, 3, "sigmoid", True, b, sem)
    assert logits.dtype == dtype and torch.equal(logits, torch.nn.functional.linear(x, wr))
    for got, want in zip((w, ids, rows, offs), ops.route(logits, 3, "sigmoid", True, b)):
        assert torch.equal(got, want)
    assert sem.tolist() == [0]


def test_moe_on_the_cpu_keeps_linear_then_route():
    """``MoE.route`` takes ``router_route`` on GPUs only (tests/gpu checks that side): on the
    CPU the traced graph keeps the router ``nn.Linear`` and ``route``."""
    m = moe_ops.MoE(16, 8, 4, 2)
    gm = torch.fx.experimental.proxy_tensor.make_fx(lambda x: m.route(x))(torch.randn(3, 16))
    targets = {str(n.target) for n in gm.graph.nodes if n.op == "call_function"}
    assert "moe_ops.router_route.default" not in targets and "moe_ops.route.default" in targets


def test_opcheck_routing_ops():
    g = torch.Generator().manual_seed(4)
    logits = torch.randn(11, 6, generator=g, requires_grad=True)
    _check(ops.topk_route.default, (logits, 2, "softmax", True, None))
    _check(ops.topk_route.default, (logits, 3, "sigmoid", True, torch.randn(6, generator=g)))
    _check(ops.topk_route.default, (logits, 2, "sigmoid", True, torch.randn(6, generator=g), 3, 2))
    _check(ops.route.default, (logits, 2, "softmax", True, None))
    _check(ops.route.default, (logits, 2, "sigmoid", True, torch.randn(6, generator=g), 3, 2))
    x, wr = torch.randn(11, 5, generator=g), torch.randn(6, 5, generator=g)
    _check(ops.router_route.default, (x, wr, 2, "softmax", True, None, torch.zeros(1, dtype=torch.int32)))
    _check(ops.router_route.default, (x, wr, 3, "sigmoid", False, torch.randn(6, generator=g), None))
    w, ids = ops.topk_route(logits.detach(), 2, "softmax", True)
    _check(ops.sort_rows.default, (ids, 6))
    rows, offs = ops.sort_rows(ids, 6)
    _check(ops.permute.default, (torch.randn(11, 8, requires_grad=True), rows, 2))
    _check(ops.unpermute.default, (torch.randn(22, 8, requires_grad=True), rows, w.clone().requires_grad_()))


def test_routing_errors_name_the_argument():
    logits = torch.randn(5, 4)
    ids = torch.zeros(5, 2, dtype=torch.int32)
    rows = torch.arange(10, dtype=torch.int32)
    _both(ops.topk_route, [logits, 5, "softmax", True, None], ValueError, r"^top_k: must be an int in \[1, 4\]")
    _both(ops.topk_route, [logits, 2, "softmin", True, None], ValueError, r"^scoring: expected one of")
    _both(ops.topk_route, [logits, 2, "sigmoid", True, torch.zeros(3)], ValueError, r"^bias: expected shape \(4,\)")
    _both(ops.topk_route, [logits, 2, "sigmoid", True, None, 3, 1], ValueError, r"^num_groups: must be a positive int")
    _both(ops.topk_route, [logits, 2, "sigmoid", True, None, 2, 3], ValueError, r"^topk_groups: must be an int")
    _both(ops.topk_route, [logits, 3, "sigmoid", True, None, 2, 1], ValueError, r"^top_k: 3 exceeds the 2 experts")
    _both(ops.route, [logits, 5, "softmax", True, None], ValueError, r"^top_k: must be an int in \[1, 4\]")
    x, wr, sem = torch.randn(5, 3), torch.randn(4, 3), torch.zeros(1, dtype=torch.int32)
    _both(ops.router_route, [x, wr.double(), 2], ValueError, r"^router_weight: expected x's dtype")
    _both(ops.router_route, [x, wr[:, :2], 2], ValueError, r"^router_weight: expected \[E, 3\]")
    _both(ops.router_route, [x, wr, 5], ValueError, r"^top_k: must be an int in \[1, 4\]")
    _both(ops.router_route, [x, wr, 2, "sigmoid", True, torch.zeros(3)], ValueError, r"^bias: expected shape")
    _both(ops.router_route, [x, wr, 2, "softmax", True, None, sem.long()], ValueError, r"^semaphore: expected one")
    _both(ops.sort_rows, [ids.float(), 4], ValueError, r"^topk_ids: expected dtype")
    _both(ops.permute, [torch.randn(5, 3), rows[:9], 2], ValueError, r"^sorted_rows: expected shape")
    _both(ops.permute, [torch.randn(5, 3), rows.long(), 2], ValueError, r"^sorted_rows: expected dtype")
    _both(ops.unpermute, [torch.randn(9, 3), rows, torch.rand(5, 2)], ValueError, r"^y: has 9 rows")
    _both(ops.unpermute, [torch.randn(10, 3), rows[:8], torch.rand(5, 2)], ValueError, r"^sorted_rows: expected shape")
