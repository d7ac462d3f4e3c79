"""The fused expert-MLP launches (gather + SwiGLU epilogue, fused int8 requantization, routing
weight + token-major scatter) in Triton's interpreter against the unfused composition of the
reference operators, on small ragged routing with an empty expert and dropped slots."""
import itertools

import pytest
import torch

import moe_ops
from moe_ops import expert_mlp as em
from moe_ops.kernels import dispatch
from moe_ops.lowering.kernel_choice import KernelConfig
from helpers import rel_err

T, H, I, E, TOP_K = 11, 128, 64, 4, 2
CONFIGS = {"decode": (KernelConfig(16, 16, 32, 4, 1), KernelConfig(16, 32, 32, 4, 1)),
           "prefill": (KernelConfig(32, 32, 32, 4, 1), KernelConfig(32, 32, 32, 4, 1)),
           # CUDA-core tiles, one row each (packed codes read as words need it), the weight
           # words prefetched one (num_stages 2) or no (1) K tiles ahead
           "gemv": (KernelConfig(1, 16, 32, 4, 2, group_m=1, gemv=True),
                    KernelConfig(1, 32, 32, 4, 1, group_m=1, gemv=True)),
           # weight-only formats: the dequantized weights as the MMA's left operand
           "w_lhs": (KernelConfig(32, 32, 32, 4, 1, w_lhs=True), KernelConfig(16, 32, 32, 4, 1, w_lhs=True)),
           # gate and up rows interleaved in one K loop (the down launch is not a SwiGLU launch)
           "one_loop_decode": (KernelConfig(16, 16, 32, 4, 1, one_loop=True), KernelConfig(16, 32, 32, 4, 1)),
           "one_loop_prefill": (KernelConfig(32, 32, 32, 4, 1, one_loop=True), KernelConfig(32, 32, 32, 4, 1)),
           "one_loop_gemv": (KernelConfig(1, 16, 32, 4, 1, group_m=1, gemv=True, one_loop=True, k_split=2),
                             KernelConfig(1, 32, 32, 4, 3, group_m=1, gemv=True)),
           "one_loop_w_lhs": (KernelConfig(32, 32, 32, 4, 1, w_lhs=True, one_loop=True),
                              KernelConfig(16, 32, 32, 4, 1, w_lhs=True)),
           # W's stored tiles by TMA descriptors (the interpreter emulates them): the gathered
           # two-loop gate/up decode tile (gate rows at pid_n * 32, up rows at I + pid_n * 32;
           # x by pointers) and the down tile (x, the in-order intermediate, by TMA as well)
           "w_lhs_tma": (KernelConfig(16, 32, 32, 4, 1, w_lhs=True, tma=True),
                         KernelConfig(16, 32, 32, 4, 1, w_lhs=True, tma=True))}
WEIGHT_ONLY_CONFIGS = ("gemv", "w_lhs", "one_loop_gemv", "one_loop_w_lhs", "w_lhs_tma")


def _routing(seed):
    g = torch.Generator().manual_seed(seed)
    return (g, *_routing_with_drop(g, T, TOP_K))


def _routing_with_drop(g, tokens, top_k):
    """``(topk_weights, sorted_rows, offs)`` of ``tokens`` tokens routed top-``top_k`` over E
    experts: expert 1 gets no rows, token 3's second slot is dropped (sorted past offs[-1])."""
    logits = torch.randn(tokens, E, generator=g)
    logits[:, 1] = -1e4
    tw, ids = torch.ops.moe_ops.topk_route(logits, top_k, "softmax", True)
    ids[3, 1] = E
    rows, offs = torch.ops.moe_ops.sort_rows(ids, E)
    return tw, rows, offs


def _weights(g, fmt, gran, gs, dtype):
    w1 = torch.randn(E, 2 * I, H, generator=g) * H ** -0.5
    w2 = torch.randn(E, H, I, generator=g) * I ** -0.5
    if fmt == "none":
        return (w1.to(dtype), None, None), (w2.to(dtype), None, None)
    q1, q2 = (moe_ops.quantize_weight(w.to(dtype), fmt, gran, gs) for w in (w1, w2))
    return q1.op_args()[:3], q2.op_args()[:3]


