"""Probe: does a ``wrap_triton`` kernel launched with ``launch_pdl=True`` keep PDL under
``torch.compile``? Usage (GPU, sm90+): ``python benchmarks/probe_pdl_compile.py``.

Three chained launches of a one-program kernel that calls ``gdc_wait`` / ``gdc_launch_dependents``
(``tl.extra.cuda``), inside a ``triton_op``, run eagerly and compiled; prints both outputs and the
compiled graph's launch lines. Found on the H100 with torch 2.11 (see benchmarks/NOTES.md, session
9): Inductor's mutation analysis cannot read the GDC ops (``tt.elementwise_inline_asm``: "assuming
every input is mutated") and its launch lines carry no ``launch_pdl``: under torch.compile the
kernels would lose PDL and gain the conservative mutation handling.
"""
import torch
import triton.language as tl
import triton
from torch._inductor.utils import run_and_get_code
from torch.library import triton_op, wrap_triton


@triton.jit
def _inc_kernel(x_ptr, y_ptr, N: tl.constexpr):
    tl.extra.cuda.gdc_wait()
    tl.extra.cuda.gdc_launch_dependents()
    i = tl.arange(0, N)
    tl.store(y_ptr + i, tl.load(x_ptr + i) + 1)


@triton_op("probe_pdl::inc", mutates_args=())
def inc(x: torch.Tensor) -> torch.Tensor:
    y = torch.empty_like(x)
    wrap_triton(_inc_kernel)[(1,)](x, y, N=x.numel(), launch_pdl=True)
    return y


def chain(x):
    return inc(inc(inc(x)))


if __name__ == "__main__":
    x = torch.zeros(1024, device="cuda")
    print("eager", chain(x)[:3].tolist())
    out, code = run_and_get_code(torch.compile(chain), x)
    print("compiled", out[:3].tolist())
    print("\n".join(line for line in code[0].splitlines() if "launch_pdl" in line or ".run(" in line))
