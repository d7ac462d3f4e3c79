"""Kernel choice from static shapes: decode or prefill kernel shape, and its tile configuration.

Everything here reads only static facts (M as an upper bound of rows, E, N, K, formats), never
device data, so a compiled graph makes the choice once. Under dynamic shapes M is a symbolic
size: its size hint picks the bucket (Inductor guards the specialisation like any size hint).
"""
from __future__ import annotations

from dataclasses import dataclass, replace


@dataclass(frozen=True)
class KernelConfig:
    """Tile configuration of the grouped GEMM kernel family."""

    block_m: int
    block_n: int
    block_k: int
    num_warps: int
    num_stages: int
    group_m: int = 8  # M tiles that walk the N tiles together (L2 reuse of weight tiles)
    gemv: bool = False  # CUDA-core tile (weight-only decode, W contiguous along K); else tl.dot
    # weight-only formats and plain weights under 16-bit x: the (dequantized) weight tile is the
    # MMA's left (register) operand, the output tile computed transposed (grouped_gemm._dequant_acc_w_lhs)
    w_lhs: bool = False
    # SwiGLU launches (fused expert MLP gate/up): gate and up rows in one K loop, one
    # [block_m, 2 * block_n] accumulator (x read once per K tile); else two K loops
    one_loop: bool = False
    # packed-code gemv tiles: K tiles a loop step, side by side across warps (more warps a row
    # block; the partial sums are added after the loop)
    k_split: int = 1
    # the fused expert MLP's down launch token-major (16-bit or packed-code gemv tiles): one program per
    # token and column block sums the token's top_k slots side by side, so the [T * top_k, H]
    # rows and the combine's separate reduction are gone (grouped_gemm COMBINE)
    combine: bool = False
    # the fused expert MLP's row-tile down launch sums each token's top_k slot rows itself: the last
    # program of each column block (counted on int32 counters that the gate/up launch zeroes) adds
    # them in slot order into the [T, H] output, so the separate reduction launch is gone
    # (grouped_gemm SLOT_SUM)
    slot_sum: bool = False
    # tensor-core tiles (plain, unpacked formats): x and W tiles loaded through TMA descriptors
    # where the device has TMA (CUDA capability >= 9) and the operands' layout allows
    # (dispatch._tma_operands); elsewhere the same tile with pointer loads
    tma: bool = False
    # the persistent kernel (moe_ops.kernels.persistent_gemm HALF_M): an expert's last row tile
    # that holds at most block_m // 2 rows runs as a block_m // 2 row tile (half the MMA work)
    half_m: bool = False

    @property
    def decode(self) -> bool:
        return self.block_m <= 16


# 16-bit weights at decode on the CUDA cores (KernelConfig.gemv) up to this many rows per
# expert, in the plain grouped GEMM. benchmarks/tune_forward.py --gemv on an H100
# (results/tune_decode_gemv_h100.json): at Qwen3-30B-A3B T=1 (1/16 row per expert) the gemv
# tile took 29.5 us against 34.3 (gate_up) and 20.4 against 29.1 (down); DeepSeek-V3 T=1
# (1/4 row per expert) 159 against 163. At one row per expert (T=16) it was 2-4x slower, and
# at half a row (Qwen3 T=8) the layer lost 28%
# (results/moe_layer_h100_gemv_in_fused_mlp_rejected.json); for 8/4-bit weights it was
# 1.5-3x slower at T=1 and up to 18x at T=16 (each code costs more on the CUDA cores than
# the tensor-core path's dequantize + MMA). The fused expert MLP keeps its tuned tensor-core
# decode tiles (its gemv variant measured 67 us against 53 for the bf16 Qwen3 layer at T=1).
GEMV_MAX_ROWS_PER_EXPERT = 0.125


def _gemv_config(K: int) -> KernelConfig:
    """The CUDA-core decode tile for 16-bit weights, one row per M tile (measured best)."""
    if K >= 2048:
        return KernelConfig(1, 16, 256, 2, 1, group_m=1, gemv=True)
    return KernelConfig(1, 32, 128, 2, 1, group_m=1, gemv=True)


# decode tiles (16-row M tiles, weight streaming) up to this many rows per expert; above, int4/int2
# weight-only with x by TMA takes the prefill ``w_lhs`` tiles (``choose_forward_config``), W's
# codes by TMA where aligned: 64 rows up to MID_TILE_MAX_ROWS rows per expert, 128 (or 256) above
DECODE_MAX_ROWS_PER_EXPERT = 16
# prefill forward tiles of 64 rows (M) up to this many rows per expert, of 128 or 256 above
MID_TILE_MAX_ROWS = 64


def rows_per_expert_hint(M: int, E: int) -> float:
    return M / max(E, 1)


def choose_wgrad_config(M: int, E: int) -> tuple:
    """``(BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages)`` of the 16/32-bit grouped wgrad
    (:func:`moe_ops.kernels.grouped_wgrad.launch_wgrad`) for ``M`` rows over ``E`` experts.
    ``benchmarks/tune_backward.py --kinds wgrad_tma`` on an H100 (results/tune_wgrad_tma_h100_s14.log,
    TMA row chunks): 128x128 output tiles (two CTAs an SM) up to 512 rows per expert
    (Qwen3-30B-A3B gate_up 0.618 ms against 0.654 with 128x256), 128x256 tiles above (more MMA
    per loaded chunk: DeepSeek-V3 E=32, 1024 rows per expert, 3.91 -> 3.59 ms)."""
    if rows_per_expert_hint(M, E) > 512:
        return (64, 256, 128, 8, 3)
    return (64, 128, 128, 8, 3)


def choose_wgrad_fp8_config(M: int, E: int, per_expert: bool) -> tuple:
    """``(BLOCK_N, BLOCK_K, num_warps, num_stages)`` of the FP8 recipes' wgrad
    (:func:`moe_ops.kernels.grouped_wgrad.launch_wgrad_fp8`; 128-token chunks).
    ``benchmarks/tune_recipes.py`` on an H100 (results/tune_recipes_h100.json, CUDA graphs):
    per-block scales (``fp8_blockwise``) favour two CTAs an SM, 128x64 tiles with 4 warps
    (Qwen3-30B-A3B gate_up 0.795 ms; DeepSeek-V3 E=32 within 1% of the best); per-expert scales
    (``fp8_rowwise``) 128x128 up to 512 rows per expert (Qwen3-30B-A3B gate_up 0.549 ms against
    0.564 with 128x256), 128x256 above (DeepSeek-V3 E=32: 2.48 -> 2.35 ms). Re-swept with the
    tiles by TMA (results/tune_wgrad_fp8_tma_s18_h100.json): these tiles gain 1-6% from TMA and
    stay within 4% of the best TMA tile at every shape and recipe."""
    if not per_expert:
        return (128, 64, 4, 4)
    if rows_per_expert_hint(M, E) > 512:
        return (128, 256, 8, 3)
    return (128, 128, 8, 3)