CASES = [("none", "none", 0, "none"), ("int4_asym", "group", 32, "none"), ("int8_sym", "channel", 0, "none"),
         ("fp8_e4m3", "block", 0, "none"), ("int8_sym", "channel", 0, "int8_token"),
         ("int8_asym", "group", 64, "int8_token"), ("int4_sym", "channel", 0, "int8_token")]


@pytest.mark.parametrize("cfg,fmt,gran,gs,act", [(c, *case) for c in CONFIGS for case in CASES
                                                  if c not in WEIGHT_ONLY_CONFIGS or case[3] == "none"])
def test_fused_expert_mlp(fmt, gran, gs, act, cfg):
    g, tw, rows, offs = _routing(hash((fmt, gran, act)) % 997)
    x = torch.randn(T, H, generator=g).half()
    (w1, s1, z1), (w2, s2, z2) = _weights(g, fmt, gran, gs, torch.float16)
    args = (x, tw, rows, offs, w1, s1, z1, w2, s2, z2, fmt, gran, gs, gs, act, "none")
    out = dispatch.expert_mlp(*args, configs=CONFIGS[cfg])
    assert out is not None and out.shape == (T, H) and not torch.isnan(out).any()
    ref = em.composed(*args)
    # fp16 storage of h and of the output rows; under int8_token the fused h (float32 SwiGLU,
    # one rounding) differs from the composition's (rounded gate/up, then SwiGLU) by fp16
    # rounding, which can move an int8 code of h by one step: 1/127 of the row's range
    assert rel_err(out, ref) < (6e-3 if act == "int8_token" else 2e-3)  # measured 4.0e-3 / 8.5e-4


# the token-major down launch with the combine (packed codes or 16-bit weights, gemv tile): after
# a gemv gate/up launch and after a tensor-core one (both write the slot map), prefetch 2 / 3 /
# none (the gemv gate/up tile of COMBINE_CONFIGS[0] is for packed codes: 16-bit weights take its
# row-tile 16-bit gemv form there)
COMBINE_CONFIGS = [
    (KernelConfig(1, 16, 32, 4, 2, group_m=1, gemv=True, one_loop=True),
     KernelConfig(1, 8, 32, 4, 2, group_m=1, gemv=True, combine=True)),
    (KernelConfig(16, 16, 32, 4, 1, w_lhs=True, one_loop=True),
     KernelConfig(1, 16, 32, 2, 3, group_m=1, gemv=True, combine=True)),
    (KernelConfig(16, 32, 32, 4, 1), KernelConfig(1, 32, 32, 2, 1, group_m=1, gemv=True, combine=True))]


@pytest.mark.parametrize("cfgs,fmt,gran,gs,top_k", [
    (0, fmt, gran, gs, top_k) for (fmt, gran, gs), top_k in itertools.product(
        (("int4_asym", "group", 32), ("int4_sym", "channel", 0), ("int2_asym", "group", 64)), (2, 3))] + [
    (c, "int4_asym", "group", 32, 3) for c in range(1, len(COMBINE_CONFIGS))] + [
    (c, "none", "none", 0, top_k) for c, top_k in ((0, 2), (1, 3), (2, 3))])
def test_fused_expert_mlp_combine(fmt, gran, gs, top_k, cfgs):
    """COMBINE: program (token, column block) sums the token's slots (top_k 3: a masked fourth
    slot), a dropped slot adds nothing, an expert with no rows costs nothing; packed codes and
    16-bit weights."""
    g = torch.Generator().manual_seed(hash((fmt, top_k, cfgs)) % 991)
    tw, rows, offs = _routing_with_drop(g, T, top_k)
    x = torch.randn(T, H, generator=g).half()
    (w1, s1, z1), (w2, s2, z2) = _weights(g, fmt, gran, gs, torch.float16)
    args = (x, tw, rows, offs, w1, s1, z1, w2, s2, z2, fmt, gran, gs, gs, "none", "none")
    out = dispatch.expert_mlp(*args, configs=COMBINE_CONFIGS[cfgs])
    assert out is not None and out.shape == (T, H) and not torch.isnan(out).any()
    # fp16 h; the slots summed in float32 and rounded once (the composition rounds each row)
    assert rel_err(out, em.composed(*args)) < 2e-3


