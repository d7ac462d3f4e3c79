"""Triton kernels, one file per kernel family; :mod:`moe_ops.kernels.dispatch` picks them."""
