"""The opt-in tile tuner (moe_ops.lowering.autotune) in Triton's interpreter: off by default,
on under MOE_OPS_AUTOTUNE=1 or Inductor's max_autotune; candidates around the static choice;
tuned launches compute the same function; the tuning key holds the weight shape and format,
never the row count."""
import pytest
import torch

import moe_ops
from moe_ops import reference
from moe_ops.kernels import dispatch
from moe_ops.lowering import autotune
from moe_ops.lowering.kernel_choice import KernelConfig, choose_forward_config
from helpers import ragged_offs, rel_err, spy_tma_operands

E, N, K = 4, 40, 256


def test_enabled_by_env_or_max_autotune(monkeypatch):
    monkeypatch.delenv("MOE_OPS_AUTOTUNE", raising=False)
    assert not autotune.enabled()
    with torch._inductor.config.patch(max_autotune=True):
        assert autotune.enabled()
    monkeypatch.setenv("MOE_OPS_AUTOTUNE", "1")
    assert autotune.enabled()


@pytest.mark.parametrize("M,unit,cap", [(8, 128, 256), (40, 256, 256), (4000, 128, 128), (4000, 32, 256)])
def test_candidates_stay_in_the_bucket(M, unit, cap):
    default = choose_forward_config(M, N, K, E, 4, unit)
    cands = autotune.forward_candidates(default, K, unit, cap)
    assert cands[0] == default and len(set(cands)) == len(cands) > 1
    assert all(c.decode == default.decode for c in cands)
    assert all(c.block_n <= cap or c == default for c in cands)
    assert all(unit % c.block_k == 0 or c.block_k == 16 for c in cands)  # a K tile never straddles scales


def test_packed_gemv_candidates():
    """A packed-code CUDA-core default (1 row over 4 experts) is timed against its K-split and
    prefetch variants and the tensor-core decode tiles with the weight as the register operand."""
    default = choose_forward_config(1, N, K, E, 4, 128)
    assert default.gemv and default.block_m == 1
    cands = autotune.forward_candidates(default, K, 128, packed=True)
    assert cands[0] == default and len(set(cands)) == len(cands) > 1
    assert {c.k_split for c in cands if c.gemv} == {1, 2} and any(c.w_lhs and not c.gemv for c in cands)
    assert all(c.decode and 128 % c.block_k == 0 for c in cands)
    g = torch.Generator().manual_seed(5)
    w = torch.randn(E, N, K, generator=g).half()
    x = torch.randn(1, K, generator=g).half()
    args = moe_ops.quantize_weight(w, "int4_asym", "group", 128).op_args()
    offs = torch.tensor([0, 0, 1, 1], dtype=torch.int32)
    ref = reference.grouped_mm(x, *args[:3], offs, *args[3:], "none", "none")
    for cfg, bk in dispatch._feasible(cands, 0, 2, 128, True):
        out = torch.full((1, N), float("nan"), dtype=torch.float16)
        y = dispatch.grouped_mm(x, *args[:3], offs, *args[3:], "none", "none", config=cfg, out=out)
        assert rel_err(y, ref) < 1e-3, cfg


def test_off_by_default_no_tuner(monkeypatch):
    monkeypatch.delenv("MOE_OPS_AUTOTUNE", raising=False)
    g = torch.Generator().manual_seed(1)
    x, w = torch.randn(20, K, generator=g).half(), torch.randn(E, N, K, generator=g).half()
    before = len(dispatch._TUNERS)
    dispatch.grouped_mm(x, w, None, None, ragged_offs(20, E, g), "none", "none", 0, "none", "none")
    assert len(dispatch._TUNERS) == before


