"""A list-scheduling model of in-order program dispatch against largest-expert-first, for the
per-expert token-block cast and the wgrad GEMMs' ``(tile, expert)`` grids at the benchmark's
skewed routing (T = 4096, top-8, :func:`harness.skewed_offs`, seed 1). CPU only.

Each program's time is a count of serial steps (per-expert cast: 2 + its first-pass steps + its
blocks, the second pass taking one block a step; wgrad: 2 + its token blocks), programs go to the
first free of ``132 x per_sm`` slots in grid order, and nothing shares bandwidth: a slot runs
as fast alone as with all slots busy, so the tail it reports is an upper bound.

Usage: ``python benchmarks/model_dispatch_tail.py``
"""
from __future__ import annotations

import heapq
import os
import sys

sys.path.insert(0, os.path.dirname(__file__))
import harness  # noqa: E402

SMS = 132


def makespan(durations, slots: int) -> int:
    """Steps until the last program ends, programs dispatched in list order to the first free slot."""
    free = [0] * slots
    end = 0
    for d in durations:
        t = heapq.heappop(free) + d
        end = max(end, t)
        heapq.heappush(free, t)
    return end


def expert_rows(E: int):
    offs = harness.skewed_offs(4096, E, 8, "cpu", seed=1).tolist()
    return [b - a for a, b in zip([0] + offs[:-1], offs)]


def compare(name: str, rows, per_expert_steps, programs_per_expert: int, per_sm: int) -> None:
    """Makespans of the grid with experts in index order and by row count, most first."""
    order = sorted(range(len(rows)), key=lambda e: (-rows[e], e))
    steps = [per_expert_steps(r) for r in rows]
    plain = makespan([steps[e] for e in range(len(rows)) for _ in range(programs_per_expert)], SMS * per_sm)
    first = makespan([steps[e] for e in order for _ in range(programs_per_expert)], SMS * per_sm)
    busy = sum(steps) * programs_per_expert / (SMS * per_sm)
    print(f"{name:36s} index order {plain:5d}  largest first {first:5d}  ({first / plain:.3f})  "
          f"work / slots {busy:7.1f}  largest experts at {order[:5]}")


def main() -> None:
    blocks = lambda r: -(-r // 128)  # noqa: E731
    # per-expert cast, the default configs: (C, BLOCK_C, step_blocks, programs an SM holds)
    for name, E, C, bc, step, per_sm in (("qwen3_gate_up cast (32, 4, T, 4, T)", 128, 2048, 32, 4, 5),
                                         ("qwen3_down cast (16, 4, T, 4, T)", 128, 768, 16, 4, 8),
                                         ("dsv3_gate_up_e32 cast (64, 4, T, 2, T)", 32, 7168, 64, 2, 3)):
        compare(name, expert_rows(E), lambda r, s=step: 2 + -(-blocks(r) // s) + blocks(r), C // bc, per_sm)
    # wgrad GEMMs: 128 x 128 output tiles, one token block a step, 2 programs an SM
    for name, E, N, K in (("qwen3_gate_up wgrad", 128, 1536, 2048), ("qwen3_down wgrad", 128, 2048, 768),
                          ("dsv3_gate_up_e32 wgrad", 32, 4096, 7168)):
        compare(name, expert_rows(E), lambda r: 2 + blocks(r), (N // 128) * (K // 128), 2)


if __name__ == "__main__":
    main()
