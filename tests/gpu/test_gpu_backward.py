"""GPU tests of dgrad / wgrad (Triton) and of grouped_mm's autograd (marked ``gpu``)."""
import pytest
import torch

import moe_ops
from helpers import GPU_BOUND_BF16, ragged_offs, rel_err, tma_capable, weight_cases

DEV = "cuda" if torch.cuda.is_available() else None
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(DEV is None, reason="needs a CUDA device")]
M, E, N, K = 3000, 8, 512, 768


def _case(seed, dtype=torch.bfloat16):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(M, K, generator=g).to(dtype)
    dy = torch.randn(M, N, generator=g).to(dtype)
    w = (torch.randn(E, N, K, generator=g) * 0.05)
    offs = ragged_offs(M, E, g, empty=(3,), tail=7)
    return x, dy, w, offs


@pytest.mark.parametrize("fmt,gran,gs", [("none", "none", 0)] + weight_cases())
def test_dgrad(fmt, gran, gs):
    x, dy, w, offs = _case(hash((fmt, gran)) % 1000)
    args = (w.bfloat16(), None, None, "none", "none", 0) if fmt == "none" else \
        moe_ops.quantize_weight(w.bfloat16(), fmt, gran, 128 if gs else 0).op_args()
    dargs = [a.to(DEV) if isinstance(a, torch.Tensor) else a for a in args]
    torch.full((M, K), float("nan"), dtype=torch.bfloat16, device=DEV)  # poison the allocator's next block
    dx = torch.ops.moe_ops.grouped_mm_dgrad(dy.to(DEV), *dargs[:3], offs.to(DEV), *dargs[3:], "none").cpu()
    ref = moe_ops.reference.grouped_mm_dgrad(dy.double(), *args[:3], offs, *args[3:], "none")
    assert not torch.isnan(dx).any()
    assert rel_err(dx, ref) < GPU_BOUND_BF16
    assert torch.all(dx[int(offs[-1]):] == 0)


def test_wgrad_and_determinism():
    x, dy, _, offs = _case(1)
    xd, dyd, od = x.to(DEV), dy.to(DEV), offs.to(DEV)
    dw1 = torch.ops.moe_ops.grouped_mm_wgrad(dyd, xd, od, "none")
    dw2 = torch.ops.moe_ops.grouped_mm_wgrad(dyd, xd, od, "none")
    assert torch.equal(dw1, dw2)  # bitwise: one program per tile, fixed order
    ref = moe_ops.reference.grouped_mm_wgrad(dy.double(), x.double(), offs, "none")
    assert rel_err(dw1.cpu(), ref) < GPU_BOUND_BF16
    assert torch.all(dw1[3] == 0)


@pytest.mark.parametrize("recipe", [None, "fp8_rowwise", "fp8_blockwise"])
def test_autograd_and_training_step_capture(recipe):
    x, dy, w, offs = _case(2)
    xd = x.to(DEV).requires_grad_()
    wd = w.bfloat16().to(DEV).requires_grad_()
    od, dyd = offs.to(DEV), dy.to(DEV)
    moe_ops.grouped_mm(xd, wd, od, recipe=recipe).backward(dyd)
    ref_x = moe_ops.reference.grouped_mm_dgrad(dy.double(), w.bfloat16().double(), None, None, offs, "none", "none", 0,
                                               recipe or "none")
    ref_w = moe_ops.reference.grouped_mm_wgrad(dy.double(), x.double(), offs, recipe or "none")
    assert rel_err(xd.grad.cpu(), ref_x) < 2e-2
    assert rel_err(wd.grad.cpu(), ref_w) < 2e-2
    # a whole forward+backward step in a CUDA graph, sync-free
    gx, gw = xd.grad.clone(), wd.grad.clone()
    xd.grad = wd.grad = None

    def step():
        y = moe_ops.grouped_mm(xd, wd, od, recipe=recipe)
        return torch.autograd.grad(y, (xd, wd), dyd)

    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        step()
    torch.cuda.current_stream().wait_stream(s)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            out = step()
        g.replay()
    finally:
        torch.cuda.set_sync_debug_mode(0)
    torch.cuda.synchronize()
    assert torch.equal(out[0], gx) and torch.equal(out[1], gw)


_TOKEN_BLOCK_CONFIGS = [None, (32, 4, False), (64, 4, True), (16, 2, True)]


