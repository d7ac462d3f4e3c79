"""torch.library.opcheck (schema, autograd registration, fake tensor, AOT dispatch) on every
operator, for every weight format, activation mode and training recipe."""
import pytest
import torch

import moe_ops
from helpers import ragged_offs, weight_cases

E, N, K, M = 3, 16, 64, 21


def _inputs(seed=0, dtype=torch.float32, requires_grad=True):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(M, K, generator=g, dtype=dtype).requires_grad_(requires_grad)
    w = torch.randn(E, N, K, generator=g, dtype=dtype)
    offs = ragged_offs(M, E, g, tail=2)
    return x, w, offs


FP8 = (torch.float8_e4m3fn, torch.float8_e5m2)
ALL_UTILS = ("test_schema", "test_autograd_registration", "test_faketensor", "test_aot_dispatch_dynamic")


def _has_fp8(tree):
    leaves = torch.utils._pytree.tree_leaves(tree)
    return any(isinstance(t, torch.Tensor) and t.dtype in FP8 for t in leaves)


def _check(op, args):
    """opcheck with all its tests. opcheck compares tensors with ``allclose``, which has no CPU
    kernel for float8: where fp8 tensors are inputs or outputs, ``test_schema`` (no input is
    mutated) is replaced by the same check on bit views, and the remaining tests that only
    compare fp8 outputs are run on the op with its outputs viewed as uint8."""
    if not _has_fp8(args) and not _has_fp8(op(*args)):
        torch.library.opcheck(op, args, test_utils=ALL_UTILS)
        return
    before = [a.detach().clone() if isinstance(a, torch.Tensor) else a for a in args]
    out = op(*args)
    for a, b in zip(args, before):
        if isinstance(a, torch.Tensor):
            assert torch.equal(a.detach().view(torch.uint8) if a.dtype in FP8 else a.detach(),
                               b.view(torch.uint8) if b.dtype in FP8 else b), "input mutated"
    utils = ("test_autograd_registration", "test_faketensor")
    if not _has_fp8(args):
        utils += ("test_aot_dispatch_dynamic",) if not _has_fp8(out) else ()
    torch.library.opcheck(op, args, test_utils=utils)


@pytest.mark.parametrize("fmt,gran,gs", weight_cases())
def test_grouped_mm_quantized(fmt, gran, gs):
    x, w, offs = _inputs(1)
    qw = moe_ops.quantize_weight(w, fmt, gran, gs)
    wd, ws, wz, f, g, s = qw.op_args()
    _check(torch.ops.moe_ops.grouped_mm.default, (x, wd, ws, wz, offs, f, g, s, "none", "none"))
    _check(torch.ops.moe_ops.grouped_mm_dgrad.default, (torch.randn(M, N), wd, ws, wz, offs, f, g, s, "none"))
    _check(torch.ops.moe_ops.dequantize_weight.default, (wd, ws, wz, f, g, s, torch.bfloat16))
    _check(torch.ops.moe_ops.quantize_weight.default, (w, fmt, gran, gs))
    act = "int8_token" if fmt.startswith("int") else "fp8_1x128"
    _check(torch.ops.moe_ops.grouped_mm.default, (x, wd, ws, wz, offs, f, g, s, act, "none"))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("recipe", ["none", "fp8_rowwise", "fp8_blockwise"])
def test_grouped_mm_plain_and_recipes(recipe, dtype):
    x, w, offs = _inputs(2, dtype)
    w = w.requires_grad_()
    _check(torch.ops.moe_ops.grouped_mm.default, (x, w, None, None, offs, "none", "none", 0, "none", recipe))
    dy = torch.randn(M, N, dtype=dtype)
    _check(torch.ops.moe_ops.grouped_mm_dgrad.default, (dy, w.detach(), None, None, offs, "none", "none", 0, recipe))
    _check(torch.ops.moe_ops.grouped_mm_wgrad.default, (dy, x.detach(), offs, recipe))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("recipe", ["fp8_rowwise", "fp8_blockwise"])
def test_recipe_weights_and_grouped_mm_recipe(recipe, dtype):
    x, w, offs = _inputs(5, dtype)
    _check(torch.ops.moe_ops.recipe_weights.default, (w, recipe))
    parts = torch.ops.moe_ops.recipe_weights(w, recipe)
    _check(torch.ops.moe_ops.grouped_mm_recipe.default, (x, w.requires_grad_(), *parts, offs, recipe))


@pytest.mark.parametrize("mode", ["int8_token", "fp8_token", "fp8_1x128"])
def test_quantize_act(mode):
    x, _, _ = _inputs(3, requires_grad=False)
    _check(torch.ops.moe_ops.quantize_act.default, (x, mode))


def test_segment_mm():
    x, w, offs = _inputs(4, requires_grad=False)
    _check(torch.ops.moe_ops._segment_mm.default, (x, w, offs, "nt"))
    _check(torch.ops.moe_ops._segment_mm.default, (torch.randn(M, N), w, offs, "nn"))
    _check(torch.ops.moe_ops._segment_mm.default, (torch.randn(M, N), x, offs, "tn"))