def _block_k(K: int, scale_k_unit: int, pref: int) -> int:
    """Largest power of two <= pref dividing the scale unit along K (so a K tile never straddles
    two scale units), at least 16."""
    bk = pref
    while bk > 16 and scale_k_unit % bk != 0:
        bk //= 2
    return bk


# packed int4/int2 weight-only decode on the CUDA cores (KernelConfig.gemv: codes read as 32-bit
# words, grouped_gemm._gemv_packed_acc) up to this many rows per expert. benchmarks/tune_forward.py
# --packed-gemv on an H100 (results/tune_packed_gemv_h100.*), int4 g128, CUDA-graph timed, against
# the w_lhs tensor-core decode tile: T=1 Qwen3-30B-A3B gate_up 11.7 us against 15.2 (session 8's
# table time; not in this sweep's top 4), down 7.5 against 8.0, DeepSeek-V3 E=32 75.2 against 82.4,
# Mixtral 73.8 against 76.9; at one row per expert or more (T=16) 2.2-2.4x slower (each row re-reads
# its expert's weights). The fused expert MLP's gate/up launch: results/tune_moe_layer_gemv_h100.log.
PACKED_GEMV_MAX_ROWS_PER_EXPERT = 0.5


def _packed_gemv_config(K: int, scale_k_unit: int) -> KernelConfig:
    """The packed-code CUDA-core decode tile: one row, 32 columns, two K tiles a loop step
    (k_split, 2 warps each), the weight words prefetched two steps ahead where K >= 4096 (else
    one), the K tile within a scale group. tune_forward.py --packed-gemv with k_split
    (results/tune_packed_gemv_k_split_h100.*), T=1: Qwen3-30B-A3B gate_up 11.4 -> 11.1 us,
    down 7.5 -> 7.2, DeepSeek-V3 E=32 75.2 -> 63.7, Mixtral 73.8 -> 64.7 against k_split 1."""
    return KernelConfig(1, 32, _block_k(K, scale_k_unit, 128), 4, 3 if K >= 4096 else 2, group_m=1, gemv=True,
                        k_split=2)