@pytest.mark.parametrize("per_expert,config,dtype", [
    *((p, c, torch.bfloat16) for p in (True, False) for c in _TOKEN_BLOCK_CONFIGS),
    (True, (16, 4, True, 2), torch.bfloat16), (True, (32, 4, True, 4), torch.bfloat16),
    (True, (16, 4, True, 4, True), torch.bfloat16), (True, (64, 4, True, 2, True), torch.bfloat16),
    (True, (32, 4, False, 1, True), torch.bfloat16), (True, (64, 4, True, 4, True), torch.bfloat16),
    (True, (64, 8, True, 2, True), torch.bfloat16), (True, (32, 4, False, 2, False, True), torch.bfloat16),
    # the first pass's max on |x|'s bits: int16 lanes for float16, int32 for float32
    (True, (16, 4, True, 4, True), torch.float16), (True, (64, 4, True, 2, True), torch.float32),
    (False, None, torch.float32),
    # per block, 2 / 4 / 8 column tiles a program (12 of 64 columns: the last of 8 part-used), with
    # and without the next tile loaded ahead
    (False, (64, 4, True, 4), torch.bfloat16), (False, (64, 8, True, 8, True), torch.bfloat16),
    (False, (32, 4, True, 4, True), torch.float16), (False, (64, 4, True, 2, True), torch.float32),
    (False, (32, 4, True, 8, True), torch.bfloat16)])
def test_token_block_quant_bit_exact(per_expert, config, dtype):
    """Codes and scales of the padded token-block layout equal the reference quantization bit
    for bit; the padding of every used block is zero codes. Default tiles, both grid orders; per
    expert 2 / 4 token blocks a loop step, with and without the second pass's next block loaded
    ahead, the experts launched largest first; per block several column tiles a program, with
    and without the next one loaded ahead; 16- and 32-bit x; ``_case`` has an empty expert."""
    from moe_ops.kernels.token_block_quant import padded_blocks, padded_columns, token_block_quant
    x, dy, _, offs = _case(5, dtype)
    q_ref, s_ref, blk = moe_ops.recipes.quantize_token_blocks(x, offs, 0 if per_expert else 128)
    # poison the allocator's next blocks of the codes' and scales' sizes (0x7F: a NaN code)
    nb = padded_blocks(x.shape[0], E)
    torch.full((x.shape[1], nb * 128), 0x7F, dtype=torch.uint8, device=DEV)
    torch.full((E if per_expert else nb, x.shape[1]), float("nan"), device=DEV)
    q, s = token_block_quant(x.to(DEV), offs.to(DEV), per_expert, config)
    end = int(offs[-1])
    used = torch.unique(blk[:end])
    assert torch.equal(s.cpu()[used], s_ref[used])
    if per_expert:  # the empty expert's row too
        assert torch.equal(s.cpu(), s_ref[:E])
    col = padded_columns(offs, x.shape[0])[:end]
    q8 = q.cpu().view(torch.uint8)
    assert torch.equal(q8[:, col].t(), q_ref[:end].view(torch.uint8))
    block_cols = (used.unsqueeze(1) * 128 + torch.arange(128)).flatten()
    pad = block_cols[~torch.isin(block_cols, col)]
    assert torch.all(q8[:, pad] == 0)


@pytest.mark.parametrize("rcp", [None, True, False])
@pytest.mark.parametrize("flat", [None, False, True, 2, "one_read"])
@pytest.mark.parametrize("gran,transpose", [("channel", False), ("channel", True), ("block", False), ("block", True)])
def test_fp8_weight_quant_bit_exact(gran, transpose, flat, rcp):
    """Codes and scales equal ``formats.quantize`` bit for bit: default config (W^T channel: one
    read of the rows' whole N), both grid orders of a fixed one, a persistent grid of 2 programs
    per multiprocessor, and (channel) one read of the rows' whole reduced dim; either division."""
    from moe_ops.kernels.weight_quant import fp8_weight_quant
    w = (torch.randn(4, 300, 520) * 0.05).bfloat16()
    w[1, :, :128] = 0
    if flat == "one_read":
        config = (8, 1024, 2, True)
    else:
        config = None if flat is None else (32, 256, 4, bool(flat)) + ((flat,) if flat > 1 else ())
    q, s = fp8_weight_quant(w.to(DEV), gran, transpose, config, rcp)
    src = w.transpose(1, 2).contiguous() if transpose else w
    d_ref, s_ref, _ = moe_ops.formats.quantize(src, "fp8_e4m3", gran, 0)
    assert torch.equal(s.cpu(), s_ref)
    assert torch.equal(q.cpu().view(torch.uint8), d_ref.view(torch.uint8))
    if gran == "block" and not transpose:  # W's and W^T's codes from one read (recipe_weights)
        parts = fp8_weight_quant(w.to(DEV), "block", False, config, rcp, pair=True)
        t_ref = moe_ops.formats.quantize(w.transpose(1, 2).contiguous(), "fp8_e4m3", "block", 0)
        for got, want in zip(parts, (d_ref, s_ref, t_ref[0], t_ref[1])):
            assert torch.equal(got.cpu().view(torch.uint8), want.view(torch.uint8))


