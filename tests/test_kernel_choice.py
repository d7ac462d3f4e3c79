"""Invariants of the static tile table (``lowering/kernel_choice.py``) that the kernels rely on
but no timing shows: which launches may take the weight-as-register-operand (``w_lhs``) tiles,
and that the fused gate/up launch never gets a tile too large for its two accumulators."""
import itertools

import pytest

import torch

import moe_ops
from moe_ops.lowering import kernel_choice as kc
from moe_ops.lowering.kernel_choice import (KernelConfig, choose_expert_mlp_configs, choose_forward_config,
                                            choose_wgrad_config, choose_wgrad_fp8_config)

# (H, I, E, top_k): Qwen3-30B-A3B, DeepSeek-V3 with 32 local experts, Mixtral-8x7B
LAYERS = [(2048, 768, 128, 8), (7168, 2048, 32, 8), (4096, 14336, 8, 2)]
TOKENS = [1, 3, 8, 16, 64, 96, 128, 1000, 4096, 16384]
BITS = [16, 8, 4, 2]


def test_w_lhs_only_for_16_bit_activations_and_k_contiguous_weights():
    for (H, I, E, k), T, bits, act, contiguous in itertools.product(LAYERS, TOKENS, BITS, (16, 8), (True, False)):
        cfg = choose_forward_config(T * k, 2 * I, H, E, bits, 128, act_bits=act, k_contiguous=contiguous)
        if cfg.w_lhs:
            # the dgrad view (k_contiguous=False) and W8A8/W4A8 keep the plain kernel; plain
            # weights take it at decode sizes only, with x by TMA
            assert act == 16 and contiguous, cfg
            assert bits < 16 or (cfg.decode and cfg.tma), cfg
            assert not cfg.gemv


def test_plain_weights_decode_tile():
    """16-bit weights at decode sizes (over 1/8 row per expert, at most 16): the ``w_lhs`` tile
    with x and W by TMA where x can come by TMA and W is K-contiguous, 64-column K tiles four
    deep where K is short or over 8 rows per expert, else 128-column K tiles three deep; the
    16x32 pointer tile where x cannot come by TMA or for the dgrad view."""
    lhs64 = KernelConfig(16, 128, 64, 4, 4, group_m=1, w_lhs=True, tma=True)
    lhs128 = KernelConfig(16, 128, 128, 4, 3, group_m=1, w_lhs=True, tma=True)
    E, k = 128, 8  # Qwen3-30B-A3B: gate_up K 2048, down K 768
    for T, K, want in ((16, 2048, lhs128), (128, 2048, lhs128), (256, 2048, lhs64), (16, 768, lhs64),
                       (256, 768, lhs64)):
        assert choose_forward_config(T * k, 1536, K, E, 16, K) == want, (T, K)
        assert choose_forward_config(T * k, 1536, K, E, 16, K, x_tma=False) == KernelConfig(16, 32, 256, 4, 4,
                                                                                               group_m=1)
        assert not choose_forward_config(T * k, K, 1536, E, 16, 1536, k_contiguous=False, dgrad=True).w_lhs
    assert choose_forward_config(64 * 8, 4096, 7168, 32, 16, 7168) == lhs64  # DeepSeek-V3 E=32, 16 rows
    assert choose_forward_config(16 * 8, 4096, 7168, 32, 16, 7168) == lhs128  # 4 rows
    assert choose_forward_config(8, 1536, 2048, 128, 16, 2048).gemv  # Qwen3 T=1: the CUDA-core tile


def test_fused_gate_up_tiles_fit_two_accumulators():
    for (H, I, E, k), T, bits, act in itertools.product(LAYERS, TOKENS, BITS, (16, 8)):
        gate_up, down = choose_expert_mlp_configs(T * k, H, I, E, bits, 128, 128, act_bits=act)
        # two fp32 [BLOCK_M, BLOCK_N] accumulators (or one [BLOCK_M, 2 * BLOCK_N] with
        # one_loop): at most 128x128 each (256 rows or columns spill, see benchmarks/NOTES.md)
        assert gate_up.block_m * gate_up.block_n <= 128 * 128, (T, bits, act, gate_up)
        for cfg in (gate_up, down):
            assert not cfg.w_lhs or (bits < 16 and act == 16), (T, bits, act, cfg)
        assert not down.one_loop, down  # only a SwiGLU launch has gate and up rows


