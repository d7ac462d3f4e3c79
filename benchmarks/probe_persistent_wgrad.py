"""Probe: persistent forms of the bf16 grouped wgrad ``dW[e] = dy[g]^T @ x[g]`` against
``launch_wgrad`` (one program an output tile) and ``torch._grouped_mm``'s wgrad, at the training
shapes, T=4096, skewed routing. A wgrad unit (expert, output tile) reduces over the expert's row
chunks, whose count varies by expert, so Triton's ``flatten`` (which needs the inner trip count
fixed outside the outer loop) does not apply. Two persistent forms:

* ``nested``: programs loop over the units (``tl.range``), each unit's chunks as in
  ``grouped_wgrad_kernel`` (whole chunks by TMA, the part-filled last one by masked loads);
* ``flat``: one loop over the program's (unit, chunk) steps, written out: every chunk by TMA,
  the rows past the expert's end zeroed in the dy tile, the accumulator reset at a unit's first
  chunk and stored at its last, so the loads of the next unit's chunks are in flight while a
  unit's epilogue runs (an empty expert's units take one all-masked step: exact zeros).

``nested`` also with the dW tile stored by a 3-D TMA descriptor over ``dW [E, N, K]`` (block
``[1, BLOCK_N, BLOCK_K]``: a tile never crosses an expert, so no mask is needed): Triton's
pipeliner then waits for a store only before reusing its shared-memory buffer at the next
unit's epilogue, so the store drains while the next unit's chunks load and multiply. With as
many programs as units, the same kernel is one program a tile (``launch_wgrad``'s grid and
order).

Usage (GPU): ``python benchmarks/probe_persistent_wgrad.py [--store] [--out DIR]``
"""
from __future__ import annotations

import argparse
import os
import sys

import torch
import triton
import triton.language as tl

sys.path.insert(0, os.path.dirname(__file__))
import harness  # noqa: E402

from moe_ops.kernels import launch  # noqa: E402
from moe_ops.kernels.grouped_wgrad import launch_wgrad  # noqa: E402


@triton.jit
def _unit(u, prev, ends, idx, TILES_E: tl.constexpr, NUM_K: tl.constexpr, BLOCK_M: tl.constexpr):
    """(expert, column tile along N, along K, first row, end row, chunks >= 1) of unit ``u``."""
    e = u // TILES_E
    t = u % TILES_E
    sel = idx == e
    start = tl.sum(tl.where(sel, prev, 0), 0)
    end = tl.sum(tl.where(sel, ends, 0), 0)
    return e, t // NUM_K, t % NUM_K, start, end, tl.maximum(tl.cdiv(end - start, BLOCK_M), 1)


