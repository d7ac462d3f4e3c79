"""GPU tests of the MoE layer path (marked ``gpu``): the fused expert MLP kernels at
Qwen3-30B-A3B-like scale against the float64 oracle for every weight family and W8A8, the
backward against the CPU, routing determinism, and decode of the layer under
``torch.compile(mode="reduce-overhead")`` (CUDA graphs) with the sync-debug mode at error."""
import pytest
import torch

import moe_ops
from moe_ops.kernels import dispatch
from moe_ops.lowering.kernel_choice import KernelConfig
from helpers import rel_err, replays_without_sync, spy_tma_operands, tma_capable

DEV = "cuda" if torch.cuda.is_available() else ("xpu" if hasattr(torch, "xpu") and torch.xpu.is_available() else None)
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(DEV is None, reason="needs a CUDA or XPU device")]
ops = torch.ops.moe_ops
H, I, E, K_TOP = 2048, 768, 32, 8  # Qwen3-30B-A3B hidden/intermediate sizes, 32 experts (CPU oracle size)


def _routing(T, seed):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(T, E, generator=g) + 1.5 * torch.randn(E, generator=g)  # skewed
    logits[:, 5] = -1e4  # an empty expert
    w, ids = ops.topk_route(logits, K_TOP, "softmax", True)
    ids[0, -1] = E  # a dropped slot
    rows, offs = ops.sort_rows(ids, E)
    return g, w, rows, offs


def _weights(g, fmt, gran, gs):
    w1 = (torch.randn(E, 2 * I, H, generator=g) * H ** -0.5).bfloat16()
    w2 = (torch.randn(E, H, I, generator=g) * I ** -0.5).bfloat16()
    if fmt == "none":
        return (w1, None, None), (w2, None, None)
    return tuple(moe_ops.quantize_weight(w, fmt, gran, gs).op_args()[:3] for w in (w1, w2))


def _dev(t):
    return None if t is None else t.to(DEV)


CASES = [("none", "none", 0, "none"), ("int4_asym", "group", 128, "none"), ("int4_sym", "channel", 0, "none"),
         ("int8_asym", "group", 128, "none"), ("fp8_e4m3", "block", 0, "none"), ("fp8_e5m2", "channel", 0, "none"),
         ("int2_asym", "group", 128, "none"), ("int8_sym", "channel", 0, "int8_token"),
         ("int4_asym", "group", 128, "int8_token"), ("fp8_e4m3", "block", 0, "fp8_1x128")]


def _check_fused(fmt, gran, gs, act, T, configs=None):
    """The fused expert MLP on the device (table tiles, or ``configs`` = (gate/up, down)) against
    the float64 oracle, on fresh data, freed blocks poisoned between a warm-up call and the
    checked one."""
    g, w, rows, offs = _routing(T, hash((fmt, gran, act, T, configs)) % 10000)
    x = torch.randn(T, H, generator=g).bfloat16()
    a1, a2 = _weights(g, fmt, gran, gs)
    args = (_dev(x), _dev(w), _dev(rows), _dev(offs), *map(_dev, a1), *map(_dev, a2), fmt, gran, gs, gs, act, "none")
    if configs is None:
        run = lambda: ops.expert_mlp(*args)  # noqa: E731
    else:
        run = lambda: dispatch.expert_mlp(*args, configs=configs)  # noqa: E731
    out = run()
    torch.full((T * K_TOP, H), float("nan"), dtype=torch.bfloat16, device=DEV)  # poison freed blocks
    out = run().cpu()
    assert not torch.isnan(out).any()
    # oracle: the unfused reference composition on the CPU in float64 (plain weights in float64,
    # quantized ones dequantized by the reference in float64)
    if fmt == "none":
        a1, a2 = (a1[0].double(), None, None), (a2[0].double(), None, None)
    ref = moe_ops.expert_mlp.composed(x.double(), w.double(), rows, offs, *a1, *a2, fmt, gran, gs, gs, act, "none")
    bound = {"none": 1.6e-2, "int8_token": 3e-2, "fp8_1x128": 4e-2}[act]  # CPU bf16 x: 5e-3, 1.1e-2, 1.7e-2
    assert rel_err(out, ref) < bound, rel_err(out, ref)


