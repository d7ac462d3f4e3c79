"""Probe: DeepSeek-V3 E=32 gate_up dgrad (and forward) run to run, T=4096, skewed routing: the
``moe_ops::grouped_mm_dgrad`` op and ``dispatch.grouped_mm_dgrad`` against ``torch._grouped_mm``,
eager and CUDA-graph timed, two rounds, with x and W requiring grad and not, then after 3 s of
the peer's dgrad (a hot GPU). Session 29 asked whether ``bench_training.py``'s dgrad row (3.7-4.1
ms against the peer's 3.0-3.2 over sessions 19-29, where ``probe_persistent.py`` measured ~3.05)
is the kernel or the run: results/probe_dgrad_dsv3_noise_h100_s29.log.

Usage (GPU): ``python benchmarks/probe_dgrad_noise.py``
"""
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(__file__))
import harness  # noqa: E402
from moe_ops.kernels import dispatch  # noqa: E402

import moe_ops  # noqa: E402,F401  (registers torch.ops.moe_ops)


def main():
    dev = torch.device("cuda")
    E, top_k, K, N = 32, 8, 7168, 4096
    for rg in (False, True):
        offs, x, w, dy = harness.training_operands(E, top_k, K, N, 4096, dev, requires_grad=rg)
        with torch.no_grad():
            fns = {"op_dgrad": lambda: torch.ops.moe_ops.grouped_mm_dgrad(dy, w, None, None, offs),
                   "dispatch_dgrad": lambda: dispatch.grouped_mm_dgrad(dy, w, None, None, offs, "none", "none", 0,
                                                                       "none"),
                   "peer_dgrad": lambda: torch._grouped_mm(dy, w, offs=offs),
                   "op_fwd": lambda: torch.ops.moe_ops.grouped_mm(x, w, None, None, offs),
                   "peer_fwd": lambda: torch._grouped_mm(x, w.transpose(-2, -1), offs=offs)}
            for rnd in range(2):
                for k, fn in fns.items():
                    fn()
                    torch.cuda.synchronize()
                    e, g = harness.bench_ms(fn), harness.bench_graph_ms(fn, reps=5)
                    print(f"requires_grad={rg} round {rnd} {k}: eager {e:.3f} ms graph {g:.3f} ms", flush=True)
            t0 = time.time()
            while time.time() - t0 < 3:
                torch._grouped_mm(dy, w, offs=offs)
            torch.cuda.synchronize()
            for k in ("op_dgrad", "peer_dgrad"):
                print(f"requires_grad={rg} hot {k}: eager {harness.bench_ms(fns[k]):.3f} ms", flush=True)
        x = w = dy = None


if __name__ == "__main__":
    main()
