"""SASS opcode histogram of the grouped GEMM's K loop, compiled offline (no GPU needed).

Usage: ``python benchmarks/sass_histogram.py --format int4_asym --group 128 --tile 16 128 128 4 3
[--swiglu] [--w-lhs] [--tma] [--gemv [--k-split N | --combine TOP_K]] [--act fp8_1x128 --block
[--scale-per-column]]`` (or ``--token-blocks BLOCK_C WARPS
[--per-expert [--prefetch]] [--div-rn]``: the FP8 recipes' token-block cast, instructions per element). Compiles
:func:`grouped_gemm_kernel` for an NVIDIA target (default sm90) with Triton's bundled
``ptxas``/``nvdisasm``, with the specialisations a real launch gets (unit strides as constants,
16-divisible pointers and row strides), and prints the registers and spills ``ptxas -v`` reports,
then for each loop of the kernel its instruction count per thread and iteration and the most
frequent opcodes. With the K tile's weight elements per thread, that gives instructions per weight
element: a count to compare a dequantizing tile's variants by, not a prediction of their time
(benchmarks/NOTES.md, sessions 8 and 37: fewer instructions measured no faster, or slower).
``--tma``: x and W's stored tiles by TMA descriptors, as the table's TMA tiles launch (their K
loop differs from the pointer tile's); ``--swiglu``: the fused expert MLP's gate/up launch (two accumulators,
gathered rows; with ``--one-loop`` one loop over the interleaved gate/up rows,
``KernelConfig.one_loop``); ``--w-lhs``: the weight-only kernel with the dequantized weight as the
MMA's register operand (``KernelConfig.w_lhs``); ``--gemv --combine TOP_K``: the fused expert MLP's token-major down
launch (``KernelConfig.combine``).
"""
from __future__ import annotations

import argparse
import collections
import inspect
import os
import re
import subprocess
import tempfile

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from moe_ops import formats
from moe_ops.kernels.grouped_gemm import grouped_gemm_kernel

_HUGE = 1 << 30
_DIV16 = {"M", "N", "K", "stride_xm", "stride_xsm", "stride_we", "stride_wn", "stride_se", "stride_sn", "stride_ym"}
_UNIT = {"stride_xk": 1, "stride_xsk": 1, "stride_wk": 1, "stride_sk": 1, "stride_yn": 1}
_W_PTR = {"int": "*u8", "bf16": "*bf16", "fp8_e4m3": "*fp8e4nv", "fp8_e5m2": "*fp8e5"}  # the weights' element type


def constexprs(fmt: str, group: int, tile, act: str = "none", block: bool = False) -> dict:
    """The forward launch's constexprs for ``fmt`` under bf16 x (``act`` none) or fp8 x
    (``fp8_token`` / ``fp8_1x128``, fp8 weights); ``block``: 128x128 weight scales (see dispatch)."""
    bm, bn, bk = tile[:3]
    spec = None if fmt == "bf16" else formats.get_format(fmt)
    w_kind = 0 if spec is None else (1 if spec.kind == "int" else 2)
    pack = 1 if spec is None else spec.pack
    unit_n, unit_k = (128, 128) if block else (1, group if group else _HUGE)
    c = dict(E=8, E_POW2=8, W_KIND=w_kind, W_BITS=16 if spec is None else spec.bits,
             ZERO_MODE=0 if spec is None else (2 if spec.has_zero else (1 if spec.implicit_zero else 0)),
             IMPLICIT_ZERO=0 if spec is None else spec.implicit_zero, UNIT_N=unit_n, UNIT_K=unit_k,
             SCALE_TILE=unit_k >= _HUGE or unit_k % bk == 0, HAS_SCALE=spec is not None,
             ACT={"none": 0, "fp8_token": 2, "fp8_1x128": 2}[act],
             ACT_UNIT_K=128 if act == "fp8_1x128" else _HUGE, SCALE_UNIFORM_N=unit_n % bn == 0,
             INT8_OFFSET=False, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, UPCAST_DOT=False, GROUP_M=1,
             POST_SCALE=spec is not None and unit_k >= _HUGE and act == "none", PACK=pack, UNPACK_JOIN=pack > 1 and bm > 16,
             GATHER=0, SWIGLU=False, AMAX_OUT=False, SCATTER=False, ROW_WEIGHT=False, AMAX_COLS=1, AMAX_POW2=1,
             GEMV=False, W_LHS=False, ONE_LOOP=False, GEMV_PREFETCH=2, GEMV_KSPLIT=1)
    c.update(_UNIT)
    return c


