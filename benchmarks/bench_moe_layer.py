"""The MoE layer (router + top-k + experts + combine): ours against the layer as model code
writes it, in one run.

Layers: Qwen3-30B-A3B (H 2048, 128 experts, top-8, I 768) and DeepSeek-V3 with 32 local
experts (H 7168, top-8, I 2048; routed experts only). Prefill T=4096, decode T in {1, 8, 64}.
Variants per (layer, T):

* ``loop_eager``: the per-expert loop of transformers' eager experts (bf16; host syncs, so no
  CUDA graph; skipped at decode-irrelevant sizes only by ``--no-loop``).
* ``grouped_mm_compiled``: the same layer written with ``torch._grouped_mm`` (sort by expert,
  gather, gate/up, SwiGLU, down, weighted ``index_add_``), ``torch.compile``\\ d (bf16).
* ``ours_<fmt>``: ``moe_ops.MoE`` (routing operators + fused ``expert_mlp``) for bf16, int4
  g128 asym, fp8 128x128 block, int8 W8A8 (channel weights, per-token int8 activations).
* ``ours_<fmt>_unfused``: the same module with ``fused=False`` (permute -> grouped_mm ->
  SwiGLU -> grouped_mm -> unpermute): what fusion buys.

Everything except ``loop_eager`` is timed as CUDA-graph replays of the layer call (our
operators never synchronise with the host, so a whole layer call captures). ``kernels`` is
the number of GPU kernels one call launches (torch.profiler). ``act_MB`` is the activation
bytes the expert path moves (reads + writes of x, its permuted copy, the gate/up output, h,
the down output, and the combined output; weights excluded), computed from the shapes and the
path the operator takes (its composition where the fused launches do not pay).

Usage (GPU): ``python benchmarks/bench_moe_layer.py [--out DIR] [--layers qwen3,dsv3] [--tokens 4096,1,8,64]
[--no-loop]``.
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))
import harness  # noqa: E402
from plain_moe import PlainMoEBlock, loop_layer  # noqa: E402

import moe_ops  # noqa: E402

LAYERS = {"qwen3": (2048, 768, 128, 8), "dsv3": (7168, 2048, 32, 8)}
TOKENS = (4096, 1, 8, 64)
FORMATS = {"bf16": None, "int4_g128": ("int4_asym", "group", 128, None),
           "fp8_block": ("fp8_e4m3", "block", 0, None), "int8_w8a8": ("int8_sym", "channel", 0, "int8_token")}


def act_mb(T, H, I, k, fused):
    M = T * k
    if fused:  # gathered x read, h written + read, weighted rows written + read, output written
        elems = M * H + 2 * M * I + 2 * M * H + T * H
    else:  # x read, permuted x written + read, gate/up written + read, h written + read, y, out
        elems = T * H + 2 * M * H + 2 * M * 2 * I + 2 * M * I + 2 * M * H + T * H
    return elems * 2 / 1e6


def skewed_layer(lname: str, dev) -> "moe_ops.MoE":
    """The bf16 ``moe_ops.MoE`` of layer ``lname`` (Qwen3-style routing at every size) with
    skewed router biases, as a trained router gives."""
    H, I, E, k = LAYERS[lname]
    m = moe_ops.MoE.from_style("qwen3", H, I, E, k, dtype=torch.bfloat16, seed=0).to(dev)
    with torch.no_grad():
        m.router.weight.add_(torch.randn(E, 1, device=dev, dtype=torch.bfloat16) * 0.02)
    return m


def quantized_layer(lname: str, fname: str, dev, state_dict: dict = None):
    """``(layer, act_quant)``: a Qwen3-style ``moe_ops.MoE`` of ``lname``'s sizes (seed 0, or the
    bf16 ``state_dict`` given) with its experts in format ``fname`` (``FORMATS``), and the
    activation mode its calls take."""
    H, I, E, k = LAYERS[lname]
    m = moe_ops.MoE.from_style("qwen3", H, I, E, k, dtype=torch.bfloat16, seed=0).to(dev)
    if state_dict is not None:
        m.load_state_dict(state_dict)
    spec = FORMATS[fname]
    if spec is None:
        return m, "none"
    fmt, gran, gs, act = spec
    moe_ops.quantize_experts(m, fmt, gran, gs or 128, act_quant=act)
    return m, act or "none"


def _fused_pays(fname: str, x: torch.Tensor, top_k: int, E: int) -> bool:
    """Whether ``moe_ops::expert_mlp`` takes its fused launches for format ``fname`` on the layer
    input ``x`` ``[T, H]`` (:func:`moe_ops.lowering.kernel_choice.fused_expert_mlp_pays`)."""
    from moe_ops import formats
    from moe_ops.kernels.dispatch import x_tma_possible
    from moe_ops.lowering.kernel_choice import fused_expert_mlp_pays
    spec = FORMATS[fname]
    bits = 16 if spec is None else formats.get_format(spec[0]).bits
    # the layers' weights are contiguous with 16-byte rows: W by TMA wherever x is
    return fused_expert_mlp_pays(x.shape[0] * top_k, E, bits, 8 if spec is not None and spec[3] else 16,
                                 x_tma_possible(x), x_tma_possible(x))


def count_kernels(fn) -> int:
    from torch.profiler import ProfilerActivity, profile
    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    return sum(1 for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA
               and "Memcpy" not in e.name and "Memset" not in e.name)


def _time(fn, graph=True):
    with torch.no_grad():
        fn()
        return harness.bench_graph_ms(fn, reps=10) if graph else harness.bench_ms(fn)


def run(args):
    dev = torch.device("cuda")
    env = harness.environment(dev)
    ceil = harness.ceilings(dev)
    rows = []
    for lname in args.layers.split(","):
        H, I, E, k = LAYERS[lname]
        base = skewed_layer(lname, dev)
        plain = PlainMoEBlock.from_moe(base)
        peer = torch.compile(plain, dynamic=False)
        quantized = {}
        for fname, spec in FORMATS.items():
            if spec is None:
                quantized[fname] = base
                continue
            quantized[fname] = quantized_layer(lname, fname, dev, base.state_dict())[0]
        for T in map(int, args.tokens.split(",")):
            x = torch.randn(T, H, device=dev, dtype=torch.bfloat16)
            res = {}
            with torch.no_grad():
                peer(x)
                res["grouped_mm_compiled"] = (_time(lambda: peer(x)), count_kernels(lambda: peer(x)),
                                              act_mb(T, H, I, k, False))
                if not args.no_loop:
                    res["loop_eager"] = (_time(lambda: loop_layer(plain, x), graph=False), None, None)
                for fname, m in quantized.items():
                    for fused in (True, False):
                        m.fused = fused
                        name = f"ours_{fname}" + ("" if fused else "_unfused")
                        # the op runs its composition where the fused launches do not pay
                        runs_fused = fused and _fused_pays(fname, x, k, E)
                        res[name] = (_time(lambda: m(x)), count_kernels(lambda: m(x)), act_mb(T, H, I, k, runs_fused))
                    m.fused = True
            peer_ms = res["grouped_mm_compiled"][0]
            for name, (ms, nk, mb) in res.items():
                row = {"layer": lname, "T": T, "variant": name, "ms": ms, "kernels": nk, "act_MB": mb,
                       "x_vs_grouped_mm_compiled": peer_ms / ms}
                if name.startswith("ours_") and not name.endswith("_unfused"):
                    un = res.get(name + "_unfused")
                    row["x_vs_our_unfused"] = un[0] / ms if un else None
                rows.append(row)
                print(row, flush=True)
        base = quantized = peer = plain = None  # free this layer's weights before the next
        torch.cuda.empty_cache()
    cols = ["layer", "T", "variant", "ms", "kernels", "act_MB", "x_vs_grouped_mm_compiled", "x_vs_our_unfused"]
    name = "moe_layer_" + env.get("device", "gpu").replace(" ", "_")
    print(harness.write_results(name, env, ceil, rows, cols, args.out))


if __name__ == "__main__":
    p = argparse.ArgumentParser()
    p.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"))
    p.add_argument("--layers", default="qwen3,dsv3")
    p.add_argument("--no-loop", action="store_true")
    p.add_argument("--tokens", default=",".join(map(str, TOKENS)), help="comma-separated T values")
    run(p.parse_args())
