"""The fused expert MLP operator: against a per-token loop over dequantized weights (every
format and activation mode), its recomputing backward against autograd through the unfused
composition (every format: x and routing-weight grads; plain weights and recipes: weight
grads too), gradcheck in float64, opcheck, errors, and the MoE module built on it."""
import pytest
import torch
import torch.nn.functional as F

import moe_ops
from moe_ops import expert_mlp as em
from helpers import BOUND, rel_err, weight_cases
from test_errors import _both
from test_opcheck import _check

ops = torch.ops.moe_ops
T, H, I, E, K_TOP = 19, 64, 32, 5, 2


def _routing(seed, drop=True):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(T, E, generator=g)
    logits[:, 2] = -1e4  # expert 2 gets no rows
    w, ids = ops.topk_route(logits, K_TOP, "softmax", True)
    if drop:
        ids[4, 1] = E  # a dropped slot
    rows, offs = ops.sort_rows(ids, E)
    return g, w, ids, rows, offs


def _weights(g, fmt, gran, gs, dtype):
    w1 = (torch.randn(E, 2 * I, H, generator=g) * H ** -0.5).to(dtype)
    w2 = (torch.randn(E, H, I, generator=g) * I ** -0.5).to(dtype)
    if fmt == "none":
        return w1, w2, (w1, None, None), (w2, None, None)
    q1, q2 = (moe_ops.quantize_weight(w, fmt, gran, gs) for w in (w1, w2))
    return moe_ops.dequantize_weight(q1), moe_ops.dequantize_weight(q2), q1.op_args()[:3], q2.op_args()[:3]


def _loop(x, w, ids, w1, w2):
    """float64 per token and slot: sum_j w[t, j] * W2[e] @ (silu(g) * u), dropped slots skipped."""
    out = torch.zeros(x.shape, dtype=torch.float64)
    for t in range(x.shape[0]):
        for j in range(ids.shape[1]):
            e = int(ids[t, j])
            if e >= E:
                continue
            gu = w1[e].double() @ x[t].double()
            out[t] += float(w[t, j]) * (w2[e].double() @ (F.silu(gu[:I]) * gu[I:]))
    return out


def _args(x, w, rows, offs, a1, a2, fmt, gran, gs, act="none", recipe="none"):
    return (x, w, rows, offs, *a1, *a2, fmt, gran, gs, gs, act, recipe)


@pytest.mark.parametrize("fmt,gran,gs", [("none", "none", 0)] + weight_cases())
def test_forward_every_format_against_loop(fmt, gran, gs):
    g, w, ids, rows, offs = _routing(hash((fmt, gran)) % 997)
    x = torch.randn(T, H, generator=g, dtype=torch.bfloat16)
    d1, d2, a1, a2 = _weights(g, fmt, gran, gs, torch.bfloat16)
    out = ops.expert_mlp(*_args(x, w, rows, offs, a1, a2, fmt, gran, gs))
    assert out.dtype == torch.bfloat16 and out.shape == (T, H)
    # two bf16 roundings of intermediates (gate/up, h) and the output: 3 x bf16's bound
    assert rel_err(out, _loop(x, w, ids, d1, d2)) < 3 * BOUND[torch.bfloat16]


@pytest.mark.parametrize("fmt,gran,act,bound", [("int8_sym", "channel", "int8_token", 2e-2),
                                                ("int4_asym", "group", "int8_token", 2e-2),
                                                ("fp8_e4m3", "block", "fp8_1x128", 8e-2),
                                                ("fp8_e5m2", "channel", "fp8_token", 8e-2)])
def test_forward_quantized_activations(fmt, gran, act, bound):
    """Quantized activations add int8 (1/254 of the row range per value) or e4m3 (2^-4
    relative) rounding of x and h to the weights' own: bounds against the 16-bit loop."""
    g, w, ids, rows, offs = _routing(7)
    x = torch.randn(T, H, generator=g)
    d1, d2, a1, a2 = _weights(g, fmt, gran, 32, torch.float32)
    out = ops.expert_mlp(*_args(x, w, rows, offs, a1, a2, fmt, gran, 32 if gran == "group" else 0, act))
    assert rel_err(out, _loop(x, w, ids, d1, d2)) < bound


