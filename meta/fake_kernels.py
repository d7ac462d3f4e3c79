"""Fake kernels: shapes, dtypes and devices of every operator's outputs, after the shared checks."""
from __future__ import annotations

import torch

from moe_ops import checks, formats
from moe_ops.activations import E4M3, act_block
from moe_ops.recipes import gemm_modes


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


@torch.library.register_fake("moe_ops::recipe_weights")
def recipe_weights_fake(w, recipe):
    checks.check_recipe_weights(w, recipe)
    E, N, K = w.shape
    gran = gemm_modes(recipe)[1]
    return [w.new_empty(E, N, K, dtype=E4M3), w.new_empty(formats.scale_shape(gran, E, N, K, 0), dtype=torch.float32),
            w.new_empty(E, K, N, dtype=E4M3), w.new_empty(formats.scale_shape(gran, E, K, N, 0), dtype=torch.float32)]


@torch.library.register_fake("moe_ops::grouped_mm_recipe")
def grouped_mm_recipe_fake(x, w, wq, wq_scale, wtq, wtq_scale, offs, recipe):
    M, N, _, _ = checks.check_grouped_mm_recipe(x, w, wq, wq_scale, wtq, wtq_scale, offs, recipe)
    return x.new_empty(M, N)


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


@torch.library.register_fake("moe_ops::topk_route")
def topk_route_fake(logits, top_k, scoring="softmax", renormalize=True, bias=None, num_groups=1, topk_groups=1):
    checks.check_topk_route(logits, top_k, scoring, bias, num_groups, topk_groups)
    T = logits.shape[0]
    wdt = torch.float64 if logits.dtype == torch.float64 else torch.float32
    return [logits.new_empty(T, top_k, dtype=wdt), logits.new_empty(T, top_k, dtype=torch.int32)]


@torch.library.register_fake("moe_ops::sort_rows")
def sort_rows_fake(topk_ids, num_experts):
    checks.check_sort_rows(topk_ids, num_experts)
    M = topk_ids.shape[0] * topk_ids.shape[1]
    return [topk_ids.new_empty(M, dtype=torch.int32), topk_ids.new_empty(num_experts, dtype=torch.int32)]


@torch.library.register_fake("moe_ops::permute")
def permute_fake(x, sorted_rows, top_k):
    checks.check_permute(x, sorted_rows, top_k)
    return x.new_empty(sorted_rows.shape[0], x.shape[1])


@torch.library.register_fake("moe_ops::unpermute")
def unpermute_fake(y, sorted_rows, topk_weights):
    checks.check_unpermute(y, sorted_rows, topk_weights)
    return y.new_empty(topk_weights.shape[0], y.shape[1])


@torch.library.register_fake("moe_ops::expert_mlp")
def expert_mlp_fake(x, topk_weights, sorted_rows, offs, w1, w1_scale, w1_zero, w2, w2_scale, w2_zero,
                    w_format="none", granularity="none", group_size1=0, group_size2=0, act_quant="none",
                    recipe="none"):
    T, H, _, _, _ = checks.check_expert_mlp(x, topk_weights, sorted_rows, offs, w1, w1_scale, w1_zero, w2,
                                            w2_scale, w2_zero, w_format, granularity, group_size1, group_size2,
                                            act_quant, recipe)
    return x.new_empty(T, H)
