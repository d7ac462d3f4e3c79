"""The graph passes of moe_ops.lowering: each pattern on a small graph (the FX code before and
after locked with expecttest, numerics against the unrewritten graph), graphs without a
match left alone, and a plain-PyTorch MoE block compiled with the passes on."""
import os
import sys

import torch
import torch.nn.functional as F
from torch._dynamo.testing import EagerAndRecordGraphs
from torch.testing._internal.common_utils import TestCase

import moe_ops
import moe_ops.lowering as lowering
from helpers import rel_err

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "benchmarks"))
from plain_moe import PlainMoEBlock  # noqa: E402  (the block as model code writes it)

E, N, K, M = 4, 24, 32, 29


def _traced(fn, *args):
    torch._dynamo.reset()
    rec = EagerAndRecordGraphs()
    torch.compile(fn, backend=rec, fullgraph=True)(*args)
    return rec.graphs[0]


def _run(gm, **named):
    """Call a Dynamo graph with its inputs by name (its placeholders ``L_<name>_`` are in the
    order Dynamo saw them, not the function's)."""
    return gm(*[named[n.target[2:-1]] for n in gm.graph.nodes if n.op == "placeholder"])[0]


def _name(target):
    if isinstance(target, (str, torch._ops.OpOverload, torch._ops.OpOverloadPacket)):
        return str(target)
    return f"{getattr(target, '__module__', None) or 'torch'}.{target.__name__}"


def _calls(gm):
    return "\n".join(f"{n.op} {_name(n.target)}" for n in gm.graph.nodes if n.op in ("call_function", "call_method"))


def _inputs(dtype=torch.bfloat16):  # aten's _grouped_mm traces in bf16 only
    g = torch.Generator().manual_seed(0)
    x = torch.randn(M, K, generator=g).to(dtype)
    w = torch.randn(E, N, K, generator=g).to(dtype)
    offs = torch.tensor([5, 5, 17, M], dtype=torch.int32)  # an empty expert (aten leaves rows past offs[-1] unset)
    return x, w, offs


