"""The quantization formats' division ``v / s`` (float32, correctly rounded), for Triton kernels.

``tl.math.div_rn`` per element is the costliest part of a cast: ptxas expands it to a
reciprocal, two FMAs, and per element a range check, branch scaffolding and a call site for
its slow path (about half of the token-block cast's ~42 instructions per element on sm_90).
For values read from a 16-bit tensor, :func:`divide_by_scale` takes one correctly rounded
reciprocal ``y = 1 / s`` per scale and per element ``q = v * y`` and one FMA correction
``q + (v - q * s) * y`` (Markstein's theorem: with ``y`` correctly rounded, the corrected
quotient is the correctly rounded one unless the residual underflows). Scales below 2^-60 are
scaled up by 2^64 first, with ``v`` (exact: both stay far from overflow). Checked against
``div_rn`` over every bf16 and fp16 value and every scale that a 16-bit absmax gives
(``s = absmax / 448`` and ``absmax / 127``): the codes are equal everywhere; the float32
quotient differs only below 2^-53 (a subnormal ``v``: the residual underflows), where every code is zero. The check runs
exhaustively on the GPU (``tests/gpu/test_gpu_scale_division.py``) and on a subset in Triton's
interpreter (``tests/interpret``). Wider inputs (float32) keep ``div_rn``.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

SIXTEEN_BIT = (torch.bfloat16, torch.float16)  # input dtypes that take the RCP form


@triton.jit
def divide_by_scale(v, s, RCP: tl.constexpr):
    """``v / s`` (float32; ``s > 0``, broadcasting against ``v``). ``RCP``: the reciprocal and
    FMA form, for ``v`` converted from a 16-bit float (module docstring); else ``div_rn``."""
    if RCP:
        up = tl.where(s < 8.673617379884035e-19, 18446744073709551616.0, 1.0)  # 2^-60, 2^64
        s2 = s * up
        y = tl.math.div_rn(1.0, s2)
        v2 = v * up
        q = v2 * y
        return tl.math.fma(tl.math.fma(-q, s2, v2), y, q)
    else:
        return tl.math.div_rn(v, s)


@triton.jit
def absmax_scale(amax, QMAX: tl.constexpr, RCP: tl.constexpr):
    """A unit's scale ``amax / QMAX`` (float32, correctly rounded; ``amax >= 0``, inf or NaN).
    ``RCP`` (``amax`` of a 16-bit float unit): ``QMAX``'s reciprocal, a constant, and one FMA
    correction, as :func:`divide_by_scale` (``div_rn`` costs a range check and a slow-path
    branch, and a cast computes the scale of each column it holds in every thread that holds
    it); inf stays inf. Equal to the correctly rounded quotient for every non-negative 16-bit
    ``amax``, subnormal quotients included, for ``QMAX`` 448 and 127 (exhaustive check:
    ``tests/scale_division_check.py``, run by the interpreter and the GPU tests); other
    ``QMAX`` need the same check. Else ``div_rn``."""
    if RCP:
        y = 1.0 / QMAX  # float64, rounded to a float32 constant where it multiplies
        q = amax * y
        return tl.where(q == float("inf"), q, tl.math.fma(tl.math.fma(-q, QMAX, amax), y, q))
    else:
        return tl.math.div_rn(amax, QMAX)


@triton.jit
def _round_half_even(v):
    """``torch.round`` for |v| < 2^22: float32 addition rounds half to even."""
    return (v + 12582912.0) - 12582912.0


@triton.jit
def scaled_codes(v, safe, QMAX: tl.constexpr, TO_INT8: tl.constexpr, dtype: tl.constexpr, RCP: tl.constexpr):
    """The codes of ``v / safe`` (:func:`divide_by_scale`; ``safe > 0`` broadcast against ``v``):
    ``TO_INT8``, int8 ``clamp(round_half_even(q), -127, 127)``; else ``clamp(q, -QMAX, QMAX)``
    converted to the float8 ``dtype`` (round to nearest even). The casts' shared rule
    (:func:`moe_ops.formats.quantize`, :mod:`moe_ops.activations`).

    Precondition (every cast's): ``safe`` is the scale of a unit that holds ``v``, ``absmax /
    QMAX`` rounded, or 1 where the absmax is 0. Then ``|v / safe| <= QMAX (1 + 2^-24)``, whose
    float32 rounding is at most one ulp above QMAX and converts to QMAX (round to nearest; on
    sm_90 the conversion also saturates), so the float8 clamp is implied and not spent (two
    min/max an element); a NaN stays NaN, as in the reference, instead of clamping to QMAX."""
    v = divide_by_scale(v, safe, RCP)
    if TO_INT8:
        return tl.minimum(tl.maximum(_round_half_even(v), -127.0), 127.0).to(tl.int8)
    return v.to(dtype)


@triton.jit
def fp8_e4m3_codes(v, safe, RCP: tl.constexpr):
    """:func:`scaled_codes` for float8 e4m3 (``clamp(v / safe, -448, 448)``, its precondition)."""
    return scaled_codes(v, safe, 448.0, False, tl.float8e4nv, RCP)