def test_combine_is_refused_where_it_cannot_serve(monkeypatch):
    """A combine config the launch cannot serve is refused before either launch runs."""
    launched = []
    monkeypatch.setattr(dispatch, "_launch", lambda *a, **k: launched.append(a))
    g, tw, rows, offs = _routing(7)
    x = torch.randn(T, H, generator=g).half()
    gate_up, down = COMBINE_CONFIGS[0]
    for fmt, gran, gs in (("int8_sym", "channel", 0), ("fp8_e4m3", "channel", 0)):  # 8-bit codes
        (w1, s1, z1), (w2, s2, z2) = _weights(g, fmt, gran, gs, torch.float16)
        args = (x, tw, rows, offs, w1, s1, z1, w2, s2, z2, fmt, gran, gs, gs, "none", "none")
        with pytest.raises(ValueError, match="combine"):
            dispatch.expert_mlp(*args, configs=(gate_up, down))
    (w1, s1, z1), (w2, s2, z2) = _weights(g, "int4_asym", "group", 32, torch.float16)
    args = (x, tw, rows, offs, w1, s1, z1, w2, s2, z2, "int4_asym", "group", 32, 32, "none", "none")
    with pytest.raises(ValueError, match="combine"):  # only the down launch is token-major
        dispatch.expert_mlp(*args, configs=(down, down))
    with pytest.raises(ValueError, match="combine"):  # one K tile a step
        dispatch.expert_mlp(*args, configs=(gate_up, KernelConfig(1, 8, 32, 4, 2, gemv=True, combine=True,
                                                                  k_split=2)))
    assert launched == []


# the row-tile down launch summing the slots itself (SLOT_SUM), after a tensor-core and a gemv
# gate/up launch (either zeroes the counters): a tensor-core decode tile, a w_lhs tile, a row tile
# of 32 and a 16-bit gemv tile; T 11 (one 16-token step of the last program's sum) and 37 (three)
SLOT_SUM_CONFIGS = [
    (KernelConfig(16, 16, 32, 4, 1), KernelConfig(16, 32, 32, 4, 1, slot_sum=True)),
    (KernelConfig(1, 16, 32, 4, 2, group_m=1, gemv=True, one_loop=True),
     KernelConfig(16, 32, 32, 4, 1, w_lhs=True, slot_sum=True)),
    (KernelConfig(32, 32, 32, 4, 1, one_loop=True), KernelConfig(32, 16, 32, 4, 1, slot_sum=True)),
    (KernelConfig(16, 16, 32, 4, 1), KernelConfig(1, 32, 32, 4, 1, group_m=1, gemv=True, slot_sum=True))]


@pytest.mark.parametrize("cfgs,fmt,gran,gs,act,tokens", [
    (0, *CASES[i], 11) for i in (0, 1, 4)] + [(1, "int4_asym", "group", 32, "none", 11),
                                           (2, "none", "none", 0, "none", 37), (3, "none", "none", 0, "none", 11),
                                           (0, "int4_sym", "channel", 0, "int8_token", 37)])
def test_fused_expert_mlp_slot_sum(cfgs, fmt, gran, gs, act, tokens):
    """SLOT_SUM: the last program of each column block sums every token's slots (a dropped slot,
    stored as zeros by a spare program, and an expert with no rows included), the same numbers
    as the separate sum over the same launch's rows; twice in a row (the gate/up launch zeroes
    the counters each call)."""
    g = torch.Generator().manual_seed(hash((fmt, act, cfgs, tokens)) % 983)
    tw, rows, offs = _routing_with_drop(g, tokens, TOP_K)
    x = torch.randn(tokens, H, generator=g).half()
    (w1, s1, z1), (w2, s2, z2) = _weights(g, fmt, gran, gs, torch.float16)
    args = (x, tw, rows, offs, w1, s1, z1, w2, s2, z2, fmt, gran, gs, gs, act, "none")
    gate_up, down = SLOT_SUM_CONFIGS[cfgs]
    separate = dispatch.expert_mlp(*args, configs=(gate_up, KernelConfig(**{**down.__dict__, "slot_sum": False})))
    for _ in range(2):
        out = dispatch.expert_mlp(*args, configs=(gate_up, down))
        assert out.shape == (tokens, H) and torch.equal(out, separate)
    assert rel_err(out, em.composed(*args)) < (6e-3 if act == "int8_token" else 2e-3)


