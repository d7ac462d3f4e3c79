"""Fake kernels: shapes, dtypes and devices of every operator's outputs, after the shared checks."""
from __future__ import annotations

import torch

from moe_ops import checks, formats
from moe_ops.activations import E4M3, act_block


@torch.library.register_fake("moe_ops::grouped_mm")
def grouped_mm_fake(x, w, w_scale, w_zero, offs, w_format="none", granularity="none", group_size=0,
                    act_quant="none", recipe="none"):
    M, N, _, _ = checks.check_grouped_mm(x, w, w_scale, w_zero, offs, w_format, granularity, group_size,
                                         act_quant, recipe)
    return x.new_empty(M, N)


@torch.library.register_fake("moe_ops::grouped_mm_dgrad")
def grouped_mm_dgrad_fake(dy, w, w_scale, w_zero, offs, w_format="none", granularity="none", group_size=0,
                          recipe="none"):
    M, _, K, _ = checks.check_dgrad(dy, w, w_scale, w_zero, offs, w_format, granularity, group_size, recipe)
    return dy.new_empty(M, K)


@torch.library.register_fake("moe_ops::grouped_mm_wgrad")
def grouped_mm_wgrad_fake(dy, x, offs, recipe="none"):
    _, N, K, E = checks.check_wgrad(dy, x, offs, recipe)
    return dy.new_empty(E, N, K)


@torch.library.register_fake("moe_ops::quantize_weight")
def quantize_weight_fake(w, format, granularity="group", group_size=128):
    checks.check_quantize_weight(w, format, granularity, group_size)
    spec = formats.get_format(format)
    if spec.kind == "float":
        raise ValueError(f"format: {format!r} is a plain format; quantize_weight takes a quantized one")
    E, N, K = w.shape
    sshape = formats.scale_shape(granularity, E, N, K, group_size)
    out = [w.new_empty(E, N, K // spec.pack, dtype=spec.storage), w.new_empty(sshape, dtype=torch.float32)]
    if spec.has_zero:
        out.append(w.new_empty(sshape, dtype=torch.uint8))
    return out


@torch.library.register_fake("moe_ops::dequantize_weight")
def dequantize_weight_fake(data, scale, zero, format, granularity, group_size, dtype):
    ref = torch.empty(0, dtype=dtype, device=data.device)
    E, N, K = checks.check_weight(data, scale, zero, format, granularity, group_size, ref, "data")
    return data.new_empty(E, N, K, dtype=dtype)


@torch.library.register_fake("moe_ops::quantize_act")
def quantize_act_fake(x, mode):
    checks.check_act_quant(x, mode)
    M, K = x.shape
    target = torch.int8 if mode == "int8_token" else E4M3
    nb = -(-K // act_block(mode, K))
    return [x.new_empty(M, K, dtype=target), x.new_empty(M, nb, dtype=torch.float32)]


@torch.library.register_fake("moe_ops::_segment_mm")
def segment_mm_fake(a, b, offs, layout):
    if layout == "nt":
        return a.new_empty(a.shape[0], b.shape[1])
    if layout == "nn":
        return a.new_empty(a.shape[0], b.shape[2])
    return a.new_empty(offs.shape[0], a.shape[1], b.shape[1])
