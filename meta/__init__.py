"""``moe_ops.meta``: the fake (meta) kernels of every ``moe_ops`` operator.

Importing this package registers them; ``import moe_ops`` does so. Each fake kernel runs the
same checks as the eager implementation (:mod:`moe_ops.checks`) and returns empty tensors of
the output's shape, dtype and device, so that shape propagation under ``torch.compile`` and
``opcheck`` see exactly what the real kernels return.
"""
from . import fake_kernels  # noqa: F401  (registers the fake kernels)
