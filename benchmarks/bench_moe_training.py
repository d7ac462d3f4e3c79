"""A compiled training step (forward + backward) of the MoE layer: ours against the layer as
model code writes it, in one run.

Layers as :mod:`bench_moe_layer` (Qwen3-30B-A3B, DeepSeek-V3 with 32 local experts), T=4096
tokens. One step is ``torch.autograd.grad(layer(x), [x, *parameters], dout)``: gradients for
x, the router and both expert weights, returned rather than accumulated into ``.grad``. Every
variant is ``torch.compile(layer, fullgraph=True, dynamic=False)`` (Dynamo reset between
variants; Inductor's FX graph cache and AOTAutograd's cache off, which would otherwise hand the
patched variant below the backward compiled for another). Variants per layer:

* ``grouped_mm_compiled``: :class:`plain_moe.PlainMoEBlock` (``torch._grouped_mm``, bf16): the
  peer.
* ``ours_bf16`` / ``ours_<recipe>``: ``moe_ops.MoE`` with the fused ``expert_mlp`` in bf16 and
  with the FP8 training recipes; ``_unfused``: the same module with ``fused=False``.
* ``ours_<recipe>_cast_per_gemm``: the fused layer with the expert MLP's backward as it was
  before session 16: each of its four weight GEMMs ran ``grouped_mm`` / ``grouped_mm_dgrad``
  with the recipe, so each cast the weight itself (an A/B of ``expert_mlp._weight_gemms``,
  patched while this variant is traced).
* ``--eager`` adds ``_eager`` rows: the same modules uncompiled.

Timed as CUDA-graph replays of the whole step where it captures (``timing`` = ``graph``),
else with device events around the calls (``eager``; host time included).

``--profile VARIANT[,...]`` prints the kernels of one step of those variants by CUDA time instead
(torch.profiler), for each layer.

Usage (GPU): ``python benchmarks/bench_moe_training.py [--out DIR] [--layers qwen3,dsv3]
[--recipes fp8_blockwise,fp8_rowwise] [--eager] [--profile ours_bf16]``.
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))
import harness  # noqa: E402
from bench_moe_layer import LAYERS, skewed_layer  # noqa: E402
from plain_moe import PlainMoEBlock  # noqa: E402

from moe_ops import expert_mlp as em  # noqa: E402

T = 4096
RECIPES = ("fp8_blockwise", "fp8_rowwise")


def _cast_per_gemm(w, w_scale, w_zero, offs, w_format, gran, group_size, act_quant, recipe):
    """The expert MLP backward's weight GEMMs before session 16: the recipe passed to every GEMM."""
    ops = torch.ops.moe_ops
    return (lambda a: ops.grouped_mm(a, w, w_scale, w_zero, offs, w_format, gran, group_size, act_quant, recipe),
            lambda a: ops.grouped_mm_dgrad(a, w, w_scale, w_zero, offs, w_format, gran, group_size, recipe))


def _time_step(layer, x, dout):
    inputs = [x] + [p for p in layer.parameters() if p.requires_grad]

    def step():  # gradients returned, not accumulated into .grad (no read-modify-write of dW)
        torch.autograd.grad(layer(x), inputs, dout)
    step()
    torch.cuda.synchronize()
    try:
        return harness.bench_graph_ms(step, reps=5), "graph"
    except Exception as e:  # noqa: BLE001 - report and fall back to eager timing
        print(f"graph capture failed ({type(e).__name__}: {e}); timing eagerly", flush=True)
        torch.cuda.synchronize()
        return harness.bench_ms(step), "eager"


def _variants(args):
    """``(name, recipe, fused, cast_per_gemm, compiled)`` of our layer."""
    out = []
    for recipe in [None] + [r for r in args.recipes.split(",") if r]:
        name = "ours_" + (recipe or "bf16")
        for compiled in (True, False) if args.eager else (True,):
            tail = "" if compiled else "_eager"
            out += [(name + tail, recipe, True, False, compiled),
                    (name + "_unfused" + tail, recipe, False, False, compiled)]
            if recipe is not None:
                out.append((name + "_cast_per_gemm" + tail, recipe, True, True, compiled))
    return out


