"""Pass 5 of moe_ops.lowering (``lowering/routing_pass.py``): softmax top-k routing and the
expert sort as model code writes them -> ``moe_ops::route`` (with the router GEMM, in
inference graphs: ``moe_ops::router_route``); the FX code after the pass locked with
expecttest, numerics against the unrewritten graph, near misses left alone."""
import torch
from torch.testing._internal.common_utils import TestCase

import moe_ops.lowering as lowering
from test_lowering import PlainMoEBlock, _calls, _traced

T, E, K = 13, 6, 2


def _all(gm, **named):
    return gm(*[named[n.target[2:-1]] for n in gm.graph.nodes if n.op == "placeholder"])


def _routing(logits, renorm=True, softmax_dtype=False, stable=True):
    p = torch.softmax(logits, -1, dtype=torch.float32) if softmax_dtype else torch.softmax(logits.float(), -1)
    w, ids = torch.topk(p, K, dim=-1)
    if renorm:
        w = w / w.sum(-1, keepdim=True)
    flat = ids.reshape(-1)
    order = torch.argsort(flat, stable=stable)
    counts = torch.zeros(E, dtype=torch.int32).scatter_add_(0, flat, torch.ones_like(flat, dtype=torch.int32))
    offs = torch.cumsum(counts, 0, dtype=torch.int32)
    return w, order, offs, order // K


def _logits(dtype=torch.bfloat16):
    return torch.randn(T, E, generator=torch.Generator().manual_seed(3)).to(dtype)


class RoutingPassTest(TestCase):
    def _check(self, fn, logits):
        gm = _traced(fn, logits)
        ref = _all(gm, logits=logits)
        self.assertEqual(lowering.fuse_routing(gm.graph), 1)
        gm.recompile()
        got = _all(gm, logits=logits)
        torch.testing.assert_close(got[0], ref[0], rtol=1e-6, atol=1e-7)  # float32 softmax both ways
        for a, b in zip(got[1:], ref[1:]):  # rows, offs, tokens: exact (no ties in these logits)
            self.assertEqual(a.dtype, b.dtype)
            self.assertTrue(torch.equal(a, b))
        return gm

    def test_softmax_topk_renorm_sort_to_route(self):
        gm = self._check(lambda logits: _routing(logits), _logits())
        self.assertExpectedInline(_calls(gm), """\
call_function moe_ops.route.default
call_function _operator.getitem
call_function _operator.getitem
call_method long
call_function _operator.getitem
call_function _operator.floordiv""")

    def test_without_renormalisation_softmax_dtype(self):
        gm = self._check(lambda logits: _routing(logits, renorm=False, softmax_dtype=True), _logits(torch.float16))
        self.assertIn("moe_ops.route.default", _calls(gm))
        self.assertNotIn("softmax", _calls(gm))

    def test_gradient_to_the_logits_as_the_matched_graph(self):
        logits = _logits(torch.float32)
        gm = _traced(lambda logits: _routing(logits)[0], logits)
        c = torch.randn(T, K, generator=torch.Generator().manual_seed(5))
        grads = []
        for rewrite in (False, True):
            if rewrite:
                self.assertEqual(lowering.fuse_routing(gm.graph), 1)
                gm.recompile()
            leaf = logits.clone().requires_grad_()
            (_all(gm, logits=leaf)[0] * c).sum().backward()
            grads.append(leaf.grad)
        torch.testing.assert_close(grads[1], grads[0], rtol=1e-5, atol=1e-7)

    def test_near_misses_left_alone(self):
        for fn in (lambda logits: _routing(logits, stable=False),  # unstable sort: not our order
                   lambda logits: torch.topk(torch.softmax(logits.float(), 0), K, dim=-1),  # softmax over tokens
                   lambda logits: torch.topk(torch.sigmoid(logits.float()), K, dim=-1)):  # not softmax
            gm = _traced(fn, _logits())
            before = _calls(gm)
            self.assertEqual(lowering.fuse_routing(gm.graph), 0)
            self.assertEqual(_calls(gm), before)


H = 16


def _router(bias=False):
    torch.manual_seed(11)
    return torch.nn.Linear(H, E, bias=bias, dtype=torch.bfloat16)


def _x():
    return torch.randn(T, H, generator=torch.Generator().manual_seed(4)).bfloat16()


