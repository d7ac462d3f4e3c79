"""The plain-PyTorch MoE block (router + [E, N, K] weights + torch._grouped_mm + SwiGLU +
index_add_ combine; no moe_ops in the model code) compiled without and with
``moe_ops.lowering`` (``compile_options()``, policy "auto"): ms per call (CUDA-graph replays),
kernels per call, ratio.

Usage (GPU): ``python benchmarks/bench_lowering.py [--out DIR] [--layers qwen3,dsv3]``.
"""
from __future__ import annotations

import argparse
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(__file__))
import harness  # noqa: E402
from bench_moe_layer import LAYERS, count_kernels  # noqa: E402

import moe_ops.lowering as lowering  # noqa: E402


class PlainMoEBlock(torch.nn.Module):
    """The MoE block as model code writes it with torch._grouped_mm."""

    def __init__(self, H, I, E, k, device):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.k, self.E = k, E
        self.router = torch.nn.Linear(H, E, bias=False, dtype=torch.bfloat16, device=device)
        self.gate_up = torch.nn.Parameter((torch.randn(E, 2 * I, H, generator=g) * H ** -0.5).bfloat16().to(device))
        self.down = torch.nn.Parameter((torch.randn(E, H, I, generator=g) * I ** -0.5).bfloat16().to(device))

    def forward(self, x):
        w, ids = torch.topk(torch.softmax(self.router(x).float(), -1), self.k, dim=-1)
        w = w / w.sum(-1, keepdim=True)
        flat = ids.reshape(-1)
        order = torch.argsort(flat, stable=True)
        counts = torch.zeros(self.E, dtype=torch.int32, device=x.device).scatter_add_(
            0, flat, torch.ones_like(flat, dtype=torch.int32))
        offs = torch.cumsum(counts, 0, dtype=torch.int32)
        tok = order // self.k
        gate, up = torch._grouped_mm(x[tok], self.gate_up.transpose(-2, -1), offs=offs).chunk(2, dim=-1)
        y = torch._grouped_mm(F.silu(gate) * up, self.down.transpose(-2, -1), offs=offs)
        return torch.zeros_like(x).index_add_(0, tok, y * w.reshape(-1)[order].unsqueeze(1).to(y.dtype))


def run(args):
    dev = torch.device("cuda")
    env = harness.environment(dev)
    rows = []
    for lname in args.layers.split(","):
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
    cols = ["layer", "T", "variant", "ms", "kernels", "x_vs_compiled", "rel_diff", "rewrites"]
    print(harness.write_results("lowering_" + env.get("device", "gpu").replace(" ", "_"), env, {}, rows, cols,
                                args.out))


if __name__ == "__main__":
    p = argparse.ArgumentParser()
    p.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"))
    p.add_argument("--layers", default="qwen3,dsv3")
    p.add_argument("--tokens", type=int, nargs="+", default=[4096, 1, 16])
    run(p.parse_args())
