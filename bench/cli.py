"""The command line of ``python -m bench.run``: flags to a ``Config``, run, console summary."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from bench.environment import ALLOCATORS, reexec_with_allocator
from bench.presets import DTYPES, MODES, SCRATCH_DIR, Config, preset_groups
from bench.providers import PROVIDERS
from bench.runner import run

DESCRIPTION = "One command for every BR-NPA benchmark number (guide: bench/README.md)."
PRESET_HELP = {
    "quick": "the default: a small grid (0.5-3 min on a 2-core CPU, see bench/README.md)",
    "foundation": "B=8 C=2048 28x28 K=3 fp32, library vs eager vs compiled, with the target checks",
    "full": "the whole grid (for GPUs; long: one torch.compile per problem)",
    "micro": "tiny shapes, seconds (the smoke test)",
}


def parse_args(argv=None):
    ap = argparse.ArgumentParser(prog="python -m bench.run", description=DESCRIPTION)
    sel = ap.add_mutually_exclusive_group()
    for name, text in PRESET_HELP.items():
        sel.add_argument(f"--{name}", dest="preset", action="store_const", const=name, help=text)
    ap.add_argument("--device", default=None, help="cpu or cuda[:i] (default: cuda when available)")
    ap.add_argument("--providers", help=f"comma list, from: {', '.join(PROVIDERS)}")
    ap.add_argument("--modes", help=f"comma list, from: {', '.join(MODES)}")
    ap.add_argument("--dtypes", help=f"comma list, from: {', '.join(DTYPES)}")
    ap.add_argument("--budget", type=float, help="timing seconds per row (default: the preset's)")
    ap.add_argument("--out", type=Path, default=SCRATCH_DIR,
                    help=f"output folder (default {SCRATCH_DIR}, a scratch folder; "
                         "--out bench/results replaces the committed results)")
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


def summary(result: dict) -> str:
    L = [f"[bench] {result['preset']} on {result['env']['device_name']}: {len(result['rows'])} rows in "
         f"{result['duration_s']:.0f} s; copy bandwidth {result['copy_bandwidth']['bytes_per_s'] / 1e9:.1f} GB/s"]
    if "loadavg" in result:
        L.append(f"[bench] load average start/end: {result['loadavg']['start'][0]:.2f} / "
                 f"{result['loadavg']['end'][0]:.2f}")
    for r in result["rows"]:
        if r.get("status") != "ok":
            L.append(f"[bench] ERROR {r['provider']} {r['mode']} {r['B']}x{r['C']}x{r['H']}x{r['W']} K={r['K']} "
                     f"{r['dtype']}: {r.get('error')}")
    for c in result["checks"]:
        L.append(f"[bench] target {c['provider']}: {c['target']}: {c['ratio']:.3f}x (need {c['threshold']:.2f}x) "
                 f"{'MET' if c['ok'] else 'MISSED'}")
    L.append("[bench] wrote " + ", ".join(result["files"]))
    return "\n".join(L)


def main(argv=None) -> dict:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    reexec_with_allocator(args.allocator, argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    result = run(config_from_args(args, argv))
    print(summary(result))
    return result