def choose_forward_config(M: int, N: int, K: int, E: int, w_bits: int, scale_k_unit: int,
                          act_bits: int = 16, k_contiguous: bool = True, packed_gemv: bool = True,
                          dgrad: bool = False, fp8_dot: bool = False, x_tma: bool = True,
                          w_tma: bool = True) -> KernelConfig:
    """The forward tile config for ``M`` rows (a static upper bound), ``E`` experts, ``[N, K]``
    weights of ``w_bits`` bits, scales constant over ``scale_k_unit`` columns of K, activations
    of ``act_bits`` bits; ``k_contiguous``: the weights' stored K stride is 1 (forward; the
    transposed dgrad view is not), as the gemv and ``w_lhs`` tiles were measured;
    ``packed_gemv``: packed codes can be read as 32-bit words (``dispatch.gemv_layout_ok``);
    ``dgrad``: the launch is dgrad's, over the transposed weight view; ``fp8_dot``: x and W are
    both float8 (each K tile's tensor-core product is promoted into the float32 tile);
    ``x_tma``: x's tiles can come by TMA descriptors (a device with TMA, x's rows read in order,
    not gathered, and 16-byte aligned; ``dispatch.x_tma_possible``); ``w_tma``: W's stored
    ``[E, N, K / PACK]`` can (``dispatch.w_tma_possible``). The table comes from
    ``benchmarks/tune_forward.py`` (its ``--gemv``, ``--packed-gemv``, ``--w-lhs`` and ``--tma``
    sweeps) on an H100."""
    rpe = rows_per_expert_hint(M, E)
    if w_bits == 16 and k_contiguous and rpe <= GEMV_MAX_ROWS_PER_EXPERT:
        return _gemv_config(K)
    if (w_bits < 8 and act_bits == 16 and k_contiguous and packed_gemv
            and rpe <= PACKED_GEMV_MAX_ROWS_PER_EXPERT):
        return _packed_gemv_config(K, scale_k_unit)
    if rpe <= DECODE_MAX_ROWS_PER_EXPERT:  # decode: weight streaming, each weight tile used by one M tile
        if w_bits == 16:
            if act_bits == 16 and k_contiguous and x_tma:
                # plain 16-bit weights: the weight tile as the MMA's left operand (w_lhs), x and W by
                # TMA (tune_forward.py --tma --tma-w --variants bf16, results/tune_w_lhs_bf16_decode_
                # h100_s36.log, CUDA-graph timed, bit-equal with W by pointers) against the 16x32x256
                # pointer tile: 64-column K tiles four deep where K is short or over 8 rows per expert,
                # Qwen3-30B-A3B down (K 768) T=16 (1 row per expert) 53.7 -> 40.2 us, T=128 108.4 ->
                # 71.7, T=256 159.0 -> 91.7, gate_up T=256 (16 rows) 224.0 -> 160.7, DeepSeek-V3 E=32
                # T=64 (16) 683 -> 589, Mixtral T=64 973 -> 942; 128-column K tiles three deep at up
                # to 8 rows, Qwen3 gate_up T=16 81.5 -> 72.8, T=128 157.8 -> 131.5, DeepSeek-V3 T=16
                # (4 rows) 394.9 -> 393.5, Mixtral T=16 375.8 -> 376.9 (even)
                if K < 2048 or rpe > 8:
                    return KernelConfig(16, 128, _block_k(K, scale_k_unit, 64), 4, 4, group_m=1, w_lhs=True, tma=True)
                return KernelConfig(16, 128, _block_k(K, scale_k_unit, 128), 4, 3, group_m=1, w_lhs=True, tma=True)
            return KernelConfig(16, 32, _block_k(K, scale_k_unit, 256), 4, 4, group_m=1)
        if w_bits == 8:
            if act_bits == 16 and k_contiguous and x_tma and w_tma and K < 2048 and rpe > 0.5:
                # 8-bit weight-only, short K, over half a row per expert: the weight as the
                # register operand, x and W's stored tile by TMA (tune_forward.py --tma --tma-w,
                # results/tune_tma_w_decode_8bit{,_more}_h100_s22.*, CUDA-graph timed, bit-equal
                # to pointer loads), Qwen3-30B-A3B down (K 768), int8 / fp8 channel: T=16 (1 row
                # per expert) 32.5 -> 28.7 / 30.8 -> 25.7 us, T=64 47.2 -> 43.1 / 45.3 -> 37.5,
                # T=256 (16 rows) 98.4 -> 85.1 / 83.9 -> 59.7. Not at T=1 (8.0 against 8.6 us,
                # 6.8 against 7.4) nor where K is long (Qwen3 gate_up, DeepSeek-V3: within 2%
                # or slower), which keep the pointer tile below
                return KernelConfig(16, 128, _block_k(K, scale_k_unit, 128), 4, 3, group_m=1, w_lhs=True, tma=True)
            return KernelConfig(16, 64, _block_k(K, scale_k_unit, 256), 4, 3, group_m=1)
        # int4/int2: the dequantized weight as the MMA's register operand (w_lhs), graph-timed
        # on an H100 (results/tune_w_lhs_int4_h100.log, benchmarks/tune_forward.py --w-lhs): T=1
        # Qwen3-30B-A3B gate_up 27.6 -> 23.3 us, DeepSeek-V3 E=32 156 -> 118 us, Mixtral 123 ->
        # 96 us; T=16 77 -> 51 us, 339 -> 254 us, 296 -> 224 us. 64-wide tiles, 128-wide where
        # K is short (Qwen3 down, K 768: 13.4 -> 12.4 us at T=1, 29.0 -> 26.1 at T=16)
        if act_bits == 16 and k_contiguous:
            bk = _block_k(K, scale_k_unit, 128)
            if x_tma and w_tma and bk * w_bits % 128 == 0:
                # x and W's codes by TMA (tune_forward.py --tma --tma-w --tokens 16 1, results/
                # tune_tma_w_decode_h100_s20.*, CUDA-graph timed, bit-equal to the pointer
                # tiles), T=16: Qwen3-30B-A3B gate_up 43.0 -> 35.8 us, down 27.6 -> 20.7,
                # DeepSeek-V3 E=32 218 -> 161, Mixtral 183 -> 159; three stages (four: 37.9,
                # 166, 162 us). 128 columns where K is short, and where K is under 4096 above 4
                # rows per expert (results/tune_tma_w_decode_int4*_h100_s37.log: Qwen3 gate_up,
                # K 2048, T=128 (8 rows) 86.7 -> 82.7 us, T=256 (16) 132.2 -> 126.0, at T=16 (1
                # row) 35.2 against 37.8; at 16 rows Mixtral, K 4096, 399.6 against 397.2, and
                # DeepSeek-V3 E=32, K 7168, 318.2 against 325.6, keep 64). 64-column K tiles lost
                # everywhere (Qwen3 gate_up T=16 46.3 us and more, down T=16 22.2 against 20.1)
                wide = K < 2048 or (K < 4096 and rpe > 4)
                return KernelConfig(16, 128 if wide else 64, bk, 4, 3, group_m=1, w_lhs=True, tma=True)
            if K < 2048:
                return KernelConfig(16, 128, bk, 4, 3, group_m=1, w_lhs=True)
            return KernelConfig(16, 64, bk, 4, 4, group_m=1, w_lhs=True)
        # int8 activations (W4A8): results/tune_int4_decode_h100.json (weight-only then), 64-wide
        # tiles at most half a row per expert, 128-wide above
        if rpe <= 0.5:
            return KernelConfig(16, 64, _block_k(K, scale_k_unit, 128), 4, 4, group_m=1)
        return KernelConfig(16, 128, _block_k(K, scale_k_unit, 128), 4, 3, group_m=1)
    if act_bits == 16 and w_bits < 8 and k_contiguous and x_tma:  # above the decode rows
        if rpe <= MID_TILE_MAX_ROWS:
            # 17-64 rows per expert: the 64-row M tile, the dequantized weight as the register
            # operand, x and W's codes by TMA (tune_forward.py --tma --tma-w, TMA_W_MID; int4 g128,
            # CUDA-graph timed, bit-equal with W by pointers). results/tune_tma_w_mid_int4_h100_s33.log,
            # against the 64-row pointer tile: Qwen3-30B-A3B gate_up T=384 (24 rows) 0.205 -> 0.125
            # ms, T=512 (32) 0.257 -> 0.157 (the 128-row tile: 0.188), down 0.108 -> 0.067, 0.135
            # -> 0.083; DeepSeek-V3 E=32 T=128 (32) 0.772 -> 0.412; with W by pointers (unaligned
            # codes) still 0.145, 0.184, 0.079, 0.099, 0.497. results/tune_tma_w_mid_int4_s35_*.log,
            # against the 128-row tile below: Qwen3 T=768 (48 rows, H100) gate_up 0.205 -> 0.190,
            # down 0.109 -> 0.100; T=1024 (64, H200) 0.263 -> 0.242, 0.140 -> 0.128; DeepSeek-V3
            # T=192 (48, H200) 0.616 -> 0.549, T=256 (64) 0.666 -> 0.601
            return KernelConfig(64, 128, _block_k(K, scale_k_unit, 128), 4, 3, w_lhs=True, tma=True)
        # int4/int2 weight-only prefill: the dequantized weight as the register operand (w_lhs),
        # x's tiles by TMA, and W's stored codes too where a 16-byte multiple. tune_forward.py
        # --tma (results/tune_tma_x_weight_only_h100_s20.*, eager, x by TMA, bit-equal to the
        # pointer-load twins) against the previous table's tiles in the same run: T=4096
        # Qwen3-30B-A3B gate_up 0.877 -> 0.665 ms, down 0.472 -> 0.371, DeepSeek-V3 E=32 6.04 ->
        # 4.85, Mixtral 5.96 -> 4.73; T=1024 (64 / 256 rows per expert) 0.404 -> 0.304, 0.212 ->
        # 0.168, 2.44 -> 1.72, 2.18 -> 1.83. With W's codes by TMA as well (tune_forward.py --tma
        # --tma-w, results/tune_tma_w_h100_s20.*) the 128-row tile: Qwen3 gate_up 0.662 -> 0.572
        # ms, DeepSeek-V3 5.57 -> 4.76, Mixtral 7.32 -> 4.69 (the 256-row tiles, x alone by TMA:
        # 4.88 / 4.71; with W by TMA they came out wrong: dispatch._tma_operands). Without W by
        # TMA, 256-row tiles where each expert's weights are large (N * K >= 2^23: each extra M
        # tile re-reads them) or rows per expert many, 128 rows where experts are small and
        # tiles ragged (Qwen3: 0.665 against 0.689). Only with x by TMA: the 128-row tile with
        # pointer loads took 1.07 ms at Qwen3 gate_up (results/tune_tma_x_int4_qwen3_more_h100_s20.log),
        # slower than the tiles below
        bk = _block_k(K, scale_k_unit, 64)
        if not (w_tma and bk * w_bits % 128 == 0) and (rpe >= 512 or N * K >= 1 << 23):
            return KernelConfig(256, 128, bk, 8, 4, w_lhs=True, tma=True)
        return KernelConfig(128, 128, bk, 8, 3, w_lhs=True, tma=True)
    if act_bits == 16 and w_bits == 8 and k_contiguous and x_tma and w_tma and rpe <= MID_TILE_MAX_ROWS:
        # 8-bit weight-only at 17-64 rows per expert: the 64-row w_lhs tile with x and W's stored
        # tile (int8 codes, fp8 values) by TMA (tune_forward.py --tma --tma-w, TMA_W_MID;
        # results/tune_tma_w_mid_8bit_h100_s34.log, CUDA-graph timed, bit-equal with W by
        # pointers), against the 64-row pointer tile below, int8 / fp8 channel: Qwen3-30B-A3B
        # gate_up T=384 (24 rows) 0.140 -> 0.129 / 0.120 -> 0.102 ms, T=1024 (64) 0.272 -> 0.256 /
        # 0.237 -> 0.204, down T=384 0.080 -> 0.068 / 0.070 -> 0.064, T=1024 0.152 -> 0.134 /
        # 0.128 -> 0.112; DeepSeek-V3 E=32 T=128 (32) 0.442 -> 0.399 / 0.428 -> 0.309. With W by
        # pointers the same tile lost (Qwen3 gate_up T=384 int8 0.151, fp8 0.143)
        return KernelConfig(64, 128, _block_k(K, scale_k_unit, 64), 4, 3, w_lhs=True, tma=True)
    if rpe <= MID_TILE_MAX_ROWS:
        return KernelConfig(64, 128, _block_k(K, scale_k_unit, 64), 4, 4)
    if act_bits == 8 and w_bits == 8 and scale_k_unit >= 128:  # fp8 x fp8 (or int8) with wide K tiles
        # benchmarks/tune_recipes.py (forward and dgrad of both FP8 recipes, H100): 64-row
        # tiles up to 512 rows per expert (Qwen3-30B-A3B: 5-15% faster than 128x128x128/8/3),
        # 128-row tiles with 4 stages above (DeepSeek-V3 E=32: 2-5%); W8A8 inference shares them.
        # TMA loads (KernelConfig.tma; benchmarks/tune_forward.py --tma, results/tune_tma_h100.*):
        # the 128-row tile fp8 W8A8 DeepSeek-V3 E=32 T=4096 2.70 -> 2.60 ms. The 64-row tile
        # too since the one-FMA promotion (SCALE_UNIFORM_N; tune_recipes.py --only fwd_,
        # CUDA-graph timed, results/tune_recipes_fwd_h100_s14.log): Qwen3-30B-A3B gate_up
        # blockwise 0.447 -> 0.411 ms, rowwise 0.427 -> 0.384, down 0.272 -> 0.234 / 0.268 -> 0.233
        # (session 12's eager timing had it slower at down: the descriptors' host cost)
        if rpe <= 512:
            return KernelConfig(64, 128, _block_k(K, scale_k_unit, 128), 4, 3, tma=True)
        if fp8_dot and _block_k(K, scale_k_unit, 256) == 256:
            # fp8 x fp8 with scales constant over 256 columns (fp8_token x, channel or tensor W):
            # 256-column K tiles halve the promotions, each of which waits for its wgmma to
            # finish. tune_forward.py --fp8-promotion (results/tune_fp8_promotion_h100_s17.*, the
            # GEMM alone, CUDA-graph timed, T=4096): DeepSeek-V3 E=32 2.36 -> 2.12 ms (1.00x of
            # torch._scaled_grouped_mm on the same codes), Mixtral 2.49 -> 2.21 ms; relative
            # error against the float64 product of the codes 3.07e-3 against 3.06e-3 with
            # 128-column tiles (the peer: 3.06e-3). At 256 rows per expert (Qwen3-30B-A3B) the
            # 64-row 128-column tile stays faster (0.325 against 0.350 ms)
            return KernelConfig(128, 128, 256, 8, 3, tma=True)
        return KernelConfig(128, 128, _block_k(K, scale_k_unit, 128), 8, 4, tma=True)
    if act_bits == 16 and w_bits < 16 and k_contiguous and rpe >= 512:
        # weight-only formats, many rows per expert: 256-row tiles with the dequantized weight
        # as the register operand (results/tune_w_lhs_int4_h100.log, tune_w_lhs_fp8_h100.json),
        # T=4096: int4 g128 DeepSeek-V3 E=32 7.55 -> 6.03 ms, Mixtral 7.05 -> 5.98 ms; fp8
        # channel DeepSeek-V3 4.53 -> 4.01 ms. At 256 rows per expert (Qwen3-30B-A3B) the
        # ragged experts' part-filled 256-row tiles cost what the operand saves (int4 gate_up
        # 0.873 -> 0.857 ms, down 0.472 -> 0.632 ms; fp8 gate_up 0.583 -> 0.607 ms)
        return KernelConfig(256, 128, _block_k(K, scale_k_unit, 64), 8, 3, w_lhs=True)
    if act_bits == 8 or w_bits < 8:
        return KernelConfig(128, 128, _block_k(K, scale_k_unit, 64), 4, 4)
    # x and W tiles by TMA (Hopper; int8 codes keep pointer loads, dispatch._tma_operands) where
    # they measured faster: tune_forward.py --tma (results/tune_tma_h100_run*.json), T=4096,
    # against the same tiles' pointer loads. bf16 dgrad (the transposed view), in every run and
    # both routings: Qwen3-30B-A3B gate_up 0.502 -> 0.480 ms, down 0.256 -> 0.240, DeepSeek-V3
    # E=32 3.51 -> 3.07; with four stages up to 512 rows per expert (gate_up 0.461, down 0.234),
    # three above (DeepSeek-V3: 3.05 against 3.12 with four). fp8 weight-only (16-bit x):
    # Qwen3-30B-A3B gate_up 0.57 -> 0.53 ms, down 0.339 -> 0.304. int8 weight-only codes take x
    # alone by TMA here (since session 20; results/tune_tma_x_weight_only_h100_s20.*: Qwen3-30B-A3B
    # gate_up 0.624 -> 0.633 ms, down 0.371 -> 0.352, DeepSeek-V3 / Mixtral at T=1024 within 2%).
    # Not the bf16 forward: its
    # TMA tile won or lost with the routing (DeepSeek-V3 E=32 3.14 -> 3.04 ms with one skewed
    # router, 3.00 -> 3.27 with another; Qwen3-30B-A3B within 2% either way)
    if w_bits == 16:
        if dgrad:
            return KernelConfig(128, 256, _block_k(K, scale_k_unit, 64), 8, 4 if rpe <= 512 else 3, tma=True)
        return KernelConfig(128, 256, _block_k(K, scale_k_unit, 64), 8, 3)
    return KernelConfig(128, 128, _block_k(K, scale_k_unit, 64), 8, 3, tma=True)


