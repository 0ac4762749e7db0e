"""One command for every BR-NPA benchmark number.

    python -m bench.run --quick         # < 2 min on a 2-core CPU, < 3 min on one H100
    python -m bench.run --foundation    # issue 2: B=8 C=2048 28x28 K=3 fp32, torch vs eager vs compiled
    python -m bench.run --full          # the whole grid (GPUs; long)
    python -m bench.run --micro         # seconds; the schema smoke test uses it

Options narrow any preset: ``--providers``, ``--modes``, ``--dtypes``, ``--device``,
``--budget`` (seconds of timing per row), ``--out`` (default bench/results), ``--no-plot``.
Writes ``<out>/<device>-<preset>.json`` (every row, the environment, the copy bandwidth, the
scaling fits and the target checks), ``.md`` (the tables) and ``.png`` (time vs resolution).

From Python: ``bench.run.main(["--quick"])`` returns the result dict (and writes the files);
``bench.run.run(config)`` does the same from a ``Config``.
"""

from __future__ import annotations

import argparse
import gc
import datetime as _dt
import json
import math
import os
import platform
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from bench import timing
from bench.providers import PRIMARY_ORDER, PROVIDERS, Case, availability

SCHEMA = "brnpa-bench/1"
MODES = ("forward", "backward", "fwd+bwd")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "float64": torch.float64}
RESULTS_DIR = Path(__file__).resolve().parent / "results"
REPO_ROOT = Path(__file__).resolve().parent.parent

# Issue 2's targets, checked wherever the foundation problem appears in a run.
FOUNDATION = dict(B=8, C=2048, H=28, W=28, K=3, dtype="float32")
TARGETS = [
    # (name, mode, metric, other provider, comparison, threshold)
    ("forward: >= 10x faster than eager", "forward", "time", "eager", ">=", 10.0),
    ("forward: no slower than 1.25x compiled", "forward", "time", "compiled", ">=", 1 / 1.25),
    ("fwd+bwd: >= 10x faster than eager", "fwd+bwd", "time", "eager", ">=", 10.0),
    ("fwd+bwd: >= 4x faster than compiled", "fwd+bwd", "time", "compiled", ">=", 4.0),
    ("fwd+bwd peak memory <= half of eager's", "fwd+bwd", "memory", "eager", ">=", 2.0),
]


# --------------------------------------------------------------------------------------------
# Presets
# --------------------------------------------------------------------------------------------


@dataclass
class Group:
    """A set of problems run with the same providers and modes."""

    shapes: list  # (B, C, H, W, K)
    dtypes: list  # dtype names
    providers: list
    modes: list = field(default_factory=lambda: list(MODES))


@dataclass
class Config:
    preset: str
    groups: list
    device: str = "cpu"
    budget_s: float = 0.25  # timing budget per row (CPU: wall clock; CUDA: do_bench rep time)
    min_reps: int = 3
    out_dir: Path = RESULTS_DIR
    plot: bool = True
    progress: bool = True
    compile_backend: str = "inductor"
    measure_memory: bool = True
    rounds: int = 1  # > 1: time every row again in later rounds, interleaved (fairer on a busy machine)
    copy_bytes: int | None = None
    argv: list = field(default_factory=list)
    threads_suffix: bool = False  # name the files after a non-default thread count


def _sweep(B, C, hw, K):
    return [(B, C, r, r, K) for r in hw]


