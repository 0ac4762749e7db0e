"""End-to-end demo: a small CNN with the BR-NPA head trained on cluttered handwritten digits.

``python -m brnpa_triton`` (or ``python -m brnpa_triton.demo``) trains one model per training seed
on CPU (three seeds in a few minutes), then reports, as mean ± std over the seeds: test accuracy,
sparsity, the pointing game (ties counted Quantus's way and strictly) and deletion / insertion AUCs
of BR-NPA saliency against Grad-CAM, Grad-CAM++, HiResCAM, XGrad-CAM, Score-CAM, RISE and random
saliency on the same model and images; BR-NPA's AUCs under the authors' protocol too. Writes
``overlays.png`` (first seed's model), ``results.json`` and ``model.pt`` (first seed's weights) to
``--out`` (default ``demo_out/``). Needs the ``demo`` extra (scikit-learn; matplotlib for the
figure and tqdm for progress, both optional). The same seeds and thread count repeat the figures
exactly on one machine; another CPU rounds differently and training drifts (see the spread).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import time

import numpy as np
import torch

__all__ = ["DemoConfig", "run_demo", "main"]


@dataclasses.dataclass
class DemoConfig:
    out: str = "demo_out"
    seeds: tuple[int, ...] = (0, 1, 2)  # training seeds (weights, training canvases, shuffling)
    data_seed: int = 0  # the train/test split and the test canvases, the same for every seed
    epochs: int = 8
    batch_size: int = 64
    lr: float = 3e-3
    weight_decay: float = 5e-4
    copies: int = 2  # canvases per training digit per epoch (fresh each epoch)
    width: int = 16  # backbone width: feature map has 4 * width channels
    num_parts: int = 3
    dropout: float = 0.1
    canvas: int = 48
    digit_size: int = 16
    strokes: int = 6
    blobs: int = 4
    noise: float = 0.08
    test_fraction: float = 0.25
    max_train: int | None = None  # cap on training digits (tests use a handful)
    max_test: int | None = None
    eval_images: int = 64  # test images whose explanations are scored (every method, same images)
    di_step: int = 4  # feature-map cells changed per deletion / insertion step
    di_batch: int = 512
    rise_masks: int = 256
    insertion_kernel: int | None = None  # None: the paper's 121 px on 448 px, scaled to the canvas
    overlays: int = 5  # rows of the figure (0: no figure)
    threads: int | None = None
    progress: bool = True


def scaled_kernel(canvas: int) -> int:
    """The paper's 121 x 121 blur on 448 x 448 images, scaled to ``canvas`` pixels (odd, >= 3)."""
    k = int(round(121 * canvas / 448))
    return max(3, k if k % 2 == 1 else k + 1)


