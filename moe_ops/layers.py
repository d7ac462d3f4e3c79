"""MoE modules built on the operators: sync-free routing, expert MLPs, quantize_experts().

Routing here is plain PyTorch with static shapes (T * top_k rows) and no host sync: expert
counts come from ``scatter_add`` (not ``bincount``, whose output size depends on the data),
``offs`` is their cumulative sum on the device.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import formats
from .api import dequantize_weight, grouped_mm, quantize_weight
from .quantized_weight import QuantizedWeight


def route(logits: torch.Tensor, top_k: int, renormalize: bool = True):
    """Softmax top-k routing. Returns ``(order, token_of_row, weight_of_row, offs)``:
    rows sorted by expert (stable), each row's source token and routing weight, and ``offs``
    ``[E]`` int32 (end row of each expert). All shapes static (``T * top_k`` rows)."""
    T, E = logits.shape
    probs = torch.softmax(logits.float(), dim=-1)
    weights, experts = torch.topk(probs, top_k, dim=-1)
    if renormalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    flat = experts.reshape(-1)
    order = torch.argsort(flat, stable=True)
    counts = torch.zeros(E, dtype=torch.int64, device=logits.device).scatter_add_(0, flat, torch.ones_like(flat))
    offs = torch.cumsum(counts, 0).to(torch.int32)
    return order, order // top_k, weights.reshape(-1)[order], offs


class ExpertWeights(nn.Module):
    """Expert weights ``[E, N, K]``: a trainable ``nn.Parameter``, or a quantized format whose
    tensors are buffers (``data``, ``scale``, ``zero``) and whose metadata is extra state, so
    ``state_dict`` saves and loads both."""

    def __init__(self, weight: Optional[torch.Tensor] = None, qweight: Optional[QuantizedWeight] = None):
        super().__init__()
        self.weight = nn.Parameter(weight) if weight is not None else None
        self._meta = None
        if qweight is not None:
            self._set_quantized(qweight)

    def _set_quantized(self, qw: QuantizedWeight) -> None:
        self.register_buffer("data", qw.data)
        self.register_buffer("scale", qw.scale)
        self.register_buffer("zero", qw.zero)
        self._meta = dict(format=qw.format, granularity=qw.granularity, group_size=qw.group_size,
                          shape=tuple(qw.shape), dtype=str(qw.dtype).replace("torch.", ""))

    @property
    def quantized(self) -> Optional[QuantizedWeight]:
        if self._meta is None:
            return None
        m = self._meta
        return QuantizedWeight(self.data, self.scale, self.zero, m["format"], m["granularity"], m["group_size"],
                               m["shape"], getattr(torch, m["dtype"]))

    def get_extra_state(self):
        return self._meta or {}

    def set_extra_state(self, state):
        self._meta = dict(state) if state else None

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        """A quantized state_dict loads into an unquantized module too: make room first."""
        meta = state_dict.get(prefix + "_extra_state")
        if meta and self._meta is None:
            spec = formats.get_format(meta["format"])
            E, N, K = meta["shape"]
            sshape = formats.scale_shape(meta["granularity"], E, N, K, meta["group_size"])
            self.weight = None
            self.register_buffer("data", torch.empty(E, N, K // spec.pack, dtype=spec.storage))
            self.register_buffer("scale", None if spec.kind == "float" else torch.empty(sshape))
            self.register_buffer("zero", torch.empty(sshape, dtype=torch.uint8) if spec.has_zero else None)
            self._meta = dict(meta)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def forward(self, x: torch.Tensor, offs: torch.Tensor, act_quant=None, recipe=None) -> torch.Tensor:
        qw = self.quantized
        if qw is not None:
            return grouped_mm(x, qw, offs, act_quant=act_quant)
        return grouped_mm(x, self.weight, offs, recipe=recipe)

    def dense(self) -> torch.Tensor:
        qw = self.quantized
        return self.weight.detach() if qw is None else dequantize_weight(qw)


class MoE(nn.Module):
    """A SwiGLU MoE block (Qwen3-MoE / Mixtral style): router, top-k, experts, weighted combine.

    ``gate_up`` is ``[E, 2I, H]`` (gate rows first), ``down`` is ``[E, H, I]``. ``recipe``
    applies an FP8 training recipe to both expert GEMMs; ``act_quant`` quantizes the
    activations of quantized experts (W8A8 / W4A8).
    """

    def __init__(self, hidden: int, intermediate: int, num_experts: int, top_k: int, dtype=torch.float32,
                 recipe: Optional[str] = None, act_quant: Optional[str] = None, seed: int = 0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.top_k, self.recipe, self.act_quant = top_k, recipe, act_quant
        self.router = nn.Linear(hidden, num_experts, bias=False, dtype=dtype)
        nn.init.normal_(self.router.weight, std=hidden ** -0.5, generator=g)
        self.gate_up = ExpertWeights((torch.randn(num_experts, 2 * intermediate, hidden, generator=g)
                                      * hidden ** -0.5).to(dtype))
        self.down = ExpertWeights((torch.randn(num_experts, hidden, intermediate, generator=g)
                                   * intermediate ** -0.5).to(dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        T, H = x.shape
        order, token, weight, offs = route(self.router(x), self.top_k)
        xs = x[token]
        h = self.gate_up(xs, offs, self.act_quant, self.recipe)
        gate, up = h.chunk(2, dim=-1)
        y = self.down(F.silu(gate) * up, offs, self.act_quant, self.recipe)
        out = torch.zeros_like(x)
        return out.index_add(0, token, y * weight.to(y.dtype).unsqueeze(1))


def quantize_experts(model: nn.Module, format: str, granularity: str = "group", group_size: int = 128,
                     act_quant: Optional[str] = None) -> nn.Module:
    """Convert every :class:`ExpertWeights` of ``model`` in place to ``format``; MoE blocks get
    ``act_quant``. Group size is reduced to K where K is smaller. Returns ``model``."""
    for mod in model.modules():
        if isinstance(mod, MoE):
            mod.act_quant = act_quant
            mod.recipe = None
        if isinstance(mod, ExpertWeights) and mod.weight is not None:
            w = mod.weight.detach()
            gs = min(group_size, w.shape[-1])
            qw = quantize_weight(w, format, granularity, gs)
            mod.weight = None
            mod._set_quantized(qw)
    return model


class TinyMoELM(nn.Module):
    """A tiny language model for demos and training tests: embedding, ``layers`` pre-norm
    residual MoE blocks, and a tied output head. Input token ids ``[T]``, logits ``[T, vocab]``."""

    def __init__(self, vocab: int = 64, hidden: int = 64, intermediate: int = 32, num_experts: int = 8,
                 top_k: int = 2, layers: int = 2, dtype=torch.float32, recipe: Optional[str] = None, seed: int = 0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.embed = nn.Parameter((torch.randn(vocab, hidden, generator=g) * hidden ** -0.5).to(dtype))
        self.norms = nn.ModuleList(nn.RMSNorm(hidden, dtype=dtype) for _ in range(layers))
        self.blocks = nn.ModuleList(MoE(hidden, intermediate, num_experts, top_k, dtype=dtype, recipe=recipe,
                                        seed=seed + 1 + i) for i in range(layers))

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        h = self.embed[tokens]
        for norm, block in zip(self.norms, self.blocks):
            h = h + block(norm(h))
        return h @ self.embed.t()


def synthetic_corpus(length: int, vocab: int, seed: int = 0) -> torch.Tensor:
    """A fixed token stream with structure a context-free model can learn: each token is a
    function of the one before it (``t[i] = (5 t[i-1] + 3) mod vocab``), 10% replaced at random."""
    g = torch.Generator().manual_seed(seed)
    t = torch.zeros(length, dtype=torch.int64)
    t[:2] = torch.randint(0, vocab, (2,), generator=g)
    noise = torch.rand(length, generator=g) < 0.1
    rnd = torch.randint(0, vocab, (length,), generator=g)
    for i in range(2, length):
        t[i] = rnd[i] if noise[i] else (5 * t[i - 1] + 3) % vocab
    return t


def train_tiny_lm(recipe: Optional[str], steps: int, dtype=torch.float32, device="cpu", seq: int = 128,
                  lr: float = 3e-3, seed: int = 0, compile: bool = False, progress=None) -> list:
    """Train :class:`TinyMoELM` on :func:`synthetic_corpus` (next-token loss); the loss per step."""
    torch.manual_seed(seed)
    model = TinyMoELM(dtype=dtype, recipe=recipe, seed=seed).to(device)
    corpus = synthetic_corpus(seq * 64 + 1, 64, seed).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    fwd = torch.compile(model, fullgraph=True) if compile else model
    g = torch.Generator().manual_seed(seed + 1)
    losses = []
    for _ in range(steps):
        i = int(torch.randint(0, corpus.numel() - seq - 1, (1,), generator=g))
        inp, tgt = corpus[i:i + seq], corpus[i + 1:i + seq + 1]
        loss = F.cross_entropy(fwd(inp).float(), tgt)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
        if progress is not None:
            progress.update(1)
    return losses
