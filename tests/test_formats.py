"""The written format spec, held bit for bit on small hand-checked cases and on random data."""
import dataclasses

import pytest
import torch

import moe_ops
from moe_ops import formats
from helpers import weight_cases


def test_pack_low_bits_first():
    codes = torch.tensor([[[1, 2, 3, 15]]], dtype=torch.uint8)
    assert formats.pack_codes(codes, 4).tolist() == [[[0x21, 0xF3]]]
    codes2 = torch.tensor([[[1, 2, 3, 0]]], dtype=torch.uint8)
    assert formats.pack_codes(codes2, 2).tolist() == [[[1 | (2 << 2) | (3 << 4)]]]


@pytest.mark.parametrize("bits", [2, 4])
def test_pack_roundtrip(bits):
    g = torch.Generator().manual_seed(bits)
    codes = torch.randint(0, 1 << bits, (3, 5, 64), generator=g, dtype=torch.uint8)
    assert torch.equal(formats.unpack_codes(formats.pack_codes(codes, bits), bits), codes)


def test_int8_sym_by_hand():
    w = torch.tensor([[[127.0, -62.5, 31.75, 0.0]]])
    qw = moe_ops.quantize_weight(w, "int8_sym", "channel")
    assert qw.data.dtype == torch.int8
    assert qw.scale.item() == 1.0
    assert qw.data.tolist() == [[[127, -62, 32, 0]]]  # round(-62.5) = -62: half to even


def test_int4_sym_by_hand():
    w = torch.tensor([[[7.0, -7.0, 3.5, 0.0, 1.0, 2.0, -2.5, 6.4]]])
    qw = moe_ops.quantize_weight(w, "int4_sym", "channel")
    assert qw.scale.item() == 1.0
    # q = [7, -7, 4 (3.5 half-even), 0, 1, 2, -2 (half-even), 6] + 8
    codes = [15, 1, 12, 8, 9, 10, 6, 14]
    packed = [codes[i] | (codes[i + 1] << 4) for i in range(0, 8, 2)]
    assert qw.data.tolist() == [[packed]]


def test_int2_asym_by_hand():
    w = torch.tensor([[[-1.0, 0.0, 1.0, 2.0]]])
    qw = moe_ops.quantize_weight(w, "int2_asym", "channel")
    assert qw.scale.item() == 1.0 and qw.zero.item() == 1  # s = 3/3, z = round(1/1)
    assert formats.unpack_codes(qw.data, 2).tolist() == [[[0, 1, 2, 3]]]
    assert moe_ops.dequantize_weight(qw).tolist() == w.tolist()


def test_asym_positive_range_includes_zero():
    w = torch.tensor([[[2.0, 3.0, 4.0, 5.0]]])
    qw = moe_ops.quantize_weight(w, "int8_asym", "channel")
    assert qw.zero.item() == 0
    assert qw.scale.item() == pytest.approx(5.0 / 255)


def test_fp8_by_hand():
    w = torch.tensor([[[448.0, -224.0, 1.0, 0.0]]]) / 2
    qw = moe_ops.quantize_weight(w, "fp8_e4m3", "tensor")
    assert qw.scale.item() == 0.5
    assert qw.data.float().tolist() == [[[448.0, -224.0, 1.0, 0.0]]]


def test_block_scale_shape_and_values():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(2, 200, 300, generator=g)
    qw = moe_ops.quantize_weight(w, "fp8_e4m3", "block")
    assert qw.scale.shape == (2, 2, 3)
    assert qw.scale[1, 1, 2] == w[1, 128:, 256:].abs().max() / 448.0


@pytest.mark.parametrize("fmt,gran,gs", weight_cases())
def test_zero_groups_exact_and_no_nan(fmt, gran, gs):
    w = torch.zeros(2, 4, 256)
    w[1, 2, 100] = 3.0
    qw = moe_ops.quantize_weight(w, fmt, gran, gs)
    for t in (qw.scale, qw.data.float()):
        assert not torch.isnan(t).any()
    wh = moe_ops.dequantize_weight(qw)
    assert not torch.isnan(wh).any()
    assert torch.all(wh[0] == 0)
    assert torch.all(wh[1, :2] == 0)


