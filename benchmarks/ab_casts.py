"""A/B timing of the FP8 recipes' token-block casts across two source trees: each case's default
config, CUDA-graph timed, its codes and scales saved, or compared bit for bit with a previous run's.

Usage (GPU): ``python benchmarks/ab_casts.py --save A.pt`` on one tree, then the same with
``--compare A.pt`` on the other (e.g. the kernel file swapped between the two runs). A case is
``shape:per_expert|per_block[:config]`` over :data:`bench_training.SHAPES` at T = 4096 (x, as
``bench_training.py``'s cast rows; fixed seeds, so both runs quantize the same x); ``config``
(comma-separated integers, 0/1 for the flags: ``64,4,1,4,1,1``) replaces the default one, so
that two configs can be A/B-ed on one tree (``--save`` with one, ``--compare`` with the other,
the same case names but for the config part: outputs are matched by position); compared:
the codes of the rows below ``offs[-1]`` and the used units' scales (the rest of the layout is
never written). Share: x's bytes read + written over the copy ceiling measured in the run.
"""
from __future__ import annotations

import os
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))
import harness  # noqa: E402
from bench_training import SHAPES  # noqa: E402

from moe_ops.kernels.token_block_quant import BLOCK, padded_columns, token_block_quant  # noqa: E402

DEFAULT_CASES = [f"{s}:{u}" for s in SHAPES for u in ("per_expert", "per_block")]


def run_case(case: str, copy_gbps: float):
    """``(ms, (codes, scales), note)`` of one case: the default config, CUDA-graph timed; what
    the layout defines (the codes of rows below ``offs[-1]``, the used units' scales; the rest is
    never written)."""
    dev = torch.device("cuda")
    sname, unit, *cfg = case.split(":")
    config = tuple(int(v) for v in cfg[0].split(",")) if cfg else None
    E, top_k, K, N = SHAPES[sname]
    torch.manual_seed(0)
    offs, x, _w, _dy = harness.training_operands(E, top_k, K, N, 4096, dev)
    fn = lambda: token_block_quant(x, offs, unit == "per_expert", config)  # noqa: E731
    q, s = fn()
    ms = harness.bench_graph_ms(fn)
    cols = padded_columns(offs, x.shape[0])
    cols = cols[cols >= 0]
    rows = slice(None) if unit == "per_expert" else torch.unique(cols // BLOCK)
    share = x.numel() * 3 / ms / 1e6 / copy_gbps
    return ms, (q.view(torch.uint8)[:, cols], s[rows]), f"{share:.3f} of copy"


if __name__ == "__main__":
    dev = torch.device("cuda")
    copy = harness.ceilings(dev)["copy_GBps"]
    print("env", harness.environment(dev), f"copy {copy:.0f} GB/s", flush=True)
    harness.ab_run(harness.ab_arguments(DEFAULT_CASES), lambda case: run_case(case, copy))