def test_slot_sum_is_refused_where_it_cannot_serve(monkeypatch):
    """slot_sum only on the fused expert MLP's row-tile down launch: not on its gate/up launch,
    not with the token-major combine, not on a plain grouped GEMM; refused before any launch."""
    launched = []
    monkeypatch.setattr(dispatch, "_launch", lambda *a, **k: launched.append(a))
    g, tw, rows, offs = _routing(5)
    x = torch.randn(T, H, generator=g).half()
    (w1, s1, z1), (w2, s2, z2) = _weights(g, "int4_asym", "group", 32, torch.float16)
    args = (x, tw, rows, offs, w1, s1, z1, w2, s2, z2, "int4_asym", "group", 32, 32, "none", "none")
    gate_up, down = SLOT_SUM_CONFIGS[0]
    with pytest.raises(ValueError, match="slot_sum"):
        dispatch.expert_mlp(*args, configs=(down, down))
    with pytest.raises(ValueError, match="slot_sum"):
        dispatch.expert_mlp(*args, configs=(gate_up, KernelConfig(**{**COMBINE_CONFIGS[0][1].__dict__,
                                                                     "slot_sum": True})))
    assert launched == []
    monkeypatch.undo()
    with pytest.raises(ValueError, match="slot_sum"):
        dispatch.grouped_mm(torch.randn(T * TOP_K, H, generator=g).half(), w1, s1, z1, offs, "int4_asym", "group",
                            32, "none", "none", config=down)


def test_int8_requant_in_loads_is_exact_to_its_rule():
    """ACT 3 (int8 from absmax partials, quantized while loading) equals, bit for bit, the
    integer GEMM of codes clamp(round(h * (1/s))), s = absmax / 127, then the int8_token
    epilogue ((acc * s) * w_scale)."""
    g, tw, rows, offs = _routing(5)
    M = T * TOP_K
    h = torch.randn(M, I, generator=g).half()
    h[3] = 0  # an all-zero row: scale 0, codes 0
    q2 = moe_ops.quantize_weight(torch.randn(E, H, I, generator=g), "int8_sym", "channel", 0)
    cfg = KernelConfig(16, 32, 32, 4, 1)
    bn = 16  # the partials of a producer with 16-wide column tiles
    amax = h.float().abs().reshape(M, I // bn, bn).amax(-1).contiguous()
    ws, wz, st = dispatch._scale_operands(q2.data, q2.scale, None, "channel", transposed=False)
    y = torch.full((M, H), float("nan"), dtype=h.dtype)
    dispatch._launch(h, h, q2.data, q2.data.stride(), ws, wz, st, y, offs, M, H, I, E,
                     moe_ops.formats.get_format("int8_sym"), 1, 1 << 30, 3, 1 << 30, False, False, cfg, 32,
                     fused=dict(amax=amax, amax_cols=I // bn))
    s = h.float().abs().amax(1) / 127.0
    inv = torch.where(s > 0, 1.0 / s, torch.zeros_like(s))
    q = torch.round(h.float() * inv[:, None]).clamp(-127, 127)
    acc = moe_ops.reference.segment_mm(q.double(), q2.data.double(), offs, "nt").float()
    eid = moe_ops.reference._row_experts(offs, M).clamp(max=E - 1)
    ref = ((acc * s[:, None]) * q2.scale[:, :, 0][eid]).half()
    ref[int(offs[-1]):] = 0
    assert torch.equal(y, ref)