def ptxas_report(ptx: str, arch: int) -> str:
    """``ptxas -v``'s register and spill lines for ``ptx``, with the first bundled ptxas that
    accepts the PTX version."""
    bin_dir = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
    with tempfile.NamedTemporaryFile(suffix=".ptx", mode="w") as f:
        f.write(ptx)
        f.flush()
        for name in ("ptxas", "ptxas-blackwell"):
            exe = os.path.join(bin_dir, name)
            if not os.path.exists(exe):
                continue
            r = subprocess.run([exe, "-v", f"--gpu-name=sm_{arch}a", f.name, "-o", os.devnull],
                               capture_output=True, text=True)
            if r.returncode == 0:
                return "\n".join(line.strip() for line in r.stderr.splitlines() if "spill" in line or "registers" in line)
    return "ptxas -v: no bundled ptxas accepted the PTX"


def compile_sass(consts: dict, w_ptr: str, warps: int, stages: int, arch: int, x_ptr: str = "*bf16",
                 tma: bool = False):
    """The kernel's ``(SASS, ptxas -v report)`` for ``consts``; ``tma``: x and W's stored tiles by
    host-side TMA descriptors (``TMA_X``, ``TMA_W`` 1; the blocks ``dispatch._tma_operands`` gives)."""
    params = inspect.signature(grouped_gemm_kernel.fn).parameters
    names = list(params)
    # constexprs the caller leaves out take their defaults (as a launch that does not pass them)
    consts = {**{n: p.default for n, p in params.items() if p.default is not inspect.Parameter.empty}, **consts}
    sig, attrs = {}, {}
    for i, n in enumerate(names):
        if n in consts:
            sig[n] = "constexpr"
            continue
        sig[n] = (w_ptr if n == "w_ptr" else x_ptr if n == "x_ptr" else "*u8" if n == "wz_ptr"
                  else "*fp32" if n in ("ws_ptr", "xs_ptr")
                  else "*i32" if n in ("offs_ptr", "xrow_ptr", "dst_ptr") else "*bf16") if n.endswith("_ptr") else "i32"
        if n in ("x_desc", "w_desc") and tma:
            bm, bn, bk, pack = consts["BLOCK_M"], consts["BLOCK_N"], consts["BLOCK_K"], consts["PACK"]
            sig[n] = (f"tensordesc<{x_ptr[1:]}[{bm},{bk}]>" if n == "x_desc"
                      else f"tensordesc<{w_ptr[1:]}[1,{bn},{bk // pack}]>")
            continue
        if n in ("x_desc", "w_desc"):  # TMA off: plain pointers in the descriptors' places
            sig[n] = x_ptr if n == "x_desc" else w_ptr
        if n.endswith("_ptr") or n in _DIV16:
            attrs[(i,)] = [["tt.divisibility", 16]]
    src = ASTSource(fn=grouped_gemm_kernel, signature=sig, attrs=attrs,
                    constexprs={(names.index(k),): v for k, v in consts.items()})
    return _disassemble(src, warps, stages, arch)


