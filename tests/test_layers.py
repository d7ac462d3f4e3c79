"""MoE module, quantize_experts and state_dict, the tiny-LM training curves, the demo."""
import io
import subprocess
import sys

import pytest
import torch

import moe_ops
from moe_ops.layers import train_tiny_lm
from helpers import rel_err


def _moe():
    return moe_ops.MoE(64, 32, num_experts=8, top_k=2, dtype=torch.bfloat16, seed=3)


@pytest.mark.parametrize("fmt,gran,act,bound", [("int4_asym", "group", None, 0.25),
                                                ("fp8_e4m3", "block", "fp8_1x128", 0.1),
                                                ("int8_sym", "channel", "int8_token", 0.05)])
def test_quantize_experts_and_state_dict(fmt, gran, act, bound):
    x = torch.randn(40, 64, dtype=torch.bfloat16)
    m = _moe()
    with torch.no_grad():
        ref = m(x)
    moe_ops.quantize_experts(m, fmt, gran, 32, act_quant=act)
    assert m.gate_up.weight is None and m.gate_up.quantized.format == fmt
    with torch.no_grad():
        y = m(x)
    assert rel_err(y, ref) < bound  # the layer output through both quantized GEMMs
    buf = io.BytesIO()
    torch.save(m.state_dict(), buf)
    buf.seek(0)
    sd = torch.load(buf)
    fresh = _moe()  # unquantized: loading a quantized state_dict converts it
    fresh.act_quant = act
    fresh.load_state_dict(sd)
    assert fresh.gate_up.quantized.format == fmt
    with torch.no_grad():
        assert torch.equal(fresh(x), y)


def test_quantized_weight_to_and_dtype():
    qw = moe_ops.quantize_weight(torch.randn(2, 8, 64), "int2_sym", "group", 32)
    q2 = qw.to(torch.bfloat16)
    assert q2.dtype == torch.bfloat16 and q2.data.dtype == torch.uint8
    assert moe_ops.dequantize_weight(q2).dtype == torch.bfloat16


def test_training_losses_fall_and_fp8_tracks_bf16():
    """200 steps of the tiny MoE LM on the fixed synthetic corpus: both losses fall by more than
    half; the fp8_blockwise curve's mean over the last 50 steps is within 0.1 (nats) of bf16's."""
    bf16 = train_tiny_lm(None, 200, dtype=torch.bfloat16)
    fp8 = train_tiny_lm("fp8_blockwise", 200, dtype=torch.bfloat16)
    for c in (bf16, fp8):
        assert sum(c[-50:]) / 50 < 0.5 * sum(c[:5]) / 5
    assert abs(sum(fp8[-50:]) / 50 - sum(bf16[-50:]) / 50) < 0.1


def test_demo_runs():
    out = subprocess.run([sys.executable, "-m", "moe_ops", "--steps", "20", "--no-compile"], capture_output=True,
                         text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "int4_asym g128" in out.stdout and "fp8_blockwise: mean loss" in out.stdout
