"""``QuantizedWeight``: an immutable container of expert weights stored in a quantized format."""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Optional

import torch

from . import formats


@dataclass(frozen=True)
class QuantizedWeight:
    """Expert weights of logical shape ``shape = (E, N, K)`` stored as ``format``.

    ``data``: stored codes (``[E, N, K/pack]``, dtype per format), ``scale``: float32 per
    ``granularity`` (None for plain formats), ``zero``: uint8 zero points of asym formats (else
    None), ``dtype``: the dtype :func:`moe_ops.dequantize_weight` returns (the original
    weights'). Build one with :func:`moe_ops.quantize_weight`.
    """

    data: torch.Tensor
    scale: Optional[torch.Tensor]
    zero: Optional[torch.Tensor]
    format: str
    granularity: str
    group_size: int
    shape: tuple
    dtype: torch.dtype

    @property
    def device(self) -> torch.device:
        return self.data.device

    @property
    def is_plain(self) -> bool:
        return formats.get_format(self.format).kind == "float"

    def op_args(self):
        """``(w, w_scale, w_zero, w_format, granularity, group_size)`` for the operators."""
        if self.is_plain:
            return self.data, None, None, "none", "none", 0
        return self.data, self.scale, self.zero, self.format, self.granularity, self.group_size

    def to(self, *args, **kwargs) -> "QuantizedWeight":
        """Move to a device (stored dtypes never change; a dtype argument sets ``self.dtype``)."""
        device, dtype, _, _ = torch._C._nn._parse_to(*args, **kwargs)
        move = (lambda t: None if t is None else t.to(device)) if device is not None else (lambda t: t)
        new_dtype = dtype if dtype is not None else self.dtype
        data = self.data.to(new_dtype) if (self.is_plain and dtype is not None) else self.data
        return replace(self, data=move(data), scale=move(self.scale), zero=move(self.zero), dtype=new_dtype)

    def cuda(self, device=None) -> "QuantizedWeight":
        return self.to(torch.device("cuda") if device is None else torch.device("cuda", device))

    def cpu(self) -> "QuantizedWeight":
        return self.to("cpu")

    def nbytes(self) -> int:
        """Bytes of stored data, scales and zero points."""
        return sum(t.numel() * t.element_size() for t in (self.data, self.scale, self.zero) if t is not None)

    def requires_grad_(self, requires_grad: bool = True) -> "QuantizedWeight":
        if requires_grad:
            raise RuntimeError("QuantizedWeight: quantized weights get no gradient; train plain weights "
                               "(optionally with recipe=...) and quantize after training")
        return self

    def __repr__(self) -> str:
        g = f", group_size={self.group_size}" if self.granularity == "group" else ""
        return (f"QuantizedWeight(format={self.format}, granularity={self.granularity}{g}, "
                f"shape={tuple(self.shape)}, dtype={self.dtype}, device={self.device})")