def _disassemble(src, warps: int, stages: int, arch: int):
    """``(SASS text, ptxas -v report)`` of the Triton source ``src`` compiled for sm_``arch``."""
    ck = triton.compile(src, target=GPUTarget("cuda", arch, 32), options=dict(num_warps=warps, num_stages=stages))
    nvdisasm = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "nvdisasm")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(ck.asm["cubin"])
        f.flush()
        sass = subprocess.run([nvdisasm, "-c", f.name], capture_output=True, text=True, check=True).stdout
    return sass, ptxas_report(ck.asm["ptx"], arch)


def compile_token_blocks(block_c: int, warps: int, per_expert: bool, rcp: bool, arch: int, prefetch: bool = False,
                         largest_first: bool = False, wide_keys: bool = False, steps: int = 1):
    """:func:`token_block_quant_kernel` (bf16 input, column tiles first, 128 experts) as its launch
    specialises it; ``rcp``: the reciprocal division, else ``div_rn``; ``prefetch`` (per expert):
    the second pass's next block loaded ahead; ``largest_first`` (per expert): the experts
    launched by row count, most first, their sort keys int64 if ``wide_keys`` (the launch's
    choice past 2**31 // 128 rows) else int32; ``steps``: token blocks a first-pass step (per
    expert) or column tiles a program (per block)."""
    from moe_ops.kernels.token_block_quant import token_block_quant_kernel as kernel
    consts = dict(E=128, E_POW2=128, BLOCK_M=128, BLOCK_C=block_c, PER_EXPERT=per_expert, COLS_FAST=True, RCP=rcp,
                  STEP_BLOCKS=steps, PREFETCH=prefetch, LARGEST_FIRST=largest_first, WIDE_KEYS=wide_keys)
    names = list(inspect.signature(kernel.fn).parameters)
    types = dict(t_ptr="*bf16", q_ptr="*fp8e4nv", s_ptr="*fp32", offs_ptr="*i32")
    sig = {n: "constexpr" if n in consts else types.get(n, "i32") for n in names}
    attrs = {(i,): [["tt.divisibility", 16]] for i, n in enumerate(names) if n not in consts}
    src = ASTSource(fn=kernel, signature=sig, attrs=attrs, constexprs={(names.index(k),): v for k, v in consts.items()})
    return _disassemble(src, warps, 3, arch)


def compile_weight_cast(kind: str, warps: int, words: bool, arch: int, channel_tile=(8, 2048)):
    """:func:`fp8_weight_quant_kernel` for bf16 W (flat grid, reciprocal division) as
    :func:`moe_ops.kernels.weight_quant.fp8_weight_quant` specialises it: ``kind`` ``block``
    (W's 128x128 tiles' codes), ``transposed`` (W^T's) or ``pair`` (both; ``words``: W^T's codes
    four a 32-bit word); ``channel`` (W's rows) or ``channel_t`` (W^T's rows, W read as its
    transpose) with ``channel_tile`` ``(BLOCK_N, BLOCK_K)`` (one read where ``BLOCK_K`` is at
    least the reduced dim, taken as ``BLOCK_K``)."""
    from moe_ops.kernels.weight_quant import fp8_weight_quant_kernel as kernel
    channel = kind.startswith("channel")
    bn, bk = channel_tile if channel else (128, 128)
    consts = dict(BLOCK_N=bn, BLOCK_K=bk, PER_ROW=channel, FLAT=True, RCP=True, PAIR=kind == "pair",
                  WORDS=words and kind == "pair", ONE_READ=channel)
    # the unit strides a launch specialises (W's contiguous dim; each code layout's)
    consts.update(stride_wn=1) if kind == "channel_t" else consts.update(stride_wk=1)
    consts.update(stride_qn=1) if kind == "transposed" else consts.update(stride_qk=1)
    if kind == "pair":
        consts.update(stride_qtn=1)
    names = list(inspect.signature(kernel.fn).parameters)
    types = dict(w_ptr="*bf16", q_ptr="*fp8e4nv", qt_ptr="*fp8e4nv", s_ptr="*fp32", st_ptr="*fp32")
    sig = {n: "constexpr" if n in consts else types.get(n, "i32") for n in names}
    attrs = {(i,): [["tt.divisibility", 16]] for i, n in enumerate(names) if n not in consts}
    src = ASTSource(fn=kernel, signature=sig, attrs=attrs, constexprs={(names.index(k),): v for k, v in consts.items()})
    return _disassemble(src, warps, 3, arch)


