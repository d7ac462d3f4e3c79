"""The Triton kernels in Triton's interpreter (CPU tensors), against the reference, on small
ragged shapes: empty experts, K and N not multiples of the tile, rows past offs[-1], outputs
poisoned with NaN first; decode-shaped and prefill-shaped tiles."""
import pytest
import torch
import triton
import triton.language as tl

import moe_ops
from moe_ops import reference
from moe_ops.kernels import dispatch
from moe_ops.kernels.grouped_gemm import _expert_of_rank
from moe_ops.lowering.kernel_choice import KernelConfig
from helpers import ragged_offs, rel_err, spy_persistent_launches, spy_tile_meta, spy_tma_operands, weight_cases

E, N, K, M = 4, 40, 96, 45  # N, K not multiples of the 32-wide tiles; K a multiple of 32 (group size)
CONFIGS = {"decode": KernelConfig(16, 16, 32, 4, 1), "prefill": KernelConfig(32, 32, 16, 4, 1)}
# the CUDA-core decode tile (weight-only): 2-row tiles, so experts span several M tiles; packed
# int4/int2 codes (read as 32-bit words) take one row a tile, its weight words prefetched one
# and two K tiles ahead (num_stages 2 and 3)
GEMV = KernelConfig(2, 16, 32, 4, 1, group_m=1, gemv=True)
GEMV_PACKED = {"gemv_packed": KernelConfig(1, 16, 32, 4, 2, group_m=1, gemv=True),
               "gemv_packed_prefetch2": KernelConfig(1, 32, 32, 4, 3, group_m=1, gemv=True),
               # two K tiles a step (K = 96: the last step half past K)
               "gemv_packed_k_split": KernelConfig(1, 16, 32, 4, 2, group_m=1, gemv=True, k_split=2)}
# the dequantized weight as the MMA's left operand (weight-only formats), both tile shapes
W_LHS = {"w_lhs_decode": KernelConfig(16, 16, 32, 4, 1, w_lhs=True),
         "w_lhs_prefill": KernelConfig(32, 32, 32, 4, 1, w_lhs=True)}


def _data(seed, dtype, k=K):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(M, k, generator=g).to(dtype)
    w = torch.randn(E, N, k, generator=g)
    offs = ragged_offs(M, E, g, empty=(1,), tail=4)
    return x, w, offs


def _run(x, args, offs, act, cfg):
    out = torch.full((M, N), float("nan"), dtype=x.dtype)
    wd, ws, wz, f, gr, gs = args
    y = dispatch.grouped_mm(x, wd, ws, wz, offs, f, gr, gs, act, "none", config=cfg, out=out)
    assert y is out and not torch.isnan(y).any()
    assert torch.all(y[int(offs[-1]):] == 0)
    return y


# (the two-row gemv tile serves unpacked weights; packed codes: test_forward_packed_gemv)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("cfg,fmt,gran,gs", [(c, *case) for c in list(CONFIGS) + ["gemv"]
                                             for case in [("none", "none", 0)] + weight_cases()
                                             if c != "gemv" or not case[0].startswith(("int4", "int2"))])
def test_forward_weight_only(fmt, gran, gs, dtype, cfg):
    _check_weight_only(fmt, gran, gs, dtype, GEMV if cfg == "gemv" else CONFIGS[cfg])


@pytest.mark.parametrize("cfg,dtype", [("gemv_packed", torch.bfloat16), ("gemv_packed_prefetch2", torch.float16),
                                       ("gemv_packed_k_split", torch.float16)])
@pytest.mark.parametrize("fmt,gran,gs", weight_cases([f for f in moe_ops.QUANTIZED_FORMATS if f[:4] in ("int4", "int2")]))
def test_forward_packed_gemv(fmt, gran, gs, dtype, cfg):
    """int4/int2 codes read as 32-bit words, fields left in place (``_fields_in_place``), x
    rescaled per field: every field position of both widths, asym / sym, group and channel."""
    _check_weight_only(fmt, gran, gs, dtype, GEMV_PACKED[cfg])


@pytest.mark.parametrize("cfg", list(W_LHS))
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])  # the codes' 16-bit bias per dtype
@pytest.mark.parametrize("fmt,gran,gs", weight_cases())
def test_forward_weight_only_w_lhs(fmt, gran, gs, dtype, cfg):
    _check_weight_only(fmt, gran, gs, dtype, W_LHS[cfg])


@pytest.mark.parametrize("k", [K, 80])  # 80: a partial last K tile
@pytest.mark.parametrize("cfg", list(W_LHS))
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_forward_plain_weights_w_lhs(dtype, cfg, k, monkeypatch):
    """Plain 16-bit weights in the ``w_lhs`` tile (the weight tile as the MMA's left operand, the
    output tile computed transposed): the launch takes it (``W_LHS``), and its output is the
    reference's, on ragged experts with an empty one, zero rows past ``offs[-1]``."""
    seen = spy_tile_meta(monkeypatch)
    _check_weight_only("none", "none", 0, dtype, W_LHS[cfg], k=k)
    assert [m["W_LHS"] for m in seen] == [True]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_plain_weights_decode_table_tile(dtype, monkeypatch):
    """The table's tile for plain weights at decode sizes (3 rows an expert): 16-bit weights take
    the ``w_lhs`` tile with x and W by TMA (``kernel_choice.choose_forward_config``), float32 ones
    the pointer tile; the output is the reference's either way."""
    metas, seen = spy_tile_meta(monkeypatch), spy_tma_operands(monkeypatch)
    g = torch.Generator().manual_seed(23)
    m, e, n, k = 48, 16, 40, 96
    x = torch.randn(m, k, generator=g).to(dtype)
    w = torch.randn(e, n, k, generator=g).to(dtype)
    offs = ragged_offs(m, e, g, empty=(1,), tail=3)
    y = dispatch.grouped_mm(x, w, None, None, offs, "none", "none", 0, "none", "none")
    ref = reference.grouped_mm(x, w, None, None, offs, "none", "none", 0, "none", "none")
    sixteen = dtype != torch.float32
    assert [(mt["BLOCK_M"], mt["W_LHS"]) for mt in metas] == [(16, sixteen)]
    assert seen == [(True, 1) if sixteen else (False, 0)]
    assert torch.all(y[int(offs[-1]):] == 0)
    assert rel_err(y, ref) < (1.6e-2 if sixteen else 1e-5)


@pytest.mark.parametrize("cfg", list(CONFIGS) + list(W_LHS))
@pytest.mark.parametrize("fmt", ["none", "int4_asym", "int8_sym", "fp8_e4m3"])
def test_forward_partial_k_tile(fmt, cfg):
    """K = 80 (channel scales): the last K tile is partial; x's columns past K are masked (an
    asymmetric code 0 past K dequantizes to -z * s, not 0)."""
    _check_weight_only(fmt, "none" if fmt == "none" else "channel", 0, torch.float16, {**CONFIGS, **W_LHS}[cfg],
                       k=80)


def _check_weight_only(fmt, gran, gs, dtype, cfg, k=K):
    x, w, offs = _data(hash((fmt, gran)) % 997, dtype, k)
    if fmt == "none":
        args = (w.to(dtype), None, None, "none", "none", 0)
    else:
        args = moe_ops.quantize_weight(w.to(dtype), fmt, gran, gs).op_args()
    y = _run(x, args, offs, "none", cfg)
    ref = reference.grouped_mm(x, *args[:3], offs, *args[3:], "none", "none")
    # Triton's interpreter casts float32 -> bfloat16 by truncation (measured: half the values
    # differ from round-to-nearest), which doubles bf16's rounding error here; fp16 rounds.
    assert rel_err(y, ref) < (1e-3 if dtype == torch.float16 else 1.6e-2)


