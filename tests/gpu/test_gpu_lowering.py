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
    assert opts["pre_grad_custom_pass"].rewrites == 4
    assert rel_err(out, ref) < 2e-2


def test_reduce_overhead_decode_no_sync():
    from plain_moe import PlainMoEBlock
    torch._dynamo.reset()
    block = PlainMoEBlock(512, 256, 16, 4, DEV)
    # mode="reduce-overhead" as options (torch.compile takes one of mode / options)
    step = torch.compile(block, options={"triton.cudagraphs": True, **lowering.compile_options()})
    xs = [torch.randn(1, 512, device=DEV, dtype=torch.bfloat16) for _ in range(5)]
    replays_without_sync(step, block, xs, 2e-2)
