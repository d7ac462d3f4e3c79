"""Integer helpers for launch grids and constexprs, computed on the host.

Same arithmetic as ``triton.cdiv`` / ``triton.next_power_of_2``, as plain functions:
Triton's are constexpr-function objects whose host-side call costs microseconds each (about
4 us on the CPU here, several per launch), which an eager operator call pays every time.
Work on Python ints and on SymInts (the operators' bodies are traced under torch.compile).
"""
from __future__ import annotations

import torch


def cdiv(x, y):
    """``ceil(x / y)`` for positive ``y``."""
    return (x + (y - 1)) // y


def next_power_of_2(n):
    """The smallest power of two >= ``n`` (``n`` >= 1, below 2^64)."""
    n -= 1
    n |= n >> 1
    n |= n >> 2
    n |= n >> 4
    n |= n >> 8
    n |= n >> 16
    n |= n >> 32
    return n + 1


def row_tile_bound(M, block_m: int, E: int):
    """Static bound on the row tiles of a grouped launch over ``M`` rows in ``block_m``-row tiles
    and ``E`` experts: the tiles of the experts with rows (numbered expert by expert,
    ``grouped_gemm._expert_of_tile``) plus those of the zero rows past ``offs[-1]``. With ``n <=
    min(M, E)`` experts holding ``M' <= M`` rows, ``sum_e cdiv(r_e, B) + cdiv(M - M', B) <= (M +
    (n + 1) (B - 1)) / B``: each part-filled tile (at most one an expert, one for the zero rows)
    leaves at most ``B - 1`` rows empty. One row a tile gives exactly ``M``.
    ``grouped_gemm.swizzled_tile`` computes the same number on the device (its grouped order
    maps the grid's programs onto these row tiles): the two must agree."""
    return (M + (torch.sym_min(M, E) + 1) * (block_m - 1)) // block_m