@pytest.mark.parametrize("cfg", list(CONFIGS) + list(W_LHS))
@pytest.mark.parametrize("fmt", ["int8_sym", "int8_asym"])
def test_int8_weight_codes_dequantize_exactly(fmt, cfg):
    """Every 8-bit code under 16-bit x, exactly: int8_sym's -127..127 (two's-complement bytes)
    and int8_asym's 0..255 against per-channel zero points 0..255, power-of-two channel scales,
    in the plain and ``w_lhs`` tiles. x's rows are one-hot, so each output is one weight's
    ``(q - z) * s``, exact in fp16, and must equal the reference's."""
    g = torch.Generator().manual_seed(5)
    x = torch.zeros(M, K, dtype=torch.float16)
    x[torch.arange(M), torch.arange(M) % K] = 1.0
    offs = ragged_offs(M, E, g, empty=(1,), tail=4)
    wd, ws, wz, f, gr, gs = moe_ops.quantize_weight(torch.randn(E, N, K, generator=g).half(), fmt, "channel",
                                                   0).op_args()
    lo = -127 if fmt == "int8_sym" else 0
    values = torch.arange(lo, 128 if fmt == "int8_sym" else 256)
    codes = values[torch.randint(0, values.numel(), (E, N, K), generator=g)]
    codes.view(-1)[:values.numel()] = values  # every code at least once
    wd = codes.to(wd.dtype)
    ws = torch.exp2(torch.randint(-3, 4, ws.shape, generator=g).to(ws.dtype))
    if wz is not None:
        wz = torch.randint(0, 256, wz.shape, generator=g).to(wz.dtype)
    args = (wd, ws, wz, f, gr, gs)
    y = _run(x, args, offs, "none", {**CONFIGS, **W_LHS}[cfg])
    assert torch.equal(y, reference.grouped_mm(x, *args[:3], offs, *args[3:], "none", "none"))


@pytest.mark.parametrize("cfg", list(CONFIGS))
@pytest.mark.parametrize("fmt,gran,gs", weight_cases([f for f in moe_ops.QUANTIZED_FORMATS if f.startswith("int")]))
def test_forward_int8_token_exact(fmt, gran, gs, cfg):
    """K = 384 and group 128: the int8 sub-dots need 32 * PACK columns inside one scale group."""
    x, w, offs = _data(hash((fmt, gran, 2)) % 997, torch.float32, k=384)
    args = moe_ops.quantize_weight(w, fmt, gran, 128).op_args()
    y = _run(x, args, offs, "int8_token", CONFIGS[cfg])
    ref = reference.grouped_mm(x, *args[:3], offs, *args[3:], "int8_token", "none")
    if gran == "group":
        assert rel_err(y, ref) < 1e-6  # float32 sum over groups: order of additions only
    else:
        assert torch.equal(y, ref)


@pytest.mark.parametrize("mode", ["fp8_token", "fp8_1x128"])
@pytest.mark.parametrize("fmt,gran,gs", weight_cases(["fp8_e4m3", "fp8_e5m2"]))
def test_forward_fp8_activations(fmt, gran, gs, mode):
    """The GEMM against the product of the kernel's own quantized x (Triton's interpreter
    rounds float32 -> float8 differently from the hardware; the GPU tests check the act
    quantization kernel bit for bit)."""
    _check_fp8_activations(fmt, gran, gs, mode, CONFIGS["prefill"], K)


@pytest.mark.parametrize("fmt,gran", [("fp8_e4m3", "channel"), ("fp8_e5m2", "tensor")])
def test_forward_fp8_dot_k_tile_256(fmt, gran):
    """fp8_token x with 256-column K tiles through TMA (the fp8 x fp8 tile above 512 rows an
    expert, ``kernel_choice.choose_forward_config(fp8_dot=True)``), K = 384: the second K tile
    half past K."""
    _check_fp8_activations(fmt, gran, 0, "fp8_token", KernelConfig(32, 32, 256, 4, 1, tma=True), 384)


def _check_fp8_activations(fmt, gran, gs, mode, cfg, k):
    x, w, offs = _data(hash((fmt, gran, mode, k)) % 997, torch.float16, k)
    args = moe_ops.quantize_weight(w, fmt, gran, gs).op_args()
    y = _run(x, args, offs, mode, cfg)
    qx, sx = dispatch.quantize_act(x, mode)
    blk = 128 if mode == "fp8_1x128" else k
    xh = moe_ops.activations.dequantize_blocks_lastdim(qx, sx, blk, torch.float64)
    ref = reference.segment_mm(xh, moe_ops.dequantize_weight(moe_ops.QuantizedWeight(
        args[0], args[1], args[2], fmt, gran, gs, (E, N, k), torch.float32), torch.float64), offs, "nt")
    assert rel_err(y, ref) < 1e-3


def test_forward_prequantized_activations_equal_the_cast_inside():
    """``prequantized``: x's codes and scales from :func:`dispatch.quantize_act` give the same
    bits as the call that casts x itself (fp8 block and int8 channel weights), and are what the
    GEMM reads (doubled scales double the output)."""
    x, w, offs = _data(12, torch.float16)
    for fmt, gran, mode in (("fp8_e4m3", "block", "fp8_1x128"), ("int8_sym", "channel", "int8_token")):
        args = moe_ops.quantize_weight(w, fmt, gran, 0).op_args()
        y = _run(x, args, offs, mode, CONFIGS["prefill"])
        out = torch.full((M, N), float("nan"), dtype=x.dtype)
        wd, ws, wz, f, gr, gs = args
        y2 = dispatch.grouped_mm(x, wd, ws, wz, offs, f, gr, gs, mode, "none", config=CONFIGS["prefill"], out=out,
                                 prequantized=dispatch.quantize_act(x, mode))
        assert torch.equal(y, y2)
        q, sc = dispatch.quantize_act(x, mode)
        y3 = dispatch.grouped_mm(x, wd, ws, wz, offs, f, gr, gs, mode, "none", config=CONFIGS["prefill"],
                                 out=torch.full_like(out, float("nan")), prequantized=(q, sc * 2))
        assert rel_err(y3, 2 * y) < 1e-6 and rel_err(y3, y) > 0.5


def test_gemv_tile_refuses_what_it_cannot_serve(monkeypatch):
    """The CUDA-core tile reads weights along K in vectors and scales once per K tile: a
    transposed weight view, quantized activations, a K tile wider than the scale group, and
    packed codes it cannot read as aligned words are refused with the reason, not computed
    wrongly, and before any kernel runs (x's cast included)."""
    monkeypatch.setattr(dispatch, "quantize_act", lambda *a, **k: pytest.fail("x cast before the refusal"))
    x, w, offs = _data(10, torch.float16)
    out = torch.empty(M, N, dtype=torch.float16)
    wt = w.half().transpose(1, 2).contiguous().transpose(1, 2)  # logical [E, N, K], K stride N
    q = moe_ops.quantize_weight(w.half(), "int8_sym", "group", 32).op_args()
    for args, act, cfg in (((wt, None, None, "none", "none", 0), "none", GEMV),
                           (q, "int8_token", GEMV),
                           (q, "none", KernelConfig(2, 16, 64, 4, 1, group_m=1, gemv=True))):
        with pytest.raises(ValueError, match="gemv"):
            dispatch.grouped_mm(x, *args[:3], offs, *args[3:], act, "none", config=cfg, out=out)
    # packed codes are read as 32-bit words, one row a tile: two-row tiles, and rows of 18
    # bytes (K = 36 int4 codes, not a whole number of words) are refused
    q4 = moe_ops.quantize_weight(w.half(), "int4_asym", "group", 32).op_args()
    q36 = moe_ops.quantize_weight(w[:, :, :36].half(), "int4_asym", "channel", 0).op_args()
    for xx, args in ((x, q4), (x[:, :36].contiguous(), q36)):
        with pytest.raises(ValueError, match="gemv"):
            dispatch.grouped_mm(xx, *args[:3], offs, *args[3:], "none", "none", out=out, config=GEMV if xx is x
                                else KernelConfig(1, 16, 32, 4, 2, group_m=1, gemv=True))