def preset_groups(name: str, device: str) -> tuple[list, float]:
    """(groups, per-row timing budget) of a preset on ``device``."""
    cuda = torch.device(device).type == "cuda"
    lib = ["brnpa-triton", "brnpa-torch"] if cuda else ["brnpa-torch"]
    half = "float16" if cuda else "bfloat16"
    fb = FOUNDATION
    foundation_shape = (fb["B"], fb["C"], fb["H"], fb["W"], fb["K"])
    if name == "micro":
        return [Group([(2, 8, 4, 4, 2), (2, 8, 6, 6, 2)], ["float32"],
                      lib + ["eager", "compiled", "reference", "bap-wsdan"])], 0.01
    if name == "foundation":
        return [Group([foundation_shape], ["float32"], lib + ["eager", "compiled"], ["forward", "fwd+bwd"])], \
            (0.5 if cuda else 4.0)
    if name == "quick" and not cuda:
        base = ["eager", "reference", "bap-wsdan"]
        return [
            # resolution sweep (C=512) and channel sweep, K=3
            Group(_sweep(2, 512, (14, 28, 56), 3) + [(2, 2048, 14, 14, 3)], ["float32"], lib + base),
            # parts sweep
            Group([(2, 512, 28, 28, 1), (2, 512, 28, 28, 8)], ["float32"], lib + base),
            # half precision
            Group([(2, 512, 28, 28, 3)], ["bfloat16"], lib + ["eager", "bap-wsdan"]),
            # torch.compile: one compile per problem, so only two problems here
            Group([(2, 512, 28, 28, 3), foundation_shape], ["float32"], ["compiled"]),
            Group([foundation_shape], ["float32"], lib + ["eager", "bap-wsdan"]),
        ], 0.15
    if name == "quick":  # CUDA
        return [
            Group(_sweep(16, 2048, (14, 28, 56), 3), ["float32", "bfloat16"], lib + ["eager", "bap-wsdan"]),
            Group(_sweep(16, 2048, (14, 28), 3), ["float32"], ["reference"]),
            Group([(16, 512, 28, 28, 3), (16, 2048, 28, 28, 1), (16, 2048, 28, 28, 8)], ["float32"],
                  lib + ["eager", "bap-wsdan"]),
            Group([(32, 2048, 14, 14, 3), (64, 512, 28, 28, 3)], ["float32"], lib + ["eager", "bap-wsdan"]),
            Group([(16, 2048, 28, 28, 3)], [half], lib + ["eager"]),
            Group([(16, 2048, 28, 28, 3), foundation_shape], ["float32"], ["compiled"]),
            Group([foundation_shape], ["float32"], lib + ["eager"]),
        ], 0.3
    if name == "full":
        dtypes = ["float32", "bfloat16", "float16"] if cuda else ["float32", "bfloat16"]
        grid = [(B, C, r, r, K) for B in (8, 32) for C in (512, 2048) for r in (14, 28, 56) for K in (1, 3, 8)]
        paper = [(32, 2048, 14, 14, 3), (16, 2048, 56, 56, 3), (64, 512, 28, 28, 3), (64, 2048, 28, 28, 3)]
        return [
            Group(grid + paper, dtypes, lib + ["eager", "bap-wsdan", "bap-bcnn"]),
            Group([s for s in grid if s[0] == 8 and s[4] <= 3] + paper[:1], ["float32"], ["reference"]),
            Group([s for s in grid if s[4] == 3] + paper, dtypes, ["compiled"]),
            Group([foundation_shape], ["float32"], lib + ["eager", "compiled"]),
        ], (0.4 if cuda else 0.5)
    raise ValueError(f"unknown preset {name!r}")


# --------------------------------------------------------------------------------------------
# Running
# --------------------------------------------------------------------------------------------


def nominal_bytes(case: Case, mode: str) -> int:
    """The BR-NPA floor the bandwidth column is computed against: K+1 reads of X forward,
    1 read + 1 write backward (the same count for every provider of a problem)."""
    passes = {"forward": case.K + 1, "backward": 2, "fwd+bwd": case.K + 3}[mode]
    return passes * case.x_bytes


def _loss_grad(out0: torch.Tensor) -> torch.Tensor:
    g = torch.Generator(device="cpu").manual_seed(1)
    return torch.randn(out0.shape, generator=g).to(device=out0.device, dtype=out0.dtype)


def _mode_callables(built, x, mode):
    """(fn to time, fn for the memory probe) of one mode."""
    inputs = [x] + list(built.params)
    if mode == "forward":
        f = lambda: built.fn(x)  # noqa: E731 - a training forward: inputs require grad
        return f, f
    if mode == "fwd+bwd":
        def f():
            out = built.fn(x)
            return torch.autograd.grad(out[0], inputs, _grad_cache(out[0]))
        return f, f
    fwd = built.fn_retain or built.fn
    with _no_donation():
        out = fwd(x)
        g = _grad_cache(out[0])
        torch.autograd.grad(out[0], inputs, g, retain_graph=True)  # compiles fn_retain's backward
    f = lambda: torch.autograd.grad(out[0], inputs, g, retain_graph=True)  # noqa: E731
    return f, f


def _no_donation():
    import contextlib

    try:
        return torch._functorch.config.patch(donated_buffer=False)
    except Exception:  # noqa: BLE001 - older torch: no such option
        return contextlib.nullcontext()


_GRADS: dict = {}


def _grad_cache(out0):
    key = (tuple(out0.shape), out0.dtype, str(out0.device))
    if key not in _GRADS:
        _GRADS[key] = _loss_grad(out0)
    return _GRADS[key]


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _problem_key(r):
    return (r["mode"], r["B"], r["C"], r["H"], r["W"], r["K"], r["dtype"])