def test_packed_weight_only_prefill_takes_w_lhs_with_x_by_tma():
    """int4/int2 weight-only prefill (over 16 rows per expert) takes the ``w_lhs`` tile with x by
    TMA where x can come by TMA: 64 rows up to 64 rows per expert (``kc.MID_TILE_MAX_ROWS``);
    above, 128 rows where W's codes can come by TMA too (at most 128-row tiles take them:
    ``dispatch._tma_operands``), else 256 rows where an expert's weights are large or its rows
    many; the K tile inside a scale group. Decode sizes (16-row ``w_lhs``
    tiles) take TMA where both x and W's codes can. Without TMA for x (gathered rows, no TMA on the
    device, unaligned rows) and for the dgrad view the tiles stay as they were."""
    for (H, I, E, k), T, bits, w_tma in itertools.product(LAYERS, TOKENS, (4, 2), (True, False)):
        M, N = T * k, 2 * I
        rpe = M / E
        for unit in (32, 128, H):
            cfg = choose_forward_config(M, N, H, E, bits, unit, w_tma=w_tma)
            if cfg.decode and cfg.w_lhs:  # 16-row tiles: TMA where both x and W's codes can take it
                assert cfg.tma == (w_tma and cfg.block_k * bits % 128 == 0), (T, cfg)
            elif 16 < rpe <= kc.MID_TILE_MAX_ROWS:
                assert cfg == KernelConfig(64, 128, min(unit, 128), 4, 3, w_lhs=True, tma=True), (T, cfg)
            elif rpe > kc.MID_TILE_MAX_ROWS:
                assert cfg.w_lhs and cfg.tma and unit % cfg.block_k == 0, (T, cfg)
                # 128 rows wherever W's codes come by TMA (16-byte rows of the tile); else 256
                # for large experts or many rows
                big = rpe >= 512 or N * H >= 1 << 23
                w_box_ok = w_tma and cfg.block_k * bits % 128 == 0
                assert cfg.block_m == (256 if big and not w_box_ok else 128), (T, cfg)
            else:
                assert not cfg.tma, (T, cfg)
            gathered = choose_forward_config(M, N, H, E, bits, unit, x_tma=False)
            assert not gathered.tma, (T, gathered)
            assert cfg.gemv or (gathered.block_m, gathered.w_lhs) == (cfg.block_m, cfg.w_lhs) or rpe > 16
            assert not choose_forward_config(M, N, H, E, bits, unit, k_contiguous=False).tma


def test_packed_weight_only_decode_tile_width():
    """int4/int2 weight-only decode with x and W's codes by TMA: the 16-row ``w_lhs`` tile three
    deep, 128 columns wide where K is under 2048, or under 4096 with over 4 rows per expert, else
    64."""
    for (H, I, E, k), T, bits in itertools.product(LAYERS, TOKENS, (4, 2)):
        for N, K in ((2 * I, H), (H, I)):
            cfg = choose_forward_config(T * k, N, K, E, bits, 128)
            if not cfg.decode or cfg.gemv:
                continue
            wide = K < 2048 or (K < 4096 and T * k / E > 4)
            assert cfg == KernelConfig(16, 128 if wide else 64, 128, 4, 3, group_m=1, w_lhs=True, tma=True), (T, K)
    assert choose_forward_config(128 * 8, 1536, 2048, 128, 4, 128).block_n == 128  # Qwen3 gate_up T=128
    assert choose_forward_config(16 * 8, 1536, 2048, 128, 4, 128).block_n == 64  # T=16
    assert choose_forward_config(64 * 8, 4096, 7168, 32, 4, 128).block_n == 64  # DeepSeek-V3 E=32 T=64
    assert choose_forward_config(64 * 2, 28672, 4096, 8, 4, 128).block_n == 64  # Mixtral T=64