class PassTest(TestCase):
    def test_grouped_mm_to_ours(self):
        x, w, offs = _inputs()
        gm = _traced(lambda x, w, o: torch._grouped_mm(x, w.transpose(-2, -1), offs=o), x, w, offs)
        ref = _run(gm, x=x, w=w, o=offs)
        self.assertEqual(lowering.rewrite_grouped_mm(gm.graph, "always"), 1)
        gm.recompile()
        self.assertExpectedInline(_calls(gm), """call_function moe_ops.grouped_mm.default""")
        y = _run(gm, x=x, w=w, o=offs)
        self.assertLess(rel_err(y, ref), 6e-3)  # both round a float32 sum to bf16 once

    def test_grouped_mm_without_transpose_gets_one(self):
        x, w, offs = _inputs()
        wt = w.transpose(-2, -1).contiguous()  # [E, K, N] as stored by some models
        gm = _traced(lambda x, b, o: torch._grouped_mm(x, b, offs=o), x, wt, offs)
        ref = _run(gm, x=x, b=wt, o=offs)
        lowering.rewrite_grouped_mm(gm.graph, "always")
        gm.recompile()
        self.assertExpectedInline(_calls(gm), """\
call_function torch.transpose
call_function moe_ops.grouped_mm.default""")
        self.assertLess(rel_err(_run(gm, x=x, b=wt, o=offs), ref), 6e-3)

    def test_dequantize_then_grouped_mm_fused(self):
        x, w, offs = _inputs(torch.bfloat16)
        q = moe_ops.quantize_weight(w, "int4_asym", "group", 16).op_args()[:3]

        def f(x, o, d, s, z):
            wd = torch.ops.moe_ops.dequantize_weight(d, s, z, "int4_asym", "group", 16, torch.bfloat16)
            return torch._grouped_mm(x, wd.transpose(-2, -1), offs=o)
        gm = _traced(f, x, offs, *q)
        ref = _run(gm, x=x, o=offs, **dict(zip('dsz', q)))
        self.assertEqual(lowering.rewrite_grouped_mm(gm.graph, "always"), 1)
        gm.recompile()
        self.assertExpectedInline(_calls(gm), """call_function moe_ops.grouped_mm.default""")
        self.assertLess(rel_err(_run(gm, x=x, o=offs, **dict(zip('dsz', q))), ref), 6e-3)  # one bf16 rounding of the output each

    def test_our_grouped_mm_on_dequantized_weights_fused(self):
        x, w, offs = _inputs(torch.bfloat16)
        q = moe_ops.quantize_weight(w, "fp8_e4m3", "channel", 0).op_args()[:2]

        def f(x, o, d, s):
            wd = torch.ops.moe_ops.dequantize_weight(d, s, None, "fp8_e4m3", "channel", 0, torch.bfloat16)
            return torch.ops.moe_ops.grouped_mm(x, wd, None, None, o)
        gm = _traced(f, x, offs, *q)
        ref = _run(gm, x=x, o=offs, **dict(zip('dsz', q)))
        self.assertEqual(lowering.rewrite_grouped_mm(gm.graph), 1)  # pass 2 applies under "auto" too
        gm.recompile()
        self.assertExpectedInline(_calls(gm), """call_function moe_ops.grouped_mm.default""")
        self.assertLess(rel_err(_run(gm, x=x, o=offs, **dict(zip('dsz', q))), ref), 6e-3)

    def test_non_matching_graphs_untouched(self):
        x, w, offs = _inputs()
        cases = [(lambda a, b: torch.bmm(a.unsqueeze(0), b), (x.float(), w[:1].float().transpose(-2, -1))),
                 (lambda a, b, o: torch._grouped_mm(a, b.transpose(-2, -1), offs=o, out_dtype=torch.bfloat16),
                  (x, w, offs)),
                 (lambda a, b: torch._grouped_mm(a, b.transpose(-2, -1)), (x.reshape(1, M, K).expand(E, M, K), w))]
        for fn, args in cases:
            gm = _traced(fn, *args)
            before = gm.code
            self.assertEqual(lowering.rewrite_grouped_mm(gm.graph, "always"), 0)
            gm.recompile()
            self.assertEqual(gm.code, before)


    def test_swiglu_pair_to_expert_mlp(self):
        x, _, offs = _inputs()
        g = torch.Generator().manual_seed(1)
        w1 = (torch.randn(E, 2 * 16, K, generator=g) * K ** -0.5).bfloat16()
        w2 = (torch.randn(E, K, 16, generator=g) * 0.25).bfloat16()

        def f(x, a, b, o):
            gate, up = torch._grouped_mm(x, a.transpose(-2, -1), offs=o).chunk(2, dim=-1)
            return torch._grouped_mm(F.silu(gate) * up, b.transpose(-2, -1), offs=o)
        gm = _traced(f, x, w1, w2, offs)
        ref = _run(gm, x=x, a=w1, b=w2, o=offs)
        lowering.rewrite_grouped_mm(gm.graph, "always")
        self.assertEqual(lowering.fuse_moe_patterns(gm.graph), 1)
        gm.recompile()
        self.assertExpectedInline(_calls(gm), """\
call_method size
call_function torch.arange
call_function torch.ones
call_function moe_ops.expert_mlp.default""")
        self.assertLess(rel_err(_run(gm, x=x, a=w1, b=w2, o=offs), ref), 1e-2)  # bf16 h rounded once less

    def test_swiglu_with_h_used_elsewhere_untouched(self):
        x, _, offs = _inputs()
        w1, w2 = torch.randn(E, 32, K).bfloat16(), torch.randn(E, K, 16).bfloat16()

        def f(x, a, b, o):
            gate, up = torch._grouped_mm(x, a.transpose(-2, -1), offs=o).chunk(2, dim=-1)
            h = F.silu(gate) * up
            return torch._grouped_mm(h, b.transpose(-2, -1), offs=o), h.sum()
        gm = _traced(f, x, w1, w2, offs)
        lowering.rewrite_grouped_mm(gm.graph, "always")
        self.assertEqual(lowering.fuse_moe_patterns(gm.graph), 0)

    def test_weighted_index_add_to_unpermute(self):
        g = torch.Generator().manual_seed(2)
        T, k = 9, 2
        ids = torch.randint(0, E, (T, k), generator=g)
        w = torch.rand(T, k, generator=g)
        y = torch.randn(T * k, 8, generator=g)

        def f(y, i, w):
            order = torch.argsort(i.reshape(-1), stable=True)
            tok = order // k
            return torch.zeros(T, 8).index_add_(0, tok, torch.tanh(y) * w.reshape(-1)[order].unsqueeze(1))
        gm = _traced(f, y, ids, w)
        ref = _run(gm, y=y, i=ids, w=w)
        self.assertEqual(lowering.fuse_moe_patterns(gm.graph), 0)  # torch.zeros, not zeros_like: no match

        def f2(y, x, i, w):
            order = torch.argsort(i.reshape(-1), stable=True)
            tok = order // k
            return torch.zeros_like(x).index_add_(0, tok, torch.tanh(y) * w.reshape(-1)[order].unsqueeze(1))
        x = torch.zeros(T, 8)
        gm = _traced(f2, y, x, ids, w)
        self.assertEqual(lowering.fuse_moe_patterns(gm.graph), 1)
        gm.recompile()
        self.assertIn("moe_ops.unpermute.default", _calls(gm))
        self.assertLess(rel_err(_run(gm, y=y, x=x, i=ids, w=w), ref), 1e-6)


