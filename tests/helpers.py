"""Shared test helpers: ragged routing, float64 oracle, error bounds per format."""
from __future__ import annotations

import torch

import moe_ops
from moe_ops import formats

# relative Frobenius error bound of a call against the float64 oracle of the same spec (the
# oracle dequantizes the same stored weights; the call rounds the dequantized weights and the
# output to 16 bits once each, 2^-9 (bf16) / 2^-12 (fp16) relative, and sums in float32).
# Largest error measured on the CPU over every format, 5 seeds: bf16 2.8e-3, fp16 3.5e-4,
# fp32 1.6e-7.
BOUND = {torch.float64: 1e-12, torch.float32: 1e-6, torch.float16: 1e-3, torch.bfloat16: 6e-3}
# The GPU tests' bf16 bound is the one of the recorded H100 run (benchmarks/results/
# gpu_tests_h100.log), whose per-case errors were not printed: tighten it to BOUND after a
# GPU run that reports them.
GPU_BOUND_BF16 = 1.6e-2


def ragged_offs(M: int, E: int, gen: torch.Generator, empty=(), tail: int = 0) -> torch.Tensor:
    """Skewed random group sizes summing to M - tail, with the experts in ``empty`` given none."""
    w = torch.rand(E, generator=gen) ** 3 + 1e-3
    for e in empty:
        w[e] = 0
    sizes = torch.floor(w / w.sum() * (M - tail)).to(torch.int64)
    sizes[int(torch.argmax(w))] += (M - tail) - int(sizes.sum())
    return torch.cumsum(sizes, 0).to(torch.int32)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def oracle_grouped_mm(x, qw_args, offs, act_quant="none", recipe="none"):
    """The float64 oracle: the same operator's reference path on float64 x."""
    wd, ws, wz, fmt, gran, gs = qw_args
    if fmt == "none":
        wd = wd.double()
    return moe_ops.reference.grouped_mm(x.double(), wd, ws, wz, offs, fmt, gran, gs, act_quant, recipe)


def tma_capable() -> bool:
    """A CUDA device of capability 9.0 or later (TMA descriptors)."""
    return torch.cuda.is_available() and torch.cuda.get_device_capability()[0] >= 9


def _spy_tma_operands_calls(monkeypatch, record) -> list:
    """Wrap ``dispatch._tma_operands`` (called once per one-config grouped-GEMM launch, with
    ``(xq, w, w_strides, config, meta, consts)``); append ``record(args, result)`` per call."""
    from moe_ops.kernels import dispatch
    seen, orig = [], dispatch._tma_operands

    def spy(*a):
        r = orig(*a)
        seen.append(record(a, r))
        return r
    monkeypatch.setattr(dispatch, "_tma_operands", spy)
    return seen


def spy_tma_operands(monkeypatch) -> list:
    """Record the ``(TMA_X, TMA_W)`` each grouped-GEMM launch takes (``dispatch._tma_operands``),
    in launch order."""
    return _spy_tma_operands_calls(monkeypatch, lambda a, r: r[1:])


def spy_tile_meta(monkeypatch) -> list:
    """Record the tile constexprs (``BLOCK_M``, ``W_LHS``, ...: ``dispatch._tile_meta``) of each
    one-config grouped-GEMM launch, in launch order."""
    return _spy_tma_operands_calls(monkeypatch, lambda a, r: dict(a[4]))


def spy_persistent_launches(monkeypatch) -> list:
    """Record the ``dgrad`` flag of each launch of the persistent kernel
    (``persistent_gemm.launch_persistent``, as the dispatcher calls it), in launch order."""
    from moe_ops.kernels import persistent_gemm
    seen, orig = [], persistent_gemm.launch_persistent

    def spy(*a, **kw):
        seen.append(a[5])  # (x, w, y, offs, config, dgrad)
        return orig(*a, **kw)
    monkeypatch.setattr(persistent_gemm, "launch_persistent", spy)
    return seen


def weight_cases(fmts=None):
    """(format, granularity, group_size) for every quantized format and granularity."""
    out = []
    for f in fmts or formats.QUANTIZED_FORMATS:
        for g in formats.get_format(f).granularities:
            out.append((f, g, 32 if g == "group" else 0))
    return out


def replays_without_sync(step, eager, inputs, bound: float, warmup: int = 3) -> None:
    """Run compiled ``step`` on ``inputs[:warmup]`` (warm-up, CUDA-graph recording), then on the
    rest with ``torch.cuda.set_sync_debug_mode("error")``; each of those outputs within
    ``bound`` (relative) of ``eager``'s."""
    with torch.no_grad():
        for x in inputs[:warmup]:
            step(x)
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            outs = [step(x).clone() for x in inputs[warmup:]]
        finally:
            torch.cuda.set_sync_debug_mode(0)
        for x, y in zip(inputs[warmup:], outs):
            assert rel_err(y, eager(x)) < bound
