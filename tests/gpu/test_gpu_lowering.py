"""GPU tests of moe_ops.lowering (marked ``gpu``): the code Inductor generates for a plain
torch._grouped_mm MoE block launches our Triton kernels itself, matches the block compiled
without the passes, and decodes under CUDA graphs with the sync-debug mode at error."""
import os
import sys

import pytest
import torch

import moe_ops.lowering as lowering
from helpers import rel_err, replays_without_sync

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "benchmarks"))
DEV = "cuda" if torch.cuda.is_available() else None
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(DEV is None, reason="needs a CUDA device")]


def test_generated_code_launches_our_kernels():
    from plain_moe import PlainMoEBlock
    from torch._inductor.utils import run_and_get_code
    torch._dynamo.reset()
    block = PlainMoEBlock(512, 256, 16, 4, DEV)
    x = torch.randn(300, 512, device=DEV, dtype=torch.bfloat16)
    with torch.no_grad():
        ref = torch.compile(block)(x)
        opts = lowering.compile_options()
        opts["fx_graph_cache"] = False
        out, code = run_and_get_code(torch.compile(block, options=opts), x)
    src = "\n".join(code)
    assert "grouped_gemm_kernel" in src  # our Triton kernel, launched by Inductor's code
    assert "topk_kernel" in src and "count_sort_kernel" in src  # the routing (pass 5), 1200 rows
    assert opts["pre_grad_custom_pass"].rewrites == 5
    assert rel_err(out, ref) < 2e-2


def test_reduce_overhead_decode_no_sync():
    """Decode under CUDA graphs with the router folded into ``router_route`` (its semaphore a
    buffer the pass registers): no cudagraph skip for the mutated buffer, no sync, each replay
    right (a semaphore not left at 0 would misroute the next call)."""
    from plain_moe import PlainMoEBlock
    from torch._dynamo.utils import counters
    torch._dynamo.reset()
    counters.clear()
    block = PlainMoEBlock(512, 256, 16, 4, DEV)
    # mode="reduce-overhead" as options (torch.compile takes one of mode / options)
    opts = lowering.compile_options()
    step = torch.compile(block, options={"triton.cudagraphs": True, **opts})
    xs = [torch.randn(1, 512, device=DEV, dtype=torch.bfloat16) for _ in range(6)]
    replays_without_sync(step, block, xs, 2e-2)
    assert counters["inductor"]["cudagraph_skips"] == 0
    sems = [b for name, b in step._orig_mod.named_buffers() if "semaphore" in name]
    assert sems == []  # the buffer lives on the compiled graph, not on the user's module


def test_decode_router_folded_into_one_launch():
    """Inference at decode size: the generated code launches ``router_topk_sort_kernel`` (the
    router GEMM and the routing in one launch) instead of a GEMM and the routing kernel."""
    from plain_moe import PlainMoEBlock
    from torch._inductor.utils import run_and_get_code
    torch._dynamo.reset()
    block = PlainMoEBlock(512, 256, 16, 4, DEV)
    x = torch.randn(3, 512, device=DEV, dtype=torch.bfloat16)
    opts = lowering.compile_options()
    opts["fx_graph_cache"] = False
    with torch.no_grad():
        ref = block(x)
        step = torch.compile(block, options=opts)
        out, code = run_and_get_code(step, x)
        again = step(x)
    src = "\n".join(code)
    # the generated module holds each launched kernel's source: the one-launch router, not
    # the routing kernel that reads logits (whose name router_topk_sort_kernel's docstring cites)
    assert "def router_topk_sort_kernel(" in src and "def topk_sort_kernel(" not in src
    assert "extern_kernels.mm" not in src  # no router GEMM left
    assert rel_err(out, ref) < 2e-2 and torch.equal(again, out)


def test_max_autotune_offers_our_tiles_to_inductor():
    """Under max_autotune the compiled graph launches a triton.autotune kernel with our
    candidate tiles (Inductor's user-kernel autotuner times them on the first run); 16-bit
    weights at prefill sizes take the persistent kernel instead, untuned (lowering.autotune)."""
    import moe_ops
    from helpers import oracle_grouped_mm, ragged_offs
    from torch._inductor.utils import run_and_get_code
    torch._dynamo.reset()
    g = torch.Generator().manual_seed(5)
    x = torch.randn(3000, 512, generator=g).bfloat16()
    w = (torch.randn(8, 384, 512, generator=g) * 0.05).bfloat16()
    offs = ragged_offs(3000, 8, g, empty=(2,), tail=7)
    qw = moe_ops.quantize_weight(w, "int8_sym", "channel", 0)
    for args, kernel in ((qw.op_args(), "grouped_gemm_kernel"), ((w, None, None, "none", "none", 0), None)):
        torch._dynamo.reset()
        fn = torch.compile(lambda a, o, args=args: torch.ops.moe_ops.grouped_mm(
            a, *[t.to(DEV) if torch.is_tensor(t) else t for t in args[:3]], o, *args[3:], "none", "none"),
            options={"max_autotune": True, "fx_graph_cache": False})
        out, code = run_and_get_code(fn, x.to(DEV), offs.to(DEV))
        src = "\n".join(code)
        if kernel:
            # Inductor's user_autotune(configs=[{'kwargs': {'BLOCK_M': .., 'BLOCK_N': .., ...}}, ...]): one
            # entry per candidate tile (a single static launch names BLOCK_N once, in its constants)
            assert kernel in src and src.count("'BLOCK_N':") >= 4
        elif torch.cuda.get_device_capability()[0] >= 9:
            assert "persistent_grouped_kernel" in src and "grouped_gemm_kernel" not in src
        assert rel_err(out.cpu(), oracle_grouped_mm(x, args, offs)) < 1e-2
        assert torch.all(out[int(offs[-1]):] == 0)


def test_router_folded_compiled_under_inference_mode():
    """Compiled first under ``inference_mode``: the pass's semaphore is still a normal tensor, so
    a later call of the same compiled graph outside inference_mode may update it in place."""
    from plain_moe import PlainMoEBlock
    torch._dynamo.reset()
    block = PlainMoEBlock(512, 256, 16, 4, DEV)
    x = torch.randn(2, 512, device=DEV, dtype=torch.bfloat16)
    step = torch.compile(block, options=lowering.compile_options())
    with torch.inference_mode():
        first = step(x)
    with torch.no_grad():
        again = step(x)
        ref = block(x)
    assert torch.equal(first, again) and rel_err(first, ref) < 2e-2
