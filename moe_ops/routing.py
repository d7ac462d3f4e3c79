"""Routing operators: top-k selection, sorting rows by expert (both at once: ``route``),
permute and unpermute.

All five are ``torch.library.triton_op``\\ s whose bodies are plain PyTorch with static shapes
(``T * top_k`` rows) and no host synchronisation (no ``bincount``, ``nonzero`` or ``.item()``),
so they run on any device and Inductor traces and fuses them. On GPUs the row gathers of
``permute``, of the slot sums (``unpermute``, :func:`sum_slots`) and of their backward are
Triton kernels that move whole rows (:mod:`moe_ops.kernels.row_ops`): indexed gathers in
PyTorch or Inductor address every element and ran 3-5x below copy bandwidth. Layout conventions:

* ``topk_ids``/``topk_weights`` ``[T, top_k]``: slot j of token t is *flat row* ``t * top_k + j``.
* ``sorted_rows`` ``[T * top_k]`` int32: the flat row at each position of the expert-sorted
  order (stable: within an expert, rows keep token order). Position ``r`` holds token
  ``sorted_rows[r] // top_k``.
* ``offs`` ``[E]`` int32: the end position of each expert's rows (the grouped GEMMs' ``offs``).
  Ids outside ``[0, E)`` mark a dropped slot (e.g. an expert on another rank): its row sorts
  after every expert's, past ``offs[-1]``, where the grouped GEMMs write zeros, so it adds
  nothing to the combined output.

Top-k ties go to the lower expert index (a stable descending sort), on every device.
"""
from __future__ import annotations

from typing import List, Optional

import torch
from torch.library import triton_op

from . import checks

SCORINGS = checks.SCORINGS
COUNT_SORT_MAX_ROWS = 4096  # GPU: one-launch counting sort up to here (decode), torch.sort above


# ----------------------------------------------------------------------------- top-k routing
def _weight_dtype(logits: torch.Tensor) -> torch.dtype:
    return torch.float64 if logits.dtype == torch.float64 else torch.float32


def _scores(logits: torch.Tensor, scoring: str) -> torch.Tensor:
    lf = logits.to(_weight_dtype(logits))
    return torch.softmax(lf, dim=-1) if scoring == "softmax" else torch.sigmoid(lf)


