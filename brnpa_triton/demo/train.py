"""Training loop of the demo: seeded, CPU-friendly, with a tqdm progress bar when tqdm is installed."""

from __future__ import annotations

import time

import numpy as np
import torch
import torch.nn.functional as F

from brnpa_triton.demo.data import make_canvases
from brnpa_triton.demo.progress import Progress


def train(
    model: torch.nn.Module,
    digits: np.ndarray,
    labels: np.ndarray,
    *,
    epochs: int,
    batch_size: int,
    lr: float,
    weight_decay: float,
    copies: int,
    seed: int,
    canvas_kwargs: dict,
    progress: bool = True,
    desc: str = "train",
) -> dict:
    """Train on fresh cluttered canvases every epoch (``copies`` canvases per digit), AdamW with a
    one-cycle schedule. Returns a small log. Everything is drawn from generators seeded by
    ``seed``: on one machine with the same thread count the run repeats exactly (other CPUs
    round differently, and the figures move)."""
    steps_per_epoch = -(-len(digits) * copies // batch_size)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=epochs * steps_per_epoch, pct_start=0.2)
    shuffle = torch.Generator().manual_seed(seed + 1)
    bar = Progress(epochs * steps_per_epoch, desc, progress)
    log = {"epoch_loss": [], "epoch_train_accuracy": []}
    start = time.perf_counter()
    try:
        for epoch in range(epochs):
            rng = np.random.default_rng([seed, 1000 + epoch])
            data = make_canvases(np.tile(digits, (copies, 1, 1)), np.tile(labels, copies), rng, **canvas_kwargs)
            perm = torch.randperm(len(data.labels), generator=shuffle)
            model.train()
            total_loss, correct, seen = 0.0, 0, 0
            for i in range(steps_per_epoch):
                idx = perm[i * batch_size : (i + 1) * batch_size]
                x, y = data.images[idx], data.labels[idx]
                logits = model(x)
                loss = F.cross_entropy(logits, y)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
                total_loss += loss.item() * len(y)
                correct += int((logits.argmax(1) == y).sum())
                seen += len(y)
                bar.update(1, f"epoch {epoch + 1}/{epochs} loss {total_loss / seen:.3f} acc {correct / seen:.3f}")
            log["epoch_loss"].append(round(total_loss / seen, 4))
            log["epoch_train_accuracy"].append(round(correct / seen, 4))
            bar.line(f"epoch {epoch + 1}: loss {total_loss / seen:.3f}, train accuracy {correct / seen:.3f}")
    finally:
        bar.close()
    log["train_seconds"] = round(time.perf_counter() - start, 2)
    return log
