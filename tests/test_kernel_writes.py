"""What Inductor believes our kernels write (its TTIR mutation analysis, run on the CPU
for an sm_90 target): exactly the outputs. A pointer it wrongly counts as written makes
``torch.compile`` copy that tensor before each launch, and when it is a graph input (the layer's
``x``), ``mode="reduce-overhead"`` gives up CUDA graphs ("mutated inputs")."""
import dataclasses

import pytest
import torch

triton = pytest.importorskip("triton")
from torch._higher_order_ops.triton_kernel_wrap import identify_accessed_tensors  # noqa: E402

import moe_ops  # noqa: E402
from moe_ops.kernels import dispatch  # noqa: E402
from moe_ops.kernels import routing_kernels as rk  # noqa: E402
from moe_ops.kernels.grouped_wgrad import grouped_wgrad_fp8_kernel  # noqa: E402
from moe_ops.kernels.token_block_quant import token_block_quant_kernel  # noqa: E402
from moe_ops.kernels.weight_quant import fp8_weight_quant_kernel  # noqa: E402
from moe_ops.lowering.kernel_choice import KernelConfig  # noqa: E402


class _Sm90Target:
    """A stand-in for Triton's active driver: TTIR generation only needs the target."""

    def get_current_target(self):
        from triton.backends.compiler import GPUTarget
        return GPUTarget("cuda", 90, 32)

    def get_active_torch_device(self):
        return torch.device("cpu")


def _written(kernel, tma=None, **kwargs):
    if not isinstance(kernel, triton.runtime.jit.JITFunction):
        pytest.skip("TRITON_INTERPRET=1: kernels are interpreted functions, which Inductor does not analyse")
    drivers = triton.runtime.driver
    previous = drivers._active  # None on a machine without a GPU (reset_active would raise there)
    drivers.set_active(_Sm90Target())
    try:
        acc = identify_accessed_tensors(kernel, kwargs, tma or {})
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


def _launches(monkeypatch, fn):
    """``[(kernel, kwargs)]`` of the launches ``fn`` makes through :mod:`moe_ops.kernels.dispatch`
    (``wrap_triton`` and :func:`moe_ops.kernels.launch.launch`; captured, not run)."""
    seen = []

    class _Capture:
        def __init__(self, kernel):
            self.kernel = kernel

        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                named = dict(zip(self.kernel.arg_names, args))
                named.update({k: v for k, v in kwargs.items() if k in self.kernel.arg_names})
                seen.append((self.kernel, named))
            return launch

    def capture_launch(kernel, grid, kwargs, descriptors, **options):
        named = {k: v for k, v in kwargs.items() if k in kernel.arg_names}
        seen.append((kernel, {**named, **{k: t for k, (t, _) in descriptors.items()}}))

    monkeypatch.setattr(dispatch, "wrap_triton", _Capture)
    monkeypatch.setattr(dispatch.launch, "launch", capture_launch)
    fn()
    return seen


# (weight format, granularity, act_quant, tokens, experts, configs): the table's tiles for a decode
# launch pair with the combine (int4, 1/16 row an expert), the int8 pair that writes the row amax,
# prefill-sized row tiles, and a down launch that sums the slots itself (its gate/up launch zeroes
# the counters)
SLOT_SUM_PAIR = (KernelConfig(16, 16, 64, 4, 1), KernelConfig(16, 32, 64, 4, 1, slot_sum=True))


@pytest.mark.parametrize("fmt,gran,act,T,E_,configs", [("int4_asym", "group", "none", 1, 32, None),
                                                       ("int8_sym", "channel", "int8_token", 2, 8, None),
                                                       ("none", "none", "none", 64, 8, None),
                                                       ("int4_asym", "group", "none", 2, 8, SLOT_SUM_PAIR)])
