"""GPU tests of the Triton forward kernels (marked ``gpu``; skipped where no CUDA/XPU device).

Fresh random data per case, outputs poisoned (the caching allocator hands the kernel a block
just filled with NaN), checked against the float64 oracle (CPU) with per-format bounds.
"""
import pytest
import torch

import moe_ops
from moe_ops.kernels import dispatch
from moe_ops.lowering.kernel_choice import KernelConfig, choose_forward_config
from helpers import (GPU_BOUND_BF16, oracle_grouped_mm, ragged_offs, rel_err, spy_persistent_launches,
                     spy_tile_meta, spy_tma_operands, tma_capable, weight_cases)

DEV = "cuda" if torch.cuda.is_available() else ("xpu" if hasattr(torch, "xpu") and torch.xpu.is_available() else None)
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(DEV is None, reason="needs a CUDA or XPU device")]


def _poison(M, N, dtype):
    t = torch.full((M, N), float("nan"), dtype=dtype, device=DEV)
    del t


def _case(seed, M, E, N, K, tail=5):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(M, K, generator=g).bfloat16()
    w = torch.randn(E, N, K, generator=g) * 0.05
    offs = ragged_offs(M, E, g, empty=(2,), tail=tail)
    return x, w, offs


# (M, E, N, K); "gemv": under 1/8 row per expert (16-bit weights and packed int4/int2 codes: the
# CUDA-core decode tiles)
SHAPES = {"prefill": (2000, 8, 384, 512), "decode": (48, 16, 384, 512), "gemv": (7, 64, 300, 512)}


@pytest.mark.parametrize("shape", list(SHAPES))
@pytest.mark.parametrize("fmt,gran,gs", [("none", "none", 0)] + weight_cases())
def test_forward_formats(fmt, gran, gs, shape):
    M, E, N, K = SHAPES[shape]
    gs = 128 if gran == "group" else 0
    x, w, offs = _case(hash((fmt, gran, shape)) % 10000, M, E, N, K)
    if fmt == "none":
        wq, args = w.bfloat16(), (w.bfloat16(), None, None, "none", "none", 0)
    else:
        wq = moe_ops.quantize_weight(w.bfloat16(), fmt, gran, gs)
        args = wq.op_args()
    bits = 16 if fmt == "none" else moe_ops.formats.get_format(fmt).bits
    # CUDA-core tiles at under 1/8 row per expert: 16-bit weights, and packed int4/int2 codes
    assert choose_forward_config(M, N, K, E, bits, gs or K).gemv == (shape == "gemv" and bits != 8)
    _poison(M, N, torch.bfloat16)
    y = moe_ops.grouped_mm(x.to(DEV), wq.to(DEV), offs.to(DEV))
    ref = oracle_grouped_mm(x, args, offs)
    assert not torch.isnan(y).any()
    assert rel_err(y.cpu(), ref) < GPU_BOUND_BF16
    assert torch.all(y[int(offs[-1]):] == 0)


def _run_tile(x, wq, offs, config):
    """``grouped_mm`` at tile ``config`` on the device (output poisoned with NaN) against the
    float64 oracle; rows past ``offs[-1]`` must be zeros."""
    M, N = x.shape[0], wq.shape[1]
    args = wq.op_args()
    out = torch.full((M, N), float("nan"), dtype=x.dtype, device=DEV)
    dev_args = [a.to(DEV) if torch.is_tensor(a) else a for a in args]
    y = dispatch.grouped_mm(x.to(DEV), *dev_args[:3], offs.to(DEV), *dev_args[3:], "none", "none",
                            config=config, out=out)
    ref = oracle_grouped_mm(x, args, offs)
    assert not torch.isnan(y).any()
    assert rel_err(y.cpu(), ref) < GPU_BOUND_BF16
    assert torch.all(y[int(offs[-1]):] == 0)


W_LHS_TILES = {"prefill": KernelConfig(256, 128, 64, 8, 3, w_lhs=True),
               "decode": KernelConfig(16, 128, 128, 4, 3, group_m=1, w_lhs=True)}


@pytest.mark.parametrize("shape", list(W_LHS_TILES))
@pytest.mark.parametrize("fmt,gran,gs", weight_cases())
def test_forward_w_lhs_tiles(fmt, gran, gs, shape):
    """The weight-as-left-operand kernel (``KernelConfig.w_lhs``) at tiles that take wgmma."""
    M, E, N, K = SHAPES[shape]
    gs = 128 if gran == "group" else 0
    x, w, offs = _case(hash((fmt, gran, shape, "w_lhs")) % 10000, M, E, N, K)
    _run_tile(x, moe_ops.quantize_weight(w.bfloat16(), fmt, gran, gs), offs, W_LHS_TILES[shape])


@pytest.mark.parametrize("shift", [0.0, 4.0])  # 4: x = |x| + 4: a wrong zero point shows in full
@pytest.mark.parametrize("config", [KernelConfig(16, 64, 128, 4, 4, group_m=1, w_lhs=True),
                                    KernelConfig(16, 128, 64, 4, 3, group_m=1, w_lhs=True),
                                    KernelConfig(16, 64, 128, 4, 3, group_m=1, w_lhs=True, tma=True),
                                    KernelConfig(16, 128, 128, 4, 3, group_m=1, w_lhs=True, tma=True)], ids=str)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("fmt", ["int4_asym", "int4_sym"])
