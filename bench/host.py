"""The launchers' own Python cost per call, with no GPU: ``python -m bench.host [--out DIR]``.

On a GPU an eager call of the fused kernels costs the host more than the kernels cost the GPU
(``bench/results/gpu-nvidia-h200.md``). Part of that is Triton's dispatch of each launch, part
is ours: building the plan, laying out the workspace, allocating outputs and binding
arguments. This measures ours alone: ``triton_impl.forward`` / ``backward`` on CPU tensors with
the kernel launches replaced by a no-op, median of 7 repeats of 200 calls (with min and max).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch

SHAPES = [(8, 2048, 28, 28, 3), (32, 2048, 14, 14, 3)]


def _per_call_us(fn, calls: int = 200, repeats: int = 7) -> dict:
    fn()
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        samples.append((time.perf_counter() - start) / calls * 1e6)
    return {"median_us": statistics.median(samples), "min_us": min(samples), "max_us": max(samples)}


def measure(shapes=SHAPES, calls: int = 200, repeats: int = 7) -> list[dict]:
    from brnpa_triton.ops import triton_impl

    rows = []
    run = triton_impl._run
    triton_impl._run = lambda launch, args, **runtime: None  # the launches themselves are not ours
    try:
        for B, C, H, W, K in shapes:
            x = torch.rand(B, C, H * W)
            grads = (torch.rand(B, K, C), torch.rand(B, K, H * W), None, torch.rand(B, H * W))
            saved = triton_impl.forward(x, K, True).saved()
            rows.append({"shape": f"{B}x{C}x{H}x{W} K={K}", "layout": "nchw",
                         "forward": _per_call_us(lambda x=x, K=K: triton_impl.forward(x, K, True), calls, repeats),
                         "backward": _per_call_us(lambda x=x, g=grads, s=saved: triton_impl.backward(x, *g, s, True),
                                                  calls, repeats)})
    finally:
        triton_impl._run = run
    return rows


def main(argv=None) -> list[dict]:
    ap = argparse.ArgumentParser(prog="python -m bench.host", description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=None, help="write host-cpu.json / .md there")
    args = ap.parse_args(argv)
    rows = measure()
    lines = ["| shape | forward us (min-max) | backward us (min-max) |", "|---|---|---|"]
    for r in rows:
        f, b = r["forward"], r["backward"]
        lines.append(f"| {r['shape']} | {f['median_us']:.1f} ({f['min_us']:.1f}-{f['max_us']:.1f}) | "
                     f"{b['median_us']:.1f} ({b['min_us']:.1f}-{b['max_us']:.1f}) |")
    env = {"torch": torch.__version__, "python": platform.python_version(), "machine": platform.machine(),
           "threads": torch.get_num_threads()}
    print("\n".join(lines))
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "host-cpu.json").write_text(json.dumps({"environment": env, "rows": rows}, indent=1))
        (args.out / "host-cpu.md").write_text(
            "# Launcher host cost per call, kernel launches stubbed out (`python -m bench.host`)\n\n"
            f"torch {env['torch']}, Python {env['python']}, {env['machine']}.\n\n" + "\n".join(lines) + "\n")
    return rows


if __name__ == "__main__":
    main()