def run_demo(config: DemoConfig | None = None, *, verbose: bool = True) -> dict:
    """Train one model per seed, evaluate each, write the outputs; returns the figures (also in
    ``results.json``)."""
    from brnpa_triton.demo.data import load_digit_arrays, make_canvases, split_indices
    from brnpa_triton.demo.figure import write_figure
    from brnpa_triton.demo.model import last_layer, make_model
    from brnpa_triton.demo.report import evaluate, format_report, markdown_summary, summarize
    from brnpa_triton.demo.train import train

    cfg = config or DemoConfig()
    seeds = [int(s) for s in cfg.seeds]
    if not seeds:
        raise ValueError("seeds must name at least one training seed")
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    kernel = cfg.insertion_kernel or scaled_kernel(cfg.canvas)
    t0 = time.perf_counter()
    os.makedirs(cfg.out, exist_ok=True)
    digits, labels = load_digit_arrays()
    train_idx, test_idx = split_indices(labels, cfg.test_fraction, cfg.data_seed)
    train_idx, test_idx = train_idx[: cfg.max_train], test_idx[: cfg.max_test]
    canvas_kwargs = dict(
        canvas=cfg.canvas, digit_size=cfg.digit_size, strokes=cfg.strokes, blobs=cfg.blobs, noise=cfg.noise
    )
    test = make_canvases(digits[test_idx], labels[test_idx], np.random.default_rng([cfg.data_seed, 7]), **canvas_kwargs)

    per_seed, renderer = [], None
    for i, seed in enumerate(seeds):
        ts = time.perf_counter()
        torch.manual_seed(seed)  # the demo's own weight initialisation
        model = make_model(cfg.width, cfg.num_parts, 10, cfg.dropout)
        tag = f"seed {seed} ({i + 1}/{len(seeds)})"
        log = train(
            model, digits[train_idx], labels[train_idx], epochs=cfg.epochs, batch_size=cfg.batch_size, lr=cfg.lr,
            weight_decay=cfg.weight_decay, copies=cfg.copies, seed=seed, canvas_kwargs=canvas_kwargs,
            progress=cfg.progress, desc=f"train {tag}",
        )
        tt = time.perf_counter()
        res, extra = evaluate(
            model,
            test,
            last_layer(model),
            eval_images=cfg.eval_images,
            di_step=cfg.di_step,
            di_batch=cfg.di_batch,
            rise_masks=cfg.rise_masks,
            insertion_kernel=kernel,
            seed=seed,
            progress=cfg.progress,
            desc=f"evaluate {tag}",
        )
        if i == 0 and cfg.overlays > 0:
            renderer = write_figure(os.path.join(cfg.out, "overlays.png"), test, extra["saliency"], extra["maps"],
                                    extra["logits"], cfg.overlays)
        if i == 0:
            torch.save(model.state_dict(), os.path.join(cfg.out, "model.pt"))
        res.update(seed=seed, train_log=log,
                   seconds={"train": round(tt - ts, 2), "evaluate": round(time.perf_counter() - tt, 2)})
        per_seed.append(res)

    results = {
        "seeds": seeds,
        "summary": summarize(per_seed),
        "per_seed": per_seed,
        "config": dataclasses.asdict(cfg) | {"seeds": seeds, "insertion_kernel": kernel},
        "train_images": len(train_idx) * cfg.copies,
        "figure": {"file": "overlays.png", "renderer": renderer, "model": "first seed"},
        "seconds": {"total": round(time.perf_counter() - t0, 2)},
        "environment": {
            "torch": torch.__version__, "threads": torch.get_num_threads(), "python": platform.python_version(),
            "machine": platform.machine(), "processor": _cpu_name(),
        },
        "note": "CPU figures: the same seeds and threads repeat them on one machine; other CPUs round differently",
    }
    with open(os.path.join(cfg.out, "results.json"), "w") as f:
        json.dump(results, f, indent=1)
    with open(os.path.join(cfg.out, "summary.md"), "w") as f:
        f.write(markdown_summary(results))
    if verbose:
        print(format_report(results))
        print(f"time: {results['seconds']['total']} s for {len(seeds)} seed(s)")
        print(f"wrote {os.path.join(cfg.out, 'results.json')}, {os.path.join(cfg.out, 'overlays.png')} ({renderer}) "
              f"and {os.path.join(cfg.out, 'model.pt')} (first seed's weights)")
    return results


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def main(argv: list[str] | None = None) -> dict:
    defaults = DemoConfig()
    p = argparse.ArgumentParser(prog="python -m brnpa_triton", description=__doc__.splitlines()[0],
                                epilog="python -m brnpa_triton --self-check: check the operator's backends instead")
    p.add_argument("--out", default=defaults.out, help="output directory (default: %(default)s)")
    p.add_argument("--seeds", type=int, nargs="+", default=list(defaults.seeds), help="training seeds (default: 0 1 2)")
    p.add_argument("--epochs", type=int, default=defaults.epochs)
    p.add_argument("--num-parts", type=int, default=defaults.num_parts)
    p.add_argument(
        "--eval-images", type=int, default=defaults.eval_images, help="test images whose explanations are scored"
    )
    p.add_argument("--di-step", type=int, default=defaults.di_step, help="cells per deletion/insertion step")
    p.add_argument("--rise-masks", type=int, default=defaults.rise_masks)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    a = p.parse_args(argv)
    cfg = dataclasses.replace(
        defaults, out=a.out, seeds=tuple(a.seeds), epochs=a.epochs, num_parts=a.num_parts, eval_images=a.eval_images,
        di_step=a.di_step, rise_masks=a.rise_masks, threads=a.threads, progress=not a.no_progress,
    )
    return run_demo(cfg)