# 128 rows per expert (prefill tiles), 24 (weight-only int4/int2/int8/fp8 on Hopper: the
# composition's 64-row TMA tiles), decode, and 1/4 row per expert (int4/int2 gate/up on the CUDA
# cores, KernelConfig.gemv)
@pytest.mark.parametrize("T", [512, 96, 3, 1])
@pytest.mark.parametrize("fmt,gran,gs,act", CASES)
def test_fused_expert_mlp(fmt, gran, gs, act, T):
    _check_fused(fmt, gran, gs, act, T)
    from moe_ops import formats
    from moe_ops.lowering.kernel_choice import fused_expert_mlp_pays
    bits = 16 if fmt == "none" else formats.get_format(fmt).bits
    if not fused_expert_mlp_pays(T * K_TOP, E, bits, 8 if act != "none" else 16, tma_capable(), tma_capable()):
        # the op ran its composition (on Hopper int4/int2 above 16 rows an expert, int8/fp8 at
        # 17-64): the fused launches with the table's tiles on the same shape too
        _check_fused(fmt, gran, gs, act, T, dispatch.expert_mlp_configs(T * K_TOP, H, I, E, fmt, gran, gs, gs, act))


def test_weight_only_prefill_above_512_rows_runs_the_composition():
    """640 rows an expert, int4: the op runs its composition (``fused_expert_mlp_pays``), still
    against the float64 oracle; the fused launches with the table's tiles on the same data too."""
    from moe_ops.lowering.kernel_choice import fused_expert_mlp_pays
    T = 2560
    assert not fused_expert_mlp_pays(T * K_TOP, E, 4, 16)
    _check_fused("int4_asym", "group", 128, "none", T)
    cfgs = dispatch.expert_mlp_configs(T * K_TOP, H, I, E, "int4_asym", "group", 128, 128, "none")
    _check_fused("int4_asym", "group", 128, "none", T, cfgs)


# the gate/up launch with gate and up rows in one K loop (KernelConfig.one_loop), prefill and
# decode tiles, the weight as either MMA operand; the down launch at its table tile
ONE_LOOP = {512: [KernelConfig(128, 64, 64, 8, 3, one_loop=True), KernelConfig(64, 64, 64, 4, 4, one_loop=True,
                                                                                 w_lhs=True)],
            3: [KernelConfig(16, 32, 128, 4, 3, group_m=1, one_loop=True),
                KernelConfig(16, 32, 128, 4, 4, group_m=1, one_loop=True, w_lhs=True)]}


@pytest.mark.parametrize("which", [0, 1])
@pytest.mark.parametrize("T", [512, 3])
@pytest.mark.parametrize("fmt,gran,gs,act", [CASES[i] for i in (0, 1, 4, 6, 7)])
def test_fused_expert_mlp_one_loop(fmt, gran, gs, act, T, which):
    down = dispatch.expert_mlp_configs(T * K_TOP, H, I, E, fmt, gran, gs, gs, act)[1]
    _check_fused(fmt, gran, gs, act, T, (ONE_LOOP[T][which], down))


# the down launch token-major with the combine (packed codes and 16-bit weights; the table's
# choice up to 1/8 row per expert, below this test's 1/4 at T=1): the table's tiles and others
COMBINE = [KernelConfig(1, 16, 128, 8, 2, group_m=1, gemv=True, combine=True),
           KernelConfig(1, 32, 64, 8, 3, group_m=1, gemv=True, combine=True),
           KernelConfig(1, 4, 128, 2, 1, group_m=1, gemv=True, combine=True),
           KernelConfig(1, 8, 64, 8, 2, group_m=1, gemv=True, combine=True)]


@pytest.mark.parametrize("cfg", range(len(COMBINE)))
@pytest.mark.parametrize("T", [3, 1])
@pytest.mark.parametrize("fmt,gran,gs,act", [CASES[i] for i in (0, 1, 2, 6)])
def test_fused_expert_mlp_combine(fmt, gran, gs, act, T, cfg):
    gate_up = dispatch.expert_mlp_configs(T * K_TOP, H, I, E, fmt, gran, gs, gs, act)[0]
    _check_fused(fmt, gran, gs, act, T, (gate_up, COMBINE[cfg]))


# the packed-code gate/up gemv tile, one loop, two K tiles a step, its weight words prefetched one
# and two steps ahead (the table's depth at H >= 4096), at T=1 with the table's down launch
@pytest.mark.parametrize("stages", [2, 3])
@pytest.mark.parametrize("fmt,gran,gs,act", [CASES[i] for i in (1, 2, 6)])
def test_fused_expert_mlp_gemv_prefetch(fmt, gran, gs, act, stages):
    down = dispatch.expert_mlp_configs(K_TOP, H, I, E, fmt, gran, gs, gs, act)[1]
    gate_up = KernelConfig(1, 16, 128, 4, stages, group_m=1, gemv=True, one_loop=True, k_split=2)
    _check_fused(fmt, gran, gs, act, 1, (gate_up, down))


