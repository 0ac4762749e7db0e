"""Evaluation metrics of the paper, batched on the tensors' device: sparsity of the attention maps
and the deletion / insertion curves (DAUC / IAUC) of any saliency map."""

from __future__ import annotations

import math
from typing import Callable, NamedTuple

import torch
import torch.nn.functional as F

__all__ = [
    "sparsity",
    "deletion_insertion",
    "DeletionInsertion",
    "box_blur",
    "gaussian_blur",
]

SPARSITY_EPS = 1e-5


def sparsity(maps: torch.Tensor, norms: torch.Tensor) -> torch.Tensor:
    """Sparsity of BR-NPA maps (lower = sparser), one value per image: (B,).

    As in the paper: the maps (B, K, H, W) are multiplied by the feature norm (B, H, W) divided
    by its spatial max; each map is divided by (its spatial max + 1e-5); the result is averaged over
    the parts, then over the positions. Token outputs ((B, K, N) maps, (B, N) norms) work too.
    Computed in float32 (float64 for float64 input). An all-zero norm map (0/0 in the paper) is
    taken as normalised norms of 0, giving sparsity 0 instead of NaN.
    """
    if maps.dim() < 3 or norms.dim() != maps.dim() - 1 or maps.shape[0] != norms.shape[0] or maps.shape[2:] != norms.shape[1:]:
        raise ValueError(
            f"maps must be (B, K, *positions) and norms (B, *positions); got {tuple(maps.shape)} and {tuple(norms.shape)}"
        )
    dtype = torch.promote_types(maps.dtype, torch.float32)
    m = maps.detach().to(dtype).flatten(2)  # (B, K, N)
    n = norms.detach().to(dtype).flatten(1)  # (B, N)
    n_max = n.amax(dim=1, keepdim=True)
    n = torch.where(n_max > 0, n / torch.where(n_max > 0, n_max, torch.ones_like(n_max)), torch.zeros_like(n))
    m = m * n[:, None, :]
    m = m / (m.amax(dim=2, keepdim=True) + SPARSITY_EPS)
    return m.mean(dim=1).mean(dim=1)


class DeletionInsertion(NamedTuple):
    """Curves are (B, S + 1): the score after 0, 1, ..., S steps; ``fractions`` (S + 1,) is the
    fraction of units (cells or pixels) changed after each step, from 0 to 1. AUCs are (B,)
    (trapezoid rule over ``fractions``); metrics not asked for are None."""

    fractions: torch.Tensor
    deletion: torch.Tensor | None
    insertion: torch.Tensor | None
    deletion_auc: torch.Tensor | None
    insertion_auc: torch.Tensor | None
    target: torch.Tensor  # (B,) class whose score is tracked


def _blur_1d_box(x: torch.Tensor, dim: int, radius: int) -> torch.Tensor:
    """Mean over the in-image part of a (2 * radius + 1) window along ``dim`` (cumulative sums)."""
    L = x.shape[dim]
    cs = torch.cat([torch.zeros_like(x.narrow(dim, 0, 1)), x.cumsum(dim)], dim=dim)
    idx = torch.arange(L, device=x.device)
    hi = (idx + radius + 1).clamp(max=L)
    lo = (idx - radius).clamp(min=0)
    shape = [1] * x.dim()
    shape[dim] = L
    sums = cs.index_select(dim, hi) - cs.index_select(dim, lo)
    return sums / (hi - lo).to(x.dtype).view(shape)


def _clamp_kernel(kernel: int, length: int) -> int:
    """The largest odd size <= min(kernel, length)."""
    k = min(kernel, length)
    return k if k % 2 == 1 else k - 1