def test_expert_mlp_launches_write_their_outputs_only(fmt, gran, act, T, E_, configs, monkeypatch):
    H_, I_, k = 256, 128, 2
    g = torch.Generator().manual_seed(0)
    w1, w2 = torch.randn(E_, 2 * I_, H_, generator=g), torch.randn(E_, H_, I_, generator=g)
    args = [(w.bfloat16(), None, None) if fmt == "none" else moe_ops.quantize_weight(w, fmt, gran, 128).op_args()[:3]
            for w in (w1, w2)]
    r = moe_ops.route(torch.randn(T, E_, generator=g), k)
    x = torch.randn(T, H_, generator=g).bfloat16()
    launches = _launches(monkeypatch, lambda: dispatch.expert_mlp(x, r.weights, r.sorted_rows, r.offs, *args[0],
                                                                   *args[1], fmt, gran, 128, 128, act, "none",
                                                                   configs=configs))
    gemms = [(kern, kw) for kern, kw in launches if kern.fn.__name__ == "grouped_gemm_kernel"]
    assert len(gemms) == 2
    if fmt == "int4_asym" and configs is None:
        assert gemms[1][1]["COMBINE"] == k  # the case covers the token-major down launch
    if configs is SLOT_SUM_PAIR:
        assert gemms[0][1]["CNT_ZERO"] > 0 and gemms[1][1]["SLOT_SUM"] == k
    for kern, kw in gemms:
        want = (["y_ptr"] + ["slot_ptr"] * kw["SLOT_OUT"] + ["amax_ptr"] * kw["AMAX_OUT"]
                + ["cnt_ptr"] * bool(kw["CNT_ZERO"] or kw["SLOT_SUM"]) + ["sum_ptr"] * bool(kw["SLOT_SUM"]))
        assert _written(kern, **kw) == sorted(want)


def _forward_launch_with_descriptors(monkeypatch, run):
    """The first (kernel, kwargs, descriptors) that ``run()`` hands to :func:`launch.launch`,
    with TMA allowed, and the parameters the kernel's mutation analysis reports as written."""
    seen = []
    monkeypatch.setattr(dispatch.launch, "tma_device", lambda t: True)
    monkeypatch.setattr(dispatch.launch, "launch",
                        lambda kernel, grid, kwargs, descriptors, **o: seen.append((kernel, kwargs, descriptors)))
    run()
    kernel, kw, descs = seen[0]
    meta = {n: ("stable", (list(block),)) for n, (_, block) in descs.items()}
    named = {k: v for k, v in kw.items() if k in kernel.arg_names}
    return kw, descs, _written(kernel, tma=meta, **named, **{n: t for n, (t, _) in descs.items()})


# (case, descriptors, TMA_W): bf16 forward and dgrad (x and W by TMA), int4 weight-only with x by
# TMA and W's codes by pointers (plain tile) or by TMA (the default prefill tile, w_lhs)
TMA_LAUNCHES = [("forward", {"x_desc", "w_desc"}, 1), ("dgrad", {"x_desc", "w_desc"}, 2),
                ("int4", {"x_desc"}, 0), ("int4_w_lhs", {"x_desc", "w_desc"}, 1)]


@pytest.mark.parametrize("case,names,tma_w", TMA_LAUNCHES)
def test_tma_launch_writes_its_output_only(case, names, tma_w, monkeypatch):
    """Operands as TMA descriptors (``KernelConfig.tma``; torch's "stable" metadata, as
    :mod:`moe_ops.kernels.launch` records them when traced): still only ``y`` counts as written."""
    x, w = torch.randn(256, 128).bfloat16(), torch.randn(4, 192, 128).bfloat16()
    offs = torch.tensor([50, 50, 200, 256], dtype=torch.int32)
    cfg = KernelConfig(64, 64, 64, 4, 3, tma=True, w_lhs=case == "int4_w_lhs")
    if case == "dgrad":
        def run():
            dispatch.grouped_mm_dgrad(torch.randn(256, 192).bfloat16(), w, None, None, offs, "none", "none", 0,
                                      "none", config=cfg)
    else:
        args = ((w, None, None, "none", "none", 0) if case == "forward"
                else moe_ops.quantize_weight(w, "int4_asym", "group", 64).op_args())

        def run():
            dispatch.grouped_mm(x, *args[:3], offs, *args[3:], "none", "none", config=cfg)
    kw, descs, written = _forward_launch_with_descriptors(monkeypatch, run)
    assert set(descs) == names and kw["TMA_X"] and kw["TMA_W"] == tma_w
    assert written == ["y_ptr"]


