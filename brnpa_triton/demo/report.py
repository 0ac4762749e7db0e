"""Evaluation of the trained demo model: accuracy, pointing game, sparsity, deletion / insertion
for BR-NPA saliency vs Grad-CAM vs random saliency, and overlay PNGs."""

from __future__ import annotations

import os

import numpy as np
import torch

from brnpa_triton.api import BRNPAOutput
from brnpa_triton.explain import grad_cam, overlay, saliency, write_png
from brnpa_triton.metrics import deletion_insertion, sparsity

METHODS = ("brnpa", "gradcam", "random")


@torch.no_grad()
def predict(model, images: torch.Tensor, batch_size: int = 256):
    """Logits and the BR-NPA outputs (maps, norms, indices) of the whole set, in batches."""
    logits, maps, norms, indices = [], [], [], []
    for i in range(0, len(images), batch_size):
        lg, out = model(images[i : i + batch_size], return_output=True)
        logits.append(lg)
        maps.append(out.maps)
        norms.append(out.norms)
        indices.append(out.indices)
    return torch.cat(logits), torch.cat(maps), torch.cat(norms), torch.cat(indices)


def pointing(maps: torch.Tensor, boxes: torch.Tensor, image_size: tuple[int, int]) -> torch.Tensor:
    """Hit (bool, (B,)) when the centre of the peak cell of ``maps`` (B, h, w) lies in the box
    (top, left, bottom, right), in pixels of an image of ``image_size``. Ties: first cell."""
    B, h, w = maps.shape
    H, W = image_size
    peak = maps.flatten(1).argmax(dim=1)
    cy = (peak // w).double().add(0.5).mul(H / h)
    cx = (peak % w).double().add(0.5).mul(W / w)
    top, left, bottom, right = boxes.double().unbind(1)
    return (cy >= top) & (cy <= bottom) & (cx >= left) & (cx <= right)


def evaluate(model, test, layer, *, di_images: int, di_step: int, di_batch: int, seed: int) -> dict:
    model.eval()
    x, y, boxes = test.images, test.labels, test.boxes
    size = tuple(x.shape[2:])
    logits, maps, norms, _ = predict(model, x)
    pred = logits.argmax(1)
    sal = {
        "brnpa": saliency(BRNPAOutput(None, maps, None, None, norms)),
        "gradcam": torch.cat([grad_cam(model, x[i : i + 256], layer) for i in range(0, len(x), 256)]),
        "random": torch.rand(maps[:, :1].shape, generator=torch.Generator().manual_seed(seed + 3)),
    }
    res = {
        "test_images": len(y),
        "test_accuracy": float((pred == y).float().mean()),
        "feature_map": list(maps.shape[2:]),
        "pointing": {"brnpa_map0": float(pointing(maps[:, 0], boxes, size).float().mean())},
        "sparsity_brnpa": float(sparsity(maps, norms).mean()),
    }
    for k, s in sal.items():
        res["pointing"][k] = float(pointing(s[:, 0], boxes, size).float().mean())
    # Grad-CAM through the BR-NPA head: its channel weights (mean gradients) often come out negative
    # so that ReLU(CAM) is all zero (ties -> first cell, a pointing miss). Recorded, not hidden.
    raw = torch.cat([grad_cam(model, x[i : i + 256], layer, relu=False) for i in range(0, len(x), 256)])
    res["gradcam_diagnostics"] = {
        "all_zero_fraction": float((sal["gradcam"].flatten(1).amax(1) <= 0).float().mean()),
        "pointing_unrectified": float(pointing(raw[:, 0], boxes, size).float().mean()),
        "pointing_negated": float(pointing(-raw[:, 0], boxes, size).float().mean()),
    }
    # deletion / insertion on the first di_images test images (same images for every method)
    n = min(di_images, len(y))
    res["di_images"], res["di_step_cells"] = n, di_step
    res["deletion_auc"], res["insertion_auc"], res["curves"] = {}, {}, {}
    for k, s in sal.items():
        r = deletion_insertion(model, x[:n], s[:n], step=di_step, batch_size=di_batch)
        res["deletion_auc"][k] = float(r.deletion_auc.mean())
        res["insertion_auc"][k] = float(r.insertion_auc.mean())
        res["curves"][k] = {
            "fraction": [round(v, 4) for v in r.fractions.tolist()],
            "deletion": [round(v, 4) for v in r.deletion.mean(0).tolist()],
            "insertion": [round(v, 4) for v in r.insertion.mean(0).tolist()],
        }
    return res, sal, maps, norms


def _box(img: np.ndarray, box, scale: int, colour=(230, 30, 30)) -> np.ndarray:
    t, l, b, r = (int(v) * scale for v in box)
    b, r = min(b, img.shape[0]) - 1, min(r, img.shape[1]) - 1
    img = img.copy()
    img[t, l : r + 1] = img[b, l : r + 1] = colour
    img[t : b + 1, l] = img[t : b + 1, r] = colour
    return img


def write_overlays(out_dir: str, test, sal: dict, maps: torch.Tensor, norms: torch.Tensor, count: int, scale: int = 4) -> list[str]:
    """Per image one row: input (with the digit box), BR-NPA saliency, parts 0..K-1 (map x norm),
    Grad-CAM. Writes ``overlay_<i>.png`` for each image and ``overlays.png`` (all rows)."""
    paths, rows = [], []
    K = maps.shape[1]
    for i in range(min(count, len(test.labels))):
        grey = test.images[i, 0].clamp(0, 1).numpy()
        big = np.kron(grey, np.ones((scale, scale)))
        panels = [_box((np.repeat(big[..., None], 3, -1) * 255).round().astype(np.uint8), test.boxes[i], scale)]
        panels.append(overlay(big, sal["brnpa"][i, 0]))
        panels += [overlay(big, maps[i, k] * norms[i]) for k in range(K)]
        panels.append(overlay(big, sal["gradcam"][i, 0]))
        sep = np.full((big.shape[0], 2, 3), 255, np.uint8)
        row = np.concatenate([p for panel in panels for p in (panel, sep)][:-1], axis=1)
        path = os.path.join(out_dir, f"overlay_{i}.png")
        write_png(path, row)
        paths.append(path)
        rows.append(row)
        rows.append(np.full((2, row.shape[1], 3), 255, np.uint8))
    if rows:
        path = os.path.join(out_dir, "overlays.png")
        write_png(path, np.concatenate(rows[:-1], axis=0))
        paths.append(path)
    return paths


def format_report(res: dict) -> str:
    lines = [
        f"test accuracy            {res['test_accuracy']:.4f}  ({res['test_images']} images, feature map {res['feature_map'][0]}x{res['feature_map'][1]})",
        f"sparsity (BR-NPA maps)   {res['sparsity_brnpa']:.4f}  (lower = sparser)",
        f"pointing, map 0 peak     {res['pointing']['brnpa_map0']:.4f}",
        f"deletion / insertion on {res['di_images']} images, {res['di_step_cells']} cell(s) per step:",
        f"  {'saliency':<10}{'pointing':>10}{'DAUC (low=good)':>18}{'IAUC (high=good)':>18}",
    ]
    for k in METHODS:
        lines.append(f"  {k:<10}{res['pointing'][k]:>10.4f}{res['deletion_auc'][k]:>18.4f}{res['insertion_auc'][k]:>18.4f}")
    d = res["gradcam_diagnostics"]
    lines.append(
        f"Grad-CAM maps all zero after ReLU: {d['all_zero_fraction']:.4f}; pointing of the CAM before ReLU "
        f"{d['pointing_unrectified']:.4f}, of its negation {d['pointing_negated']:.4f}"
    )
    return "\n".join(lines)
