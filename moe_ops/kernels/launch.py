"""One Triton launch from an operator body, eager or traced, with host-side TMA descriptors.

:func:`launch` ``(kernel, grid, kwargs, descriptors, **options)``; ``descriptors`` maps kernel
parameter names to ``(tensor, block_shape)``, each passed as
``triton.tools.tensor_descriptor.TensorDescriptor.from_tensor(tensor, block_shape)``:

* real tensors, nothing tracing: the kernel is launched directly with the descriptors built
  here (what ``torch.library.triton_op``'s eager path does). Not through ``wrap_triton``: its
  higher-order op keeps every launch argument that is not a tensor or a scalar (a descriptor,
  and the tensor it holds) in a process-wide side table for good.
* tracing (fake or functional tensors under ``torch.compile`` / export, an FX proxy mode): the
  ``wrap_triton`` higher-order op, each descriptor replaced by its tensor plus torch's "stable"
  TMA metadata (the block shape), from which Inductor's launch rebuilds the descriptor. torch's
  own tracing of ``wrap_triton`` calls outside Dynamo records no TMA metadata (it passes an
  empty dict), hence the subclass of its tracer below. Where this torch lacks that machinery,
  :func:`traced_descriptors_supported` is False and callers take pointer loads instead.
"""
from __future__ import annotations

import functools
import os

import torch
from torch.library import wrap_triton


_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"


def interpreting() -> bool:
    """Whether kernels run in Triton's interpreter (``TRITON_INTERPRET=1`` at import)."""
    return _INTERPRET


def tma_device(t: torch.Tensor) -> bool:
    """Whether launches on ``t``'s device may take TMA descriptors (CUDA capability 9.0 and
    later; the interpreter emulates them)."""
    if _INTERPRET:
        return True
    if not t.is_cuda:
        return False
    return _has_tma(t.device.index if t.device.index is not None else torch.cuda.current_device())


@functools.cache
def _has_tma(index: int) -> bool:
    return torch.cuda.get_device_capability(index)[0] >= 9


def tma_aligned(t: torch.Tensor) -> bool:
    """A TMA descriptor's layout rules: last dim contiguous, the other strides and the start
    16-byte aligned (storage offsets stand for the start: storages are allocated aligned)."""
    size = t.element_size()
    return (t.stride(-1) == 1 and all(st * size % 16 == 0 for st in t.stride()[:-1])
            and t.storage_offset() * size % 16 == 0)


def descriptors_allowed(t: torch.Tensor) -> bool:
    """Whether a launch on ``t`` may pass descriptors now: always when run; when traced, where
    this torch records their metadata (and not for interpreted kernels, which torch does not
    trace into its higher-order op)."""
    return not tracing(t) or (not _INTERPRET and traced_descriptors_supported())


def _ensure_cuda_context(device: torch.device) -> None:
    """Make ``device``'s primary CUDA context current on this thread if none is. Triton encodes a
    host-side descriptor (``cuTensorMapEncodeTiled``, a driver call) before its launcher makes a
    context current, and a thread that has not yet touched the device (autograd's backward
    thread) has none: "Failed to create tensor map descriptor: invalid device context"."""
    import ctypes
    lib = _libcuda()
    ctx = ctypes.c_void_p()
    if lib.cuCtxGetCurrent(ctypes.byref(ctx)) == 0 and ctx.value:
        return
    dev = ctypes.c_int()
    index = device.index if device.index is not None else torch.cuda.current_device()
    if (lib.cuDeviceGet(ctypes.byref(dev), index) != 0 or lib.cuDevicePrimaryCtxRetain(ctypes.byref(ctx), dev) != 0
            or lib.cuCtxSetCurrent(ctx) != 0):
        raise RuntimeError(f"could not make the CUDA context of {device} current for a TMA descriptor")


@functools.cache
def _libcuda():
    import ctypes
    return ctypes.CDLL("libcuda.so.1")


def tracing(t: torch.Tensor) -> bool:
    """Whether a launch on ``t`` is being traced rather than run (a plain tensor outside
    Dynamo and proxy modes is the cheap common case: ~0.3 us)."""
    if torch.compiler.is_compiling() or torch._C._get_dispatch_mode(torch._C._TorchDispatchModeKey.PROXY) is not None:
        return True
    if type(t) is torch.Tensor:
        return False
    from torch._subclasses.fake_tensor import is_fake
    return is_fake(t)


def traced_descriptors_supported() -> bool:
    from torch._higher_order_ops import triton_kernel_wrap as tkw
    return all(hasattr(tkw, n) for n in ("TracingTritonHOPifier", "TraceableTritonKernelWrapper",
                                         "create_tma_stable_metadata", "triton_kernel_wrapper_mutation"))


def _hopifier(block_shapes: dict):
    """torch's tracer of ``wrap_triton`` calls, recording ``block_shapes``' parameters as TMA
    descriptors of the tensors passed in their places."""
    from torch._higher_order_ops import triton_kernel_wrap as tkw

    class _WithDescriptors(tkw.TracingTritonHOPifier):
        def call_HOP(self, variable, grids, combined_args, tx):
            graphable, constant_args_idx = self.store_non_graphable_args(combined_args)
            meta = {name: tkw.create_tma_stable_metadata(list(block)) for name, block in block_shapes.items()}
            return tkw.triton_kernel_wrapper_mutation(kernel_idx=variable.kernel_idx,
                                                      constant_args_idx=constant_args_idx, grid=grids,
                                                      tma_descriptor_metadata=meta, kwargs=graphable)
    return _WithDescriptors()


def launch(kernel, grid, kwargs: dict, descriptors: dict, **options) -> None:
    """Launch ``kernel[grid](**kwargs, **options)`` with ``descriptors`` (see the module doc)
    in their parameters' places; ``options``: ``num_warps``, ``num_stages``."""
    probe = next(v for v in kwargs.values() if isinstance(v, torch.Tensor))
    if not tracing(probe):
        from triton.tools.tensor_descriptor import TensorDescriptor
        if descriptors and probe.is_cuda:
            _ensure_cuda_context(probe.device)
        descs = {name: TensorDescriptor.from_tensor(t, list(block)) for name, (t, block) in descriptors.items()}
        kernel[grid](**kwargs, **descs, **options)
        return
    if not descriptors:
        wrap_triton(kernel)[grid](**kwargs, **options)
        return
    tensors = {name: t for name, (t, _) in descriptors.items()}
    blocks = {name: block for name, (_, block) in descriptors.items()}
    from torch._higher_order_ops.triton_kernel_wrap import TraceableTritonKernelWrapper
    _hopifier(blocks).call_triton_kernel(TraceableTritonKernelWrapper(kernel, None, grid), [],
                                         {**kwargs, **tensors, **options}, None)
