"""The casts' reciprocal-and-FMA division (``scale_division.divide_by_scale``) equals ``div_rn``
on the device, exhaustively: every finite bf16 / fp16 value ``v`` against every scale
``s = absmax / qmax`` of every positive 16-bit absmax ``>= |v|``. Quotients differ only below
2^-53 (a subnormal ``v``), where every fp8 or int8 code is zero. The scales ``absmax / qmax``
(``absmax_scale``) of every 16-bit absmax equal the CPU's float32 division, subnormal ones too."""
import pytest
import torch
from scale_division_check import count_mismatches, count_scale_mismatches

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


@pytest.mark.parametrize("qmax", [448.0, 127.0])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_rcp_division_exhaustive(dtype, qmax):
    big, differ, far = count_mismatches(dtype, qmax, "cuda")
    print(f"{dtype} qmax {qmax}: {differ} quotients differ, all below 2^-53")
    assert big == 0 and far == 0, (big, differ, far)


@pytest.mark.parametrize("qmax", [448.0, 127.0])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_absmax_scale_exhaustive(dtype, qmax):
    assert count_scale_mismatches(dtype, qmax, "cuda") == 0