def choose_persistent_config(M: int, N: int, K: int, E: int, dgrad: bool = False, fp8_dot: bool = False,
                             int8_dot: bool = False):
    """The tile of the persistent grouped GEMM (:mod:`moe_ops.kernels.persistent_gemm`: 16-bit
    plain weights, TMA tiles, one program per SM over the flattened tile and K loops) for ``M``
    rows over ``E`` experts, ``[N, K]`` weights, or None where the one-program-a-tile kernel
    (:func:`choose_forward_config`) stays the choice: decode sizes (64 rows per expert or fewer,
    where tiles stream weights), and dgrad above 512 rows per expert.
    ``benchmarks/probe_persistent.py`` on an H100 (results/probe_persistent_h100_s19*, T=4096,
    CUDA-graph timed, two runs; 128x256x64 tiles, 8 warps, against ``choose_forward_config``'s
    tile in the same run): forward Qwen3-30B-A3B gate_up 485 -> 454 us / 496 -> 465 (4
    stages), down 290 -> 258 / 292 -> 251, DeepSeek-V3 E=32 3127 -> 2937 / 3190 -> 2966 (3
    stages), Mixtral 3226 -> 2973 / 3303 -> 3017 (3 stages; 4 stages measured 3716 in the
    second run); dgrad Qwen3-30B-A3B gate_up 485 -> 465 / 501 -> 472, down 254 -> 244 / 255
    -> 250 (4 stages); at 1024 rows per expert the dgrad moved -2% to +7% (DeepSeek-V3 3047 ->
    2981 / 3106 -> 3011, Mixtral 2989 -> 3207 / 3056 -> 3037): kept one program a tile.
    ``fp8_dot``: float8 x and W, scales constant along K (the kernel's ``ACT`` 2 path): above 512
    rows per expert, :func:`choose_forward_config`'s 128x128x256 tile, persistent
    (``probe_persistent.py --fp8``, results/probe_persistent_fp8_h100_s19.*, the GEMM alone,
    bit-equal to the one-program-a-tile kernel at that tile): DeepSeek-V3 E=32 2108 -> 1988 us
    (``torch._scaled_grouped_mm`` 2055 in the same run), Mixtral 2296 -> 2100 (2120); at 256 rows
    per expert (Qwen3-30B-A3B) 0-2%: the 64-row tile stays.
    ``int8_dot``: int8 x and W codes (``int8_token`` x, ``int8_sym`` W), scales constant along K
    (the kernel's int32 path): above 64 rows per expert, 128x256x128 tiles, 8 warps, 3 stages.
    ``probe_persistent.py --int8`` (results/probe_persistent_int8_h100_s23.*, the GEMM alone,
    CUDA-graph timed, T=4096, bit-equal to the one-program-a-tile kernel) against that kernel's
    table tile (64x128x128 up to 512 rows per expert, 128x128x128 above): Qwen3-30B-A3B gate_up
    326.7 -> 284.0 us, down 207.1 -> 175.3, DeepSeek-V3 E=32 2369 -> 1761, Mixtral 2492 -> 1871;
    the best of eight persistent tiles at every shape (128x128x256: 346 / 268 / 1874 / 1960)."""
    rpe = rows_per_expert_hint(M, E)
    if int8_dot:
        return KernelConfig(128, 256, 128, 8, 3) if rpe > 64 and not dgrad else None
    if fp8_dot:
        return KernelConfig(128, 128, 256, 8, 3) if rpe > 512 and not dgrad and K % 256 == 0 else None
    if rpe <= 64 or (dgrad and rpe > 512):
        return None
    return KernelConfig(128, 256, 64, 8, 4 if rpe <= 512 else 3)


