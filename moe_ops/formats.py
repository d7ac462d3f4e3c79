"""Weight formats: the written spec, and the one quantize / pack / dequantize routine.

Expert weights are logically ``[E, N, K]`` (out x in, as ``nn.Linear``). A format stores them
as ``data`` plus float32 ``scale`` (and a uint8 ``zero`` for asym formats).

Formats
-------
``bf16``, ``fp16``, ``fp32``
    Plain tensors, no scale. ``fp32`` is for the CPU path.
``int8_sym``
    int8 data ``[E, N, K]``, q = clamp(round(w / s), -127, 127), s = absmax / 127, w = q * s.
``int4_sym``, ``int2_sym``
    Unsigned codes u in [0, 2^b - 1] with the implicit zero point 2^(b-1):
    s = absmax / (2^(b-1) - 1), u = clamp(round(w / s), -(2^(b-1)-1), 2^(b-1)-1) + 2^(b-1),
    w = (u - 2^(b-1)) * s.
``int8_asym``, ``int4_asym``, ``int2_asym``
    Unsigned codes with a stored uint8 zero point. Over each scale unit, with
    lo = min(min(w), 0) and hi = max(max(w), 0) (the range always holds 0, so 0 is exact):
    s = (hi - lo) / (2^b - 1), z = clamp(round(-lo / s), 0, 2^b - 1),
    u = clamp(round(w / s) + z, 0, 2^b - 1), w = (u - z) * s. ``zero`` has ``scale``'s shape.
``fp8_e4m3``, ``fp8_e5m2``
    float8 data ``[E, N, K]`` (``float8_e4m3fn`` / ``float8_e5m2``), s = absmax / fp8_max,
    data = float8(clamp(w / s, -fp8_max, fp8_max)), w = float32(data) * s.

Packing: int8 codes are stored one per byte (``int8`` for sym, ``uint8`` for asym). int4 and
int2 codes are packed along K into uint8, value j of a byte in bits [j*b, (j+1)*b) (low bits
first), so data is ``[E, N, K*b/8]``; K must be a multiple of 8/b.

Granularity of the float32 scales (the "unit" each statistic is taken over):
``group``   ``[E, N, K/g]``, ``group_size`` g a positive divisor of K;
``channel`` ``[E, N, 1]``; ``tensor`` ``[E, 1, 1]`` (one per expert);
``block``   ``[E, ceil(N/128), ceil(K/128)]``, 128 x 128 tiles, fp8 formats only.

Rules shared by every format: arithmetic in float32; ``round`` is round-half-to-even
(``torch.round``); a unit whose scale is 0 (all zeros) stores codes for 0 and dequantizes to
exact zeros (division uses a safe denominator, so no NaN is ever produced).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

BLOCK = 128  # edge of a ``block`` granularity tile (and of the 1x128 activation blocks)


@dataclass(frozen=True)
class FormatSpec:
    """Static facts of one weight format."""

    name: str
    kind: str  # "float" | "int" | "fp8"
    bits: int
    symmetric: bool
    storage: torch.dtype

    @property
    def pack(self) -> int:
        """Codes per stored element along K (1 unless int4/int2)."""
        return 8 // self.bits if self.kind == "int" and self.bits < 8 else 1

    @property
    def has_zero(self) -> bool:
        return self.kind == "int" and not self.symmetric

    @property
    def implicit_zero(self) -> int:
        """The implicit zero point of packed sym codes (0 where codes are signed or absent)."""
        return (1 << (self.bits - 1)) if (self.kind == "int" and self.symmetric and self.bits < 8) else 0

    @property
    def qmax(self) -> int:
        """Largest |q| of sym formats; largest code of asym formats."""
        if self.symmetric:
            return (1 << (self.bits - 1)) - 1
        return (1 << self.bits) - 1

    @property
    def granularities(self) -> tuple:
        if self.kind == "float":
            return ("none",)
        if self.kind == "fp8":
            return ("group", "channel", "tensor", "block")
        return ("group", "channel", "tensor")


_FORMATS = {
    "bf16": FormatSpec("bf16", "float", 16, True, torch.bfloat16),
    "fp16": FormatSpec("fp16", "float", 16, True, torch.float16),
    "fp32": FormatSpec("fp32", "float", 32, True, torch.float32),
    "int8_sym": FormatSpec("int8_sym", "int", 8, True, torch.int8),
    "int8_asym": FormatSpec("int8_asym", "int", 8, False, torch.uint8),
    "int4_sym": FormatSpec("int4_sym", "int", 4, True, torch.uint8),
    "int4_asym": FormatSpec("int4_asym", "int", 4, False, torch.uint8),
    "int2_sym": FormatSpec("int2_sym", "int", 2, True, torch.uint8),
    "int2_asym": FormatSpec("int2_asym", "int", 2, False, torch.uint8),
    "fp8_e4m3": FormatSpec("fp8_e4m3", "fp8", 8, True, torch.float8_e4m3fn),
    "fp8_e5m2": FormatSpec("fp8_e5m2", "fp8", 8, True, torch.float8_e5m2),
}

WEIGHT_FORMATS = tuple(_FORMATS)
QUANTIZED_FORMATS = tuple(n for n, f in _FORMATS.items() if f.kind != "float")
GRANULARITIES = ("group", "channel", "tensor", "block")


def get_format(name: str, arg: str = "format") -> FormatSpec:
    """The spec of weight format ``name``; ``ValueError`` naming ``arg`` if unknown."""
    if not isinstance(name, str) or name not in _FORMATS:
        raise ValueError(f"{arg}: unknown weight format {name!r}; expected one of {WEIGHT_FORMATS}")
    return _FORMATS[name]


def fp8_max(dtype: torch.dtype) -> float:
    return float(torch.finfo(dtype).max)


def scale_shape(granularity: str, E: int, N: int, K: int, group_size: int) -> tuple:
    """Shape of the float32 scale tensor (and of ``zero``) for a granularity."""
    if granularity == "group":
        return (E, N, K // group_size)
    if granularity == "channel":
        return (E, N, 1)
    if granularity == "tensor":
        return (E, 1, 1)
    if granularity == "block":
        return (E, -(-N // BLOCK), -(-K // BLOCK))
    raise ValueError(f"granularity: unknown granularity {granularity!r}; expected one of {GRANULARITIES}")


def expand_scale(scale: torch.Tensor, granularity: str, N: int, K: int, group_size: int) -> torch.Tensor:
    """Broadcast a per-unit tensor (scale or zero, ``[E, *, *]``) to ``[E, N, K]``."""
    if granularity == "group":
        return scale.repeat_interleave(group_size, dim=-1)
    if granularity in ("channel", "tensor"):
        return scale.expand(scale.shape[0], N, K)
    if granularity == "block":
        full = scale.repeat_interleave(BLOCK, dim=1).repeat_interleave(BLOCK, dim=2)
        return full[:, :N, :K]
    raise ValueError(f"granularity: unknown granularity {granularity!r}")


def _unit_reduce(w: torch.Tensor, granularity: str, group_size: int, op: str) -> torch.Tensor:
    """amax / amin of float32 ``w`` ``[E, N, K]`` over each scale unit, in the scale's shape."""
    E, N, K = w.shape
    red = torch.amax if op == "max" else torch.amin
    if granularity == "group":
        return red(w.reshape(E, N, K // group_size, group_size), dim=-1)
    if granularity == "channel":
        return red(w, dim=-1, keepdim=True)
    if granularity == "tensor":
        return red(w.reshape(E, 1, N * K), dim=-1, keepdim=True)
    if granularity == "block":
        nb, kb = -(-N // BLOCK), -(-K // BLOCK)
        padded = torch.nn.functional.pad(w, (0, kb * BLOCK - K, 0, nb * BLOCK - N))  # zeros: absmax-neutral
        return red(red(padded.reshape(E, nb, BLOCK, kb, BLOCK), dim=4), dim=2)
    raise ValueError(f"granularity: unknown granularity {granularity!r}")


def _safe(s: torch.Tensor) -> torch.Tensor:
    return torch.where(s > 0, s, torch.ones_like(s))


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack uint8 codes ``[..., K]`` (each < 2^bits) along the last dim, low bits first."""
    per = 8 // bits
    if per == 1:
        return codes
    c = codes.reshape(*codes.shape[:-1], codes.shape[-1] // per, per).to(torch.int32)
    shifts = torch.arange(per, device=codes.device, dtype=torch.int32) * bits
    return (c << shifts).sum(dim=-1).to(torch.uint8)


def unpack_codes(packed: torch.Tensor, bits: int) -> torch.Tensor:
    """Inverse of :func:`pack_codes`: uint8 ``[..., K*bits/8]`` to uint8 codes ``[..., K]``."""
    per = 8 // bits
    if per == 1:
        return packed
    shifts = torch.arange(per, device=packed.device, dtype=torch.int32) * bits
    vals = (packed.to(torch.int32).unsqueeze(-1) >> shifts) & ((1 << bits) - 1)
    return vals.reshape(*packed.shape[:-1], packed.shape[-1] * per).to(torch.uint8)


def quantize(w: torch.Tensor, fmt: str, granularity: str, group_size: int):
    """Quantize ``w`` ``[E, N, K]`` to ``(data, scale, zero)`` per the spec above.

    Float formats return ``(w.to(storage), None, None)``. Checks are the caller's
    (:func:`moe_ops.checks.check_quantize_weight`).
    """
    spec = get_format(fmt)
    if spec.kind == "float":
        return w.to(spec.storage), None, None
    E, N, K = w.shape
    wf = w.float()
    if spec.kind == "fp8":
        fmax = fp8_max(spec.storage)
        scale = _unit_reduce(wf.abs(), granularity, group_size, "max") / fmax
        s_full = expand_scale(_safe(scale), granularity, N, K, group_size)
        data = (wf / s_full).clamp(-fmax, fmax).to(spec.storage)
        return data, scale, None
    if spec.symmetric:
        scale = _unit_reduce(wf.abs(), granularity, group_size, "max") / spec.qmax
        s_full = expand_scale(_safe(scale), granularity, N, K, group_size)
        q = torch.round(wf / s_full).clamp(-spec.qmax, spec.qmax)
        if spec.bits == 8:
            return q.to(torch.int8), scale, None
        codes = (q + spec.implicit_zero).to(torch.uint8)
        return pack_codes(codes, spec.bits), scale, None
    lo = _unit_reduce(wf, granularity, group_size, "min").clamp(max=0.0)
    hi = _unit_reduce(wf, granularity, group_size, "max").clamp(min=0.0)
    scale = (hi - lo) / spec.qmax
    zero = torch.round(-lo / _safe(scale)).clamp(0, spec.qmax)
    s_full = expand_scale(_safe(scale), granularity, N, K, group_size)
    z_full = expand_scale(zero, granularity, N, K, group_size)
    codes = (torch.round(wf / s_full) + z_full).clamp(0, spec.qmax).to(torch.uint8)
    return pack_codes(codes, spec.bits), scale, zero.to(torch.uint8)


def dequantize(data: torch.Tensor, scale: Optional[torch.Tensor], zero: Optional[torch.Tensor], fmt: str,
               granularity: str, group_size: int, dtype: torch.dtype) -> torch.Tensor:
    """``[E, N, K]`` weights in ``dtype``: float32 ``(q - z) * s`` rounded once to ``dtype``
    (computed in float64 when ``dtype`` is float64)."""
    spec = get_format(fmt)
    if spec.kind == "float":
        return data.to(dtype)
    work = torch.float64 if dtype == torch.float64 else torch.float32
    N = data.shape[1]
    K = data.shape[2] * spec.pack
    if spec.kind == "fp8" or (spec.symmetric and spec.bits == 8):
        q = data.to(work)
    else:
        q = unpack_codes(data, spec.bits).to(work)
        if spec.has_zero:
            q = q - expand_scale(zero.to(work), granularity, N, K, group_size)
        else:
            q = q - spec.implicit_zero
    return (q * expand_scale(scale.to(work), granularity, N, K, group_size)).to(dtype)
