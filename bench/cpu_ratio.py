"""The CPU comparison the torch backend's targets are stated in: ``brnpa-torch`` against
``compiled`` (torch.compile of ``bench.providers.brnpa_eager``, inductor) at the foundation
problem (B=8, C=2048, 28x28, K=3, float32), forward and fwd+bwd, on 1 and 2 threads.

Each thread count runs in its own process (inductor fixes its thread count at compile time).
Each repeat times every (provider, mode) once more, interleaved, so that a burst of load hits
both alike; a repeat's ratio is time(compiled) / time(brnpa-torch) of that repeat. Printed: the
median and the min-max of the ratios and of the times, with the load average before and after.

    python -m bench.cpu_ratio                       # threads 1,2; 5 repeats of 1 s per row
    python -m bench.cpu_ratio --threads 1 --repeats 7 --budget 2
    python -m bench.cpu_ratio --out bench/results   # also writes cpu-ratio.{json,md} there
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys

import torch

from bench.analysis import COMPILED_TARGETS
from bench.environment import environment
from bench.presets import FOUNDATION_SHAPE
from bench.providers import PROVIDERS, Case
from bench.runner import _mode_callable
from bench.timing import time_cpu

PROVIDER_NAMES = ("brnpa-torch", "compiled")
MODE_NAMES = ("forward", "fwd+bwd")
# brnpa-torch must be at least this many times faster than compiled.
TARGETS = COMPILED_TARGETS


def _load() -> str:
    return " ".join(f"{v:.2f}" for v in os.getloadavg())


def measure(threads: int, repeats: int, budget_s: float) -> dict:
    """Times (ms) per repeat of every (provider, mode), in this process, on ``threads`` threads."""
    torch.set_num_threads(threads)
    case = Case(*FOUNDATION_SHAPE)
    x = case.make_input()
    calls = {}
    for name in PROVIDER_NAMES:
        built = PROVIDERS[name].build(case)
        for mode in MODE_NAMES:
            f = _mode_callable(built, x, mode)
            f()  # compiles (compiled), warms caches
            calls[name, mode] = f
    load_start = _load()
    times = {key: [] for key in calls}
    for _ in range(repeats):
        for key, f in calls.items():
            times[key].append(time_cpu(f, budget_s=budget_s).median_ms)
    return {"threads": threads, "load_start": load_start, "load_end": _load(),
            "times": {f"{p}|{m}": v for (p, m), v in times.items()}}


def _spread(values) -> str:
    return f"{statistics.median(values):.3g} ({min(values):.3g}-{max(values):.3g})"


def summarise(result: dict) -> list[str]:
    times = {tuple(k.split("|")): v for k, v in result["times"].items()}
    lines = [f"threads={result['threads']}  load avg (1/5/15 min) start {result['load_start']}, "
             f"end {result['load_end']}  on {os.cpu_count()} CPUs"]
    for mode in MODE_NAMES:
        lib, comp = times["brnpa-torch", mode], times["compiled", mode]
        ratios = [c / t for c, t in zip(comp, lib, strict=True)]
        met = "met" if statistics.median(ratios) >= TARGETS[mode] else "NOT met"
        lines.append(f"  {mode:8s} brnpa-torch {_spread(lib)} ms, compiled {_spread(comp)} ms, "
                     f"ratio compiled/torch {_spread(ratios)} over {len(ratios)} repeats "
                     f"(target >= {TARGETS[mode]}x: {met})")
    return lines


def main(argv=None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", default="1,2", help="comma list of torch thread counts")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--budget", type=float, default=1.0, help="timing seconds per row per repeat")
    ap.add_argument("--out", default=None, help="folder for cpu-ratio.json and cpu-ratio.md (default: print only)")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        print(json.dumps(measure(int(args.threads), args.repeats, args.budget)))
        return []
    results, lines = [], []
    header = f"[cpu_ratio] B,C,H,W,K = {FOUNDATION_SHAPE}, float32, torch {torch.__version__}"
    print(header)
    for threads in (int(t) for t in args.threads.split(",")):
        cmd = [sys.executable, "-m", "bench.cpu_ratio", "--child", "--threads", str(threads),
               "--repeats", str(args.repeats), "--budget", str(args.budget)]
        done = subprocess.run(cmd, check=True, capture_output=True, text=True)
        result = json.loads(done.stdout.strip().splitlines()[-1])
        results.append(result)
        lines += summarise(result)
        print("\n".join(summarise(result)), flush=True)
    if args.out:
        write(args.out, results, [header, *lines], vars(args))
    return results


def write(folder: str, results: list[dict], lines: list[str], options: dict) -> None:
    """cpu-ratio.json (every repeat's times, the environment) and cpu-ratio.md (the summary)."""
    os.makedirs(folder, exist_ok=True)
    env = environment("cpu")
    record = {"shape": FOUNDATION_SHAPE, "dtype": "float32", "targets": TARGETS, "options": options,
              "environment": env, "results": results}
    with open(os.path.join(folder, "cpu-ratio.json"), "w") as f:
        json.dump(record, f, indent=1)
    with open(os.path.join(folder, "cpu-ratio.md"), "w") as f:
        f.write(f"# brnpa-torch against torch.compile on CPU ({env['device_name']}, {env['cpu_count']} CPUs)\n\n")
        f.write(f"`python -m bench.cpu_ratio --threads {options['threads']} --repeats {options['repeats']} "
                f"--budget {options['budget']}` at commit {env['git_commit']}"
                f"{' (with uncommitted changes)' if env['git_dirty'] else ''}. Times in ms: median (min-max) "
                "over the repeats; a repeat's ratio is time(compiled) / time(brnpa-torch) of that repeat.\n\n")
        f.write("```\n" + "\n".join(lines) + "\n```\n")


if __name__ == "__main__":
    main()
