"""The one benchmark harness: routing, timing, ceilings, result tables (markdown + JSON)."""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform

import torch


def skewed_offs(T: int, E: int, top_k: int, device, seed: int = 0) -> torch.Tensor:
    """Expert end rows of T tokens routed top-k by a random router with skewed expert biases."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    logits = torch.randn(T, E, generator=g) + 1.5 * torch.randn(E, generator=g)
    ids = logits.topk(top_k, dim=-1).indices.flatten()
    counts = torch.bincount(ids, minlength=E)
    return torch.cumsum(counts, 0).to(torch.int32).to(device)


def training_operands(E: int, top_k: int, K: int, N: int, T: int, device, requires_grad: bool = False):
    """``(offs, x [M, K], w [E, N, K], dy [M, N])`` of one grouped GEMM, M = T * top_k: skewed
    routing (seed 1), bf16 activations and weights (w ~ 0.02 N(0, 1)); x and w require grad if
    ``requires_grad``."""
    offs = skewed_offs(T, E, top_k, device, seed=1)
    M = T * top_k
    x = torch.randn(M, K, device=device, dtype=torch.bfloat16).requires_grad_(requires_grad)
    w = (torch.randn(E, N, K, device=device) * 0.02).to(torch.bfloat16).requires_grad_(requires_grad)
    dy = torch.randn(M, N, device=device, dtype=torch.bfloat16)
    return offs, x, w, dy


def bench_ms(fn, rep_ms: int = 100, warmup_ms: int = 25) -> float:
    """Median ms of ``fn`` (triton.testing.do_bench, device events)."""
    import triton.testing
    return float(triton.testing.do_bench(fn, warmup=warmup_ms, rep=rep_ms, return_mode="median"))


def bench_graph_ms(fn, reps: int = 20) -> float:
    """Median ms of ``fn`` captured ``reps`` times in one CUDA graph (no CPU launch overhead)."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        fn()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for _ in range(reps):
            fn()
    return bench_ms(g.replay) / reps


def time_variant(label: str, fn, ref: torch.Tensor, rows=None):
    """``(output, ms, error)`` of ``fn``: CUDA-graph timed, the error relative to ``ref`` (Frobenius,
    over the first ``rows`` rows, all if None); or None after printing why ``fn`` failed (a
    config the compiler rejects is recorded, not fatal)."""
    try:
        out = fn()
        torch.cuda.synchronize()
        o, r = (out, ref) if rows is None else (out[:rows], ref[:rows])
        err = float((o.double() - r.double()).norm() / r.double().norm())
        ms = bench_graph_ms(fn)
    except Exception as e:  # noqa: BLE001  (reported, the probe goes on)
        print(f"{label}: FAILED {type(e).__name__}: {str(e).splitlines()[0][:200]}", flush=True)
        return None
    return out, ms, err


def sweep(make_fn, space, label: str, graph: bool = False) -> list:
    """Time ``make_fn(cfg)()`` for each config of ``space``; ``[(ms, cfg)]`` fastest first.
    Infeasible configs (out of shared memory, ...) are printed and left out. ``graph`` times
    CUDA-graph replays (decode shapes, where launch overhead would hide the kernel)."""
    timings = []
    for cfg in space:
        try:
            fn = make_fn(cfg)
            fn()
            timings.append((bench_graph_ms(fn) if graph else bench_ms(fn), cfg))
        except Exception as e:  # noqa: BLE001  (an infeasible config: recorded, not hidden)
            print("skip", label, cfg, repr(e)[:80])
    timings.sort(key=lambda t: t[0])
    for ms, cfg in timings[:4]:
        print(f"{label} {ms:.4f} ms {cfg}", flush=True)
    return timings


def write_json(path: str, payload: dict) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as fh:
        json.dump(payload, fh, indent=1, default=str)


