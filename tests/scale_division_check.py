"""Checks :func:`moe_ops.kernels.scale_division.divide_by_scale` against ``div_rn`` on the
device at hand (Triton's interpreter: numpy's correctly rounded division and a true FMA).

Domain: every finite 16-bit value ``v`` (bf16 or fp16) against every scale a 16-bit absmax
``a >= |v|`` gives, ``s = div_rn(a, qmax)`` (or a subset of the absmaxes). And
:func:`~moe_ops.kernels.scale_division.absmax_scale` against the CPU's float32 division (IEEE,
subnormals kept) for every non-negative 16-bit value, inf and NaN."""
import torch
import triton
import triton.language as tl

from moe_ops.kernels.scale_division import absmax_scale, divide_by_scale


@triton.jit
def _mismatch_kernel(v_ptr, a_ptr, out_ptr, NV, QMAX: tl.constexpr, BLOCK: tl.constexpr):
    a = tl.load(a_ptr + tl.program_id(0))
    s = tl.math.div_rn(a, QMAX)
    for v0 in range(0, NV, BLOCK):
        i = v0 + tl.arange(0, BLOCK)
        v = tl.load(v_ptr + i, mask=i < NV, other=0.0)
        q = divide_by_scale(v, s, True)
        ref = tl.math.div_rn(v, s)
        differ = (q != ref) & (tl.abs(v) <= a) & (i < NV)
        big = differ & (tl.abs(ref) >= 1.1102230246251565e-16)  # 2^-53
        tl.atomic_add(out_ptr, tl.sum(big.to(tl.int32), 0))
        tl.atomic_add(out_ptr + 1, tl.sum(differ.to(tl.int32), 0))
        far = differ & ((tl.abs(q) >= 1.1102230246251565e-16) | (tl.abs(ref) >= 1.1102230246251565e-16))
        tl.atomic_add(out_ptr + 2, tl.sum(far.to(tl.int32), 0))


def finite_values(dtype: torch.dtype) -> torch.Tensor:
    """Every finite value of the 16-bit float ``dtype``, as float32."""
    bits = torch.arange(-(1 << 15), 1 << 15, dtype=torch.int32).to(torch.int16)
    v = bits.view(dtype).float()
    return v[torch.isfinite(v)]


def count_mismatches(dtype: torch.dtype, qmax: float, device, every: int = 1):
    """``(quotients differing with |v / s| >= 2^-53, all differing, differing where either is >= 2^-53)``
    over all values of ``dtype`` and every ``every``-th positive absmax."""
    v = finite_values(dtype)
    a = torch.unique(v.abs())
    a = a[a > 0][::every].contiguous()
    out = torch.zeros(3, dtype=torch.int32, device=device)
    _mismatch_kernel[(a.numel(),)](v.to(device), a.to(device), out, v.numel(), QMAX=qmax,
                                   BLOCK=65536 if device == "cpu" else 1024)
    return tuple(int(c) for c in out.cpu())


@triton.jit
def _scale_kernel(a_ptr, out_ptr, N, QMAX: tl.constexpr, BLOCK: tl.constexpr):
    i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    a = tl.load(a_ptr + i, mask=i < N, other=0.0)
    tl.store(out_ptr + i, absmax_scale(a, QMAX, True), mask=i < N)


def count_scale_mismatches(dtype: torch.dtype, qmax: float, device) -> int:
    """Scales ``absmax_scale(a, qmax)`` computed on ``device`` whose bits differ from the CPU's
    ``a / qmax`` in float32, over every non-negative value ``a`` of ``dtype`` (subnormals
    included), inf and NaN (NaN: any NaN)."""
    bits = torch.arange(0, 1 << 15, dtype=torch.int32).to(torch.int16)  # sign bit clear: +0 .. +inf, NaNs
    a = bits.view(dtype).float()
    out = torch.full_like(a, -1.0, device=device)  # poisoned: a negative scale is never right
    block = 1024
    _scale_kernel[(triton.cdiv(a.numel(), block),)](a.to(device), out, a.numel(), QMAX=qmax, BLOCK=block)
    got, want = out.cpu(), a / qmax
    same = (got.view(torch.int32) == want.view(torch.int32)) | (torch.isnan(got) & torch.isnan(want))
    return int((~same).sum())
