"""The demo: ``python -m moe_ops [--device cpu|cuda|xpu] [--steps N] [--no-compile]``.

1. A Qwen3-30B-A3B-shaped MoE layer (128 experts, top-8; hidden 2048, expert intermediate 768
   on a GPU, scaled down to hidden 256 / intermediate 96 on the CPU) in every weight format:
   relative error of the layer output against the bf16 layer, eager and compiled latency.
2. A tiny MoE language model trained in bf16 and in ``fp8_blockwise``: the loss falling.
"""
from __future__ import annotations

import argparse
import copy
import time

import torch
from tqdm import tqdm

import moe_ops
from moe_ops.layers import MoE, quantize_experts, train_tiny_lm

FORMATS = [  # (label, format, granularity, group_size, act_quant)
    ("bf16", "bf16", "none", 0, None),
    ("fp16", "fp16", "none", 0, None),
    ("int8_sym ch", "int8_sym", "channel", 0, None),
    ("int8_asym g128", "int8_asym", "group", 128, None),
    ("int4_sym g128", "int4_sym", "group", 128, None),
    ("int4_asym g128", "int4_asym", "group", 128, None),
    ("int2_sym g32", "int2_sym", "group", 32, None),
    ("int2_asym g32", "int2_asym", "group", 32, None),
    ("fp8_e4m3 block", "fp8_e4m3", "block", 0, None),
    ("fp8_e5m2 ch", "fp8_e5m2", "channel", 0, None),
    ("W8A8 int8", "int8_sym", "channel", 0, "int8_token"),
    ("W4A8 int4", "int4_sym", "group", 128, "int8_token"),
    ("W8A8 fp8 1x128", "fp8_e4m3", "block", 0, "fp8_1x128"),
]


def best_device() -> str:
    if torch.cuda.is_available():
        return "cuda"
    if hasattr(torch, "xpu") and torch.xpu.is_available():
        return "xpu"
    return "cpu"


def _time_ms(fn, device: str, reps: int) -> float:
    fn()
    if device != "cpu":
        getattr(torch, device).synchronize()
    t0 = time.perf_counter()
    for _ in range(reps):
        fn()
    if device != "cpu":
        getattr(torch, device).synchronize()
    return (time.perf_counter() - t0) / reps * 1e3


def layer_demo(device: str, compile: bool) -> None:
    gpu = device != "cpu"
    H, I, T = (2048, 768, 512) if gpu else (256, 96, 64)
    print(f"\n== Qwen3-30B-A3B-shaped MoE layer on {device}: hidden {H}, intermediate {I}, 128 experts, top-8, "
          f"{T} tokens ==")
    base = MoE(H, I, num_experts=128, top_k=8, dtype=torch.bfloat16, seed=0).to(device)
    x = torch.randn(T, H, dtype=torch.bfloat16, device=device)
    with torch.no_grad():
        ref = base(x).double()
    reps = 20 if gpu else 3
    print(f"{'format':<16}{'rel. err vs bf16':>18}{'eager ms':>11}{'compiled ms':>13}")
    rows = []
    for label, fmt, gran, gs, act in tqdm(FORMATS, desc="formats", leave=False):
        layer = copy.deepcopy(base)
        if fmt == "fp16":
            layer = layer.half()
        elif fmt != "bf16":
            quantize_experts(layer, fmt, gran if gran != "none" else "group", gs or 128, act_quant=act)
        with torch.no_grad():
            if fmt == "fp16":
                y = layer(x.half()).double()
                run = lambda layer=layer: layer(x.half())  # noqa: E731
            else:
                y = layer(x).double()
                run = lambda layer=layer: layer(x)  # noqa: E731
            err = float((y - ref).norm() / ref.norm())
            eager = _time_ms(run, device, reps)
            comp = None
            if compile:
                torch._dynamo.reset()  # a fresh cache per format (each format is its own graph)
                cl = torch.compile(layer, fullgraph=True)
                xin = x.half() if fmt == "fp16" else x
                comp = _time_ms(lambda cl=cl, xin=xin: cl(xin), device, reps)
        rows.append((label, err, eager, comp))
    for label, err, eager, comp in rows:
        c = f"{comp:13.3f}" if comp is not None else f"{'-':>13}"
        print(f"{label:<16}{err:18.2e}{eager:11.3f}{c}")


def training_demo(device: str, steps: int) -> None:
    print(f"\n== Tiny MoE language model, {steps} steps on {device} (next-token loss) ==")
    curves = {}
    with tqdm(total=2 * steps, desc="training", leave=False) as bar:
        for recipe in (None, "fp8_blockwise"):
            curves[recipe or "bf16"] = train_tiny_lm(recipe, steps, dtype=torch.bfloat16, device=device, progress=bar)
    every = max(steps // 8, 1)
    print(f"{'step':>6}" + "".join(f"{k:>16}" for k in curves))
    for i in list(range(0, steps, every)) + [steps - 1]:
        print(f"{i:>6}" + "".join(f"{c[i]:16.4f}" for c in curves.values()))
    for k, c in curves.items():
        first, last = sum(c[:10]) / 10, sum(c[-10:]) / 10
        print(f"{k}: mean loss of first 10 steps {first:.3f} -> last 10 steps {last:.3f}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default=best_device())
    p.add_argument("--steps", type=int, default=150)
    p.add_argument("--no-compile", action="store_true")
    a = p.parse_args()
    print(f"moe_ops {moe_ops.__version__}, torch {torch.__version__}, device {a.device}")
    layer_demo(a.device, not a.no_compile)
    training_demo(a.device, a.steps)


if __name__ == "__main__":
    main()
