"""Probe: does capping registers (Triton's ``maxnreg`` compile option, more resident warps a
scheduler) speed up the latency-bound int4 decode launches? The fused expert MLP at T=1 (and
the plain packed-gemv forward), CUDA-graph timed, each launch of ``grouped_gemm_kernel`` given
``maxnreg`` through a patched launcher; outputs compared with the uncapped launch's.

Usage (GPU): ``python benchmarks/probe_maxnreg.py [--out DIR]``
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))
import harness  # noqa: E402
from bench_moe_layer import LAYERS  # noqa: E402

import moe_ops  # noqa: E402
from moe_ops.kernels import dispatch, launch  # noqa: E402

CAP = {"launch": None, "value": None}  # which launch (0 gate/up, 1 down, None both) gets the cap
_orig = launch.launch


def _capped(kernel, grid, kwargs, descriptors, **options):
    if CAP["value"] is not None:
        options = dict(options, maxnreg=CAP["value"])
    return _orig(kernel, grid, kwargs, descriptors, **options)


def main(args):
    dev = torch.device("cuda")
    env = harness.environment(dev)
    rows = []
    dispatch.launch.launch = _capped
    for lname in ("qwen3", "dsv3"):
        H, I, E, k = LAYERS[lname]
        m = moe_ops.MoE.from_style("qwen3", H, I, E, k, dtype=torch.bfloat16, seed=0).to(dev)
        moe_ops.quantize_experts(m, "int4_asym", "group", 128)
        a1, a2 = m.gate_up.op_args(), m.down.op_args()
        for T in (1, 8):
            x = torch.randn(T, H, device=dev, dtype=torch.bfloat16)
            r = m.route(x)
            args_ = (x, r.weights, r.sorted_rows, r.offs, *a1[:3], *a2[:3], a1[3], a1[4], a1[5], a2[5], "none", "none")
            cfgs = dispatch.expert_mlp_configs(T * k, H, I, E, a1[3], a1[4], a1[5], a2[5], "none")
            CAP["value"] = None
            ref = dispatch.expert_mlp(*args_, configs=cfgs).clone()
            for cap in (None, 64, 72, 80, 96, 112):
                CAP["value"] = cap
                try:
                    out = dispatch.expert_mlp(*args_, configs=cfgs)
                    same = bool(torch.equal(out, ref))
                    us = harness.bench_graph_ms(lambda: dispatch.expert_mlp(*args_, configs=cfgs)) * 1e3
                except Exception as e:  # a cap ptxas rejects: recorded, not fatal
                    print(f"{lname} T={T} maxnreg={cap}: FAILED {type(e).__name__}: {str(e).splitlines()[0][:160]}")
                    continue
                rows.append({"layer": lname, "T": T, "maxnreg": cap, "us": us, "equal_to_uncapped": same})
                print(f"{lname} int4 T={T} fused MLP maxnreg={cap}: {us:.1f} us (equal: {same})", flush=True)
        m = None
    CAP["value"] = None
    harness.write_json(os.path.join(args.out, "probe_maxnreg.json"), {"env": env, "rows": rows})


if __name__ == "__main__":
    p = argparse.ArgumentParser()
    p.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"))
    main(p.parse_args())