def _unfused(x, w, rows, offs, w1, s1, z1, w2, s2, z2, fmt, gran, gs1, gs2, act, recipe):
    """The same signature as expert_mlp, through the unfused operators."""
    xs = ops.permute(x, rows, K_TOP)
    gate, up = ops.grouped_mm(xs, w1, s1, z1, offs, fmt, gran, gs1, act, recipe).chunk(2, dim=-1)
    y = ops.grouped_mm(F.silu(gate) * up, w2, s2, z2, offs, fmt, gran, gs2, act, recipe)
    return ops.unpermute(y, rows, w)


@pytest.mark.parametrize("fmt,gran,gs,act", [("none", "none", 0, "none")] +
                         [(f, g, s, "none") for f, g, s in weight_cases()] +
                         [("int8_sym", "channel", 0, "int8_token"), ("fp8_e4m3", "block", 0, "fp8_1x128")])
def test_backward_matches_unfused_autograd(fmt, gran, gs, act):
    """The recomputing backward (x and routing-weight grads; weight grads for plain weights)
    against autograd through permute -> grouped_mm -> SwiGLU -> grouped_mm -> unpermute."""
    g, w0, ids, rows, offs = _routing(hash((fmt, gran, act)) % 997)
    x0 = torch.randn(T, H, generator=g)
    _, _, a1, a2 = _weights(g, fmt, gran, gs, torch.float32)
    dout = torch.randn(T, H, generator=g)
    grads = []
    for fn in (ops.expert_mlp, _unfused):
        x, w = x0.clone().requires_grad_(), w0.clone().requires_grad_()
        b1 = (a1[0].clone().requires_grad_(),) + a1[1:] if fmt == "none" else a1
        b2 = (a2[0].clone().requires_grad_(),) + a2[1:] if fmt == "none" else a2
        fn(*_args(x, w, rows, offs, b1, b2, fmt, gran, gs, act)).backward(dout)
        grads.append([x.grad, w.grad] + ([b1[0].grad, b2[0].grad] if fmt == "none" else []))
    for a, b in zip(*grads):
        assert rel_err(a, b) < 1e-5
    assert torch.all(grads[0][1][4, 1] == 0)  # the dropped slot's weight gets no gradient


@pytest.mark.parametrize("recipe", ["fp8_rowwise", "fp8_blockwise"])
def test_backward_recipes_match_unfused_autograd(recipe):
    g, w0, ids, rows, offs = _routing(11, drop=False)
    x0 = torch.randn(T, H, generator=g)
    w1 = torch.randn(E, 2 * I, H, generator=g) * H ** -0.5
    w2 = torch.randn(E, H, I, generator=g) * I ** -0.5
    dout = torch.randn(T, H, generator=g)
    grads = []
    for fn in (ops.expert_mlp, _unfused):
        ts = [t.clone().requires_grad_() for t in (x0, w0, w1, w2)]
        fn(*_args(ts[0], ts[1], rows, offs, (ts[2], None, None), (ts[3], None, None), "none", "none", 0,
                  recipe=recipe)).backward(dout)
        grads.append([t.grad for t in ts])
    for a, b in zip(*grads):
        # the recomputed gate/up output is the forward's own (same quantized operands)
        assert rel_err(a, b) < 1e-5


