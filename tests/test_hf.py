"""transformers interop: tiny Qwen3-MoE and Mixtral models with random weights (no downloads);
their sparse-MoE blocks converted to moe_ops.MoE give the same logits (float32: to float32
rounding; bf16: within bf16 noise), and quantize_experts on the whole model stays within the
format's bound. Skipped cleanly where transformers is not installed."""
import io

import pytest
import torch

import moe_ops
from helpers import rel_err

transformers = pytest.importorskip("transformers")


def _tiny(kind, dtype):
    common = dict(vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=16, max_position_embeddings=64)
    torch.manual_seed(0)
    if kind == "qwen3_moe":
        cfg = transformers.Qwen3MoeConfig(num_experts=8, num_experts_per_tok=2, moe_intermediate_size=32,
                                          norm_topk_prob=True, **common)
        model = transformers.Qwen3MoeForCausalLM(cfg)
    else:
        cfg = transformers.MixtralConfig(num_local_experts=8, num_experts_per_tok=2, **common)
        model = transformers.MixtralForCausalLM(cfg)
    model = model.to(dtype).eval()
    with torch.no_grad():  # HF initialises some router weights to zero: make routing non-trivial
        for p in model.parameters():
            p.normal_(0, 0.05)
    return model


def _logits(model, ids):
    with torch.no_grad():
        return model(ids).logits.float()


@pytest.mark.parametrize("kind", ["qwen3_moe", "mixtral"])
@pytest.mark.parametrize("dtype,bound", [(torch.float32, 1e-6), (torch.bfloat16, 1e-3)])
def test_converted_model_same_logits(kind, dtype, bound):
    model = _tiny(kind, dtype)
    ids = torch.randint(0, 96, (2, 11), generator=torch.Generator().manual_seed(1))
    ref = _logits(model, ids)
    moe_ops.convert_hf_blocks(model)
    blocks = [m for m in model.modules() if isinstance(m, moe_ops.MoE)]
    assert len(blocks) == 2 and not any(moe_ops.hf.is_hf_moe_block(m) for m in model.modules())
    # bf16: the HF loop and our kernels round intermediates at different points; a changed
    # rounding can also flip a near-tied top-k choice, hence a bf16-noise bound on the logits
    assert rel_err(_logits(model, ids), ref) < bound


@pytest.mark.parametrize("kind", ["qwen3_moe", "mixtral"])
def test_quantize_experts_on_hf_model(kind):
    model = _tiny(kind, torch.float32)
    ids = torch.randint(0, 96, (2, 11), generator=torch.Generator().manual_seed(2))
    ref = _logits(model, ids)
    moe_ops.quantize_experts(model, "int8_sym", "channel", act_quant="int8_token")
    q = _logits(model, ids)
    assert rel_err(q, ref) < 1e-3  # int8 weights and per-token int8 activations (measured 2e-5, 4e-5)
    # state_dict round trip of the converted, quantized model
    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    buf.seek(0)
    fresh = _tiny(kind, torch.float32)
    moe_ops.quantize_experts(fresh, "int8_sym", "channel", act_quant="int8_token")
    fresh.load_state_dict(torch.load(buf))
    assert torch.equal(_logits(fresh, ids), q)


@pytest.mark.parametrize("kind", ["qwen3_moe", "mixtral"])
@pytest.mark.parametrize("dtype,fmt,bound", [(torch.float32, None, 1e-5), (torch.bfloat16, None, 1.5e-2),
                                             (torch.float32, "int8_sym", 3e-2), (torch.float32, "int4_asym", 0.2)])
def test_block_output(kind, dtype, fmt, bound):
    """One sparse-MoE block alone (the logits above are dominated by the residual stream):
    bf16 within bf16 noise of the HF loop; int8 (W8A8) and int4 g32 weights within their
    formats' error on N(0, 0.05) weights (measured: bf16 3.4e-3, int8 W8A8 1.8e-2, int4 g32
    asym 0.137, whose 16 levels over a group's range give ~8% rms error per weight)."""
    hf_block = _tiny(kind, dtype).model.layers[0].mlp
    x = torch.randn(2, 9, 64, generator=torch.Generator().manual_seed(3)).to(dtype)
    with torch.no_grad():
        ref = hf_block(x).float()
        ours = moe_ops.from_hf(hf_block)
        if fmt is not None:
            moe_ops.quantize_experts(ours, fmt, "channel" if fmt == "int8_sym" else "group", 32,
                                     act_quant="int8_token" if fmt == "int8_sym" else None)
        y = ours(x)
    assert y.shape == x.shape and y.dtype == dtype
    assert rel_err(y, ref) < bound


def test_from_hf_rejects_other_modules():
    with pytest.raises(TypeError, match="^block: expected a transformers"):
        moe_ops.from_hf(torch.nn.Linear(4, 4))


def test_lowering_rewrites_transformers_grouped_mm_experts():
    """transformers' own ``grouped_mm`` experts implementation (torch._grouped_mm, SwiGLU,
    an inverse-permutation combine), compiled with moe_ops.lowering: each layer's expert path
    becomes one routed expert_mlp (4 rewrites a layer); logits within bf16 noise of eager."""
    import moe_ops.lowering as lowering
    model = _tiny("qwen3_moe", torch.bfloat16)
    model.config._experts_implementation = "grouped_mm"
    ids = torch.randint(0, 96, (2, 11), generator=torch.Generator().manual_seed(4))
    ref = _logits(model, ids)
    torch._dynamo.reset()
    opts = lowering.compile_options("always")
    opts["fx_graph_cache"] = False
    with torch.no_grad():
        out = torch.compile(model, options=opts)(ids).logits.float()
    assert opts["pre_grad_custom_pass"].rewrites == 2 * 4  # per layer: 2 GEMMs, the SwiGLU pair, the combine
    assert rel_err(out, ref) < 1e-2
    block = _tiny("qwen3_moe", torch.bfloat16).model.layers[0].mlp
    block.experts.config._experts_implementation = "grouped_mm"
    from torch._dynamo.testing import EagerAndRecordGraphs
    torch._dynamo.reset()
    rec = EagerAndRecordGraphs()
    with torch.no_grad():
        torch.compile(block, backend=rec, fullgraph=True)(torch.randn(1, 5, 64, dtype=torch.bfloat16))
    graph = rec.graphs[0].graph
    assert lowering.rewrite_grouped_mm(graph, "always") == 2 and lowering.fuse_moe_patterns(graph) == 2
    calls = [str(n.target) for n in graph.nodes if n.op == "call_function" and "moe_ops" in str(n.target)]
    assert calls == ["moe_ops.expert_mlp.default"]
