"""What the rows mean together: ratios between providers of one problem, scaling slopes, the
foundation targets, and whether the machine was too busy to trust the times."""

from __future__ import annotations

import json
import math

from bench.presets import FOUNDATION
from bench.providers import PRIMARY_ORDER

# How many times faster than torch.compile of the eager code the library must be on CPU, per mode
# (bench.cpu_ratio measures exactly these, with their spread).
COMPILED_TARGETS = {"forward": 1.2, "fwd+bwd": 4.0}
# The library's targets at the foundation problem:
# (name, mode, metric, other provider, threshold on metric(other) / metric(library)).
TARGETS = [
    ("forward: >= 10x faster than eager", "forward", "time", "eager", 10.0),
    ("forward: >= 1.2x faster than compiled", "forward", "time", "compiled", COMPILED_TARGETS["forward"]),
    ("fwd+bwd: >= 10x faster than eager", "fwd+bwd", "time", "eager", 10.0),
    ("fwd+bwd: >= 4x faster than compiled", "fwd+bwd", "time", "compiled", COMPILED_TARGETS["fwd+bwd"]),
    ("fwd+bwd peak memory <= half of eager's", "fwd+bwd", "memory", "eager", 2.0),
]


def problem_key(r: dict) -> tuple:
    return (r["mode"], r["B"], r["C"], r["H"], r["W"], r["K"], r["dtype"])


def add_ratios(rows: list) -> None:
    """time_vs[p] = t(p) / t(row): > 1 means this row is that many times faster than p;
    mem_vs[p] likewise for peak memory (> 1: this row uses that many times less)."""
    by_problem = {}
    for r in rows:
        if r.get("status") == "ok":
            by_problem.setdefault(problem_key(r), []).append(r)
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
            slope = sum((a - mx) * (b - my) for a, b in zip(lx, ly, strict=True)) / sxx
            fits.append({"variable": var, "fixed": json.loads(key), "points": pts, "slope": slope})
    return fits


def primary_provider(rows_or_names) -> str | None:
    """The library provider the ratio columns are against (Triton when it ran, else torch)."""
    names = {r["provider"] if isinstance(r, dict) else r for r in rows_or_names}
    return next((p for p in PRIMARY_ORDER if p in names), None)


def check_targets(rows: list) -> list:
    """The targets, for every library provider present at the foundation problem."""
    checks = []
    fb = FOUNDATION
    sel = [r for r in rows if r.get("status") == "ok" and all(r[k] == fb[k] for k in fb)]
    for lib in PRIMARY_ORDER:
        for name, mode, metric, other, thr in TARGETS:
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


def busy_warning(result: dict) -> str | None:
    """One line when a CPU run's 1-minute load average exceeded half the cores at its start or
    end (its times are then inflated unevenly), else None."""
    env, la = result.get("env", {}), result.get("loadavg")
    if la is None or env.get("device") != "cpu":
        return None
    cpus = env.get("cpu_count") or 1
    if max(la["start"][0], la["end"][0]) <= 0.5 * cpus:
        return None
    return (f"busy machine: load average {la['start'][0]:.2f} / {la['end'][0]:.2f} (start / end) "
            f"on {cpus} CPUs; times are inflated unevenly")