def _select(logits: torch.Tensor, scores: torch.Tensor, top_k: int, bias: Optional[torch.Tensor],
            num_groups: int = 1, topk_groups: int = 1) -> torch.Tensor:
    """int64 ``[T, top_k]``: the top-k experts of ``scores + bias``, or without a bias of the
    logits themselves (scores are monotone in them: the same choice, free of the scores'
    rounding, so every device picks alike). Ties: the lower index. With ``num_groups`` > 1
    (DeepSeek-V3's group-limited routing) experts are split into ``num_groups`` equal groups,
    each group scored by the sum of its two best selection keys, and only the experts of the
    ``topk_groups`` best groups compete."""
    sel = logits.to(scores.dtype) if bias is None else scores + bias.to(scores.dtype)
    if num_groups > 1:
        T, E = sel.shape
        grouped = sel.reshape(T, num_groups, E // num_groups)
        group_score = grouped.topk(min(2, E // num_groups), dim=-1).values.sum(dim=-1)
        keep = torch.sort(group_score, dim=-1, descending=True, stable=True).indices[:, :topk_groups]
        allowed = torch.zeros(T, num_groups, dtype=torch.bool, device=sel.device).scatter_(1, keep, True)
        sel = sel.masked_fill(~allowed.repeat_interleave(E // num_groups, dim=1), float("-inf"))
    return torch.sort(sel, dim=-1, descending=True, stable=True).indices[:, :top_k]


@triton_op("moe_ops::topk_route", mutates_args=())
def topk_route(logits: torch.Tensor, top_k: int, scoring: str = "softmax", renormalize: bool = True,
               bias: Optional[torch.Tensor] = None, num_groups: int = 1, topk_groups: int = 1) -> List[torch.Tensor]:
    """``[weights, ids]`` of router ``logits`` ``[T, E]``: ``p = softmax(logits)`` (Qwen3-MoE,
    Mixtral) or ``sigmoid(logits)`` (DeepSeek-V3), ids = the ``top_k`` largest of ``p + bias``
    (``bias`` ``[E]`` steers selection only, as DeepSeek-V3's correction bias), weights =
    ``p[ids]``, divided by their sum when ``renormalize``. weights float32 ``[T, top_k]``
    (float64 for float64 logits), ids int32 ``[T, top_k]``. Differentiable in ``logits``.
    ``num_groups``/``topk_groups``: DeepSeek-V3's group-limited selection (see ``_select``;
    on GPUs it runs this PyTorch path, not the top-k kernel)."""
    checks.check_topk_route(logits, top_k, scoring, bias, num_groups, topk_groups)
    return _topk_route(logits, top_k, scoring, renormalize, bias, num_groups, topk_groups)


def _topk_route(logits, top_k, scoring, renormalize, bias, num_groups, topk_groups):
    if logits.device.type in ("cuda", "xpu") and num_groups == 1:
        from .kernels import dispatch
        return dispatch.topk_route(logits, top_k, scoring, renormalize, bias)
    p = _scores(logits, scoring)
    ids = _select(logits, p, top_k, bias, num_groups, topk_groups)
    w = p.gather(1, ids)
    if renormalize:
        w = w / w.sum(dim=-1, keepdim=True)
    return [w, ids.to(torch.int32)]


def _topk_route_setup(ctx, inputs, output):
    logits, scoring, renormalize = inputs[0], inputs[2], inputs[3]
    ctx.meta = (scoring, renormalize, logits.dtype)
    ctx.save_for_backward(logits, output[1])


def _topk_route_backward(ctx, grads):
    logits, ids = ctx.saved_tensors
    scoring, renormalize, dtype = ctx.meta
    dw = grads[0]  # the ids output is integer: no gradient
    rest = (None,) * (len(ctx.needs_input_grad) - 1)  # the schema's args as called (defaults dropped)
    if dw is None:
        return (None,) + rest
    p = _scores(logits, scoring)
    idx = ids.long()
    raw = p.gather(1, idx)
    dw = dw.to(p.dtype)
    if renormalize:  # w = raw / S: d raw = (dw - <dw, w>) / S
        S = raw.sum(dim=-1, keepdim=True)
        w = raw / S
        dw = (dw - (dw * w).sum(dim=-1, keepdim=True)) / S
    dp = torch.zeros_like(p).scatter_(1, idx, dw)
    if scoring == "softmax":
        dl = p * (dp - (dp * p).sum(dim=-1, keepdim=True))
    else:
        dl = dp * p * (1 - p)
    return (dl.to(dtype),) + rest


# ----------------------------------------------------------------------------- sorting
@triton_op("moe_ops::sort_rows", mutates_args=())
def sort_rows(topk_ids: torch.Tensor, num_experts: int) -> List[torch.Tensor]:
    """``[sorted_rows, offs]`` of ``topk_ids`` ``[T, top_k]`` (int32/int64): flat rows in
    expert order (stable) as int32 ``[T * top_k]``, and int32 ``offs`` ``[num_experts]``.
    Ids outside ``[0, num_experts)`` are dropped (sorted past ``offs[-1]``)."""
    checks.check_sort_rows(topk_ids, num_experts)
    return _sort_rows(topk_ids, num_experts)


def _sort_rows(topk_ids, num_experts):
    if topk_ids.device.type in ("cuda", "xpu") and topk_ids.numel() <= COUNT_SORT_MAX_ROWS:
        from .kernels import dispatch
        return dispatch.count_sort(topk_ids, num_experts)
    flat = topk_ids.reshape(-1).long()
    key = torch.where((flat >= 0) & (flat < num_experts), flat, num_experts)
    sorted_key, order = torch.sort(key, stable=True)
    experts = torch.arange(num_experts, device=flat.device, dtype=sorted_key.dtype)
    offs = torch.searchsorted(sorted_key, experts, right=True)
    return [order.to(torch.int32), offs.to(torch.int32)]


# ----------------------------------------------------------------------------- both
@triton_op("moe_ops::route", mutates_args=())
def route(logits: torch.Tensor, top_k: int, scoring: str = "softmax", renormalize: bool = True,
          bias: Optional[torch.Tensor] = None, num_groups: int = 1, topk_groups: int = 1) -> List[torch.Tensor]:
    """``[weights, ids, sorted_rows, offs]``: :func:`topk_route` of ``logits`` ``[T, E]``, then
    :func:`sort_rows` of its ids over the E experts. On GPUs decode-sized inputs (see
    ``dispatch.topk_sort_fits``; no group-limited selection) take one launch, the picks kept in
    registers between the two. Differentiable in ``logits`` through the weights."""
    checks.check_topk_route(logits, top_k, scoring, bias, num_groups, topk_groups)
    return _route(logits, top_k, scoring, renormalize, bias, num_groups, topk_groups)


def _route(logits, top_k, scoring, renormalize, bias, num_groups=1, topk_groups=1):
    T, E = logits.shape
    if logits.device.type in ("cuda", "xpu") and num_groups == 1:
        from .kernels import dispatch
        if dispatch.topk_sort_fits(T, E, top_k):
            return dispatch.topk_sort(logits, top_k, scoring, renormalize, bias)
    w, ids = _topk_route(logits, top_k, scoring, renormalize, bias, num_groups, topk_groups)
    return [w, ids] + _sort_rows(ids, E)


# ----------------------------------------------------------------------------- router + route
@triton_op("moe_ops::router_route", mutates_args=("semaphore",))
def router_route(x: torch.Tensor, router_weight: torch.Tensor, top_k: int, scoring: str = "softmax",
                 renormalize: bool = True, bias: Optional[torch.Tensor] = None,
                 semaphore: Optional[torch.Tensor] = None) -> List[torch.Tensor]:
    """``[logits, weights, ids, sorted_rows, offs]``: the router GEMM ``logits = x @
    router_weight.T`` (``x`` ``[T, H]``, ``router_weight`` ``[E, H]``, logits ``[T, E]`` in
    ``x``'s dtype, float32 accumulation) then :func:`route` of those logits. Inference only (no
    autograd: the semaphore makes the op mutable; training routes through ``nn.Linear`` and
    :func:`route`).

    On GPUs, decode-sized inputs (``dispatch.topk_sort_fits``) take one launch: the GEMM split
    over about a hundred programs, the last of them (counted on ``semaphore``) summing the
    partial logits in a fixed order and routing them. ``semaphore`` is an int32 ``[1]`` tensor
    holding 0, which the launch leaves at 0 (``moe_ops.MoE`` keeps one as a buffer); None
    allocates a zeroed one per call. Launches sharing a semaphore must not run concurrently
    (on two streams). Elsewhere: ``F.linear`` then :func:`route`, the semaphore untouched."""
    checks.check_router_route(x, router_weight, top_k, scoring, bias, semaphore)
    T, E = x.shape[0], router_weight.shape[0]
    if x.device.type in ("cuda", "xpu"):
        from .kernels import dispatch
        if dispatch.topk_sort_fits(T, E, top_k):
            if semaphore is None:
                semaphore = torch.zeros(1, dtype=torch.int32, device=x.device)
            return dispatch.router_topk_sort(x, router_weight, top_k, scoring, renormalize, bias, semaphore)
    logits = torch.nn.functional.linear(x, router_weight)
    return [logits] + _route(logits, top_k, scoring, renormalize, bias)


def _acc_dtype(t: torch.Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def rows_on_gpu(t: torch.Tensor) -> bool:
    """Whether ``t``'s rows go through the Triton row kernels (16-bit or float32 on a GPU;
    float64 keeps the reference, with its float64 sums)."""
    return t.device.type in ("cuda", "xpu") and t.dtype in (torch.bfloat16, torch.float16, torch.float32)


def gather_rows(src: torch.Tensor, sorted_rows: torch.Tensor, top_k: int, row_scale=None, plain: bool = True):
    """``(src[tok], (row_scale[:, None] * src[tok]).to(src.dtype))`` for ``tok =
    sorted_rows // top_k``, ``[T * top_k, H]`` each: the first None unless ``plain``, the
    second None without ``row_scale`` ``[T * top_k]`` (the product in float32, or float64 for
    float64 rows)."""
    if rows_on_gpu(src):
        from .kernels.row_ops import gather_token_rows
        scale = None if row_scale is None else row_scale.contiguous()
        return gather_token_rows(src.contiguous(), sorted_rows.contiguous(), top_k, scale, plain)
    rows = src[torch.div(sorted_rows.long(), top_k, rounding_mode="floor")]
    work = _acc_dtype(src)
    scaled = None if row_scale is None else (rows.to(work) * row_scale.to(work).unsqueeze(1)).to(src.dtype)
    return (rows if plain else None), scaled


def inverse_rows(sorted_rows: torch.Tensor) -> torch.Tensor:
    """int64 ``pos`` ``[T * top_k]``: the sorted position of each flat row (the inverse
    permutation of ``sorted_rows``)."""
    M = sorted_rows.shape[0]
    pos = torch.empty(M, dtype=torch.int64, device=sorted_rows.device)
    return pos.scatter_(0, sorted_rows.long(), torch.arange(M, device=sorted_rows.device))


def sum_slots(rows: torch.Tensor, sorted_rows: torch.Tensor, top_k: int,
              weights: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``out[t] = sum_j w[t, j] * rows[pos(t * top_k + j)]`` (``w`` = 1 when ``weights`` is
    None) for sorted ``rows`` ``[T * top_k, H]``; float32 accumulation (float64 for float64),
    ``rows.dtype`` out.
    Deterministic (a gather and a sum, no atomics)."""
    if rows_on_gpu(rows):
        from .kernels.row_ops import combine_slots
        return combine_slots(rows.contiguous(), inverse_rows(sorted_rows), top_k, weights)
    M, H = rows.shape
    work = _acc_dtype(rows)
    per_slot = rows[inverse_rows(sorted_rows)].reshape(M // top_k, top_k, H).to(work)
    if weights is not None:
        per_slot = per_slot * weights.to(work).unsqueeze(-1)
    return per_slot.sum(dim=1).to(rows.dtype)


# ----------------------------------------------------------------------------- permute
@triton_op("moe_ops::permute", mutates_args=())
def permute(x: torch.Tensor, sorted_rows: torch.Tensor, top_k: int) -> torch.Tensor:
    """Expert-sorted copy of the token rows: ``out[r] = x[sorted_rows[r] // top_k]``, ``[T *
    top_k, H]``. Differentiable in ``x`` (each token's gradient is the sum over its slots)."""
    checks.check_permute(x, sorted_rows, top_k)
    return gather_rows(x, sorted_rows, top_k)[0]


def _permute_setup(ctx, inputs, output):
    ctx.top_k = inputs[2]
    ctx.save_for_backward(inputs[1])


def _permute_backward(ctx, dout):
    (sorted_rows,) = ctx.saved_tensors
    return sum_slots(dout, sorted_rows, ctx.top_k), None, None


# ----------------------------------------------------------------------------- unpermute
@triton_op("moe_ops::unpermute", mutates_args=())
def unpermute(y: torch.Tensor, sorted_rows: torch.Tensor, topk_weights: torch.Tensor) -> torch.Tensor:
    """Weighted combine back to token order: ``out[t] = sum_j topk_weights[t, j] *
    y[pos(t * top_k + j)]`` for expert-sorted rows ``y`` ``[T * top_k, H]``; ``[T, H]`` in
    ``y.dtype``, float32 accumulation. Differentiable in ``y`` and ``topk_weights``."""
    checks.check_unpermute(y, sorted_rows, topk_weights)
    return sum_slots(y, sorted_rows, topk_weights.shape[1], topk_weights)


def _unpermute_setup(ctx, inputs, output):
    y, sorted_rows, topk_weights = inputs
    ctx.save_for_backward(y, sorted_rows, topk_weights)


def _unpermute_backward(ctx, dout):
    y, sorted_rows, tw = ctx.saved_tensors
    T, k = tw.shape
    work = _acc_dtype(y)
    need_y, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[2]
    dz, dy = gather_rows(dout.to(y.dtype), sorted_rows, k, tw.reshape(-1)[sorted_rows.long()] if need_y else None,
                         plain=need_w)
    dtw = None
    if need_w:
        per_row = (dz.to(work) * y.to(work)).sum(dim=1)  # [M], sorted order
        dtw = per_row[inverse_rows(sorted_rows)].reshape(T, k).to(tw.dtype)
    return dy, None, dtw


def register() -> None:
    torch.library.register_autograd("moe_ops::topk_route", _topk_route_backward, setup_context=_topk_route_setup)
    # route's outputs begin with topk_route's (weights, ids): the same formula
    torch.library.register_autograd("moe_ops::route", _topk_route_backward, setup_context=_topk_route_setup)
    torch.library.register_autograd("moe_ops::permute", _permute_backward, setup_context=_permute_setup)
    torch.library.register_autograd("moe_ops::unpermute", _unpermute_backward, setup_context=_unpermute_setup)