def test_unserved_combination_falls_back_to_reference():
    """int2 with group 32 under int8_token: no kernel (scale varies inside a 128-column tile);
    the launcher says so and the operator serves it through the reference path."""
    x, w, offs = _data(9, torch.float32)
    args = moe_ops.quantize_weight(w, "int2_sym", "group", 32).op_args()
    assert dispatch.grouped_mm(x, *args[:3], offs, *args[3:], "int8_token", "none") is None


@pytest.mark.parametrize("shape", [(37, 300), (5, 2100)])
def test_act_quant_kernel_int8_exact_and_scales(shape):
    """Rows not a multiple of the row block, K not a multiple of 128 or of the column block,
    per-row units wider than one column block (2100), an all-zero row."""
    x = torch.randn(*shape) * 5
    x[3] = 0
    for mode in ("int8_token", "fp8_token", "fp8_1x128"):
        qk, sk = dispatch.quantize_act(x, mode)
        qr, sr = moe_ops.activations.quantize_act(x, mode)
        assert torch.equal(sk, sr)
        if mode == "int8_token":
            assert torch.equal(qk, qr)
        assert torch.all(qk[3].float() == 0)
        if mode != "fp8_1x128":  # per row in two passes over 1024-column chunks
            qk2, sk2 = dispatch.quantize_act(x, mode, (2, 1024, 4))
            assert torch.equal(sk2, sr) and torch.equal(qk2.view(torch.uint8), qk.view(torch.uint8))


def test_all_rows_on_one_expert_and_m_smaller_than_tile():
    x = torch.randn(5, K, dtype=torch.float16)
    w = torch.randn(E, N, K, dtype=torch.float16)
    offs = torch.tensor([0, 0, 5, 5], dtype=torch.int32)
    out = torch.full((5, N), float("nan"), dtype=torch.float16)
    y = dispatch.grouped_mm(x, w, None, None, offs, "none", "none", 0, "none", "none", config=CONFIGS["prefill"], out=out)
    assert rel_err(y, x.double() @ w[2].double().t()) < 1e-3


@pytest.mark.parametrize("counts", [
    [1, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0],  # every row its own expert: M part-filled tiles
    [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],  # every row dropped: only zero-row tiles
    [0, 3, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1],  # a tail row past offs[-1]
    [1, 0, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0],  # four part-filled tiles and a zero-row tile: all 5
])
def test_grid_bound_with_more_experts_than_rows(counts):
    """The grid has ``host_math.row_tile_bound`` M tiles, ``(M + (min(E, M) + 1) * (B - 1)) // B``
    (M=5 rows, E=12 experts, B=2-row tiles: 5): enough when every row is alone on its expert,
    when offs[-1] < M, and when both use every tile of the grid."""
    g = torch.Generator().manual_seed(sum(counts))
    m, e = 5, len(counts)
    x = torch.randn(m, K, generator=g, dtype=torch.float16)
    w = torch.randn(e, N, K, generator=g, dtype=torch.float16)
    offs = torch.tensor(counts, dtype=torch.int32).cumsum(0).to(torch.int32)
    out = torch.full((m, N), float("nan"), dtype=torch.float16)
    y = dispatch.grouped_mm(x, w, None, None, offs, "none", "none", 0, "none", "none",
                            config=KernelConfig(2, 16, 32, 4, 1, group_m=1), out=out)
    ref = reference.grouped_mm(x.double(), w.double(), None, None, offs, "none", "none", 0, "none", "none")
    assert not torch.isnan(y).any() and torch.all(y[int(offs[-1]):] == 0)  # all of y when all rows drop
    assert torch.allclose(y.double(), ref, rtol=1e-3, atol=1e-2)


DGRAD_CASES = [("none", "none", 0)] + [c for c in weight_cases() if not c[0].startswith(("int4", "int2"))]


@pytest.mark.parametrize("cfg", list(CONFIGS))
@pytest.mark.parametrize("fmt,gran,gs", DGRAD_CASES)
def test_dgrad(fmt, gran, gs, cfg):
    """dx = dy @ W[e] through the forward kernel on the transposed weights."""
    x, w, offs = _data(hash((fmt, gran, 5)) % 997, torch.float16)
    dy = torch.randn(M, N, generator=torch.Generator().manual_seed(6)).half()
    args = (w.half(), None, None, "none", "none", 0) if fmt == "none" else \
        moe_ops.quantize_weight(w.half(), fmt, gran, gs).op_args()
    out = torch.full((M, K), float("nan"), dtype=torch.float16)
    dx = dispatch.grouped_mm_dgrad(dy, *args[:3], offs, *args[3:], "none", config=CONFIGS[cfg], out=out)
    assert dx is out and not torch.isnan(dx).any() and torch.all(dx[int(offs[-1]):] == 0)
    ref = reference.grouped_mm_dgrad(dy.double(), *args[:3], offs, *args[3:], "none")
    assert rel_err(dx, ref) < 1e-3


def test_dgrad_packed_formats_fall_back():
    x, w, offs = _data(7, torch.float16)
    args = moe_ops.quantize_weight(w.half(), "int4_asym", "group", 32).op_args()
    assert dispatch.grouped_mm_dgrad(torch.randn(M, N).half(), *args[:3], offs, *args[3:], "none") is None


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_wgrad(dtype):
    """dW[e] = dy[g]^T x[g]: empty expert 1 gets exact zeros, rows past offs[-1] are ignored."""
    x, _, offs = _data(8, dtype)
    dy = torch.randn(M, N, generator=torch.Generator().manual_seed(9)).to(dtype)
    dy[int(offs[-1]):] = float("nan")  # rows past the end must never be read into a sum
    dw = dispatch.grouped_mm_wgrad(dy, x, offs, "none", config=(16, 32, 32, 4, 1))
    ref = reference.grouped_mm_wgrad(dy[: int(offs[-1])].double(), x[: int(offs[-1])].double(),
                                     offs, "none")
    assert torch.all(dw[1] == 0)
    assert rel_err(dw, ref) < (1e-3 if dtype == torch.float16 else 1e-6)


@pytest.mark.parametrize("group", [1, 3])  # 3: a last group of one expert (E = 4)
def test_wgrad_expert_groups(group):
    """The wgrad's 1-D grid taken ``group`` experts at a time (config entry 6, the kernel's
    ``EXPERT_GROUP``): every (expert, tile) program once, so the output equals the expert-by-expert
    grid's bit for bit (each tile's sums do not depend on the launch order); the empty expert
    gets exact zeros; rows past offs[-1] (NaN) are never read."""
    from moe_ops.kernels.grouped_wgrad import launch_wgrad
    x, _, offs = _data(21, torch.float16)
    dy = torch.randn(M, N, generator=torch.Generator().manual_seed(22)).half()
    dy[int(offs[-1]):] = float("nan")
    cfg = (16, 32, 32, 4, 1)
    dw = launch_wgrad(dy, x, offs, torch.float16, cfg + (group,), interpret=True)
    assert torch.equal(dw, launch_wgrad(dy, x, offs, torch.float16, cfg, interpret=True))
    assert torch.all(dw[1] == 0)
    ref = reference.grouped_mm_wgrad(dy[: int(offs[-1])].double(), x[: int(offs[-1])].double(), offs, "none")
    assert rel_err(dw, ref) < 1e-3
    for bad in (cfg + (group, 1), cfg + (-1,)):
        with pytest.raises(ValueError, match="expert_group"):
            launch_wgrad(dy, x, offs, torch.float16, bad, interpret=True)


