"""Probe: what Hopper's programmatic dependent launch (PDL) saves between small dependent kernels.

Usage (GPU, sm90+): ``python benchmarks/probe_pdl.py [--out DIR]``. A chain of ``LAUNCHES``
decode-like kernels, each streaming its own ``[N, N]`` bf16 weight block (0.5-8 MB, as a decode
GEMM launch does) against the ``[N]`` vector that the previous kernel wrote, is captured in a CUDA
graph and replayed three ways: (a) plain launches; (b) ``launch_pdl=True`` with
``tl.extra.cuda.gdc_wait()`` first, so only the launch latency overlaps the previous kernel;
(c) PDL with the first weight tile loaded before the wait (weights do not depend on the previous
kernel, only the vector does) and ``gdc_launch_dependents()`` after the wait. Each variant's
output is checked against (a). Prints microseconds per launch; writes ``probe_pdl.json``. The
question it answers for the MoE decode layer (five dependent launches at ~33 us): how much of a
launch boundary PDL would hide, before the grouped GEMM kernel is changed to use it.
"""
from __future__ import annotations

import argparse
import os
import sys

import torch
import triton
import triton.language as tl

sys.path.insert(0, os.path.dirname(__file__))
import harness  # noqa: E402

LAUNCHES = 8


@triton.jit
def _stream_kernel(w_ptr, v_ptr, out_ptr, COLS: tl.constexpr, BLOCK_R: tl.constexpr,
                   BLOCK_C: tl.constexpr, MODE: tl.constexpr):
    """out[r] = sum_c w[r, c] * v[c] / COLS for this program's BLOCK_R rows of the square ``w``;
    MODE 0 plain, 1 wait first, 2 first weight tile before the wait."""
    pid = tl.program_id(0)
    rr = pid * BLOCK_R + tl.arange(0, BLOCK_R)
    rc = tl.arange(0, BLOCK_C)
    rows = rr.to(tl.int64)[:, None] * COLS
    if MODE == 1:
        tl.extra.cuda.gdc_wait()
    w0 = tl.load(w_ptr + rows + rc[None, :])
    if MODE == 2:
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()
    acc = tl.sum(w0.to(tl.float32) * tl.load(v_ptr + rc).to(tl.float32)[None, :], 1)
    for c0 in range(BLOCK_C, COLS, BLOCK_C):
        w = tl.load(w_ptr + rows + c0 + rc[None, :])
        acc += tl.sum(w.to(tl.float32) * tl.load(v_ptr + c0 + rc).to(tl.float32)[None, :], 1)
    tl.store(out_ptr + rr, (acc * (1.0 / COLS)).to(out_ptr.dtype.element_ty))


def chain(ws, v0, outs, mode: int):
    """LAUNCHES dependent launches: launch i reads the vector launch i-1 wrote."""
    v = v0
    for w, out in zip(ws, outs):
        n = w.shape[0]
        _stream_kernel[(n // 8,)](w, v, out, COLS=n, BLOCK_R=8, BLOCK_C=256, MODE=mode, num_warps=4,
                                  launch_pdl=mode > 0)
        v = out
    return v


def main(out_dir: str):
    dev = torch.device("cuda")
    results = {"env": harness.environment(dev), "us_per_launch": {}}
    for n in (512, 1024, 2048):  # 0.5, 2, 8 MB of bf16 weights a launch
        ws = [torch.randn(n, n, device=dev, dtype=torch.bfloat16) for _ in range(LAUNCHES)]
        v0 = torch.randn(n, device=dev, dtype=torch.bfloat16)
        outs = [torch.zeros(n, device=dev, dtype=torch.bfloat16) for _ in range(LAUNCHES)]
        ref = chain(ws, v0, outs, 0).clone()
        row = {}
        for mode, name in ((0, "plain"), (1, "pdl_wait_first"), (2, "pdl_weights_before_wait")):
            for o in outs:
                o.fill_(float("nan"))
            got = chain(ws, v0, outs, mode)
            torch.cuda.synchronize()
            ok = torch.equal(got, ref)
            us = harness.bench_graph_ms(lambda m=mode: chain(ws, v0, outs, m)) * 1e3 / LAUNCHES
            row[name] = {"us": round(us, 3), "equal_to_plain": ok}
            print(f"{n * n * 2 / 1e6:.1f} MB a launch, {name}: {us:.2f} us a launch, output equal: {ok}",
                  flush=True)
        results["us_per_launch"][f"{n}x{n}"] = row
    harness.write_json(os.path.join(out_dir, "probe_pdl.json"), results)


if __name__ == "__main__":
    p = argparse.ArgumentParser()
    p.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"))
    main(p.parse_args().out)