def _profile(layer, x, dout, label):
    from torch.profiler import ProfilerActivity, profile
    inputs = [x] + [p for p in layer.parameters() if p.requires_grad]
    for _ in range(2):
        torch.autograd.grad(layer(x), inputs, dout)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        torch.autograd.grad(layer(x), inputs, dout)
        torch.cuda.synchronize()
    print(f"== {label}", flush=True)
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=30, max_name_column_width=90), flush=True)


def run(args):
    torch._inductor.config.fx_graph_cache = False
    torch._functorch.config.enable_autograd_cache = False
    dev = torch.device("cuda")
    env = harness.environment(dev)
    ceil = harness.ceilings(dev)
    rows = []
    for lname in args.layers.split(","):
        H = LAYERS[lname][0]
        m = skewed_layer(lname, dev)
        x = torch.randn(T, H, device=dev, dtype=torch.bfloat16, requires_grad=True)
        dout = torch.randn(T, H, device=dev, dtype=torch.bfloat16)
        wanted = set(args.profile.split(",")) - {""}
        variants = [v for v in _variants(args) if not wanted or v[0] in wanted]
        torch._dynamo.reset()
        if args.profile:
            if "grouped_mm_compiled" in wanted:
                _profile(torch.compile(PlainMoEBlock.from_moe(m), fullgraph=True, dynamic=False), x, dout,
                         f"{lname} grouped_mm_compiled")
            for name, recipe, fused, per_gemm, compiled in variants:
                m.recipe, m.fused = recipe, fused
                _profile(torch.compile(m, fullgraph=True, dynamic=False) if compiled else m, x, dout,
                         f"{lname} {name}")
            m.recipe, m.fused = None, True
            continue
        res = {"grouped_mm_compiled": _time_step(torch.compile(PlainMoEBlock.from_moe(m), fullgraph=True,
                                                               dynamic=False), x, dout)}
        for name, recipe, fused, per_gemm, compiled in variants:
            m.recipe, m.fused = recipe, fused
            torch._dynamo.reset()
            layer = torch.compile(m, fullgraph=True, dynamic=False) if compiled else m
            saved = em._weight_gemms
            if per_gemm:
                em._weight_gemms = _cast_per_gemm
            try:
                res[name] = _time_step(layer, x, dout)
            finally:
                em._weight_gemms = saved
            print(name, res[name], flush=True)
        m.recipe, m.fused = None, True
        peer_ms = res["grouped_mm_compiled"][0]
        for name, (ms, timing) in res.items():
            row = {"layer": lname, "T": T, "variant": name, "ms": ms, "timing": timing,
                   "x_vs_grouped_mm_compiled": peer_ms / ms}
            base, _, tail = name.partition("_eager")
            for suffix in ("_unfused", "_cast_per_gemm"):
                other = res.get(base + suffix + tail)
                row["x_vs" + suffix] = other[0] / ms if other and other is not res[name] else None
            rows.append(row)
            print(row, flush=True)
        m = x = None
        torch.cuda.empty_cache()
    cols = ["layer", "T", "variant", "ms", "timing", "x_vs_grouped_mm_compiled", "x_vs_unfused", "x_vs_cast_per_gemm"]
    if args.profile:
        return
    name = "moe_training_" + env.get("device", "gpu").replace(" ", "_")
    print(harness.write_results(name, env, ceil, rows, cols, args.out))


if __name__ == "__main__":
    p = argparse.ArgumentParser()
    p.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"))
    p.add_argument("--layers", default="qwen3,dsv3")
    p.add_argument("--recipes", default=",".join(RECIPES), help="comma-separated FP8 recipes (empty: bf16 only)")
    p.add_argument("--eager", action="store_true", help="also time the uncompiled modules")
    p.add_argument("--profile", default="", help="comma-separated variant names: print their kernels instead of timing")
    run(p.parse_args())