def instructions(sass: str):
    """``(instruction count, Counter of opcodes)`` of the whole kernel."""
    ins = [m.group(1) for m in (re.match(r"^\s+/\*[0-9a-f]+\*/\s+(.*?)\s*;", line) for line in sass.splitlines()) if m]
    return len(ins), collections.Counter(re.sub(r"^@!?U?P\w+\s+", "", t).split()[0] for t in ins)


def loops(sass: str):
    """``[(instructions, Counter of opcodes)]`` of each backward-branch loop body."""
    labels, ins = {}, []
    for line in sass.splitlines():
        m = re.match(r"^(\.L_x_\d+):", line)
        if m:
            labels[m.group(1)] = len(ins)
        m = re.match(r"^\s+/\*[0-9a-f]+\*/\s+(.*?)\s*;", line)
        if m:
            ins.append(m.group(1))
    out = []
    for i, t in enumerate(ins):
        m = re.search(r"BRA\s+`\((\.L_x_\d+)\)", t)
        if m and labels.get(m.group(1), i + 1) <= i:
            body = ins[labels[m.group(1)]:i + 1]
            ops = collections.Counter(re.sub(r"^@!?U?P\w+\s+", "", t).split()[0].split(".")[0] for t in body)
            out.append((len(body), ops))
    return out


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--format", default="int4_asym", help="bf16 or a quantized weight format")
    p.add_argument("--group", type=int, default=128, help="group size (0: channel scales)")
    p.add_argument("--tile", type=int, nargs=5, default=[16, 128, 128, 4, 3],
                   metavar=("BLOCK_M", "BLOCK_N", "BLOCK_K", "WARPS", "STAGES"))
    p.add_argument("--arch", type=int, default=90)
    p.add_argument("--swiglu", action="store_true", help="the fused gate/up launch (two accumulators)")
    p.add_argument("--w-lhs", action="store_true", help="the dequantized weight as the MMA's left operand")
    p.add_argument("--one-loop", action="store_true", help="with --swiglu: gate and up rows in one K loop")
    p.add_argument("--gemv", action="store_true", help="the CUDA-core decode tile (KernelConfig.gemv)")
    p.add_argument("--k-split", type=int, default=1, help="with --gemv on packed codes: K tiles a loop step")
    p.add_argument("--combine", type=int, default=0, metavar="TOP_K",
                   help="with --gemv: the token-major down launch over TOP_K slots (bf16 or packed codes)")
    p.add_argument("--act", default="none", choices=["none", "fp8_token", "fp8_1x128"],
                   help="fp8 activations (with an fp8 --format): the W8A8 / training-recipe tile")
    p.add_argument("--block", action="store_true", help="128x128 weight scale blocks (fp8_blockwise's W)")
    p.add_argument("--tma", action="store_true", help="x and W's stored tiles by TMA descriptors (TMA_X, TMA_W 1)")
    p.add_argument("--scale-per-column", action="store_true",
                   help="with --block: W's scale loaded per column (SCALE_UNIFORM_N off), for comparison")
    p.add_argument("--token-blocks", type=int, nargs=2, metavar=("BLOCK_C", "WARPS"),
                   help="instead: the FP8 recipes' token-block cast (straight-line code, per element)")
    p.add_argument("--per-expert", action="store_true", help="with --token-blocks: per-expert scales")
    p.add_argument("--div-rn", action="store_true", help="with --token-blocks: div_rn, not the reciprocal")
    p.add_argument("--largest-first", action="store_true",
                   help="with --token-blocks --per-expert: experts launched by row count, most first")
    p.add_argument("--steps", type=int, default=1,
                   help="with --token-blocks: token blocks a first-pass step (per expert), column tiles a program (per block)")
    p.add_argument("--wide-keys", action="store_true",
                   help="with --largest-first: int64 sort keys (the launch's choice only past 2**31 // 128 rows)")
    p.add_argument("--prefetch", action="store_true",
                   help="with --token-blocks --per-expert: the second pass's next block loaded ahead")
    p.add_argument("--weight-cast", choices=["block", "transposed", "pair", "channel", "channel_t"],
                   help="instead: the fp8 cast of W (block: 128x128 tiles; --tile's WARPS)")
    p.add_argument("--channel-tile", type=int, nargs=2, default=[8, 2048], metavar=("BLOCK_N", "BLOCK_K"),
                   help="with --weight-cast channel / channel_t: rows a program, reduced columns in one read")
    p.add_argument("--bytes", action="store_true", help="with --weight-cast pair: W^T's codes a byte at a time")
    a = p.parse_args()
    if a.weight_cast:
        sass, regs = compile_weight_cast(a.weight_cast, a.tile[3], not a.bytes, a.arch, a.channel_tile)
        n, ops = instructions(sass)
        print(regs)
        tile = a.channel_tile[0] * a.channel_tile[1] if a.weight_cast.startswith("channel") else 128 * 128
        print(f"{n} instructions per thread, {n / (tile / (32 * a.tile[3])):.1f} per element")
        print("  " + ", ".join(f"{k} {v}" for k, v in ops.most_common(16)))
        return
    if a.token_blocks:
        sass, regs = compile_token_blocks(*a.token_blocks, a.per_expert, not a.div_rn, a.arch, a.prefetch,
                                          a.largest_first, a.wide_keys, a.steps)
        n, ops = instructions(sass)
        per_thread = 128 * a.token_blocks[0] / (32 * a.token_blocks[1])  # tile elements a thread holds
        print(regs)
        print(f"{n} instructions per thread, {n / per_thread:.1f} per element")
        print("  " + ", ".join(f"{k} {v}" for k, v in ops.most_common(16)))
        for n, ops in loops(sass):  # the per-expert passes
            print(f"loop: {n} instructions per thread-iteration, {n / per_thread:.1f} per element")
            print("  " + ", ".join(f"{k} {v}" for k, v in ops.most_common(12)))
        return
    spec = None if a.format == "bf16" else formats.get_format(a.format)
    consts = constexprs(a.format, a.group, a.tile, a.act, a.block)
    if a.scale_per_column:
        consts["SCALE_UNIFORM_N"] = False
    if a.swiglu:
        consts.update(SWIGLU=True, GATHER=8, ONE_LOOP=a.one_loop)
    consts.update(W_LHS=a.w_lhs and spec is not None, GEMV=a.gemv, GEMV_PREFETCH=a.tile[4], GEMV_KSPLIT=a.k_split,
                  COMBINE=a.combine, COMBINE_POW2=triton.next_power_of_2(max(a.combine, 1)), TMA_X=a.tma,
                  TMA_W=int(a.tma))
    sass, regs = compile_sass(consts, _W_PTR["int" if spec is not None and spec.kind == "int" else a.format],
                              a.tile[3], a.tile[4], a.arch, "*bf16" if a.act == "none" else _W_PTR["fp8_e4m3"], a.tma)
    print(regs)
    rows = a.tile[1] * (2 if a.swiglu and a.one_loop else 1)  # weight rows of one K loop
    # weight elements of a loop step per thread (the combine launch: all slots a step)
    per_thread = rows * a.tile[2] * a.k_split * max(consts["COMBINE_POW2"] if a.combine else 1, 1) / (32 * a.tile[3])
    for n, ops in loops(sass):
        if n > 1:
            print(f"loop: {n} instructions per thread-iteration, {n / per_thread:.2f} per weight element")
            print("  " + ", ".join(f"{k} {v}" for k, v in ops.most_common(16)))


if __name__ == "__main__":
    main()