# the fused expert MLP's down launch token-major with the combine (KernelConfig.combine) up to
# this many rows per expert and this expert intermediate size (the down launch's K): each slot
# reads its expert's weights (as the gemv tiles do), and a program runs top_k * K codes.
# benchmarks/tune_moe_layer.py --combine, int4 g128, the fused MLP graph-timed on an H100
# (results/tune_combine_h100.log): Qwen3-30B-A3B (I 768) T=1 20.8 us against more than 21.6
# with the w_lhs row-tile down launch and its separate sum, T=2 33.7 against more than 34.3;
# DeepSeek-V3 E=32 (I 2048) T=1 120.3 against 108.5 (the row tile wins there); at Qwen3 T=4
# (1/4 row per expert) the two were even (61.1 / 60.2 us, before a register fix of this tile).
# 16-bit weights take it within the same bounds (measured at Qwen3 T=1 and 2: _combine16_config)
COMBINE_MAX_ROWS_PER_EXPERT = 0.125
COMBINE_MAX_K = 1024


def _combine_config(K: int, scale_k_unit: int) -> KernelConfig:
    """The token-major down tile: the token's slots side by side over 16 output columns, one
    K tile (within a scale group) a step, prefetched one step ahead, 8 warps (same sweep: Qwen3
    T=1 20.8 us, the 8-column 4-warp tile 21.2)."""
    return KernelConfig(1, 16, _block_k(K, scale_k_unit, 128), 8, 2, group_m=1, gemv=True, combine=True)


