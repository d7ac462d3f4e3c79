"""The one switch of the graph passes: ``enable()`` / ``disable()``, the ``enabled()`` context
manager, and ``compile_options()`` for ``torch.compile(options=...)``.

All of them install :class:`MoEGraphPass` as Inductor's ``pre_grad_custom_pass``; a pass that
was already installed there keeps running, after ours.
"""
from __future__ import annotations

import contextlib

import torch._inductor.config as inductor_config
from torch._inductor.custom_graph_pass import CustomGraphPass, get_hash_for_files

from . import passes, routing_pass


class MoEGraphPass(CustomGraphPass):
    """Passes 1-5 (:mod:`moe_ops.lowering.passes`, :mod:`moe_ops.lowering.routing_pass`) as an
    Inductor custom pass (with a ``uuid`` over the passes' source and the policy, so Inductor's
    caches stay correct)."""

    def __init__(self, policy: str = "auto", then=None):
        passes.check_policy(policy)
        self.policy, self.then = policy, then
        self.rewrites = 0  # nodes rewritten over this pass's lifetime (tests, diagnostics)

    def __call__(self, graph) -> None:
        self.rewrites += passes.rewrite_grouped_mm(graph, self.policy)
        self.rewrites += passes.fuse_moe_patterns(graph)
        self.rewrites += routing_pass.fuse_routing(graph, self.policy)
        if self.then is not None:
            self.then(graph)

    def uuid(self):
        return (get_hash_for_files((passes.__file__, routing_pass.__file__, __file__)), self.policy,
                None if self.then is None or not hasattr(self.then, "uuid") else self.then.uuid())


_previous = []


def enable(policy: str = "auto") -> MoEGraphPass:
    """Install the passes for every later ``torch.compile`` (Inductor backend); returns the pass."""
    current = inductor_config.pre_grad_custom_pass
    p = MoEGraphPass(policy, then=current)
    _previous.append(current)
    inductor_config.pre_grad_custom_pass = p
    return p


def disable() -> None:
    """Undo the last :func:`enable`."""
    if _previous:
        inductor_config.pre_grad_custom_pass = _previous.pop()


@contextlib.contextmanager
def enabled(policy: str = "auto"):
    """``with moe_ops.lowering.enabled(): torch.compile(model)(x)`` — the passes inside only."""
    p = enable(policy)
    try:
        yield p
    finally:
        disable()


def compile_options(policy: str = "auto") -> dict:
    """``torch.compile(model, options=moe_ops.lowering.compile_options())``: the passes for
    that compile only."""
    return {"pre_grad_custom_pass": MoEGraphPass(policy, then=inductor_config.pre_grad_custom_pass)}
