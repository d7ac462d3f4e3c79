"""The MoE layer with a weight-only format at prefill sizes, the fused expert MLP forced on
(``kernel_choice.fused_expert_mlp_pays`` patched to True) against the unfused composition, in one
run: where :func:`moe_ops.lowering.kernel_choice.fused_expert_mlp_pays` should switch.

    python benchmarks/probe_fused_prefill.py --layer qwen3 --formats int4_g128 --tokens 256 1024 4096
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))
import harness  # noqa: E402
from bench_moe_layer import LAYERS, _fused_pays, quantized_layer  # noqa: E402

from moe_ops.kernels import dispatch  # noqa: E402
from moe_ops.lowering import kernel_choice  # noqa: E402


def run(args):
    dev = torch.device("cuda")
    print(harness.environment(dev), flush=True)
    H, I, E, k = LAYERS[args.layer]
    rule = kernel_choice.fused_expert_mlp_pays
    for fname in args.formats:
        m = quantized_layer(args.layer, fname, dev)[0]
        for T in args.tokens:
            x = torch.randn(T, H, device=dev, dtype=torch.bfloat16)
            res = {}
            with torch.no_grad():
                for name, fused, forced in (("fused_forced", True, True), ("unfused", False, False),
                                            ("table", True, False)):
                    m.fused = fused
                    dispatch.fused_expert_mlp_pays = (lambda *a, **kw: True) if forced else rule
                    m(x)
                    res[name] = harness.bench_graph_ms(lambda: m(x), reps=10)
            dispatch.fused_expert_mlp_pays = rule
            print(f"{args.layer} {fname} T={T} rows/expert={T * k / E:.0f} fused_forced {res['fused_forced']:.4f} ms"
                  f" unfused {res['unfused']:.4f} ms table {res['table']:.4f} ms"
                  f" fused/unfused {res['unfused'] / res['fused_forced']:.3f}x"
                  f" table_takes_fused={_fused_pays(fname, x, k, E)}", flush=True)


if __name__ == "__main__":
    p = argparse.ArgumentParser()
    p.add_argument("--layer", default="qwen3", choices=sorted(LAYERS))
    p.add_argument("--formats", nargs="+", default=["int4_g128"])
    p.add_argument("--tokens", type=int, nargs="+", default=[256, 1024, 4096])
    run(p.parse_args())
