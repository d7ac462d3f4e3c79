"""The MoE layer as model code writes it without moe_ops: the peers of the layer benchmarks and
the input of the lowering tests.

``PlainMoEBlock``: router, softmax top-k with renormalisation, rows sorted by expert,
``torch._grouped_mm`` for gate/up and down on ``[E, N, K]`` weights, SwiGLU, weighted
``index_add_`` combine (as torchtitan and transformers' grouped-mm experts write it).
``loop_layer``: transformers' eager per-expert loop (host syncs: ``nonzero``, ``where``).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


class PlainMoEBlock(torch.nn.Module):
    """Input ``[T, H]`` -> ``[T, H]``; ``gate_up`` ``[E, 2I, H]`` (gate rows first), ``down``
    ``[E, H, I]``, in ``dtype``."""

    def __init__(self, H=32, I=16, E=4, k=2, device="cpu", dtype=torch.bfloat16, seed=0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.k, self.E = k, E
        self.router = torch.nn.Linear(H, E, bias=False, dtype=dtype, device=device)
        self.gate_up = torch.nn.Parameter((torch.randn(E, 2 * I, H, generator=g) * H ** -0.5).to(device, dtype))
        self.down = torch.nn.Parameter((torch.randn(E, H, I, generator=g) * I ** -0.5).to(device, dtype))

    @classmethod
    def from_moe(cls, moe) -> "PlainMoEBlock":
        """The block over the router and plain expert weights of a ``moe_ops.MoE`` (shared)."""
        block = cls.__new__(cls)
        torch.nn.Module.__init__(block)
        block.k, block.E = moe.top_k, moe.num_experts
        block.router, block.gate_up, block.down = moe.router, moe.gate_up.weight, moe.down.weight
        return block

    def forward(self, x):
        w, ids = torch.topk(torch.softmax(self.router(x).float(), -1), self.k, dim=-1)
        w = w / w.sum(-1, keepdim=True)
        flat = ids.reshape(-1)
        order = torch.argsort(flat, stable=True)
        counts = torch.zeros(self.E, dtype=torch.int32, device=x.device).scatter_add_(
            0, flat, torch.ones_like(flat, dtype=torch.int32))
        offs = torch.cumsum(counts, 0, dtype=torch.int32)
        tok = order // self.k
        gate, up = torch._grouped_mm(x[tok], self.gate_up.transpose(-2, -1), offs=offs).chunk(2, dim=-1)
        y = torch._grouped_mm(F.silu(gate) * up, self.down.transpose(-2, -1), offs=offs)
        return torch.zeros_like(x).index_add_(0, tok, y * w.reshape(-1)[order].unsqueeze(1).to(y.dtype))


def loop_layer(block: PlainMoEBlock, x):
    """transformers' eager experts loop (one_hot mask, nonzero per hit expert, index_add_)
    over ``block``'s weights."""
    w, ids = torch.topk(torch.softmax(block.router(x).float(), -1), block.k, dim=-1)
    w = (w / w.sum(-1, keepdim=True)).to(x.dtype)
    out = torch.zeros_like(x)
    mask = F.one_hot(ids, block.E).permute(2, 1, 0)
    hit = torch.greater(mask.sum(dim=(-1, -2)), 0).nonzero()
    for e in hit:
        e = e[0]
        slot, tok = torch.where(mask[e])
        gate, up = F.linear(x[tok], block.gate_up[e]).chunk(2, dim=-1)
        out.index_add_(0, tok, F.linear(F.silu(gate) * up, block.down[e]) * w[tok, slot, None])
    return out
