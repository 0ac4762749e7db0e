"""What ``python -m bench.gpu`` writes: ``gpu-<device>.json``, ``gpu-<device>.md`` and the short
table printed last. Pure functions of the result record (no device needed)."""

from __future__ import annotations

import json
import math
from pathlib import Path

SCHEMA = "brnpa-bench-gpu/1"
PROVIDERS = ("ours", "compile", "eager")
# Every measured row has these (None where the measurement was skipped or failed).
ROW_KEYS = ("shape", "K", "dtype", "layout", "device", "ours_fwd_us", "compile_fwd_us", "ours_step_us",
            "compile_step_us", "ours_eager_step_us", "floor_one_read_us")
MD_KERNELS = 12  # longest kernels per call listed in the markdown (the JSON has all)
GENERATED_MARK = "<!-- written by python -m bench.gpu; a run replaces it -->"


def slug(text: str) -> str:
    """File-name slug: lower case, runs of other characters as one '-' ("NVIDIA H200" -> "nvidia-h200")."""
    out = "".join(c if c.isalnum() else "-" for c in text.lower()).strip("-")
    while "--" in out:
        out = out.replace("--", "-")
    return out or "unknown"


def output_paths(out_dir: Path, device_slug: str) -> dict[str, Path]:
    return {ext: Path(out_dir) / f"gpu-{device_slug}.{ext}" for ext in ("json", "md")}


def measured_keys(provider: str) -> list[str]:
    """The timing fields one provider contributes to a row."""
    keys = []
    for mode in ("fwd", "step"):
        keys += [f"{provider}_{mode}_us", f"{provider}_{mode}_min_us", f"{provider}_{mode}_max_us",
                 f"{provider}_eager_{mode}_us", f"{provider}_eager_{mode}_min_us", f"{provider}_eager_{mode}_max_us",
                 f"{provider}_host_{mode}_us"]
    return keys


def kernel_bandwidth(kernels: list[dict], planned_bytes: dict[str, int], peak_bytes_per_s: float | None) -> list[dict]:
    """Each profiled kernel with, where the launch plan says how many bytes one launch moves,
    its bytes per call, achieved GB/s and share of the measured peak read bandwidth."""
    out = []
    for k in kernels:
        row = dict(k)
        per_launch = planned_bytes.get(k["name"])
        if per_launch is not None and k["us"] > 0:
            row["bytes"] = per_launch * k["launches"]
            row["GBps"] = row["bytes"] / (k["us"] * 1e-6) / 1e9
            if peak_bytes_per_s:
                row["pct_peak"] = 100 * row["bytes"] / (k["us"] * 1e-6) / peak_bytes_per_s
        out.append(row)
    return out


def floors(row: dict) -> dict:
    """BR-NPA's bandwidth floors from the measured one-read time: (K+1) reads of X forward,
    (K+3) reads and writes of X for forward + backward, and the bandwidth of that one read."""
    one = row.get("floor_one_read_us")
    if one is None:
        return {}
    return {"floor_fwd_us": (row["K"] + 1) * one, "floor_step_us": (row["K"] + 3) * one,
            "floor_one_read_GBps": row["x_bytes"] / (one * 1e-6) / 1e9}


def _f(value, digits=1) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "-"
    return f"{value:.{digits}f}"


def _ratio(num, den) -> str:
    if not num or not den:
        return "-"
    return f"{num / den:.2f}x"


def _label(row: dict) -> str:
    B, C, H, W = row["shape"]
    return f"{B}x{C}x{H}x{W} K={row['K']}"


def _skips(row: dict) -> str:
    return "; ".join(f"{k}: {v}" for k, v in {**row.get("skipped", {}), **row.get("errors", {})}.items())


