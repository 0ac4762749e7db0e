"""Speed of the deletion / insertion evaluation: the library's batched ``deletion_insertion``
against a per-image loop written the way the paper's evaluation runs (one image at a time, one
cell changed and one forward pass per step), at the paper's geometry: 448 x 448 RGB images,
14 x 14 saliency maps, 196 steps per metric, on a small CNN.

    python -m bench.evaluation                 # results in a scratch directory
    python -m bench.evaluation --out bench/results   # evaluation-cpu.json / .md there

The loop is also a correctness check: its curves must equal ``protocol="authors"``'s (the
largest difference is recorded). Timings are wall-clock medians over ``--repeats`` runs with
their range; the load average before and after is recorded, since a busy machine slows both.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time

import torch
import torch.nn.functional as F
from torch import nn

from bench.environment import cpu_model, loadavg
from brnpa_triton.metrics import deletion_insertion


def _load_average() -> list[float] | None:
    load = loadavg()
    return None if load is None else [round(v, 2) for v in load]


def small_cnn(classes: int = 10) -> nn.Module:
    """Five stride-2 3x3 convolutions (448 -> 14), global average pooling, a linear layer."""
    widths = [3, 8, 16, 32, 32, 32]
    layers = []
    for cin, cout in zip(widths[:-1], widths[1:], strict=True):
        layers += [nn.Conv2d(cin, cout, 3, stride=2, padding=1), nn.ReLU()]
    return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(widths[-1], classes))


@torch.no_grad()
def per_image_loop(model, image: torch.Tensor, sal: torch.Tensor, metric: str, kernel: int = 121) -> list[float]:
    """One image (C, H, W), one (h, w) saliency: the score of the class predicted on the intact
    image after each step, one cell per step and one forward pass per step, as the paper's loop."""
    x = image[None].clone()
    probs = torch.softmax(model(x), dim=1)
    cls = int(probs.argmax(1))
    original = x.clone()
    if metric == "insertion":
        C = x.shape[1]
        box = torch.full((C, 1, kernel, kernel), 1.0 / kernel**2, dtype=x.dtype)
        x = F.conv2d(x, box, padding=kernel // 2, groups=C)
    remaining = sal.clone().float()
    lo, hi = remaining.min(), remaining.max()
    remaining = (remaining - lo) / (hi - lo) if hi > lo else torch.zeros_like(remaining)
    h, w = remaining.shape
    side = x.shape[-1] // w
    scores = []
    for _ in range(h * w):
        cell = int(remaining.view(-1).topk(1).indices[0])
        r, c = divmod(cell, w)
        rows, cols = slice(r * side, (r + 1) * side), slice(c * side, (c + 1) * side)
        if metric == "deletion":
            x[0, :, rows, cols] = 0
        else:
            x[0, :, rows, cols] = original[0, :, rows, cols]
        remaining[r, c] = -1
        scores.append(float(torch.softmax(model(x), dim=1)[0, cls]))
    return scores


def _timed(fn):
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


def run(
    images: int, loop_images: int, repeats: int, batch_size: int, size: int, grid: int, threads: int | None
) -> dict:
    if threads:
        torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = small_cnn().eval()
    g = torch.Generator().manual_seed(1)
    x = torch.rand(images, 3, size, size, generator=g)
    sal = torch.rand(images, 1, grid, grid, generator=g)
    load_before = _load_average()
    batched, loop, ratios = [], [], []
    max_diff = 0.0
    for rep in range(repeats):
        t_b, r = _timed(lambda: deletion_insertion(model, x, sal, protocol="authors", batch_size=batch_size))
        per_b = t_b / images
        t_l, curves = _timed(
            lambda: [
                (
                    per_image_loop(model, x[i], sal[i, 0], "deletion"),
                    per_image_loop(model, x[i], sal[i, 0], "insertion"),
                )
                for i in range(loop_images)
            ]
        )
        per_l = t_l / loop_images
        for i, (d, ins) in enumerate(curves):
            max_diff = max(max_diff, float((r.deletion[i] - torch.tensor(d)).abs().max()),
                           float((r.insertion[i] - torch.tensor(ins)).abs().max()))
        batched.append(per_b)
        loop.append(per_l)
        ratios.append(per_l / per_b)
        print(f"repeat {rep + 1}/{repeats}: batched {per_b:.3f} s/image, loop {per_l:.3f} s/image, "
              f"speed-up {per_l / per_b:.2f}x", file=sys.stderr, flush=True)
    t_lib, _ = _timed(lambda: deletion_insertion(model, x, sal, protocol="library", batch_size=batch_size))

    def spread(v):
        return {"median": statistics.median(v), "min": min(v), "max": max(v), "all": v}

    return {
        "what": "deletion + insertion (both curves) per image: batched deletion_insertion(protocol='authors') "
        "vs a per-image loop, one cell and one forward pass per step",
        "shape": {
            "images": [images, 3, size, size],
            "saliency": [images, 1, grid, grid],
            "steps_per_metric": grid * grid,
        },
        "model": "small CNN: 5 stride-2 3x3 convs (widths 8-16-32-32-32), global average pooling, linear (10 classes)",
        "batch_size": batch_size,
        "loop_images": loop_images,
        "repeats": repeats,
        "seconds_per_image": {
            "batched": spread(batched),
            "loop": spread(loop),
            "batched_library_protocol_single_run": t_lib / images,
        },
        "speedup": spread(ratios),
        "max_abs_curve_difference_loop_vs_authors_protocol": max_diff,
        "machine": {
            "cpu": cpu_model(),
            "logical_cpus": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__,
            "python": platform.python_version(),
            "platform": platform.platform(),
            "load_average_before": load_before,
            "load_average_after": _load_average(),
        },
    }


def markdown(res: dict) -> str:
    s, m = res["seconds_per_image"], res["machine"]
    busy = ""
    if (
        m["load_average_before"]
        and m["logical_cpus"]
        and max(m["load_average_before"][0], m["load_average_after"][0]) > 0.5 * m["logical_cpus"]
    ):
        busy = (
            f"\n**Busy machine**: load average {m['load_average_before']} before, {m['load_average_after']} after, on "
            f"{m['logical_cpus']} logical CPUs; both paths ran slower, and the ratio is the figure to read.\n"
        )
    shape, b, loop, speedup = res["shape"], s["batched"], s["loop"], res["speedup"]
    return f"""# Deletion / insertion evaluation speed (CPU)

{res['what']}. Images {shape['images']} (loop: first {res['loop_images']}), saliency {shape['saliency']},
{shape['steps_per_metric']} steps per metric; {res['model']}; batch size {res['batch_size']}; {res['repeats']} repeats.

| path | seconds per image, median | min | max |
|---|---|---|---|
| batched `deletion_insertion(protocol="authors")` | {b['median']:.3f} | {b['min']:.3f} | {b['max']:.3f} |
| per-image loop (one cell, one forward per step) | {loop['median']:.3f} | {loop['min']:.3f} | {loop['max']:.3f} |

Speed-up of the batched path: **{speedup['median']:.2f}x** median (range {speedup['min']:.2f}x to
{speedup['max']:.2f}x over the repeats). `protocol="library"` (one more point per curve), one run:
{s['batched_library_protocol_single_run']:.3f} s per image. Largest difference between the loop's curves and
`protocol="authors"`: {res['max_abs_curve_difference_loop_vs_authors_protocol']:.2e}.
{busy}
Machine: {m['cpu']}, {m['logical_cpus']} logical CPUs, torch {m['torch']} with {m['torch_threads']} threads,
Python {m['python']}, {m['platform']}. Load average {m['load_average_before']} before, {m['load_average_after']} after.
"""


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(prog="python -m bench.evaluation", description=__doc__.splitlines()[0])
    p.add_argument("--out", default=None, help="directory for evaluation-cpu.json/.md (default: a scratch directory)")
    p.add_argument("--images", type=int, default=4, help="images for the batched path (default: %(default)s)")
    p.add_argument("--loop-images", type=int, default=2, help="images for the per-image loop (default: %(default)s)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--size", type=int, default=448, help="image side (default: the paper's 448)")
    p.add_argument("--grid", type=int, default=14, help="saliency map side (default: the paper's 14)")
    p.add_argument("--threads", type=int, default=None)
    a = p.parse_args(argv)
    if a.loop_images > a.images:
        p.error("--loop-images must not exceed --images")
    res = run(a.images, a.loop_images, a.repeats, a.batch_size, a.size, a.grid, a.threads)
    res["command"] = "python -m bench.evaluation " + " ".join(sys.argv[1:] if argv is None else argv)
    out = a.out or os.path.join(tempfile.gettempdir(), "brnpa_bench_evaluation")
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "evaluation-cpu.json"), "w") as f:
        json.dump(res, f, indent=1)
    with open(os.path.join(out, "evaluation-cpu.md"), "w") as f:
        f.write(markdown(res))
    print(markdown(res))
    print(f"wrote {os.path.join(out, 'evaluation-cpu.json')} and .md")
    return res


if __name__ == "__main__":
    main()
