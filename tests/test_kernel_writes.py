"""What Inductor believes our routing kernels write (its TTIR mutation analysis, run on the CPU
for an sm_90 target): exactly the outputs. A pointer it wrongly counts as written makes
``torch.compile`` copy that tensor before each launch, and when it is a graph input (the layer's
``x``), ``mode="reduce-overhead"`` gives up CUDA graphs ("mutated inputs")."""
import pytest
import torch

triton = pytest.importorskip("triton")
from torch._higher_order_ops.triton_kernel_wrap import identify_accessed_tensors  # noqa: E402

from moe_ops.kernels import routing_kernels as rk  # noqa: E402


class _Sm90Target:
    """A stand-in for Triton's active driver: TTIR generation only needs the target."""

    def get_current_target(self):
        from triton.backends.compiler import GPUTarget
        return GPUTarget("cuda", 90, 32)

    def get_active_torch_device(self):
        return torch.device("cpu")


def _written(kernel, **kwargs):
    if getattr(kernel, "__module__", "").startswith("triton.runtime.interpreter"):
        pytest.skip("TRITON_INTERPRET=1: kernels are interpreted functions, not JIT functions")
    drivers = triton.runtime.driver
    previous = drivers._active  # None on a machine without a GPU (reset_active would raise there)
    drivers.set_active(_Sm90Target())
    try:
        acc = identify_accessed_tensors(kernel, kwargs, {})
    finally:
        drivers._active = previous
    return sorted(d.name for d in acc.read_writes.writes)


T, E, H, K = 2, 32, 256, 4
ROUTING = dict(TOP_K=K, K_POW2=K, E_POW2=E, T_POW2=T, SOFTMAX=True, RENORM=True)


def _i32(*shape):
    return torch.empty(*shape, dtype=torch.int32)


@pytest.mark.parametrize("has_bias", [False, True])
def test_router_topk_sort_kernel_writes_its_outputs_only(has_bias):
    x, wr = torch.empty(T, H, dtype=torch.bfloat16), torch.empty(E, H, dtype=torch.bfloat16)
    written = _written(rk.router_topk_sort_kernel, x_ptr=x, wr_ptr=wr, bias_ptr=torch.empty(E),
                       part_ptr=torch.empty(2, T, E), sem_ptr=_i32(1), logits_ptr=torch.empty(T, E, dtype=x.dtype),
                       w_ptr=torch.empty(T, K), ids_ptr=_i32(T, K), rows_ptr=_i32(T * K), offs_ptr=_i32(E), T=T, E=E,
                       H=H, stride_xt=H, stride_we=H, **ROUTING, BLOCK_T=16, BLOCK_E=16, BLOCK_H=128, H_STEPS=1,
                       SPLIT=2, HAS_BIAS=has_bias, UPCAST_DOT=False)
    assert written == sorted(["part_ptr", "sem_ptr", "logits_ptr", "w_ptr", "ids_ptr", "rows_ptr", "offs_ptr"])


@pytest.mark.parametrize("has_bias", [False, True])
def test_topk_sort_kernel_writes_its_outputs_only(has_bias):
    written = _written(rk.topk_sort_kernel, logits_ptr=torch.empty(T, E), bias_ptr=torch.empty(E),
                       w_ptr=torch.empty(T, K), ids_ptr=_i32(T, K), rows_ptr=_i32(T * K), offs_ptr=_i32(E), T=T, E=E,
                       stride_lt=E, **ROUTING, HAS_BIAS=has_bias)
    assert written == sorted(["w_ptr", "ids_ptr", "rows_ptr", "offs_ptr"])