# the gathered two-loop gate/up decode tile (the table's for int4/int2 weight-only over half a row
# per expert: 16x64 at T=3, 16x128 at T=16, 4 rows per expert here) with W's packed codes by TMA (x
# by pointers), 3 stages, as the table gives it (tune_moe_layer.py --tma-gate-up, benchmarks/NOTES.md
# sessions 30-31); and its pointer-load twin
@pytest.mark.parametrize("tma", [True, False])
@pytest.mark.parametrize("T", [3, 16])
@pytest.mark.parametrize("fmt,gran,gs,act", [CASES[i] for i in (1, 2, 6)])
def test_fused_expert_mlp_gate_up_tma(fmt, gran, gs, act, T, tma, monkeypatch):
    gate_up, down = dispatch.expert_mlp_configs(T * K_TOP, H, I, E, fmt, gran, gs, gs, act)
    assert gate_up.w_lhs and gate_up.decode and not gate_up.one_loop and gate_up.tma and gate_up.num_stages == 3
    assert gate_up.block_n == (128 if T == 16 else 64)
    seen = spy_tma_operands(monkeypatch)
    _check_fused(fmt, gran, gs, act, T, (KernelConfig(**{**gate_up.__dict__, "tma": tma}), down))
    if tma and tma_capable():
        assert (False, 1) in seen, seen  # the gate/up launch: W's codes by TMA, x gathered by pointers


# the row-tile down launch summing the slots itself (slot_sum) against the oracle, where the table
# takes it (T 1, 3, 16: up to 128 rows) and past it (T 40: the last program sums 40 tokens in
# three 16-token steps), tensor-core, w_lhs TMA and 8-bit tiles; then against the same launch with
# the separate sum, and bitwise-equal over repeated calls (the counters' last program changes, its
# sum's order does not)
@pytest.mark.parametrize("T", [1, 16, 40])
@pytest.mark.parametrize("fmt,gran,gs,act", [CASES[i] for i in (0, 1, 4, 7)])
def test_fused_expert_mlp_slot_sum(fmt, gran, gs, act, T):
    gate_up, down = dispatch.expert_mlp_configs(T * K_TOP, H, I, E, fmt, gran, gs, gs, act)
    assert down.decode and not down.combine  # E=32: a row-tile down launch at every T here
    down = KernelConfig(**{**down.__dict__, "slot_sum": True})
    _check_fused(fmt, gran, gs, act, T, (gate_up, down))
    g, w, rows, offs = _routing(T, 17 + T)
    a1, a2 = _weights(g, fmt, gran, gs)
    x = torch.randn(T, H, generator=g).bfloat16()
    args = (_dev(x), _dev(w), _dev(rows), _dev(offs), *map(_dev, a1), *map(_dev, a2), fmt, gran, gs, gs, act, "none")
    first = dispatch.expert_mlp(*args, configs=(gate_up, down))
    for _ in range(3):
        assert torch.equal(dispatch.expert_mlp(*args, configs=(gate_up, down)), first)
    separate = dispatch.expert_mlp(*args, configs=(gate_up, KernelConfig(**{**down.__dict__, "slot_sum": False})))
    # float32 sums of the same bf16 rows in possibly other orders, each rounded to bf16 once
    assert torch.allclose(first.float(), separate.float(), rtol=8e-3, atol=1e-6)


# 8-bit weight-only down launch in the 16-row w_lhs tile with x (the intermediate) and w2's stored
# tile by TMA: the forward table's tile for K under 2048, which tune_moe_layer.py --tma-down times in
# the fused MLP (where the table keeps 8-bit weights' pointer tile: no gain measured)
@pytest.mark.parametrize("T", [3, 16])
@pytest.mark.parametrize("fmt,gran,gs,act", [CASES[i] for i in (3, 4, 5)])
def test_fused_expert_mlp_8bit_down_tma(fmt, gran, gs, act, T, monkeypatch):
    if not tma_capable():
        pytest.skip("TMA needs CUDA capability 9.0 or later")
    seen = spy_tma_operands(monkeypatch)
    gate_up = dispatch.expert_mlp_configs(T * K_TOP, H, I, E, fmt, gran, gs, gs, act)[0]
    _check_fused(fmt, gran, gs, act, T, (gate_up, KernelConfig(16, 128, 128, 4, 3, group_m=1, w_lhs=True, tma=True)))
    assert (True, 1) in seen, seen  # the down launch: x and w2 by TMA