def expand(config: Config, providers_ok: dict) -> list:
    """The ordered, de-duplicated list of (case, provider, modes) to run."""
    seen, plan = set(), {}
    for g in config.groups:
        for shape in g.shapes:
            for dt in g.dtypes:
                case = Case(*shape, dtype=DTYPES[dt], device=config.device)
                for p in g.providers:
                    if p not in providers_ok:
                        continue
                    for m in g.modes:
                        key = (case, p, m)
                        if key in seen:
                            continue
                        seen.add(key)
                        plan.setdefault(case, {}).setdefault(p, []).append(m)
    return [(case, p, modes) for case, per in plan.items() for p, modes in per.items()]


def _dtype_name(dtype):
    return str(dtype).replace("torch.", "")


def _time(f, device, config, budget):
    if device.type == "cpu":
        return timing.time_fn(f, device, budget_s=budget, min_reps=config.min_reps)
    return timing.time_fn(f, device, budget_s=budget)


def _set_timing(row, t):
    row["timing"] = t.as_dict()
    row["median_ms"] = t.median_ms
    row["achieved_bytes_per_s"] = row["nominal_bytes"] / (t.median_ms / 1e3)


def run_one(case: Case, provider: str, modes: list, x: torch.Tensor, config: Config, bar=None, timers=None) -> list:
    """Rows of one provider on one problem. ``timers`` (a dict), when given, receives
    id(row) -> (row, timed callable, Timing) so that later rounds can add samples."""
    device = torch.device(config.device)
    rows = []
    base = dict(provider=provider, family=PROVIDERS[provider].family, B=case.B, C=case.C, H=case.H, W=case.W,
                K=case.K, dtype=_dtype_name(case.dtype), x_bytes=case.x_bytes)
    compile_s = None
    try:
        built = PROVIDERS[provider].build(case, compile_backend=config.compile_backend)
        # first call: compile (torch.compile) / autotune / lazy init, forward and backward
        t0 = time.perf_counter()
        out = built.fn(x)
        torch.autograd.grad(out[0], [x] + list(built.params), _grad_cache(out[0]))
        _sync(device)
        del out
        first_s = time.perf_counter() - t0
        if provider == "compiled":
            compile_s = first_s
    except Exception as e:  # noqa: BLE001 - one broken provider must not sink the run
        for m in modes:
            rows.append({**base, "mode": m, "status": "error", "error": f"{type(e).__name__}: {e}"[:500]})
            if bar is not None:
                bar.update(1)
        return rows
    for mode in modes:
        row = {**base, "mode": mode, "nominal_bytes": nominal_bytes(case, mode), "info": built.info}
        if compile_s is not None:
            row["compile_s"] = compile_s
        try:
            f_time, f_mem = _mode_callables(built, x, mode)
            t = _time(f_time, device, config, config.budget_s / config.rounds)
            _set_timing(row, t)
            if config.measure_memory:
                row["peak_bytes"] = timing.peak_memory(f_mem, device)
            row["status"] = "ok"
            if timers is not None:
                timers[id(row)] = (row, f_time, t)
            del f_time, f_mem
        except Exception as e:  # noqa: BLE001
            row["status"] = "error"
            row["error"] = f"{type(e).__name__}: {e}"[:500]
        rows.append(row)
        if bar is not None:
            bar.update(1)
    return rows


def add_ratios(rows: list) -> None:
    """time_vs[p] = t(p) / t(row): > 1 means this row is that many times faster than p;
    mem_vs[p] likewise for peak memory (> 1: this row uses that many times less)."""
    by_problem = {}
    for r in rows:
        if r.get("status") == "ok":
            by_problem.setdefault(_problem_key(r), []).append(r)
    for group in by_problem.values():
        for r in group:
            r["time_vs"] = {o["provider"]: o["median_ms"] / r["median_ms"] for o in group if o is not r}
            if "peak_bytes" in r:
                r["mem_vs"] = {o["provider"]: o["peak_bytes"] / r["peak_bytes"]
                               for o in group if o is not r and "peak_bytes" in o and r["peak_bytes"] > 0}


def scaling_fits(rows: list) -> list:
    """Log-log slope of time against each of H*W, C, K, B with the other parameters fixed."""
    fits = []
    ok = [r for r in rows if r.get("status") == "ok"]
    variables = {"HW": lambda r: r["H"] * r["W"], "C": lambda r: r["C"], "K": lambda r: r["K"], "B": lambda r: r["B"]}
    for var, get in variables.items():
        groups = {}
        for r in ok:
            fixed = {k: r[k] for k in ("provider", "mode", "dtype", "B", "C", "K") if k != var}
            if var != "HW":
                fixed["HW"] = r["H"] * r["W"]
            groups.setdefault(json.dumps(fixed, sort_keys=True), []).append(r)
        for key, grp in groups.items():
            pts = sorted({get(r): r["median_ms"] for r in grp}.items())
            if len(pts) < 2:
                continue
            lx = [math.log(v) for v, _ in pts]
            ly = [math.log(t) for _, t in pts]
            mx, my = sum(lx) / len(lx), sum(ly) / len(ly)
            sxx = sum((a - mx) ** 2 for a in lx)
            slope = sum((a - mx) * (b - my) for a, b in zip(lx, ly)) / sxx
            fits.append({"variable": var, "fixed": json.loads(key), "points": pts, "slope": slope})
    return fits