def test_8bit_weight_only_decode_takes_w_lhs_by_tma_where_k_is_short():
    """8-bit weight-only decode (16-row tiles) takes the 128-wide ``w_lhs`` tile with x and W's
    stored tile by TMA where both can come by TMA, K is under 2048 and there is over half a row
    per expert (Qwen3-30B-A3B down at T=16); elsewhere, and for W8A8 and the dgrad view, the
    plain 64-wide pointer tile with 256-column K tiles (or the widest K tile inside a scale unit)."""
    taken = 0
    for (H, I, E, k), T, (x_tma, w_tma), act, contiguous in itertools.product(
            LAYERS, TOKENS, ((True, True), (True, False), (False, True)), (16, 8), (True, False)):
        M = T * k
        for N, K in ((2 * I, H), (H, I)):
            for unit in (128, K):
                cfg = choose_forward_config(M, N, K, E, 8, unit, act_bits=act, k_contiguous=contiguous,
                                            x_tma=x_tma, w_tma=w_tma)
                if not cfg.decode:
                    continue
                if act == 16 and contiguous and x_tma and w_tma and K < 2048 and M / E > 0.5:
                    assert cfg == KernelConfig(16, 128, 128, 4, 3, group_m=1, w_lhs=True, tma=True), (T, K, cfg)
                    taken += 1
                else:
                    assert cfg == KernelConfig(16, 64, min(unit, 256), 4, 3, group_m=1), (T, K, act, cfg)
    assert taken


def test_8bit_weight_only_mid_rows_take_w_lhs_by_tma():
    """8-bit weight-only forward at 17-64 rows per expert (``kc.MID_TILE_MAX_ROWS``) takes the
    64-row ``w_lhs`` tile with x and W's stored tile by TMA where both can come by TMA; W8A8, the
    dgrad view and x or W without TMA keep the 64-row pointer tile there; above 64 rows neither
    takes a 64-row ``w_lhs`` tile."""
    taken = 0
    for (H, I, E, k), T, (x_tma, w_tma), act, contiguous in itertools.product(
            LAYERS, TOKENS, ((True, True), (True, False), (False, True)), (16, 8), (True, False)):
        for M in (T * k, 64 * E, 64 * E + 8):
            rpe = M / E
            if rpe <= kc.DECODE_MAX_ROWS_PER_EXPERT:
                continue
            for N, K in ((2 * I, H), (H, I)):
                for unit in (128, K):
                    cfg = choose_forward_config(M, N, K, E, 8, unit, act_bits=act, k_contiguous=contiguous,
                                                x_tma=x_tma, w_tma=w_tma)
                    if rpe > kc.MID_TILE_MAX_ROWS:
                        assert not (cfg.w_lhs and cfg.block_m == 64), (M, E, cfg)
                    elif act == 16 and contiguous and x_tma and w_tma:
                        assert cfg == KernelConfig(64, 128, 64, 4, 3, w_lhs=True, tma=True), (M, E, K, cfg)
                        taken += 1
                    else:
                        assert cfg == KernelConfig(64, 128, 64, 4, 4), (M, E, K, act, cfg)
    assert taken


def test_fused_down_takes_tma_at_decode_sizes_only():
    """The fused MLP's down launch (x the in-order intermediate) takes x and W by TMA where the
    caller says it can (``down_tma``), at decode sizes only (16-row ``w_lhs`` tiles); its
    prefill tiles and every gate/up tile are the same as without."""
    changed = 0
    for (H, I, E, k), T, bits in itertools.product(LAYERS, TOKENS, BITS):
        M = T * k
        g0, d0 = choose_expert_mlp_configs(M, H, I, E, bits, 128, 128)
        g1, d1 = choose_expert_mlp_configs(M, H, I, E, bits, 128, 128, down_tma=True)
        assert g0 == g1, (T, bits, g0, g1)
        if d1 != d0:
            assert d1.tma and not d0.tma and d1.decode and d1.w_lhs and M / E <= 16 and bits < 8, (T, bits, d1)
            changed += 1
    assert changed  # e.g. DeepSeek-V3 T=8, int4