def ceilings(device) -> dict:
    """Copy bandwidth (bytes read + written per s), bf16 and fp8 dense matmul FLOP/s."""
    out = {}
    a = torch.empty(1 << 30, dtype=torch.uint8, device=device)
    b = torch.empty_like(a)
    ms = bench_ms(lambda: b.copy_(a))
    out["copy_GBps"] = 2 * a.numel() / ms / 1e6
    a = b = None  # free the 2 GiB before the matmuls
    n = 8192
    x = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    y = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    ms = bench_ms(lambda: x @ y)
    out["bf16_TFLOPs"] = 2 * n ** 3 / ms / 1e9
    try:
        xf = x.to(torch.float8_e4m3fn)
        yf = y.to(torch.float8_e4m3fn).t().contiguous().t()
        one = torch.ones((), device=device)
        ms = bench_ms(lambda: torch._scaled_mm(xf, yf, one, one, out_dtype=torch.bfloat16))
        out["fp8_TFLOPs"] = 2 * n ** 3 / ms / 1e9
    except Exception as e:  # noqa: BLE001  (recorded, not hidden)
        out["fp8_TFLOPs_error"] = repr(e)[:200]
    return out


def environment(device) -> dict:
    env = {"date": datetime.date.today().isoformat(), "torch": torch.__version__, "python": platform.python_version()}
    try:
        import triton
        env["triton"] = triton.__version__
    except ImportError:
        env["triton"] = None
    if torch.cuda.is_available():
        env["device"] = torch.cuda.get_device_name(device)
    return env


def write_results(name: str, env: dict, ceil: dict, rows: list, columns: list, out_dir: str) -> str:
    """Write ``name.md`` and ``name.json`` under ``out_dir``; return the markdown."""
    os.makedirs(out_dir, exist_ok=True)
    lines = [f"# {name}", "", f"{env}", "", f"ceilings (measured in this run): {ceil}", "",
             "| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for r in rows:
        lines.append("| " + " | ".join(_fmt(r.get(c)) for c in columns) + " |")
    md = "\n".join(lines) + "\n"
    with open(os.path.join(out_dir, name + ".md"), "w") as f:
        f.write(md)
    with open(os.path.join(out_dir, name + ".json"), "w") as f:
        json.dump({"env": env, "ceilings": ceil, "rows": rows}, f, indent=1)
    return md


def _fmt(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.3g}" if abs(v) < 1000 else f"{v:.0f}"
    return str(v)


def ab_arguments(default_cases) -> argparse.Namespace:
    """The A/B scripts' command line: ``[--cases ...] [--save A.pt | --compare A.pt]``."""
    p = argparse.ArgumentParser()
    p.add_argument("--cases", nargs="+", default=default_cases)
    p.add_argument("--save")
    p.add_argument("--compare")
    return p.parse_args()


def _max_rel_diff(a: tuple, b: tuple) -> float:
    """The largest ``||x - y|| / ||y||`` (Frobenius, float64) over the pairs of outputs."""
    return max(float((x.double() - y.double()).norm() / y.double().norm().clamp_min(1e-30)) for x, y in zip(a, b))


def ab_run(args, run_case) -> None:
    """The A/B scripts' loop over ``args.cases`` on one source tree: ``run_case(case)`` returns
    ``(ms, outputs, note)`` (outputs: a tuple of tensors); prints each case's time, and whether
    its outputs equal bit for bit, and their largest relative difference to, those that ``--save``
    kept from the other run (the case at the same position of its list: the two lists may differ
    in their configs)."""
    saved = torch.load(args.compare) if args.compare else None
    outs = []  # by position: a case may appear twice in a list
    for i, case in enumerate(args.cases):
        ms, out, note = run_case(case)
        outs.append(tuple(t.cpu() for t in out))
        same = "" if saved is None else (f" bitwise equal to {args.compare}: "
                                         f"{all(torch.equal(a, b) for a, b in zip(saved[i], outs[i]))}, "
                                         f"relative difference {_max_rel_diff(saved[i], outs[i]):.2e}")
        print(f"{case:42s} {ms * 1e3:9.1f} us {note}{same}", flush=True)
    if args.save:
        torch.save(outs, args.save)
