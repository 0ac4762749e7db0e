"""The evaluation surface on every device (CPU always, CUDA when present): saliency, sparsity,
deletion / insertion, Grad-CAM and every baseline, and a high-resolution backbone, each computed
in float32 (or the given dtype) on the device and compared with the same computation in float64
on CPU, to the dtype's tolerance.

The model is a BR-NPA classifier (on CUDA its pooling runs the fused Triton kernels, forward and,
for the gradient-based CAMs, backward).
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import brnpa_triton as bt
from brnpa_triton import baselines, testing
from brnpa_triton.explain import saliency, upsample
from brnpa_triton.metrics import box_blur, box_blur_zero_padded, deletion_insertion, gaussian_blur, sparsity
from tests.devices import ON_EVERY_DEVICE, float32_exact  # noqa: F401  (float32_exact: a fixture)

pytestmark = pytest.mark.usefixtures("float32_exact")

B, C, CLASSES, PARTS = 2, 8, 3, 2
SIZE = 12  # images 12 x 12, features 6 x 6


def make_model(device) -> bt.BRNPAClassifier:
    torch.manual_seed(0)
    backbone = nn.Sequential(nn.Conv2d(3, C, 3, stride=2, padding=1), nn.ReLU())
    return bt.BRNPAClassifier(backbone, C, CLASSES, PARTS).to(device).eval()


def twins(device):
    """The float32 model on ``device`` and its float64 copy on CPU."""
    model = make_model(device)
    return model, copy.deepcopy(model).double().cpu()


def images(seed=1) -> torch.Tensor:
    return torch.rand(B, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def float32_tol(maps: torch.Tensor) -> float:
    return testing.SCALED_TOLERANCE[torch.float32] * testing.conditioning(maps.detach().cpu().double().flatten(2))


# ---- saliency and sparsity -------------------------------------------------------------------

@ON_EVERY_DEVICE
@pytest.mark.parametrize("parts", [None, "all", 1, [1, 0]], ids=["part-0", "all", "int", "list"])
def test_saliency_on_device_matches_float64(device, parts):
    model, twin = twins(device)
    _, out = model(images().float().to(device), return_output=True)
    _, ref = twin(images(), return_output=True)
    assert torch.equal(out.indices.cpu(), ref.indices)
    sal, ref_sal = saliency(out, parts), saliency(ref, parts).detach()
    assert sal.device == device and sal.dtype == torch.float32
    testing.assert_scaled_close(sal.detach(), ref_sal, float32_tol(ref.maps), "saliency")
    up, ref_up = upsample(sal.detach(), SIZE), upsample(ref_sal, SIZE)
    testing.assert_scaled_close(up, ref_up, float32_tol(ref.maps), "upsampled saliency")


@ON_EVERY_DEVICE
@pytest.mark.parametrize("dtype", testing.DTYPES, ids=lambda d: str(d).removeprefix("torch."))
@pytest.mark.parametrize("tokens", [False, True], ids=["maps", "tokens"])
def test_sparsity_on_device_matches_float64(device, dtype, tokens):
    """sparsity of maps and norms held in ``dtype`` on the device, against float64 of the very
    same (rounded) values: computed in float32 (float64 kept), whatever the input dtype."""
    values = testing.random_features(B, C, 5, 4, seed=2, dtype=torch.float64)
    out = bt.brnpa(values.to(dtype).to(device), 3)
    maps, norms = out.maps, out.norms
    if tokens:
        maps, norms = maps.flatten(2), norms.flatten(1)
    result = sparsity(maps, norms)
    assert result.device == device and result.shape == (B,)
    expected = sparsity(maps.double().cpu(), norms.double().cpu())
    tol = 1e-12 if dtype == torch.float64 else testing.SCALED_TOLERANCE[torch.float32]
    testing.assert_scaled_close(result, expected, tol, "sparsity")


# ---- deletion / insertion --------------------------------------------------------------------

DELETION_CASES = {
    "library-cell-box": dict(),
    "library-pixel-gaussian": dict(unit="pixel", insertion_start="gaussian"),
    "library-cell-step3-logits": dict(step=3, softmax=False, blur_kernel=5),
    "authors-cell-box": dict(protocol="authors", step=2),
}


@ON_EVERY_DEVICE
@pytest.mark.parametrize("case", DELETION_CASES)
def test_deletion_insertion_on_device_matches_float64(device, case):
    """Both protocols, cells and pixels, each insertion start: curves, AUCs, fractions and targets
    of the float32 model on the device against the float64 model on CPU, for one float32
    saliency (the ranking is then the same on both)."""
    options = DELETION_CASES[case]
    model, twin = twins(device)
    x = images()
    _, out = model(x.float().to(device), return_output=True)
    sal = saliency(out).detach()
    result = deletion_insertion(model, x.float().to(device), sal, batch_size=16, **options)
    expected = deletion_insertion(twin, x, sal.cpu(), batch_size=16, **options)
    assert result.deletion.device == device
    assert torch.equal(result.target.cpu(), expected.target)
    torch.testing.assert_close(result.fractions.cpu(), expected.fractions)
    scale = 1.0 if options.get("softmax", True) else float(expected.deletion.abs().max())
    for name in ("deletion", "insertion", "deletion_auc", "insertion_auc"):
        actual, wanted = getattr(result, name).cpu().double(), getattr(expected, name).double()
        torch.testing.assert_close(actual, wanted, rtol=1e-4, atol=1e-5 * scale, msg=name)


@ON_EVERY_DEVICE
@pytest.mark.parametrize("blur", [box_blur, box_blur_zero_padded, gaussian_blur])
def test_insertion_starts_on_device_match_float64(device, blur):
    x = images()
    result = blur(x.float().to(device), 5)
    assert result.device == device and result.dtype == torch.float32
    testing.assert_scaled_close(result, blur(x, 5), 1e-6, blur.__name__)


# ---- Grad-CAM and the baselines --------------------------------------------------------------

def cam_options(method: str) -> dict:
    if method == "rise":  # the same masks on both devices (drawn on CPU)
        masks = baselines.rise_masks(24, (SIZE, SIZE), grid=3, generator=torch.Generator().manual_seed(3))
        return dict(masks=masks)
    if method == "scorecam":
        # Several batches of masked images. Unrectified: the weights are increases over the blank
        # image, and on this untrained model a class's rectified map can be all zero.
        return dict(batch_size=5, relu=False)
    return {}


@ON_EVERY_DEVICE
@pytest.mark.parametrize("method", sorted(baselines.BASELINES))
@pytest.mark.parametrize("target", [None, 2], ids=["predicted", "class-2"])
def test_baselines_on_device_match_float64(device, method, target):
    """Every CAM of the backbone's output (gradients through BR-NPA's backward) and RISE, float32
    on the device against float64 on CPU."""
    model, twin = twins(device)
    x = images()
    options = cam_options(method)
    result = baselines.explain(method, model, x.float().to(device), model.backbone, target, **options)
    expected = baselines.explain(method, twin, x, twin.backbone, target, **options)
    assert result.device == device and result.dtype == torch.float32 and result.shape == expected.shape
    assert expected.abs().max() > 0
    testing.assert_scaled_close(result, expected, 1e-4, method)


@ON_EVERY_DEVICE
def test_grad_cam_of_the_public_api_on_device(device):
    """bt.grad_cam (explain.grad_cam) with relu on and off, against float64."""
    model, twin = twins(device)
    x = images()
    for relu in (True, False):
        result = bt.grad_cam(model, x.float().to(device), model.backbone, relu=relu)
        expected = bt.grad_cam(twin, x, twin.backbone, relu=relu)
        testing.assert_scaled_close(result, expected, 1e-4, f"grad_cam relu={relu}")


# ---- high resolution -------------------------------------------------------------------------

class Block(nn.Module):
    def __init__(self, cin, cout, stride):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.downsample = nn.Conv2d(cin, cout, 1, stride, bias=False)

    def forward(self, x):
        return torch.relu(self.conv2(torch.relu(self.conv1(x))) + self.downsample(x))


class TinyResNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.layer1 = nn.Sequential(Block(3, 4, 2))
        self.layer2 = nn.Sequential(Block(4, C, 2))

    def forward(self, x):
        return self.layer2(self.layer1(x))


@ON_EVERY_DEVICE
def test_high_resolution_backbone_on_device_matches_float64(device):
    """make_high_resolution on a model already on the device: the feature map doubles (3x3 ->
    6x6), and a BR-NPA classifier on it gives float64's logits and maps."""
    torch.manual_seed(0)
    backbone = TinyResNet().to(device)
    assert backbone(images().float().to(device)).shape[2:] == (3, 3)
    high = bt.make_high_resolution(backbone, "layer2", copy=True)
    model = bt.BRNPAClassifier(high, C, CLASSES, PARTS).to(device).eval()
    twin = copy.deepcopy(model).double().cpu()
    logits, out = model(images().float().to(device), return_output=True)
    ref_logits, ref = twin(images(), return_output=True)
    assert out.maps.shape[2:] == (6, 6) and next(high.parameters()).device == device
    assert torch.equal(out.indices.cpu(), ref.indices)
    tol = float32_tol(ref.maps)
    testing.assert_scaled_close(logits.detach(), ref_logits.detach(), tol, "logits")
    testing.assert_scaled_close(out.maps.detach(), ref.maps.detach(), tol, "maps")
