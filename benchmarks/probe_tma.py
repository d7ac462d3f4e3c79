"""Does a launch with a host-side TMA descriptor keep its tensor alive? (Triton as installed.)

Usage (GPU): ``python benchmarks/probe_tma.py``. Launches a copy kernel that reads x through a
``TensorDescriptor`` with a fresh x per launch, and prints x's reference count before and after
one launch and the CUDA memory still allocated after 200 launches (with and without
``gc.collect()``), against the same kernel reading x through a pointer; then the same for ``grouped_mm`` launches
(fp8 weights, fresh x), and the host time of a ``grouped_mm_dgrad`` call with and without TMA.
"""
from __future__ import annotations

import gc
import sys

import torch
import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor


@triton.jit
def _copy_desc(x_desc, y_ptr, BM: tl.constexpr, BK: tl.constexpr):
    r = tl.program_id(0) * BM + tl.arange(0, BM)
    tl.store(y_ptr + r[:, None] * BK + tl.arange(0, BK)[None, :], x_desc.load([tl.program_id(0) * BM, 0]))


@triton.jit
def _copy_ptr(x_ptr, y_ptr, BM: tl.constexpr, BK: tl.constexpr):
    r = tl.program_id(0) * BM + tl.arange(0, BM)
    off = r[:, None] * BK + tl.arange(0, BK)[None, :]
    tl.store(y_ptr + off, tl.load(x_ptr + off))


def launch(x, y, desc: bool):
    if desc:
        _copy_desc[(x.shape[0] // 128,)](TensorDescriptor.from_tensor(x, [128, 64]), y, BM=128, BK=64)
    else:
        _copy_ptr[(x.shape[0] // 128,)](x, y, BM=128, BK=64)


def leaked_bytes(desc: bool, collect: bool, n: int = 200) -> int:
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    for _ in range(n):
        x = torch.randn(4096, 64, device="cuda")
        launch(x, torch.empty_like(x), desc)
        del x
    if collect:
        gc.collect()
    torch.cuda.synchronize()
    return torch.cuda.memory_allocated() - base


def grouped_mm_leaked_bytes(tma: bool, act: str, n: int = 50) -> int:
    """CUDA memory still allocated after ``n`` ``grouped_mm`` calls (fp8 weights, fresh x
    each call) with the table's prefill tile, TMA on or off."""
    import moe_ops
    from moe_ops.kernels import dispatch
    from moe_ops.lowering.kernel_choice import KernelConfig
    E, N, K, M = 8, 1024, 2048, 8192
    qw = moe_ops.quantize_weight(torch.randn(E, N, K, device="cuda").bfloat16(), "fp8_e4m3", "channel", 0)
    wd, ws, wz, fmt, gran, gs = qw.op_args()
    offs = torch.arange(1, E + 1, device="cuda", dtype=torch.int32) * (M // E)
    cfg = KernelConfig(128, 128, 128, 8, 4, tma=tma)
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    for _ in range(n):
        x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
        dispatch.grouped_mm(x, wd, ws, wz, offs, fmt, gran, gs, act, "none", config=cfg)
        del x
    gc.collect()
    torch.cuda.synchronize()
    return torch.cuda.memory_allocated() - base


def host_us_per_call(tma: bool, n: int = 300) -> float:
    """Host time of one ``grouped_mm_dgrad`` op call (bf16, a small shape, so the host bounds
    the loop), TMA descriptors on or off."""
    import time
    from moe_ops.kernels import dispatch
    from moe_ops.lowering.kernel_choice import KernelConfig
    E, N, K, M = 8, 256, 256, 512
    w = torch.randn(E, N, K, device="cuda").bfloat16()
    dy = torch.randn(M, N, device="cuda").bfloat16()
    offs = torch.arange(1, E + 1, device="cuda", dtype=torch.int32) * (M // E)
    cfg = KernelConfig(128, 256, 64, 8, 4, tma=tma)
    dispatch.grouped_mm_dgrad(dy, w, None, None, offs, "none", "none", 0, "none", config=cfg)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(n):
        dispatch.grouped_mm_dgrad(dy, w, None, None, offs, "none", "none", 0, "none", config=cfg)
    t1 = time.perf_counter()
    torch.cuda.synchronize()
    return (t1 - t0) / n * 1e6


if __name__ == "__main__":
    print("torch", torch.__version__, "triton", triton.__version__)
    for desc in (False, True):
        x = torch.randn(4096, 64, device="cuda")
        y = torch.empty_like(x)
        launch(x, y, desc)
        before = sys.getrefcount(x)
        launch(x, y, desc)
        after = sys.getrefcount(x)
        assert torch.equal(x, y)
        print(f"{'descriptor' if desc else 'pointer':10s} refcount of x across one launch: {before} -> {after}; "
              f"bytes still allocated after 200 launches: {leaked_bytes(desc, False)} "
              f"(after gc.collect(): {leaked_bytes(desc, True)})", flush=True)
    for act in ("none", "fp8_token"):
        for tma in (False, True):
            print(f"grouped_mm fp8 weights act={act} tma={tma}: bytes still allocated after 50 calls: "
                  f"{grouped_mm_leaked_bytes(tma, act)}", flush=True)
    for tma in (False, True):
        print(f"grouped_mm_dgrad host time a call, tma={tma}: {host_us_per_call(tma):.1f} us", flush=True)