@pytest.mark.parametrize("expert_group", [0, 3])
def test_wgrad_tma_launch_writes_its_output_only(expert_group, monkeypatch):
    """The bf16 wgrad with its row chunks by TMA descriptors (in the expert-by-expert grid, and
    in the 1-D grid three experts at a time): only ``dw`` counts as written."""
    from moe_ops.kernels.grouped_wgrad import launch_wgrad
    seen = []
    monkeypatch.setattr(dispatch.launch, "tma_device", lambda t: True)
    monkeypatch.setattr(dispatch.launch, "launch",
                        lambda kernel, grid, kwargs, descriptors, **o: seen.append((kernel, kwargs, descriptors)))
    offs = torch.tensor([50, 50, 200, 256], dtype=torch.int32)
    config = (64, 128, 128, 8, 3) + ((expert_group,) if expert_group else ())
    launch_wgrad(torch.randn(256, 192).bfloat16(), torch.randn(256, 128).bfloat16(), offs, torch.bfloat16, config,
                 tma=True)
    kernel, kw, descs = seen[0]
    assert set(descs) == {"dy_desc", "x_desc"} and kw["TMA"] and kw["EXPERT_GROUP"] == expert_group
    meta = {n: ("stable", (list(block),)) for n, (_, block) in descs.items()}
    assert _written(kernel, tma=meta, **kw, **{n: t for n, (t, _) in descs.items()}) == ["dw_ptr"]


@pytest.mark.parametrize("per_expert,step,tma,prefetch", [(False, 1, False, False), (True, 1, False, False),
                                                           (True, 2, False, False), (False, 1, True, False),
                                                           (True, 1, False, True), (False, 2, False, True)])
def test_training_kernels_write_their_outputs_only(per_expert, step, tma, prefetch):
    """The token-block cast writes codes and scales only (per expert also with the second pass's
    next block loaded ahead, and with the experts launched largest first; per block also with
    two column tiles a program, the next loaded ahead), the fp8 wgrad its output only."""
    M_, C, E_ = 64, 32, 4
    offs = torch.tensor([10, 10, 40, 64], dtype=torch.int32)
    bm = 32  # token block (128 in the recipe; an fp8 dot needs 32)
    blocks = M_ // bm + E_
    # per expert also with the experts launched by row count (a sort of offs' values in the
    # kernel, int32 keys as the launch picks at these sizes)
    for largest_first in (False, True) if per_expert else (False,):
        written = _written(token_block_quant_kernel, t_ptr=torch.empty(M_, C, dtype=torch.bfloat16),
                           q_ptr=torch.empty(C, blocks * bm, dtype=torch.float8_e4m3fn),
                           s_ptr=torch.empty(blocks, C), offs_ptr=offs, C=C, stride_tm=C, stride_qc=blocks * bm,
                           stride_sb=C, E=E_, E_POW2=E_, BLOCK_M=bm, BLOCK_C=32, PER_EXPERT=per_expert,
                           COLS_FAST=True, RCP=True, STEP_BLOCKS=step, PREFETCH=prefetch,
                           LARGEST_FIRST=largest_first, WIDE_KEYS=False)
        assert written == ["q_ptr", "s_ptr"]
    N_, K_ = 32, 32
    qdy = torch.empty(N_, blocks * bm, dtype=torch.float8_e4m3fn)
    qx = torch.empty(K_, blocks * bm, dtype=torch.float8_e4m3fn)
    # TMA: the token-block tiles as descriptors (torch's "stable" metadata), as the launcher passes them
    meta = {"dy_desc": ("stable", ([32, bm],)), "x_desc": ("stable", ([32, bm],))} if tma else None
    for expert_group in (0, 3):  # the expert-by-expert grid; the 1-D grid three experts at a time
        written = _written(grouped_wgrad_fp8_kernel, tma=meta, qdy_ptr=qdy, qx_ptr=qx,
                           dw_ptr=torch.empty(E_, N_, K_, dtype=torch.bfloat16), offs_ptr=offs,
                           sdy_ptr=torch.empty(blocks, N_), sx_ptr=torch.empty(blocks, K_), dy_desc=qdy, x_desc=qx,
                           N=N_, K=K_, stride_dyn=blocks * bm, stride_xk=blocks * bm, stride_we=N_ * K_,
                           stride_wn=K_, stride_wk=1, stride_sdy=N_, stride_sx=K_, E=E_, E_POW2=E_, BLOCK_M=bm,
                           BLOCK_N=32, BLOCK_K=32, PER_EXPERT=per_expert, TMA=tma, EXPERT_GROUP=expert_group)
        assert written == ["dw_ptr"]


@pytest.mark.parametrize("per_row,flat,pair,words,one_read", [
    (True, True, False, False, False), (True, False, False, False, False), (True, True, False, False, True),
    (False, True, False, False, False), (False, False, False, False, False), (False, True, True, False, False),
    (False, True, True, True, False)])
