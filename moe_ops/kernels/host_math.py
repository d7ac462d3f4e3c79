"""Integer helpers for launch grids and constexprs, computed on the host.

Same arithmetic as ``triton.cdiv`` / ``triton.next_power_of_2``, as plain functions:
Triton's are constexpr-function objects whose host-side call costs microseconds each (about
4 us on the CPU here, several per launch), which an eager operator call pays every time.
Work on Python ints and on SymInts (the operators' bodies are traced under torch.compile).
"""
from __future__ import annotations


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