def render_markdown(result: dict) -> str:
    env = result["env"]
    peak = result.get("peak_read") or {}
    L = [GENERATED_MARK, "", f"# BR-NPA on {env.get('device_name')} (`python -m bench.gpu`)", "",
         f"torch {env.get('torch')}, triton {env.get('triton')}, CUDA {env.get('cuda')}, git "
         f"{(env.get('git_commit') or '?')[:10]}{' (dirty)' if env.get('git_dirty') else ''}, {result['created']}. "
         f"{len(result['rows'])} rows in {_f(result.get('duration_s'), 0)} s of a {_f(result['budget_s'], 0)} s budget"
         f"{'' if result.get('complete') else ' (run cut short: rows missing)'}.",
         "",
         f"Timer: {result['timer']}. Times are medians in microseconds per call; inputs rotate over "
         f"{result['config']['copies']} copies of X so that no call finds X in L2. *fwd*: a training forward (X "
         "requires grad); *step*: forward + `torch.autograd.grad` of `(vectors*gv).sum() + (maps*gm).sum()` "
         "w.r.t. X. *GPU* columns are CUDA-graph replays (no host overhead); *eager* columns are back-to-back "
         "calls timed until the GPU is idle (host cost included). *floor*: a sum over X (one read), measured on "
         "this device; BR-NPA's floors are (K+1) of them forward and (K+3) for the step.", ""]
    if peak:
        L += [f"Peak read bandwidth (sum over a {peak['bytes'] / 2**20:.0f} MiB buffer): "
              f"{peak['bytes_per_s'] / 1e9:.0f} GB/s.", ""]
    L += ["| problem | dtype | layout | floor 1 read | ours fwd | compile fwd | eager fwd | ours step | compile step "
          "| eager step | ours eager step | compile eager step | eager eager step | compile/ours fwd | "
          "compile/ours step | compile/ours eager step | notes |",
          "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        g = r.get
        L.append(f"| {_label(r)} | {r['dtype']} | {r['layout']} | {_f(g('floor_one_read_us'))} | "
                 f"{_f(g('ours_fwd_us'))} | {_f(g('compile_fwd_us'))} | {_f(g('eager_fwd_us'))} | "
                 f"{_f(g('ours_step_us'))} | {_f(g('compile_step_us'))} | {_f(g('eager_step_us'))} | "
                 f"{_f(g('ours_eager_step_us'))} | {_f(g('compile_eager_step_us'))} | {_f(g('eager_eager_step_us'))} | "
                 f"{_ratio(g('compile_fwd_us'), g('ours_fwd_us'))} | "
                 f"{_ratio(g('compile_step_us'), g('ours_step_us'))} | "
                 f"{_ratio(g('compile_eager_step_us'), g('ours_eager_step_us'))} | {_skips(r)} |")
    L += ["", "Ratios above 1: ours is faster.", "", "## Our kernels", "",
          "GPU time per call of each kernel (profiler, eager calls), its launches per call, and the bytes its "
          f"launch plan reads and writes (X and the small buffers) over that time; the {MD_KERNELS} longest per "
          "call (the JSON has them all).", "",
          "| problem | dtype | layout | call | kernel | launches | us | MB | GB/s | % peak read |",
          "|---|---|---|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        for mode in ("fwd", "step"):
            for k in (r.get("ours_kernels") or {}).get(mode, [])[:MD_KERNELS]:
                mb = _f(k["bytes"] / 1e6) if "bytes" in k else "-"
                L.append(f"| {_label(r)} | {r['dtype']} | {r['layout']} | {mode} | `{k['name']}` | "
                         f"{_f(k['launches'], 0)} | {_f(k['us'])} | {mb} | {_f(k.get('GBps'), 0)} | "
                         f"{_f(k.get('pct_peak'), 0)} |")
    if result.get("skipped"):
        L += ["", "## Skipped", ""] + [f"- {s['what']}: {s['reason']}" for s in result["skipped"]]
    return "\n".join(L) + "\n"


def render_table(result: dict) -> str:
    """The short console table: GPU and eager times, us."""
    head = (f"{'problem':22} {'dtype':8} {'layout':13} {'floor':>7} {'ours f':>8} {'cmp f':>8} {'ours s':>8} "
            f"{'cmp s':>8} {'ours es':>8} {'cmp es':>8}")
    L = [f"== bench.gpu on {result['env'].get('device_name')} ({result['timer']}; us; f fwd, s step, "
         f"es eager step) ==", head]
    for r in result["rows"]:
        g = r.get
        L.append(f"{_label(r):22} {r['dtype']:8} {r['layout']:13} {_f(g('floor_one_read_us')):>7} "
                 f"{_f(g('ours_fwd_us')):>8} {_f(g('compile_fwd_us')):>8} {_f(g('ours_step_us')):>8} "
                 f"{_f(g('compile_step_us')):>8} {_f(g('ours_eager_step_us')):>8} {_f(g('compile_eager_step_us')):>8}")
    if result.get("skipped"):
        L.append(f"skipped: {len(result['skipped'])} (see the .md)")
    return "\n".join(L)


def write(result: dict, out_dir: Path) -> dict[str, Path]:
    """Write the JSON and the markdown; a hand-written markdown of the same name is kept (the
    generated one then goes next to it, ``-bench`` added to its name)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = output_paths(out_dir, result["device"])
    md = paths["md"]
    if md.exists() and not md.read_text(errors="replace").startswith(GENERATED_MARK):
        paths["md"] = md.with_name(md.stem + "-bench.md")
    paths["json"].write_text(json.dumps(result, indent=1, default=str) + "\n")
    paths["md"].write_text(render_markdown(result))
    return paths
