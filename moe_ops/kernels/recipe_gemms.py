"""The FP8 training recipes (:mod:`moe_ops.recipes`) on the Triton kernels.

Each GEMM quantizes its operands per the recipe and runs the fp8 x fp8 path of the grouped
kernels (fp32 accumulation, scales applied per K tile where they vary along K):

* forward  ``fp8_rowwise``: x ``fp8_token`` x W ``channel``; ``fp8_blockwise``: x ``fp8_1x128`` x
  W ``block`` (128x128).
* dgrad    the same on ``(dy, W^T)``: rowwise W is scaled along N per (e, k); blockwise reuses
  W's 128x128 tiles, transposed (block quantization commutes with transposition).
* wgrad    dy and x in float8 with scales per (expert, column) (rowwise) or per (128-row
  block from each expert's first row, column) (blockwise), read by ``grouped_wgrad_fp8_kernel``.

The numbers equal the reference emulation up to float32 summation order. The wgrad operands
are quantized by a Triton kernel that writes the layout the wgrad kernel reads
(:mod:`.token_block_quant`: token dim contiguous, 128-row blocks aligned and zero padded);
weight-side quantization is a Triton kernel too (:mod:`.weight_quant`), which writes W^T's
codes and scales directly for the dgrad GEMM.
"""
from __future__ import annotations

from ..recipes import gemm_modes

_E4M3 = "fp8_e4m3"


def forward(x, w, offs, recipe):
    from .dispatch import grouped_mm
    from .weight_quant import fp8_weight_quant
    act, gran = gemm_modes(recipe)
    data, scale = fp8_weight_quant(w, gran)
    return grouped_mm(x, data, scale, None, offs, _E4M3, gran, 0, act, "none")


def dgrad(dy, w, offs, recipe):
    from .dispatch import grouped_mm
    from .weight_quant import fp8_weight_quant
    act, gran = gemm_modes(recipe)
    data, scale = fp8_weight_quant(w, gran, transpose=True)  # W^T [E, K, N], written directly
    return grouped_mm(dy, data, scale, None, offs, _E4M3, gran, 0, act, "none")


def wgrad(dy, x, offs, recipe, out_dtype):
    from .grouped_wgrad import launch_wgrad_fp8
    from .token_block_quant import token_block_quant
    per_expert = recipe == "fp8_rowwise"
    qdy, sdy = token_block_quant(dy, offs, per_expert)
    qx, sx = token_block_quant(x, offs, per_expert)
    return launch_wgrad_fp8(qdy, qx, sdy, sx, offs, per_expert, out_dtype)
