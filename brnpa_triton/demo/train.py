"""Training loop of the demo: seeded, CPU-friendly, with a tqdm progress bar when tqdm is installed."""

from __future__ import annotations

import sys
import time

import numpy as np
import torch
import torch.nn.functional as F

from brnpa_triton.demo.data import make_canvases


class _Progress:
    """tqdm if available, else a line per epoch on stderr."""

    def __init__(self, total: int, desc: str, enabled: bool = True) -> None:
        self.enabled = enabled
        self.bar = None
        self.total, self.n, self.desc = total, 0, desc
        if enabled:
            try:
                from tqdm.auto import tqdm

                self.bar = tqdm(total=total, desc=desc, unit="step", dynamic_ncols=True, leave=True)
            except ImportError:
                self.bar = None

    def update(self, postfix: str) -> None:
        self.n += 1
        if self.bar is not None:
            self.bar.set_postfix_str(postfix, refresh=False)
            self.bar.update(1)

    def epoch_done(self, line: str) -> None:
        if self.enabled and self.bar is None:
            print(f"{self.desc} [{self.n}/{self.total}] {line}", file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


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
) -> dict:
    """Train on fresh cluttered canvases every epoch (``copies`` canvases per digit), AdamW with a
    one-cycle schedule. Returns a small log. Everything is drawn from generators seeded by
    ``seed``; with the same thread count the run is bit-for-bit reproducible."""
    steps_per_epoch = -(-len(digits) * copies // batch_size)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=epochs * steps_per_epoch, pct_start=0.2)
    shuffle = torch.Generator().manual_seed(seed + 1)
    bar = _Progress(epochs * steps_per_epoch, "train", progress)
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
                bar.update(f"epoch {epoch + 1}/{epochs} loss {total_loss / seen:.3f} acc {correct / seen:.3f}")
            log["epoch_loss"].append(round(total_loss / seen, 4))
            log["epoch_train_accuracy"].append(round(correct / seen, 4))
            bar.epoch_done(f"epoch {epoch + 1}: loss {total_loss / seen:.3f}, train accuracy {correct / seen:.3f}")
    finally:
        bar.close()
    log["train_seconds"] = round(time.perf_counter() - start, 2)
    return log
