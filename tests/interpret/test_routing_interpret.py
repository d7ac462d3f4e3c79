"""The routing kernels in Triton's interpreter against the sort-based reference operators."""
import pytest
import torch

from moe_ops import routing
from moe_ops.kernels import dispatch


@pytest.mark.parametrize("scoring,renorm,bias", [("softmax", True, False), ("sigmoid", True, True),
                                                 ("softmax", False, False)])
@pytest.mark.parametrize("T,E,k", [(1, 8, 2), (37, 12, 3), (70, 64, 8)])
def test_topk_kernel(T, E, k, scoring, renorm, bias):
    g = torch.Generator().manual_seed(T * E)
    logits = torch.randn(T, E, generator=g)
    logits[0, :] = 0.0  # all tied: the lowest experts win
    b = torch.randn(E, generator=g) * 0.1 if bias else None
    w, ids = dispatch.topk_route(logits, k, scoring, renorm, b)
    p = routing._scores(logits, scoring)
    ref_ids = routing._select(logits, p, k, b).to(torch.int32)
    assert torch.equal(ids, ref_ids)
    if not bias:
        assert ids[0].tolist() == list(range(k))
    ref_w = p.gather(1, ref_ids.long())
    if renorm:
        ref_w = ref_w / ref_w.sum(-1, keepdim=True)
    torch.testing.assert_close(w, ref_w, rtol=1e-6, atol=1e-7)


def _reference_sort(ids, E):
    flat = ids.reshape(-1).long()
    key = torch.where((flat >= 0) & (flat < E), flat, E)
    srt, order = torch.sort(key, stable=True)
    return order.to(torch.int32), torch.searchsorted(srt, torch.arange(E), right=True).to(torch.int32)


@pytest.mark.parametrize("T,k,E", [(1, 1, 4), (1, 8, 128), (9, 2, 5), (300, 8, 16), (64, 8, 256)])
def test_count_sort_kernel(T, k, E):
    g = torch.Generator().manual_seed(T + E)
    ids = torch.randint(0, E, (T, k), generator=g, dtype=torch.int32)
    if T * k > 4:
        ids.view(-1)[torch.randperm(T * k, generator=g)[:3]] = torch.tensor([E, -1, E + 7], dtype=torch.int32)
    rows, offs = dispatch.count_sort(ids, E)
    ref_rows, ref_offs = _reference_sort(ids, E)
    assert torch.equal(offs, ref_offs)
    assert torch.equal(rows, ref_rows)


def test_count_sort_int64_ids_out_of_int32_range_are_dropped():
    ids = torch.tensor([[3, 2 ** 33 + 1], [1, 0]], dtype=torch.int64)
    rows, offs = dispatch.count_sort(ids, 4)
    assert offs.tolist() == [1, 2, 2, 3] and rows.tolist() == [3, 2, 0, 1]


@pytest.mark.parametrize("scoring,renorm,bias", [("softmax", True, False), ("sigmoid", True, True),
                                                 ("softmax", False, False)])
@pytest.mark.parametrize("T,E,k", [(1, 8, 2), (1, 128, 8), (5, 12, 3), (16, 128, 8)])
def test_topk_sort_kernel(T, E, k, scoring, renorm, bias):
    """The one-launch top-k + counting sort equals the two launches it replaces (ties too)."""
    assert dispatch.topk_sort_fits(T, E, k)
    g = torch.Generator().manual_seed(T * E + k)
    logits = torch.randn(T, E, generator=g)
    logits[0, :] = 0.0  # all tied: the lowest experts win
    logits[-1, : E // 2] = 1.0  # ties inside the picks of another token
    b = torch.randn(E, generator=g) * 0.1 if bias else None
    w, ids, rows, offs = dispatch.topk_sort(logits, k, scoring, renorm, b)
    ref_w, ref_ids = dispatch.topk_route(logits, k, scoring, renorm, b)
    ref_rows, ref_offs = _reference_sort(ref_ids, E)
    assert torch.equal(ids, ref_ids) and torch.equal(rows, ref_rows) and torch.equal(offs, ref_offs)
    assert torch.equal(w, ref_w)


def test_topk_sort_fits_decode_sizes_only():
    assert dispatch.topk_sort_fits(16, 128, 8) and not dispatch.topk_sort_fits(17, 128, 8)
    assert not dispatch.topk_sort_fits(64, 256, 8)


@pytest.mark.parametrize("T,E,H,k,dtype,scoring,bias,programs", [
    (1, 128, 512, 8, torch.bfloat16, "softmax", False, 128),
    (5, 12, 40, 3, torch.float32, "softmax", False, 128),  # E, H off the tiles
    (16, 32, 300, 4, torch.float16, "sigmoid", True, 128),
    (3, 20, 700, 2, torch.bfloat16, "softmax", False, 4),  # several tiles a split
])
def test_router_topk_sort_kernel(T, E, H, k, dtype, scoring, bias, programs, monkeypatch):
    """The one-launch router GEMM + top-k + sort: logits within the dtype's rounding of the
    float64 product, then routing equal to the routing kernel's on those very logits; the
    semaphore back at 0, so a second launch works alike."""
    monkeypatch.setattr(dispatch, "ROUTER_PROGRAMS", programs)
    if programs < 128:
        assert dispatch.router_split(E, H)[1] > 1
    g = torch.Generator().manual_seed(T * E + H)
    x = torch.randn(T, H, generator=g).to(dtype)
    wr = (torch.randn(E, H, generator=g) * H ** -0.5).to(dtype)
    b = torch.randn(E, generator=g) * 0.1 if bias else None
    sem = torch.zeros(1, dtype=torch.int32)
    for _ in range(2):
        logits, w, ids, rows, offs = dispatch.router_topk_sort(x, wr, k, scoring, True, b, sem)
        assert sem.item() == 0
        ref = (x.double() @ wr.double().t())
        # one rounding to the dtype; the interpreter casts to bfloat16 by truncation: up to 2 ulp
        tol = {torch.float32: 1e-5, torch.float16: 2 ** -10, torch.bfloat16: 2 ** -6}[dtype]
        assert logits.dtype == dtype
        torch.testing.assert_close(logits.double(), ref, rtol=tol, atol=tol)
        exp = dispatch.topk_sort(logits, k, scoring, True, b)
        for got, want in zip((w, ids, rows, offs), exp):
            assert torch.equal(got, want)