def test_auto_policy_where_aten_is_fast_rewrites_only_swiglu_pairs(monkeypatch):
    """As on Hopper (``_prefer_ours`` False): a lone _grouped_mm stays aten's, the GEMMs of a
    gate/up -> SwiGLU -> down pair are rewritten (and fused by pass 3)."""
    from moe_ops.lowering import passes
    monkeypatch.setattr(passes, "_prefer_ours", lambda device, policy: policy == "always")
    x, w, offs = _inputs()
    gm = _traced(lambda x, w, o: torch._grouped_mm(x, w.transpose(-2, -1), offs=o), x, w, offs)
    assert lowering.rewrite_grouped_mm(gm.graph, "auto") == 0
    block = PlainMoEBlock()
    with torch.no_grad():  # inference: pass 3 fuses the pair (training graphs: test below)
        gm = _traced(block, torch.randn(40, 32, dtype=torch.bfloat16))
    assert lowering.rewrite_grouped_mm(gm.graph, "auto") == 2
    assert lowering.fuse_moe_patterns(gm.graph) == 2


class BlockGraphTest(TestCase):
    def test_plain_moe_block_becomes_one_expert_mlp(self):
        """Passes 1-4 turn the whole expert path (gather, two GEMMs, SwiGLU, weighted combine)
        of an inference graph into one fused expert_mlp call on the block's own routing."""
        block = PlainMoEBlock()
        x = torch.randn(40, 32, dtype=torch.bfloat16)
        with torch.no_grad():
            gm = _traced(block, x)
        lowering.rewrite_grouped_mm(gm.graph, "always")
        lowering.fuse_moe_patterns(gm.graph)
        gm.recompile()
        self.assertExpectedInline("\n".join(c for c in _calls(gm).splitlines() if "moe_ops" in c), """call_function moe_ops.expert_mlp.default""")


def test_training_graph_keeps_the_swiglu_pair_unfused():
    """Traced with autograd recording (the block's parameters require grad), pass 3 leaves the
    gate/up -> SwiGLU -> down pair as two grouped_mm calls; pass 4 still makes the combine an
    unpermute."""
    block = PlainMoEBlock()
    gm = _traced(block, torch.randn(40, 32, dtype=torch.bfloat16))
    assert lowering.rewrite_grouped_mm(gm.graph, "always") == 2
    assert lowering.fuse_moe_patterns(gm.graph) == 1
    gm.recompile()
    calls = [c for c in _calls(gm).splitlines() if "moe_ops" in c]
    assert calls == ["call_function moe_ops.grouped_mm.default"] * 2 + ["call_function moe_ops.unpermute.default"]


def test_plain_moe_block_compiled_with_passes():
    """A training graph: no graph break; the expert GEMMs become our grouped_mm, the combine
    our unpermute and the routing our route operator, forward and backward (the compiled graph's
    extern calls are our reference's segment GEMM); pass 3 leaves the SwiGLU pair unfused under
    autograd (the fused operator's backward recomputes the gate/up GEMM: slower, measured);
    numerics as eager."""
    from torch._inductor.utils import run_and_get_code
    torch._dynamo.reset()
    # seeded (the router's init and x): with data from whatever the RNG holds after other tests,
    # a token's 2nd and 3rd softmax scores came out exactly equal in bf16; moe_ops::route gives
    # such ties to the lower expert, torch.topk here did not, and the token's routing differed
    torch.manual_seed(0)
    block = PlainMoEBlock()
    x = torch.randn(40, 32, dtype=torch.bfloat16, requires_grad=True)
    with torch.no_grad():
        top = torch.softmax(block.router(x).float(), -1).topk(3, dim=-1).values
        assert bool((top[:, 1] > top[:, 2]).all())  # no tie at the top-2 boundary
    ref = block(x).float().pow(2).sum()
    ref.backward()
    gx, gw, gr = x.grad.clone(), block.gate_up.grad.clone(), block.router.weight.grad.clone()
    x.grad = None
    block.zero_grad()
    opts = lowering.compile_options("always")
    opts["fx_graph_cache"] = False  # run the passes (a cache hit would skip them) and show the code
    step = torch.compile(lambda a: block(a).float().pow(2).sum(), fullgraph=True, options=opts)
    with torch._functorch.config.patch(enable_autograd_cache=False):
        loss, code = run_and_get_code(lambda: step(x).backward() or step(x))
    assert opts["pre_grad_custom_pass"].rewrites == 4  # 2 GEMMs, the combine, the routing
    assert "segment_mm" in "\n".join(code)
    x.grad = None
    block.zero_grad()
    step(x).backward()
    # bf16 outputs and gradients, rounded at different points than aten's: bf16 noise
    assert rel_err(x.grad, gx) < 2e-2 and rel_err(block.gate_up.grad, gw) < 2e-2
    assert rel_err(block.router.weight.grad, gr) < 2e-2  # through moe_ops::route's autograd
    assert abs(float(loss) - float(ref)) < 1e-2 * float(ref)


def test_enable_disable_switch():
    import pytest
    import torch._inductor.config as cfg
    before = cfg.pre_grad_custom_pass
    with lowering.enabled("always") as p:
        assert cfg.pre_grad_custom_pass is p and p.then is before
    assert cfg.pre_grad_custom_pass is before
    for bad in (lambda: lowering.MoEGraphPass("never"), lambda: lowering.rewrite_grouped_mm(torch.fx.Graph(), "never")):
        with pytest.raises(ValueError, match="policy"):
            bad()
    assert cfg.pre_grad_custom_pass is before