class RouterFoldTest(TestCase):
    """The router GEMM folded into ``router_route`` (inference graphs, policy "always" on the
    CPU: "auto" folds on GPUs only)."""

    def _fold(self, fn, x, policy="always", expect=1, router=None):
        with torch.no_grad():
            gm = _traced(fn, x)
        # the router's parameters are placeholders too, named after the closure variable
        named = {"x": x}
        for n in gm.graph.nodes:
            for part in ("weight", "bias"):
                if n.op == "placeholder" and n.target.endswith(f"_parameters_{part}_"):
                    named[n.target[2:-1]] = getattr(router, part)
        with torch.no_grad():
            ref = _all(gm, **named)
            self.assertEqual(lowering.fuse_routing(gm.graph, policy), expect)
            gm.recompile()
            got = _all(gm, **named)
        for a, b in zip(got, ref):  # the same linear and float32 routing on the CPU: equal
            self.assertEqual(a.dtype, b.dtype)
            self.assertTrue(torch.equal(a, b))
        return gm

    def test_router_gemm_folds_into_router_route(self):
        router = _router()
        gm = self._fold(lambda x: (*_routing(router(x)), router(x)), _x(), router=router)
        # the second router(x) is another linear node: left alone; the routed one is folded
        self.assertExpectedInline(_calls(gm), """\
call_function moe_ops.router_route.default
call_function _operator.getitem
call_function _operator.getitem
call_method long
call_function _operator.getitem
call_function _operator.floordiv
call_function torch._C._nn.linear""")
        sems = [n for n in gm.graph.nodes if n.op == "get_attr"]
        self.assertEqual(len(sems), 1)
        sem = getattr(gm, sems[0].target)
        self.assertEqual((sem.dtype, tuple(sem.shape), int(sem)), (torch.int32, (1,), 0))
        self.assertNotIn(sems[0].target, gm.state_dict())  # not persistent: no checkpoint change

    def test_logits_used_elsewhere_read_router_route_logits(self):
        router = _router()

        def fn(x):
            logits = router(x)
            return (*_routing(logits), logits.float().pow(2).mean())  # e.g. an auxiliary loss
        gm = self._fold(fn, _x(), router=router)
        self.assertNotIn("linear", _calls(gm))

    def test_not_folded(self):
        x = _x()
        router, with_bias = _router(), _router(bias=True)
        for fn, policy, r in ((lambda x: _routing(router(x)), "auto", router),  # "auto": GPUs only
                              (lambda x: _routing(with_bias(x)), "always", with_bias),  # a biased router
                              (lambda x: _routing(x[:, :E] * 2), "always", None)):  # logits not from a linear
            gm = self._fold(fn, x, policy, router=r)
            self.assertIn("moe_ops.route.default", _calls(gm))
            self.assertNotIn("router_route", _calls(gm))
        router = _router()
        gm = _traced(lambda x: _routing(router(x)), x)  # traced recording autograd: no fold
        self.assertEqual(lowering.fuse_routing(gm.graph, "always"), 1)
        self.assertIn("moe_ops.route.default", _calls(gm))
        self.assertIn("linear", _calls(gm))
        with self.assertRaisesRegex(ValueError, "policy"):
            lowering.fuse_routing(gm.graph, "never")


def test_inference_block_compiled_with_the_router_folded():
    """The plain block compiled by Inductor (CPU, policy "always") with the router folded (the
    semaphore buffer on the graph's module: lifted by AOTAutograd or, where the pre-grad passes
    run after the lifting, traced as a constant), outputs as the block compiled without the
    passes, and again on a second call."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    block = PlainMoEBlock()
    x = torch.randn(40, 32, dtype=torch.bfloat16)
    seen = []  # the graph after our passes (the pass's "then" hook)
    p = lowering.MoEGraphPass("always", then=lambda g: seen.append(
        [str(n.target) for n in g.nodes if n.op in ("call_function", "get_attr")]))
    opts = {"pre_grad_custom_pass": p, "fx_graph_cache": False}
    with torch.no_grad():
        ref = torch.compile(block, fullgraph=True)(x)
        step = torch.compile(block, fullgraph=True, options=opts)
        outs = [step(x), step(x)]
    assert p.rewrites == 5  # 2 GEMMs + SwiGLU + combine, the routing
    assert len(seen) == 1 and "moe_ops.router_route.default" in seen[0] and "moe_ops.route.default" not in seen[0]
    assert "moe_ops_router_semaphore_cpu" in seen[0]
    for out in outs:
        torch.testing.assert_close(out, ref, rtol=2e-2, atol=2e-2)  # fused vs unfused bf16 roundings
