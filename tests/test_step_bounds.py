"""benchmarks/step_bounds.py: the roofline bound of a training step, by hand on a small case and
against the committed H100 training run (no measured time may fall below its bound)."""
import glob
import json
import os
import sys

import pytest

BENCH = os.path.join(os.path.dirname(__file__), "..", "benchmarks")
sys.path.insert(0, BENCH)
import step_bounds  # noqa: E402
from bench_training import SHAPES  # noqa: E402

# round numbers: 1 GB/s copy is 1e6 bytes a ms, 1 TFLOP/s 1e9 FLOPs a ms
CEIL = {"copy_GBps": 1.0, "bf16_TFLOPs": 1.0, "fp8_TFLOPs": 2.0}
# the casts read twice what they write; the copy ceiling (a measured rate, reads = writes) is
# no hard limit for them: the weight casts measured up to 1.02x of it. Steps and GEMMs: none.
CAST_SLACK = 0.97


def test_bf16_step_by_hand():
    E, M, K, N = 2, 1000, 1000, 2000
    flops = 2.0 * M * N * K  # 4e9: 4 ms at bf16, 2 at fp8
    fwd = (M * K + E * N * K) * 2 + M * N * 2  # 2e6 + 8e6 + 4e6 bytes: 14 ms
    dgrad = (M * N + E * N * K) * 2 + M * K * 2  # 4e6 + 8e6 + 2e6: 14 ms
    wgrad = (M * N + M * K) * 2 + E * N * K * 2  # 6e6 + 8e6: 14 ms
    assert step_bounds.step_kernels(E, M, K, N, "bf16") == {
        "fwd": (flops, fwd, "bf16"), "dgrad": (flops, dgrad, "bf16"), "wgrad": (flops, wgrad, "bf16")}
    assert step_bounds.step_bound_ms(E, M, K, N, "bf16", CEIL) == pytest.approx(42.0)
    # compute-bound when the bytes shrink: E = 0 experts' weights, M small against N * K
    assert step_bounds.kernel_bound_ms(4e9, 1e6, "bf16", CEIL) == pytest.approx(4.0)
    assert step_bounds.kernel_bound_ms(4e9, 1e6, "fp8", CEIL) == pytest.approx(2.0)
    assert step_bounds.kernel_bound_ms(0.0, 3e6, None, CEIL) == pytest.approx(3.0)


def test_fp8_blockwise_step_by_hand():
    E, M, K, N = 2, 1000, 1000, 2000
    ks = step_bounds.step_kernels(E, M, K, N, "fp8_blockwise")
    assert set(ks) == {"fwd", "dgrad", "wgrad", "cast_x_fp8_1x128", "cast_dy_fp8_1x128", "cast_x_token_blocks_128",
                       "cast_dy_token_blocks_128", "cast_w_fp8_block_pair"}
    assert ks["fwd"] == (4e9, (M * K + E * N * K) + M * N * 2, "fp8")  # 1e6 + 4e6 + 4e6 bytes: 9 ms
    assert ks["cast_w_fp8_block_pair"] == (0.0, E * N * K * 4, None)
    # fwd 9 + dgrad (2e6 + 4e6 + 2e6) 8 + wgrad (3e6 + 8e6) 11; casts x 3 + 3, dy 6 + 6, W 16
    assert step_bounds.step_bound_ms(E, M, K, N, "fp8_blockwise", CEIL) == pytest.approx(62.0)
    fused = step_bounds.step_kernels(E, M, K, N, "fp8_blockwise", fused_casts=True)
    assert fused["cast_x_fp8_1x128_and_token_blocks_128"] == (0.0, M * K * 4, None)
    assert step_bounds.step_bound_ms(E, M, K, N, "fp8_blockwise", CEIL, True) == pytest.approx(62.0 - 2 - 4)


def test_fp8_rowwise_casts_both_weight_layouts():
    ks = step_bounds.step_kernels(2, 10, 20, 30, "fp8_rowwise")
    assert ks["cast_w_fp8_channel"] == ks["cast_wT_fp8_channel"] == (0.0, 2 * 30 * 20 * 3, None)
    assert "cast_x_token_blocks_expert" in ks and "cast_x_fp8_token" in ks
    with pytest.raises(ValueError, match="recipe must be one of"):
        step_bounds.step_kernels(2, 10, 20, 30, "fp8_tensorwise")


RUNS = sorted(glob.glob(os.path.join(BENCH, "results", "training_h*.json")))


@pytest.mark.parametrize("path", RUNS, ids=[os.path.basename(p) for p in RUNS])
def test_measured_steps_are_not_below_their_bound(path):
    """Every measured step and bf16 GEMM of a committed run at or above its bound (a bound above
    a measured time would be a wrong bound); every cast at or above ``CAST_SLACK`` of its bound
    (a read-heavy cast may pass the copy rate by a few percent: step_bounds' docstring)."""
    with open(path) as fh:
        run = json.load(fh)
    ceil = run["ceilings"]
    checked = 0
    for r in run["rows"]:
        E, top_k, K, N = SHAPES[r["shape"]]
        M = r["T"] * top_k
        variant = r["variant"]
        slack = CAST_SLACK if variant.startswith("cast_") else 1.0
        if variant.startswith("ours_") and variant.endswith("_fwd_bwd"):
            bound = step_bounds.step_bound_ms(E, M, K, N, variant[len("ours_"):-len("_fwd_bwd")], ceil)
            measured = r.get("ms_graph") or r["ms"]  # early runs timed eagerly only
        elif variant.startswith("cast_x_"):
            bound = step_bounds.kernel_bound_ms(0.0, M * K * 3, None, ceil)
            measured = r.get("ms_graph") or r["ms"]
        elif variant.startswith(("cast_w_", "cast_wT_")):  # W read, codes written; the pair writes two
            bound = step_bounds.kernel_bound_ms(0.0, E * N * K * (4 if variant.endswith("_pair") else 3), None, ceil)
            measured = r.get("ms_graph") or r["ms"]
        elif variant in ("fwd", "dgrad", "wgrad"):
            bound = step_bounds.kernel_bound_ms(*step_bounds.step_kernels(E, M, K, N, "bf16")[variant], ceil)
            measured = r["ms"]
        else:
            continue
        assert measured >= slack * bound, (r["shape"], variant, measured, bound)
        checked += 1
    assert checked >= 3 * (3 + 3)


def test_committed_runs_found():
    assert len(RUNS) >= 10  # the parametrization above is not empty