@pytest.mark.parametrize("rcp", [None, False])
@pytest.mark.parametrize("K", [4200, 7168])  # the default one read of 8192 columns: part-used, DeepSeek-V3's K
def test_fp8_weight_channel_long_rows_bit_exact(K, rcp):
    """W's channel codes and scales over rows of 4097-8192 columns (default: one row a program,
    one read, the reciprocal division) equal ``formats.quantize``'s bit for bit; outputs'
    memory poisoned first; an all-zero row and a row with one large value among small ones."""
    from moe_ops.kernels.weight_quant import fp8_weight_quant
    w = (torch.randn(3, 40, K) * 0.05).bfloat16()
    w[1, 5] = 0
    w[2, 7, K - 1] = 300.0
    torch.full((3 * 40 * K,), 0x7F, dtype=torch.uint8, device=DEV)
    q, s = fp8_weight_quant(w.to(DEV), "channel", False, None, rcp)
    d_ref, s_ref, _ = moe_ops.formats.quantize(w, "fp8_e4m3", "channel", 0)
    assert torch.equal(s.cpu(), s_ref)
    assert torch.equal(q.cpu().view(torch.uint8), d_ref.view(torch.uint8))


@pytest.mark.parametrize("words", [None, False])
@pytest.mark.parametrize("rows", [384, 300, 302])  # whole tiles; a part-filled one; N not a multiple of 4
def test_fp8_weight_block_words_bit_exact(rows, words):
    """The pair's W^T block codes, written four a word (``words=None`` where N allows) or a byte
    at a time, its W codes, and W^T's codes cast alone equal ``formats.quantize``'s bit for bit;
    the outputs' memory poisoned first (0x7F: a NaN code)."""
    from moe_ops.kernels.weight_quant import fp8_weight_quant
    w = (torch.randn(3, rows, 640) * 0.05).bfloat16()
    w[1, :, :128] = 0
    wd = w.to(DEV)
    want = moe_ops.formats.quantize(w, "fp8_e4m3", "block", 0)[:2]
    want_t = moe_ops.formats.quantize(w.transpose(1, 2).contiguous(), "fp8_e4m3", "block", 0)[:2]
    torch.full((3 * rows * 640,), 0x7F, dtype=torch.uint8, device=DEV)
    got_t = fp8_weight_quant(wd, "block", True)
    torch.full((3 * rows * 640,), 0x7F, dtype=torch.uint8, device=DEV)
    pair = fp8_weight_quant(wd, "block", pair=True, words=words)
    for got, ref in zip(tuple(got_t) + tuple(pair), want_t + want + want_t):
        assert torch.equal(got.cpu().view(torch.uint8), ref.view(torch.uint8))


@pytest.mark.parametrize("config", [None, (64, 256, 128, 8, 3)])  # choose_wgrad_config's two tiles
def test_wgrad_tma_chunks_bitwise(config):
    """The wgrad's TMA chunks (``grouped_wgrad_kernel`` TMA) equal its pointer loads bit for bit
    (same MMAs in the same order) on ragged experts with an empty one and partial chunks."""
    if not tma_capable():
        pytest.skip("TMA needs CUDA capability 9.0 or later")
    from moe_ops.kernels.grouped_wgrad import launch_wgrad
    x, dy, _, offs = _case(4)
    xd, dyd, od = x.to(DEV), dy.to(DEV), offs.to(DEV)
    torch.full((E, N, K), float("nan"), dtype=torch.bfloat16, device=DEV)  # poison the allocator's next block
    a = launch_wgrad(dyd, xd, od, torch.bfloat16, config, tma=True)
    b = launch_wgrad(dyd, xd, od, torch.bfloat16, config, tma=False)
    assert torch.equal(a, b) and torch.all(a[3] == 0)
    ref = moe_ops.reference.grouped_mm_wgrad(dy.double(), x.double(), offs, "none")
    assert rel_err(a.cpu(), ref) < GPU_BOUND_BF16