@pytest.mark.parametrize("recipe", ["fp8_rowwise", "fp8_blockwise"])
def test_recipe_forward_and_dgrad(recipe):
    """The recipes' forward and dgrad GEMMs against the product of the same quantized operands
    (quantized by the kernels themselves: see test_forward_fp8_activations)."""
    x, w, offs = _data(11, torch.float16)
    dy = torch.randn(M, N, generator=torch.Generator().manual_seed(12)).half()
    w16 = w.half()
    mode, gran = ("fp8_token", "channel") if recipe == "fp8_rowwise" else ("fp8_1x128", "block")
    from moe_ops.kernels.weight_quant import fp8_weight_quant
    for a, transpose, red in ((x, False, K), (dy, True, N)):
        if a is x:
            out = dispatch.grouped_mm(x, w16, None, None, offs, "none", "none", 0, "none", recipe)
        else:
            out = dispatch.grouped_mm_dgrad(dy, w16, None, None, offs, "none", "none", 0, recipe)
        qa, sa = dispatch.quantize_act(a, mode)
        ah = moe_ops.activations.dequantize_blocks_lastdim(qa, sa, 128 if mode == "fp8_1x128" else red, torch.float64)
        d, sc = fp8_weight_quant(w16, gran, transpose)
        wh = moe_ops.formats.dequantize(d, sc, None, "fp8_e4m3", gran, 0, torch.float64)
        ref = reference.segment_mm(ah, wh, offs, "nt")
        assert rel_err(out, ref) < 1e-3
        assert torch.all(out[int(offs[-1]):] == 0)


@triton.jit
def _ranks_kernel(offs_ptr, out_ptr, E: tl.constexpr, E_POW2: tl.constexpr, WIDE_KEYS: tl.constexpr):
    r = tl.program_id(0)
    e_idx = tl.arange(0, E_POW2)
    ends = tl.load(offs_ptr + e_idx, mask=e_idx < E, other=0)
    prev = tl.load(offs_ptr + e_idx - 1, mask=(e_idx < E) & (e_idx > 0), other=0)
    tl.store(out_ptr + r, _expert_of_rank(prev, ends, r, E, E_POW2, WIDE_KEYS))


@pytest.mark.parametrize("wide_keys", [False, True])
def test_expert_of_rank_orders_by_rows_then_index(wide_keys):
    """``_expert_of_rank``: rank r's expert is the r-th of the experts sorted by row count, most
    first, equal counts by index (empty experts last among them); E not a power of two; int32
    keys up to their bound (rows just under ``2**31 // E_POW2 - 1``) and int64 keys past it."""
    big = 2**31 // 8 - 2  # the most rows int32 keys hold at E_POW2 = 8
    cases = [[5, 0, 7, 7, 0, 3], [0, 0, 0], [300, 1, 300, 2, 0, 1, 300], [1, big, 0, big - 1, big]]
    if wide_keys:  # keys up to 2**32 (E_POW2 = 4); offs[-1] = 2**31 - 1 still int32
        cases.append([3, 2**30, 0, 2**30 - 4])
    for rows in cases:
        offs = torch.tensor(rows, dtype=torch.int64).cumsum(0).to(torch.int32)
        out = torch.full((len(rows),), -1, dtype=torch.int32)
        _ranks_kernel[(len(rows),)](offs, out, E=len(rows), E_POW2=triton.next_power_of_2(len(rows)),
                                    WIDE_KEYS=wide_keys)
        want = sorted(range(len(rows)), key=lambda e: (-rows[e], e))
        assert out.tolist() == want, rows


def _padded_reference(t, offs, per_expert):
    """The reference quantization (:func:`moe_ops.recipes.quantize_token_blocks`) laid out as
    the padded token-block layout: ``(q_t [C, P], scale, used scale rows)``."""
    from moe_ops.kernels.token_block_quant import padded_blocks, padded_columns
    M, C = t.shape
    E = offs.shape[0]
    q, s, blk = moe_ops.recipes.quantize_token_blocks(t, offs, 0 if per_expert else 128)
    col = padded_columns(offs, M)
    inside = col >= 0
    q_t = torch.zeros(C, padded_blocks(M, E) * 128, dtype=q.dtype)
    q_t.view(torch.uint8)[:, col[inside]] = q[inside].view(torch.uint8).t()
    used = torch.unique(blk[inside])
    return q_t, s[:E] if per_expert else s[: padded_blocks(M, E)], used


@pytest.mark.parametrize("recipe", ["fp8_rowwise", "fp8_blockwise"])
def test_recipe_wgrad_fp8_kernel(recipe):
    """fp8 wgrad with per-(token block, column) scales: experts of 300 and 140 rows (several
    128-row blocks, short last blocks), an empty expert, tail rows past offs[-1]."""
    g = torch.Generator().manual_seed(13)
    x = torch.randn(460, 64, generator=g)
    dy = torch.randn(460, 48, generator=g)
    offs = torch.tensor([300, 300, 440], dtype=torch.int32)
    from moe_ops.kernels.grouped_wgrad import launch_wgrad_fp8
    from moe_ops.kernels.token_block_quant import padded_columns, token_block_quant
    per_expert = recipe == "fp8_rowwise"
    qdy, sdy, used = _padded_reference(dy, offs, per_expert)
    qx, sx, _ = _padded_reference(x, offs, per_expert)
    # the GEMM on the reference-quantized operands: N, K not multiples of the tile; the
    # token-block tiles by TMA descriptors (rows past N / K read as zero) and by masked loads
    ref = reference.grouped_mm_wgrad(dy, x, offs, recipe)
    for tma in (True, False):
        dw = launch_wgrad_fp8(qdy, qx, sdy, sx, offs, per_expert, torch.float32, (32, 32, 4, 1), tma=tma)
        assert torch.all(dw[1] == 0)
        assert rel_err(dw, ref) < 1e-6
    # the 1-D grid two experts at a time (a last group of one): the same programs, the same bits
    grouped = launch_wgrad_fp8(qdy, qx, sdy, sx, offs, per_expert, torch.float32, (32, 32, 4, 1, 2), tma=False)
    assert torch.equal(grouped, dw)
    # the quantization kernel: the same scales for every used unit and the padded rows' codes
    # zero (Triton's interpreter rounds float32 -> float8 differently from the hardware; the
    # GPU tests compare the codes bit for bit)
    qk, sk = token_block_quant(dy, offs, per_expert)
    assert qk.shape == qdy.shape and sk.shape == sdy.shape
    assert torch.equal(sk, sdy) if per_expert else torch.equal(sk[used], sdy[used])
    written = torch.zeros(qk.shape[1], dtype=torch.bool)
    written[padded_columns(offs, 460).clamp(min=0)] = True
    block_cols = (used.unsqueeze(1) * 128 + torch.arange(128)).flatten()
    pad = block_cols[~written[block_cols]]
    assert pad.numel() > 0 and torch.all(qk[:, pad].float() == 0)
    # grid order, tiles, 2 / 4 token blocks a step (per expert; experts of 3 blocks: a part-used
    # last step) or column tiles a program (per block; 3 column tiles of 16: a part-used last
    # program): the same used units
    for order in ((16, 2, True), (64, 4, False), (32, 4), (16, 4, True, 2), (16, 4, False, 4)):
        qo, so = token_block_quant(dy, offs, per_expert, order)
        assert torch.equal(qo[:, block_cols].view(torch.uint8), qk[:, block_cols].view(torch.uint8))
        assert torch.equal(so, sk) if per_expert else torch.equal(so[used], sk[used])
    # the next block loaded ahead: per expert in the second pass (one and two blocks in the first
    # pass), per block the next column tile (1, 2 and 4 column tiles a program); per expert, the
    # experts launched by row count, most first (the 300-row expert at program 0 either way, the
    # empty one moved from 1 to 2)
    configs = (((16, 4, True, 1, True), (32, 4, True, 2, True), (16, 4, False, 2, False, True)) if per_expert
               else ((16, 4, True, 1, True), (16, 4, True, 2, True), (16, 4, False, 4, True), (32, 4, True, 2, True)))
    for config in configs:
        qo, so = token_block_quant(dy, offs, per_expert, config)
        assert torch.equal(qo[:, block_cols].view(torch.uint8), qk[:, block_cols].view(torch.uint8)), config
        assert torch.equal(so, sk) if per_expert else torch.equal(so[used], sk[used])
    if not per_expert:
        with pytest.raises(ValueError, match="largest_first"):
            token_block_quant(dy, offs, per_expert, (16, 4, True, 1, False, True))
    with pytest.raises(ValueError, match="step_blocks"):
        token_block_quant(dy, offs, per_expert, (16, 4, True, 3))
    # 16-bit input: the reciprocal division (scale_division) gives the float32 input's codes
    # (per expert, the first pass's max runs on 16-bit |v| bits)
    for d16 in (dy.bfloat16(), dy.half()):
        (qa, sa), (qb, sb) = token_block_quant(d16, offs, per_expert), token_block_quant(d16.float(), offs, per_expert)
        assert torch.equal(qa[:, block_cols].view(torch.uint8), qb[:, block_cols].view(torch.uint8))
        assert torch.equal(sa, sb) if per_expert else torch.equal(sa[used], sb[used])
    # and the whole recipe wgrad through the operator's Triton path stays within fp8 error
    full = dispatch.grouped_mm_wgrad(dy, x, offs, recipe)
    assert rel_err(full, ref) < 0.1


