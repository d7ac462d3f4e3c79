"""transformers interop: turn a sparse-MoE block of a transformers model into :class:`MoE`.

Recognised blocks (transformers >= 5, fused 3-D expert weights): ``Qwen3MoeSparseMoeBlock``
and ``MixtralSparseMoeBlock``, i.e. a module with ``gate`` (a top-k router with ``weight``
``[E, H]`` and ``top_k``; ``norm_topk_prob`` where renormalisation is optional) and ``experts``
with ``gate_up_proj`` ``[E, 2I, H]`` (gate rows first) and ``down_proj`` ``[E, H, I]`` and a
SiLU activation. transformers itself is not imported here: blocks are recognised by
structure, so this module works (and finds nothing) without it.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .layers import MoE

_HF_BLOCKS = ("Qwen3MoeSparseMoeBlock", "MixtralSparseMoeBlock")


def is_hf_moe_block(mod: nn.Module) -> bool:
    experts, gate = getattr(mod, "experts", None), getattr(mod, "gate", None)
    return (type(mod).__name__ in _HF_BLOCKS and experts is not None and gate is not None
            and isinstance(getattr(experts, "gate_up_proj", None), torch.Tensor)
            and isinstance(getattr(experts, "down_proj", None), torch.Tensor))


def from_hf(block: nn.Module) -> MoE:
    """A :class:`MoE` holding (sharing, not copying) the router and expert parameters of a
    transformers sparse-MoE ``block``; same input/output shapes ``[B, S, H]``."""
    if not is_hf_moe_block(block):
        raise TypeError(f"block: expected a transformers {' or '.join(_HF_BLOCKS)} with fused 3-D expert "
                        f"weights, got {type(block).__name__}")
    experts, gate = block.experts, block.gate
    act = getattr(experts, "act_fn", None)
    if act is not None and not isinstance(act, nn.SiLU) and getattr(act, "__name__", "") != "silu":
        if not torch.allclose(act(torch.linspace(-4, 4, 9)), F.silu(torch.linspace(-4, 4, 9))):
            raise ValueError(f"block: expert activation {act!r} is not SiLU; only SwiGLU experts are supported")
    E, two_i, H = experts.gate_up_proj.shape
    w = experts.gate_up_proj
    moe = MoE(H, two_i // 2, E, int(gate.top_k), dtype=w.dtype,
              renormalize=bool(getattr(gate, "norm_topk_prob", True)))
    moe.to(w.device)
    moe.router.weight = gate.weight
    moe.gate_up.weight = experts.gate_up_proj
    moe.down.weight = experts.down_proj
    return moe


def convert_hf_blocks(model: nn.Module) -> nn.Module:
    """Replace, in place, every recognised transformers sparse-MoE block inside ``model`` (or
    ``model`` itself is left alone if it is one: use :func:`from_hf`) by :func:`from_hf` of it.
    Returns ``model``."""
    for name, child in list(model.named_children()):
        if is_hf_moe_block(child):
            setattr(model, name, from_hf(child))
        else:
            convert_hf_blocks(child)
    return model