# max relative (Frobenius) reconstruction error of N(0,1) weights, group 32 / channel
RECON = {"int8_sym": 0.01, "int8_asym": 0.01, "int4_sym": 0.16, "int4_asym": 0.12, "int2_sym": 0.8,
         "int2_asym": 0.55, "fp8_e4m3": 0.04, "fp8_e5m2": 0.07}


@pytest.mark.parametrize("fmt,gran,gs", [c for c in weight_cases() if c[1] in ("group", "channel")])
def test_reconstruction_bounds(fmt, gran, gs):
    g = torch.Generator().manual_seed(1)
    w = torch.randn(3, 16, 128, generator=g)
    wh = moe_ops.dequantize_weight(moe_ops.quantize_weight(w, fmt, gran, gs), torch.float64)
    err = float((wh - w.double()).norm() / w.double().norm())
    assert err < RECON[fmt]


@pytest.mark.parametrize("fmt,gran,gs", weight_cases())
def test_dequantize_matches_spec_formula(fmt, gran, gs):
    """w_hat = (q - z) * s computed independently of the library's dequantize."""
    g = torch.Generator().manual_seed(2)
    w = torch.randn(2, 130, 256, generator=g) * 3
    qw = moe_ops.quantize_weight(w, fmt, gran, gs)
    spec = formats.get_format(fmt)
    E, N, K = w.shape
    if spec.kind == "fp8":
        q = qw.data.double()
    elif spec.bits == 8 and spec.symmetric:
        q = qw.data.double()
    else:
        q = formats.unpack_codes(qw.data, spec.bits).double()
        z = qw.zero.double() if spec.has_zero else torch.full_like(qw.scale.double(), spec.implicit_zero)
        q = q - formats.expand_scale(z, gran, N, K, gs)
    ref = q * formats.expand_scale(qw.scale.double(), gran, N, K, gs)
    assert torch.equal(moe_ops.dequantize_weight(qw, torch.float64), ref)
    # codes stay in range
    if spec.kind == "int" and spec.bits < 8:
        assert int(formats.unpack_codes(qw.data, spec.bits).max()) < (1 << spec.bits)


def test_quantized_weight_container():
    w = torch.randn(2, 8, 64, dtype=torch.bfloat16)
    qw = moe_ops.quantize_weight(w, "int4_asym", granularity="group", group_size=32)
    assert qw.shape == (2, 8, 64) and qw.dtype == torch.bfloat16
    assert qw.data.shape == (2, 8, 32) and qw.scale.shape == (2, 8, 2) and qw.zero.shape == (2, 8, 2)
    assert moe_ops.dequantize_weight(qw).dtype == torch.bfloat16
    q2 = qw.to("cpu")
    assert q2 is not qw and q2.format == "int4_asym"
    with pytest.raises(dataclasses.FrozenInstanceError):
        qw.format = "int8_sym"  # immutable
    with pytest.raises(RuntimeError, match="no gradient"):
        qw.requires_grad_()


def test_activation_quant_spec():
    x = torch.tensor([[127.0, -62.5, 0.0, 31.75], [0.0, 0.0, 0.0, 0.0]])
    q, s = moe_ops.quantize_act(x, "int8_token")
    assert q.tolist() == [[127, -62, 0, 32], [0, 0, 0, 0]]
    assert s[1].item() == 0.0
    x2 = torch.randn(3, 300)
    q, s = moe_ops.quantize_act(x2, "fp8_1x128")
    assert q.dtype == torch.float8_e4m3fn and s.shape == (3, 3)
    assert s[2, 2].item() == pytest.approx(x2[2, 256:].abs().max().item() / 448.0, rel=1e-7)
