"""Host (Python) cost of one eager call of our operators, and where it goes.

Usage (GPU): ``python benchmarks/profile_host.py``. For each case: the host time of a call
(microseconds, the GPU kept busy so that the host never waits) and the top functions of a
cProfile of 200 calls. Eager training launches several kernels per operator; when the host
takes longer than the GPU, the step is host-bound and kernel speed stops mattering.
"""
from __future__ import annotations

import cProfile
import io
import os
import pstats
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(__file__))
import harness  # noqa: E402

import moe_ops  # noqa: E402


def main():
    dev = torch.device("cuda")
    E, top_k, K, N, T = 128, 8, 768, 2048, 4096
    offs, x, w, dy = harness.training_operands(E, top_k, K, N, T, dev, requires_grad=True)
    from moe_ops import checks
    from moe_ops.kernels import dispatch
    args = (x, w, None, None, offs, "none", "none", 0, "none", "none")
    cases = {
        "grouped_mm bf16": lambda: torch.ops.moe_ops.grouped_mm(x, w, None, None, offs),
        "  its body without torch.library (checks + dispatch)": lambda: (checks.check_grouped_mm(*args),
                                                                         dispatch.grouped_mm(*args)),
        "  dispatch alone (config, launch)": lambda: dispatch.grouped_mm(*args),
        "grouped_mm_wgrad bf16": lambda: torch.ops.moe_ops.grouped_mm_wgrad(dy, x, offs, "none"),
        "grouped_mm fp8_blockwise": lambda: torch.ops.moe_ops.grouped_mm(x, w, None, None, offs,
                                                                        recipe="fp8_blockwise"),
        "fwd+bwd bf16": lambda: torch.autograd.grad(moe_ops.grouped_mm(x, w, offs), (x, w), dy),
        "peer torch._grouped_mm": lambda: torch._grouped_mm(x, w.transpose(-2, -1), offs=offs),
    }
    for name, fn in cases.items():
        with torch.no_grad() if "bwd" not in name else torch.enable_grad():
            for _ in range(3):
                fn()
            torch.cuda.synchronize()
            n = 200
            t0 = time.perf_counter()
            for _ in range(n):
                fn()
            host_us = (time.perf_counter() - t0) / n * 1e6
            torch.cuda.synchronize()
            gpu_ms = harness.bench_graph_ms(fn) if "bwd" not in name else float("nan")
            print(f"== {name}: host {host_us:.0f} us per call (GPU {gpu_ms * 1e3:.0f} us)", flush=True)
            prof = cProfile.Profile()
            prof.enable()
            for _ in range(n):
                fn()
            prof.disable()
            torch.cuda.synchronize()
            s = io.StringIO()
            pstats.Stats(prof, stream=s).sort_stats("tottime").print_stats(14)
            print("\n".join(s.getvalue().splitlines()[6:24]))


if __name__ == "__main__":
    main()
