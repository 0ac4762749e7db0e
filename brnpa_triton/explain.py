"""Explanations: BR-NPA saliency, upsampling, Grad-CAM, colour overlays and a stdlib PNG writer.

Everything is computed in float32 (or float64 when given), whatever the features' dtype.
Only torch, numpy and the standard library are needed (no matplotlib, OpenCV or Pillow).
"""

from __future__ import annotations

import os
import struct
import zlib
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from brnpa_triton._validation import as_int
from brnpa_triton.api import BRNPAOutput
from brnpa_triton.metrics import nearest_cells

__all__ = [
    "saliency",
    "upsample",
    "normalize_maps",
    "grad_cam",
    "resolve_target",
    "layer_activation",
    "layer_activation_and_gradient",
    "colormap",
    "overlay",
    "write_png",
    "VIRIDIS",
]


def _float(t: torch.Tensor) -> torch.Tensor:
    return t if t.dtype in (torch.float32, torch.float64) else t.float()


def saliency(out: BRNPAOutput, parts: int | Sequence[int] | str | None = None) -> torch.Tensor:
    """The paper's saliency: attention map 0 times the feature norm ``||x_n||``.

    Returns (B, 1, H, W) for feature maps ((B, 1, N) for tokens). ``parts="all"`` gives every part
    (B, K, H, W); an int (Python, numpy or 0-d tensor) or a sequence of ints selects those parts,
    in that order. The graph is kept
    (call ``.detach()`` for plain maps); the result is float32 (float64 for float64 outputs).
    """
    maps, norms = _float(out.maps), _float(out.norms)
    K = maps.shape[1]
    if parts is None:
        maps = maps[:, :1]
    elif isinstance(parts, str):
        if parts != "all":
            raise ValueError(f"parts must be None, 'all', an int or a sequence of ints; got {parts!r}")
    else:
        items = parts.tolist() if isinstance(parts, (torch.Tensor, np.ndarray)) else parts
        index = [items] if not isinstance(items, (list, tuple)) else list(items)
        index = [_part_index(i, parts) for i in index]
        if not index or any(not -K <= i < K for i in index):
            raise ValueError(f"parts must index the {K} parts (in [-{K}, {K})), at least one; got {parts!r}")
        maps = maps[:, index]
    return maps * norms.to(maps.dtype).unsqueeze(1)


def _part_index(value, parts) -> int:
    """One part index from a Python, numpy or 0-d tensor integer (never a bool or a float)."""
    try:
        return as_int("parts", value)
    except TypeError:
        raise TypeError(f"parts must be None, 'all', an int or a sequence of ints; got {parts!r}") from None


def upsample(saliency: torch.Tensor, size, mode: str = "bilinear") -> torch.Tensor:
    """Resize (B, K, h, w) maps to ``size`` = (H, W) (or an int) in float.

    ``mode="bilinear"`` (align_corners=False, the usual smooth display) or ``"nearest"`` (each
    pixel takes the cell nearest to its centre, :func:`brnpa_triton.metrics.nearest_cells`: the
    feature-map cells as the library's deletion / insertion sees them).
    """
    if saliency.dim() != 4:
        raise ValueError(f"saliency must be (B, K, h, w); got shape {tuple(saliency.shape)}")
    if mode not in ("bilinear", "nearest"):
        raise ValueError(f"mode must be 'bilinear' or 'nearest'; got {mode!r}")
    size = (size, size) if isinstance(size, int) else tuple(size)
    if mode == "nearest":
        rows = nearest_cells(size[0], saliency.shape[2], saliency.device)
        cols = nearest_cells(size[1], saliency.shape[3], saliency.device)
        return _float(saliency)[:, :, rows[:, None], cols[None, :]]
    return F.interpolate(_float(saliency), size=size, mode="bilinear", align_corners=False)


