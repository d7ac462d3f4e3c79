"""Numerics of the operators (CPU reference path) against the float64 oracle; edge cases; autograd."""
import pytest
import torch

import moe_ops
from helpers import BOUND, oracle_grouped_mm, ragged_offs, rel_err, weight_cases

E, N, K, M = 5, 24, 64, 37


def _data(seed, dtype=torch.bfloat16, m=M, e=E, empty=(1,), tail=3):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m, K, generator=g).to(dtype)
    w = torch.randn(e, N, K, generator=g)
    offs = ragged_offs(m, e, g, empty=empty, tail=tail)
    return x, w, offs


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("fmt,gran,gs", [("none", "none", 0)] + weight_cases())
def test_forward_vs_float64_oracle(fmt, gran, gs, dtype):
    x, w, offs = _data(hash((fmt, gran)) % 1000, dtype)
    if fmt == "none":
        wt = w.to(dtype)
        y = moe_ops.grouped_mm(x, wt, offs)
        args = (wt, None, None, "none", "none", 0)
    else:
        qw = moe_ops.quantize_weight(w.to(dtype), fmt, gran, gs)
        y = moe_ops.grouped_mm(x, qw, offs)
        args = qw.op_args()
    ref = oracle_grouped_mm(x, args, offs)
    assert y.dtype == dtype and y.shape == (M, N)
    assert rel_err(y, ref) < BOUND[dtype]
    assert torch.all(y[int(offs[-1]):] == 0)


@pytest.mark.parametrize("fmt,gran,gs", weight_cases([f for f in moe_ops.QUANTIZED_FORMATS if f.startswith("int")]))
def test_int8_token_integer_part_exact(fmt, gran, gs):
    """W8A8/W4A8: sum_k qx*(u-z) is exact; with power-of-two scales the whole result is exact."""
    g = torch.Generator().manual_seed(7)
    x, w, offs = _data(7, torch.float32)
    qw = moe_ops.quantize_weight(w, fmt, gran, gs)
    # replace scales by powers of two so that float32 scaling is exact
    pow2 = torch.exp2(torch.randint(-8, -2, qw.scale.shape, generator=g).float())
    qw2 = moe_ops.QuantizedWeight(qw.data, pow2, qw.zero, qw.format, qw.granularity, qw.group_size, qw.shape, qw.dtype)
    y = moe_ops.grouped_mm(x, qw2, offs, act_quant="int8_token")
    qx, sx = moe_ops.quantize_act(x, "int8_token")
    wv = moe_ops.reference.integer_weight_values(qw2.data, qw2.zero, fmt, gran, gs)
    wh = wv * moe_ops.formats.expand_scale(pow2.double(), gran, N, K, gs)
    ref = moe_ops.reference.segment_mm(qx.double(), wh, offs, "nt") * sx.double()
    assert torch.equal(y.double(), ref.float().double())


@pytest.mark.parametrize("mode,fmt,gran", [("fp8_token", "fp8_e4m3", "channel"), ("fp8_1x128", "fp8_e4m3", "block"),
                                           ("fp8_token", "fp8_e5m2", "group")])
def test_fp8_activations_vs_oracle(mode, fmt, gran):
    x, w, offs = _data(3, torch.bfloat16)
    qw = moe_ops.quantize_weight(w, fmt, gran, 32)
    y = moe_ops.grouped_mm(x, qw, offs, act_quant=mode)
    qx, sx = moe_ops.quantize_act(x, mode)
    blk = 128 if mode == "fp8_1x128" else K
    xh = moe_ops.activations.dequantize_blocks_lastdim(qx, sx, blk, torch.float64)
    ref = moe_ops.reference.segment_mm(xh, moe_ops.dequantize_weight(qw, torch.float64), offs, "nt")
    assert rel_err(y, ref) < BOUND[torch.bfloat16]
    # and the quantization error itself stays within fp8's bound against the unquantized product
    assert rel_err(y, oracle_grouped_mm(x, qw.op_args(), offs)) < 0.08


@pytest.mark.parametrize("recipe", ["fp8_rowwise", "fp8_blockwise"])
def test_recipe_forward(recipe):
    x, w, offs = _data(4, torch.bfloat16)
    wb = w.bfloat16()
    y = moe_ops.grouped_mm(x, wb, offs, recipe=recipe)
    ref64 = oracle_grouped_mm(x, (wb, None, None, "none", "none", 0), offs, recipe=recipe)
    assert rel_err(y, ref64) < BOUND[torch.bfloat16]
    plain = oracle_grouped_mm(x, (wb, None, None, "none", "none", 0), offs)
    assert rel_err(y, plain) < 0.06  # fp8 e4m3 quantization of both operands


