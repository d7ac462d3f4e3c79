"""MoE modules built on the operators: sync-free routing, expert MLPs, quantize_experts().

Routing goes through the operators of :mod:`moe_ops.routing` (static shapes, no host sync);
the experts through the fused ``moe_ops::expert_mlp`` or the unfused composition permute ->
grouped_mm -> SwiGLU -> grouped_mm -> unpermute (``MoE(fused=...)``: by default the
composition when training and the fused operator otherwise, see :class:`MoE`).
"""
from __future__ import annotations

from typing import NamedTuple, Optional, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import formats
from .api import dequantize_weight, grouped_mm, quantize_weight
from .quantized_weight import QuantizedWeight


class Routing(NamedTuple):
    """Routing of T tokens to top_k experts each (see :mod:`moe_ops.routing` for layouts)."""

    weights: torch.Tensor  # float32 [T, top_k]
    ids: torch.Tensor  # int32 [T, top_k]
    sorted_rows: torch.Tensor  # int32 [T * top_k]
    offs: torch.Tensor  # int32 [E]


def route(logits: torch.Tensor, top_k: int, scoring: str = "softmax", renormalize: bool = True,
          bias: Optional[torch.Tensor] = None, num_groups: int = 1, topk_groups: int = 1) -> Routing:
    """Top-k routing of router ``logits`` ``[T, E]`` and the expert-sorted row order, on the
    device with static shapes (no host sync); differentiable in ``logits`` through the weights."""
    return Routing(*torch.ops.moe_ops.route(logits, top_k, scoring, renormalize, bias, num_groups, topk_groups))


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

    def op_args(self) -> tuple:
        """``(w, w_scale, w_zero, w_format, granularity, group_size)`` as the operators take them."""
        qw = self.quantized
        return (self.weight, None, None, "none", "none", 0) if qw is None else qw.op_args()

    def dense(self) -> torch.Tensor:
        qw = self.quantized
        return self.weight.detach() if qw is None else dequantize_weight(qw)