@pytest.mark.parametrize("gran,transpose", [("channel", False), ("channel", True), ("block", False), ("block", True)])
def test_fp8_weight_quant_scales(gran, transpose):
    """Scales equal formats.quantize's bit for bit (codes: see the GPU tests; Triton's
    interpreter rounds float32 -> float8 differently from the hardware)."""
    from moe_ops.kernels.weight_quant import fp8_weight_quant
    w = torch.randn(3, 200, 300, generator=torch.Generator().manual_seed(14)).bfloat16()
    w[1, :, :128] = 0  # all-zero units
    q, s = fp8_weight_quant(w, gran, transpose)
    src = w.transpose(1, 2).contiguous() if transpose else w
    d_ref, s_ref, _ = moe_ops.formats.quantize(src, "fp8_e4m3", gran, 0)
    assert q.shape == d_ref.shape and q.dtype == d_ref.dtype
    assert torch.equal(s, s_ref)
    # flat, persistent, and (channel) one read of the whole row (BLOCK_K >= K): the same bits
    for cfg in ((16, 64, 4, True), (64, 128, 4, False), (16, 64, 4, True, 3), (8, 512, 4, True)):
        q2, s2 = fp8_weight_quant(w, gran, transpose, cfg)
        assert torch.equal(q2.view(torch.uint8), q.view(torch.uint8)) and torch.equal(s2, s)
    for rcp in (True, False):  # either division: the same bits
        q2, s2 = fp8_weight_quant(w, gran, transpose, None, rcp)
        assert torch.equal(q2.view(torch.uint8), q.view(torch.uint8)) and torch.equal(s2, s)
    if gran == "block" and not transpose:  # W's and W^T's codes from one read: both casts' bits
        qt, st = fp8_weight_quant(w, "block", True)
        for cfg in (None, (16, 64, 4, False)):
            parts = fp8_weight_quant(w, "block", config=cfg, pair=True)
            for got, want in zip(parts, (q, s, qt, st)):
                assert torch.equal(got.view(torch.uint8), want.view(torch.uint8))
    else:
        with pytest.raises(ValueError, match="pair"):
            fp8_weight_quant(w, gran, transpose, pair=True)


def test_fp8_weight_channel_long_rows_one_read():
    """W's channel cast over rows of 4097-8192 columns: the default (one row a program, one read,
    the reciprocal division) gives the scales of ``formats.quantize`` and the codes of the
    two-pass tile with ``div_rn``, an all-zero row and a lone large value included."""
    from moe_ops.kernels.weight_quant import fp8_weight_quant
    w = (torch.randn(2, 3, 4200, generator=torch.Generator().manual_seed(27)) * 0.05).bfloat16()
    w[1, 1] = 0
    w[0, 2, 4199] = 300.0
    q0, s0 = fp8_weight_quant(w, "channel", False, (2, 2048, 8, True), False)
    assert torch.equal(s0, moe_ops.formats.quantize(w, "fp8_e4m3", "channel", 0)[1])
    for rcp in (None, False):
        q, s = fp8_weight_quant(w, "channel", False, None, rcp)
        assert torch.equal(s, s0) and torch.equal(q.view(torch.uint8), q0.view(torch.uint8))


def _fp8_exact(shape, seed, pin_rows):
    """bf16 values 4x an fp8 e4m3 value each, with every ``pin_rows``-th row (along dim -2) at
    4 * 448: every unit's absmax is 4 * 448, its scale 4, and each quotient an fp8 value, which
    any rounding converts exactly (Triton's interpreter rounds inexact ones unlike the hardware)."""
    g = torch.Generator().manual_seed(seed)
    v = (torch.randn(shape, generator=g) * 60).clamp(-448, 448).to(torch.float8_e4m3fn).float() * 4
    v[..., ::pin_rows, :] = 4 * 448.0
    return v.bfloat16()


@pytest.mark.parametrize("per_expert", [False, True])
def test_token_block_codes_exact(per_expert):
    """The token-block cast's codes (written four tokens a word) equal the reference's byte for
    byte at every used column: exact quotients, experts of 300 / 0 / 140 rows and tail rows."""
    from moe_ops.kernels.token_block_quant import padded_columns, token_block_quant
    offs = torch.tensor([300, 300, 440], dtype=torch.int32)
    t = _fp8_exact((460, 48), 21, 2)
    q_ref, s_ref, used = _padded_reference(t, offs, per_expert)
    cols = padded_columns(offs, 460)
    cols = cols[cols >= 0]
    # 2 token blocks a step: the 300-row expert's 3 in 2 steps; per expert, the second pass's next
    # block loaded ahead
    for config in (None, (16, 4, True, 2), *([(16, 4, True, 1, True)] if per_expert else [])):
        q, s = token_block_quant(t, offs, per_expert, config)
        assert torch.equal(q.view(torch.uint8)[:, cols], q_ref.view(torch.uint8)[:, cols])
        assert torch.equal(s, s_ref) if per_expert else torch.equal(s[used], s_ref[used])
    assert torch.all(s_ref[used] == 4.0)


@pytest.mark.parametrize("n", [200, 130])  # W^T's rows in whole words (200), and not (130: bytes)
def test_fp8_weight_block_codes_exact(n):
    """fp8 block casts of W and W^T (separately and as the pair) equal formats.quantize's codes
    byte for byte on exact quotients; the pair's word and byte stores of W^T write the same bytes."""
    from moe_ops.kernels.weight_quant import fp8_weight_quant
    w = _fp8_exact((3, n, 300), 22, 64)
    w[1, :, :128] = 0  # all-zero tiles: scale 0, codes 0
    want = moe_ops.formats.quantize(w, "fp8_e4m3", "block", 0)[:2]
    want_t = moe_ops.formats.quantize(w.transpose(1, 2).contiguous(), "fp8_e4m3", "block", 0)[:2]
    got = fp8_weight_quant(w, "block") + fp8_weight_quant(w, "block", True)
    for got_parts in (got, fp8_weight_quant(w, "block", pair=True)):
        for a, b in zip(got_parts, want + want_t):
            assert torch.equal(a.view(torch.uint8), b.view(torch.uint8))
    if n % 4 == 0:
        words = fp8_weight_quant(w, "block", pair=True, words=True)
        plain = fp8_weight_quant(w, "block", pair=True, words=False)
        for a, b in zip(words, plain):
            assert torch.equal(a.view(torch.uint8), b.view(torch.uint8))
    else:
        with pytest.raises(ValueError, match="multiple of 4"):
            fp8_weight_quant(w, "block", pair=True, words=True)
    with pytest.raises(ValueError, match="pair only"):
        fp8_weight_quant(w, "block", True, words=True)


