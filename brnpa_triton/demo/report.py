"""Evaluation of a trained demo model: accuracy, sparsity, the pointing game (ties counted both
ways) and deletion / insertion AUCs of BR-NPA saliency against the CAM baselines, RISE and random
saliency, all on the same images; then the mean and spread over training seeds."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from brnpa_triton.api import BRNPAOutput
from brnpa_triton.baselines import grad_cam, grad_cam_pp, hires_cam, rise, score_cam, xgrad_cam
from brnpa_triton.demo.progress import Progress
from brnpa_triton.explain import saliency
from brnpa_triton.metrics import box_blur, deletion_insertion, sparsity

METHODS = ("brnpa", "gradcam", "gradcam++", "hirescam", "xgradcam", "scorecam", "rise", "random")
LABELS = {
    "brnpa": "BR-NPA (map 0 x norm)", "gradcam": "Grad-CAM", "gradcam++": "Grad-CAM++", "hirescam": "HiResCAM",
    "xgradcam": "XGrad-CAM", "scorecam": "Score-CAM", "rise": "RISE", "random": "random",
}
_CAMS = {"gradcam": grad_cam, "gradcam++": grad_cam_pp, "hirescam": hires_cam, "xgradcam": xgrad_cam}


@torch.no_grad()
def predict(model, images: torch.Tensor, batch_size: int = 256):
    """``(logits, maps, norms)`` of the whole set: the logits and the BR-NPA maps and norms, in batches."""
    logits, maps, norms = [], [], []
    for i in range(0, len(images), batch_size):
        lg, out = model(images[i : i + batch_size], return_output=True)
        logits.append(lg)
        maps.append(out.maps)
        norms.append(out.norms)
    return torch.cat(logits), torch.cat(maps), torch.cat(norms)


def box_cells(boxes: torch.Tensor, grid: tuple[int, int], image_size: tuple[int, int]) -> torch.Tensor:
    """(B, h, w) bool: the cells whose centre lies in the box (top, left, bottom, right; pixels)."""
    h, w = grid
    H, W = image_size
    cy = (torch.arange(h, dtype=torch.float64) + 0.5) * (H / h)
    cx = (torch.arange(w, dtype=torch.float64) + 0.5) * (W / w)
    top, left, bottom, right = (v.view(-1, 1, 1) for v in boxes.double().unbind(1))
    return (
        (cy.view(1, h, 1) >= top)
        & (cy.view(1, h, 1) <= bottom)
        & (cx.view(1, 1, w) >= left)
        & (cx.view(1, 1, w) <= right)
    )


def pointing(maps: torch.Tensor, boxes: torch.Tensor, image_size: tuple[int, int]) -> dict[str, torch.Tensor]:
    """Pointing game of (B, h, w) maps against digit boxes, with ties at the maximum counted both ways:
    ``"quantus"`` (Quantus's rule: a hit when any of the tied maxima lies in the box, so a constant
    map hits whenever the box holds a cell) and ``"strict"`` (a hit only when all of them do).
    A map holding NaN has no peak (NaN is no maximum): it is rejected, as the other metrics do."""
    if bool(torch.isnan(maps).any()):
        bad = torch.isnan(maps).flatten(1).any(1).nonzero().flatten().tolist()
        raise ValueError(f"maps contain NaN (images {bad}); the pointing game needs the peak of every map")
    inside = box_cells(boxes, tuple(maps.shape[1:]), image_size)
    peak = maps == maps.flatten(1).amax(1).view(-1, 1, 1)
    return {
        "quantus": (peak & inside).flatten(1).any(1),
        "strict": (~peak | inside).flatten(1).all(1),
    }


def _batched(fn, x: torch.Tensor, size: int) -> torch.Tensor:
    return torch.cat([fn(x[i : i + size]) for i in range(0, len(x), size)])


def saliencies(model, x: torch.Tensor, layer, maps, norms, *, rise_masks: int, seed: int, bar: Progress) -> dict:
    """Every method's (n, 1, h, w) map on the feature grid (RISE, computed per pixel, is averaged
    over each cell so that every method ranks the same cells)."""
    grid = tuple(maps.shape[2:])
    out = {"brnpa": saliency(BRNPAOutput(None, maps, None, None, norms)).detach()}
    bar.update(1, "BR-NPA")
    for name, fn in _CAMS.items():
        out[name] = _batched(lambda v, fn=fn: fn(model, v, layer), x, 256)
        bar.update(1, name)
    out["scorecam"] = _batched(lambda v: score_cam(model, v, layer, batch_size=1024), x, 64)
    bar.update(1, "Score-CAM")
    g = torch.Generator().manual_seed(seed + 11)
    full = _batched(lambda v: rise(model, v, n_masks=rise_masks, grid=6, generator=g, batch_size=1024), x, 16)
    out["rise"] = F.adaptive_avg_pool2d(full, grid)
    bar.update(1, "RISE")
    out["random"] = torch.rand(len(x), 1, *grid, generator=torch.Generator().manual_seed(seed + 3))
    return out


def evaluate(model, test, layer, *, eval_images: int, di_step: int, di_batch: int, rise_masks: int,
             insertion_kernel: int, seed: int, progress: bool = True, desc: str = "evaluate") -> tuple[dict, dict]:
    """Figures of one trained model, the explanations scored on the first ``eval_images`` test images.

    Returns ``(results, extra)``: the figures (a JSON-ready dict) and, for the figure, a dict of
    tensors of the evaluated images: ``"saliency"`` (method name -> (n, 1, h, w) map), ``"maps"``,
    ``"norms"`` and ``"logits"``.
    """
    model.eval()
    x_all, y_all, boxes_all = test.images, test.labels, test.boxes
    size = tuple(x_all.shape[2:])
    logits, maps_all, norms_all = predict(model, x_all)
    n = min(eval_images, len(y_all))
    x, boxes = x_all[:n], boxes_all[:n]
    maps, norms = maps_all[:n], norms_all[:n]
    steps = 1 + len(_CAMS) + 2 + 2 * len(METHODS) + 2
    with Progress(steps, desc, progress, unit="task") as bar:
        sal = saliencies(model, x, layer, maps, norms, rise_masks=rise_masks, seed=seed, bar=bar)
        res = {
            "test_images": len(y_all),
            "test_accuracy": float((logits.argmax(1) == y_all).float().mean()),
            "feature_map": list(maps.shape[2:]),
            "sparsity_brnpa": float(sparsity(maps_all, norms_all).mean()),
            "eval_images": n,
            "pointing_quantus": {},
            "pointing_strict": {},
            "deletion_auc": {},
            "insertion_auc": {},
        }
        for k, s in sal.items():
            hits = pointing(s[:, 0], boxes, size)
            res["pointing_quantus"][k] = float(hits["quantus"].float().mean())
            res["pointing_strict"][k] = float(hits["strict"].float().mean())
        res["gradcam_all_zero_fraction"] = float((sal["gradcam"].flatten(1).amax(1) <= 0).float().mean())
        # insertion starts from a box blur scaled to the image, as the paper's 121 px on 448 px images
        start = box_blur(x, insertion_kernel)
        start_logits = model(start).detach()
        intact_pred = logits[:n].argmax(1)
        res["insertion_start"] = {
            "kind": f"box blur {insertion_kernel}x{insertion_kernel} (in-image mean),"
                    f" the paper's 121 px on 448 px scaled to {size[1]} px",
            "kernel": insertion_kernel,
            "accuracy_on_start": float((start_logits.argmax(1) == y_all[:n]).float().mean()),
            "mean_probability_of_prediction_on_start": float(
                torch.softmax(start_logits, 1).gather(1, intact_pred[:, None]).mean()
            ),
            "distinct_predictions_on_start": int(start_logits.argmax(1).unique().numel()),
        }
        for k, s in sal.items():
            r = deletion_insertion(model, x, s, step=di_step, batch_size=di_batch, insertion_start=start)
            res["deletion_auc"][k] = float(r.deletion_auc.mean())
            res["insertion_auc"][k] = float(r.insertion_auc.mean())
            bar.update(2, f"deletion/insertion {k}")
        # the same BR-NPA saliency under the authors' protocol, and under the library's with the
        # paper's 121 px blur (clamped to the 48 px image): what each choice does to the AUC
        a = deletion_insertion(model, x, sal["brnpa"], protocol="authors", step=di_step, batch_size=di_batch)
        p = deletion_insertion(model, x, sal["brnpa"], step=di_step, batch_size=di_batch, metrics="insertion")
        res["brnpa_protocols"] = {
            "library_scaled_blur": {
                "deletion_auc": res["deletion_auc"]["brnpa"],
                "insertion_auc": res["insertion_auc"]["brnpa"],
            },
            "library_blur_121_clamped": {"insertion_auc": float(p.insertion_auc.mean())},
            "authors": {"deletion_auc": float(a.deletion_auc.mean()), "insertion_auc": float(a.insertion_auc.mean())},
        }
        bar.update(2, "authors' protocol")
    res["di_step_cells"] = di_step
    return res, {"saliency": sal, "maps": maps, "norms": norms, "logits": logits[:n]}


def _mean_std(values: list[float]) -> dict:
    n = len(values)
    mean = sum(values) / n
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else 0.0
    return {"mean": mean, "std": std}


def summarize(per_seed: list[dict]) -> dict:
    """Mean and sample standard deviation over seeds of every figure."""
    out = {
        k: _mean_std([r[k] for r in per_seed]) for k in ("test_accuracy", "sparsity_brnpa", "gradcam_all_zero_fraction")
    }
    for key in ("pointing_quantus", "pointing_strict", "deletion_auc", "insertion_auc"):
        out[key] = {m: _mean_std([r[key][m] for r in per_seed]) for m in METHODS}
    out["brnpa_protocols"] = {
        proto: {k: _mean_std([r["brnpa_protocols"][proto][k] for r in per_seed]) for k in d}
        for proto, d in per_seed[0]["brnpa_protocols"].items()
    }
    out["accuracy_on_insertion_start"] = _mean_std([r["insertion_start"]["accuracy_on_start"] for r in per_seed])
    return out


def _pm(d: dict, digits: int = 3) -> str:
    return f"{d['mean']:.{digits}f} ± {d['std']:.{digits}f}"


def format_report(res: dict) -> str:
    """The plain-text report of a run (what the demo prints)."""
    s = res["summary"]
    first = res["per_seed"][0]
    lines = [
        f"{len(res['per_seed'])} training seeds {res['seeds']}; figures are mean ± std over seeds",
        f"test accuracy   {_pm(s['test_accuracy'])}  ({first['test_images']} images, feature map "
        f"{first['feature_map'][0]}x{first['feature_map'][1]})",
        f"sparsity        {_pm(s['sparsity_brnpa'])}  (BR-NPA maps; lower = sparser)",
        f"{first['eval_images']} test images scored, {first['di_step_cells']} cell(s) per deletion/insertion step;",
        f"insertion starts from a {first['insertion_start']['kind']}: accuracy on those start images "
        f"{_pm(s['accuracy_on_insertion_start'])}",
        "",
        f"  {'saliency':<22}{'pointing (Quantus)':>20}{'pointing (strict)':>20}"
        f"{'DAUC (low=good)':>18}{'IAUC (high=good)':>19}",
    ]
    for m in METHODS:
        lines.append(
            f"  {LABELS[m]:<22}{_pm(s['pointing_quantus'][m]):>20}{_pm(s['pointing_strict'][m]):>20}"
            f"{_pm(s['deletion_auc'][m]):>18}{_pm(s['insertion_auc'][m]):>19}"
        )
    p = s["brnpa_protocols"]
    lines += [
        "",
        f"Grad-CAM all zero after its ReLU on {_pm(s['gradcam_all_zero_fraction'])} of the images "
        "(Quantus's tie rule counts such a map as a hit).",
        "BR-NPA saliency under each protocol (same maps, same images):",
        f"  library, scaled blur:          DAUC {_pm(p['library_scaled_blur']['deletion_auc'])}"
        f"  IAUC {_pm(p['library_scaled_blur']['insertion_auc'])}",
        f"  library, 121 px blur clamped:                          "
        f"IAUC {_pm(p['library_blur_121_clamped']['insertion_auc'])}",
        f"  authors (zero-padded 121 px):  DAUC {_pm(p['authors']['deletion_auc'])}"
        f"  IAUC {_pm(p['authors']['insertion_auc'])}",
    ]
    return "\n".join(lines)


def markdown_summary(res: dict) -> str:
    """The summary as a markdown table (what the README quotes)."""
    s = res["summary"]
    first = res["per_seed"][0]
    lines = [
        f"| saliency ({len(res['seeds'])} seeds, mean ± std) | pointing, Quantus's ties | pointing, strict | "
        "deletion AUC (lower is better) | insertion AUC (higher is better) |",
        "|---|---|---|---|---|",
    ]
    for m in METHODS:
        lines.append(f"| {LABELS[m]} | {_pm(s['pointing_quantus'][m])} | {_pm(s['pointing_strict'][m])} | "
                     f"{_pm(s['deletion_auc'][m])} | {_pm(s['insertion_auc'][m])} |")
    p = s["brnpa_protocols"]
    lines += [
        "",
        f"Test accuracy {_pm(s['test_accuracy'])}, sparsity {_pm(s['sparsity_brnpa'])} (lower = sparser); "
        f"Grad-CAM all zero after its ReLU on {_pm(s['gradcam_all_zero_fraction'])} of the images; accuracy on the "
        f"insertion start images ({first['insertion_start']['kind']}) {_pm(s['accuracy_on_insertion_start'])}.",
        "",
        "| BR-NPA saliency, same maps and images | deletion AUC | insertion AUC |",
        "|---|---|---|",
        f"| library protocol, {first['insertion_start']['kernel']} px blur | "
        f"{_pm(p['library_scaled_blur']['deletion_auc'])} | "
        f"{_pm(p['library_scaled_blur']['insertion_auc'])} |",
        f"| library protocol, 121 px blur (clamped to 47) | (same) | "
        f"{_pm(p['library_blur_121_clamped']['insertion_auc'])} |",
        f"| authors' protocol (121 px, zero-padded) | "
        f"{_pm(p['authors']['deletion_auc'])} | {_pm(p['authors']['insertion_auc'])} |",
    ]
    return "\n".join(lines) + "\n"