def test_weight_cast_writes_codes_and_scales_only(per_row, flat, pair, words, one_read):
    """Codes and scales only; with ``PAIR`` (``recipe_weights``) W^T's codes and scales too;
    ``WORDS`` (the pair): W^T's codes four a word (the stored values come from W's loads: W is
    not written); ``ONE_READ``: a channel unit's whole K in one tile."""
    E_, N_, K_ = 2, 64, 256
    written = _written(fp8_weight_quant_kernel, w_ptr=torch.empty(E_, N_, K_, dtype=torch.bfloat16),
                       q_ptr=torch.empty(E_, N_, K_, dtype=torch.float8_e4m3fn), s_ptr=torch.empty(E_, N_, 1),
                       E=E_, N=N_, K=K_, stride_we=N_ * K_, stride_wn=K_, stride_wk=1, stride_qe=N_ * K_,
                       stride_qn=K_, stride_qk=1, stride_se=N_, stride_sn=1, stride_sk=0,
                       BLOCK_N=16, BLOCK_K=256 if one_read else 128, PER_ROW=per_row, FLAT=flat, RCP=True,
                       qt_ptr=torch.empty(E_, K_, N_, dtype=torch.float8_e4m3fn), st_ptr=torch.empty(E_, 2, 1),
                       stride_qte=N_ * K_, stride_qtn=1, stride_qtk=N_, stride_ste=2, stride_stn=0, stride_stk=1,
                       PAIR=pair, WORDS=words, ONE_READ=one_read)
    assert written == (["q_ptr", "qt_ptr", "s_ptr", "st_ptr"] if pair else ["q_ptr", "s_ptr"])


