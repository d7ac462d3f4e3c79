"""moe_ops: quantized Mixture-of-Experts grouped GEMMs for PyTorch.

``import moe_ops`` registers the ``torch.ops.moe_ops.*`` operators, their fake kernels
(:mod:`moe_ops.meta`) and autograd formulas. See README.md for the formats and an example.
"""
from . import ops as _ops  # noqa: F401  (defines the operators)
from . import reference as _reference  # noqa: F401  (defines moe_ops::_segment_mm)
from . import routing as _routing  # (defines topk_route, sort_rows, permute, unpermute)
from . import expert_mlp as _expert_mlp  # (defines moe_ops::expert_mlp)
from . import meta as _meta  # noqa: F401  (registers the fake kernels)
from . import autograd as _autograd
from .api import dequantize_weight, grouped_mm, quantize_act, quantize_weight
from .formats import GRANULARITIES, QUANTIZED_FORMATS, WEIGHT_FORMATS
from .activations import ACT_QUANT_MODES
from .recipes import RECIPES
from .quantized_weight import QuantizedWeight
from .layers import MoE, ExpertWeights, Routing, SwiGLUMLP, quantize_experts, route
from .hf import from_hf, convert_hf_blocks

_autograd.register()
_routing.register()
_expert_mlp.register()

__all__ = [
    "QuantizedWeight", "quantize_weight", "dequantize_weight", "grouped_mm", "quantize_act",
    "MoE", "ExpertWeights", "SwiGLUMLP", "Routing", "quantize_experts", "route", "from_hf", "convert_hf_blocks",
    "WEIGHT_FORMATS", "QUANTIZED_FORMATS", "GRANULARITIES", "ACT_QUANT_MODES", "RECIPES",
]
__version__ = "0.1.0"