@pytest.mark.parametrize("case", ["empty_experts", "one_expert_all", "M0", "E1", "tail"])
def test_edge_cases(case):
    g = torch.Generator().manual_seed(5)
    w = torch.randn(E, N, K, generator=g).bfloat16()
    if case == "empty_experts":
        x = torch.randn(M, K, generator=g).bfloat16()
        offs = torch.tensor([0, 0, M, M, M], dtype=torch.int32)
    elif case == "one_expert_all":
        x = torch.randn(M, K, generator=g).bfloat16()
        offs = torch.tensor([0, 0, 0, 0, M], dtype=torch.int32)
    elif case == "M0":
        x = torch.randn(0, K).bfloat16()
        offs = torch.zeros(E, dtype=torch.int32)
    elif case == "E1":
        w = w[:1]
        x = torch.randn(M, K, generator=g).bfloat16()
        offs = torch.tensor([M], dtype=torch.int32)
    else:
        x = torch.randn(M, K, generator=g).bfloat16()
        offs = torch.tensor([3, 9, 9, 20, 25], dtype=torch.int32)
    for fmt in ("none", "int4_asym", "fp8_e4m3"):
        wq = w if fmt == "none" else moe_ops.quantize_weight(w, fmt, "group", 32)
        y = moe_ops.grouped_mm(x, wq, offs)
        ref = oracle_grouped_mm(x, (w, None, None, "none", "none", 0) if fmt == "none" else wq.op_args(), offs)
        assert y.shape == (x.shape[0], N)
        if x.shape[0]:
            assert rel_err(y, ref) < BOUND[torch.bfloat16] or float(ref.abs().max()) == 0
            assert torch.all(y[int(offs[-1]):] == 0)


def _float64_autograd(x, w_hat, offs):
    """dx, dW of sum(y * dy) through an independent per-expert float64 loop."""
    xd = x.double().detach().requires_grad_()
    wd = w_hat.double().detach().requires_grad_()
    ys, start = [], 0
    for e, end in enumerate(offs.tolist()):
        ys.append(xd[start:end] @ wd[e].t())
        start = end
    ys.append(xd.new_zeros(x.shape[0] - start, wd.shape[1]))
    return xd, wd, torch.cat(ys)


@pytest.mark.parametrize("fmt,gran,gs", [("none", "none", 0)] + weight_cases())
def test_backward_every_format(fmt, gran, gs):
    x, w, offs = _data(11, torch.float32)
    dy = torch.randn(M, N, generator=torch.Generator().manual_seed(12))
    xr = x.clone().requires_grad_()
    if fmt == "none":
        wr = w.clone().requires_grad_()
        w_hat = w
    else:
        wr = moe_ops.quantize_weight(w, fmt, gran, gs)
        w_hat = moe_ops.dequantize_weight(wr, torch.float64)
    (moe_ops.grouped_mm(xr, wr, offs) * dy).sum().backward()
    xd, wd, yd = _float64_autograd(x, w_hat, offs)
    (yd * dy.double()).sum().backward()
    assert rel_err(xr.grad, xd.grad) < 1e-5
    if fmt == "none":
        assert rel_err(wr.grad, wd.grad) < 1e-5
        assert torch.all(wr.grad[1] == 0)  # expert 1 has no rows: exact zeros


@pytest.mark.parametrize("recipe,bound", [("fp8_rowwise", 0.08), ("fp8_blockwise", 0.08)])
def test_backward_recipes(recipe, bound):
    """Recipe gradients: equal to the emulated-recipe math (float64 oracle, tight), and within
    fp8's quantization bound of the exact float64 gradients."""
    x, w, offs = _data(13, torch.float32, m=300, empty=(), tail=0)
    dy = torch.randn(300, N, generator=torch.Generator().manual_seed(14))
    xr, wr = x.clone().requires_grad_(), w.clone().requires_grad_()
    (moe_ops.grouped_mm(xr, wr, offs, recipe=recipe) * dy).sum().backward()
    dx_emul = moe_ops.reference.grouped_mm_dgrad(dy.double(), w.double(), None, None, offs, "none", "none", 0, recipe)
    dw_emul = moe_ops.reference.grouped_mm_wgrad(dy.double(), x.double(), offs, recipe)
    assert rel_err(xr.grad, dx_emul) < 1e-5
    assert rel_err(wr.grad, dw_emul) < 1e-5
    xd, wd, yd = _float64_autograd(x, w, offs)
    (yd * dy.double()).sum().backward()
    assert rel_err(xr.grad, xd.grad) < bound
    assert rel_err(wr.grad, wd.grad) < bound


