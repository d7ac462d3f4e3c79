"""Pass 5 of moe_ops.lowering (``lowering/routing_pass.py``): softmax top-k routing and the
expert sort as model code writes them -> ``moe_ops::route``; the FX code after the pass locked
with expecttest, numerics against the unrewritten graph, near misses left alone."""
import torch
from torch.testing._internal.common_utils import TestCase

import moe_ops.lowering as lowering
from test_lowering import _calls, _traced

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
