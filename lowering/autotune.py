"""Opt-in tile tuning of the grouped GEMM launches: a small candidate list around the static
choice of :mod:`moe_ops.lowering.kernel_choice`, timed once per key, never per call.

When it is on:

* under ``torch.compile(mode="max-autotune")`` (Inductor's ``max_autotune`` flag, set while the
  graph is traced): the launch that Inductor sees is a ``triton.autotune`` kernel carrying the
  candidates, so Inductor's own user-kernel autotuner benchmarks them on the first run of the
  compiled graph and keeps the winner;
* in eager mode with ``MOE_OPS_AUTOTUNE=1``: Triton's autotuner times the candidates on the
  first call of each key and reuses the winner (the first call pays for it; without the
  variable, eager calls take the static choice and no call is slow).
  That first call times launches, so it must not run inside a CUDA-graph capture (run one
  call before capturing; compiled graphs warm up before they record).

The tuning key is the weight shape and format (``N``, ``K``, ``E``, the format constexprs) and
the decode/prefill bucket (each bucket has its own candidate list, hence its own tuner), never
the row counts, which are data. Candidates only vary tiles; every one computes the same
function, and each launch writes every output element, so timing runs need no restore.
Candidates are tiles of ``grouped_gemm_kernel``: calls that the persistent kernel serves
(``kernel_choice.choose_persistent_config``: 16-bit prefill forward and dgrad, and the fp8 x fp8
forward with per-row / per-channel scales above 512 rows per expert, on TMA devices; measured
faster than the static tile) take it, tuner or not. The candidates load by pointers; launches
whose static tile is a ``w_lhs`` tile with operands by TMA (int4/int2 weight-only, Hopper)
keep that tile, tuner or not (:func:`keeps_static`): by pointers the same tiles measured 13-87%
slower on an H100 (decode T=16 to prefill; benchmarks/results/tune_tma_w_*h100_s20.*,
tune_tma_x_int4_qwen3_more_h100_s20.log).
"""
from __future__ import annotations

import dataclasses
import functools
import os

from .kernel_choice import KernelConfig, _block_k


def keeps_static(config: KernelConfig) -> bool:
    """Whether a launch whose static choice is ``config`` stays out of the tuner: ``w_lhs`` tiles
    with operands by TMA (the tuner's candidates load by pointers)."""
    return config.w_lhs and config.tma


def enabled() -> bool:
    """True under ``MOE_OPS_AUTOTUNE=1`` or while Inductor compiles with ``max_autotune``."""
    if os.environ.get("MOE_OPS_AUTOTUNE", "0") == "1":
        return True
    try:
        from torch._inductor import config as inductor_config
    except ImportError:  # pragma: no cover - Inductor ships with torch
        return False
    return bool(inductor_config.max_autotune)


def forward_candidates(default: KernelConfig, K: int, scale_k_unit: int, max_block_n: int = 256,
                       packed: bool = False) -> list:
    """Tile configs to time against ``default`` (first in the list) for a reduction of ``K``
    with scales constant over ``scale_k_unit`` columns; tiles at most ``max_block_n`` wide (the
    SwiGLU launch keeps two accumulators). The CUDA-core (gemv) tile is offered only where
    the static choice made it (weight-only, K-contiguous weights); the operand arrangement
    (``w_lhs``) and the SwiGLU loop structure (``one_loop``) are the static choice's, except
    that a packed-code (``packed``: int4/int2) gemv default is timed against its own K-split and
    prefetch variants and the tensor-core decode tiles with the weight as the register operand."""
    C = functools.partial(KernelConfig, w_lhs=default.w_lhs, one_loop=default.one_loop)
    if default.gemv and packed:
        out = [dataclasses.replace(default, num_warps=2 * ks, num_stages=st, k_split=ks)
               for ks in (1, 2) for st in (2, 3)]
        out += [KernelConfig(16, bn, _block_k(K, scale_k_unit, 128), 4, s, group_m=1, w_lhs=True,
                             one_loop=default.one_loop) for bn, s in ((32, 3), (64, 4))]
    elif default.decode:
        out = [C(16, bn, _block_k(K, scale_k_unit, bk), w, s, group_m=1)
               for bn in (32, 64, 128) for bk in (128, 256) for w, s in ((4, 3), (2, 4))]
    else:
        out = [C(bm, bn, _block_k(K, scale_k_unit, bk), w, s)
               for bm, bn, bk, w, s in ((128, 128, 64, 4, 4), (128, 128, 64, 8, 3), (128, 256, 64, 8, 3),
                                        (64, 128, 64, 4, 4), (128, 128, 128, 8, 3), (64, 256, 64, 4, 4))]
    seen, cands = set(), []
    for c in [default] + out:
        if c.block_n <= max_block_n and c not in seen:
            seen.add(c)
            cands.append(c)
    return cands