@pytest.mark.parametrize("recipe", ["fp8_rowwise", "fp8_blockwise"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_recipe_weights_path_equals_recipe_op(recipe, dtype):
    """``recipe_weights`` + ``grouped_mm_recipe`` (W cast once; what ``moe_ops.grouped_mm``
    runs for ``fp8_blockwise`` under autograd) give ``grouped_mm(..., recipe)``'s output and
    gradients bit for bit; the cast operands are ``formats.quantize`` of W and of W^T."""
    x, w, offs = _data(15, dtype, m=300, empty=(1,), tail=3)
    w = w.to(dtype)
    dy = torch.randn(300, N, generator=torch.Generator().manual_seed(16)).to(dtype)
    parts = torch.ops.moe_ops.recipe_weights(w, recipe)
    gran = "channel" if recipe == "fp8_rowwise" else "block"
    for got, t in ((parts[:2], w), (parts[2:], w.transpose(1, 2).contiguous())):
        want = moe_ops.formats.quantize(t, "fp8_e4m3", gran, 0)
        assert torch.equal(got[0].view(torch.uint8), want[0].view(torch.uint8)) and torch.equal(got[1], want[1])
    grads = []
    for cast_once in (True, False):
        xr, wr = x.clone().requires_grad_(), w.clone().requires_grad_()
        if cast_once:
            y = torch.ops.moe_ops.grouped_mm_recipe(xr, wr, *parts, offs, recipe)
        else:
            y = torch.ops.moe_ops.grouped_mm(xr, wr, None, None, offs, "none", "none", 0, "none", recipe)
        y.backward(dy)
        grads.append((y, xr.grad, wr.grad))
    for a, b in zip(*grads):
        assert torch.equal(a, b)
    with pytest.raises(RuntimeError, match="cast weights get no gradient"):
        wd = parts[0].float().requires_grad_()
        torch.ops.moe_ops.grouped_mm_recipe(x, w, wd.to(parts[0].dtype), *parts[1:], offs, recipe).sum().backward()


def test_recipe_weights_errors_name_the_argument():
    x, w, offs = _data(17, torch.float32, m=64)
    parts = torch.ops.moe_ops.recipe_weights(w, "fp8_blockwise")
    with pytest.raises(ValueError, match="recipe"):
        torch.ops.moe_ops.recipe_weights(w, "none")
    with pytest.raises(ValueError, match="^w: expected a 3-D"):
        torch.ops.moe_ops.recipe_weights(w[0], "fp8_blockwise")
    with pytest.raises(ValueError, match="^wtq: expected the recipe's codes of shape"):  # W's codes twice
        torch.ops.moe_ops.grouped_mm_recipe(x, w, parts[0], parts[1], parts[0], parts[1], offs, "fp8_blockwise")
    with pytest.raises(ValueError, match="^wq_scale: expected shape"):  # rowwise scales for blockwise codes
        rw = torch.ops.moe_ops.recipe_weights(w, "fp8_rowwise")
        torch.ops.moe_ops.grouped_mm_recipe(x, w, parts[0], rw[1], *parts[2:], offs, "fp8_blockwise")


def test_blockwise_wgrad_blocks_do_not_cross_experts():
    """A huge value in one expert must not change the quantization of its neighbour's rows."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(256, K, generator=g)
    dy = torch.randn(256, N, generator=g)
    offs = torch.tensor([100, 256], dtype=torch.int32)
    base = moe_ops.reference.grouped_mm_wgrad(dy, x, offs, "fp8_blockwise")
    x2 = x.clone()
    x2[150] *= 1e4  # expert 1 only
    out = moe_ops.reference.grouped_mm_wgrad(dy, x2, offs, "fp8_blockwise")
    assert torch.equal(out[0], base[0])
    blk, nb = moe_ops.recipes.token_blocks(offs, 256, 128)
    assert blk.tolist()[:100] == [0] * 100 and blk[100].item() == 1 and blk[228].item() == 2


def test_quantized_weight_no_grad_and_x_grad_flows():
    x, w, offs = _data(15, torch.float32)
    qw = moe_ops.quantize_weight(w, "fp8_e4m3", "channel")
    qw_bad = moe_ops.QuantizedWeight(qw.data, qw.scale.clone().requires_grad_(), None, qw.format, qw.granularity,
                                     0, qw.shape, qw.dtype)
    with pytest.raises(RuntimeError, match="no gradient"):
        moe_ops.grouped_mm(x, qw_bad, offs)
    xr = x.clone().requires_grad_()
    moe_ops.grouped_mm(xr, qw, offs, act_quant="fp8_token").sum().backward()
    assert xr.grad is not None and torch.isfinite(xr.grad).all()
