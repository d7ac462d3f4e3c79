"""The plain-PyTorch MoE block (router + [E, N, K] weights + torch._grouped_mm + SwiGLU +
index_add_ combine; no moe_ops in the model code) compiled without and with
``moe_ops.lowering`` (``compile_options()``, policy "auto"): ms per call (CUDA-graph replays),
kernels per call, ratio. Each T also gets a ``bound_weight_bytes`` row: the least time of a call
at the copy ceiling measured in the run (:func:`weight_bytes_ms`), and in its ratio column the
largest speedup over the compiled block that those bytes allow: the block's weights are 16-bit
and the passes keep them so, so no rewrite can beat it.

Usage (GPU): ``python benchmarks/bench_lowering.py [--out DIR] [--layers qwen3,dsv3]``.
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))
import harness  # noqa: E402
from bench_moe_layer import LAYERS, count_kernels  # noqa: E402
from plain_moe import PlainMoEBlock  # noqa: E402

import moe_ops.lowering as lowering  # noqa: E402


def weight_bytes_ms(block: PlainMoEBlock, x: torch.Tensor, copy_gbps: float) -> float:
    """Milliseconds to move, at ``copy_gbps``, what a call of ``block`` on ``x`` must read and
    write at least: the router weight, the gate/up and down weights of each expert that the
    routing of ``x`` selects, x, and the output (the intermediates left out)."""
    with torch.no_grad():
        ids = torch.topk(block.router(x).float(), block.k, dim=-1).indices
    active = int(torch.unique(ids).numel())
    size = block.gate_up.element_size()
    per_expert = (block.gate_up[0].numel() + block.down[0].numel()) * size
    total = active * per_expert + block.router.weight.numel() * size + 2 * x.numel() * x.element_size()
    return total / (copy_gbps * 1e6)


def run(args):
    dev = torch.device("cuda")
    env = harness.environment(dev)
    ceil = harness.ceilings(dev)
    rows = []
    # two compiled versions of one module over three token counts: past dynamo's default limit
    # of 8 recompiles a frame runs eager, which would time eager code as "compiled"
    torch._dynamo.config.recompile_limit = 64
    for lname in args.layers.split(","):
        torch._dynamo.reset()
        H, I, E, k = LAYERS[lname]
        block = PlainMoEBlock(H, I, E, k, dev)
        plain = torch.compile(block)
        opts = lowering.compile_options()
        ours = torch.compile(block, options=opts)
        for T in args.tokens:
            x = torch.randn(T, H, device=dev, dtype=torch.bfloat16)
            res = {}
            with torch.no_grad():
                for name, fn in (("compiled", plain), ("compiled_with_lowering", ours)):
                    fn(x)
                    res[name] = (harness.bench_graph_ms(lambda: fn(x), reps=10), count_kernels(lambda: fn(x)))
                err = float((ours(x).float() - plain(x).float()).norm() / plain(x).float().norm())
            for name, (ms, nk) in res.items():
                rows.append({"layer": lname, "T": T, "variant": name, "ms": ms, "kernels": nk,
                             "x_vs_compiled": res["compiled"][0] / ms, "rel_diff": err,
                             "rewrites": opts["pre_grad_custom_pass"].rewrites})
                print(rows[-1], flush=True)
            bound = weight_bytes_ms(block, x, ceil["copy_GBps"])
            rows.append({"layer": lname, "T": T, "variant": "bound_weight_bytes", "ms": bound,
                         "x_vs_compiled": res["compiled"][0] / bound})
            print(rows[-1], flush=True)
    cols = ["layer", "T", "variant", "ms", "kernels", "x_vs_compiled", "rel_diff", "rewrites"]
    print(harness.write_results("lowering_" + env.get("device", "gpu").replace(" ", "_"), env, ceil, rows, cols,
                                args.out))


if __name__ == "__main__":
    p = argparse.ArgumentParser()
    p.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"))
    p.add_argument("--layers", default="qwen3,dsv3")
    p.add_argument("--tokens", type=int, nargs="+", default=[4096, 1, 16])
    run(p.parse_args())
