"""Bad input: a clear error naming the argument, the same from the eager path and the fake kernel."""
import re

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

import moe_ops

E, N, K, M = 3, 16, 64, 10


def _good():
    x = torch.randn(M, K)
    w = torch.randn(E, N, K)
    qw = moe_ops.quantize_weight(w, "int4_asym", "group", 32)
    offs = torch.tensor([3, 6, 10], dtype=torch.int32)
    return x, w, qw, offs


def _gmm_args(x_, qw, offs_, **over):
    args = dict(x=x_, w=qw.data, w_scale=qw.scale, w_zero=qw.zero, offs=offs_, w_format=qw.format,
                granularity=qw.granularity, group_size=qw.group_size, act_quant="none", recipe="none")
    args.update(over)
    return list(args.values())


def _both(op, args, exc, pattern):
    """The eager call and the fake-kernel call raise ``exc`` matching ``pattern``."""
    with pytest.raises(exc, match=pattern) as eager:
        op(*args)
    mode = FakeTensorMode(allow_non_fake_inputs=False)
    fargs = [mode.from_tensor(a) if isinstance(a, torch.Tensor) else a for a in args]
    with mode:
        with pytest.raises(exc, match=pattern) as fake:
            op(*fargs)
    assert str(eager.value) == str(fake.value)


x0, w0, qw0, offs0 = _good()
GMM = torch.ops.moe_ops.grouped_mm.default

CASES = {
    "unknown_format": (dict(w_format="int3_sym"), ValueError, "w_format"),
    "bad_granularity": (dict(granularity="row"), ValueError, "granularity"),
    "group_size_zero": (dict(group_size=0), ValueError, "group_size"),
    "scale_shape": (dict(w_scale=qw0.scale[:, :, :1]), ValueError, "w_scale: expected shape"),
    "scale_dtype": (dict(w_scale=qw0.scale.double()), ValueError, "w_scale: expected dtype"),
    "zero_missing": (dict(w_zero=None), ValueError, "w_zero"),
    "zero_dtype": (dict(w_zero=qw0.zero.to(torch.int32)), ValueError, "w_zero: expected dtype"),
    "data_dtype": (dict(w=qw0.data.to(torch.int8)), ValueError, "w: format int4_asym stores"),
    "offs_dtype": (dict(offs=offs0.long()), ValueError, "offs: expected dtype torch.int32"),
    "offs_2d": (dict(offs=offs0.view(1, 3)), ValueError, "offs: expected a 1-D"),
    "offs_len": (dict(offs=offs0[:2]), ValueError, "offs: expected length 3"),
    "offs_device": (dict(offs=offs0.to("meta")), RuntimeError, "offs is on meta"),
    "x_dtype": (dict(x=x0.to(torch.int32)), ValueError, "x: unsupported dtype"),
    "x_1d": (dict(x=x0[0]), ValueError, "x: expected a 2-D"),
    "x_cols": (dict(x=x0[:, :32]), ValueError, "x: has 32 columns"),
    "w_device": (dict(w=qw0.data.to("meta")), RuntimeError, "w is on meta"),
    "recipe_quantized": (dict(recipe="fp8_blockwise"), ValueError, "recipe: training recipe"),
    "unknown_recipe": (dict(recipe="fp4"), ValueError, "recipe"),
    "act_quant_wrong_weights": (dict(act_quant="fp8_token"), ValueError, "act_quant: 'fp8_token' needs fp8"),
    "unknown_act": (dict(act_quant="int4_token"), ValueError, "act_quant"),
}


@pytest.mark.parametrize("name", list(CASES))
def test_grouped_mm_errors(name):
    over, exc, pattern = CASES[name]
    _both(GMM, _gmm_args(x0, qw0, offs0, **over), exc, re.escape(pattern) if ":" in pattern else pattern)


def test_plain_weight_errors():
    args = [x0, w0.bfloat16(), None, None, offs0, "none", "none", 0, "none", "none"]
    _both(GMM, args, ValueError, "w: dtype torch.bfloat16 does not match x's dtype")
    args = [x0, w0, qw0.scale, None, offs0, "none", "none", 0, "none", "none"]
    _both(GMM, args, ValueError, "w_scale: must be None")


def test_dgrad_wgrad_errors():
    dy = torch.randn(M, N)
    dg = torch.ops.moe_ops.grouped_mm_dgrad.default
    _both(dg, [dy[:, :8], w0, None, None, offs0, "none", "none", 0, "none"], ValueError, "dy: has 8 columns")
    wg = torch.ops.moe_ops.grouped_mm_wgrad.default
    _both(wg, [dy, x0[:5], offs0, "none"], ValueError, "x: has 5 rows")
    _both(wg, [dy, x0.double(), offs0, "none"], ValueError, "x: dtype torch.float64 does not match")


def test_quantize_weight_errors():
    qop = torch.ops.moe_ops.quantize_weight.default
    w = torch.randn(2, 4, 66)
    _both(qop, [w, "int4_sym", "group", 0], ValueError, "group_size: must be a positive int")
    _both(qop, [w, "int4_sym", "group", 32], ValueError, "group_size: 32 does not divide K=66")
    _both(qop, [torch.randn(2, 4, 65), "int4_sym", "channel", 0], ValueError, "not divisible by the packing factor 2")
    _both(qop, [torch.randn(2, 4, 66), "int2_asym", "channel", 0], ValueError, "packing factor 4")
    _both(qop, [w, "int8_sym", "block", 0], ValueError, "granularity")
    _both(qop, [w, "fp6", "channel", 0], ValueError, "format: unknown weight format")
    with pytest.raises(ValueError, match="format: unknown weight format"):
        moe_ops.quantize_weight(w, "fp6")


def test_public_api_errors():
    x, w, qw, offs = _good()
    with pytest.raises(ValueError, match="recipe: training recipe"):
        moe_ops.grouped_mm(x, qw, offs, recipe="fp8_rowwise")
    with pytest.raises(TypeError, match="w: expected a torch.Tensor or a QuantizedWeight"):
        moe_ops.grouped_mm(x, [w], offs)
    with pytest.raises(ValueError, match="act_quant"):
        moe_ops.grouped_mm(x, w, offs, act_quant="int8_token")