def test_fused_gate_up_takes_w_by_tma_in_weight_only_two_loop_decode_tiles_only():
    """The gathered gate/up launch asks for W's codes by TMA (``tma``) in exactly its two-loop
    16-row ``w_lhs`` decode tiles of int4/int2 weight-only formats, 3 stages there, 128 columns
    from 4 rows per expert (64 below); every other gate/up tile (one loop, gemv, prefill, 8/16-bit
    weights, W4A8) asks for none."""
    seen = set()
    for (H, I, E, k), T, bits, act in itertools.product(LAYERS, TOKENS, BITS, (16, 8)):
        gate_up = choose_expert_mlp_configs(T * k, H, I, E, bits, 128, 128, act)[0]
        expect = gate_up.decode and gate_up.w_lhs and not gate_up.one_loop and bits < 8 and act == 16
        assert gate_up.tma == expect, (H, T, bits, act, gate_up)
        if expect:
            assert gate_up.num_stages == 3 and gate_up.block_m == 16, gate_up
            assert gate_up.block_n == (128 if T * k >= 4 * E else 64), (H, T, gate_up)
            seen.add((H, T))
    # DeepSeek-V3 T=8 (the case measured), Qwen3-30B-A3B T=16, Mixtral T=3
    assert {(7168, 8), (2048, 16), (4096, 3)} <= seen, seen


def test_w_lhs_launches_only_with_scales_constant_over_the_k_tile():
    from moe_ops.kernels.dispatch import _tile_k, _tile_meta
    cfg = KernelConfig(16, 64, 32, 4, 4, group_m=1, w_lhs=True)
    bk = _tile_k(cfg, 0, 4)  # int2 decode: 16 columns a sub-dot, 4 codes a byte -> 64
    assert bk == 64
    assert _tile_meta(cfg, bk, 64, 4, w_lhs_ok=True)["W_LHS"] is True
    # 32-column scale groups vary inside the 64-column K tile: the plain kernel serves it
    assert _tile_meta(cfg, bk, 32, 4, w_lhs_ok=True)["W_LHS"] is False
    assert _tile_meta(cfg, bk, 64, 4, w_lhs_ok=False)["W_LHS"] is False  # W8A8


