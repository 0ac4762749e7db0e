"""Saliency baselines to compare BR-NPA's maps against, batched, under one signature:

``method(model, images, layer=None, target=None, **options) -> (B, 1, h, w)``

- CAMs of ``layer``'s (B, C, h, w) output (h x w = that layer's grid): :func:`grad_cam`,
  :func:`grad_cam_pp`, :func:`hires_cam`, :func:`xgrad_cam` (gradient-weighted) and
  :func:`score_cam` (weights from forward passes of masked images).
- :func:`rise`: a black-box method; it ignores ``layer`` and returns a map at the image's size.

``target`` is the class explained: None (the predicted class), one index for every image, or B
indices. Every map is float32 (float64 kept), ReLU'd unless ``relu=False``. Call
``model.eval()`` first. No parameter's ``.grad`` is touched; frozen models work.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from brnpa_triton.explain import grad_cam, layer_activation, layer_activation_and_gradient, resolve_target

__all__ = ["grad_cam", "grad_cam_pp", "hires_cam", "xgrad_cam", "score_cam", "rise", "BASELINES", "explain"]


def _finish(cam: torch.Tensor, relu: bool) -> torch.Tensor:
    return F.relu(cam) if relu else cam


def hires_cam(
    model: nn.Module, images: torch.Tensor, layer: nn.Module, target=None, *, relu: bool = True
) -> torch.Tensor:
    """HiResCAM (Draelos & Carin 2020): ``ReLU(sum_c G_c * A_c)``, the gradient times the activation
    per position (no spatial averaging of the gradient). For a head that is linear in A without
    bias, the unrectified map sums to the target logit over positions."""
    act, grads, _ = layer_activation_and_gradient(model, images, layer, target)
    return _finish((grads * act).sum(dim=1, keepdim=True), relu)


def xgrad_cam(
    model: nn.Module, images: torch.Tensor, layer: nn.Module, target=None, *, relu: bool = True, eps: float = 1e-7
) -> torch.Tensor:
    """XGrad-CAM (Fu et al. 2020): channel weights ``w_c = sum_ij G_c A_c / (sum_ij A_c + eps)``.
    For a head that is positively homogeneous of degree 1 in A (ReLU, linear maps, average pooling,
    no bias), the unrectified map sums to the target logit over positions."""
    act, grads, _ = layer_activation_and_gradient(model, images, layer, target)
    weights = (grads * act).sum(dim=(2, 3), keepdim=True) / (act.sum(dim=(2, 3), keepdim=True) + eps)
    return _finish((weights * act).sum(dim=1, keepdim=True), relu)


def grad_cam_pp(
    model: nn.Module, images: torch.Tensor, layer: nn.Module, target=None, *, relu: bool = True
) -> torch.Tensor:
    """Grad-CAM++ (Chattopadhyay et al. 2018), with the usual closed form on first-order gradients:
    ``alpha = G^2 / (2 G^2 + sum_ab A_ab G^3)`` (0 where the denominator is 0),
    ``w_c = sum_ij alpha_ij ReLU(G_ij)``, ``cam = ReLU(sum_c w_c A_c)``."""
    act, g, _ = layer_activation_and_gradient(model, images, layer, target)
    g2 = g * g
    denom = 2 * g2 + act.sum(dim=(2, 3), keepdim=True) * g2 * g
    alpha = torch.where(denom != 0, g2 / torch.where(denom != 0, denom, torch.ones_like(denom)), torch.zeros_like(g))
    weights = (alpha * F.relu(g)).sum(dim=(2, 3), keepdim=True)
    return _finish((weights * act).sum(dim=1, keepdim=True), relu)


def _probabilities(model, images: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    logits = model(images)
    if not isinstance(logits, torch.Tensor) or logits.dim() != 2 or logits.shape[0] != images.shape[0]:
        raise ValueError(
            f"model must return (B, classes) logits; got {getattr(logits, 'shape', type(logits).__name__)}"
        )
    return torch.softmax(logits.float(), dim=1).gather(1, target.view(-1, 1))[:, 0]


@torch.no_grad()
def score_cam(
    model: nn.Module,
    images: torch.Tensor,
    layer: nn.Module,
    target=None,
    *,
    relu: bool = True,
    baseline: str | torch.Tensor | None = "zeros",
    batch_size: int = 256,
) -> torch.Tensor:
    """Score-CAM (Wang et al. 2020): each channel A_c, upsampled bilinearly to the image and min-max
    normalised to [0, 1] (a constant channel gives a zero mask), masks the image; its weight is the
    paper's increase of confidence, ``w_c = p(target | image * mask_c) - p(target | baseline)``
    (softmax probabilities), and ``cam = ReLU(sum_c w_c A_c)``.

    ``baseline``: ``"zeros"`` (default: the image an all-zero mask leaves), a tensor broadcastable
    to ``images``, or None for no subtraction (``w_c`` = the masked probability, as the authors'
    released code does). The subtraction matters: ``sum_c p_b A_c`` is the plain sum of the
    channels, which points at whatever activates the layer most, evidence or not. Where no single
    channel's mask keeps enough of the object for the model, every masked score stays near the
    baseline's and the weights carry little evidence: the map is then unreliable (the demo shows
    it varying from one trained model to the next). Costs B x (C + 1) forward passes, run
    ``batch_size`` images at a time."""
    if isinstance(batch_size, bool) or int(batch_size) != batch_size or batch_size < 1:
        raise ValueError(f"batch_size must be an int >= 1; got {batch_size!r}")
    act, target = layer_activation(model, images, layer, target)
    B, C, h, w = act.shape
    masks = F.interpolate(act, size=images.shape[2:], mode="bilinear", align_corners=False)
    lo = masks.amin(dim=(2, 3), keepdim=True)
    hi = masks.amax(dim=(2, 3), keepdim=True)
    masks = torch.where(
        hi > lo, (masks - lo) / torch.where(hi > lo, hi - lo, torch.ones_like(hi)), torch.zeros_like(masks)
    )
    weights = torch.empty(B * C, dtype=act.dtype, device=act.device)
    for start in range(0, B * C, batch_size):
        flat = torch.arange(start, min(start + batch_size, B * C), device=act.device)
        b, c = flat // C, flat % C
        masked = images[b] * masks[b, c].unsqueeze(1).to(images.dtype)
        weights[start : start + len(flat)] = _probabilities(model, masked, target[b]).to(act.dtype)
    weights = weights.view(B, C) - _baseline_probabilities(model, images, target, baseline, batch_size).to(act.dtype)
    cam = (weights.view(B, C, 1, 1) * act).sum(dim=1, keepdim=True)
    return _finish(cam, relu)


def _baseline_probabilities(model, images: torch.Tensor, target: torch.Tensor, baseline, batch_size: int):
    """(B, 1) probability of each image's target on the baseline image (zeros when ``baseline`` is None)."""
    if baseline is None:
        return torch.zeros(len(images), 1, device=images.device)
    if isinstance(baseline, str):
        if baseline != "zeros":
            raise ValueError(f"baseline must be 'zeros', a tensor or None; got {baseline!r}")
        base = torch.zeros_like(images)
    elif isinstance(baseline, torch.Tensor):
        try:
            base = baseline.to(device=images.device, dtype=images.dtype).expand_as(images)
        except RuntimeError:
            raise ValueError(
                f"baseline must broadcast to the images {tuple(images.shape)}; got shape {tuple(baseline.shape)}"
            ) from None
    else:
        raise TypeError(f"baseline must be 'zeros', a tensor or None; got {type(baseline).__name__}")
    probs = [
        _probabilities(model, base[i : i + batch_size], target[i : i + batch_size])
        for i in range(0, len(base), batch_size)
    ]
    return torch.cat(probs)[:, None]


