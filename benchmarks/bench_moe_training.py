"""A training step (forward + backward) of the MoE layer: ours against the layer as model code
writes it, in one run.

Layers as :mod:`bench_moe_layer` (Qwen3-30B-A3B, DeepSeek-V3 with 32 local experts), T=4096
tokens. One step is ``layer(x).backward(dout)`` with gradients for the router, both expert
weights and x. Variants per layer:

* ``grouped_mm_compiled``: :class:`plain_moe.PlainMoEBlock` (``torch._grouped_mm``, bf16),
  ``torch.compile``\\ d: the peer.
* ``ours_bf16`` / ``ours_<recipe>``: ``moe_ops.MoE`` with the fused ``expert_mlp`` in bf16 and
  with the FP8 training recipes; ``_unfused``: the same module with ``fused=False``.
* ``ours_<recipe>_cast_per_gemm``: the fused layer with the expert MLP's backward as it was
  before session 16: each of its four weight GEMMs ran ``grouped_mm`` / ``grouped_mm_dgrad``
  with the recipe, so each cast the weight itself (an A/B of ``expert_mlp._weight_gemms``,
  patched for this variant only).

Timed as CUDA-graph replays of the whole step where it captures (``timing`` = ``graph``),
else with device events around eager calls (``eager``; host time included).

Usage (GPU): ``python benchmarks/bench_moe_training.py [--out DIR] [--layers qwen3,dsv3]``.
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))
import harness  # noqa: E402
from bench_moe_layer import LAYERS  # noqa: E402
from plain_moe import PlainMoEBlock  # noqa: E402

import moe_ops  # noqa: E402
from moe_ops import expert_mlp as em  # noqa: E402

T = 4096
RECIPES = ("fp8_blockwise", "fp8_rowwise")


def _cast_per_gemm(w, w_scale, w_zero, offs, w_format, gran, group_size, act_quant, recipe):
    """The expert MLP backward's weight GEMMs before session 16: the recipe passed to every GEMM."""
    ops = torch.ops.moe_ops
    return (lambda a: ops.grouped_mm(a, w, w_scale, w_zero, offs, w_format, gran, group_size, act_quant, recipe),
            lambda a: ops.grouped_mm_dgrad(a, w, w_scale, w_zero, offs, w_format, gran, group_size, recipe))


def _time_step(layer, x, dout):
    def step():
        layer(x).backward(dout)
    step()
    torch.cuda.synchronize()
    try:
        return harness.bench_graph_ms(step, reps=5), "graph"
    except Exception as e:  # noqa: BLE001 - report and fall back to eager timing
        print(f"graph capture failed ({type(e).__name__}: {e}); timing eagerly", flush=True)
        torch.cuda.synchronize()
        return harness.bench_ms(step), "eager"


def run(args):
    dev = torch.device(getattr(args, "device", "cuda"))
    env = harness.environment(dev)
    ceil = harness.ceilings(dev)
    rows = []
    for lname in args.layers.split(","):
        H, I, E, k = LAYERS[lname]
        m = moe_ops.MoE.from_style("qwen3", H, I, E, k, dtype=torch.bfloat16, seed=0).to(dev)
        with torch.no_grad():  # skewed routing, as a trained router gives
            m.router.weight.add_(torch.randn(E, 1, device=dev, dtype=torch.bfloat16) * 0.02)
        peer = torch.compile(PlainMoEBlock.from_moe(m), dynamic=False)
        x = torch.randn(T, H, device=dev, dtype=torch.bfloat16, requires_grad=True)
        dout = torch.randn(T, H, device=dev, dtype=torch.bfloat16)
        res = {"grouped_mm_compiled": _time_step(peer, x, dout)}
        for recipe in (None,) + RECIPES:
            m.recipe = recipe
            name = "ours_" + (recipe or "bf16")
            for fused in (True, False):
                m.fused = fused
                res[name + ("" if fused else "_unfused")] = _time_step(m, x, dout)
            m.fused = True
            if recipe is not None:
                saved, em._weight_gemms = em._weight_gemms, _cast_per_gemm
                try:
                    res[name + "_cast_per_gemm"] = _time_step(m, x, dout)
                finally:
                    em._weight_gemms = saved
        m.recipe = None
        peer_ms = res["grouped_mm_compiled"][0]
        for name, (ms, timing) in res.items():
            row = {"layer": lname, "T": T, "variant": name, "ms": ms, "timing": timing,
                   "x_vs_grouped_mm_compiled": peer_ms / ms}
            for suffix in ("_unfused", "_cast_per_gemm"):
                other = res.get(name + suffix)
                row["x_vs" + suffix] = other[0] / ms if other else None
            rows.append(row)
            print(row, flush=True)
        m = peer = x = None
        torch.cuda.empty_cache()
    cols = ["layer", "T", "variant", "ms", "timing", "x_vs_grouped_mm_compiled", "x_vs_unfused", "x_vs_cast_per_gemm"]
    name = "moe_training_" + env.get("device", "gpu").replace(" ", "_")
    print(harness.write_results(name, env, ceil, rows, cols, args.out))


if __name__ == "__main__":
    p = argparse.ArgumentParser()
    p.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"))
    p.add_argument("--layers", default="qwen3,dsv3")
    run(p.parse_args())