def _combine16_config(K: int) -> KernelConfig:
    """The token-major down tile for 16-bit weights (grouped_gemm._gemv16_slots_acc): the slots
    side by side over 8 output columns, 64-wide K tiles prefetched one step ahead, 8 warps.
    tune_moe_layer.py --combine --formats bf16 (results/tune_combine16_h100.log), the fused MLP
    graph-timed, Qwen3-30B-A3B T=1: 34.4 us (16 columns: 35.5) against 36.5 for session 10's
    tensor-core decode tile and its sum in the same run; T=2: 58.3 us."""
    return KernelConfig(1, 8, min(64, max(16, 1 << (K - 1).bit_length())), 8, 2, group_m=1, gemv=True,
                        combine=True)


# weight-only 8/4/2-bit experts above this many rows per expert: the fused expert MLP op runs
# its unfused composition instead of the two fused launches
FUSED_WEIGHT_ONLY_MAX_ROWS_PER_EXPERT = 512


def fused_expert_mlp_pays(M: int, E: int, w_bits: int, act_bits: int, prefill_tma: bool = False,
                          w_tma: bool = False) -> bool:
    """Whether the fused expert MLP's two launches beat its unfused composition for ``M`` rows over
    ``E`` experts; ``prefill_tma``: the composition's plain GEMMs can take x by TMA
    (:func:`moe_ops.kernels.dispatch.x_tma_possible` on x); ``w_tma``: and both weights' stored
    tiles (:func:`moe_ops.kernels.dispatch.w_tma_possible` on w1 and w2).

    - Weight-only quantized experts above ``FUSED_WEIGHT_ONLY_MAX_ROWS_PER_EXPERT``: the gate/up
      launch keeps two accumulators and cannot take the 256-row tiles the plain forward takes
      there. ``benchmarks/bench_moe_layer.py`` on an H100 (results/moe_layer_h100_s16_row_kernels.md,
      T=4096): DeepSeek-V3 E=32 (1024 rows an expert) int4 g128 10.3 ms fused against 9.19
      composed, fp8 block 7.72 against 7.19; bf16 and W8A8 fused faster (DeepSeek-V3 bf16 5.08
      against 5.59, int8 W8A8 3.88 against 4.55).
    - Packed (int4/int2) weight-only experts above ``DECODE_MAX_ROWS_PER_EXPERT`` rows per expert
      where ``prefill_tma``: the composition's GEMMs take the 64/128-row ``w_lhs`` tiles with x
      and W's codes by TMA (sessions 20 and 33), which the fused gate/up launch (x gathered, two
      accumulators) has no form of. Same benchmark (results/moe_layer_h100_s32_prefill.md):
      Qwen3-30B-A3B T=4096 (256 rows an expert) int4 g128 1.59 ms fused against 1.29 composed;
      fp8 block (the same pointer-load tile family either way) stays fused, 1.23 against 1.40.
      ``benchmarks/probe_fused_prefill.py`` (results/probe_fused_prefill_h100_s33*.log, int4 g128,
      fused forced against composed, CUDA-graph timed): Qwen3 20-32 rows an expert 0.81-0.85x,
      48 rows 1.017x, 64-256 rows 0.79-0.83x; DeepSeek-V3 E=32 20-32 rows 0.704x, 64-256 rows
      0.73-0.74x; at 16 rows (decode tiles both ways) fused 1.021x.
    - 8-bit (int8/fp8) weight-only experts at 17 to ``MID_TILE_MAX_ROWS`` rows per expert where
      ``prefill_tma`` and ``w_tma``: the composition's GEMMs take the 64-row ``w_lhs`` tile with x
      and W by TMA (session 34). ``probe_fused_prefill.py`` (results/probe_fused_prefill_h100_s35.log,
      fp8 block, fused forced against composed, CUDA-graph timed): Qwen3-30B-A3B 24 rows an expert
      0.909x, 64 rows 0.886x; DeepSeek-V3 E=32 32 rows 0.811x, 64 rows 0.920x. Above 64 rows the
      composition's 8-bit tiles are the pointer ones and fused wins (Qwen3 256 rows fp8 block 1.23
      ms fused against 1.40 composed, above)."""
    weight_only = w_bits < 16 and act_bits == 16
    rpe = rows_per_expert_hint(M, E)
    if weight_only and w_bits < 8 and prefill_tma and rpe > DECODE_MAX_ROWS_PER_EXPERT:
        return False
    if (weight_only and w_bits == 8 and prefill_tma and w_tma
            and DECODE_MAX_ROWS_PER_EXPERT < rpe <= MID_TILE_MAX_ROWS):
        return False
    return not (weight_only and rpe > FUSED_WEIGHT_ONLY_MAX_ROWS_PER_EXPERT)


# the fused expert MLP's row-tile down launch sums the token's slots itself (KernelConfig.slot_sum)
# up to this many rows (T * top_k): the last program of each column block adds every token's rows
# of that block, so its serial work grows with T, while the separate sum's launch costs the same.
# benchmarks/tune_moe_layer.py --slot-sum (results/tune_slot_sum_{dsv3,qwen3}_h100_s30.log, the
# fused MLP graph-timed, alternating): T=1 (8 rows) DeepSeek-V3 E=32 int4 g128 101.4 -> 98.7 us,
# int8 W8A8 130.1 -> 127.5, fp8 block 149.7 -> 133.4, bf16 235.2 -> 234.0; Qwen3-30B-A3B int8 W8A8
# 23.8 -> 21.6, fp8 block 24.2 -> 23.4 (its int4 and bf16 take the token-major combine); T=8
# within +-2% either way, T=16 and 64 0.4-3.4% slower
SLOT_SUM_MAX_ROWS = 8