@pytest.mark.parametrize("plain,scaled", [(True, False), (False, True), (True, True)])
def test_row_kernels_write_their_outputs_only(plain, scaled):
    """The permute gather (the layer's x is its source: a graph input that must stay unwritten),
    the slot combine and the SwiGLU backward."""
    from moe_ops.kernels import row_ops
    M_, H_, k = 8, 64, 2
    rows = torch.arange(M_, dtype=torch.int32)
    written = _written(row_ops.gather_rows_kernel, src=torch.empty(M_ // k, H_), sorted_rows=rows,
                       scale=torch.empty(M_), out=torch.empty(M_, H_), scaled=torch.empty(M_, H_), M=M_, H=H_,
                       stride_src=H_, stride_out=H_, stride_scaled=H_, TOP_K=k, WRITE_PLAIN=plain,
                       WRITE_SCALED=scaled, BLOCK_R=4, BLOCK_C=64)
    assert written == ["out"] * plain + ["scaled"] * scaled
    written = _written(row_ops.combine_slots_kernel, rows=torch.empty(M_, H_), pos=rows, weights=torch.empty(M_),
                       out=torch.empty(M_ // k, H_), T=M_ // k, H=H_, stride_rows=H_, stride_out=H_, TOP_K=k,
                       WEIGHTED=scaled, BLOCK_T=4, BLOCK_C=64)
    assert written == ["out"]
    written = _written(row_ops.swiglu_backward_kernel, gu=torch.empty(M_, 2 * H_), dzh=torch.empty(M_, H_),
                       rw=torch.empty(M_), dgu=torch.empty(M_, 2 * H_), per_row=torch.empty(M_),
                       h=torch.empty(M_, H_), M=M_, I=H_, stride_gu=2 * H_, stride_dzh=H_, stride_dgu=2 * H_,
                       stride_h=H_, WRITE_H=plain, BLOCK_R=4, BLOCK_C=64)
    assert written == sorted(["dgu", "per_row"] + ["h"] * plain)


def test_tuned_launch_passes_every_constexpr(monkeypatch):
    """The opt-in tuner's launch (``triton.autotune`` over candidate tiles) names every constexpr
    of the kernel, defaulted ones included, between its arguments and each candidate's config:
    Inductor's launcher for a user-defined autotuned kernel takes them all (a missing TMA_X /
    TMA_W failed ``mode="max-autotune"`` on the GPU)."""
    from moe_ops.lowering import autotune
    monkeypatch.setattr(autotune, "enabled", lambda: True)
    x, w = torch.randn(300, 128).bfloat16(), torch.randn(4, 96, 128).bfloat16()
    offs = torch.tensor([50, 50, 200, 300], dtype=torch.int32)
    launches = _launches(monkeypatch, lambda: dispatch.grouped_mm(x, w, None, None, offs, "none", "none", 0, "none",
                                                                   "none"))
    (tuner, named), = launches
    assert isinstance(tuner, triton.runtime.autotuner.Autotuner) and len(tuner.configs) > 1
    kernel = tuner.fn
    constexprs = {kernel.arg_names[i] for i in kernel.constexprs}
    for cfg in tuner.configs:
        assert constexprs - set(named) - set(cfg.kwargs) == set()


@pytest.mark.parametrize("half_m", [False, True])
@pytest.mark.parametrize("dgrad", [False, True])
def test_persistent_launch_writes_its_output_only(dgrad, half_m, monkeypatch):
    """The persistent 16-bit kernel that prefill-sized calls take on TMA devices (more than 64
    rows per expert; ``choose_persistent_config``), x and W as descriptors (and with
    ``half_m`` x's half-height one): only ``y`` is written."""
    seen = []
    if half_m:
        choose = dispatch.choose_persistent_config
        monkeypatch.setattr(dispatch, "choose_persistent_config",
                            lambda *a, **k: dataclasses.replace(choose(*a, **k), half_m=True))
    monkeypatch.setattr(dispatch.launch, "tma_device", lambda t: True)
    monkeypatch.setattr(dispatch.persistent_gemm, "_programs", lambda x, bound: 132)  # an SM count, not a GPU's
    monkeypatch.setattr(dispatch.launch, "launch",
                        lambda kernel, grid, kwargs, descriptors, **o: seen.append((kernel, kwargs, descriptors)))
    w = torch.randn(4, 192, 128).bfloat16()
    offs = torch.tensor([50, 50, 200, 300], dtype=torch.int32)
    if dgrad:
        dispatch.grouped_mm_dgrad(torch.randn(300, 192).bfloat16(), w, None, None, offs, "none", "none", 0, "none")
    else:
        dispatch.grouped_mm(torch.randn(300, 128).bfloat16(), w, None, None, offs, "none", "none", 0, "none", "none")
    (kernel, kw, descs), = seen
    assert kernel.fn.__name__ == "persistent_grouped_kernel" and kw["HALF_M"] == half_m
    assert set(descs) == {"x_desc", "w_desc"} | ({"x_half_desc"} if half_m else set())
    assert kw["W_T"] == dgrad
    meta = {n: ("stable", (list(block),)) for n, (_, block) in descs.items()}
    assert _written(kernel, tma=meta, **kw, **{n: t for n, (t, _) in descs.items()}) == ["y_ptr"]


@pytest.mark.parametrize("fmt,act,code_dtype,act_code", [("fp8_e4m3", "fp8_token", torch.float8_e4m3fn, 2),
                                                      ("int8_sym", "int8_token", torch.int8, 1)])
def test_persistent_codes_launch_writes_its_output_only(fmt, act, code_dtype, act_code, monkeypatch):
    """The persistent kernel's 8-bit code paths (fp8_token x channel-scaled e4m3 W, ACT 2;
    int8_token x channel-scaled int8_sym W, ACT 1; 600 rows per expert): the scales are read,
    only ``y`` is written."""
    seen = []
    monkeypatch.setattr(dispatch.launch, "tma_device", lambda t: True)
    monkeypatch.setattr(dispatch.persistent_gemm, "_programs", lambda x, bound: 132)
    monkeypatch.setattr(dispatch.launch, "launch",
                        lambda kernel, grid, kwargs, descriptors, **o: seen.append((kernel, kwargs, descriptors)))
    m, k = 1200, 256
    q = moe_ops.quantize_weight(torch.randn(2, 64, k), fmt, "channel", 0).op_args()
    xq, xs = torch.empty(m, k, dtype=code_dtype), torch.empty(m, 1)
    dispatch.grouped_mm(torch.empty(m, k).bfloat16(), *q[:3], torch.tensor([600, 1200], dtype=torch.int32), *q[3:],
                        act, "none", prequantized=(xq, xs))
    (kernel, kw, descs), = seen
    assert kernel.fn.__name__ == "persistent_grouped_kernel" and kw["ACT"] == act_code and kw["xs_ptr"] is xs
    meta = {n: ("stable", (list(block),)) for n, (_, block) in descs.items()}
    assert _written(kernel, tma=meta, **kw, **{n: t for n, (t, _) in descs.items()}) == ["y_ptr"]