def test_packed_gemv_tiles_only_where_the_word_reader_serves():
    """The packed-code CUDA-core tile reads one row per tile, 32-bit words of int4/int2 codes
    under 16-bit x, the scale constant over its K tile (a whole number of words): chosen only
    at decode sizes, for K-contiguous weights whose words are aligned (``packed_gemv``)."""
    for (H, I, E, k), T, bits, act, contiguous, words in itertools.product(
            LAYERS, TOKENS, BITS, (16, 8), (True, False), (True, False)):
        for unit in (32, 64, 128, H):
            cfg = choose_forward_config(T * k, 2 * I, H, E, bits, unit, act_bits=act, k_contiguous=contiguous,
                                        packed_gemv=words)
            if cfg.gemv and bits < 16:
                assert bits < 8 and act == 16 and contiguous and words, cfg
                assert cfg.block_m == 1 and unit % cfg.block_k == 0 and cfg.block_k % (32 // bits) == 0, cfg
                assert T * k <= 0.5 * E, (T, cfg)
        for words_down in (True, False):
            gate_up, down = choose_expert_mlp_configs(T * k, H, I, E, bits, 128, 128, act_bits=act, packed_gemv=words,
                                                      packed_gemv_down=words_down)
            if gate_up.gemv:
                assert bits < 8 and act == 16 and words and gate_up.block_m == 1, gate_up
                # weight words prefetched two steps ahead only at two K tiles a step and H >= 4096
                # (DeepSeek-V3's gate/up at T=1, benchmarks/NOTES.md session 29), else one
                assert gate_up.num_stages == (3 if gate_up.k_split == 2 and H >= 4096 else 2), (H, T, gate_up)
            # on the CUDA cores the down launch is only the token-major one with the combine
            assert down.combine == down.gemv, down
            if down.combine:  # 16-bit weights or packed codes, whose words the reader can take
                assert bits in (2, 4, 16) and act == 16 and words_down and down.block_m == 1 and down.k_split == 1, down
                assert T * k <= 0.125 * E and I <= 1024 and 128 % down.block_k == 0, (T, down)


def test_wgrad_tiles_fit_shared_memory():
    """The 16-bit wgrad's pipelined dy and x chunks fit an H100's 227 KB of shared memory a
    CTA at every layer and token count, and the wide 128x256 output tile is taken only above
    512 rows per expert (where it was measured faster)."""
    for (_H, _I, E, k), T in itertools.product(LAYERS, TOKENS):
        bm, bn, bk, _warps, stages = choose_wgrad_config(T * k, E)
        assert stages * bm * (bn + bk) * 2 <= 227 * 1024
        assert (bn > 128) == (T * k / E > 512)


def test_wgrad_fp8_tiles_fit_shared_memory():
    """The FP8 recipes' wgrad tiles (128-token fp8 chunks of dy and x) fit 227 KB of shared
    memory; the wide tile only for per-expert scales above 512 rows per expert."""
    for (_H, _I, E, k), T, per_expert in itertools.product(LAYERS, TOKENS, (False, True)):
        bn, bk, _warps, stages = choose_wgrad_fp8_config(T * k, E, per_expert)
        assert stages * 128 * (bn + bk) <= 227 * 1024
        assert (bn * bk > 128 * 128) == (per_expert and T * k / E > 512)


def test_fused_expert_mlp_pays_rule():
    """Weight-only quantized experts above 512 rows an expert run the composition, packed
    (int4/int2) ones above 16 where the composition's GEMMs take x by TMA (their 64/128-row
    prefill tiles), and 8-bit ones at 17-64 where they take x and W by TMA (the 64-row ``w_lhs``
    tile); 16-bit weights and quantized activations stay fused at every size."""
    assert kc.fused_expert_mlp_pays(32 * 1024, 32, 4, 16) is False  # DeepSeek-V3 T=4096: 1024 an expert
    assert kc.fused_expert_mlp_pays(32 * 1024, 32, 8, 16) is False
    assert kc.fused_expert_mlp_pays(32 * 1024, 128, 4, 16) is True  # Qwen3-30B-A3B: 256 an expert
    assert kc.fused_expert_mlp_pays(32 * 1024, 32, 16, 16) is True
    assert kc.fused_expert_mlp_pays(32 * 1024, 32, 8, 8) is True
    for M, E, bits, act_bits in itertools.product((8, 64 * 8, 96 * 8, 128 * 8, 256 * 8, 384 * 8, 4096 * 8),
                                                  (32, 128), (2, 4, 8, 16), (8, 16)):
        rpe = M / E
        weight_only = bits < 16 and act_bits == 16
        composed = weight_only and (rpe > 512 or (bits < 8 and rpe > 16))
        assert kc.fused_expert_mlp_pays(M, E, bits, act_bits, prefill_tma=True) is not composed, (M, E, bits)
        mid_8bit = weight_only and bits == 8 and 16 < rpe <= 64
        assert kc.fused_expert_mlp_pays(M, E, bits, act_bits, True, w_tma=True) is not (composed or mid_8bit)
        assert kc.fused_expert_mlp_pays(M, E, bits, act_bits, False, w_tma=True) is not (weight_only and rpe > 512)
        # the TMA tile each part defers to is the plain forward's at those rows
        if weight_only and (bits < 8 or mid_8bit):
            cfg = choose_forward_config(M, 1536, 2048, E, bits, 128, x_tma=True, w_tma=True)
            defers = rpe > kc.DECODE_MAX_ROWS_PER_EXPERT if bits < 8 else True
            assert (cfg.w_lhs and cfg.tma and cfg.block_m >= 64) == defers, cfg


def test_expert_mlp_dispatch_defers_to_the_composition():
    """``dispatch.expert_mlp`` returns None (the op then runs its composition) where the rule says
    so; no kernel is launched on the way (CPU tensors here)."""
    from moe_ops.kernels import dispatch
    E_, T_, k, H_, I_ = 2, 600, 2, 64, 32
    qw1, qw2 = (moe_ops.quantize_weight(torch.randn(E_, n, kk), "int4_asym", "group", 32)
                for n, kk in ((2 * I_, H_), (H_, I_)))
    r = moe_ops.route(torch.randn(T_, E_), k)
    out = dispatch.expert_mlp(torch.randn(T_, H_).bfloat16(), r.weights, r.sorted_rows, r.offs,
                              *qw1.op_args()[:3], *qw2.op_args()[:3], "int4_asym", "group", 32, 32, "none", "none")
    assert out is None


def test_expert_mlp_dispatch_defers_packed_prefill_where_x_comes_by_tma(monkeypatch):
    """int4 weight-only at 64 rows an expert: ``dispatch.expert_mlp`` hands the rule whether x can
    come by TMA; where it can (patched in: CPU tensors cannot), the op runs its composition."""
    from moe_ops.kernels import dispatch
    E_, T_, k, H_, I_ = 4, 128, 2, 64, 32
    qw1, qw2 = (moe_ops.quantize_weight(torch.randn(E_, n, kk), "int4_asym", "group", 32)
                for n, kk in ((2 * I_, H_), (H_, I_)))
    r = moe_ops.route(torch.randn(T_, E_), k)
    seen = []
    monkeypatch.setattr(dispatch, "x_tma_possible", lambda x: seen.append(tuple(x.shape)) or True)
    out = dispatch.expert_mlp(torch.randn(T_, H_).bfloat16(), r.weights, r.sorted_rows, r.offs,
                              *qw1.op_args()[:3], *qw2.op_args()[:3], "int4_asym", "group", 32, 32, "none", "none")
    assert out is None and seen == [(T_, H_)]


def test_fp8_dot_k_tiles_of_256_only_with_scales_constant_over_them():
    """fp8 x fp8 above 512 rows an expert takes 256-column K tiles (half the per-K-tile
    promotions) where x's and W's scales are constant over 256 columns, and the tile's three
    stages fit 227 KB of shared memory; int8 x int8, 1x128 / 128x128 block scales and the
    64-row tile at 512 rows an expert or fewer keep 128-column K tiles (above 64 rows an expert,
    where the 8-bit prefill tiles start)."""
    for (H, I, E, k), T in itertools.product(LAYERS, TOKENS):
        for K, N in ((H, 2 * I), (I, H)):
            rpe = T * k / E
            for unit in (128, K):
                cfg = choose_forward_config(T * k, N, K, E, 8, unit, act_bits=8, fp8_dot=True)
                int8 = choose_forward_config(T * k, N, K, E, 8, unit, act_bits=8)
                if rpe <= 64:  # decode and small tiles: fp8_dot changes nothing
                    assert cfg == int8, (T, cfg)
                    continue
                assert int8.block_k <= 128, int8
                assert cfg.num_stages * (cfg.block_m + cfg.block_n) * cfg.block_k <= 227 * 1024, cfg
                wide = rpe > 512 and unit == K and K % 256 == 0
                assert (cfg.block_k == 256) == wide, (T, K, unit, cfg)
                if wide:
                    assert unit % cfg.block_k == 0 and cfg == KernelConfig(128, 128, 256, 8, 3, tma=True)


def test_dispatch_marks_fp8_dots(monkeypatch):
    """``dispatch.grouped_mm`` asks for the fp8 x fp8 tiles exactly when x is cast to float8 and
    W holds float8 codes (CPU tensors: the spy stops the call before any launch)."""
    from moe_ops.kernels import dispatch

    class Stop(Exception):
        pass
    seen = []

    def spy(*a, **kw):
        seen.append(kw.get("fp8_dot"))
        raise Stop
    monkeypatch.setattr(dispatch, "choose_forward_config", spy)
    x, offs = torch.randn(12, 256).bfloat16(), torch.tensor([5, 12], dtype=torch.int32)
    w = torch.randn(2, 64, 256)
    for fmt, gran, act in (("fp8_e4m3", "channel", "fp8_token"), ("fp8_e5m2", "tensor", "fp8_token"),
                           ("fp8_e4m3", "block", "fp8_1x128"), ("int8_sym", "channel", "int8_token"),
                           ("fp8_e4m3", "channel", "none")):
        wd, ws, wz, f, g, gs = moe_ops.quantize_weight(w, fmt, gran, 0).op_args()
        with pytest.raises(Stop):
            dispatch.grouped_mm(x, wd, ws, wz, offs, f, g, gs, act, "none")
    assert seen == [True, True, True, False, False]
