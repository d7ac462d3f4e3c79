"""Driver for Nsight Compute: one FP8-recipe quantization cast of a training shape, a few calls.

Usage (GPU): ``ncu --section SpeedOfLight ... -k regex:token_block_quant -s 2 -c 1 python
benchmarks/ncu_casts.py --shape qwen3_gate_up --cast token_blocks_128`` (the first calls
compile and warm up; ``-s`` skips them). Casts: ``token_blocks_128``, ``token_blocks_expert``
(x's wgrad codes), ``w_channel``, ``wT_channel``, ``w_block`` (W's codes, default configs).
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))
import harness  # noqa: E402
from bench_training import SHAPES  # noqa: E402

from moe_ops.kernels.token_block_quant import token_block_quant  # noqa: E402
from moe_ops.kernels.weight_quant import fp8_weight_quant  # noqa: E402

CASTS = {
    "token_blocks_128": lambda x, w, offs: token_block_quant(x, offs, False),
    "token_blocks_expert": lambda x, w, offs: token_block_quant(x, offs, True),
    "w_channel": lambda x, w, offs: fp8_weight_quant(w, "channel"),
    "wT_channel": lambda x, w, offs: fp8_weight_quant(w, "channel", transpose=True),
    "w_block": lambda x, w, offs: fp8_weight_quant(w, "block"),
}


def main(a):
    E, top_k, K, N = SHAPES[a.shape]
    offs, x, w, _ = harness.training_operands(E, top_k, K, N, a.tokens, torch.device("cuda"))
    for _ in range(a.calls):
        CASTS[a.cast](x, w, offs)
    torch.cuda.synchronize()


if __name__ == "__main__":
    p = argparse.ArgumentParser()
    p.add_argument("--shape", default="qwen3_gate_up", choices=sorted(SHAPES))
    p.add_argument("--tokens", type=int, default=4096)
    p.add_argument("--cast", default="token_blocks_128", choices=sorted(CASTS))
    p.add_argument("--calls", type=int, default=4)
    main(p.parse_args())