class _OpLog(torch.utils._python_dispatch.TorchDispatchMode):
    """Records the moe_ops operators called (outermost calls only) and their arguments."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.namespace == "moe_ops":
            self.calls.append((func.__name__.split(".")[0], args))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("recipe", ["fp8_rowwise", "fp8_blockwise"])
def test_backward_recipe_casts_each_weight_once(recipe):
    """Backward runs its weight GEMMs on one ``recipe_weights`` cast per weight: no GEMM with the
    recipe (which would cast W again), no weight cast besides the two."""
    g, w0, ids, rows, offs = _routing(12, drop=False)
    ts = [torch.randn(T, H, generator=g), w0, torch.randn(E, 2 * I, H, generator=g) * H ** -0.5,
          torch.randn(E, H, I, generator=g) * I ** -0.5]
    ts = [t.clone().requires_grad_() for t in ts]
    out = ops.expert_mlp(*_args(ts[0], ts[1], rows, offs, (ts[2], None, None), (ts[3], None, None), "none",
                                "none", 0, recipe=recipe))
    with _OpLog() as log:
        out.backward(torch.randn(T, H, generator=g))
    casts = [a[0] for name, a in log.calls if name == "recipe_weights"]
    assert len(casts) == 2 and casts[0] is not casts[1]
    assert {tuple(c.shape) for c in casts} == {(E, 2 * I, H), (E, H, I)}
    gemms = [(name, a) for name, a in log.calls if name.startswith("grouped_mm")]
    assert sum(name == "grouped_mm" for name, _ in gemms) == 4  # gu, dout @ W2, y_r, dgu @ W1
    assert sum(name == "grouped_mm_wgrad" for name, _ in gemms) == 2
    for name, a in gemms:
        if name == "grouped_mm":
            # on the cast codes; the recipe argument (trailing default) absent or "none"
            assert a[5] == "fp8_e4m3" and (len(a) < 10 or a[9] == "none"), a[5:]
    assert all(name != "grouped_mm_dgrad" for name, _ in gemms)


def test_gradcheck_float64():
    g = torch.Generator().manual_seed(5)
    t_, h_, i_, e_, k_ = 6, 8, 4, 3, 2
    w, ids = ops.topk_route(torch.randn(t_, e_, generator=g, dtype=torch.float64), k_, "softmax", True)
    rows, offs = ops.sort_rows(ids, e_)
    x = torch.randn(t_, h_, generator=g, dtype=torch.float64, requires_grad=True)
    w1 = torch.randn(e_, 2 * i_, h_, generator=g, dtype=torch.float64, requires_grad=True)
    w2 = torch.randn(e_, h_, i_, generator=g, dtype=torch.float64, requires_grad=True)
    w = w.detach().requires_grad_()
    torch.autograd.gradcheck(lambda a, b, c, d: ops.expert_mlp(a, b, rows, offs, c, None, None, d, None, None),
                             (x, w, w1, w2))


@pytest.mark.parametrize("fmt,gran,act", [("none", "none", "none"), ("int4_asym", "group", "none"),
                                          ("int8_sym", "channel", "int8_token")])
def test_opcheck_expert_mlp(fmt, gran, act):
    g, w, ids, rows, offs = _routing(13)
    x = torch.randn(T, H, generator=g, requires_grad=True)
    _, _, a1, a2 = _weights(g, fmt, gran, 32, torch.float32)
    if fmt == "none":
        a1, a2 = (a1[0].requires_grad_(),) + a1[1:], (a2[0].requires_grad_(),) + a2[1:]
    gs = 32 if gran == "group" else 0
    _check(ops.expert_mlp.default, _args(x, w.requires_grad_(), rows, offs, a1, a2, fmt, gran, gs, act))


def test_expert_mlp_errors_name_the_argument():
    g, w, ids, rows, offs = _routing(17)
    x = torch.randn(T, H)
    w1, w2 = torch.randn(E, 2 * I, H), torch.randn(E, H, I)
    base = dict(x=x, tw=w, rows=rows, offs=offs, w1=w1, s1=None, z1=None, w2=w2, s2=None, z2=None, f="none",
                g="none", gs1=0, gs2=0, act="none", rec="none")

    def call(**over):
        return list({**base, **over}.values())
    _both(ops.expert_mlp, call(w2=torch.randn(E, H, I + 1)), ValueError, r"^w2: expected logical shape")
    _both(ops.expert_mlp, call(w1=torch.randn(E, 2 * I + 1, H)), ValueError, r"^w1: needs 2 \* I out-features")
    _both(ops.expert_mlp, call(w1=torch.randn(E, 2 * I, H + 1)), ValueError, r"^w1: has K=65 in-features")
    _both(ops.expert_mlp, call(tw=w[:5]), ValueError, r"^topk_weights: has 5 rows")
    q1, q2 = (moe_ops.quantize_weight(t, "int4_sym", "group", 32) for t in (w1, w2))
    _both(ops.expert_mlp, call(w1=q1.data, s1=q1.scale, w2=q2.data, s2=q2.scale, f="int4_sym", g="group", gs1=32,
                               gs2=64), ValueError, r"^group_size2: 64 does not divide K=32")
    _both(ops.expert_mlp, call(w1=q1.data, s1=None, w2=q2.data, s2=q2.scale, f="int4_sym", g="group", gs1=32,
                               gs2=32), ValueError, r"^w1_scale: format int4_sym needs float32 scales")


# ----------------------------------------------------------------------------- the MoE module
def test_moe_fused_auto_picks_by_autograd():
    """``fused="auto"``: the composition when training (train mode, autograd wanting a
    gradient), the fused operator otherwise (eval mode, no_grad, nothing requiring grad);
    ``True`` / ``False`` force one path; anything else is an error naming ``fused``."""
    calls = []

    class _Log(torch.utils._python_dispatch.TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            calls.append(func.__name__.split(".")[0])
            return func(*args, **(kwargs or {}))

    def ops_called(m, x, grad):
        calls.clear()
        with _Log(), torch.set_grad_enabled(grad):
            m(x)
        return {"expert_mlp", "permute"} & set(calls)

    m = moe_ops.MoE(H, I, E, 2)
    x = torch.randn(5, H)
    assert m.fused == "auto"
    assert ops_called(m, x, grad=False) == {"expert_mlp"}
    assert ops_called(m, x, grad=True) == {"permute"}  # the parameters require grad
    m.eval()
    assert ops_called(m, x, grad=True) == {"expert_mlp"}
    m.train()
    m.requires_grad_(False)
    assert ops_called(m, x, grad=True) == {"expert_mlp"}
    assert ops_called(m, x.requires_grad_(), grad=True) == {"permute"}
    m.fused = True
    assert ops_called(m, x, grad=True) == {"expert_mlp"}
    m.fused = False
    assert ops_called(m, x.detach(), grad=False) == {"permute"}
    with pytest.raises(ValueError, match="^fused: expected True, False or 'auto', got 'yes'"):
        moe_ops.MoE(H, I, E, 2, fused="yes")


@pytest.mark.parametrize("style", ["qwen3", "mixtral", "deepseek_v3"])
def test_moe_styles_fused_equals_unfused(style):
    kw = dict(shared_intermediate=16) if style == "deepseek_v3" else {}
    m = moe_ops.MoE.from_style(style, H, I, E, 2, seed=1, fused=True, **kw)
    if m.e_score_bias is not None:
        m.e_score_bias.copy_(torch.randn(E) * 0.1)
    x = torch.randn(3, 7, H, requires_grad=True)
    y = m(x)
    assert y.shape == x.shape
    y.pow(2).sum().backward()
    gx, gw = x.grad.clone(), m.gate_up.weight.grad.clone()
    x.grad = None
    m.zero_grad()
    m.fused = False
    y2 = m(x)
    y2.pow(2).sum().backward()
    assert rel_err(y.detach(), y2.detach()) < 1e-6 and rel_err(x.grad, gx) < 1e-5 and rel_err(m.gate_up.weight.grad, gw) < 1e-5


def test_deepseek_style_matches_loop():
    """sigmoid scores, selection bias, renormalised weights times the routed scaling, plus the
    shared expert."""
    m = moe_ops.MoE.from_style("deepseek_v3", H, I, E, 2, seed=2, shared_intermediate=16)
    m.e_score_bias.copy_(torch.randn(E) * 0.3)
    x = torch.randn(T, H)
    with torch.no_grad():
        y = m(x)
        p = torch.sigmoid(m.router(x).double())
        ids = torch.sort(p + m.e_score_bias.double(), dim=-1, descending=True, stable=True).indices[:, :2]
        w = p.gather(1, ids)
        w = w / w.sum(-1, keepdim=True) * 2.5
        ref = _loop(x, w, ids, m.gate_up.weight, m.down.weight) + m.shared(x).double()
    assert rel_err(y, ref) < BOUND[torch.float32] * 10
