"""The demo's figure: one row per test image; columns: the input with the digit's box and its
true / predicted class, BR-NPA saliency, each part's attention map, the K parts as colours over
the dimmed image, then every baseline. Every saliency column shares one colour scale (each map
divided by its column's maximum over the rows shown, so zero stays zero), with a colour bar.

matplotlib (the ``demo`` extra) draws it; without matplotlib a plainer grid of overlays is written
with the stdlib PNG writer."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from brnpa_triton.explain import VIRIDIS, overlay, write_png

BASELINE_COLUMNS = ("gradcam", "gradcam++", "hirescam", "xgradcam", "scorecam", "rise")
_TITLES = {"gradcam": "Grad-CAM", "gradcam++": "Grad-CAM++", "hirescam": "HiResCAM", "xgradcam": "XGrad-CAM",
           "scorecam": "Score-CAM", "rise": "RISE"}
# distinct, colour-blind-safe part colours (Okabe-Ito): orange, sky blue, bluish green, ...
PART_COLOURS = np.array([[230, 159, 0], [86, 180, 233], [0, 158, 115], [240, 228, 66], [0, 114, 178],
                         [213, 94, 0], [204, 121, 167]], dtype=np.float64) / 255.0


def _columns(sal: dict, maps: torch.Tensor, rows: int) -> list[tuple[str, torch.Tensor]]:
    cols = [("BR-NPA saliency\n(map 0 × norm)", sal["brnpa"][:rows, 0])]
    cols += [(f"part {k} map", maps[:rows, k]) for k in range(maps.shape[1])]
    cols += [(_TITLES[m], sal[m][:rows, 0]) for m in BASELINE_COLUMNS if m in sal]
    return cols


def _upsample(m: torch.Tensor, size) -> np.ndarray:
    return F.interpolate(m[None, None].double(), size=size, mode="bilinear", align_corners=False)[0, 0].numpy()


def parts_picture(grey: np.ndarray, maps: torch.Tensor) -> np.ndarray:
    """(H, W, 3) float: the image dimmed to 35%, each position coloured by the part whose map is
    highest there, with an opacity given by that map relative to its own maximum."""
    H, W = grey.shape
    up = np.stack([_upsample(maps[k], (H, W)) for k in range(maps.shape[0])])  # (K, H, W)
    rel = up / np.maximum(up.max(axis=(1, 2), keepdims=True), 1e-12)
    winner = rel.argmax(0)
    strength = np.clip(rel.max(0), 0, 1)[..., None]
    base = np.repeat((0.35 * np.clip(grey, 0, 1))[..., None], 3, -1)
    colour = PART_COLOURS[winner % len(PART_COLOURS)]
    return (1 - 0.85 * strength) * base + 0.85 * strength * colour


def write_figure(path: str, test, sal: dict, maps: torch.Tensor, logits: torch.Tensor, rows: int) -> str:
    """Write the figure to ``path`` (PNG); returns the renderer used ("matplotlib" or "stdlib")."""
    rows = min(rows, len(maps))
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.colors import ListedColormap, Normalize
        from matplotlib.patches import Patch, Rectangle
    except ImportError:
        _write_plain(path, test, sal, maps, rows)
        return "stdlib"
    cmap = ListedColormap(VIRIDIS, name="viridis-256")
    cols = _columns(sal, maps, rows)
    K = maps.shape[1]
    n_cols = 2 + len(cols)  # input, parts picture, then the saliency columns
    height = 1.3 * rows + 0.75
    fig, axes = plt.subplots(rows, n_cols, figsize=(1.25 * n_cols + 0.9, height), squeeze=False)
    H, W = test.images.shape[2:]
    pred = logits.argmax(1)
    for r in range(rows):
        grey = test.images[r, 0].clamp(0, 1).numpy()
        ax = axes[r, 0]
        ax.imshow(grey, cmap="gray", vmin=0, vmax=1, interpolation="nearest")
        y0, x0, y1, x1 = (int(v) for v in test.boxes[r])  # top, left, bottom, right
        ax.add_patch(Rectangle((x0 - 0.5, y0 - 0.5), x1 - x0, y1 - y0, fill=False, edgecolor="red", linewidth=1.2))
        ok = int(pred[r]) == int(test.labels[r])
        ax.set_ylabel(f"true {int(test.labels[r])}\npred {int(pred[r])}", fontsize=9, color="black" if ok else "red",
                      rotation=0, labelpad=22, va="center")
        axes[r, 1].imshow(parts_picture(grey, maps[r]), interpolation="nearest")
        for c, (_, column) in enumerate(cols):
            ax = axes[r, 2 + c]
            top = float(column.max())
            m = column[r].double() / top if top > 0 else torch.zeros_like(column[r].double())
            ax.imshow(grey, cmap="gray", vmin=0, vmax=1, interpolation="nearest")
            ax.imshow(_upsample(m, (H, W)), cmap=cmap, norm=Normalize(0, 1), alpha=0.7, interpolation="nearest")
            if float(column[r].max()) <= 0:
                ax.text(0.5, 0.5, "all zero", transform=ax.transAxes, ha="center", va="center", fontsize=8,
                        color="white", bbox=dict(facecolor="black", alpha=0.6, pad=1.5, edgecolor="none"))
    titles = ["input (red: digit box)", "parts (colours)"] + [t for t, _ in cols]
    for c, title in enumerate(titles):
        axes[0, c].set_title(title, fontsize=8)
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    top = 1 - 0.62 / height
    fig.subplots_adjust(left=0.06, right=0.9, top=top, bottom=0.02, wspace=0.05, hspace=0.08)
    cax = fig.add_axes([0.915, 0.08, 0.012, top - 0.16])
    bar = fig.colorbar(plt.cm.ScalarMappable(norm=Normalize(0, 1), cmap=cmap), cax=cax)
    bar.set_label("saliency / its column's maximum", fontsize=8)
    bar.ax.tick_params(labelsize=7)
    handles = [Patch(color=PART_COLOURS[k % len(PART_COLOURS)], label=f"part {k}") for k in range(K)]
    fig.legend(handles=handles, loc="upper left", ncol=K, fontsize=7, frameon=False, bbox_to_anchor=(0.06, 0.995))
    fig.suptitle("What each method points at: every map divided by its column's maximum, one colour bar for all",
                 fontsize=9, x=0.55, y=0.995)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return "matplotlib"


def _box(img: np.ndarray, box, scale: int, colour=(230, 30, 30)) -> np.ndarray:
    y0, x0, y1, x1 = (int(v) * scale for v in box)  # top, left, bottom, right
    y1, x1 = min(y1, img.shape[0]) - 1, min(x1, img.shape[1]) - 1
    img = img.copy()
    img[y0, x0 : x1 + 1] = img[y1, x0 : x1 + 1] = colour
    img[y0 : y1 + 1, x0] = img[y0 : y1 + 1, x1] = colour
    return img


def _write_plain(path: str, test, sal: dict, maps: torch.Tensor, rows: int, scale: int = 4) -> None:
    """Fallback without matplotlib: the same columns (no titles), each scaled by its column max."""
    cols = _columns(sal, maps, rows)
    out = []
    for r in range(rows):
        grey = test.images[r, 0].clamp(0, 1).numpy()
        big = np.kron(grey, np.ones((scale, scale)))
        panels = [_box((np.repeat(big[..., None], 3, -1) * 255).round().astype(np.uint8), test.boxes[r], scale)]
        parts = parts_picture(grey, maps[r])
        panels.append((np.kron(parts, np.ones((scale, scale, 1))) * 255).round().astype(np.uint8))
        for _, column in cols:
            top = float(column.max())
            m = column[r].double() / top if top > 0 else torch.zeros_like(column[r].double())
            panels.append(overlay(big, m, normalize=False))
        sep = np.full((big.shape[0], 2, 3), 255, np.uint8)
        out.append(np.concatenate([p for panel in panels for p in (panel, sep)][:-1], axis=1))
        out.append(np.full((2, out[-1].shape[1], 3), 255, np.uint8))
    write_png(path, np.concatenate(out[:-1], axis=0))