def box_blur(images: torch.Tensor, kernel: int = 121) -> torch.Tensor:
    """Box blur of (B, C, H, W) images with a ``kernel`` x ``kernel`` window (odd).

    Each output is the mean of the window's pixels that lie inside the image (no padding values
    leak in). For images smaller than the kernel, the kernel is clamped, per axis, to the largest
    odd size not above the image side (e.g. 121 -> 47 on a 48-pixel axis): the window then still
    covers most of the image, which is what a 121x121 blur does to a 224-448 pixel image.
    Computed in float64 with separable cumulative sums (cost independent of the kernel size).
    """
    if kernel < 1 or kernel % 2 == 0:
        raise ValueError(f"kernel must be a positive odd int; got {kernel}")
    x = images.to(torch.float64)
    x = _blur_1d_box(x, 2, _clamp_kernel(kernel, x.shape[2]) // 2)
    x = _blur_1d_box(x, 3, _clamp_kernel(kernel, x.shape[3]) // 2)
    return x.to(images.dtype)


def gaussian_blur(images: torch.Tensor, kernel: int = 11, sigma: float = 5.0) -> torch.Tensor:
    """Gaussian blur as in RISE's insertion baseline (kernel 11, sigma 5), separable.

    As in :func:`box_blur`, the kernel is clamped to the image and edges are normalised by the
    in-image weight (no zero padding darkens the borders).
    """
    if kernel < 1 or kernel % 2 == 0 or not sigma > 0:
        raise ValueError(f"kernel must be a positive odd int and sigma > 0; got {kernel}, {sigma}")
    x = images.to(torch.float64)
    B, C, H, W = x.shape
    for dim, length in ((2, H), (3, W)):
        k = _clamp_kernel(kernel, length)
        r = k // 2
        t = torch.arange(-r, r + 1, dtype=torch.float64, device=x.device)
        w = torch.exp(-0.5 * (t / sigma) ** 2)
        w = w / w.sum()
        moved = x.movedim(dim, -1)
        shape = moved.shape
        flat = moved.reshape(-1, 1, length)
        num = F.conv1d(flat, w.view(1, 1, -1), padding=r)
        den = F.conv1d(torch.ones_like(flat[:1]), w.view(1, 1, -1), padding=r)
        x = (num / den).reshape(shape).movedim(-1, dim)
    return x.to(images.dtype)


def _cell_ids(h: int, w: int, H: int, W: int, device) -> torch.Tensor:
    """(H, W) int64: the saliency cell (row-major in the h x w grid) each pixel lies under
    (nearest-neighbour correspondence, as ``F.interpolate(mode='nearest')``)."""
    ids = torch.arange(h * w, device=device, dtype=torch.float32).view(1, 1, h, w)
    return F.interpolate(ids, size=(H, W), mode="nearest")[0, 0].round().long()


@torch.no_grad()
def _scores(model, images: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return torch.softmax(model(images).float(), dim=1).gather(1, target.view(-1, 1))[:, 0]


@torch.no_grad()
def deletion_insertion(
    model: Callable[[torch.Tensor], torch.Tensor],
    images: torch.Tensor,
    saliency: torch.Tensor,
    *,
    metrics: tuple[str, ...] = ("deletion", "insertion"),
    unit: str = "cell",
    step: int | None = None,
    target: torch.Tensor | None = None,
    deletion_value: float | torch.Tensor = 0.0,
    insertion_start: str | torch.Tensor = "box",
    blur_kernel: int | None = None,
    blur_sigma: float = 5.0,
    batch_size: int = 64,
) -> DeletionInsertion:
    """Deletion and insertion curves and AUCs (Petsiuk et al., RISE; the paper's DAUC / IAUC).

    ``saliency`` (B, 1, h, w) or (B, h, w): any map (BR-NPA, Grad-CAM, random...). Units are
    ranked by decreasing saliency (ties: lowest index first), and changed ``step`` units at a time:

    - ``unit="cell"`` (paper default): each saliency cell is a unit, and the image patch under it
      (pixels mapped to the cell by nearest-neighbour correspondence) is changed; ``step`` defaults
      to 1 cell.
    - ``unit="pixel"`` (RISE): the saliency is upsampled bilinearly to the image and each pixel is a
      unit; ``step`` defaults to the image width (one row's worth of pixels per step).

    Deletion replaces the changed units by ``deletion_value`` (0 by default: zeros in the model's
    input space; a float or a tensor broadcastable to ``images``); the curve starts at the intact
    image. Insertion starts from ``insertion_start``, ``"box"`` (paper: box blur, kernel 121
    clamped to the image, see :func:`box_blur`), ``"gaussian"`` (RISE: kernel 11, sigma 5) or a
    tensor like ``images``, and puts the original units back. ``blur_kernel`` overrides the kernel.

    After each step the softmax probability of ``target`` (B,) is recorded; ``target`` defaults to
    the class predicted on the intact images. All B * (S + 1) perturbed images of a metric are
    built on the fly and evaluated in batches of ``batch_size`` images (memory bounded), under
    ``torch.no_grad``. Call ``model.eval()`` first.
    """
    if images.dim() != 4:
        raise ValueError(f"images must be (B, C, H, W); got shape {tuple(images.shape)}")
    B, _, H, W = images.shape
    if saliency.dim() == 4:
        if saliency.shape[1] != 1:
            raise ValueError(f"saliency must have one map per image, (B, 1, h, w); got {tuple(saliency.shape)}")
        saliency = saliency[:, 0]
    if saliency.dim() != 3 or saliency.shape[0] != B:
        raise ValueError(f"saliency must be (B, 1, h, w) or (B, h, w) with B={B}; got {tuple(saliency.shape)}")
    metrics = (metrics,) if isinstance(metrics, str) else tuple(metrics)
    if not metrics or any(m not in ("deletion", "insertion") for m in metrics):
        raise ValueError(f"metrics must be 'deletion' and/or 'insertion'; got {metrics!r}")
    if unit not in ("cell", "pixel"):
        raise ValueError(f"unit must be 'cell' or 'pixel'; got {unit!r}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1; got {batch_size}")
    device = images.device
    sal = saliency.detach().to(device=device, dtype=torch.float32)

    if unit == "cell":
        h, w = sal.shape[1:]
        n_units = h * w
        cell_of_pixel = _cell_ids(h, w, H, W, device)  # (H, W)
        step = 1 if step is None else step
    else:
        sal = F.interpolate(sal[:, None], size=(H, W), mode="bilinear", align_corners=False)[:, 0]
        n_units = H * W
        cell_of_pixel = None
        step = W if step is None else step
    if step < 1:
        raise ValueError(f"step must be >= 1; got {step}")
    order = torch.sort(sal.flatten(1), dim=1, descending=True, stable=True).indices  # (B, U)
    rank = torch.empty_like(order)
    rank.scatter_(1, order, torch.arange(n_units, device=device).expand(B, -1))
    pixel_rank = rank[:, cell_of_pixel] if cell_of_pixel is not None else rank.view(B, H, W)  # (B, H, W)

    n_steps = math.ceil(n_units / step)
    changed = torch.clamp(torch.arange(n_steps + 1, device=device) * step, max=n_units)  # (S + 1,)
    fractions = changed.double() / n_units

    if target is None:
        target = torch.cat([model(images[i : i + batch_size]).argmax(dim=1) for i in range(0, B, batch_size)])
    target = target.to(device=device, dtype=torch.long).view(B)

    def curve(start: torch.Tensor, end: torch.Tensor) -> torch.Tensor:
        """Score of images equal to ``end`` on the units ranked below changed[t], ``start`` elsewhere."""
        total = B * (n_steps + 1)
        out = torch.empty(total, device=device, dtype=torch.float32)
        for lo in range(0, total, batch_size):
            flat = torch.arange(lo, min(lo + batch_size, total), device=device)
            b, t = flat // (n_steps + 1), flat % (n_steps + 1)
            mask = (pixel_rank[b] < changed[t].view(-1, 1, 1)).unsqueeze(1)  # (n, 1, H, W)
            batch = torch.where(mask, end[b], start[b])
            out[lo : lo + len(flat)] = _scores(model, batch, target[b])
        return out.view(B, n_steps + 1)

    def auc(c: torch.Tensor) -> torch.Tensor:
        return torch.trapezoid(c.double(), x=fractions.to(c.device), dim=1).float()

    deletion = insertion = None
    if "deletion" in metrics:
        value = torch.as_tensor(deletion_value, dtype=images.dtype, device=device)
        deletion = curve(images, value.expand_as(images))
    if "insertion" in metrics:
        if isinstance(insertion_start, torch.Tensor):
            start = insertion_start.to(device=device, dtype=images.dtype).expand_as(images)
        elif insertion_start == "box":
            start = box_blur(images, 121 if blur_kernel is None else blur_kernel)
        elif insertion_start == "gaussian":
            start = gaussian_blur(images, 11 if blur_kernel is None else blur_kernel, blur_sigma)
        else:
            raise ValueError(f"insertion_start must be 'box', 'gaussian' or a tensor; got {insertion_start!r}")
        insertion = curve(start, images)
    return DeletionInsertion(
        fractions.float(),
        deletion,
        insertion,
        None if deletion is None else auc(deletion),
        None if insertion is None else auc(insertion),
        target,
    )
