"""Probe: the ``w_lhs`` int4 tile with W's stored codes by TMA (``dispatch.W_LHS_TMA_W``) against
the same tile with W by pointers, on fresh data, twice: differing elements, their largest
difference, each result's error against the float64 oracle, and whether two TMA runs agree.

Session 20 found (H100, Triton 3.6) 256-row tiles with 8 warps wrong and nondeterministic with W
by TMA (relative error 5-10%, two runs differ), while 128-row / 8-warp and 256-row / 4-warp
tiles matched the pointer tile bit for bit; ``dispatch._tma_operands`` therefore gives W's
descriptor to ``w_lhs`` tiles of at most 128 rows only. This script reproduces the finding.

Usage (GPU): ``python benchmarks/probe_w_lhs_tma_w.py``
"""
from __future__ import annotations

import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))
from helpers import oracle_grouped_mm, ragged_offs, rel_err  # noqa: E402

import moe_ops  # noqa: E402
from moe_ops.kernels import dispatch  # noqa: E402
from moe_ops.lowering.kernel_choice import KernelConfig  # noqa: E402

TILES = [KernelConfig(256, 128, 64, 8, 3, w_lhs=True, tma=True), KernelConfig(256, 128, 64, 8, 4, w_lhs=True, tma=True),
         KernelConfig(128, 128, 64, 8, 3, w_lhs=True, tma=True), KernelConfig(256, 128, 64, 4, 3, w_lhs=True, tma=True)]


def _tma_operands_unrestricted(orig):
    """``_tma_operands`` with W's descriptor for every ``w_lhs`` tile (the pre-restriction rule)."""
    def f(xq, w, w_strides, config, meta, consts):
        descs, tma_x, tma_w = orig(xq, w, w_strides, config, meta, consts)
        box = meta["BLOCK_K"] // consts["PACK"]
        if dispatch.W_LHS_TMA_W and meta["W_LHS"] and not tma_w and box * w.element_size() % 16 == 0:
            descs["w_desc"], tma_w = (w, (1, meta["BLOCK_N"], box)), 1
        return descs, tma_x, tma_w
    return f


def main():
    dev = "cuda"
    dispatch._tma_operands = _tma_operands_unrestricted(dispatch._tma_operands)
    for M, E, N, K in [(3000, 8, 320, 640), (3000, 8, 256, 512)]:
        g = torch.Generator().manual_seed(5)
        x = torch.randn(M, K, generator=g).bfloat16()
        w = torch.randn(E, N, K, generator=g) * 0.05
        offs = ragged_offs(M, E, g, empty=(2,), tail=5)
        args = moe_ops.quantize_weight(w.bfloat16(), "int4_asym", "group", 128).op_args()
        dev_args = [a.to(dev) if torch.is_tensor(a) else a for a in args]
        ref = oracle_grouped_mm(x, args, offs)
        for cfg in TILES:
            outs = {}
            for tma_w in (False, True, True):
                dispatch.W_LHS_TMA_W = tma_w
                out = torch.full((M, N), float("nan"), dtype=torch.bfloat16, device=dev)
                y = dispatch.grouped_mm(x.to(dev), *dev_args[:3], offs.to(dev), *dev_args[3:], "none", "none",
                                        config=cfg, out=out)
                outs.setdefault(tma_w, []).append(y.clone())
            dispatch.W_LHS_TMA_W = True
            a, b, c = outs[False][0], outs[True][0], outs[True][1]
            d = (a.float() - b.float()).abs()
            print(f"M N K {(M, N, K)} tile {cfg.block_m}x{cfg.block_n}x{cfg.block_k} {cfg.num_warps} warps "
                  f"{cfg.num_stages} stages: error W by pointers {rel_err(a.cpu(), ref):.2e}, by TMA "
                  f"{rel_err(b.cpu(), ref):.2e}; {int((d > 0).sum())} elements differ (max {float(d.max()):.3g}); "
                  f"two TMA runs equal: {torch.equal(b, c)}", flush=True)


if __name__ == "__main__":
    main()
