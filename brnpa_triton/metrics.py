"""Evaluation metrics of the paper, batched on the tensors' device: sparsity of the attention maps
and the deletion / insertion curves (DAUC / IAUC) of any saliency map."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import NamedTuple

import torch
import torch.nn.functional as F
from einops import rearrange

from brnpa_triton._validation import as_int

__all__ = [
    "sparsity",
    "deletion_insertion",
    "DeletionInsertion",
    "box_blur",
    "box_blur_zero_padded",
    "gaussian_blur",
    "nearest_cells",
]

SPARSITY_EPS = 1e-5


def sparsity(maps: torch.Tensor, norms: torch.Tensor) -> torch.Tensor:
    """Sparsity of BR-NPA maps (lower = sparser), one value per image: (B,).

    As in the paper: the maps (B, K, H, W) are multiplied by the feature norm (B, H, W) divided
    by its spatial max; each map is divided by (its spatial max + 1e-5); the result is averaged over
    the parts, then over the positions. Token outputs ((B, K, N) maps, (B, N) norms) work too.
    Computed in float32 (float64 for float64 input). An all-zero norm map (0/0 in the paper) is
    taken as normalised norms of 0, giving sparsity 0 instead of NaN.

    Direction: **lower = sparser** (it is the mean normalised attention mass: a one-hot map gives
    about 1/N, a uniform one about 1). Quantus's ``Sparseness`` runs the other way: it is the Gini
    index of the attribution, where higher = sparser. Do not compare the two without flipping one.
    """
    if (
        maps.dim() < 3
        or norms.dim() != maps.dim() - 1
        or maps.shape[0] != norms.shape[0]
        or maps.shape[2:] != norms.shape[1:]
    ):
        raise ValueError(
            "maps must be (B, K, *positions) and norms (B, *positions); "
            f"got {tuple(maps.shape)} and {tuple(norms.shape)}"
        )
    dtype = torch.promote_types(maps.dtype, torch.float32)
    m = rearrange(maps.detach().to(dtype), "b k ... -> b k (...)")
    n = rearrange(norms.detach().to(dtype), "b ... -> b (...)")
    n_max = n.amax(dim=1, keepdim=True)
    n = torch.where(n_max > 0, n / torch.where(n_max > 0, n_max, torch.ones_like(n_max)), torch.zeros_like(n))
    m = m * n[:, None, :]
    m = m / (m.amax(dim=2, keepdim=True) + SPARSITY_EPS)
    return m.mean(dim=1).mean(dim=1)


class DeletionInsertion(NamedTuple):
    """Result of :func:`deletion_insertion`. Metrics not asked for are None.

    ``fractions`` is the fraction of units (cells or pixels) changed at each recorded point of the
    curves: (S + 1,) from 0 to 1 with ``protocol="library"`` (the intact image first), (S,) after
    each step with ``protocol="authors"``. Curves are (B, S + 1) or (B, S); AUCs are (B,), by the
    trapezoid rule over ``deletion_x`` / ``insertion_x``, the abscissae each protocol uses (equal
    to ``fractions`` for "library"; the authors' stretched step counts for "authors").
    """

    fractions: torch.Tensor
    deletion: torch.Tensor | None
    insertion: torch.Tensor | None
    deletion_auc: torch.Tensor | None
    insertion_auc: torch.Tensor | None
    target: torch.Tensor  # (B,) class whose score is tracked
    protocol: str = "library"
    deletion_x: torch.Tensor | None = None
    insertion_x: torch.Tensor | None = None


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


def box_blur_zero_padded(images: torch.Tensor, kernel: int = 121) -> torch.Tensor:
    """The authors' insertion start: a ``kernel`` x ``kernel`` box filter with zero padding, every
    output divided by ``kernel**2`` whatever the image size (so pixels near the border, and every
    pixel of an image smaller than the kernel, get darker). Computed in float32 (float64 kept)."""
    kernel = as_int("kernel", kernel, minimum=1)
    if kernel % 2 == 0:
        raise ValueError(f"kernel must be a positive odd int; got {kernel}")
    x = images.to(torch.promote_types(images.dtype, torch.float32))
    out = F.avg_pool2d(x, kernel, stride=1, padding=kernel // 2, count_include_pad=True)
    return out.to(images.dtype)


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


def nearest_cells(pixels: int, cells: int, device=None) -> torch.Tensor:
    """(pixels,) int64: along one axis of ``pixels`` pixels covered by ``cells`` equal cells, the
    cell that holds each pixel's centre, ``floor((i + 0.5) * cells / pixels)``, in exact integer
    arithmetic. That is the cell whose centre is nearest; a pixel centre exactly on the border
    between two cells (possible only when the map is finer than the image) goes to the later one
    (below / to the right), as half-open cells ``[k, k + 1)`` do."""
    i = torch.arange(pixels, device=device, dtype=torch.int64)
    return ((2 * i + 1) * cells) // (2 * pixels)


def _cell_ids(h: int, w: int, H: int, W: int, device) -> torch.Tensor:
    """(H, W) int64: the saliency cell (row-major in the h x w grid) nearest to each pixel's centre."""
    return nearest_cells(H, h, device)[:, None] * w + nearest_cells(W, w, device)[None, :]


def _authors_cell_ids(h: int, w: int, H: int, W: int, device) -> torch.Tensor:
    """(H, W) int64 as the authors' loop assigns pixels: square patches of side ``W // w`` (taken
    from the widths, for both axes) anchored at the top-left corner; pixels beyond the h x w grid
    of patches belong to no cell (-1) and are never changed."""
    side = W // w
    if side < 1:
        raise ValueError(f"protocol='authors' needs images at least as wide as the saliency map; got width {W} < {w}")
    rows = torch.arange(H, device=device) // side
    cols = torch.arange(W, device=device) // side
    ids = rows[:, None] * w + cols[None, :]
    inside = (rows < h)[:, None] & (cols < w)[None, :]
    return torch.where(inside, ids, torch.full_like(ids, -1))


def _authors_order(sal: torch.Tensor, step: int) -> torch.Tensor:
    """(B, U) ranks (0 = changed first) in the authors' order: the map is min-max normalised in
    float32, then ``topk(step)`` of what is left is taken again and again (changed cells set to
    -1), which fixes the order of ties as their loop does."""
    B, U = sal.shape
    lo, hi = sal.amin(1, keepdim=True), sal.amax(1, keepdim=True)
    # a constant map is 0/0 in their normalisation; taken as all zeros (all tied) here
    work = torch.where(hi > lo, (sal - lo) / torch.where(hi > lo, hi - lo, torch.ones_like(hi)), torch.zeros_like(sal))
    rank = torch.empty(B, U, dtype=torch.long, device=sal.device)
    rows = torch.arange(B, device=sal.device)[:, None]
    done = 0
    while done < U:
        take = min(step, U - done)
        idx = work.topk(step if step <= U else U, dim=1).indices[:, :take]
        rank[rows, idx] = done + torch.arange(take, device=sal.device)
        work[rows, idx] = -1.0
        done += take
    return rank


def _check_logits(out, n: int) -> torch.Tensor:
    if not isinstance(out, torch.Tensor):
        raise TypeError(f"model must return a logits tensor (n, classes); got {type(out).__name__} "
                        "(wrap a model that returns a tuple, e.g. lambda x: model(x)[0])")
    if out.dim() != 2 or out.shape[0] != n:
        raise ValueError(
            f"model must return logits of shape ({n}, classes) for {n} images; got shape {tuple(out.shape)}"
        )
    return out


@torch.no_grad()
def _scores(model, images: torch.Tensor, target: torch.Tensor, softmax: bool) -> torch.Tensor:
    logits = _check_logits(model(images), len(images)).float()
    if bool((target >= logits.shape[1]).any()):
        raise ValueError(
            f"target must be class indices below the model's {logits.shape[1]} classes; got {target.tolist()}"
        )
    if softmax:
        logits = torch.softmax(logits, dim=1)
    return logits.gather(1, target.view(-1, 1))[:, 0]


@torch.no_grad()
def deletion_insertion(
    model: Callable[[torch.Tensor], torch.Tensor],
    images: torch.Tensor,
    saliency: torch.Tensor,
    *,
    protocol: str = "library",
    metrics: tuple[str, ...] = ("deletion", "insertion"),
    unit: str = "cell",
    step: int | None = None,
    target: torch.Tensor | None = None,
    softmax: bool = True,
    deletion_value: float | torch.Tensor = 0.0,
    insertion_start: str | torch.Tensor = "box",
    blur_kernel: int | None = None,
    blur_sigma: float = 5.0,
    batch_size: int = 64,
) -> DeletionInsertion:
    """Deletion and insertion curves and AUCs (Petsiuk et al., RISE; the paper's DAUC / IAUC).

    ``saliency`` (B, 1, h, w) or (B, h, w): any map (BR-NPA, a CAM, RISE, random...). Units are
    ranked by decreasing saliency and changed ``step`` units at a time. Deletion replaces the
    changed units by ``deletion_value`` (0 by default: zeros in the model's input space; a float
    or a tensor broadcastable to ``images``). Insertion starts from ``insertion_start`` and puts
    the original units back: ``"box"`` (a 121 x 121 box blur, see the protocols), ``"gaussian"``
    (RISE: kernel 11, sigma 5, see :func:`gaussian_blur`) or a tensor broadcastable to
    ``images``; ``blur_kernel`` overrides the kernel size. After each step the softmax
    probability of ``target`` (B,) is recorded (its logit with ``softmax=False``); ``target``
    defaults to the class predicted on the intact images.

    Two protocols, which give different AUCs for the same saliency:

    - ``protocol="library"`` (default): the curve starts at the intact image (S + 1 points, x from
      0 to 1 = the fraction of units changed). ``unit="cell"``: each saliency cell is a unit and
      each pixel changes with the cell nearest to its centre, i.e. the cell that holds it when the
      cells are laid over the image as equal rectangles (7 rows on 3 cells: 0, 0, 1, 1, 1, 2, 2;
      a centre exactly on a border goes to the later cell, see :func:`nearest_cells`); every
      pixel belongs to exactly one cell, whatever the sizes; ``step`` defaults to 1 cell.
      ``unit="pixel"`` (RISE): the saliency is upsampled bilinearly and each pixel is a unit;
      ``step`` defaults to the image width. Ties go to the lowest index. ``"box"`` averages only
      the in-image pixels of the window and clamps the kernel to the image (:func:`box_blur`).
    - ``protocol="authors"`` (the paper's published evaluation, reproduced): the saliency is
      min-max normalised in float32 and cells are taken by repeated ``topk`` (their tie order);
      the score is recorded only after each step (S points), and the S points are stretched over
      [0, 1] as their analysis does (deletion: ``x = 1 - (left - min left) / (max left - min left)``;
      insertion: ``x = 1 - left / max left``, with ``left`` = cells not yet changed, which can go
      negative on the last step when ``step`` does not divide the number of cells). Patches are
      squares of side ``image width // map width`` anchored top-left; pixels outside that grid are
      never changed. ``"box"`` is their zero-padded blur divided by 121² (:func:`box_blur_zero_padded`).
      Only ``unit="cell"``. With a single step there is one point and the AUC is 0.

    All perturbed images of a metric are built on the fly and evaluated in batches of
    ``batch_size`` images (memory bounded), under ``torch.no_grad``. Call ``model.eval()`` first.
    """
    metrics = _check_options(protocol, metrics, unit, softmax)
    B, H, W = _check_images(images)
    sal = _check_saliency(saliency, B, protocol, images.device)
    batch_size = as_int("batch_size", batch_size, minimum=1)
    pixel_rank, n_units, step = _pixel_ranks(sal, protocol, unit, step, H, W)
    changed = _changed_counts(n_units, step, protocol, images.device)
    x_del, x_ins = _x_axes(protocol, n_units, step, changed)
    target = _resolve_target(model, images, target, batch_size)

    def curve(start: torch.Tensor, end: torch.Tensor) -> torch.Tensor:
        return _curve(model, start, end, pixel_rank, changed, target, softmax, batch_size)

    deletion = insertion = None
    if "deletion" in metrics:
        value = torch.as_tensor(deletion_value, dtype=images.dtype, device=images.device)
        deletion = curve(images, value.expand_as(images))
    if "insertion" in metrics:
        insertion = curve(_insertion_start(images, insertion_start, protocol, blur_kernel, blur_sigma), images)
    return DeletionInsertion(
        (changed.double() / n_units).float(),
        deletion,
        insertion,
        None if deletion is None else _auc(deletion, x_del),
        None if insertion is None else _auc(insertion, x_ins),
        target,
        protocol,
        None if deletion is None else x_del.float(),
        None if insertion is None else x_ins.float(),
    )


def _check_options(protocol: str, metrics, unit: str, softmax) -> tuple[str, ...]:
    """The options that do not depend on the tensors; returns ``metrics`` as a tuple."""
    if protocol not in ("library", "authors"):
        raise ValueError(f"protocol must be 'library' or 'authors'; got {protocol!r}")
    metrics = (metrics,) if isinstance(metrics, str) else tuple(metrics)
    if not metrics or any(m not in ("deletion", "insertion") for m in metrics):
        raise ValueError(f"metrics must be 'deletion' and/or 'insertion'; got {metrics!r}")
    if unit not in ("cell", "pixel"):
        raise ValueError(f"unit must be 'cell' or 'pixel'; got {unit!r}")
    if protocol == "authors" and unit != "cell":
        raise ValueError("protocol='authors' works on cells only; got unit='pixel'")
    if not isinstance(softmax, bool):
        raise TypeError(f"softmax must be True or False; got {softmax!r}")
    return metrics


def _check_images(images) -> tuple[int, int, int]:
    """(B, H, W) of a non-empty (B, C, H, W) batch."""
    if not isinstance(images, torch.Tensor) or images.dim() != 4:
        raise ValueError(f"images must be a (B, C, H, W) tensor; got {getattr(images, 'shape', type(images).__name__)}")
    B, _, H, W = images.shape
    if B == 0 or H == 0 or W == 0:
        raise ValueError(f"images must hold at least one non-empty image; got shape {tuple(images.shape)}")
    return B, H, W


def _check_saliency(saliency, B: int, protocol: str, device) -> torch.Tensor:
    """The maps as (B, h, w) float32 on ``device``, without NaN (and finite for the authors' protocol)."""
    if not isinstance(saliency, torch.Tensor):
        raise TypeError(f"saliency must be a tensor; got {type(saliency).__name__}")
    if saliency.dim() == 4:
        if saliency.shape[1] != 1:
            raise ValueError(f"saliency must have one map per image, (B, 1, h, w); got {tuple(saliency.shape)}")
        saliency = saliency[:, 0]
    if saliency.dim() != 3 or saliency.shape[0] != B or saliency.shape[1] == 0 or saliency.shape[2] == 0:
        raise ValueError(f"saliency must be (B, 1, h, w) or (B, h, w) with B={B}; got {tuple(saliency.shape)}")
    if bool(torch.isnan(saliency).any()):
        raise ValueError("saliency contains NaN; rank-based metrics need an order of every cell")
    sal = saliency.detach().to(device=device, dtype=torch.float32)
    if protocol == "authors" and not bool(torch.isfinite(sal).all()):
        raise ValueError("saliency must be finite with protocol='authors' (it is min-max normalised)")
    return sal


def _pixel_ranks(sal: torch.Tensor, protocol: str, unit: str, step, H: int, W: int):
    """``(pixel_rank, n_units, step)``: the (B, H, W) rank of the unit each pixel belongs to
    (0 = changed first; ``n_units`` for pixels of no unit, never changed), the number of units
    and the validated step."""
    if unit == "pixel":
        sal = F.interpolate(sal[:, None], size=(H, W), mode="bilinear", align_corners=False)[:, 0]
        step = W if step is None else as_int("step", step, minimum=1)
        return rearrange(_library_rank(rearrange(sal, "b h w -> b (h w)")), "b (h w) -> b h w", h=H), H * W, step
    h, w = sal.shape[1:]
    n_units = h * w
    step = 1 if step is None else as_int("step", step, minimum=1)
    units = rearrange(sal, "b h w -> b (h w)")
    if protocol == "authors":
        cell_of_pixel, rank = _authors_cell_ids(h, w, H, W, sal.device), _authors_order(units, step)
    else:
        cell_of_pixel, rank = _cell_ids(h, w, H, W, sal.device), _library_rank(units)
    never = torch.full((len(rank), 1), n_units, dtype=rank.dtype, device=rank.device)
    padded = torch.cat([rank, never], dim=1)
    return padded[:, torch.where(cell_of_pixel < 0, n_units, cell_of_pixel)], n_units, step


def _library_rank(units: torch.Tensor) -> torch.Tensor:
    """(B, U) ranks by decreasing value, ties to the lowest index (stable sort)."""
    B, U = units.shape
    order = torch.sort(units, dim=1, descending=True, stable=True).indices
    rank = torch.empty_like(order)
    return rank.scatter_(1, order, torch.arange(U, device=units.device).expand(B, -1))


def _changed_counts(n_units: int, step: int, protocol: str, device) -> torch.Tensor:
    """Units changed at each point of the curve: from 0 (the intact image, library) or from
    ``step`` (authors), by ``step``, the last point clamped to every unit."""
    first = 0 if protocol == "library" else 1
    return torch.clamp(torch.arange(first, math.ceil(n_units / step) + 1, device=device) * step, max=n_units)


def _x_axes(protocol: str, n_units: int, step: int, changed: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(deletion x, insertion x) in float64: the fraction of units changed (library), or the
    authors' stretched counts of the units left, unclamped (see :func:`deletion_insertion`)."""
    if protocol == "library":
        x = changed.double() / n_units
        return x, x
    if len(changed) == 1:
        zero = torch.zeros(1, dtype=torch.float64, device=changed.device)
        return zero, zero
    left = n_units - torch.arange(1, len(changed) + 1, device=changed.device, dtype=torch.float64) * step
    return 1 - (left - left.min()) / (left.max() - left.min()), 1 - left / left.max()


def _resolve_target(model, images: torch.Tensor, target, batch_size: int) -> torch.Tensor:
    """(B,) int64 classes >= 0: ``target`` checked (one index is broadcast), or the prediction."""
    B = len(images)
    if target is None:
        target = torch.cat(
            [
                _check_logits(model(images[i : i + batch_size]), len(images[i : i + batch_size])).argmax(dim=1)
                for i in range(0, B, batch_size)
            ]
        )
    target = torch.as_tensor(target, device=images.device)
    if target.is_floating_point() or target.dtype == torch.bool:
        raise TypeError(f"target must hold integer class indices; got dtype {target.dtype}")
    if target.dim() == 0:
        target = target.expand(B)
    if target.dim() != 1 or target.shape[0] != B:
        raise ValueError(
            f"target must be (B,) = ({B},) class indices (or one index for all); got shape {tuple(target.shape)}"
        )
    target = target.long()
    if bool((target < 0).any()):
        raise ValueError(f"target must be class indices >= 0; got {target.tolist()}")
    return target


def _curve(model, start, end, pixel_rank, changed, target, softmax: bool, batch_size: int) -> torch.Tensor:
    """(B, points) scores of images equal to ``end`` on the pixels ranked below ``changed[t]`` and
    to ``start`` elsewhere, built and scored ``batch_size`` images at a time."""
    B, n_points = len(pixel_rank), len(changed)
    total = B * n_points
    out = torch.empty(total, device=pixel_rank.device, dtype=torch.float32)
    for lo in range(0, total, batch_size):
        flat = torch.arange(lo, min(lo + batch_size, total), device=pixel_rank.device)
        b, t = flat // n_points, flat % n_points
        mask = (pixel_rank[b] < changed[t].view(-1, 1, 1)).unsqueeze(1)  # (n, 1, H, W)
        out[lo : lo + len(flat)] = _scores(model, torch.where(mask, end[b], start[b]), target[b], softmax)
    return out.view(B, n_points)


def _insertion_start(images: torch.Tensor, insertion_start, protocol: str, blur_kernel, blur_sigma) -> torch.Tensor:
    """The image insertion starts from, broadcast to ``images``."""
    if isinstance(insertion_start, torch.Tensor):
        return insertion_start.to(device=images.device, dtype=images.dtype).expand_as(images)
    if insertion_start == "box":
        kernel = 121 if blur_kernel is None else blur_kernel
        return box_blur(images, kernel) if protocol == "library" else box_blur_zero_padded(images, kernel)
    if insertion_start == "gaussian":
        return gaussian_blur(images, 11 if blur_kernel is None else blur_kernel, blur_sigma)
    raise ValueError(f"insertion_start must be 'box', 'gaussian' or a tensor; got {insertion_start!r}")


def _auc(curve: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """(B,) trapezoid AUC in float64, returned as float32."""
    return torch.trapezoid(curve.double(), x=x.to(curve.device), dim=1).float()
