"""Writing a result: the JSON record, the markdown tables and the time-vs-resolution plot
(median with p20-p80 error bars, and the busy-machine warning when there is one)."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch

from bench import analysis
from bench.environment import allocator_in_effect, device_tag
from bench.presets import MODES, Config
from bench.providers import PRIMARY_ORDER, PROVIDERS


def file_stem(config: Config) -> str:
    """``<device>-<preset>``, with the allocator and thread count when not the defaults."""
    alloc = allocator_in_effect()
    stem = f"{device_tag(config.device)}-{config.preset}" + ("" if alloc == "default" else f"-alloc-{alloc}")
    if config.threads_suffix:
        stem += f"-{torch.get_num_threads()}thread"
    return stem


def _atomic_write(path: Path, text: str):
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def write(result: dict, config: Config) -> list:
    """Write ``<stem>.json``, ``.md`` and (unless disabled or impossible) ``.png`` under
    ``config.out_dir``; returns the paths written."""
    out = Path(config.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    stem = file_stem(config)
    _atomic_write(out / f"{stem}.json", json.dumps(result, indent=1, default=str) + "\n")
    _atomic_write(out / f"{stem}.md", markdown(result))
    files = [str(out / f"{stem}.json"), str(out / f"{stem}.md")]
    if config.plot:
        reason = plot(result, out / f"{stem}.png")
        if reason:
            print(f"[bench] {reason}", file=sys.stderr)
        else:
            files.append(str(out / f"{stem}.png"))
    return files


# --------------------------------------------------------------------------------------------
# Markdown
# --------------------------------------------------------------------------------------------


def _fmt_ms(v):
    return f"{v:.3g}" if v < 100 else f"{v:.0f}"


def _fmt_bytes(b):
    return f"{b / 2**20:.1f}"


def _fmt_ratio(v):
    return "" if v is None else (f"{v:.2f}" if v < 10 else f"{v:.1f}")


def _speed_vs(r: dict, primary: str, key: str) -> float | None:
    """``1 / r[key][primary]``: 1 for the primary itself, None where the ratio was not measured."""
    if r["provider"] == primary:
        return 1.0
    return 1 / r[key][primary] if primary in r.get(key, {}) else None


def markdown(result: dict) -> str:
    env = result["env"]
    rows = result["rows"]
    copy_bw = result["copy_bandwidth"]["bytes_per_s"]
    primary = analysis.primary_provider([r for r in rows if r.get("status") == "ok"])
    L = [f"# BR-NPA benchmark: preset `{result['preset']}` on {env['device_name']} ({env['device']})", ""]
    L.append(f"torch {env['torch']}, triton {env['triton']}, {env['torch_threads']} torch threads, "
             f"commit `{(env['git_commit'] or '?')[:12]}`{' (dirty tree)' if env['git_dirty'] else ''}, "
             f"{result['created']}, {result['duration_s']:.0f} s, CPU allocator `{env.get('allocator')}`.  ")
    if "loadavg" in result:
        la = result["loadavg"]
        L.append(f"Load average (1 min) at start / end: {la['start'][0]:.2f} / {la['end'][0]:.2f} "
                 f"on {env['cpu_count']} CPUs.  ")
        if analysis.busy_warning(result):
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
        L += ["## Targets at the foundation problem (B=8, C=2048, 28x28, K=3, float32)", "",
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
            tv, mv = (_speed_vs(r, primary, key) for key in ("time_vs", "mem_vs"))
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
        L += [
            "## Scaling: log-log slope of time",
            "",
            "Time ~ value^slope with everything else fixed (1.0 = linear; a memory-bound BR-NPA "
            "should be ~1 in H*W, C and B, and below 1 in K while the K+1 passes do not dominate).",
            "",
            "| variable | provider | mode | dtype | fixed | points (value: ms) | slope |",
            "|---|---|---|---|---|---|---|",
        ]
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


# --------------------------------------------------------------------------------------------
# Plot
# --------------------------------------------------------------------------------------------


def plot_data(result: dict) -> dict | None:
    """What the plot shows, without drawing it: the (B, C, K, dtype) with the most resolutions,
    and per mode and provider the points (H*W, median, p20, p80) in ms; None when fewer than two
    resolutions ran."""
    ok = [r for r in result["rows"] if r.get("status") == "ok"]
    series = {}
    for r in ok:
        series.setdefault((r["B"], r["C"], r["K"], r["dtype"]), set()).add(r["H"] * r["W"])
    if not series:
        return None
    best = max(series, key=lambda k: (len(series[k]), k[3] == "float32"))
    if len(series[best]) < 2:
        return None
    sel = [r for r in ok if (r["B"], r["C"], r["K"], r["dtype"]) == best]
    panels = {}
    for mode in MODES:
        lines = {}
        for prov in PROVIDERS:
            pts = sorted((r["H"] * r["W"], r["timing"]["median_ms"], r["timing"]["p20_ms"], r["timing"]["p80_ms"])
                         for r in sel if r["mode"] == mode and r["provider"] == prov)
            if len(pts) >= 2:
                lines[prov] = pts
        if lines:
            panels[mode] = lines
    B, C, K, dt = best
    return {
        "problem": dict(B=B, C=C, K=K, dtype=dt),
        "resolutions": sorted({r["H"] * r["W"]: f"{r['H']}x{r['W']}" for r in sel}.items()),
        "panels": panels,
        "title": f"BR-NPA, B={B}, C={C}, K={K}, {dt}, {result['env']['device_name']}",
        "warning": analysis.busy_warning(result),
    }


def figure(result: dict):
    """The matplotlib figure of ``plot_data``: one panel per mode, median time against H*W on
    log axes with p20-p80 error bars, the busy-machine warning in red under the title."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    data = plot_data(result)
    if data is None:
        return None
    modes = list(data["panels"])
    fig, axes = plt.subplots(1, len(modes), figsize=(5 * len(modes), 4.4), squeeze=False)
    for ax, mode in zip(axes[0], modes, strict=True):
        for prov, pts in data["panels"][mode].items():
            hw = [p[0] for p in pts]
            med = [p[1] for p in pts]
            err = [[p[1] - p[2] for p in pts], [p[3] - p[1] for p in pts]]
            ax.errorbar(hw, med, yerr=err, marker="o", capsize=3, label=prov)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xticks([v for v, _ in data["resolutions"]], [lab for _, lab in data["resolutions"]])
        ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
        ax.set_xlabel("H x W (log of H*W)")
        ax.set_ylabel("time (ms): median, bars p20-p80")
        ax.set_title(mode)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(data["title"])
    if data["warning"]:
        fig.text(0.5, 0.005, "WARNING: " + data["warning"], ha="center", va="bottom", color="red", fontsize=9)
    fig.tight_layout(rect=(0, 0.04 if data["warning"] else 0, 1, 1))
    return fig


def plot(result: dict, path: Path) -> str | None:
    """Save ``figure(result)`` to ``path``; returns a reason when skipped."""
    try:
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib not installed (pip install matplotlib): plot skipped"
    fig = figure(result)
    if fig is None:
        return "fewer than two resolutions in this run: plot skipped"
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return None