def test_tuned_forward_matches_reference_and_keys_on_format_not_rows(monkeypatch):
    monkeypatch.setenv("MOE_OPS_AUTOTUNE", "1")
    monkeypatch.setattr(dispatch, "_TUNERS", {})
    # no TMA for x or W: the int4 tiles are the pointer-load ones the tuner serves
    monkeypatch.setattr(dispatch, "x_tma_possible", lambda x: False)
    monkeypatch.setattr(dispatch, "w_tma_possible", lambda w: False)
    g = torch.Generator().manual_seed(2)
    w = torch.randn(E, N, K, generator=g).half()
    for fmt, gran, M in (("int4_asym", "group", 40), ("int4_asym", "group", 44), ("int8_sym", "channel", 40)):
        x = torch.randn(M, K, generator=g).half()
        offs = ragged_offs(M, E, g, empty=(1,), tail=3)
        args = moe_ops.quantize_weight(w, fmt, gran, 128).op_args()
        y = dispatch.grouped_mm(x, *args[:3], offs, *args[3:], "none", "none")
        ref = reference.grouped_mm(x, *args[:3], offs, *args[3:], "none", "none")
        assert rel_err(y, ref) < 1e-3 and torch.all(y[int(offs[-1]):] == 0)
    # 40 and 44 rows (one decode bucket) share one tuning; the int8 weights get their own
    assert dispatch._TUNERS and sum(len(t.cache) for t in dispatch._TUNERS.values()) == 2


def test_tma_w_lhs_tiles_stay_out_of_the_tuner(monkeypatch):
    """int4 weight-only where x and W's codes can come by TMA (the interpreter emulates it): the
    static ``w_lhs`` TMA tile runs, tuner on or not, and no tuner is built for it."""
    monkeypatch.setenv("MOE_OPS_AUTOTUNE", "1")
    monkeypatch.setattr(dispatch, "_TUNERS", {})
    g = torch.Generator().manual_seed(7)
    w = torch.randn(E, N, K, generator=g).half()
    x = torch.randn(40, K, generator=g).half()
    offs = ragged_offs(40, E, g, empty=(1,), tail=3)
    args = moe_ops.quantize_weight(w, "int4_asym", "group", 128).op_args()
    assert autotune.keeps_static(choose_forward_config(40, N, K, E, 4, 128))
    y = dispatch.grouped_mm(x, *args[:3], offs, *args[3:], "none", "none")
    ref = reference.grouped_mm(x, *args[:3], offs, *args[3:], "none", "none")
    assert rel_err(y, ref) < 1e-3 and not dispatch._TUNERS


def test_tuned_expert_mlp_matches_composition(monkeypatch):
    from moe_ops import expert_mlp as em
    monkeypatch.setenv("MOE_OPS_AUTOTUNE", "1")
    g = torch.Generator().manual_seed(3)
    T, H, I, top_k = 9, 128, 64, 2
    logits = torch.randn(T, E, generator=g)
    tw, ids = torch.ops.moe_ops.topk_route(logits, top_k, "softmax", True)
    rows, offs = torch.ops.moe_ops.sort_rows(ids, E)
    x = torch.randn(T, H, generator=g).half()
    w1 = (torch.randn(E, 2 * I, H, generator=g) * H ** -0.5).half()
    w2 = (torch.randn(E, H, I, generator=g) * I ** -0.5).half()
    args = (x, tw, rows, offs, w1, None, None, w2, None, None, "none", "none", 0, 0, "none", "none")
    out = dispatch.expert_mlp(*args)
    assert rel_err(out, em.composed(*args)) < 2e-3


