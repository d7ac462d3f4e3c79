"""Per-kernel GPU time of one MoE layer call (torch.profiler), to see where decode time goes.

Usage (GPU): ``python benchmarks/profile_moe_decode.py [--T 1] [--formats bf16,int4_g128]``.
"""
from __future__ import annotations

import argparse
import os
import sys

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, os.path.dirname(__file__))
from bench_moe_layer import LAYERS, quantized_layer  # noqa: E402


def main(args):
    dev = torch.device("cuda")
    H = LAYERS[args.layer][0]
    for fname in args.formats.split(","):
        m = quantized_layer(args.layer, fname, dev)[0]
        x = torch.randn(args.T, H, device=dev, dtype=torch.bfloat16)
        with torch.no_grad():
            for _ in range(3):
                m(x)
            torch.cuda.synchronize()
            with profile(activities=[ProfilerActivity.CUDA]) as prof:
                for _ in range(20):
                    m(x)
                torch.cuda.synchronize()
        print(f"== {args.layer} T={args.T} {fname}")
        print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=12, max_name_column_width=60))
        # the layer's kernels in launch order, each one's mean duration over the calls
        kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA
                   and e.name not in ("Memset (Device)", "Memcpy DtoD (Device -> Device)")]
        per_call = len(kernels) // 20
        for i in range(per_call):
            us = sum(e.device_time_total for e in kernels[i::per_call]) / 20
            print(f"  launch {i}: {us:7.2f} us  {kernels[i].name[:70]}")
        us = sum(e.device_time_total for e in kernels) / 20
        print(f"  all {per_call} launches: {us:.2f} us of kernel time a call")


if __name__ == "__main__":
    p = argparse.ArgumentParser()
    p.add_argument("--layer", default="qwen3")
    p.add_argument("--T", type=int, default=1)
    p.add_argument("--formats", default="bf16,int4_g128,int8_w8a8")
    p.add_argument("--out", default=None)
    main(p.parse_args())
