#!/usr/bin/env python
"""One-command GPU check of the fused Triton kernels (no installs; < 5 min on one H100).

    python scripts/gpu_check.py                # correctness, CUDA graphs, timings, then bench --quick
    python scripts/gpu_check.py --no-bench     # skip ``python -m bench.run --quick``
    python scripts/gpu_check.py --pytest       # also run tests/test_triton_kernels.py on CUDA
    python scripts/gpu_check.py --interpret    # CPU rehearsal: a few correctness cases under the
                                               # Triton interpreter (what CI runs of this script)

1. correctness on CUDA of ``triton_impl.forward/backward`` against the float64 PyTorch path
   (same seeds), for float32 / bfloat16 / float16 (and float64), NCHW / channels_last / tokens
   and strided views, refine on and off, greedy and given seeds, parts ranked by activity with
   an activity gradient, odd and realistic shapes; outputs are NaN-poisoned first,
   so an unwritten element fails; dX must keep x's strides; two runs must agree bitwise;
2. forward + backward captured in a CUDA graph and replayed (no host synchronisation);
3. timings of the kernels vs the vectorised PyTorch path at the benchmark shapes, with the
   effective bandwidth of one read of X;
4. ``python -m bench.run --quick`` (when bench/ exists), in what is left of the time budget.

Writes ``$OUT/gpu_check.json`` (or ``bench/results/gpu_check.json`` without $OUT) and prints
a short table last. Exit status 1 if any correctness check failed.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
import traceback
from pathlib import Path

# Compiled kernels on CUDA, or the interpreter on CPU (--interpret): decided before triton loads.
INTERPRET = "--interpret" in sys.argv[1:]
os.environ["TRITON_INTERPRET"] = "1" if INTERPRET else "0"
DEVICE = "cpu" if INTERPRET else "cuda"
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from brnpa_triton import testing  # noqa: E402
from brnpa_triton.ops import torch_impl, triton_impl  # noqa: E402

T0 = time.time()
DNAME = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16", torch.float64: "fp64"}


def elapsed() -> float:
    return time.time() - T0


def sync() -> None:
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def log(msg: str) -> None:
    print(f"[{elapsed():6.1f}s] {msg}", flush=True)


# ---- helpers -------------------------------------------------------------------------------

# The (B, C, N) view of features in each layout the kernels see: NCHW and channels_last
# feature maps, and (B, N, C) tokens, whose view has the channels_last strides.
VIEW_OF = {"nchw": "nchw", "channels_last": "channels_last", "tokens": "channels_last"}


def make_x(B, C, H, W, dtype, layout, seed):
    """Non-negative (B, C, H * W) features in ``layout``, on DEVICE. "strided": every other
    position of a wider buffer, so that neither C nor N is contiguous (the STRIDED kernels)."""
    values = testing.random_values(B, C, H * W, seed=seed).to(dtype)
    if layout == "strided":
        wide = torch.full((B, H * W, 2 * C), float("nan"), dtype=dtype, device=DEVICE)
        view = wide[:, :, ::2].transpose(1, 2)
        view.copy_(values.to(DEVICE))
        return view
    return testing.view_in_layout(values, VIEW_OF[layout], device=DEVICE)


# ---- 1. correctness --------------------------------------------------------------------------

def correctness_case(B, C, H, W, K, dtype, layout, refine, given, seed=0, by_activity=False):
    """With ``by_activity``: parts ranked by activity, and a gradient of the activities too."""
    x = make_x(B, C, H, W, dtype, layout, seed)
    N = H * W
    seeds = None
    if given:
        g = torch.Generator().manual_seed(seed + 1)
        seeds = torch.randint(0, N, (B, K), generator=g).to(DEVICE)
    # Seeds in the order they were picked; ranked by activity, the outputs are then reordered.
    picked = triton_impl.forward(x, K, refine, seeds).indices
    out = triton_impl.forward(x, K, refine, seeds, by_activity)
    sync()
    if given:
        ok_idx = torch.equal(picked, seeds)
    else:
        ok_idx = testing.greedy_seed_error(x, picked, 1e-4) is None
    x64 = x.double()
    ref = torch_impl.forward(x64, K, refine, picked if ok_idx else None, by_activity=by_activity)
    ok_idx = ok_idx and torch.equal(out.indices.cpu(), ref.indices.cpu())
    cond = testing.conditioning(ref.maps)
    tol = testing.SCALED_TOLERANCE[dtype] * cond
    names = ("vectors", "maps", "saved_norms", "inv_sums") + (("activity",) if by_activity else ())
    e_fwd = max(testing.scaled_error(getattr(out, name), getattr(ref, name)) for name in names)
    g_vec, g_map, g_norm = testing.random_grads(x, K, seed=seed)
    g_act = torch.randn(B, K, generator=torch.Generator().manual_seed(seed + 3)).to(x) if by_activity else None
    dx = triton_impl.backward(x, g_vec, g_map, g_act, g_norm, out.saved(), refine)
    sync()
    dx_ref = torch_impl.backward(x64, g_vec.double(), g_map.double(), None if g_act is None else g_act.double(),
                                 g_norm.double(), ref.saved(), refine)
    # float16: gradients at zero vectors (rho_n = eps) can pass 65504; they overflow to inf there.
    limit = torch.finfo(dtype).max
    overflow = dx_ref.abs() > limit
    e_bwd = testing.scaled_error(dx[~overflow], dx_ref[~overflow])
    if not bool(torch.isinf(dx[overflow]).all()):
        e_bwd = float("inf")
    # dX keeps a dense x's strides; behind a strided view it is dense, in x's dimension order
    if layout == "strided":
        span = sum((n - 1) * st for n, st in zip(dx.shape, dx.stride(), strict=True)) + 1
        strides_ok = dx.stride() == torch.empty_like(x).stride() and span == dx.numel()
    else:
        strides_ok = dx.stride() == x.stride()
    again = triton_impl.forward(x, K, refine, seeds, by_activity)
    dx2 = triton_impl.backward(x, g_vec, g_map, g_act, g_norm, again.saved(), refine)
    deterministic = all(torch.equal(a, b) for a, b in zip(out, again, strict=True)) and torch.equal(dx, dx2)
    ok = ok_idx and e_fwd <= tol and e_bwd <= tol * cond and strides_ok and deterministic
    return dict(check="correctness", shape=f"{B}x{C}x{H}x{W} K={K}", dtype=DNAME[dtype], layout=layout,
                refine=refine, seeds="given" if given else "greedy", by_activity=by_activity, fwd_err=e_fwd,
                bwd_err=e_bwd, tol=tol, indices_ok=ok_idx, strides_ok=strides_ok, deterministic=deterministic, ok=ok)


def run_correctness(results):
    with testing.poisoned_allocations(triton_impl):
        cases = []
        if INTERPRET:  # a rehearsal of this script's own logic: tiny shapes, every dtype and layout
            for dtype, layout in ((torch.float32, "nchw"), (torch.bfloat16, "channels_last"),
                                  (torch.float16, "tokens"), (torch.float64, "nchw")):
                cases.append(((2, 20, 3, 5, 3), dtype, layout, True, False))
            cases.append(((2, 20, 3, 5, 3), torch.float32, "channels_last", False, True))
            cases.append(((1, 1, 1, 1, 1), torch.float32, "nchw", True, False))
            cases.append(((2, 20, 3, 5, 3), torch.float32, "strided", True, False, True))
        for dtype in () if INTERPRET else (torch.float32, torch.bfloat16, torch.float16):
            for layout in ("nchw", "channels_last", "tokens"):
                for refine in (True, False):
                    cases.append(((3, 40, 5, 7, 3), dtype, layout, refine, False))
                cases.append(((4, 256, 14, 14, 3), dtype, layout, True, False))
            cases.append(((2, 96, 9, 9, 6), dtype, "nchw", True, False))  # K > 4: two groups of parts
            cases.append(((3, 40, 5, 7, 3), dtype, "channels_last", True, True))
        if not INTERPRET:
            cases.append(((2, 2048, 28, 28, 3), torch.float32, "channels_last", True, False))
            cases.append(((2, 2048, 28, 28, 3), torch.float32, "nchw", False, True))
            cases.append(((1, 1, 1, 1, 1), torch.float32, "nchw", True, False))
            cases.append(((2, 7, 3, 3, 9), torch.float64, "tokens", True, False))
            # the paths the cases above leave out: strided views (neither C nor N contiguous),
            # parts ranked by activity with an activity gradient, float64 NCHW
            for dtype in (torch.float32, torch.bfloat16):
                cases.append(((3, 40, 5, 7, 3), dtype, "strided", True, False))
                cases.append(((3, 40, 5, 7, 3), dtype, "nchw", True, False, True))
                cases.append(((3, 40, 5, 7, 3), dtype, "channels_last", False, True, True))
            cases.append(((4, 256, 14, 14, 3), torch.float64, "nchw", True, False))
        for shape, dtype, layout, refine, given, *ranked in cases:
            try:
                r = correctness_case(*shape, dtype, layout, refine, given, by_activity=bool(ranked and ranked[0]))
            except Exception as e:  # reported as a failure, the check goes on
                r = dict(check="correctness", shape=str(shape), dtype=DNAME[dtype], layout=layout, refine=refine,
                         seeds="given" if given else "greedy", by_activity=bool(ranked and ranked[0]), ok=False,
                         error=f"{type(e).__name__}: {e}")
                traceback.print_exc()
            results.append(r)
            log(f"{'ok  ' if r['ok'] else 'FAIL'} {r['shape']:22} {r['dtype']} {r['layout']:13} refine={refine!s:5} "
                f"{r['seeds']:6}{' ranked' if r.get('by_activity') else ''} "
                f"fwd_err={r.get('fwd_err', float('nan')):.2e} bwd_err={r.get('bwd_err', float('nan')):.2e}")


# ---- 2. CUDA graphs --------------------------------------------------------------------------

def run_graph(results):
    try:
        x = make_x(4, 128, 14, 14, torch.float32, "channels_last", 3)
        B, C, N = x.shape
        gv, ga, gn = (torch.randn(*shape, device="cuda") for shape in ((B, 3, C), (B, 3, N), (B, N)))
        eager = triton_impl.forward(x, 3, True)
        eager_dx = triton_impl.backward(x, gv, ga, None, gn, eager.saved(), True)
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):  # warm-up (compilation) outside the capture
            out = triton_impl.forward(x, 3, True)
            triton_impl.backward(x, gv, ga, None, gn, out.saved(), True)
        torch.cuda.current_stream().wait_stream(s)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = triton_impl.forward(x, 3, True)
            dx = triton_impl.backward(x, gv, ga, None, gn, out.saved(), True)
        graph.replay()
        torch.cuda.synchronize()
        ok = all(torch.equal(a, b) for a, b in zip(out, eager, strict=True)) and torch.equal(dx, eager_dx)
        results.append(dict(check="cuda_graph", ok=ok))
    except Exception as e:
        traceback.print_exc()
        results.append(dict(check="cuda_graph", ok=False, error=f"{type(e).__name__}: {e}"))
    log(f"cuda graph capture/replay: {'ok' if results[-1]['ok'] else 'FAIL'}")


# ---- 3. timings ------------------------------------------------------------------------------

def time_fn(fn, budget=0.5):
    fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    t = time.time()
    reps = 0
    times = []
    while time.time() - t < budget and reps < 200:
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e-3)
        reps += 1
    times.sort()
    return times[len(times) // 2]


def run_timings(results, budget_s):
    shapes = [(32, 2048, 14, 14), (64, 512, 28, 28), (16, 2048, 56, 56)]
    K = 3
    for B, C, H, W in shapes:
        for dtype in (torch.float32, torch.bfloat16):
            for layout in ("nchw", "channels_last"):
                if elapsed() > budget_s:
                    log("timings: budget spent, skipping the rest")
                    return
                try:
                    x = make_x(B, C, H, W, dtype, layout, 0)
                    N = H * W
                    gv, ga, gn = (torch.randn(*s, device="cuda", dtype=dtype) for s in ((B, K, C), (B, K, N), (B, N)))
                    row = dict(check="timing", shape=f"{B}x{C}x{H}x{W}", dtype=DNAME[dtype], layout=layout, K=K)
                    for name, mod in (("triton", triton_impl), ("torch", torch_impl)):
                        # Timed right here, but bound to this iteration's values all the same.
                        def fwd(mod=mod, x=x):
                            return mod.forward(x, K, True)

                        saved = fwd()

                        def bwd(mod=mod, x=x, gv=gv, ga=ga, gn=gn, saved=saved):
                            return mod.backward(x, gv, ga, None, gn, saved.saved(), True)

                        row[f"{name}_fwd_us"] = time_fn(fwd) * 1e6
                        row[f"{name}_bwd_us"] = time_fn(bwd) * 1e6
                    xbytes = x.numel() * x.element_size()
                    row["x_MB"] = xbytes / 1e6
                    # one read of X per forward (the floor), and read X + write dX per backward
                    row["fwd_GBps_1read"] = xbytes / (row["triton_fwd_us"] * 1e-6) / 1e9
                    row["bwd_GBps_rw"] = 2 * xbytes / (row["triton_bwd_us"] * 1e-6) / 1e9
                    row["ok"] = True
                except Exception as e:
                    traceback.print_exc()
                    row = dict(check="timing", shape=f"{B}x{C}x{H}x{W}", dtype=DNAME[dtype], layout=layout,
                               ok=False, error=f"{type(e).__name__}: {e}")
                results.append(row)
                if row["ok"]:
                    log(f"time {row['shape']:16} {row['dtype']} {layout:13} triton fwd {row['triton_fwd_us']:8.1f}us "
                        f"bwd {row['triton_bwd_us']:8.1f}us | torch fwd {row['torch_fwd_us']:8.1f}us "
                        f"bwd {row['torch_bwd_us']:8.1f}us | {row['fwd_GBps_1read']:.0f} GB/s fwd (1 read)")
                torch.cuda.empty_cache()


# ---- 4. bench --------------------------------------------------------------------------------

def run_bench(results, out_dir: Path, deadline_s: float):
    if not (ROOT / "bench" / "run.py").exists():
        results.append(dict(check="bench", ok=True, note="bench/run.py not found: skipped"))
        return
    left = deadline_s - elapsed()
    if left < 30:
        results.append(dict(check="bench", ok=True, note=f"skipped: only {left:.0f}s left"))
        return
    cmd = [sys.executable, "-m", "bench.run", "--quick", "--out", str(out_dir), "--no-plot", "--no-progress"]
    log(f"bench: {' '.join(cmd[1:])} (timeout {left:.0f}s)")
    env = {**os.environ, "TRITON_INTERPRET": "0"}
    try:
        p = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=left)
        tail = (p.stdout + p.stderr)[-3000:]
        print(tail)
        results.append(dict(check="bench", ok=p.returncode == 0, returncode=p.returncode, tail=tail[-1500:]))
    except subprocess.TimeoutExpired:
        results.append(dict(check="bench", ok=False, note=f"timed out after {left:.0f}s"))


# ---- 4b. the kernel tests on CUDA -------------------------------------------------------------

def run_pytest(results, timeout_s: float):
    cmd = [sys.executable, "-m", "pytest", "tests/test_triton_kernels.py", "-q", "-x", "-p", "no:cacheprovider"]
    log(f"pytest: {' '.join(cmd[1:])} (timeout {timeout_s:.0f}s)")
    try:
        p = subprocess.run(cmd, cwd=ROOT, env={**os.environ, "TRITON_INTERPRET": "0"}, capture_output=True,
                           text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired as e:
        out = e.stdout.decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
        print(out[-3000:])
        # Not a failure of the kernels: the run is cut short, and the table says so.
        results.append(dict(check="pytest", ok=True, note=f"cut at {timeout_s:.0f}s", tail=out[-1500:]))
        return
    tail = (p.stdout + p.stderr)[-3000:]
    print(tail)
    results.append(dict(check="pytest", ok=p.returncode == 0, tail=tail[-1500:]))


# ---- main ------------------------------------------------------------------------------------

def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--no-bench", action="store_true")
    ap.add_argument("--pytest", action="store_true", help="also run tests/test_triton_kernels.py on CUDA")
    ap.add_argument("--budget", type=float, default=285.0, help="seconds for the whole script (default 285)")
    ap.add_argument("--interpret", action="store_true", help="CPU rehearsal under the Triton interpreter")
    args = ap.parse_args(argv)
    if args.interpret:
        return rehearse()
    if not torch.cuda.is_available():
        print("gpu_check: no CUDA device; nothing to check (the CPU suite runs the interpreter)")
        return 2
    out_dir = Path(os.environ["OUT"]) if os.environ.get("OUT") else ROOT / "bench" / "results"
    out_dir.mkdir(parents=True, exist_ok=True)
    import triton

    env = dict(torch=torch.__version__, triton=triton.__version__, device=torch.cuda.get_device_name(),
               capability=".".join(map(str, torch.cuda.get_device_capability())))
    log(f"environment: {env}")
    results: list[dict] = []
    run_correctness(results)
    run_graph(results)
    if args.pytest:
        run_pytest(results, timeout_s=max(30.0, args.budget * 0.4 - elapsed()))
    run_timings(results, budget_s=args.budget * 0.45)
    if not args.no_bench:
        run_bench(results, out_dir, deadline_s=args.budget)
    path = out_dir / "gpu_check.json"
    path.write_text(json.dumps(dict(environment=env, results=results, seconds=elapsed()), indent=1, default=str))

    # ---- the short table, last ----
    print(f"\n== gpu_check on {env['device']} (torch {env['torch']}, triton {env['triton']}), {elapsed():.0f}s ==")
    corr = [r for r in results if r["check"] == "correctness"]
    bad = [r for r in results if not r.get("ok", False)]
    worst = {}
    for r in corr:
        w = worst.setdefault(r["dtype"], [0.0, 0.0, 0])
        w[0] = max(w[0], r.get("fwd_err", float("inf")) / max(r.get("tol", 1e-30), 1e-30))
        w[1] = max(w[1], r.get("bwd_err", float("inf")) / max(r.get("tol", 1e-30), 1e-30))
        w[2] += 1
    print(f"{'dtype':6} {'cases':>5} {'worst fwd err/tol':>18} {'worst bwd err/tol':>18}")
    for d, (f, b, n) in worst.items():
        print(f"{d:6} {n:5d} {f:18.3f} {b:18.3f}")
    for r in results:
        if r["check"] in ("cuda_graph", "pytest", "bench"):
            print(f"{r['check']:12} {'ok' if r['ok'] else 'FAIL'} {r.get('note', '')}")
    tim = [r for r in results if r["check"] == "timing" and r.get("ok")]
    if tim:
        print(f"{'shape':16} {'dtype':5} {'layout':13} {'tri fwd us':>10} {'tri bwd us':>10} {'pt fwd us':>10} "
              f"{'pt bwd us':>10} {'fwd GB/s':>8} {'bwd GB/s':>8}")
        for r in tim:
            print(f"{r['shape']:16} {r['dtype']:5} {r['layout']:13} {r['triton_fwd_us']:10.1f} "
                  f"{r['triton_bwd_us']:10.1f} {r['torch_fwd_us']:10.1f} {r['torch_bwd_us']:10.1f} "
                  f"{r['fwd_GBps_1read']:8.0f} {r['bwd_GBps_rw']:8.0f}")
    print(f"failures: {len(bad)}" + ("" if not bad else " -> " + "; ".join(
        f"{r['check']} {r.get('shape', '')} {r.get('dtype', '')} {r.get('layout', '')} {r.get('error', '')}"
        for r in bad[:8])))
    print(f"json: {path}")
    gating = ("correctness", "cuda_graph", "pytest")
    return 1 if any(not r.get("ok", False) for r in results if r["check"] in gating) else 0


def rehearse() -> int:
    """--interpret: the correctness cases of this script, tiny, on CPU under the interpreter."""
    results: list[dict] = []
    run_correctness(results)
    bad = [r for r in results if not r["ok"]]
    print(f"gpu_check --interpret: {len(results) - len(bad)} passed, {len(bad)} failed")
    return 1 if bad or not results else 0


if __name__ == "__main__":
    sys.exit(main())