TMA_TILE = KernelConfig(32, 32, 32, 4, 1, tma=True)
TMA_CASES = [("none", "none", 0, "none"), ("fp8_e4m3", "channel", 0, "none"), ("fp8_e5m2", "tensor", 0, "none"),
             ("fp8_e4m3", "channel", 0, "fp8_token"), ("fp8_e4m3", "block", 0, "fp8_1x128"),
             ("int4_asym", "group", 16, "none"), ("int8_sym", "channel", 0, "none")]


@pytest.mark.parametrize("k", [K, 80])  # 80: a partial last K tile
@pytest.mark.parametrize("fmt,gran,gs,act", TMA_CASES)
def test_tma_tiles_equal_pointer_loads(fmt, gran, gs, act, k, monkeypatch):
    """``KernelConfig.tma``: x and W tiles through TMA descriptors (rows of the next expert and
    columns past K read as zero by the descriptor, masked at the store) give the pointer-load
    tile's output, forward and dgrad, on ragged experts with an empty one, within float32
    summation order (the interpreter's float dot is a BLAS call whose order can change with the other rows of the
    tile, which differ: zeros against the next expert's rows; the GPU test checks bits)."""
    x, w, offs = _data(hash((fmt, gran, act, k)) % 997, torch.float16, k)
    args = (w.half(), None, None, "none", "none", 0) if fmt == "none" else \
        moe_ops.quantize_weight(w.half(), fmt, gran, gs).op_args()
    seen = spy_tma_operands(monkeypatch)
    y = _run(x, args, offs, act, TMA_TILE)
    int_codes = fmt.startswith("int")
    assert seen == [(True, 0 if int_codes else 1)]  # integer codes: x by TMA, W by pointers
    ref = _run(x, args, offs, act, KernelConfig(32, 32, 32, 4, 1))
    assert rel_err(y, ref) < 1e-4
    if act == "none" and not int_codes:  # dgrad: W's stored [E, N, K] read as [E, K, N] tiles
        dy = torch.randn(M, N, generator=torch.Generator().manual_seed(3)).half()
        dx = [dispatch.grouped_mm_dgrad(dy, *args[:3], offs, *args[3:], "none", config=c)
              for c in (TMA_TILE, KernelConfig(32, 32, 32, 4, 1))]
        assert seen[-2] == (True, 2) and rel_err(dx[0], dx[1]) < 1e-4
        assert torch.all(dx[0][int(offs[-1]):] == 0)


# (format, granularity, group, K tile, K, W's tile by TMA): int4 rows of 48 bytes (K = 96), fp8
# and int8 rows of 80 and plain fp16 rows of 160 take it, int4 rows of 40 bytes (K = 80) and 8-byte
# boxes (16 int4 columns) do not
@pytest.mark.parametrize("fmt,gran,gs,bk,k,tma_w", [("fp16", "none", 0, 32, 80, 1),
                                                    ("int4_asym", "group", 32, 32, 96, 1),
                                                    ("int4_sym", "channel", 0, 64, 96, 1),
                                                    ("fp8_e4m3", "channel", 0, 32, 80, 1),
                                                    ("int8_asym", "channel", 0, 32, 80, 1),
                                                    ("int4_asym", "group", 16, 16, 96, 0),
                                                    ("int4_sym", "channel", 0, 32, 80, 0)])
def test_tma_in_the_w_lhs_tile(fmt, gran, gs, bk, k, tma_w, monkeypatch):
    """The ``w_lhs`` tile (dequantized weight as the MMA's left operand) with x and, where its
    layout allows, W's stored tile by TMA: the pointer-load tile's output, on ragged experts
    with an empty one (a partial last K tile under channel scales), and zero rows past
    ``offs[-1]``."""
    x, w, offs = _data(hash((fmt, gran, k)) % 997, torch.float16, k)
    args = moe_ops.quantize_weight(w.half(), fmt, gran, gs).op_args()
    metas = spy_tile_meta(monkeypatch)
    seen = spy_tma_operands(monkeypatch)
    y = _run(x, args, offs, "none", KernelConfig(32, 32, bk, 4, 1, w_lhs=True, tma=True))
    assert seen == [(True, tma_w)] and metas[0]["W_LHS"]
    ref = _run(x, args, offs, "none", KernelConfig(32, 32, bk, 4, 1, w_lhs=True))
    assert seen[-1] == (False, 0) and rel_err(y, ref) < 1e-4


def test_tma_w_in_the_fused_mlp_w_lhs_tiles(monkeypatch):
    """The fused expert MLP on int4 codes with ``w_lhs`` tiles marked ``tma``: the gate/up
    launch (x gathered: by pointers) takes its gate rows and its up rows (``N + n``, second K
    loop) by TMA, the down launch x and W; the same output as the pointer-load tiles."""
    seen = spy_tma_operands(monkeypatch)
    H, I, T_ = 64, 32, 30
    g = torch.Generator().manual_seed(11)
    x16 = torch.randn(T_, H, generator=g).half()
    q1 = moe_ops.quantize_weight(torch.randn(E, 2 * I, H, generator=g).half(), "int4_asym", "group", 32).op_args()
    q2 = moe_ops.quantize_weight(torch.randn(E, H, I, generator=g).half(), "int4_asym", "group", 32).op_args()
    r = moe_ops.route(torch.randn(T_, E, generator=g), 2)
    outs = []
    for tma in (True, False):
        cfg = KernelConfig(32, 32, 32, 4, 1, w_lhs=True, tma=tma)
        outs.append(dispatch.expert_mlp(x16, r.weights, r.sorted_rows, r.offs, *q1[:3], *q2[:3], "int4_asym", "group",
                                        32, 32, "none", "none", configs=(cfg, cfg)))
    assert seen[:2] == [(False, 1), (True, 1)] and seen[2:] == [(False, 0), (False, 0)]
    assert rel_err(outs[0], outs[1]) < 1e-4


