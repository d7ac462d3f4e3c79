"""The row kernels (moe_ops.kernels.row_ops) in Triton's interpreter against the PyTorch
reference paths: the permute gather (bit-exact, with and without the row scale), the slot
combine and the SwiGLU backward (float32 rounding), on ragged sizes (H, I off the tiles, rows
of a wider tensor, empty inputs)."""
import pytest
import torch

from moe_ops import expert_mlp, routing
from moe_ops.kernels import row_ops


def _rows(T, k, seed):
    g = torch.Generator().manual_seed(seed)
    return g, torch.randperm(T * k, generator=g).to(torch.int32)


@pytest.mark.parametrize("T,k,H,dtype", [(7, 3, 300, torch.bfloat16), (5, 2, 2100, torch.float32),
                                         (1, 8, 64, torch.float16), (0, 2, 32, torch.float32)])
def test_gather_token_rows(T, k, H, dtype):
    g, sorted_rows = _rows(T, k, T * H)
    wide = torch.randn(T, H + 8, generator=g).to(dtype)
    src = wide[:, 3:H + 3]  # a row stride wider than H
    scale = torch.rand(T * k, generator=g)
    tok = sorted_rows.long() // k
    plain, scaled = row_ops.gather_token_rows(src, sorted_rows, k, scale)
    assert torch.equal(plain, src[tok])
    want = (src[tok].float() * scale[:, None]).to(dtype)
    if dtype == torch.float32:
        assert torch.equal(scaled, want)
    else:  # the interpreter converts float32 to 16 bits by truncation: within one ulp
        torch.testing.assert_close(scaled.float(), want.float(), rtol=2 ** -7, atol=0)
    only, scaled2 = row_ops.gather_token_rows(src, sorted_rows, k, scale, plain=False)
    assert only is None and torch.equal(scaled2, scaled)
    assert row_ops.gather_token_rows(src, sorted_rows, k, plain=False) == (None, None)


@pytest.mark.parametrize("T,k,H,weighted", [(7, 3, 300, True), (5, 8, 2100, False), (1, 1, 40, True), (0, 2, 8, True)])
def test_combine_slots(T, k, H, weighted):
    g, sorted_rows = _rows(T, k, T + H)
    rows = torch.randn(T * k, H, generator=g)
    w = torch.rand(T, k, generator=g) if weighted else None
    got = row_ops.combine_slots(rows, routing.inverse_rows(sorted_rows), k, w)
    pos = routing.inverse_rows(sorted_rows)
    want = torch.zeros(T, H, dtype=torch.float64)
    for j in range(k):  # float64: the kernel's float32 sums are within a few ulp
        slot = rows[pos[torch.arange(T) * k + j]].double()
        want += slot * (w[:, j:j + 1].double() if weighted else 1.0)
    torch.testing.assert_close(got.double(), want, rtol=1e-6, atol=1e-6)
    # and the order is fixed: a second call is bitwise the same
    assert torch.equal(got, row_ops.combine_slots(rows, pos, k, w))


@pytest.mark.parametrize("M,I,write_h", [(9, 300, True), (33, 768, False), (1, 40, True), (0, 16, True)])
def test_swiglu_backward(M, I, write_h):
    g = torch.Generator().manual_seed(M * I + 1)
    gu = torch.randn(M, 2 * I + 5, generator=g)[:, :2 * I] * 3  # a row stride wider than 2I
    dzh = torch.randn(M, I, generator=g)
    rw = torch.rand(M, generator=g)
    dgu, per_row, h = row_ops.swiglu_backward(gu, dzh, rw, write_h)
    ref = expert_mlp.swiglu_backward(gu, dzh, rw, True)
    torch.testing.assert_close(dgu, ref[0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(per_row, ref[1], rtol=1e-5, atol=1e-5)
    if write_h:
        torch.testing.assert_close(h, ref[2], rtol=1e-6, atol=1e-7)
    else:
        assert h is None


def test_rejects_strided_columns():
    with pytest.raises(ValueError, match="src: expected a 2-D tensor with contiguous columns"):
        row_ops.gather_token_rows(torch.zeros(4, 6)[:, ::2], torch.arange(4, dtype=torch.int32), 1)
