import struct
import zlib

import numpy as np
import pytest
import torch
from torch import nn

import brnpa_triton as bt
from brnpa_triton.explain import VIRIDIS, colormap, grad_cam, normalize_maps, overlay, saliency, upsample, write_png


def feats(dtype=torch.float32):
    return torch.rand(2, 5, 6, 4, generator=torch.Generator().manual_seed(0), dtype=dtype)


def test_saliency_is_map0_times_norm():
    out = bt.brnpa(feats(torch.float64), 3)
    s = saliency(out)
    assert s.shape == (2, 1, 6, 4) and s.dtype == torch.float64
    torch.testing.assert_close(s[:, 0], out.maps[:, 0] * out.norms)
    all_parts = saliency(out, "all")
    torch.testing.assert_close(all_parts, out.maps * out.norms[:, None])
    torch.testing.assert_close(saliency(out, [2, 0]), all_parts[:, [2, 0]])
    torch.testing.assert_close(saliency(out, 1), all_parts[:, 1:2])
    with pytest.raises(ValueError):
        saliency(out, 3)
    with pytest.raises(ValueError):
        saliency(out, "some")


def test_saliency_half_is_float_and_tokens():
    out = bt.brnpa(feats().half(), 2)
    assert saliency(out).dtype == torch.float32
    tok = bt.brnpa_tokens(feats().flatten(2).transpose(1, 2), 2)
    assert saliency(tok).shape == (2, 1, 24)


def test_upsample_and_normalize():
    s = torch.arange(4.0).view(1, 1, 2, 2)
    up = upsample(s, (4, 6))
    assert up.shape == (1, 1, 4, 6) and up.dtype == torch.float32
    near = upsample(s, 4, mode="nearest")
    torch.testing.assert_close(near[0, 0], s[0, 0].repeat_interleave(2, 0).repeat_interleave(2, 1))
    # uneven sizes: each pixel shows the cell nearest to its centre, the cells deletion/insertion uses
    rows = upsample(torch.arange(3.0).view(1, 1, 3, 1), (7, 2), mode="nearest")[0, 0, :, 0]
    assert rows.tolist() == [0, 0, 1, 1, 1, 2, 2]
    n = normalize_maps(torch.tensor([[[2.0, 4.0], [6.0, 10.0]]]))
    torch.testing.assert_close(n, torch.tensor([[[0.0, 0.25], [0.5, 1.0]]]))
    assert normalize_maps(torch.ones(1, 3, 3)).abs().sum() == 0  # constant map: zeros, no NaN
    with pytest.raises(ValueError):
        upsample(torch.zeros(2, 2), 4)


def test_colormap_is_matplotlibs_viridis():
    assert VIRIDIS.shape == (256, 3)
    v = np.concatenate([np.linspace(0, 1, 1001), [0.0039, 0.00391, 0.5, 1.0]])
    c = colormap(np.concatenate([v, [-3.0, np.nan, 7.0]]))
    np.testing.assert_allclose(c[-3], VIRIDIS[0])
    np.testing.assert_allclose(c[-2], VIRIDIS[0])
    np.testing.assert_allclose(c[-1], VIRIDIS[-1])
    np.testing.assert_array_equal(np.round(VIRIDIS[[0, 255]] * 255), [[68, 1, 84], [253, 231, 36]])
    # perceptual: lightness (luma) increases along viridis (bytes wobble by 1/255 between neighbours)
    luma = VIRIDIS @ np.array([0.299, 0.587, 0.114])
    assert np.all(np.diff(luma[::4]) > 0)
    try:
        import matplotlib
    except ImportError:
        return
    ref = matplotlib.colormaps["viridis"](v, bytes=True)[:, :3]
    np.testing.assert_array_equal(np.round(c[: len(v)] * 255).astype(np.uint8), ref)


def test_saliency_parts_accepts_integer_likes_and_rejects_the_rest():
    out = bt.brnpa(feats(torch.float64), 3)
    all_parts = saliency(out, "all")
    for like in (np.int64(2), torch.tensor(2), [np.int32(2)], np.array([2]), torch.tensor([2])):
        torch.testing.assert_close(saliency(out, like), all_parts[:, 2:3])
    for bad in (1.0, True, [0, 1.5], torch.tensor(1.0)):
        with pytest.raises(TypeError, match="parts"):
            saliency(out, bad)
    for bad in ([], [3], -4):
        with pytest.raises(ValueError, match="parts"):
            saliency(out, bad)


def test_overlay_converts_uint8_and_rejects_0_255_floats():
    sal = torch.rand(3, 3)
    grey = np.random.default_rng(0).integers(0, 256, size=(6, 6)).astype(np.uint8)
    np.testing.assert_array_equal(overlay(grey, sal), overlay(grey / 255.0, sal))
    with pytest.raises(ValueError, match="image"):
        overlay(grey.astype(np.float32), sal)


