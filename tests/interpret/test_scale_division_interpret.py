"""The casts' reciprocal-and-FMA division (``scale_division.divide_by_scale``) against numpy's
correctly rounded division, every 16-bit value against every 97th scale a 16-bit absmax gives
(the GPU test covers all scales); the scales ``absmax / qmax`` (``absmax_scale``) of every
16-bit absmax."""
import pytest
import torch
from scale_division_check import count_mismatches, count_scale_mismatches


@pytest.mark.parametrize("qmax", [448.0, 127.0])  # fp8 e4m3 and int8 codes
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_rcp_division_equals_div_rn(dtype, qmax):
    big, differ, far = count_mismatches(dtype, qmax, "cpu", every=97)
    assert big == 0 and far == 0, (big, differ, far)


@pytest.mark.parametrize("qmax", [448.0, 127.0])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_absmax_scale_equals_division(dtype, qmax):
    assert count_scale_mismatches(dtype, qmax, "cpu") == 0