@pytest.mark.parametrize("group", [3, 8])  # E = 8: a last group of two; one group
def test_wgrad_expert_groups_bitwise(group):
    """The wgrads' 1-D grid taken ``group`` experts at a time (``EXPERT_GROUP``, config entry 6 /
    5): the same programs as the expert-by-expert grid in another order, so the same bits, bf16
    (TMA chunks) and both FP8 recipes; outputs poisoned, the empty expert zero."""
    from moe_ops.kernels.grouped_wgrad import launch_wgrad, launch_wgrad_fp8
    from moe_ops.kernels.token_block_quant import token_block_quant
    from moe_ops.lowering.kernel_choice import choose_wgrad_config, choose_wgrad_fp8_config
    x, dy, _, offs = _case(9)
    xd, dyd, od = x.to(DEV), dy.to(DEV), offs.to(DEV)
    tile = choose_wgrad_config(M, E)
    base = launch_wgrad(dyd, xd, od, torch.bfloat16, tile)
    torch.full((E, N, K), float("nan"), dtype=torch.bfloat16, device=DEV)  # poison the allocator's next block
    got = launch_wgrad(dyd, xd, od, torch.bfloat16, tuple(tile) + (group,))
    assert torch.equal(got, base) and torch.all(got[3] == 0)
    ref = moe_ops.reference.grouped_mm_wgrad(dy.double(), x.double(), offs, "none")
    assert rel_err(got.cpu(), ref) < GPU_BOUND_BF16
    for per_expert in (False, True):
        qdy, sdy = token_block_quant(dyd, od, per_expert)
        qx, sx = token_block_quant(xd, od, per_expert)
        tile = choose_wgrad_fp8_config(M, E, per_expert)
        base = launch_wgrad_fp8(qdy, qx, sdy, sx, od, per_expert, torch.bfloat16, tile)
        torch.full((E, N, K), float("nan"), dtype=torch.bfloat16, device=DEV)
        got = launch_wgrad_fp8(qdy, qx, sdy, sx, od, per_expert, torch.bfloat16, tuple(tile) + (group,))
        assert torch.equal(got, base) and torch.all(got[3] == 0)


# the fp8 MMA's accumulation: the cast's codes and scales equal the reference's bit for bit
# here, and the kernel differs from the float64 product of those operands by 1.03e-3 (rowwise:
# an expert's ~750 rows in one MMA accumulator chain) and 1.26e-4 (blockwise: chains of 128
# tokens, promoted to float32 between them), measured on an H100
@pytest.mark.parametrize("recipe,other,bound", [("fp8_rowwise", (128, 128, 8, 3), 3e-3),
                                                ("fp8_blockwise", (128, 256, 8, 3), 5e-4)])
def test_wgrad_fp8_tiles(recipe, other, bound):
    """The FP8 recipes' wgrad kernel at the tile ``choose_wgrad_fp8_config`` picks (here 750
    rows per expert: the wide tile for per-expert scales) and at another, on the token-block
    cast's operands: against the reference emulation within the fp8 MMA's accumulation error
    (above), and the two tiles within 1e-6 of each other (the same chunks in the same order)."""
    from moe_ops.kernels.grouped_wgrad import launch_wgrad_fp8
    from moe_ops.kernels.token_block_quant import token_block_quant
    g = torch.Generator().manual_seed(21)
    x, dy = torch.randn(M, K, generator=g), torch.randn(M, N, generator=g)
    offs = ragged_offs(M, 4, g, empty=(2,), tail=5)
    xd, dyd, od = x.to(DEV), dy.to(DEV), offs.to(DEV)
    per_expert = recipe == "fp8_rowwise"
    qdy, sdy = token_block_quant(dyd, od, per_expert)
    qx, sx = token_block_quant(xd, od, per_expert)
    ref = moe_ops.reference.grouped_mm_wgrad(dy, x, offs, recipe)  # float32 scales, as the kernels
    dws = []
    for config, tma in ((None, None), (other, None), (None, False)):  # the default tile by TMA and by pointers
        torch.full((4, N, K), float("nan"), device=DEV)  # poison the allocator's next block
        dws.append(launch_wgrad_fp8(qdy, qx, sdy, sx, od, per_expert, torch.float32, config, tma=tma).cpu())
        assert torch.all(dws[-1][2] == 0) and rel_err(dws[-1], ref) < bound
    assert rel_err(dws[1], dws[0]) < 1e-6 and rel_err(dws[2], dws[0]) < 1e-6


@pytest.mark.parametrize("recipe", [None, "fp8_rowwise", "fp8_blockwise"])
def test_compiled_backward_matches_eager(recipe):
    """grouped_mm under torch.compile: the backward graph's dgrad and wgrad (TMA descriptors on
    Hopper, recorded as torch's TMA metadata and rebuilt by Inductor; the FP8 recipes' wgrad
    token-block tiles too) give the eager gradients bit for bit."""
    x, dy, w, offs = _case(6)
    xd, wd, od, dyd = x.to(DEV), w.bfloat16().to(DEV), offs.to(DEV), dy.to(DEV)
    grads = []
    torch._dynamo.reset()
    for fn in (moe_ops.grouped_mm, torch.compile(moe_ops.grouped_mm, fullgraph=True)):
        xg, wg = xd.clone().requires_grad_(), wd.clone().requires_grad_()
        fn(xg, wg, od, recipe=recipe).backward(dyd)
        grads.append((xg.grad, wg.grad))
    assert torch.equal(grads[0][0], grads[1][0]) and torch.equal(grads[0][1], grads[1][1])