# bf16: rounding only (3e-2). FP8 recipes (backward on one ``recipe_weights`` cast per weight):
# fp8 codes flip where bf16 rounding moves an operand across a rounding boundary (measured
# 1.4-2.2%; the unfused bf16 composition, which rounds SwiGLU twice, is 2.8-3.0% from the fused one)
@pytest.mark.parametrize("recipe,T,bound", [("none", 256, 3e-2), ("fp8_rowwise", 512, 5e-2),
                                            ("fp8_blockwise", 512, 5e-2)])
def test_expert_mlp_backward_matches_cpu(recipe, T, bound):
    """bf16 on the GPU against float64 on the CPU (for a recipe, its emulation): grads of x,
    routing weights, w1 and w2."""
    g, w, rows, offs = _routing(T, 1 if recipe == "none" else 2)
    x = torch.randn(T, H, generator=g).bfloat16()
    (w1, _, _), (w2, _, _) = _weights(g, "none", "none", 0)
    dout = torch.randn(T, H, generator=g).bfloat16()
    grads = []
    for dev, dtype in ((DEV, torch.bfloat16), ("cpu", torch.float64)):
        ts = [t.to(dev, dtype).requires_grad_() for t in (x, w, w1, w2)]
        out = ops.expert_mlp(ts[0], ts[1], rows.to(dev), offs.to(dev), ts[2], None, None, ts[3], None, None,
                             recipe=recipe)
        out.backward(dout.to(dev, dtype))
        grads.append([t.grad.cpu().double() for t in ts])
    errs = {name: rel_err(a, b) for name, a, b in zip(("x", "topk_weights", "w1", "w2"), *grads)}
    print(recipe, errs)
    assert all(e < bound for e in errs.values()), errs


@pytest.mark.parametrize("T,dtype", [(4096, torch.bfloat16), (37, torch.float32)])
def test_permute_unpermute_rows_kernels(T, dtype):
    """permute / unpermute forward and backward through the row kernels against the CPU in
    float64: the gathers exact, the slot sums within the dtype's rounding."""
    g, w, rows, offs = _routing(T, 3)
    x = torch.randn(T, H, generator=g).to(dtype)
    y = torch.randn(T * K_TOP, H, generator=g).to(dtype)
    dout_p = torch.randn(T * K_TOP, H, generator=g).to(dtype)
    dout_u = torch.randn(T, H, generator=g).to(dtype)
    res = []
    for dev, dt in ((DEV, dtype), ("cpu", torch.float64)):
        xs, ys, ws = (t.to(dev, dt).requires_grad_() for t in (x, y, w))
        p = ops.permute(xs, rows.to(dev), K_TOP)
        u = ops.unpermute(ys, rows.to(dev), ws)
        torch.autograd.backward((p, u), (dout_p.to(dev, dt), dout_u.to(dev, dt)))
        res.append([t.detach().cpu().double() for t in (p, u, xs.grad, ys.grad, ws.grad)])
    assert torch.equal(res[0][0], res[1][0])  # a gather: exact
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    names = ("unpermute", "permute.grad", "unpermute.grad(y)", "unpermute.grad(w)")
    for name, a, b in zip(names, res[0][1:], res[1][1:]):
        assert rel_err(a, b) < tol, (name, rel_err(a, b))


# the sort path, the counting sort after the top-k launch, and one launch for both (T <= 16)
@pytest.mark.parametrize("T", [4096, 64, 16, 3, 1])
def test_routing_deterministic_and_sync_free(T):
    logits = torch.randn(T, 128, device=DEV)  # 128 experts
    torch.cuda.set_sync_debug_mode("error")
    try:
        a = moe_ops.route(logits, 8)
        b = moe_ops.route(logits, 8)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    for u, v in zip(a, b):
        assert torch.equal(u, v)
    ref = moe_ops.route(logits.cpu(), 8)
    assert torch.equal(a.ids.cpu(), ref.ids) and torch.equal(a.offs.cpu(), ref.offs)
    assert torch.equal(a.sorted_rows.cpu(), ref.sorted_rows)
    torch.testing.assert_close(a.weights.cpu(), ref.weights, rtol=1e-5, atol=1e-7)


def _cuda_kernels(fn) -> list:
    from torch.profiler import ProfilerActivity, profile
    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    return [e.name for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]


