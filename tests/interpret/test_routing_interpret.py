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