class SwiGLUMLP(nn.Module):
    """A dense SwiGLU MLP (the shared expert of DeepSeek-V3 / Qwen2-MoE style blocks)."""

    def __init__(self, hidden: int, intermediate: int, dtype=torch.float32):
        super().__init__()
        self.gate_proj = nn.Linear(hidden, intermediate, bias=False, dtype=dtype)
        self.up_proj = nn.Linear(hidden, intermediate, bias=False, dtype=dtype)
        self.down_proj = nn.Linear(intermediate, hidden, bias=False, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


MOE_STYLES = {
    "qwen3": dict(scoring="softmax", renormalize=True),
    "mixtral": dict(scoring="softmax", renormalize=True),
    "deepseek_v3": dict(scoring="sigmoid", renormalize=True, router_bias=True, routed_scaling=2.5),
}


class MoE(nn.Module):
    """A SwiGLU MoE block: router, top-k routing, experts, weighted combine, optional shared
    expert. Input ``[..., hidden]``, output the same shape and dtype.

    ``gate_up`` is ``[E, 2I, H]`` (gate rows first), ``down`` is ``[E, H, I]``. Routing:
    ``scoring`` ``softmax`` (Qwen3-MoE, Mixtral) or ``sigmoid`` (DeepSeek-V3), ``renormalize``
    the top-k weights, ``router_bias`` a selection-only bias buffer ``e_score_bias`` [E]
    (DeepSeek-V3's correction bias), ``routed_scaling`` multiplies the routed output,
    ``shared_intermediate`` > 0 adds a shared SwiGLU expert, ``num_groups``/``topk_groups``
    limit the choice to the best expert groups (DeepSeek-V3). ``MoE.from_style("qwen3" |
    "mixtral" | "deepseek_v3", ...)`` presets these. ``recipe`` applies an FP8 training recipe
    to both expert GEMMs; ``act_quant`` quantizes the activations of quantized experts (W8A8 /
    W4A8).

    ``fused`` picks the experts' path: ``True`` the fused ``moe_ops::expert_mlp``, ``False`` the
    unfused composition (same math, more memory traffic), ``"auto"`` (default) the composition
    when training (train mode, grad mode on and a gradient wanted for x, the routing weights or
    the expert weights) and the fused operator otherwise (``eval()``, ``no_grad``, frozen). The fused operator's backward
    recomputes the gate/up GEMM (and, with an FP8 recipe, the down GEMM, for the routing-weight
    gradient) instead of saving activations, and with a recipe its forward is the composition
    anyway; the composition saves the permuted x, the gate/up output and h for backward and holds
    the recipe's W^T codes from forward. Measured on an H100, a compiled training step at T=4096
    (``benchmarks/bench_moe_training.py``, results/moe_training_{qwen3,dsv3}_h100_s16.md): bf16
    Qwen3-30B-A3B 3.18 ms composed against 3.68 fused, DeepSeek-V3 (32 experts) 16.5 against
    20.1; ``fp8_blockwise`` 4.57 against 5.88 and 20.1 against 28.4. ``fused=True`` trades that
    time for activation memory: about 20 MB of saved activations per layer at Qwen3-30B-A3B
    T=4096 against about 470 MB composed (estimated from the saved tensors' shapes).
    """

    def __init__(self, hidden: int, intermediate: int, num_experts: int, top_k: int, dtype=torch.float32,
                 recipe: Optional[str] = None, act_quant: Optional[str] = None, seed: int = 0,
                 scoring: str = "softmax", renormalize: bool = True, router_bias: bool = False,
                 routed_scaling: float = 1.0, shared_intermediate: int = 0, fused: Union[bool, str] = "auto",
                 num_groups: int = 1, topk_groups: int = 1):
        super().__init__()
        if fused not in (True, False, "auto"):
            raise ValueError(f"fused: expected True, False or 'auto', got {fused!r}")
        g = torch.Generator().manual_seed(seed)
        self.num_experts, self.top_k, self.recipe, self.act_quant = num_experts, top_k, recipe, act_quant
        self.scoring, self.renormalize, self.routed_scaling, self.fused = scoring, renormalize, routed_scaling, fused
        self.scale_routing = routed_scaling != 1.0
        self.num_groups, self.topk_groups = num_groups, topk_groups
        self.router = nn.Linear(hidden, num_experts, bias=False, dtype=dtype)
        nn.init.normal_(self.router.weight, std=hidden ** -0.5, generator=g)
        self.register_buffer("e_score_bias", torch.zeros(num_experts, dtype=torch.float32) if router_bias else None)
        # moe_ops::router_route's launch counter (always 0 between calls; not saved)
        self.register_buffer("router_semaphore", torch.zeros(1, dtype=torch.int32), persistent=False)
        self.gate_up = ExpertWeights((torch.randn(num_experts, 2 * intermediate, hidden, generator=g)
                                      * hidden ** -0.5).to(dtype))
        self.down = ExpertWeights((torch.randn(num_experts, hidden, intermediate, generator=g)
                                   * intermediate ** -0.5).to(dtype))
        self.shared = SwiGLUMLP(hidden, shared_intermediate, dtype) if shared_intermediate > 0 else None

    @classmethod
    def from_style(cls, style: str, hidden: int, intermediate: int, num_experts: int, top_k: int, **kwargs) -> "MoE":
        if style not in MOE_STYLES:
            raise ValueError(f"style: expected one of {tuple(MOE_STYLES)}, got {style!r}")
        return cls(hidden, intermediate, num_experts, top_k, **{**MOE_STYLES[style], **kwargs})

    def route(self, x: torch.Tensor) -> Routing:
        """Routing of tokens ``x`` ``[T, H]``. On GPUs, when no gradient is wanted (inference)
        and the selection is not group-limited, the router GEMM and the routing run as the one
        ``moe_ops::router_route`` operator (one launch at decode sizes); otherwise as
        ``nn.Linear`` then :func:`route`."""
        wr = self.router.weight
        if (x.device.type in ("cuda", "xpu") and self.num_groups == 1 and self.router.bias is None
                and not (torch.is_grad_enabled() and (x.requires_grad or wr.requires_grad))):
            r = Routing(*torch.ops.moe_ops.router_route(x, wr, self.top_k, self.scoring, self.renormalize,
                                                        self.e_score_bias, self.router_semaphore)[1:])
        else:
            r = route(self.router(x), self.top_k, self.scoring, self.renormalize, self.e_score_bias,
                      self.num_groups, self.topk_groups)
        if self.scale_routing:  # a bool, so that dynamic=True does not trace a float comparison
            r = r._replace(weights=r.weights * self.routed_scaling)
        return r

    def experts(self, x: torch.Tensor, r: Routing) -> torch.Tensor:
        """The routed experts' combined output ``[T, H]`` for tokens ``x`` ``[T, H]``."""
        a1, a2 = self.gate_up.op_args(), self.down.op_args()
        act = self.act_quant or "none"
        rec = self.recipe or "none"
        fused = self.fused
        if fused == "auto":  # training: in train mode with a gradient wanted
            fused = not (self.training and torch.is_grad_enabled()
                         and any(t.requires_grad for t in (x, r.weights, a1[0], a2[0])))
        if fused and a1[3:5] == a2[3:5]:
            return torch.ops.moe_ops.expert_mlp(x, r.weights, r.sorted_rows, r.offs, *a1[:3], *a2[:3], a1[3], a1[4],
                                                a1[5], a2[5], act, rec)
        xs = torch.ops.moe_ops.permute(x, r.sorted_rows, self.top_k)
        gate, up = self.gate_up(xs, r.offs, self.act_quant, self.recipe).chunk(2, dim=-1)
        y = self.down(F.silu(gate) * up, r.offs, self.act_quant, self.recipe)
        return torch.ops.moe_ops.unpermute(y, r.sorted_rows, r.weights)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        xf = x.reshape(-1, shape[-1])
        out = self.experts(xf, self.route(xf))
        if self.shared is not None:
            out = out + self.shared(xf)
        return out.reshape(shape)


def quantize_experts(model: nn.Module, format: str, granularity: str = "group", group_size: int = 128,
                     act_quant: Optional[str] = None) -> nn.Module:
    """Convert every :class:`ExpertWeights` of ``model`` in place to ``format``; MoE blocks get
    ``act_quant``. Group size is reduced to K where K is smaller. transformers' sparse-MoE
    blocks (Qwen3-MoE, Mixtral) are first replaced by :class:`MoE` modules holding their
    weights (:func:`moe_ops.hf.convert_hf_blocks`). Returns ``model``."""
    from .hf import convert_hf_blocks
    convert_hf_blocks(model)
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
