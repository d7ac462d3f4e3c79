"""``moe_ops.lowering``: the Inductor side — kernel choice from static shapes.

:mod:`moe_ops.lowering.kernel_choice` picks the kernel shape (decode or prefill) and its tile
configuration from static shapes only, so under ``torch.compile`` the choice happens once,
at trace time.
"""
from .kernel_choice import KernelConfig, choose_forward_config  # noqa: F401