@triton.jit
def persistent_wgrad_kernel(dw_ptr, offs_ptr, dy_ptr, x_ptr, dy_desc, x_desc, dw_desc, N, K, stride_dym, stride_xm,
                            stride_we, stride_wn, E: tl.constexpr, E_POW2: tl.constexpr, BLOCK_M: tl.constexpr,
                            BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, NUM_N: tl.constexpr,
                            NUM_K: tl.constexpr, FLAT: tl.constexpr, STAGES: tl.constexpr,
                            STORE_TMA: tl.constexpr):
    """``dw [E, N, K]`` (contiguous along K) from dy ``[M, N]`` and x ``[M, K]``."""
    pid = tl.program_id(0)
    programs = tl.num_programs(0)
    idx = tl.arange(0, E_POW2)
    ends = tl.load(offs_ptr + idx, mask=idx < E, other=0)
    prev = tl.load(offs_ptr + idx - 1, mask=(idx < E) & (idx > 0), other=0)
    TILES_E: tl.constexpr = NUM_N * NUM_K
    ri = tl.arange(0, BLOCK_M)
    if FLAT:
        # the program's steps: sum over experts of (its units there) * (the expert's chunks)
        nch = tl.maximum(tl.cdiv(ends - prev, BLOCK_M), 1)
        lo = idx * TILES_E
        before_lo = tl.where(lo > pid, (lo - pid + programs - 1) // programs, 0)
        before_hi = tl.where(lo + TILES_E > pid, (lo + TILES_E - pid + programs - 1) // programs, 0)
        steps = tl.sum(tl.where(idx < E, (before_hi - before_lo) * nch, 0), 0)
        u = pid
        c = 0
        acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
        for _ in tl.range(0, steps, num_stages=STAGES):
            e, pn, pk, start, end, n_chunks = _unit(u, prev, ends, idx, TILES_E, NUM_K, BLOCK_M)
            m0 = start + c * BLOCK_M
            a = dy_desc.load([m0, pn * BLOCK_N])
            b = x_desc.load([m0, pk * BLOCK_K])
            a = tl.where((m0 + ri < end)[:, None], a, 0.0)
            acc = tl.dot(tl.trans(a), b, tl.where(c == 0, 0.0, acc))
            if c == n_chunks - 1:
                rn = pn * BLOCK_N + tl.arange(0, BLOCK_N)
                rk = pk * BLOCK_K + tl.arange(0, BLOCK_K)
                out = dw_ptr + e.to(tl.int64) * stride_we + rn.to(tl.int64)[:, None] * stride_wn + rk[None, :]
                tl.store(out, acc.to(dw_ptr.dtype.element_ty), mask=(rn < N)[:, None] & (rk < K)[None, :])
            last = c == n_chunks - 1
            u = tl.where(last, u + programs, u)
            c = tl.where(last, 0, c + 1)
    else:
        for u in tl.range(pid, E * TILES_E, programs):
            e, pn, pk, start, end, _n = _unit(u, prev, ends, idx, TILES_E, NUM_K, BLOCK_M)
            rn = pn * BLOCK_N + tl.arange(0, BLOCK_N)
            rk = pk * BLOCK_K + tl.arange(0, BLOCK_K)
            acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
            tail = end - (end - start) % BLOCK_M
            for m0 in tl.range(start, tail, BLOCK_M, num_stages=STAGES):
                acc = tl.dot(tl.trans(dy_desc.load([m0, pn * BLOCK_N])), x_desc.load([m0, pk * BLOCK_K]), acc)
            for m0 in range(tail, end, BLOCK_M):
                rm = m0 + ri
                a = tl.load(dy_ptr + rm.to(tl.int64)[:, None] * stride_dym + rn[None, :],
                            mask=(rm < end)[:, None] & (rn < N)[None, :], other=0.0)
                b = tl.load(x_ptr + rm.to(tl.int64)[:, None] * stride_xm + rk[None, :],
                            mask=(rm < end)[:, None] & (rk < K)[None, :], other=0.0)
                acc = tl.dot(tl.trans(a), b, acc)
            if STORE_TMA:
                dw_desc.store([e, pn * BLOCK_N, pk * BLOCK_K],
                              acc.to(dw_ptr.dtype.element_ty).reshape(1, BLOCK_N, BLOCK_K))
            else:
                out = dw_ptr + e.to(tl.int64) * stride_we + rn.to(tl.int64)[:, None] * stride_wn + rk[None, :]
                tl.store(out, acc.to(dw_ptr.dtype.element_ty), mask=(rn < N)[:, None] & (rk < K)[None, :])


def persistent_wgrad(dy, x, offs, tile, programs, store_tma=False):
    """``dW [E, N, K]`` in dy's dtype; ``tile``: ``(BLOCK_M, BLOCK_N, BLOCK_K, warps, stages, flat)``;
    ``programs`` None: one program a unit."""
    bm, bn, bk, warps, stages, flat = tile
    M, N = dy.shape
    K = x.shape[1]
    E = offs.shape[0]
    dw = torch.empty(E, N, K, dtype=dy.dtype, device=dy.device)
    kwargs = dict(dw_ptr=dw, offs_ptr=offs, dy_ptr=dy, x_ptr=x, N=N, K=K, stride_dym=dy.stride(0),
                  stride_xm=x.stride(0), stride_we=dw.stride(0), stride_wn=dw.stride(1), E=E,
                  E_POW2=triton.next_power_of_2(E), BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, NUM_N=triton.cdiv(N, bn),
                  NUM_K=triton.cdiv(K, bk), FLAT=flat, STAGES=stages, STORE_TMA=store_tma)
    if programs is None:
        programs = E * triton.cdiv(N, bn) * triton.cdiv(K, bk)
    descs = {"dy_desc": (dy, (bm, bn)), "x_desc": (x, (bm, bk))}
    if store_tma:
        descs["dw_desc"] = (dw, (1, bn, bk))
    else:
        kwargs["dw_desc"] = dw  # a plain pointer in the descriptor's place
    launch.launch(persistent_wgrad_kernel, (programs,), kwargs, descs, num_warps=warps, num_stages=stages)
    return dw


SHAPES = {"qwen3_gate_up": (128, 8, 2048, 1536), "qwen3_down": (128, 8, 768, 2048),
          "dsv3_gate_up_e32": (32, 8, 7168, 4096)}
# (tile, programs per SM (None: one a unit), dW by TMA store)
TILES_S19 = [((64, 128, 128, 8, 3, True), 1, False), ((64, 128, 128, 8, 3, True), 2, False),
             ((64, 128, 128, 8, 4, True), 1, False), ((64, 256, 128, 8, 3, True), 1, False),
             ((64, 128, 128, 8, 3, False), 2, False), ((64, 128, 128, 8, 3, False), 1, False),
             ((64, 256, 128, 8, 3, False), 1, False)]
TILES_STORE = [((64, 128, 128, 8, 3, False), None, False), ((64, 128, 128, 8, 3, False), None, True),
               ((64, 256, 128, 8, 3, False), None, True), ((64, 128, 128, 8, 2, False), None, True),
               ((64, 128, 128, 8, 3, False), 1, True), ((64, 128, 128, 8, 4, False), 1, True),
               ((64, 128, 128, 8, 2, False), 2, True), ((64, 256, 128, 8, 3, False), 1, True),
               ((64, 256, 128, 8, 2, False), 1, True), ((128, 256, 128, 8, 2, False), 1, True),
               ((64, 128, 256, 8, 3, False), 1, True), ((32, 256, 128, 8, 4, False), 1, True)]


def main(args):
    dev = torch.device("cuda")
    env = harness.environment(dev)
    ceil = harness.ceilings(dev)
    sms = torch.cuda.get_device_properties(dev).multi_processor_count
    print(env, ceil, flush=True)
    rows = []
    for name, (E, k, K, N) in SHAPES.items():
        offs, x, w, dy = harness.training_operands(E, k, K, N, 4096, dev)
        used = int(offs[-1])
        flops = 2 * used * N * K
        ref = torch._grouped_mm(dy.t(), x, offs=offs)  # aten's wgrad: [E, N, K]
        cands = {"torch._grouped_mm": lambda: torch._grouped_mm(dy.t(), x, offs=offs),
                 "launch_wgrad default": lambda: launch_wgrad(dy, x, offs, dy.dtype)}
        for tile, per_sm, store in (TILES_STORE if args.store else TILES_S19):
            where = "one a unit" if per_sm is None else f"x{per_sm}"
            cands[f"persistent {tile} {where}{' tma-store' if store else ''}"] = (
                lambda t=tile, p=per_sm, st=store: persistent_wgrad(dy, x, offs, t, p and p * sms, st))
        for label, fn in cands.items():
            timed = harness.time_variant(f"{name} wgrad {label}", fn, ref)
            if timed is None:
                continue
            _, ms, err = timed
            tf = flops / ms / 1e9
            rows.append({"shape": name, "variant": label, "ms": ms, "TFLOPs": tf,
                         "mm_share": tf / ceil["bf16_TFLOPs"], "rel_err_vs_aten": err})
            print(f"{name} wgrad {label}: {ms * 1e3:.1f} us {tf:.0f} TFLOP/s ({tf / ceil['bf16_TFLOPs']:.2f} of the "
                  f"bf16 ceiling) err {err:.2e}", flush=True)
    harness.write_json(os.path.join(args.out, f"probe_persistent_wgrad{'_store' if args.store else ''}.json"), {"env": env, "ceilings": ceil,
                                                                              "rows": rows})


if __name__ == "__main__":
    p = argparse.ArgumentParser()
    p.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"))
    p.add_argument("--store", action="store_true", help="the TMA-store epilogue variants (session 20) "
                   "instead of session 19's persistent forms")
    main(p.parse_args())