def test_tuned_expert_mlp_with_the_combine(monkeypatch):
    """Packed int4 at 1/8 row per expert: the table's token-major down launch (not tuned: the
    tuner's down candidates are row-tile launches) after a tuned gate/up launch that also
    writes the slot map."""
    from moe_ops import expert_mlp as em
    monkeypatch.setenv("MOE_OPS_AUTOTUNE", "1")
    g = torch.Generator().manual_seed(6)
    T, H, I, E16, top_k = 1, 128, 64, 16, 2
    tw, ids = torch.ops.moe_ops.topk_route(torch.randn(T, E16, generator=g), top_k, "softmax", True)
    rows, offs = torch.ops.moe_ops.sort_rows(ids, E16)
    x = torch.randn(T, H, generator=g).half()
    q1 = moe_ops.quantize_weight(torch.randn(E16, 2 * I, H, generator=g).half() * H ** -0.5, "int4_asym", "group", 32)
    q2 = moe_ops.quantize_weight(torch.randn(E16, H, I, generator=g).half() * I ** -0.5, "int4_asym", "group", 32)
    assert dispatch.expert_mlp_configs(T * top_k, H, I, E16, "int4_asym", "group", 32, 32, "none")[1].combine
    args = (x, tw, rows, offs, *q1.op_args()[:3], *q2.op_args()[:3], "int4_asym", "group", 32, 32, "none", "none")
    out = dispatch.expert_mlp(*args)
    assert rel_err(out, em.composed(*args)) < 2e-3


def test_fused_mlp_w_lhs_tma_tiles_stay_out_of_the_tuner(monkeypatch):
    """int4 at decode sizes (2 rows per expert): the fused MLP's gate/up launch takes the 16-row
    two-loop ``w_lhs`` tile with w1's codes by TMA (x gathered by pointers), its down launch the
    16-row ``w_lhs`` tile with x (the intermediate) and w2's codes by TMA (the interpreter emulates
    both); the tuner, whose candidates load by pointers, is offered neither; the result is the
    composition's."""
    from moe_ops import expert_mlp as em
    monkeypatch.setenv("MOE_OPS_AUTOTUNE", "1")
    offered = []
    orig = autotune.forward_candidates
    monkeypatch.setattr(autotune, "forward_candidates", lambda cfg, *a, **k: offered.append(cfg) or orig(cfg, *a, **k))
    g = torch.Generator().manual_seed(8)
    T, H, I, top_k = 4, 128, 64, 2
    tw, ids = torch.ops.moe_ops.topk_route(torch.randn(T, E, generator=g), top_k, "softmax", True)
    rows, offs = torch.ops.moe_ops.sort_rows(ids, E)
    x = torch.randn(T, H, generator=g).half()
    q1 = moe_ops.quantize_weight(torch.randn(E, 2 * I, H, generator=g).half() * H ** -0.5, "int4_asym", "group", 32)
    q2 = moe_ops.quantize_weight(torch.randn(E, H, I, generator=g).half() * I ** -0.5, "int4_asym", "group", 32)
    gate_up, down = dispatch.expert_mlp_configs(T * top_k, H, I, E, "int4_asym", "group", 32, 32, "none",
                                                down_tma=dispatch.down_tma_possible(x, q2.data, I))
    assert gate_up.tma and down.tma and autotune.keeps_static(down) and autotune.keeps_static(gate_up)
    seen = spy_tma_operands(monkeypatch)
    args = (x, tw, rows, offs, *q1.op_args()[:3], *q2.op_args()[:3], "int4_asym", "group", 32, 32, "none", "none")
    out = dispatch.expert_mlp(*args)
    assert offered == []
    assert seen == [(False, 1), (True, 1)], seen  # gate/up: W by TMA, x gathered; down: both by TMA
    assert rel_err(out, em.composed(*args)) < 2e-3


def test_explicit_config_is_never_tuned(monkeypatch):
    monkeypatch.setenv("MOE_OPS_AUTOTUNE", "1")
    g = torch.Generator().manual_seed(4)
    x, w = torch.randn(20, K, generator=g).half(), torch.randn(E, N, K, generator=g).half()
    before = len(dispatch._TUNERS)
    dispatch.grouped_mm(x, w, None, None, ragged_offs(20, E, g), "none", "none", 0, "none", "none",
                        config=KernelConfig(16, 16, 32, 4, 1))
    assert len(dispatch._TUNERS) == before