def test_tma_falls_back_where_the_layout_does_not_allow(monkeypatch):
    """Rows not 16-byte aligned (K = 84 halves), a gathered x (the expert MLP's gate/up) or
    interleaved gate/up rows take pointer loads for that operand; int8 x int8 tiles and packed
    codes unpacked one sub-dot a field (decode tiles) none; W's codes in ``w_lhs`` tiles of more
    than 128 rows by pointers."""
    seen = spy_tma_operands(monkeypatch)
    x, w, offs = _data(5, torch.float16, 84)
    _run(x, (w.half(), None, None, "none", "none", 0), offs, "none", TMA_TILE)
    assert seen[-1] == (False, 0)
    x, w, offs = _data(5, torch.float16)
    for fmt, act, cfg in (("int8_sym", "int8_token", TMA_TILE),
                          ("int4_asym", "none", KernelConfig(16, 32, 32, 4, 1, tma=True))):
        _run(x, moe_ops.quantize_weight(w.half(), fmt, "channel", 0).op_args(), offs, act, cfg)
        assert seen[-1] == (False, 0)
    # w_lhs tiles of more than 128 rows: x by TMA, W's codes by pointers
    _run(x, moe_ops.quantize_weight(w.half(), "int4_asym", "channel", 0).op_args(), offs, "none",
         KernelConfig(256, 32, 32, 4, 1, w_lhs=True, tma=True))
    assert seen[-1] == (True, 0)
    x16 = x[:, :64].contiguous()
    w1 = torch.randn(E, 2 * 32, 64).half()
    w2 = torch.randn(E, 64, 32).half()
    r = moe_ops.route(torch.randn(x16.shape[0] // 2, E), 2)
    seen.clear()
    for one_loop in (False, True):
        cfg = KernelConfig(32, 32, 32, 4, 1, tma=True, one_loop=one_loop)
        outs = [dispatch.expert_mlp(x16[: r.weights.shape[0]], r.weights, r.sorted_rows, r.offs, w1, None, None, w2,
                                    None, None, "none", "none", 0, 0, "none", "none", configs=cfgs)
                for cfgs in ((cfg, TMA_TILE), (KernelConfig(32, 32, 32, 4, 1, one_loop=one_loop),
                                               KernelConfig(32, 32, 32, 4, 1)))]
        assert rel_err(outs[0], outs[1]) < 1e-4  # the gate/up rows [N + n] of the up tile by TMA too
    # gate/up: x gathered (W by TMA unless the rows interleave); down: both
    assert [seen[i] for i in (0, 1, 4, 5)] == [(False, 1), (True, 1), (False, 0), (True, 1)]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_wgrad_tma_chunks_equal_pointer_loads(dtype, monkeypatch):
    """The bf16/fp16 wgrad with TMA descriptors for an expert's whole row chunks and masked
    pointer loads for its last, part-filled chunk: equal to the pointer-load kernel (rows past
    an expert's range, which the descriptor would read, must not enter its sum); an empty
    expert gets exact zeros; N and K off the tile."""
    x, _, offs = _data(13, dtype)
    dy = torch.randn(M, N, generator=torch.Generator().manual_seed(14)).to(dtype)
    seen = []
    orig = dispatch.launch.launch
    monkeypatch.setattr(dispatch.launch, "launch", lambda k, g, kw, d, **o: seen.append(sorted(d)) or orig(k, g, kw, d, **o))
    cfg = (16, 32, 32, 4, 1)  # 16-row chunks: every expert of 45 ragged rows has whole and partial ones
    from moe_ops.kernels.grouped_wgrad import launch_wgrad
    with_tma = launch_wgrad(dy, x, offs, dtype, cfg, interpret=True, tma=True)
    plain = launch_wgrad(dy, x, offs, dtype, cfg, interpret=True, tma=False)
    assert seen == [["dy_desc", "x_desc"], []]
    assert torch.all(with_tma[1] == 0)
    assert rel_err(with_tma, plain) < 1e-4
    ref = reference.grouped_mm_wgrad(dy[: int(offs[-1])].double(), x[: int(offs[-1])].double(), offs, "none")
    assert rel_err(with_tma, ref) < (1e-3 if dtype == torch.float16 else 1.6e-2)


PERSISTENT_TILE = KernelConfig(16, 32, 32, 4, 2, group_m=2)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("k", [K, 80])  # 80: a partial last K tile
def test_persistent_gemm_forward_and_dgrad(dtype, k):
    """:mod:`moe_ops.kernels.persistent_gemm`: three programs loop over the tiles of ragged
    experts (an empty one; rows past offs[-1] written as zeros by the second loop), 16-row tiles
    (experts span several, part-filled ones read the next expert's rows, masked at the store),
    GROUP_M 2, N and K off the tile; forward and dgrad against the float64 reference."""
    x, w, offs = _data(hash((str(dtype), k)) % 997, dtype, k)
    dy = torch.randn(M, N, generator=torch.Generator().manual_seed(8)).to(dtype)
    _persistent_against_reference(x, w.to(dtype), dy, offs, PERSISTENT_TILE)


def _persistent_against_reference(x, w, dy, offs, tile):
    """The persistent kernel's forward (``x``) and dgrad (``dy``) at ``tile``, outputs poisoned
    with NaN: every row written, rows past offs[-1] zero, within the output's rounding of the
    float64 reference."""
    from moe_ops.kernels import persistent_gemm
    bound = 1e-3 if x.dtype == torch.float16 else 8e-3  # the output's rounding
    for dgrad, a in ((False, x), (True, dy)):
        out = torch.full((x.shape[0], w.shape[2] if dgrad else w.shape[1]), float("nan"), dtype=x.dtype)
        persistent_gemm.launch_persistent(a, w, out, offs, tile, dgrad=dgrad)
        args = (a.double(), w.double(), None, None, offs, "none", "none", 0, "none")
        ref = reference.grouped_mm_dgrad(*args) if dgrad else reference.grouped_mm(*args, "none")
        assert not torch.isnan(out).any() and torch.all(out[int(offs[-1]):] == 0)
        assert rel_err(out, ref) < bound


# experts' rows for the half tiles (32-row tiles): remainders 8, 11 and 16 (a 16-row half tile
# each, after 1, 2 and 0 full tiles), 20 (a full tile), none (an empty expert, a whole one)
HALF_SIZES = (40, 0, 75, 20, 64, 16)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_persistent_gemm_half_tiles(dtype):
    """``KernelConfig.half_m`` (the kernel's ``HALF_M``): an expert's last row tile of at most
    half the tile's rows runs as a half-height tile in a second loop (x by its own descriptor),
    continuing the round robin over three programs. Forward and dgrad against the float64
    reference; rows past offs[-1] zero; the int8 W8A8 path (``ACT`` 1) through the half tiles
    equal to the reference bit for bit in fp16 (exact int32 sums, whatever the tile)."""
    from moe_ops.kernels import persistent_gemm
    g = torch.Generator().manual_seed(31)
    offs = torch.cumsum(torch.tensor(HALF_SIZES), 0).to(torch.int32)
    m, e, n, k = int(offs[-1]) + 5, len(HALF_SIZES), 40, 48  # N and K off the 32-wide tiles
    x = torch.randn(m, k, generator=g).to(dtype)
    w = torch.randn(e, n, k, generator=g).to(dtype)
    tile = KernelConfig(32, 32, 32, 4, 2, group_m=2, half_m=True)
    _persistent_against_reference(x, w, torch.randn(m, n, generator=g).to(dtype), offs, tile)
    if dtype == torch.float16:
        args = moe_ops.quantize_weight(w.float(), "int8_sym", "channel", 0).op_args()
        xq, xs = dispatch.quantize_act(x, "int8_token")
        ws, _, st = dispatch._scale_operands(args[0], args[1], args[2], "channel", transposed=False)
        yq = torch.full((m, n), float("nan"), dtype=dtype)
        persistent_gemm.launch_persistent(xq, args[0], yq, offs, tile, dgrad=False,
                                          scales=(xs, ws, (xs.stride(0), st[0], st[1])))
        assert torch.equal(yq, reference.grouped_mm(x, *args[:3], offs, *args[3:], "int8_token", "none"))
    with pytest.raises(ValueError, match="half_m"):
        persistent_gemm.launch_persistent(x, w, torch.empty(m, n, dtype=dtype), offs,
                                          KernelConfig(16, 32, 32, 4, 2, half_m=True), dgrad=False)
    with pytest.raises(ValueError, match="half_m"):  # a config given to a call: the one-program-a-tile kernel's
        dispatch.grouped_mm(x, w, None, None, offs, "none", "none", 0, "none", "none", config=tile)


@pytest.mark.parametrize("gran", ["channel", "tensor"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_persistent_gemm_int8_path(gran, dtype):
    """The persistent kernel's ``ACT`` 1 path (int8_token x codes, int8_sym W codes, exact int32
    sums, ``(acc * xs) * ws`` once at the end): three programs over ragged experts (an empty
    one, rows past offs[-1] zero), 16-row tiles, N and K off the tile; equal bit for bit to the
    one-program-a-tile kernel, and to the reference (the spec's exact integer path) in fp16: the
    interpreter's float32 -> bf16 conversion truncates (bf16 equal or one step toward zero here;
    exact on the GPU: ``test_persistent_int8_w8a8``)."""
    from moe_ops.kernels import persistent_gemm
    x, w, offs = _data(hash((gran, str(dtype), "int8p")) % 997, dtype, k=80)
    qw = moe_ops.quantize_weight(w, "int8_sym", gran, 0)
    args = qw.op_args()
    xq, xs = dispatch.quantize_act(x, "int8_token")
    ws, _, st = dispatch._scale_operands(args[0], args[1], args[2], gran, transposed=False)
    y = torch.full((M, N), float("nan"), dtype=dtype)
    persistent_gemm.launch_persistent(xq, args[0], y, offs, PERSISTENT_TILE, dgrad=False,
                                      scales=(xs, ws, (xs.stride(0), st[0], st[1])))
    assert not torch.isnan(y).any() and torch.all(y[int(offs[-1]):] == 0)
    assert torch.equal(y, _run(x, args, offs, "int8_token", KernelConfig(16, 32, 32, 4, 2, group_m=2)))
    ref = reference.grouped_mm(x, *args[:3], offs, *args[3:], "int8_token", "none")
    if dtype == torch.float16:
        assert torch.equal(y, ref)
    else:  # each output the reference's, or one bf16 step from it toward zero (truncated)
        yd, rd = y.double(), ref.double()
        assert torch.all((yd == rd) | ((yd.abs() < rd.abs()) & ((rd - yd).abs() <= rd.abs() * 2.0 ** -7)))


def test_persistent_gemm_int8_is_the_w8a8_choice_where_it_serves(monkeypatch):
    """int8_token x and int8_sym W with channel or tensor scales above 64 rows per expert take the
    persistent kernel (exact: equal to the reference); int8_asym W, group scales, 64 rows per
    expert or fewer, and an explicit config take the one-program-a-tile kernel."""
    taken = spy_persistent_launches(monkeypatch)
    g = torch.Generator().manual_seed(41)
    m, n, k = 300, 40, 64  # 100 rows per expert (the static bound M / E)
    offs = torch.tensor([0, 150, 290], dtype=torch.int32)  # an empty expert, 10 rows past offs[-1]
    x = torch.randn(m, k, generator=g).half()
    w = torch.randn(3, n, k, generator=g)
    for fmt, gran, gs, persistent in (("int8_sym", "channel", 0, True), ("int8_sym", "tensor", 0, True),
                                      ("int8_asym", "channel", 0, False), ("int8_sym", "group", 32, False)):
        args = moe_ops.quantize_weight(w, fmt, gran, gs).op_args()
        y = torch.full((m, n), float("nan"), dtype=torch.float16)
        dispatch.grouped_mm(x, *args[:3], offs, *args[3:], "int8_token", "none", out=y)
        assert torch.equal(y, reference.grouped_mm(x, *args[:3], offs, *args[3:], "int8_token", "none"))
        assert taken == ([False] if persistent else []), (fmt, gran)
        taken.clear()
    args = moe_ops.quantize_weight(w, "int8_sym", "channel", 0).op_args()
    dispatch.grouped_mm(x[:150], *args[:3], offs.clamp(max=150), *args[3:], "int8_token", "none")  # 50 a expert
    dispatch.grouped_mm(x, *args[:3], offs, *args[3:], "int8_token", "none", config=CONFIGS["prefill"])
    assert taken == []


def test_persistent_gemm_is_the_prefill_choice_where_it_serves(monkeypatch):
    """16-bit plain weights above 64 rows per expert take the persistent kernel, forward and
    dgrad (its tile from ``choose_persistent_config``: 128x256); quantized weights, float32,
    rows not 16-byte aligned, an explicit config or decode sizes take the one-program-a-tile
    kernel."""
    taken = spy_persistent_launches(monkeypatch)
    g = torch.Generator().manual_seed(21)
    m, e, n, k = 300, 2, 48, 64
    offs = torch.tensor([120, 290], dtype=torch.int32)
    x = torch.randn(m, k, generator=g).half()
    w = torch.randn(e, n, k, generator=g).half()
    y = dispatch.grouped_mm(x, w, None, None, offs, "none", "none", 0, "none", "none")
    ref = reference.grouped_mm(x.double(), w.double(), None, None, offs, "none", "none", 0, "none", "none")
    assert taken == [False] and rel_err(y, ref) < 1e-3 and torch.all(y[290:] == 0)
    dy = torch.randn(m, n, generator=g).half()
    dx = dispatch.grouped_mm_dgrad(dy, w, None, None, offs, "none", "none", 0, "none")
    assert taken == [False, True]
    assert rel_err(dx, reference.grouped_mm_dgrad(dy.double(), w.double(), None, None, offs, "none", "none", 0,
                                                  "none")) < 1e-3
    q = moe_ops.quantize_weight(w, "fp8_e4m3", "channel", 0).op_args()
    dispatch.grouped_mm(x, *q[:3], offs, *q[3:], "none", "none")
    dispatch.grouped_mm(x.float(), w.float(), None, None, offs, "none", "none", 0, "none", "none")
    dispatch.grouped_mm(x[:, :60].contiguous(), w[:, :, :60].contiguous(), None, None, offs, "none", "none", 0, "none", "none")
    dispatch.grouped_mm(x, w, None, None, offs, "none", "none", 0, "none", "none", config=CONFIGS["prefill"])
    dispatch.grouped_mm(x[:100], w, None, None, torch.tensor([50, 100], dtype=torch.int32), "none", "none", 0,
                        "none", "none")
    assert taken == [False, True]


def test_persistent_gemm_fp8_path(monkeypatch):
    """fp8_token x and e4m3 channel / e5m2 tensor-scaled W above 512 rows per expert take the
    persistent kernel's ACT 2 path (each K tile's product promoted, ``(acc * xs) * ws`` at the
    end): equal to the one-program-a-tile kernel at the same 128x128x256 tile; rows past
    offs[-1] zero; K not a multiple of 256 keeps the one-program-a-tile kernel."""
    taken = spy_persistent_launches(monkeypatch)
    g = torch.Generator().manual_seed(31)
    m, n = 1700, 40  # 567 rows per expert (the static bound M / E)
    offs = torch.tensor([0, 900, 1690], dtype=torch.int32)  # an empty expert, 10 rows past offs[-1]
    for fmt, gran, k in (("fp8_e4m3", "channel", 256), ("fp8_e5m2", "tensor", 256), ("fp8_e4m3", "channel", 240)):
        x = torch.randn(m, k, generator=g).bfloat16()
        qw = moe_ops.quantize_weight(torch.randn(3, n, k, generator=g).bfloat16(), fmt, gran, 0)
        q = qw.op_args()
        # x cast once, 32 rows a program (the interpreter's cost is per program; the cast's own
        # test is test_act_quant_kernel_int8_exact_and_scales), its codes given to both GEMMs
        qx, sx = dispatch.quantize_act(x, "fp8_token", (32, 256, 4))
        y = torch.full((m, n), float("nan"), dtype=torch.bfloat16)
        dispatch.grouped_mm(x, *q[:3], offs, *q[3:], "fp8_token", "none", out=y, prequantized=(qx, sx))
        assert not torch.isnan(y).any() and torch.all(y[1690:] == 0)
        if k % 256 == 0:
            assert torch.equal(y, dispatch.grouped_mm(x, *q[:3], offs, *q[3:], "fp8_token", "none",
                                                      config=KernelConfig(128, 128, 256, 8, 3, tma=True),
                                                      prequantized=(qx, sx)))
        # the product of the kernel's own x codes (the interpreter rounds float32 -> float8 its own
        # way: test_forward_fp8_activations) in float64
        xh = moe_ops.activations.dequantize_blocks_lastdim(qx, sx, k, torch.float64)
        oracle = reference.segment_mm(xh, moe_ops.dequantize_weight(qw, torch.float64), offs, "nt")
        assert rel_err(y, oracle) < 8e-3  # the bf16 output's rounding
    assert taken == [False, False]  # the two K % 256 == 0 cases