def primary_provider(rows_or_names) -> str | None:
    names = {r["provider"] if isinstance(r, dict) else r for r in rows_or_names}
    return next((p for p in PRIMARY_ORDER if p in names), None)


def check_targets(rows: list) -> list:
    """Issue 2's targets for every library provider present at the foundation problem."""
    checks = []
    fb = FOUNDATION
    sel = [r for r in rows if r.get("status") == "ok" and all(r[k] == fb[k] for k in fb)]
    for lib in PRIMARY_ORDER:
        for name, mode, metric, other, _cmp, thr in TARGETS:
            me = next((r for r in sel if r["provider"] == lib and r["mode"] == mode), None)
            them = next((r for r in sel if r["provider"] == other and r["mode"] == mode), None)
            if me is None or them is None:
                continue
            if metric == "time":
                value = them["median_ms"] / me["median_ms"]
            else:
                if "peak_bytes" not in me or "peak_bytes" not in them or me["peak_bytes"] <= 0:
                    continue
                value = them["peak_bytes"] / me["peak_bytes"]
            checks.append({"provider": lib, "target": name, "ratio": value, "threshold": thr, "ok": value >= thr,
                           "mode": mode, "against": other, "metric": metric})
    return checks


# --------------------------------------------------------------------------------------------
# Environment and output
# --------------------------------------------------------------------------------------------


def _git(*args):
    try:
        return subprocess.run(["git", *args], cwd=REPO_ROOT, capture_output=True, text=True, timeout=10).stdout.strip()
    except Exception:  # noqa: BLE001
        return None


def _cpu_model():
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_tag(device: str) -> str:
    d = torch.device(device)
    if d.type == "cuda":
        name = torch.cuda.get_device_name(d).lower()
        slug = "".join(c if c.isalnum() else "-" for c in name).strip("-")
        while "--" in slug:
            slug = slug.replace("--", "-")
        return f"cuda-{slug}"
    return d.type


def environment(device: str) -> dict:
    d = torch.device(device)
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    env = {
        "device": device,
        "device_name": torch.cuda.get_device_name(d) if d.type == "cuda" else _cpu_model(),
        "torch": torch.__version__,
        "triton": triton_version,
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "git_commit": _git("rev-parse", "HEAD"),
        "git_dirty": bool(_git("status", "--porcelain", "--untracked-files=no")),
        "triton_interpret": os.environ.get("TRITON_INTERPRET", "0"),
        "allocator": _allocator_in_effect(),
        "allocator_env": {k: os.environ[k] for k in ALLOCATOR_VARS if k in os.environ},
    }
    try:
        import brnpa_triton

        env["brnpa_triton"] = brnpa_triton.__version__
        env["backends"] = brnpa_triton.available_backends(d)
    except Exception:  # noqa: BLE001
        pass
    return env


def _fmt_ms(v):
    return f"{v:.3g}" if v < 100 else f"{v:.0f}"


def _fmt_bytes(b):
    return f"{b / 2**20:.1f}"


def _fmt_ratio(v):
    return "" if v is None else (f"{v:.2f}" if v < 10 else f"{v:.1f}")