@pytest.mark.parametrize("layout", ["hwc", "chw", "hw", "torch1hw"])
def test_overlay_dtype_shape_and_blend(layout):
    H, W = 8, 12
    grey = np.full((H, W), 0.5)
    image = {"hwc": np.repeat(grey[..., None], 3, -1), "chw": np.repeat(grey[None], 3, 0), "hw": grey,
             "torch1hw": torch.tensor(grey[None], dtype=torch.float32)}[layout]
    sal = torch.zeros(2, 3)
    sal[0, 0] = 1.0
    out = overlay(image, sal)
    assert out.dtype == np.uint8 and out.shape == (H, W, 3)
    # the lowest saliency gets the first colour, blended half and half with the image
    expected_low = np.round((0.5 * 0.5 + 0.5 * VIRIDIS[0]) * 255)
    np.testing.assert_array_equal(out[-1, -1], expected_low)
    assert out[0, 0].astype(int).sum() > out[-1, -1].astype(int).sum()  # the peak is brighter
    opaque = overlay(image, sal[None], alpha=1.0)
    np.testing.assert_array_equal(opaque[-1, -1], np.round(VIRIDIS[0] * 255))


def _read_png(path):
    data = open(path, "rb").read()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    pos, chunks = 8, {}
    while pos < len(data):
        (n,) = struct.unpack(">I", data[pos : pos + 4])
        tag, body = data[pos + 4 : pos + 8], data[pos + 8 : pos + 8 + n]
        (crc,) = struct.unpack(">I", data[pos + 8 + n : pos + 12 + n])
        assert crc == zlib.crc32(tag + body) & 0xFFFFFFFF
        chunks[tag] = chunks.get(tag, b"") + body
        pos += 12 + n
    W, H, depth, ctype = struct.unpack(">IIBB", chunks[b"IHDR"][:10])
    ch = 3 if ctype == 2 else 1
    raw = np.frombuffer(zlib.decompress(chunks[b"IDAT"]), np.uint8).reshape(H, 1 + W * ch)
    assert depth == 8 and set(raw[:, 0].tolist()) <= {0, 1, 2}  # None, Sub, Up
    rows = raw[:, 1:].astype(np.int64)
    for y in range(H):  # undo the filters
        if raw[y, 0] == 1:
            for x in range(ch, W * ch):
                rows[y, x] = (rows[y, x] + rows[y, x - ch]) % 256
        elif raw[y, 0] == 2 and y > 0:
            rows[y] = (rows[y] + rows[y - 1]) % 256
    rows = rows.astype(np.uint8)
    return rows.reshape(H, W, ch).squeeze(-1) if ch == 1 else rows.reshape(H, W, 3)


@pytest.mark.parametrize("shape", [(5, 7, 3), (4, 9), (6, 8, 3, "smooth")])
def test_write_png_round_trip(tmp_path, shape):
    if shape[-1] == "smooth":  # repeated rows and columns: Sub and Up filters get chosen
        base = np.random.default_rng(0).integers(0, 256, size=(3, 4, 3), dtype=np.uint8)
        img = np.repeat(np.repeat(base, 2, 0), 2, 1)
    else:
        img = np.random.default_rng(0).integers(0, 256, size=shape, dtype=np.uint8)
    path = tmp_path / "x.png"
    write_png(path, img)
    np.testing.assert_array_equal(_read_png(path), img)
    try:
        from PIL import Image
    except ImportError:
        return
    np.testing.assert_array_equal(np.asarray(Image.open(path)), img)


def test_write_png_rejects_bad_input(tmp_path):
    with pytest.raises(TypeError):
        write_png(tmp_path / "a.png", np.zeros((3, 3), np.float32))
    with pytest.raises(ValueError):
        write_png(tmp_path / "a.png", np.zeros((3, 3, 4), np.uint8))


def test_grad_cam_matches_manual_computation():
    torch.manual_seed(0)
    body = nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.ReLU())
    model = nn.Sequential(body, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3)).double()
    x = torch.randn(3, 2, 5, 5, dtype=torch.float64)
    cam = grad_cam(model, x, body)
    # manual: d logit_c / dA = W[c] / (h * w) for average pooling, so the weights are W[c] / 25
    A = body(x)
    target = model(x).argmax(1)
    w = model[3].weight[target] / 25
    manual = torch.relu((w[:, :, None, None] * A).sum(1, keepdim=True))
    torch.testing.assert_close(cam, manual.detach())
    assert all(p.grad is None for p in model.parameters())  # no parameter gradient touched
    # explicit targets, frozen parameters, and no_grad context all work
    for p in model.parameters():
        p.requires_grad_(False)
    with torch.no_grad():
        cam1 = grad_cam(model, x, body, target=torch.tensor([1, 1, 1]))
    w1 = model[3].weight[1] / 25
    torch.testing.assert_close(cam1, torch.relu((w1[None, :, None, None] * A).sum(1, keepdim=True)).detach())


def test_grad_cam_through_brnpa_head():
    from brnpa_triton.nn import BRNPAClassifier

    torch.manual_seed(0)
    body = nn.Sequential(nn.Conv2d(1, 6, 3, padding=1), nn.ReLU())
    model = BRNPAClassifier(body, 6, 4).eval()
    cam = grad_cam(model, torch.randn(2, 1, 8, 8), body[1])
    assert cam.shape == (2, 1, 8, 8) and torch.isfinite(cam).all() and (cam >= 0).all()