def rise_masks(
    count: int, size: tuple[int, int], *, grid: int = 8, p: float = 0.5, generator: torch.Generator | None = None,
    device=None,
) -> torch.Tensor:
    """RISE's random masks (Petsiuk et al. 2018): (count, 1, H, W) in [0, 1]. A ``grid`` x ``grid``
    binary pattern (each cell kept with probability ``p``) is upsampled bilinearly to
    ``(grid + 1) * cell`` and a random H x W window of it taken (a random sub-cell shift)."""
    if not 0.0 < p <= 1.0:
        raise ValueError(f"p must be in (0, 1]; got {p}")
    if isinstance(grid, bool) or int(grid) != grid or grid < 1:
        raise ValueError(f"grid must be an int >= 1; got {grid!r}")
    H, W = size
    cell_h, cell_w = -(-H // grid), -(-W // grid)
    keep = (torch.rand(count, 1, grid, grid, generator=generator) < p).float()
    up = F.interpolate(keep, size=((grid + 1) * cell_h, (grid + 1) * cell_w), mode="bilinear", align_corners=False)
    dy = torch.randint(0, cell_h, (count,), generator=generator)
    dx = torch.randint(0, cell_w, (count,), generator=generator)
    rows = (dy[:, None] + torch.arange(H)[None])  # (count, H)
    cols = (dx[:, None] + torch.arange(W)[None])  # (count, W)
    out = up[torch.arange(count)[:, None, None], 0, rows[:, :, None], cols[:, None, :]]
    return out.unsqueeze(1).to(device)


@torch.no_grad()
def rise(
    model: Callable[[torch.Tensor], torch.Tensor],
    images: torch.Tensor,
    layer: nn.Module | None = None,
    target=None,
    *,
    masks: torch.Tensor | None = None,
    n_masks: int = 500,
    grid: int = 8,
    p: float = 0.5,
    generator: torch.Generator | None = None,
    batch_size: int = 256,
    relu: bool = True,
) -> torch.Tensor:
    """RISE (Petsiuk et al. 2018): ``S = sum_i P(target | x * M_i) M_i / (N * p)``, the expected
    class probability given that a pixel is kept, estimated with N random masks (the same masks
    for every image). Returns (B, 1, H, W) at the image's size (``layer`` is ignored: black box).
    ``masks`` (N, 1, H, W) may be given; otherwise ``n_masks`` are drawn by :func:`rise_masks`
    from ``generator`` (pass one for reproducible maps). ``relu`` has no effect (S >= 0)."""
    if not isinstance(images, torch.Tensor) or images.dim() != 4 or images.shape[0] == 0:
        raise ValueError(
            f"images must be a non-empty (B, C, H, W) tensor; got {getattr(images, 'shape', type(images).__name__)}"
        )
    B, _, H, W = images.shape
    logits = model(images)
    if not isinstance(logits, torch.Tensor) or logits.dim() != 2 or logits.shape[0] != B:
        raise ValueError(
            f"model must return (B, classes) logits; got {getattr(logits, 'shape', type(logits).__name__)}"
        )
    target = resolve_target(target, logits)
    if masks is None:
        masks = rise_masks(n_masks, (H, W), grid=grid, p=p, generator=generator, device=images.device)
    elif masks.dim() != 4 or masks.shape[1] != 1 or masks.shape[2:] != (H, W):
        raise ValueError(f"masks must be (N, 1, {H}, {W}); got {tuple(masks.shape)}")
    N = masks.shape[0]
    dtype = torch.promote_types(images.dtype, torch.float32)
    masks = masks.to(device=images.device, dtype=dtype)
    total = torch.zeros(B, 1, H, W, dtype=dtype, device=images.device)
    for start in range(0, B * N, batch_size):
        flat = torch.arange(start, min(start + batch_size, B * N), device=images.device)
        b, m = flat // N, flat % N
        probs = _probabilities(model, images[b] * masks[m].to(images.dtype), target[b]).to(dtype)
        total.index_add_(0, b, probs.view(-1, 1, 1, 1) * masks[m])
    return total / (N * p)


BASELINES: dict[str, Callable[..., torch.Tensor]] = {
    "gradcam": grad_cam,
    "gradcam++": grad_cam_pp,
    "hirescam": hires_cam,
    "xgradcam": xgrad_cam,
    "scorecam": score_cam,
    "rise": rise,
}


def explain(
    method: str, model, images: torch.Tensor, layer: nn.Module | None = None, target=None, **options
) -> torch.Tensor:
    """Run the baseline named ``method`` (a key of :data:`BASELINES`)."""
    if method not in BASELINES:
        raise ValueError(f"method must be one of {sorted(BASELINES)}; got {method!r}")
    if method != "rise" and layer is None:
        raise ValueError(f"method {method!r} needs the layer whose output it explains (layer=...)")
    return BASELINES[method](model, images, layer, target, **options)
