"""``moe_ops.lowering``: the Inductor side — graph passes and kernel choice from static shapes.

:mod:`moe_ops.lowering.passes` rewrites grouped GEMMs that model code writes
(``torch._grouped_mm``, dequantize-then-GEMM) into moe_ops operators and
:mod:`moe_ops.lowering.routing_pass` its softmax top-k routing and expert sort; switch them on with
:func:`enable` / :func:`enabled` / :func:`compile_options` (:mod:`moe_ops.lowering.switch`).
:mod:`moe_ops.lowering.kernel_choice` picks the kernel shape (decode or prefill) and its tile
configuration from static shapes only, so under ``torch.compile`` the choice happens once,
at trace time; :mod:`moe_ops.lowering.autotune` times a few candidates around it where asked
(``max-autotune``, ``MOE_OPS_AUTOTUNE=1``).
"""
from .kernel_choice import KernelConfig, choose_expert_mlp_configs, choose_forward_config  # noqa: F401
from .passes import fuse_moe_patterns, rewrite_grouped_mm  # noqa: F401
from .routing_pass import fuse_routing  # noqa: F401
from .switch import MoEGraphPass, compile_options, disable, enable, enabled  # noqa: F401