def markdown(result: dict) -> str:
    env = result["env"]
    rows = result["rows"]
    copy_bw = result["copy_bandwidth"]["bytes_per_s"]
    primary = primary_provider([r for r in rows if r.get("status") == "ok"])
    L = [f"# BR-NPA benchmark: preset `{result['preset']}` on {env['device_name']} ({env['device']})", ""]
    L.append(f"torch {env['torch']}, triton {env['triton']}, {env['torch_threads']} torch threads, "
             f"commit `{(env['git_commit'] or '?')[:12]}`{' (dirty tree)' if env['git_dirty'] else ''}, "
             f"{result['created']}, {result['duration_s']:.0f} s, CPU allocator `{env.get('allocator')}`.  ")
    if "loadavg" in result:
        la = result["loadavg"]
        L.append(f"Load average (1 min) at start / end: {la['start'][0]:.2f} / {la['end'][0]:.2f} "
                 f"on {env['cpu_count']} CPUs.  ")
        if env["device"] == "cpu" and max(la["start"][0], la["end"][0]) > 0.5 * (env["cpu_count"] or 1):
            L.append("**The machine was busy during this run**: with several torch threads every operator waits "
                     "for its threads to be scheduled, which inflates times unevenly (compare p20-p80). For "
                     "robust CPU ratios rerun on an idle machine, or with `--threads 1`.  ")
    cfg = result.get("config", {})
    L.append(f"Timing budget {cfg.get('budget_s')} s per row"
             + (f", in {cfg['rounds']} interleaved rounds" if cfg.get("rounds", 1) > 1 else "") + ".  ")
    L.append(f"Copy bandwidth measured in this run: **{copy_bw / 1e9:.1f} GB/s** (read + write counted).  ")
    L.append(f"Ratio columns are against **{primary}**: `t/t({primary})` > 1 means that row is slower than "
             f"{primary}; `mem/mem(...)` likewise for peak memory.")
    L.append("")
    if result.get("checks"):
        L += ["## Issue 2 targets (B=8, C=2048, 28x28, K=3, float32)", "",
              "| provider | target | measured ratio | needed | met |", "|---|---|---|---|---|"]
        for c in result["checks"]:
            L.append(f"| {c['provider']} | {c['target']} | {c['ratio']:.3f}x | {c['threshold']:.2f}x | "
                     f"{'yes' if c['ok'] else '**no**'} |")
        L.append("")
    for mode in MODES:
        mrows = [r for r in rows if r["mode"] == mode]
        if not mrows:
            continue
        L += [f"## {mode}", "",
              f"| B | C | HxW | K | dtype | provider | median ms | p20-p80 ms | peak MiB | GB/s | % copy | "
              f"t/t({primary}) | mem/mem({primary}) |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in sorted(mrows, key=lambda r: (r["dtype"], r["C"], r["B"], r["H"] * r["W"], r["K"], r["provider"])):
            shape = f"| {r['B']} | {r['C']} | {r['H']}x{r['W']} | {r['K']} | {r['dtype']} | {r['provider']} |"
            if r.get("status") != "ok":
                L.append(f"{shape} {r.get('status')}: {r.get('error', '')[:80]} | | | | | | |")
                continue
            t = r["timing"]
            bw = r["achieved_bytes_per_s"]
            tv = 1.0 if r["provider"] == primary else (1 / r["time_vs"][primary] if primary in r.get("time_vs", {}) else None)
            mv = 1.0 if r["provider"] == primary else (1 / r["mem_vs"][primary] if primary in r.get("mem_vs", {}) else None)
            peak = _fmt_bytes(r["peak_bytes"]) if "peak_bytes" in r else ""
            L.append(f"{shape} {_fmt_ms(t['median_ms'])} | {_fmt_ms(t['p20_ms'])}-{_fmt_ms(t['p80_ms'])} | {peak} | "
                     f"{bw / 1e9:.1f} | {100 * bw / copy_bw:.0f} | {_fmt_ratio(tv)} | {_fmt_ratio(mv)} |")
        L.append("")
    # every library provider against every alternative
    libs = [p for p in PRIMARY_ORDER if any(r["provider"] == p and r.get("status") == "ok" for r in rows)]
    others = [p for p in PROVIDERS if p not in PRIMARY_ORDER and any(r["provider"] == p for r in rows)]
    if libs and others:
        L += ["## Speed-up and memory saving of the library over each alternative", "",
              "Each cell: `time(alternative) / time(library)`, then `peak(alternative) / peak(library)` "
              "(> 1: the library is faster / lighter).", "",
              "| mode | B | C | HxW | K | dtype | library | " + " | ".join(others) + " |",
              "|---|---|---|---|---|---|---|" + "---|" * len(others)]
        for r in sorted((r for r in rows if r.get("status") == "ok" and r["provider"] in libs),
                        key=lambda r: (MODES.index(r["mode"]), r["dtype"], r["C"], r["B"], r["H"] * r["W"], r["K"])):
            cells = []
            for o in others:
                if o in r.get("time_vs", {}):
                    m = r.get("mem_vs", {}).get(o)
                    cells.append(f"{_fmt_ratio(r['time_vs'][o])}x / {_fmt_ratio(m)}x")
                else:
                    cells.append("")
            L.append(f"| {r['mode']} | {r['B']} | {r['C']} | {r['H']}x{r['W']} | {r['K']} | {r['dtype']} | "
                     f"{r['provider']} | " + " | ".join(cells) + " |")
        L.append("")
    if result.get("scaling"):
        L += ["## Scaling: log-log slope of time", "",
              "Time ~ value^slope with everything else fixed (1.0 = linear; a memory-bound BR-NPA "
              "should be ~1 in H*W, C and B, and below 1 in K while the K+1 passes do not dominate).", "",
              "| variable | provider | mode | dtype | fixed | points (value: ms) | slope |", "|---|---|---|---|---|---|---|"]
        for f in sorted(result["scaling"], key=lambda f: (f["variable"], f["fixed"]["mode"], f["fixed"]["provider"])):
            fixed = ", ".join(f"{k}={v}" for k, v in f["fixed"].items() if k not in ("provider", "mode", "dtype"))
            pts = ", ".join(f"{v}: {_fmt_ms(t)}" for v, t in f["points"])
            L.append(f"| {f['variable']} | {f['fixed']['provider']} | {f['fixed']['mode']} | {f['fixed']['dtype']} | "
                     f"{fixed} | {pts} | {f['slope']:.2f} |")
        L.append("")
    comp = [r for r in rows if r.get("compile_s") is not None and r["mode"] == "forward"]
    if comp:
        L += ["## torch.compile time (first forward+backward, excluded from the timings)", "",
              "| B | C | HxW | K | dtype | seconds |", "|---|---|---|---|---|---|"]
        for r in comp:
            L.append(f"| {r['B']} | {r['C']} | {r['H']}x{r['W']} | {r['K']} | {r['dtype']} | {r['compile_s']:.1f} |")
        L.append("")
    L += ["## Providers", "", "| provider | family | status | what |", "|---|---|---|---|"]
    for name, p in result["providers"].items():
        L.append(f"| {name} | {p['family']} | {p['status']} | {p['description']} |")
    L.append("")
    return "\n".join(L)


def plot(result: dict, path: Path) -> str | None:
    """Time vs H*W per provider, one panel per mode; returns a reason when skipped."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        import matplotlib.ticker
    except ImportError:
        return "matplotlib not installed (pip install matplotlib): plot skipped"
    ok = [r for r in result["rows"] if r.get("status") == "ok"]
    # the (B, C, K, dtype) with the most resolutions
    best, series = None, {}
    for r in ok:
        series.setdefault((r["B"], r["C"], r["K"], r["dtype"]), set()).add(r["H"] * r["W"])
    if series:
        best = max(series, key=lambda k: (len(series[k]), k[3] == "float32"))
    if best is None or len(series[best]) < 2:
        return "fewer than two resolutions in this run: plot skipped"
    modes = [m for m in MODES if any(r["mode"] == m for r in ok)]
    fig, axes = plt.subplots(1, len(modes), figsize=(5 * len(modes), 4), squeeze=False)
    for ax, mode in zip(axes[0], modes):
        for prov in PROVIDERS:
            pts = sorted((r["H"] * r["W"], r["median_ms"]) for r in ok
                         if r["mode"] == mode and r["provider"] == prov and (r["B"], r["C"], r["K"], r["dtype"]) == best)
            if len(pts) >= 2:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=prov)
        ax.set_xscale("log")
        ax.set_yscale("log")
        res = sorted({r["H"] * r["W"]: f"{r['H']}x{r['W']}" for r in ok
                      if (r["B"], r["C"], r["K"], r["dtype"]) == best}.items())
        ax.set_xticks([v for v, _ in res], [lab for _, lab in res])
        ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
        ax.set_xlabel("H x W (log of H*W)")
        ax.set_ylabel("median time (ms)")
        ax.set_title(mode)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    B, C, K, dt = best
    fig.suptitle(f"BR-NPA, B={B}, C={C}, K={K}, {dt}, {result['env']['device_name']}")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return None


def _atomic_write(path: Path, text: str):
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def run(config: Config) -> dict:
    start = time.perf_counter()
    device = torch.device(config.device)
    loadavg_start = os.getloadavg() if hasattr(os, "getloadavg") else None
    names = list(dict.fromkeys(p for g in config.groups for p in g.providers))
    avail = availability(names, device)
    providers_ok = {n for n, reason in avail.items() if reason is None}
    for n, reason in avail.items():
        if reason is not None:
            print(f"[bench] skipping {n}: {reason}", file=sys.stderr)
    copy_bw = timing.copy_bandwidth(device, config.copy_bytes, budget_s=min(0.5, max(config.budget_s, 0.05)))
    plan = expand(config, providers_ok)
    total = sum(len(m) for _, _, m in plan)
    bar = None
    if config.progress:
        try:
            from tqdm import tqdm

            bar = tqdm(total=total, desc=f"bench {config.preset}", unit="row", file=sys.stderr)
        except ImportError:
            bar = None
    rows, current, x = [], None, None
    timers = {} if config.rounds > 1 else None
    for case, provider, modes in plan:
        if case != current:
            x = None
            gc.collect()
            gc.freeze()  # later collections skip the (large) import-time heap
            if device.type == "cuda":
                torch.cuda.empty_cache()
            x = case.make_input()
            current = case
        if bar is not None:
            bar.set_postfix_str(f"{provider} {case.B}x{case.C}x{case.H}x{case.W} K={case.K} {_dtype_name(case.dtype)}")
        rows.extend(run_one(case, provider, modes, x, config, bar, timers))
    if bar is not None:
        bar.close()
    # Later rounds: every row once per round, in plan order, so that a burst of load on a shared
    # machine hits all providers alike; each row's statistics pool the samples of all rounds.
    for _ in range(1, config.rounds):
        for key, (row, f_time, t) in list(timers.items()):
            try:
                extra = _time(f_time, device, config, config.budget_s / config.rounds)
            except Exception as e:  # noqa: BLE001
                row["status"], row["error"] = "error", f"{type(e).__name__}: {e}"[:500]
                timers.pop(key)
                continue
            t = timing.from_samples(t.samples + extra.samples, t.method)
            timers[key] = (row, f_time, t)
            _set_timing(row, t)
    if timers:
        for row, _f, _t in timers.values():
            row["timing"]["rounds"] = config.rounds
        timers.clear()
    gc.unfreeze()
    add_ratios(rows)
    result = {
        "schema": SCHEMA,
        "preset": config.preset,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join(["python -m bench.run", *config.argv]),
        "env": environment(config.device),
        "config": {"budget_s": config.budget_s, "rounds": config.rounds, "min_reps": config.min_reps, "compile_backend": config.compile_backend,
                   "input": "relu(randn) NCHW contiguous, requires_grad",
                   "loss": "grad of output[0] (vectors / pooled (B,K,C)) against fixed randn",
                   "modes": {"forward": "training forward (inputs require grad)",
                             "backward": "autograd.grad of a retained graph",
                             "fwd+bwd": "forward then autograd.grad"},
                   "nominal_bytes": "forward (K+1)*|X|, backward 2*|X|, fwd+bwd (K+3)*|X|",
                   "peak_memory": "bytes allocated beyond what exists before the call (input, params, "
                                  "retained graph); CUDA max_memory_allocated, CPU torch.profiler memory events"},
        "copy_bandwidth": copy_bw,
        "providers": {n: {"family": PROVIDERS[n].family, "description": PROVIDERS[n].description,
                          "status": "ok" if avail[n] is None else f"skipped: {avail[n]}"} for n in names},
        "rows": rows,
        "scaling": scaling_fits(rows),
        "checks": check_targets(rows),
    }
    if loadavg_start is not None:
        result["loadavg"] = {"start": loadavg_start, "end": os.getloadavg()}
    result["duration_s"] = time.perf_counter() - start
    out = Path(config.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    alloc = _allocator_in_effect()
    stem = f"{device_tag(config.device)}-{config.preset}" + ("" if alloc == "default" else f"-alloc-{alloc}")
    if config.threads_suffix:
        stem += f"-{torch.get_num_threads()}thread"
    _atomic_write(out / f"{stem}.json", json.dumps(result, indent=1, default=str) + "\n")
    _atomic_write(out / f"{stem}.md", markdown(result))
    files = [str(out / f"{stem}.json"), str(out / f"{stem}.md")]
    if config.plot:
        reason = plot(result, out / f"{stem}.png")
        if reason:
            print(f"[bench] {reason}", file=sys.stderr)
        else:
            files.append(str(out / f"{stem}.png"))
    result["files"] = files
    return result


def _summary(result: dict) -> str:
    L = [f"[bench] {result['preset']} on {result['env']['device_name']}: {len(result['rows'])} rows in "
         f"{result['duration_s']:.0f} s; copy bandwidth {result['copy_bandwidth']['bytes_per_s'] / 1e9:.1f} GB/s"]
    if "loadavg" in result:
        L.append(f"[bench] load average start/end: {result['loadavg']['start'][0]:.2f} / {result['loadavg']['end'][0]:.2f}")
    errors = [r for r in result["rows"] if r.get("status") != "ok"]
    for r in errors:
        L.append(f"[bench] ERROR {r['provider']} {r['mode']} {r['B']}x{r['C']}x{r['H']}x{r['W']} K={r['K']} "
                 f"{r['dtype']}: {r.get('error')}")
    for c in result["checks"]:
        L.append(f"[bench] target {c['provider']}: {c['target']}: {c['ratio']:.3f}x (need {c['threshold']:.2f}x) "
                 f"{'MET' if c['ok'] else 'MISSED'}")
    L.append("[bench] wrote " + ", ".join(result["files"]))
    return "\n".join(L)


def parse_args(argv=None):
    ap = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__.split("\n\n")[0])
    sel = ap.add_mutually_exclusive_group()
    helps = {"quick": "the default: a small grid (< 2 min on a 2-core CPU, < 3 min on one H100)",
             "foundation": "issue 2: B=8 C=2048 28x28 K=3 fp32, library vs eager vs compiled, with target checks",
             "full": "the whole grid (for GPUs; long: one torch.compile per problem)",
             "micro": "tiny shapes, seconds (the smoke test)"}
    for name, text in helps.items():
        sel.add_argument(f"--{name}", dest="preset", action="store_const", const=name, help=text)
    ap.add_argument("--device", default=None, help="cpu or cuda[:i] (default: cuda when available)")
    ap.add_argument("--providers", help=f"comma list, from: {', '.join(PROVIDERS)}")
    ap.add_argument("--modes", help=f"comma list, from: {', '.join(MODES)}")
    ap.add_argument("--dtypes", help=f"comma list, from: {', '.join(DTYPES)}")
    ap.add_argument("--budget", type=float, help="timing seconds per row (default: the preset's)")
    ap.add_argument("--out", type=Path, default=RESULTS_DIR, help="output folder (default bench/results)")
    ap.add_argument("--no-plot", action="store_true")
    ap.add_argument("--no-progress", action="store_true")
    ap.add_argument("--no-memory", action="store_true", help="skip the peak-memory probes")
    ap.add_argument("--compile-backend", default="inductor", help="torch.compile backend of 'compiled'")
    ap.add_argument("--rounds", type=int, default=None,
                    help="time every row in N interleaved rounds, pooling the samples (default 3 for "
                         "--foundation, else 1)")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch.set_num_threads for CPU runs (default: torch's); 1 is robust on a shared machine")
    ap.add_argument("--allocator", default="default", choices=list(ALLOCATORS),
                    help="CPU allocator setting (re-executes the process with its environment); results get a suffix")
    args = ap.parse_args(argv)
    args.preset = args.preset or "quick"
    return args


def config_from_args(args, argv=()) -> Config:
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    groups, budget = preset_groups(args.preset, device)
    split = lambda s: [v.strip() for v in s.split(",") if v.strip()]  # noqa: E731
    want = split(args.providers) if args.providers else None
    in_any = {p for g in groups for p in g.providers}
    for g in groups:
        if want:  # keep the preset's placement; a provider it never uses joins every group
            g.providers = [p for p in want if p in g.providers or p not in in_any]
        if args.modes:
            g.modes = [m for m in split(args.modes) if m in MODES]
        if args.dtypes:
            g.dtypes = split(args.dtypes)
    unknown = [p for g in groups for p in g.providers if p not in PROVIDERS]
    if unknown:
        raise SystemExit(f"unknown provider(s) {unknown}; known: {', '.join(PROVIDERS)}")
    rounds = args.rounds or (3 if args.preset == "foundation" else 1)
    return Config(preset=args.preset, groups=groups, device=device, budget_s=args.budget or budget, rounds=rounds,
                  out_dir=args.out, plot=not args.no_plot, progress=not args.no_progress,
                  compile_backend=args.compile_backend,
                  measure_memory=not args.no_memory,
                  copy_bytes=(16 << 20) if args.preset == "micro" else None,
                  argv=list(argv), threads_suffix=bool(args.threads))


# CPU allocator settings (read by glibc / c10 at start-up, so ``main`` re-executes the process
# with them). Large tensors on CPU come from mmap and are returned on free: every fresh
# (B, N, C)-sized allocation pays page faults (about 20 ms per 50 MB here), which dominates any
# implementation that allocates big temporaries. "default" is what users get.
ALLOCATORS = {
    "default": {},
    "thp": {"THP_MEM_ALLOC_ENABLE": "1"},  # c10 madvise(MADV_HUGEPAGE) on >= 2 MB blocks
    "cached": {"MALLOC_MMAP_THRESHOLD_": str(1 << 40), "MALLOC_TRIM_THRESHOLD_": str(1 << 40)},  # glibc keeps freed memory
}
ALLOCATOR_VARS = sorted({k for v in ALLOCATORS.values() for k in v} | {"LD_PRELOAD"})


def _allocator_in_effect() -> str:
    for name, env in ALLOCATORS.items():
        if env and all(os.environ.get(k) == v for k, v in env.items()):
            return name
    return "default" if not any(os.environ.get(k) for k in ALLOCATOR_VARS) else "custom"


def main(argv=None) -> dict:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    if args.allocator != "default" and _allocator_in_effect() != args.allocator:
        env = {**os.environ, **ALLOCATORS[args.allocator]}
        print(f"[bench] re-running with allocator {args.allocator}: {ALLOCATORS[args.allocator]}", file=sys.stderr)
        sys.stdout.flush()
        os.execve(sys.executable, [sys.executable, "-m", "bench.run", *argv], env)
    if args.threads:
        torch.set_num_threads(args.threads)
    config = config_from_args(args, argv)
    result = run(config)
    print(_summary(result))
    return result


if __name__ == "__main__":
    main()