# Qwen3-30B-A3B's router (128 experts, H 2048) and DeepSeek-V3's hidden size over 32 experts
@pytest.mark.parametrize("Er,Hr", [(128, 2048), (32, 7168)])
@pytest.mark.parametrize("T", [1, 5, 16])
@pytest.mark.parametrize("scoring,bias", [("softmax", False), ("sigmoid", True)])
def test_router_route_one_launch(Er, Hr, T, scoring, bias):
    """The router GEMM + top-k + sort in one launch: logits within one bf16 rounding of the
    float64 product, the routing equal to the routing kernel's of those logits, two calls
    bitwise equal with no host sync, the semaphore back at 0, freed blocks poisoned first."""
    g = torch.Generator().manual_seed(Er * T + Hr)
    x = torch.randn(T, Hr, generator=g).bfloat16().to(DEV)
    wr = (torch.randn(Er, Hr, generator=g) * Hr ** -0.5 + 0.02 * torch.randn(Er, 1, generator=g)).bfloat16().to(DEV)
    b = (torch.randn(Er, generator=g) * 0.1).to(DEV) if bias else None
    sem = torch.zeros(1, dtype=torch.int32, device=DEV)
    torch.full((1 << 20,), float("nan"), device=DEV)  # poison freed blocks
    torch.cuda.set_sync_debug_mode("error")
    try:
        a = ops.router_route(x, wr, K_TOP, scoring, True, b, sem)
        c = ops.router_route(x, wr, K_TOP, scoring, True, b, sem)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert sem.item() == 0
    for u, v in zip(a, c):
        assert torch.equal(u, v)
    ref = x.double() @ wr.double().t()
    torch.testing.assert_close(a[0].double(), ref, rtol=2 ** -8, atol=1e-3)
    for got, want in zip(a[1:], ops.route(a[0], K_TOP, scoring, True, b)):
        assert torch.equal(got, want)
    names = _cuda_kernels(lambda: ops.router_route(x, wr, K_TOP, scoring, True, b, sem))
    assert len(names) == 1 and "router_topk_sort_kernel" in names[0], names


def test_router_route_compiled_is_one_launch():
    """Under torch.compile the generated code launches the one kernel itself, mutating the
    semaphore in place (no copy of it)."""
    from torch._inductor.utils import run_and_get_code
    torch._dynamo.reset()
    x = torch.randn(1, H, device=DEV, dtype=torch.bfloat16)
    wr = torch.randn(128, H, device=DEV, dtype=torch.bfloat16) * H ** -0.5
    sem = torch.zeros(1, dtype=torch.int32, device=DEV)
    f = torch.compile(lambda x, w, s: ops.router_route(x, w, K_TOP, "softmax", True, None, s), fullgraph=True)
    out, codes = run_and_get_code(f, x, wr, sem)
    launches = [ln.strip() for code in codes for ln in code.splitlines() if ".run(" in ln]
    assert len(launches) == 1 and "router_topk_sort" in launches[0], launches
    assert sem.item() == 0
    for u, v in zip(out, ops.router_route(x, wr, K_TOP, "softmax", True, None, sem)):
        assert torch.equal(u, v)


def test_moe_decode_routes_in_one_launch():
    """Without gradients, a GPU MoE layer's router GEMM and routing are the one launch: int4
    decode T=1 is three kernels (router + routing, gate/up, down with the combine)."""
    m = moe_ops.MoE.from_style("qwen3", H, I, 128, K_TOP, dtype=torch.bfloat16, seed=5).to(DEV)
    moe_ops.quantize_experts(m, "int4_asym", "group", 128)
    x = torch.randn(1, H, device=DEV, dtype=torch.bfloat16)
    with torch.no_grad():
        names = _cuda_kernels(lambda: m(x))
    assert len(names) == 3 and "router_topk_sort_kernel" in names[0], names
    names = _cuda_kernels(lambda: m(x))  # grad mode: nn.Linear, then the routing kernel
    assert "router_topk_sort_kernel" not in " ".join(names) and "topk_sort_kernel" in " ".join(names), names


@pytest.mark.parametrize("fmt", [None, "int4_asym", "int8_sym"])
def test_decode_reduce_overhead_no_sync(fmt):
    """Decode steps T=1 of a Qwen3-style layer compiled with CUDA graphs; the replayed steps run
    with the sync-debug mode at error and match eager."""
    torch._dynamo.reset()
    m = moe_ops.MoE.from_style("qwen3", H, I, E, K_TOP, dtype=torch.bfloat16, seed=3).to(DEV)
    if fmt is not None:
        moe_ops.quantize_experts(m, fmt, "group" if fmt == "int4_asym" else "channel", 128,
                                 act_quant="int8_token" if fmt == "int8_sym" else None)
    step = torch.compile(m, mode="reduce-overhead", fullgraph=True)
    xs = [torch.randn(1, H, device=DEV, dtype=torch.bfloat16) for _ in range(5)]
    from torch._dynamo.utils import counters
    counters.clear()
    replays_without_sync(step, m, xs, 1e-2)
    assert not counters["inductor"]["cudagraph_skips"], dict(counters["inductor"])  # CUDA graphs were used