def choose_expert_mlp_configs(M: int, H: int, I: int, E: int, w_bits: int, group_size1: int, group_size2: int,
                              act_bits: int = 16, packed_gemv: bool = True, packed_gemv_down: bool = True,
                              down_tma: bool = False):
    """(gate/up, down) configs of the fused expert MLP (see :func:`_expert_mlp_tiles`); a
    row-tile down launch at decode sizes, up to ``SLOT_SUM_MAX_ROWS`` rows, sums the slots itself
    (``slot_sum``)."""
    gate_up, down = _expert_mlp_tiles(M, H, I, E, w_bits, group_size1, group_size2, act_bits, packed_gemv,
                                      packed_gemv_down, down_tma)
    if down.decode and not down.combine and M <= SLOT_SUM_MAX_ROWS:
        down = replace(down, slot_sum=True)
    return gate_up, down


def _expert_mlp_tiles(M: int, H: int, I: int, E: int, w_bits: int, group_size1: int, group_size2: int,
                      act_bits: int = 16, packed_gemv: bool = True, packed_gemv_down: bool = True,
                      down_tma: bool = False):
    """(gate/up, down) tiles of the fused expert MLP (:mod:`moe_ops.expert_mlp`) for ``M =
    T * top_k`` rows, hidden ``H``, expert intermediate ``I``. The gate/up launch keeps the gate
    and up tiles live (two accumulators, or one twice as wide with ``one_loop``), so prefill
    tiles are at most 128 wide. ``packed_gemv`` / ``packed_gemv_down``: w1's / w2's packed codes
    can be read as 32-bit words (``dispatch.gemv_layout_ok``): the gate/up launch may take the
    packed-code gemv tile, the down launch its token-major ``combine`` form. ``down_tma``: the
    down launch's x (the ``[M, I]`` intermediate, read in order) and w2's codes can come by TMA
    (``dispatch.down_tma_possible``)."""
    unit1 = group_size1 if group_size1 else H
    unit2 = group_size2 if group_size2 else I
    # the 16-bit gemv tile is ruled out by k_contiguous=False (see GEMV_MAX_ROWS_PER_EXPERT);
    # quantized weights, K-contiguous here, take the w_lhs tiles, or the packed-code gemv tile
    quantized = w_bits < 16
    # the gate/up launch gathers x's rows (no TMA for x). The down launch's decode tiles take x
    # and W by TMA where they can (tune_moe_layer.py --tma-down, results/tune_moe_layer_tma_down_
    # {dsv3,qwen3}_h100_s20.log, the fused MLP graph-timed: int4 g128 T=8 DeepSeek-V3 E=32 425.7
    # -> 406.4 us, Qwen3-30B-A3B 95.6 -> 90.8; T=1, whose down tiles are set below, no gain); its
    # prefill tiles were measured with pointer loads and keep them
    gate_up = choose_forward_config(M, 2 * I, H, E, w_bits, min(unit1, H), act_bits, k_contiguous=quantized,
                                    packed_gemv=False, x_tma=False)
    # 8-bit weights keep the down launch's pointer tile: its TMA w_lhs tile gained nothing in the fused
    # MLP (tune_moe_layer.py --tma-down --formats fp8_block, results/tune_moe_layer_tma_down_fp8_qwen3_
    # h100_s22.log, Qwen3-30B-A3B T=16 155.0 -> 154.2 us, T=64 222.1 -> 223.8)
    down_tma = down_tma and rows_per_expert_hint(M, E) <= 16 and w_bits < 8
    down = choose_forward_config(M, H, I, E, w_bits, min(unit2, I), act_bits, k_contiguous=quantized,
                                 packed_gemv=False, x_tma=down_tma, w_tma=down_tma)
    if gate_up.decode and 4 * M <= E:
        # benchmarks/tune_moe_layer.py (named tune_moe_decode.py then; results/
        # tune_moe_decode_h100.json), Qwen3-30B-A3B T=1 on an H100. Only for at most one row
        # per 4 experts: the narrow gate/up tiles re-read x once per N tile, which cost 2x at
        # DeepSeek-V3 T=64 (16 rows per expert, K 7168) and 10% at Qwen3 T=8
        # (benchmarks/results/moe_layer_h100.md against moe_layer_h100_default_decode_tiles.md)
        bk1 = _block_k(H, min(unit1, H), 256 if (w_bits == 8 and act_bits == 8) else 128)
        gate_up = KernelConfig(16, 32, bk1, 4 if w_bits < 8 else 2, 3 if w_bits < 8 else 4, group_m=1)
        if w_bits < 8 and act_bits == 16:
            # int4/int2 weight-only: the dequantized weight as the register operand, gate and up
            # rows in one loop (tune_moe_layer.py --one-loop, Qwen3-30B-A3B int4 g128 T=1, the
            # fused MLP: 30.5 us with session 6's two-loop 16x64 w_lhs tile, 26.8 with this one;
            # results/tune_moe_layer_one_loop_h100.log)
            gate_up = KernelConfig(16, 32, bk1, 4, 3, group_m=1, w_lhs=True, one_loop=True)
        elif w_bits == 16:
            down = KernelConfig(16, 64, _block_k(I, min(unit2, I), 64), 2, 4, group_m=1)
        else:
            down = KernelConfig(16, 128, _block_k(I, min(unit2, I), 128), 4, 3, group_m=1)
        if w_bits == 8 and act_bits == 16:
            # 8-bit weight-only, one loop (same sweep, fp8 block, Qwen3-30B-A3B T=1: 33.8 -> 24.4
            # us with 16 columns; DeepSeek-V3 E=32 T=1, I = 2048: 173 us with 16, 155 with 32
            # columns and 3 stages)
            if I >= 2048:
                gate_up = KernelConfig(16, 32, bk1, 4, 3, group_m=1, one_loop=True)
            else:
                gate_up = KernelConfig(16, 16, bk1, 4, 4, group_m=1, one_loop=True)
    if (w_bits < 8 and act_bits == 16 and packed_gemv
            and rows_per_expert_hint(M, E) <= PACKED_GEMV_MAX_ROWS_PER_EXPERT):
        # int4/int2 weight-only gate/up on the CUDA cores, gate and up rows in one loop
        # (tune_moe_layer.py --gemv, the fused MLP graph-timed with the table's down tile;
        # results/tune_moe_layer_gemv_h100.log): Qwen3-30B-A3B T=1 25.6 -> 23.3 us, T=8 95.9 ->
        # 90.4 us, DeepSeek-V3 E=32 T=1 132.6 -> 116.9 us. The down launch keeps its w_lhs tile:
        # its gemv tile took 26.6 / 98.4 / 131.7 us there (the scatter epilogue, one row a tile).
        # Two K tiles a step (k_split) up to 1/4 row per expert (results/tune_moe_layer_gemv_k_split_
        # h100.log): Qwen3 T=1 22.5 -> 21.6 us, DeepSeek-V3 T=1 114.8 -> 106.5; not at T=8.
        # There the weight words are prefetched two steps ahead where H >= 4096, as in the plain
        # gemv tile (results/tune_gemv_dsv3_h100_s29.log, same sweep: DeepSeek-V3 T=1 106.4 ->
        # 102.9 us; Qwen3 T=1, H = 2048, even: 21.6 / 21.7 us in the k_split sweep)
        split = 2 if rows_per_expert_hint(M, E) <= 0.25 else 1
        prefetch = 3 if split == 2 and H >= 4096 else 2
        gate_up = KernelConfig(1, 16, _block_k(H, min(unit1, H), 128), 2 * split, prefetch, group_m=1, gemv=True,
                               one_loop=True, k_split=split)
    if gate_up.decode and gate_up.w_lhs and not gate_up.one_loop and w_bits < 8 and act_bits == 16:
        # int4/int2 weight-only two-loop decode tile: w1's codes by TMA (x stays gathered by
        # pointers; dispatch._tma_operands falls back to pointer loads where TMA is not possible),
        # 3 stages, 128 columns from 4 rows per expert. tune_moe_layer.py --tma-gate-up, int4 g128,
        # the fused MLP graph-timed against the unfused composition (whose plain GEMMs take W by
        # TMA) in the same run (results/tune_tma_gate_up_{dsv3_h100_s30,qwen3_h100_s31}.log):
        # DeepSeek-V3 E=32 T=8 377.2 -> 324.2 us (16x64; 16x128 356.8; composition 324.3), T=64
        # 579.9 -> 515.8 (16x128; 16x64 527.4; composition 517.6); Qwen3-30B-A3B T=16 129.5 ->
        # 118.2 (16x64; 16x128 120.4; composition 125.0), T=64 191.9 -> 166.1 (16x128; 16x64
        # 175.3; composition 181.3)
        gate_up = replace(gate_up, block_n=128 if rows_per_expert_hint(M, E) >= 4 else 64, num_stages=3, tma=True)
    if ((w_bits < 8 or w_bits == 16) and act_bits == 16 and packed_gemv_down and I <= COMBINE_MAX_K
            and rows_per_expert_hint(M, E) <= COMBINE_MAX_ROWS_PER_EXPERT):
        return gate_up, (_combine_config(I, min(unit2, I)) if w_bits < 8 else _combine16_config(I))
    if down.decode and down.w_lhs:
        # int4/int2 weight-only down at decode sizes: 64 wide (same sweep, the layer with this
        # down tile: T=1 53.2 -> 52.7 us, T=8 118.6 -> 113.4 us against the 128-wide tile)
        down = KernelConfig(16, 64, _block_k(I, min(unit2, I), 128), 4, 3, group_m=1, w_lhs=True, tma=down.tma)
    prefill = not gate_up.decode
    if prefill and rows_per_expert_hint(M, E) > 64 and not (w_bits < 8 and act_bits == 8):
        # one K loop over the interleaved gate/up rows (KernelConfig.one_loop: x read once per K
        # tile), the loop tile 128 x 2*block_n. benchmarks/tune_moe_layer.py --one-loop, T=4096,
        # the fused MLP with this gate/up tile against session 6's two-loop table tile
        # (results/tune_moe_layer_one_loop_h100.log): Qwen3-30B-A3B bf16 1006 -> 856 us, int4
        # g128 1447 -> 1366, fp8 block 1278 -> 1101, int8 W8A8 699 -> 680; DeepSeek-V3 E=32 bf16
        # 7297 -> 5838, int4 10964 -> 10135, fp8 9002 -> 7803 (its best, 128x64/4-warp plain,
        # 7631). Measured at 256 and 1024 rows per expert; W4A8 (4-bit weights, int8 x) and
        # 17-64 rows per expert keep the two-loop tiles below (not measured with one loop).
        bk1 = _block_k(H, min(unit1, H), 64)
        if w_bits == 16:
            gate_up = KernelConfig(128, 128, bk1, 8, 3, one_loop=True)
        elif act_bits == 8:  # W8A8 (int8 or fp8 x)
            gate_up = KernelConfig(128, 64, bk1, 4, 4, one_loop=True)
        elif w_bits == 8:  # 8-bit weight-only: the weight as the register operand
            gate_up = KernelConfig(128, 64, bk1, 8, 3, one_loop=True, w_lhs=True)
        else:  # int4/int2 weight-only: the plain operands (w_lhs 64x64/4 warps: 1452 us at Qwen3)
            gate_up = KernelConfig(128, 64, bk1, 8, 3, one_loop=True)
    elif prefill and w_bits < 8 and act_bits == 16:
        # int4/int2 weight-only, two accumulators: 64 rows, the weight as the register operand
        # (tune_moe_layer.py, T=4096 int4 g128: Qwen3-30B-A3B layer 2.29 -> 1.46 ms with two
        # loops; results/tune_moe_layer_int4_prefill_*_h100.log; the plain table's 128x128 /
        # 4-warp tile spills registers with SwiGLU: NOTES.md)
        gate_up = KernelConfig(64, 128, _block_k(H, min(unit1, H), 64), 4, 4, w_lhs=True)
    elif prefill and gate_up.w_lhs:
        # 8-bit weights: the w_lhs table tile has 256 rows, too many for two accumulators; the
        # plain tile (fp8 at Qwen3-30B-A3B: 0.58 ms plain against 0.70 w_lhs at 128 rows)
        gate_up = choose_forward_config(M, 2 * I, H, E, w_bits, min(unit1, H), act_bits, k_contiguous=False)
    if prefill and gate_up.block_n > 128:
        gate_up = KernelConfig(gate_up.block_m, 128, gate_up.block_k, gate_up.num_warps, gate_up.num_stages,
                               gate_up.group_m)
    return gate_up, down
