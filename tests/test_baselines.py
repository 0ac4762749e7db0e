"""The CAM and RISE baselines: each against its defining property (float64, hand-built models) and
against captum where captum has the method (Grad-CAM; HiResCAM and XGrad-CAM from captum's
gradient x activation)."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from brnpa_triton.baselines import (
    BASELINES,
    explain,
    grad_cam,
    grad_cam_pp,
    hires_cam,
    rise,
    rise_masks,
    score_cam,
    xgrad_cam,
)


def gap_model(seed=0, bias=True):
    """conv + ReLU (the explained layer), global average pooling, linear head; float64."""
    torch.manual_seed(seed)
    body = nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.ReLU())
    model = nn.Sequential(body, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3, bias=bias)).double().eval()
    return model, body


def conv_head_model(seed=0):
    """A head that is linear and positively homogeneous in the layer's output (no bias):
    1x1 conv -> ReLU -> average pooling -> linear."""
    torch.manual_seed(seed)
    body = nn.Sequential(nn.Conv2d(2, 5, 3, padding=1), nn.ReLU())
    head = nn.Sequential(
        nn.Conv2d(5, 6, 1, bias=False), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(6, 3, bias=False)
    )
    return nn.Sequential(body, head).double().eval(), body


def images(B=3, seed=1):
    return torch.randn(B, 2, 5, 6, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def test_hirescam_equals_gradcam_under_average_pooling():
    model, body = gap_model()
    x = images()
    torch.testing.assert_close(hires_cam(model, x, body, relu=False), grad_cam(model, x, body, relu=False))


def test_hirescam_and_xgradcam_sum_to_the_logit_for_a_homogeneous_head():
    model, body = conv_head_model()
    x = images()
    logits = model(x).detach()
    target = logits.argmax(1)
    chosen = logits.gather(1, target[:, None])[:, 0]
    for method in (hires_cam, xgrad_cam):
        cam = method(model, x, body, relu=False)
        torch.testing.assert_close(cam.sum(dim=(1, 2, 3)), chosen, rtol=1e-6, atol=1e-6)


def test_gradcam_pp_closed_form_under_average_pooling():
    model, body = gap_model()
    x = images()
    A = body(x).detach()
    target = model(x).argmax(1)
    hw = A.shape[2] * A.shape[3]
    g = model[3].weight.detach()[target] / hw  # (B, C): the gradient is constant over positions
    alpha = 1.0 / (2.0 + g * A.sum(dim=(2, 3)))  # g^2 / (2 g^2 + sum A g^3)
    weights = hw * alpha * F.relu(g)
    expected = F.relu((weights[:, :, None, None] * A).sum(1, keepdim=True))
    torch.testing.assert_close(grad_cam_pp(model, x, body), expected)


def test_score_cam_against_a_per_channel_loop():
    model, body = gap_model()
    x = images(B=2)
    grey = torch.full((1, 2, 1, 1), 0.3, dtype=torch.float64)
    cams = {
        "zeros": score_cam(model, x, body, batch_size=5),
        "none": score_cam(model, x, body, baseline=None, batch_size=5),
        "grey": score_cam(model, x, body, baseline=grey, batch_size=3),
    }
    A = body(x).detach()
    target = model(x).argmax(1)
    for b in range(2):
        scores = []
        for c in range(A.shape[1]):
            m = F.interpolate(A[b : b + 1, c : c + 1], size=x.shape[2:], mode="bilinear", align_corners=False)
            m = (m - m.min()) / (m.max() - m.min()) if m.max() > m.min() else torch.zeros_like(m)
            scores.append(torch.softmax(model(x[b : b + 1] * m), 1)[0, target[b]])
        scores = torch.stack(scores).detach()
        for key, start in (("zeros", torch.zeros_like(x[:1])), ("none", None), ("grey", grey)):
            # the paper's increase of confidence over the baseline image (none: the masked score itself)
            base = 0.0 if start is None else torch.softmax(model(start.expand_as(x[:1])), 1)[0, target[b]].detach()
            expected = F.relu(((scores - base)[:, None, None] * A[b]).sum(0))
            torch.testing.assert_close(cams[key][b, 0], expected)


class ClutterModel(nn.Module):
    """The explained layer has two channels: the image on an evidence region (rows 0-1) and 5 x the
    image on a clutter region (rows 5-7). Only the evidence channel reaches the logits."""

    def __init__(self):
        super().__init__()
        self.layer = nn.Identity()

    def forward(self, x):
        evidence, clutter = torch.zeros_like(x), torch.zeros_like(x)
        evidence[:, :, :2] = x[:, :, :2]
        clutter[:, :, 5:] = 5 * x[:, :, 5:]
        a = self.layer(torch.cat([evidence, clutter], dim=1))
        e = a[:, 0].sum(dim=(1, 2)) / 4
        return torch.stack([e, torch.zeros_like(e)], dim=1)


def test_score_cam_weights_are_increases_over_the_baseline():
    # masking with the clutter channel removes the evidence: p = 0.5 = the zero image's probability, so its
    # increase (its weight) is 0; the raw probability 0.5 would weigh the strong clutter channel in
    model = ClutterModel().double().eval()
    x = torch.ones(1, 1, 8, 8, dtype=torch.float64)
    cam = score_cam(model, x, model.layer)
    p = torch.softmax(torch.tensor([4.0, 0.0], dtype=torch.float64), 0)[0]  # the evidence kept: 16 / 4
    expected = torch.zeros(8, 8, dtype=torch.float64)
    expected[:2] = p - 0.5
    torch.testing.assert_close(cam[0, 0], expected)
    peak = int(cam[0, 0].flatten().argmax())
    assert peak // 8 < 2  # on the evidence
    raw = score_cam(model, x, model.layer, baseline=None)
    assert int(raw[0, 0].flatten().argmax()) // 8 >= 5  # without the subtraction: on the clutter
    with pytest.raises(ValueError, match="baseline"):
        score_cam(model, x, model.layer, baseline="mean")
    with pytest.raises(ValueError, match="baseline"):
        score_cam(model, x, model.layer, baseline=torch.zeros(3, 1, 1))


class RegionModel(nn.Module):
    """Class 0's logit is 3 x the sum of the image over a known region; class 1's is 0."""

    def __init__(self, rows, cols):
        super().__init__()
        self.rows, self.cols = rows, cols

    def forward(self, x):
        e = 3 * x[:, :, self.rows, self.cols].sum(dim=(1, 2, 3))
        return torch.stack([e, torch.zeros_like(e)], 1)


def test_rise_formula_with_given_masks_and_its_peak():
    x = torch.ones(2, 1, 8, 8, dtype=torch.float64)
    model = RegionModel(slice(0, 2), slice(5, 8))
    masks = rise_masks(7, (8, 8), grid=4, generator=torch.Generator().manual_seed(0)).double()
    sal = rise(model, x, target=torch.tensor(0), masks=masks, p=0.5)
    probs = torch.softmax(model(x[:1] * masks), 1)[:, 0]
    expected = (probs[:, None, None, None] * masks).sum(0) / (7 * 0.5)
    torch.testing.assert_close(sal[0], expected)
    torch.testing.assert_close(sal[1], expected)
    many = rise(model, x[:1], target=0, n_masks=400, grid=4, generator=torch.Generator().manual_seed(1))
    peak = int(many[0, 0].flatten().argmax())
    assert peak // 8 < 2 and peak % 8 >= 5  # the region that carries the evidence


def test_rise_masks_shape_range_and_keep_rate():
    m = rise_masks(200, (10, 12), grid=5, p=0.3, generator=torch.Generator().manual_seed(0))
    assert m.shape == (200, 1, 10, 12) and m.min() >= 0 and m.max() <= 1
    assert abs(float(m.mean()) - 0.3) < 0.05


def test_target_broadcast_and_errors():
    model, body = gap_model()
    x = images(B=2)
    for method in ("gradcam", "gradcam++", "hirescam", "xgradcam", "scorecam"):
        one = explain(method, model, x, body, target=torch.tensor([2]))
        both = explain(method, model, x, body, target=torch.tensor([2, 2]))
        torch.testing.assert_close(one, both)
        assert one[1].abs().sum() > 0 or both[1].abs().sum() == 0
    with pytest.raises(ValueError, match="target"):
        grad_cam(model, images(B=3), body, target=torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="target"):
        grad_cam(model, x, body, target=torch.tensor([0, 3]))
    with pytest.raises(TypeError, match="target"):
        grad_cam(model, x, body, target=torch.tensor([0.0, 1.0]))
    with pytest.raises(ValueError, match="method"):
        explain("lime", model, x, body)
    with pytest.raises(ValueError, match="layer"):
        explain("gradcam", model, x)
    assert set(BASELINES) == {"gradcam", "gradcam++", "hirescam", "xgradcam", "scorecam", "rise"}


def test_gradcam_length_one_target_for_two_images_is_broadcast():
    model, body = gap_model()
    x = images(B=2)
    one = grad_cam(model, x, body, target=torch.tensor([1]), relu=False)
    for b in range(2):
        torch.testing.assert_close(
            one[b : b + 1], grad_cam(model, x[b : b + 1], body, target=torch.tensor([1]), relu=False)
        )
    assert one[1].abs().sum() > 0


captum = pytest.importorskip("captum.attr", reason="captum (the 'test' extra) compares the CAMs with captum's")


def test_against_captum():
    model, body = gap_model(bias=True)
    x = images(B=4)
    target = torch.tensor([0, 2, 1, 1])
    ref = captum.LayerGradCam(model, body).attribute(x, target=target, relu_attributions=True)
    torch.testing.assert_close(grad_cam(model, x, body, target=target), ref.detach())
    model2, body2 = conv_head_model()
    gxa = captum.LayerGradientXActivation(model2, body2).attribute(x, target=target).detach()  # (B, C, h, w)
    torch.testing.assert_close(hires_cam(model2, x, body2, target=target), F.relu(gxa.sum(1, keepdim=True)))
    A = body2(x).detach()
    w = gxa.sum(dim=(2, 3), keepdim=True) / (A.sum(dim=(2, 3), keepdim=True) + 1e-7)
    torch.testing.assert_close(xgrad_cam(model2, x, body2, target=target), F.relu((w * A).sum(1, keepdim=True)))


@pytest.mark.parametrize("method", sorted(BASELINES))
@pytest.mark.parametrize("context", [torch.no_grad, torch.inference_mode])
def test_every_method_works_without_autograd_around_it(method, context):
    model, body = gap_model()
    x = images(B=2)
    options = {"masks": rise_masks(6, x.shape[2:], grid=2, generator=torch.Generator().manual_seed(0))}
    options = options if method == "rise" else {}
    expected = explain(method, model, x, body, **options)
    with context():
        got = explain(method, model, x, body, **options)
        inference_images = x.clone()  # an inference tensor under inference_mode
        again = explain(method, model, inference_images, body, **options)
    torch.testing.assert_close(got, expected)
    torch.testing.assert_close(again, expected)
    assert not any(p.grad is not None for p in model.parameters())


def test_gradient_methods_name_a_model_made_under_inference_mode():
    with torch.inference_mode():
        model, body = gap_model()
    for method in ("gradcam", "gradcam++", "hirescam", "xgradcam"):
        with pytest.raises(RuntimeError, match="inference_mode"):
            explain(method, model, images(B=2), body)
    assert explain("scorecam", model, images(B=2), body).shape == (2, 1, 5, 6)  # forward passes only