def test_forward_int4_decode_16bit_codes(fmt, dtype, config, shift):
    """int4 decode tiles with the weight as the register operand: codes biased in x's 16-bit
    type (bf16 128 + q, fp16 1024 + q), the scale on the K tile's sums; both dtypes, x and W by
    pointers and by TMA (the table's tiles); ``shift``: x = |x| + 4 (x's sums far from zero, so an
    error in the codes' zero point does not cancel)."""
    M, E, N, K = SHAPES["decode"]
    x, w, offs = _case(hash((fmt, str(dtype), str(config), shift, "codes16")) % 10000, M, E, N, K)
    if shift:
        x = (x.float().abs() + shift).bfloat16()
    _run_tile(x.to(dtype), moe_ops.quantize_weight(w.to(dtype), fmt, "group", 128), offs, config)


@pytest.mark.parametrize("config", [KernelConfig(1, 32, 128, 4, 2, group_m=1, gemv=True),
                                    KernelConfig(1, 64, 64, 2, 3, group_m=1, gemv=True),
                                    KernelConfig(1, 32, 128, 4, 3, group_m=1, gemv=True, k_split=2),
                                    KernelConfig(1, 16, 128, 8, 2, group_m=1, gemv=True, k_split=4)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("fmt,gran", [("int4_asym", "group"), ("int4_sym", "group"), ("int4_asym", "channel"),
                                      ("int2_asym", "group"), ("int2_sym", "channel")])
def test_forward_packed_gemv(fmt, gran, dtype, config):
    """int4/int2 codes read as 32-bit words on the CUDA cores (one row a tile, the weight words
    prefetched 1-2 K tiles ahead, 1-4 K tiles a step), at the shape where gemv tiles are chosen:
    7 rows over 64 experts, K = 512 (four 128-column groups)."""
    M, E, N, K = SHAPES["gemv"]
    x, w, offs = _case(hash((fmt, gran, str(dtype), config.block_n, "packed_gemv")) % 10000, M, E, N, K)
    _run_tile(x.to(dtype), moe_ops.quantize_weight(w.to(dtype), fmt, gran, 128 if gran == "group" else 0), offs,
              config)


@pytest.mark.parametrize("config", [None, KernelConfig(16, 128, 128, 4, 3, group_m=1, w_lhs=True),
                                    KernelConfig(256, 128, 64, 8, 3, w_lhs=True)])
@pytest.mark.parametrize("fmt", ["int4_asym", "int8_sym", "fp8_e4m3"])
def test_forward_partial_k_tile(fmt, config):
    """K = 520, channel scales: the last K tile is partial (x's columns masked)."""
    M, E, N, K = 300, 8, 384, 520
    x, w, offs = _case(hash((fmt, str(config), "partial_k")) % 10000, M, E, N, K)
    wq = moe_ops.quantize_weight(w.bfloat16(), fmt, "channel", 0)
    bits = moe_ops.formats.get_format(fmt).bits
    _run_tile(x, wq, offs, config or choose_forward_config(M, N, K, E, bits, K))


@pytest.mark.parametrize("shape", list(SHAPES))
@pytest.mark.parametrize("fmt,gran,gs", weight_cases([f for f in moe_ops.QUANTIZED_FORMATS if f.startswith("int")]))
def test_int8_token_bit_exact(fmt, gran, gs, shape):
    M, E, N, K = SHAPES[shape]
    gs = 128 if gran == "group" else 0
    x, w, offs = _case(hash((fmt, gran, shape, 1)) % 10000, M, E, N, K)
    qw = moe_ops.quantize_weight(w, fmt, gran, gs)
    _poison(M, N, torch.bfloat16)
    y = moe_ops.grouped_mm(x.to(DEV), qw.to(DEV), offs.to(DEV), act_quant="int8_token").cpu()
    ref = moe_ops.reference.grouped_mm(x, *qw.op_args()[:3], offs, *qw.op_args()[3:], "int8_token", "none")
    if gran == "group":  # float32 sums over groups in another order: rounding of bf16 output only
        assert rel_err(y, ref) < 4e-3
    else:
        assert torch.equal(y, ref)


@pytest.mark.parametrize("mode,fmt,gran", [("fp8_token", "fp8_e4m3", "channel"), ("fp8_1x128", "fp8_e4m3", "block"),
                                           ("fp8_token", "fp8_e5m2", "tensor"), ("fp8_1x128", "fp8_e4m3", "group")])
def test_fp8_activations(mode, fmt, gran):
    M, E, N, K = SHAPES["prefill"]
    x, w, offs = _case(21, M, E, N, K)
    qw = moe_ops.quantize_weight(w, fmt, gran, 128)
    _poison(M, N, torch.bfloat16)
    y = moe_ops.grouped_mm(x.to(DEV), qw.to(DEV), offs.to(DEV), act_quant=mode).cpu()
    ref = moe_ops.reference.grouped_mm(x.double(), *qw.op_args()[:3], offs, *qw.op_args()[3:], mode, "none")
    assert rel_err(y, ref) < 2e-2


@pytest.mark.parametrize("fmt,gran", [("fp8_e4m3", "channel"), ("fp8_e5m2", "tensor")])
def test_fp8_dot_k_tile_256(fmt, gran, monkeypatch):
    """fp8_token x fp8 W above 512 rows an expert: the default tile takes 256-column K tiles
    (half the float32 promotions), in the persistent kernel on TMA devices (its ACT 2 path:
    the same sums as the one-program-a-tile kernel at that tile); against the float64 product
    of the same codes it is as accurate as the 128-column tile (the tensor core sums at most
    one K tile before each promotion), on ragged experts with an empty one, outputs poisoned."""
    taken = spy_persistent_launches(monkeypatch)
    M, E, N, K = 2600, 4, 384, 1792
    x, w, offs = _case(hash((fmt, gran, "k256")) % 10000, M, E, N, K)
    assert int((offs - torch.cat([offs.new_zeros(1), offs[:-1]])).max()) > 512
    qw = moe_ops.quantize_weight(w, fmt, gran, 0)
    args = [a.to(DEV) if torch.is_tensor(a) else a for a in qw.op_args()]
    xq, xs = dispatch.quantize_act(x.to(DEV), "fp8_token")
    wide = choose_forward_config(M, N, K, E, 8, K, act_bits=8, fp8_dot=True)
    assert wide.block_k == 256 and wide.tma
    ref = moe_ops.reference.segment_mm(xq.cpu().double() * xs.cpu().double(),
                                       moe_ops.dequantize_weight(qw, torch.float64), offs, "nt")
    errs = {}
    for cfg in (None, wide, KernelConfig(128, 128, 128, 8, 4, tma=True)):
        out = torch.full((M, N), float("nan"), dtype=torch.bfloat16, device=DEV)
        y = dispatch.grouped_mm(x.to(DEV), *args[:3], offs.to(DEV), *args[3:], "fp8_token", "none", config=cfg,
                                out=out, prequantized=(xq, xs))
        assert not torch.isnan(y).any() and torch.all(y[int(offs[-1]):] == 0)
        errs[cfg] = rel_err(y.cpu(), ref)
    assert len(taken) == (1 if tma_capable() else 0)
    assert errs[None] == errs[wide]  # the default is the 256-column tile
    assert errs[wide] < 5e-3, errs  # bf16 output rounding and the tensor core's sums
    assert errs[wide] < 1.2 * errs[KernelConfig(128, 128, 128, 8, 4, tma=True)], errs


@pytest.mark.parametrize("shape", [(300, 1000), (37, 5000), (50, 768), (9, 2048)])  # every per-row tiling
@pytest.mark.parametrize("mode", ["int8_token", "fp8_token", "fp8_1x128"])
def test_act_quant_kernel_bit_exact(mode, shape):
    from moe_ops.kernels import dispatch
    x = torch.randn(*shape, dtype=torch.bfloat16) * 3
    qr, sr = moe_ops.activations.quantize_act(x, mode)
    for qk, sk in (dispatch.quantize_act(x.to(DEV), mode), moe_ops.quantize_act(x.to(DEV), mode)):
        assert torch.equal(sk.cpu(), sr)
        assert torch.equal(qk.cpu().view(torch.uint8), qr.view(torch.uint8))


def _sync_free_and_replayed(fn, xd, *more):
    """``fn(xd)`` (and ``more``: other calls) under sync-debug "error" after a warm-up call (the
    kernels' compilation), then ``fn(xd)`` captured in a CUDA graph and replayed on new ``xd``
    data: equal to an eager call on that data, and different from the first output."""
    fn(xd)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        y = fn(xd)
        for call in more:
            call()
    finally:
        torch.cuda.set_sync_debug_mode(0)
    g = torch.cuda.CUDAGraph()
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        fn(xd)
    torch.cuda.current_stream().wait_stream(s)
    with torch.cuda.graph(g):
        yg = fn(xd)
    xd.copy_(torch.randn_like(xd))
    g.replay()
    torch.cuda.synchronize()
    assert torch.equal(yg, fn(xd))
    assert not torch.equal(yg, y)


def test_sync_free_and_cuda_graph():
    if DEV != "cuda":
        pytest.skip("CUDA-only checks")
    M, E, N, K = SHAPES["decode"]
    x, w, offs = _case(31, M, E, N, K)
    qw = moe_ops.quantize_weight(w.bfloat16(), "int4_asym", "group", 128).to(DEV)
    xd, od = x.to(DEV), offs.to(DEV)
    _sync_free_and_replayed(lambda a: moe_ops.grouped_mm(a, qw, od), xd,
                            lambda: moe_ops.grouped_mm(xd, qw, od, act_quant="int8_token"))


def test_opcheck_cuda():
    M, E, N, K = 64, 4, 64, 128
    x, w, offs = _case(41, M, E, N, K)
    qw = moe_ops.quantize_weight(w.bfloat16(), "int4_sym", "group", 32).to(DEV)
    args = (x.to(DEV), *qw.op_args()[:3], offs.to(DEV), *qw.op_args()[3:], "none", "none")
    torch.library.opcheck(torch.ops.moe_ops.grouped_mm.default, args)
    args = (x.to(DEV), *qw.op_args()[:3], offs.to(DEV), *qw.op_args()[3:], "int8_token", "none")
    torch.library.opcheck(torch.ops.moe_ops.grouped_mm.default, args)


def test_compiled_forward_launches_triton():
    M, E, N, K = 64, 4, 64, 128
    x, w, offs = _case(51, M, E, N, K)
    qw = moe_ops.quantize_weight(w.bfloat16(), "int4_asym", "group", 32).to(DEV)
    f = torch.compile(lambda a, o: moe_ops.grouped_mm(a, qw, o), fullgraph=True)
    from torch._inductor.utils import run_and_get_code
    y, code = run_and_get_code(f, x.to(DEV), offs.to(DEV))
    assert "grouped_gemm_kernel" in "\n".join(code)
    assert rel_err(y.cpu(), oracle_grouped_mm(x, qw.cpu().op_args(), offs)) < GPU_BOUND_BF16


TMA_CASES = [("none", "none", "none"), ("fp8_e4m3", "channel", "none"), ("fp8_e5m2", "tensor", "none"),
             ("fp8_e4m3", "channel", "fp8_token"), ("fp8_e4m3", "block", "fp8_1x128")]


# per operand types: 16-bit x (bf16 or fp8 weights dequantized in registers), fp8 x fp8
TMA_TILES = {"16": [KernelConfig(128, 256, 64, 8, 3, tma=True), KernelConfig(128, 128, 64, 8, 4, tma=True),
                    KernelConfig(64, 128, 64, 4, 3, tma=True)],
             "fp8": [KernelConfig(128, 128, 128, 8, 4, tma=True), KernelConfig(128, 256, 128, 8, 3, tma=True),
                     KernelConfig(64, 128, 128, 4, 3, tma=True)]}


@pytest.mark.parametrize("tile_idx", [0, 1, 2])
@pytest.mark.parametrize("fmt,gran,act", TMA_CASES)
def test_forward_tma_tiles(fmt, gran, act, tile_idx, monkeypatch):
    """``KernelConfig.tma`` (Hopper): x and W by TMA descriptors equal the pointer-load tile bit
    for bit (same MMAs in the same order) and the oracle within the bf16 bound, forward and
    dgrad; K = 528 and N = 384 leave partial K and N tiles, experts ragged with an empty one."""
    if not tma_capable():
        pytest.skip("TMA needs CUDA capability 9.0 or later")
    tile = TMA_TILES["16" if act == "none" else "fp8"][tile_idx]
    if fmt != "none" and act == "none" and tile.block_n == 256:
        tile = KernelConfig(128, 128, 64, 8, 3, tma=True)  # fp8 codes staged and converted: less shared memory
    M, E, N, K = 2000, 8, 384, 528 if gran != "block" else 512  # 528 bytes: 16-byte aligned fp8 rows
    x, w, offs = _case(hash((fmt, gran, act, str(tile), "tma")) % 10000, M, E, N, K)
    w16 = w.bfloat16()
    args = (w16, None, None, "none", "none", 0) if fmt == "none" else \
        moe_ops.quantize_weight(w16, fmt, gran, 0).op_args()
    dev_args = [a.to(DEV) if torch.is_tensor(a) else a for a in args]
    seen = spy_tma_operands(monkeypatch)
    ys = []
    for cfg in (tile, KernelConfig(tile.block_m, tile.block_n, tile.block_k, tile.num_warps, tile.num_stages)):
        out = torch.full((M, N), float("nan"), dtype=torch.bfloat16, device=DEV)
        ys.append(dispatch.grouped_mm(x.to(DEV), *dev_args[:3], offs.to(DEV), *dev_args[3:], act, "none",
                                      config=cfg, out=out))
    assert seen[0] == (True, 1)
    assert not torch.isnan(ys[0]).any() and torch.equal(ys[0], ys[1])
    assert torch.all(ys[0][int(offs[-1]):] == 0)
    if act == "none":
        assert rel_err(ys[0].cpu(), oracle_grouped_mm(x, args, offs)) < GPU_BOUND_BF16
    if act == "none":
        dy = torch.randn(M, N, generator=torch.Generator().manual_seed(7)).bfloat16()
        dxs = [dispatch.grouped_mm_dgrad(dy.to(DEV), *dev_args[:3], offs.to(DEV), *dev_args[3:], "none", config=c)
               for c in (tile, KernelConfig(tile.block_m, tile.block_n, tile.block_k, tile.num_warps,
                                            tile.num_stages))]
        assert seen[-2] == (True, 2) and torch.equal(dxs[0], dxs[1])


# integer weight codes under 16-bit x: x by TMA, the codes by TMA in the w_lhs tiles of at most
# 128 rows (by pointers in the others); both weight-operand sides; the 64-row w_lhs tiles of 17-64
# rows an expert (kernel_choice.DECODE_MAX_ROWS_PER_EXPERT, MID_TILE_MAX_ROWS)
INT_TMA_TILES = [KernelConfig(256, 128, 64, 8, 3, w_lhs=True, tma=True), KernelConfig(128, 128, 64, 4, 4, tma=True),
                 KernelConfig(128, 128, 128, 8, 3, w_lhs=True, tma=True),
                 KernelConfig(64, 128, 128, 4, 3, w_lhs=True, tma=True), KernelConfig(64, 128, 64, 4, 3, w_lhs=True, tma=True),
                 KernelConfig(16, 64, 128, 4, 3, group_m=1, w_lhs=True, tma=True)]


def _check_tma_twin(x, w, offs, wq, tile, monkeypatch):
    """``grouped_mm`` of ``wq`` (quantized ``w``) at ``tile`` (``KernelConfig.tma``) and at its
    pointer-load twin, outputs poisoned: bit-equal, and equal to itself on a second run; the
    oracle within the bf16 bound, zero rows past ``offs[-1]``. Returns ``(TMA_X, TMA_W)`` of the
    TMA launch (:func:`dispatch._tma_operands`)."""
    M, N = x.shape[0], w.shape[1]
    args = wq.op_args()
    dev_args = [a.to(DEV) if torch.is_tensor(a) else a for a in args]
    seen = spy_tma_operands(monkeypatch)
    ys = []
    for cfg in (tile, KernelConfig(**{**tile.__dict__, "tma": False})):
        out = torch.full((M, N), float("nan"), dtype=x.dtype, device=DEV)
        ys.append(dispatch.grouped_mm(x.to(DEV), *dev_args[:3], offs.to(DEV), *dev_args[3:], "none", "none",
                                      config=cfg, out=out))
    assert seen[1] == (False, 0)
    again = dispatch.grouped_mm(x.to(DEV), *dev_args[:3], offs.to(DEV), *dev_args[3:], "none", "none", config=tile)
    assert not torch.isnan(ys[0]).any() and torch.equal(ys[0], ys[1]) and torch.equal(ys[0], again)
    assert torch.all(ys[0][int(offs[-1]):] == 0)
    assert rel_err(ys[0].cpu(), oracle_grouped_mm(x, args, offs)) < GPU_BOUND_BF16
    return seen[0]


@pytest.mark.parametrize("tile", INT_TMA_TILES, ids=str)
@pytest.mark.parametrize("fmt,gran,gs", [("int4_asym", "group", 128), ("int8_sym", "channel", 0)])
def test_forward_tma_x_integer_weights(fmt, gran, gs, tile, monkeypatch):
    """Weight-only integer codes with ``KernelConfig.tma`` (Hopper): x's tiles by TMA (rows of the
    next expert read and masked at the store), W's stored codes by TMA in the ``w_lhs`` tiles of
    at most 128 rows and by pointers in the others; bit-equal to the pointer-load tile and to
    itself on a second run, the oracle within the bf16 bound, zero rows past ``offs[-1]``; N = 320
    leaves a partial N tile, experts ragged with an empty one, outputs poisoned."""
    if not tma_capable():
        pytest.skip("TMA needs CUDA capability 9.0 or later")
    M, E, N, K = 3000, 8, 320, 640
    x, w, offs = _case(hash((fmt, gran, str(tile), "tma_x")) % 10000, M, E, N, K)
    wq = moe_ops.quantize_weight(w.bfloat16(), fmt, gran, gs)
    # W's codes by TMA in w_lhs tiles of at most 128 rows (256-row 8-warp tiles raced with it)
    assert _check_tma_twin(x, w, offs, wq, tile, monkeypatch) == (True, 1 if tile.w_lhs and tile.block_m <= 128 else 0)


@pytest.mark.parametrize("fmt,gran", [("int8_asym", "channel"), ("int8_sym", "group"), ("fp8_e4m3", "channel"),
                                      ("fp8_e5m2", "tensor"), ("fp8_e4m3", "block")])
def test_forward_tma_decode_8bit_weights(fmt, gran, monkeypatch):
    """8-bit weight-only decode with K under 2048 and over half a row per expert: the table's
    16-row ``w_lhs`` tile with x and W's stored tile (int8 codes, fp8 values) by TMA, against its
    pointer-load twin (:func:`_check_tma_twin`); N = 320 leaves a partial N tile, K = 656 a
    partial K tile where scales are per channel or tensor (K = 640, whole groups and blocks,
    elsewhere), experts ragged with an empty one."""
    if not tma_capable():
        pytest.skip("TMA needs CUDA capability 9.0 or later")
    M, E, N, K = 48, 16, 320, 640 if gran in ("group", "block") else 656
    x, w, offs = _case(hash((fmt, gran, "tma_decode_8bit")) % 10000, M, E, N, K)
    gs = 128 if gran == "group" else 0
    wq = moe_ops.quantize_weight(w.bfloat16(), fmt, gran, gs)
    tile = choose_forward_config(M, N, K, E, 8, 128 if gran in ("group", "block") else K)
    # K tiles inside the scale unit: 128 columns, 16 where per-channel scales span K = 656
    assert tile == KernelConfig(16, 128, 128 if K == 640 else 16, 4, 3, group_m=1, w_lhs=True, tma=True)
    assert _check_tma_twin(x, w, offs, wq, tile, monkeypatch) == (True, 1)


@pytest.mark.parametrize("tile", [KernelConfig(64, 128, 128, 4, 3, w_lhs=True, tma=True),
                                  KernelConfig(64, 128, 64, 4, 3, w_lhs=True, tma=True)], ids=str)
@pytest.mark.parametrize("fmt,gran", [("int8_asym", "channel"), ("int8_sym", "group"), ("fp8_e4m3", "channel"),
                                      ("fp8_e5m2", "tensor"), ("fp8_e4m3", "block")])
def test_forward_tma_mid_rows_8bit_weights(fmt, gran, tile, monkeypatch):
    """8-bit weight-only codes at 17-64 rows an expert in the 64-row ``w_lhs`` tiles with x and W's
    stored tile (int8 codes, fp8 values) by TMA, against the pointer-load twin
    (:func:`_check_tma_twin`); about 31 rows an expert, ragged with an empty expert, N = 320
    leaving a partial N tile."""
    if not tma_capable():
        pytest.skip("TMA needs CUDA capability 9.0 or later")
    M, E, N, K = 1500, 48, 320, 640
    x, w, offs = _case(hash((fmt, gran, str(tile), "tma_mid_8bit")) % 10000, M, E, N, K)
    wq = moe_ops.quantize_weight(w.bfloat16(), fmt, gran, 128 if gran == "group" else 0)
    assert _check_tma_twin(x, w, offs, wq, tile, monkeypatch) == (True, 1)


@pytest.mark.parametrize("tile", [KernelConfig(16, 64, 128, 4, 3, group_m=1, w_lhs=True, tma=True),
                                  KernelConfig(16, 128, 64, 4, 4, group_m=1, w_lhs=True, tma=True),
                                  KernelConfig(16, 64, 256, 4, 3, group_m=1, w_lhs=True, tma=True),
                                  KernelConfig(64, 128, 64, 4, 3, w_lhs=True, tma=True)], ids=str)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_forward_w_lhs_plain_weights(dtype, tile, monkeypatch):
    """Plain 16-bit weights in the ``w_lhs`` tiles (the weight tile as the MMA's left operand) with
    x and W by TMA, against the pointer-load twin (:func:`_check_tma_twin`: bit-equal, repeatable,
    the oracle within the bf16 bound); decode tiles at about 3 rows an expert, the 64-row tile at
    about 31; N = 320 and K = 600 leave partial N and K tiles, experts ragged with an empty one."""
    if not tma_capable():
        pytest.skip("TMA needs CUDA capability 9.0 or later")
    M, E = (48, 16) if tile.decode else (1500, 48)
    N, K = 320, 600
    x, w, offs = _case(hash((str(dtype), str(tile), "w_lhs_plain")) % 10000, M, E, N, K)
    x = x.to(dtype)
    wq = moe_ops.quantize_weight(w.to(dtype), "bf16" if dtype == torch.bfloat16 else "fp16")
    metas = spy_tile_meta(monkeypatch)
    assert _check_tma_twin(x, w, offs, wq, tile, monkeypatch) == (True, 1)
    assert all(m["W_LHS"] for m in metas)


@pytest.mark.parametrize("fmt", ["none", "int4_asym", "none_decode"])
def test_compiled_forward_tma_tile(fmt, monkeypatch):
    """Under torch.compile the launch's host-side TensorDescriptors are rebuilt by Inductor from
    the tensors (torch's "stable" TMA metadata): the generated code launches our kernel with
    them, and the result equals the eager TMA launch; bf16 weights (x and W by TMA), int4
    g128 (the default prefill tile: ``w_lhs``, x by TMA) and bf16 at decode sizes (the default
    ``w_lhs`` tile, x and W by TMA)."""
    if not tma_capable():
        pytest.skip("TMA needs CUDA capability 9.0 or later")
    M, E, N, K = (48, 16, 256, 512) if fmt == "none_decode" else (1000, 4, 256, 512)
    x, w, offs = _case(61, M, E, N, K)
    xd, od = x.to(DEV), offs.to(DEV)
    if fmt == "none_decode":
        qw = w.bfloat16().to(DEV)
        args = (qw, None, None, "none", "none", 0)
        tile = choose_forward_config(M, N, K, E, 16, K)
        assert tile.w_lhs and tile.tma and tile.decode
    elif fmt == "none":
        tile = KernelConfig(128, 128, 64, 8, 3, tma=True)
        monkeypatch.setattr(dispatch, "choose_forward_config", lambda *a, **k: tile)
        monkeypatch.setattr(dispatch, "choose_persistent_config", lambda *a, **k: None)  # its own test below
        qw = w.bfloat16().to(DEV)
        args = (qw, None, None, "none", "none", 0)
    else:
        qw = moe_ops.quantize_weight(w.bfloat16().to(DEV), fmt, "group", 128)
        args = qw.op_args()
        tile = choose_forward_config(M, N, K, E, 4, 128)
        assert tile.w_lhs and tile.tma
    f = torch.compile(lambda a, o: moe_ops.grouped_mm(a, qw, o), fullgraph=True)
    from torch._inductor.utils import run_and_get_code
    y, code = run_and_get_code(f, xd, od)
    src = "\n".join(code)
    assert "grouped_gemm_kernel" in src and "TensorDescriptor" in src
    assert torch.equal(y, dispatch.grouped_mm(xd, *args[:3], od, *args[3:], "none", "none", config=tile))


def test_tma_launch_from_a_fresh_thread():
    """A thread that has not touched the device yet (autograd's backward thread) has no current
    CUDA context, and Triton encodes a host-side TMA descriptor with a driver call before its
    launcher makes one current: the launch must make it current itself."""
    if not tma_capable():
        pytest.skip("TMA needs CUDA capability 9.0 or later")
    import threading
    tile = KernelConfig(128, 256, 64, 8, 4, tma=True)
    M, E, N, K = 1000, 4, 256, 512
    _, w, offs = _case(71, M, E, N, K)
    dy = torch.randn(M, N, generator=torch.Generator().manual_seed(72)).bfloat16().to(DEV)
    wd, od = w.bfloat16().to(DEV), offs.to(DEV)
    # the reference first: its freed output block serves the thread's allocation from the cache
    # (no cudaMalloc there, which would make a context current)
    ref = dispatch.grouped_mm_dgrad(dy, wd, None, None, od, "none", "none", 0, "none", config=tile).clone()
    torch.cuda.synchronize()
    out, err = [], []

    def run():
        try:
            out.append(dispatch.grouped_mm_dgrad(dy, wd, None, None, od, "none", "none", 0, "none", config=tile))
            torch.cuda.synchronize()
        except Exception as e:  # noqa: BLE001  (re-raised below, in the test's thread)
            err.append(e)
    t = threading.Thread(target=run)
    t.start()
    t.join()
    assert not err, err
    assert torch.equal(out[0], ref)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("M,E,N,K", [(2000, 8, 384, 520), (5000, 4, 1000, 2048)])
def test_persistent_tiles(M, E, N, K, dtype, monkeypatch):
    """The persistent kernel (:mod:`moe_ops.kernels.persistent_gemm`), which prefill-sized 16-bit
    calls take on TMA devices (``choose_persistent_config``: forward above 64 rows per expert,
    dgrad up to 512): forward and dgrad on ragged experts (an empty one, rows past offs[-1]),
    partial K and N tiles, outputs poisoned; equal bit for bit to the one-program-a-tile kernel
    at the same tile (same MMAs, same order), and the oracle within the bound. The dgrad at
    1250 rows per expert (not the choice there) is launched directly."""
    if not tma_capable():
        pytest.skip("the persistent kernel takes TMA descriptors: CUDA capability 9.0 or later")
    from moe_ops.kernels import persistent_gemm
    from moe_ops.lowering.kernel_choice import choose_persistent_config
    taken = spy_persistent_launches(monkeypatch)
    x, w, offs = _case(hash((M, str(dtype), "persistent")) % 10000, M, E, N, K)
    x, w = x.to(dtype), w.to(dtype)
    xd, wd, od = x.to(DEV), w.to(DEV), offs.to(DEV)
    tile = choose_persistent_config(M, N, K, E)
    same_tile = KernelConfig(tile.block_m, tile.block_n, tile.block_k, tile.num_warps, tile.num_stages, tma=True)
    _poison(M, N, dtype)
    y = moe_ops.grouped_mm(xd, wd, od)
    assert taken == [False] and not torch.isnan(y).any() and torch.all(y[int(offs[-1]):] == 0)
    assert torch.equal(y, dispatch.grouped_mm(xd, wd, None, None, od, "none", "none", 0, "none", "none",
                                              config=same_tile))
    args = (w, None, None, "none", "none", 0)
    assert rel_err(y.cpu(), oracle_grouped_mm(x, args, offs)) < GPU_BOUND_BF16
    dy = torch.randn(M, N, generator=torch.Generator().manual_seed(M)).to(dtype)
    dgrad_tile = choose_persistent_config(M, K, N, E, dgrad=True)
    _poison(M, K, dtype)
    if dgrad_tile is not None:
        dx = dispatch.grouped_mm_dgrad(dy.to(DEV), wd, None, None, od, "none", "none", 0, "none")
        assert taken == [False, True]
    else:
        dgrad_tile = tile
        dx = persistent_gemm.launch_persistent(dy.to(DEV), wd, torch.empty(M, K, dtype=dtype, device=DEV), od,
                                               dgrad_tile, True)
    assert not torch.isnan(dx).any() and torch.all(dx[int(offs[-1]):] == 0)
    same_tile = KernelConfig(dgrad_tile.block_m, dgrad_tile.block_n, dgrad_tile.block_k, dgrad_tile.num_warps,
                             dgrad_tile.num_stages, tma=True)
    assert torch.equal(dx, dispatch.grouped_mm_dgrad(dy.to(DEV), wd, None, None, od, "none", "none", 0, "none",
                                                     config=same_tile))
    ref = torch.zeros(M, K, dtype=torch.float64)
    start = 0
    for e in range(E):
        end = int(offs[e])
        ref[start:end] = dy[start:end].double() @ w[e].double()
        start = end
    assert rel_err(dx.cpu(), ref) < GPU_BOUND_BF16


def test_persistent_sync_free_graph_and_compiled():
    """The persistent launch: no host sync (sync-debug "error"), captured in a CUDA graph and
    replayed on new data, and under torch.compile (dynamic shapes) launched by the generated
    code with Inductor's descriptors, equal to eager."""
    if not tma_capable():
        pytest.skip("the persistent kernel takes TMA descriptors: CUDA capability 9.0 or later")
    M, E, N, K = 3000, 8, 512, 1024
    x, w, offs = _case(81, M, E, N, K)
    xd, wd, od = x.to(DEV), w.bfloat16().to(DEV), offs.to(DEV)
    _sync_free_and_replayed(lambda a: moe_ops.grouped_mm(a, wd, od), xd)
    from torch._inductor.utils import run_and_get_code
    torch._dynamo.reset()
    f = torch.compile(lambda a, o: moe_ops.grouped_mm(a, wd, o), fullgraph=True, dynamic=True)
    yc, code = run_and_get_code(f, xd, od)
    assert "persistent_grouped_kernel" in "\n".join(code)
    assert torch.equal(yc, moe_ops.grouped_mm(xd, wd, od))
    yc2 = f(xd[:2500], torch.clamp(od, max=2500))  # another row count (dynamic shapes)
    assert torch.equal(yc2, moe_ops.grouped_mm(xd[:2500], wd, torch.clamp(od, max=2500)))


@pytest.mark.parametrize("gran", ["channel", "tensor"])
@pytest.mark.parametrize("tile", [KernelConfig(64, 128, 128, 4, 3), KernelConfig(128, 128, 128, 8, 3),
                                  KernelConfig(128, 256, 128, 8, 3), KernelConfig(128, 128, 256, 8, 3)])
def test_persistent_int8_w8a8(tile, gran):
    """The persistent kernel's int8 path (``ACT`` 1: int8_token x codes by TMA, int8_sym W
    codes by TMA, exact int32 sums, ``(acc * xs) * ws`` once): ragged experts (an empty one, rows
    past offs[-1]), K not a multiple of the K tile, output poisoned; equal bit for bit to the
    reference (the spec's exact path) and to the one-program-a-tile kernel at the same tile."""
    if not tma_capable():
        pytest.skip("the persistent kernel takes TMA descriptors: CUDA capability 9.0 or later")
    from moe_ops.kernels import persistent_gemm
    M, E, N, K = 2600, 4, 384, 1040
    x, w, offs = _case(hash((gran, str(tile), "int8p")) % 10000, M, E, N, K)
    qw = moe_ops.quantize_weight(w.bfloat16(), "int8_sym", gran, 0)
    args = [a.to(DEV) if torch.is_tensor(a) else a for a in qw.op_args()]
    xd, od = x.to(DEV), offs.to(DEV)
    xq, xs = dispatch.quantize_act(xd, "int8_token")
    ws, _, st = dispatch._scale_operands(args[0], args[1], args[2], gran, transposed=False)
    assert persistent_gemm.serves_codes(xq, args[0])
    _poison(M, N, torch.bfloat16)
    y = persistent_gemm.launch_persistent(xq, args[0], torch.empty(M, N, dtype=torch.bfloat16, device=DEV), od,
                                          tile, False, scales=(xs, ws, (xs.stride(0), st[0], st[1])))
    assert not torch.isnan(y).any() and torch.all(y[int(offs[-1]):] == 0)
    ref = moe_ops.reference.grouped_mm(x, *qw.op_args()[:3], offs, *qw.op_args()[3:], "int8_token", "none")
    assert torch.equal(y.cpu(), ref)
    same_tile = KernelConfig(tile.block_m, tile.block_n, tile.block_k, tile.num_warps, tile.num_stages, tma=True)
    assert torch.equal(y, dispatch.grouped_mm(xd, *args[:3], od, *args[3:], "int8_token", "none", config=same_tile,
                                              prequantized=(xq, xs)))


# rows per expert for the half tiles at 128-row tiles: remainders 72, 88, 127, 65 and 104 (full
# tiles), 64, 1, 1, 33 and 60 (64-row half tiles after 3, 0, 1, 0 and 5 full tiles), none
HALF_SIZES = (200, 0, 448, 1, 129, 256, 600, 33, 700, 127, 65, 1000)


@pytest.mark.parametrize("kind", ["bf16", "fp8_token", "int8_token"])
def test_persistent_half_tiles(kind):
    """``KernelConfig.half_m`` at the persistent table tiles (bf16 forward and dgrad 128x256x64,
    fp8 W8A8 128x128x256, int8 W8A8 128x256x128): experts whose last tile holds 1-64 rows get a
    64-row tile, N and K off the tiles, outputs poisoned, rows past offs[-1] zero. Against the
    float64 oracle within the bound (fp8: the float64 product of the same codes) and bit for bit
    equal to the same tile without ``half_m`` (each output element's MMA sums in the same
    order); int8 equal to the reference (exact)."""
    if not tma_capable():
        pytest.skip("the persistent kernel takes TMA descriptors: CUDA capability 9.0 or later")
    from dataclasses import replace
    from moe_ops.kernels import persistent_gemm
    g = torch.Generator().manual_seed(hash(kind) % 1000)
    offs = torch.cumsum(torch.tensor(HALF_SIZES), 0).to(torch.int32)
    M, E, N, K = int(offs[-1]) + 5, len(HALF_SIZES), 1000, 1040 if kind == "bf16" else 1024
    x = torch.randn(M, K, generator=g).bfloat16()
    w = torch.randn(E, N, K, generator=g) * 0.05
    od = offs.to(DEV)

    def both(launch, rows, cols, dtype=torch.bfloat16):
        outs = []
        for half in (True, False):
            _poison(rows, cols, dtype)
            outs.append(launch(half, torch.empty(rows, cols, dtype=dtype, device=DEV)))
            assert not torch.isnan(outs[-1]).any() and torch.all(outs[-1][int(offs[-1]):] == 0)
        assert torch.equal(outs[0], outs[1])
        return outs[0].cpu()

    if kind == "bf16":
        tile = KernelConfig(128, 256, 64, 8, 4)
        wd, xd = w.bfloat16().to(DEV), x.to(DEV)
        y = both(lambda h, out: persistent_gemm.launch_persistent(xd, wd, out, od, replace(tile, half_m=h), False),
                 M, N)
        assert rel_err(y, oracle_grouped_mm(x, (w.bfloat16(), None, None, "none", "none", 0), offs)) < GPU_BOUND_BF16
        dy = torch.randn(M, N, generator=g).bfloat16()
        dyd = dy.to(DEV)
        dx = both(lambda h, out: persistent_gemm.launch_persistent(dyd, wd, out, od, replace(tile, half_m=h), True),
                  M, K)
        ref = torch.zeros(M, K, dtype=torch.float64)
        for e in range(E):
            lo, hi = (int(offs[e - 1]) if e else 0), int(offs[e])
            ref[lo:hi] = dy[lo:hi].double() @ w[e].bfloat16().double()
        assert rel_err(dx, ref) < GPU_BOUND_BF16
        return
    fmt, tile = (("fp8_e4m3", KernelConfig(128, 128, 256, 8, 3)) if kind == "fp8_token"
                 else ("int8_sym", KernelConfig(128, 256, 128, 8, 3)))
    qw = moe_ops.quantize_weight(w.bfloat16(), fmt, "channel", 0)
    args = [a.to(DEV) if torch.is_tensor(a) else a for a in qw.op_args()]
    xq, xs = dispatch.quantize_act(x.to(DEV), kind)
    ws, _, st = dispatch._scale_operands(args[0], args[1], args[2], "channel", transposed=False)
    y = both(lambda h, out: persistent_gemm.launch_persistent(xq, args[0], out, od, replace(tile, half_m=h), False,
                                                              scales=(xs, ws, (xs.stride(0), st[0], st[1]))), M, N)
    if kind == "int8_token":
        assert torch.equal(y, moe_ops.reference.grouped_mm(x, *qw.op_args()[:3], offs, *qw.op_args()[3:], kind,
                                                           "none"))
    else:  # the float64 product of the same codes (test_fp8_dot_k_tile_256's bound)
        ref = moe_ops.reference.segment_mm(xq.cpu().double() * xs.cpu().double(),
                                           moe_ops.dequantize_weight(qw, torch.float64), offs, "nt")
        assert rel_err(y, ref) < 5e-3


def test_int8_w8a8_default_takes_the_persistent_kernel(monkeypatch):
    """``moe_ops.grouped_mm(..., act_quant="int8_token")`` with channel-scaled int8_sym W above 64
    rows per expert: the persistent kernel on TMA devices (``choose_persistent_config``), exact
    against the reference; poisoned output, ragged experts with an empty one."""
    taken = spy_persistent_launches(monkeypatch)
    M, E, N, K = 3000, 8, 512, 768
    x, w, offs = _case(hash("int8_default") % 10000, M, E, N, K)
    qw = moe_ops.quantize_weight(w.bfloat16(), "int8_sym", "channel", 0)
    _poison(M, N, torch.bfloat16)
    y = moe_ops.grouped_mm(x.to(DEV), qw.to(DEV), offs.to(DEV), act_quant="int8_token")
    assert taken == ([False] if tma_capable() else [])
    assert not torch.isnan(y).any() and torch.all(y[int(offs[-1]):] == 0)
    ref = moe_ops.reference.grouped_mm(x, *qw.op_args()[:3], offs, *qw.op_args()[3:], "int8_token", "none")
    assert torch.equal(y.cpu(), ref)