def normalize_maps(maps: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """Min-max normalise each map (over its last two dims) to [0, 1]; constant maps become 0."""
    maps = _float(maps)
    lo = maps.amin(dim=(-2, -1), keepdim=True)
    hi = maps.amax(dim=(-2, -1), keepdim=True)
    return (maps - lo) / (hi - lo).clamp_min(eps)


def resolve_target(target, logits: torch.Tensor) -> torch.Tensor:
    """(B,) int64 class indices: the prediction for None; one index (an int, a 0-d or length-1
    tensor) is used for every image; otherwise exactly B indices in [0, classes)."""
    B, classes = logits.shape
    if target is None:
        return logits.argmax(dim=1)
    t = torch.as_tensor(target, device=logits.device)
    if t.is_floating_point() or t.dtype == torch.bool or t.is_complex():
        raise TypeError(f"target must hold integer class indices; got dtype {t.dtype}")
    if t.numel() == 1:
        t = t.reshape(1).expand(B)
    if t.dim() != 1 or t.shape[0] != B:
        raise ValueError(f"target must be one class index or B = {B} of them; got shape {tuple(t.shape)}")
    if bool(((t < 0) | (t >= classes)).any()):
        raise ValueError(f"target must be class indices in [0, {classes}); got {t.tolist()}")
    return t.long()


def _check_images(images) -> None:
    if not isinstance(images, torch.Tensor) or images.dim() < 2 or images.shape[0] == 0:
        raise ValueError(
            f"images must be a non-empty batch (B, ...); got {getattr(images, 'shape', type(images).__name__)}"
        )


def _forward_with_layer(model: nn.Module, images: torch.Tensor, layer: nn.Module, *, as_leaf: bool):
    """``(logits, A)``: the model's (B, classes) logits and ``layer``'s (B, C, h, w) output, taken
    by a forward hook; ``as_leaf`` re-roots A as a leaf that requires grad (the logits then
    depend on the layer's output only through it)."""
    store = {}

    def hook(_module, _inputs, output):
        if not isinstance(output, torch.Tensor) or output.dim() != 4:
            raise ValueError("layer must output a (B, C, h, w) tensor")
        store["act"] = output.detach().requires_grad_(True) if as_leaf else output
        return store["act"]

    handle = layer.register_forward_hook(hook)
    try:
        logits = model(images)
    finally:
        handle.remove()
    if not isinstance(logits, torch.Tensor) or logits.dim() != 2 or logits.shape[0] != images.shape[0]:
        raise ValueError(
            f"model must return (B, classes) logits; got {getattr(logits, 'shape', type(logits).__name__)}"
        )
    if "act" not in store:
        raise ValueError("layer was not called by the model's forward")
    return logits, store["act"]


def layer_activation(model: nn.Module, images: torch.Tensor, layer: nn.Module, target=None):
    """``layer``'s (B, C, h, w) output A and the (B,) targets, in float (float64 kept), from one
    forward pass without gradients (works under ``torch.inference_mode``)."""
    _check_images(images)
    with torch.no_grad():
        logits, act = _forward_with_layer(model, images, layer, as_leaf=False)
    return _float(act.detach()), resolve_target(target, logits.detach())


def layer_activation_and_gradient(model: nn.Module, images: torch.Tensor, layer: nn.Module, target=None):
    """``layer``'s (B, C, h, w) output A, the gradient G of each image's ``target`` logit with
    respect to it, and the (B,) targets, in float (float64 kept). The output is re-rooted as a
    leaf in a forward hook, so frozen models work and no parameter's ``.grad`` is touched.

    Works under ``torch.no_grad`` and ``torch.inference_mode``: autograd is switched back on for
    this call only (inference-mode images are cloned into normal tensors first). A model whose
    own parameters or buffers were made under inference mode cannot be differentiated: that is
    an error saying so."""
    _check_images(images)
    with torch.inference_mode(False), torch.enable_grad():
        x = images.clone() if images.is_inference() else images
        try:
            logits, act = _forward_with_layer(model, x, layer, as_leaf=True)
            target = resolve_target(target, logits.detach())
            (grads,) = torch.autograd.grad(logits.gather(1, target.view(-1, 1)).sum(), act)
        except RuntimeError as e:
            if "nference tensor" not in str(e):
                raise
            raise RuntimeError(
                "gradient-based CAMs need autograd through the model after `layer`, but some of its parameters "
                "or buffers are inference tensors (created or loaded under torch.inference_mode); build or load "
                "the model outside inference mode"
            ) from e
    return _float(act.detach()), _float(grads), target


def grad_cam(
    model: nn.Module,
    images: torch.Tensor,
    layer: nn.Module,
    target: torch.Tensor | None = None,
    *,
    relu: bool = True,
) -> torch.Tensor:
    """Grad-CAM (Selvaraju et al. 2017) of ``layer``'s (B, C, h, w) output, batched: (B, 1, h, w).

    ``cam = ReLU(sum_c w_c A_c)`` with ``w_c`` the spatial mean of ``d logit_target / d A_c``.
    ``target`` defaults to the predicted class; one index is used for every image, otherwise it
    must hold B indices. The layer's output is re-rooted as a leaf in a forward hook, so frozen
    models work and no parameter's ``.grad`` is touched. Call ``model.eval()`` first (batch-norm in
    training mode couples the images of a batch). More CAMs: :mod:`brnpa_triton.baselines`.
    """
    act, grads, _ = layer_activation_and_gradient(model, images, layer, target)
    weights = grads.mean(dim=(2, 3), keepdim=True)
    cam = (weights * act).sum(dim=1, keepdim=True)
    return F.relu(cam) if relu else cam


# matplotlib's viridis, the 256 colours as matplotlib renders them to bytes (its 256-entry
# table, CC0), stored as hex RGB triplets.
_VIRIDIS_HEX = (
    "44015444025544035745055845065a45085b46095c460b5e460c5f460e61470f62471163471265471466471567471669"
    "47186a48196b481a6c481c6e481d6f481e70482071482172482273482374472575472676472777472878472a79472b7a"
    "472c7b462d7c462f7c46307d46317e45327f45347f453580453681443781443982433a83433b83433c84423d84423e85"
    "4240854141864142864043874044873f45873f47883e48883e49893d4a893d4b893d4c893c4d8a3c4e8a3b508a3b518a"
    "3a528b3a538b39548b39558b38568b38578c37588c37598c365a8c365b8c355c8c355d8c345e8d345f8d33608d33618d"
    "32628d32638d31648d31658d31668d30678d30688d2f698d2f6a8d2e6b8e2e6c8e2e6d8e2d6e8e2d6f8e2c708e2c718e"
    "2c728e2b738e2b748e2a758e2a768e2a778e29788e29798e287a8e287a8e287b8e277c8e277d8e277e8e267f8e26808e"
    "26818e25828e25838d24848d24858d24868d23878d23888d23898d22898d228a8d228b8d218c8d218d8c218e8c208f8c"
    "20908c20918c1f928c1f938b1f948b1f958b1f968b1e978a1e988a1e998a1e998a1e9a891e9b891e9c891e9d881e9e88"
    "1e9f881ea0871fa1871fa2861fa38620a48520a58521a68521a78422a78423a88323a98224aa8225ab8126ac8127ad80"
    "28ae7f29af7f2ab07e2bb17d2cb17d2eb27c2fb37b30b47a32b57a33b67935b77836b87738b97639b9763bba753dbb74"
    "3ebc7340bd7242be7144be7045bf6f47c06e49c16d4bc26c4dc26b4fc36951c46853c56755c66657c66559c7645bc862"
    "5ec96160c96062ca5f64cb5d67cc5c69cc5b6bcd596dce5870ce5672cf5574d05477d05279d1517cd24f7ed24e81d34c"
    "83d34b86d44988d5478bd5468dd64490d64392d74195d73f97d83e9ad83c9dd93a9fd938a2da37a5da35a7db33aadb32"
    "addc30afdc2eb2dd2cb5dd2bb7dd29bade27bdde26bfdf24c2df22c5df21c7e01fcae01ecde01dcfe11cd2e11bd4e11a"
    "d7e219dae218dce218dfe318e1e318e4e318e7e419e9e419ece41aeee51bf1e51cf3e51ef6e61ff8e621fae622fde724"
)
VIRIDIS = np.frombuffer(bytes.fromhex(_VIRIDIS_HEX), dtype=np.uint8).reshape(256, 3).astype(np.float64) / 255.0


def colormap(values, table: np.ndarray = VIRIDIS) -> np.ndarray:
    """Map values in [0, 1] (clipped; NaN -> 0) to float RGB in [0, 1]: shape ``values.shape + (3,)``.

    ``table`` is an (S, 3) list of colours; value v takes entry ``floor(v * S)`` (1 takes the last),
    matplotlib's lookup rule, so viridis (the default: perceptually uniform, readable in grey
    scale and by colour-blind readers) gives exactly matplotlib's colours.
    """
    table = np.asarray(table, dtype=np.float64)
    if table.ndim != 2 or table.shape[1] != 3 or len(table) < 1:
        raise ValueError(f"table must be (S, 3) colours; got shape {table.shape}")
    v = np.nan_to_num(_to_numpy(values).astype(np.float64), nan=0.0)
    idx = np.clip((np.clip(v, 0.0, 1.0) * len(table)).astype(np.int64), 0, len(table) - 1)
    return table[idx]


def _image_to_unit_float(image) -> np.ndarray:
    """uint8 images are divided by 255; float images must already lie in [0, 1]."""
    raw = _to_numpy(image)
    if raw.dtype == np.uint8:
        return raw.astype(np.float64) / 255.0
    if raw.dtype == np.bool_ or not np.issubdtype(raw.dtype, np.number):
        raise TypeError(f"image must be uint8 (0-255) or float in [0, 1]; got dtype {raw.dtype}")
    img = raw.astype(np.float64)
    finite = img[np.isfinite(img)]
    if finite.size and (finite.max() > 1.0 + 1e-6 or finite.min() < -1e-6):
        raise ValueError(
            f"image must be float in [0, 1] (or uint8 0-255); got values in [{finite.min():.4g}, {finite.max():.4g}]: "
            "divide a 0-255 float image by 255, or pass it as uint8"
        )
    return img


def overlay(
    image, saliency_map, alpha: float = 0.5, *, normalize: bool = True, table: np.ndarray = VIRIDIS
) -> np.ndarray:
    """Blend a colour-mapped saliency map over an image: uint8 RGB (H, W, 3).

    ``image``: float in [0, 1] or uint8 in 0-255 (divided by 255; a float image outside [0, 1] is
    rejected), (H, W, 3), (3, H, W), (H, W) or (1, H, W) (grey is replicated), numpy or torch.
    ``saliency_map``: (h, w) (or with leading singleton dims), any size: it is upsampled
    bilinearly to (H, W), min-max normalised (unless ``normalize=False``, then clipped to [0, 1])
    and coloured. ``out = (1 - alpha) * image + alpha * colour``.
    """
    img = _image_to_unit_float(image)
    if img.ndim == 3 and img.shape[0] in (1, 3) and img.shape[-1] not in (1, 3):
        img = np.moveaxis(img, 0, -1)
    if img.ndim == 2:
        img = img[..., None]
    if img.ndim != 3 or img.shape[-1] not in (1, 3):
        raise ValueError(f"image must be (H, W), (H, W, 3), (1 or 3, H, W); got shape {img.shape}")
    if img.shape[-1] == 1:
        img = np.repeat(img, 3, axis=-1)
    H, W = img.shape[:2]
    sal = torch.as_tensor(_to_numpy(saliency_map), dtype=torch.float64)
    while sal.dim() > 2 and sal.shape[0] == 1:
        sal = sal[0]
    if sal.dim() != 2:
        raise ValueError(f"saliency_map must be (h, w); got shape {tuple(sal.shape)}")
    sal = upsample(sal[None, None], (H, W))[0, 0]
    sal = normalize_maps(sal) if normalize else sal.clamp(0, 1)
    colour = colormap(sal.numpy(), table)
    out = (1.0 - alpha) * np.clip(img, 0.0, 1.0) + alpha * colour
    return np.round(np.clip(out, 0.0, 1.0) * 255.0).astype(np.uint8)


def write_png(path: str | os.PathLike, image) -> None:
    """Write a uint8 image, (H, W) grey or (H, W, 3) RGB, as a PNG (stdlib zlib; no Pillow)."""
    arr = _to_numpy(image)
    if arr.dtype != np.uint8:
        raise TypeError(f"image must be uint8; got {arr.dtype} (see overlay() to convert float images)")
    if arr.ndim == 3 and arr.shape[-1] == 1:
        arr = arr[..., 0]
    if arr.ndim == 2:
        colour_type = 0
    elif arr.ndim == 3 and arr.shape[-1] == 3:
        colour_type = 2
    else:
        raise ValueError(f"image must be (H, W) or (H, W, 3); got shape {arr.shape}")
    H, W = arr.shape[:2]
    if H == 0 or W == 0:
        raise ValueError("image must not be empty")
    rows = np.ascontiguousarray(arr).reshape(H, -1)
    raw = _filter_rows(rows, 3 if colour_type == 2 else 1).tobytes()

    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", W, H, 8, colour_type, 0, 0, 0)
    data = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw, 9)) + chunk(b"IEND", b"")
    with open(path, "wb") as f:
        f.write(data)


def _filter_rows(rows: np.ndarray, bpp: int) -> np.ndarray:
    """PNG filtering per row: None (0), Sub (1) or Up (2), whichever has the smallest sum of
    absolute (signed-byte) residuals, the usual heuristic. Returns (H, 1 + row bytes) uint8."""
    r = rows.astype(np.int16)
    sub = r.copy()
    sub[:, bpp:] -= r[:, :-bpp]
    up = r.copy()
    up[1:] -= r[:-1]
    cands = np.stack([r, sub, up]) % 256  # (3, H, L)
    cost = np.minimum(cands, 256 - cands).sum(axis=2)  # |signed byte|
    choice = cost.argmin(axis=0)  # (H,)
    chosen = cands[choice, np.arange(len(rows))].astype(np.uint8)
    return np.concatenate([choice[:, None].astype(np.uint8), chosen], axis=1)


def _to_numpy(x) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu()
        if x.dtype in (torch.float16, torch.bfloat16):
            x = x.float()
        return x.numpy()
    return np.asarray(x)
