"""The modules of brnpa_triton.nn on every device (CPU always, CUDA when present: there
``backend="auto"`` runs the fused Triton kernels), in every dtype and input layout, against the
float64 line-by-line oracle on CPU: outputs, gradients, gradient strides and run-to-run equality.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import brnpa_triton as bt
from brnpa_triton import testing
from tests.devices import ON_EVERY_DEVICE, float32_exact  # noqa: F401  (float32_exact: a fixture)
from tests.helpers import reference

pytestmark = pytest.mark.usefixtures("float32_exact")

B, C, H, W, K = 2, 8, 6, 6, 3
N = H * W
DTYPES = pytest.mark.parametrize("dtype", testing.DTYPES, ids=lambda d: str(d).removeprefix("torch."))
# Greedy seeds are the float64 argmax up to this fraction of the score's range (near-ties may go
# either way in a low precision).
SEED_REL = {torch.float64: 1e-12, torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 3e-2}
# Options beyond the defaults: the paper's ablations and the ranking by activity.
VARIANTS = {
    "default": {},
    "no-refine": dict(refine=False),
    "random-seeds": dict(seeds="random"),
    "by-activity": dict(order="activity"),
}


def as_maps(t: torch.Tensor, layout: str) -> torch.Tensor:
    """(B, ..., N) token-shaped outputs back to (B, ..., H, W)."""
    return t.unflatten(-1, (H, W)) if layout == "tokens" else t


def bchw(x: torch.Tensor, layout: str) -> torch.Tensor:
    return x.transpose(1, 2).unflatten(2, (H, W)) if layout == "tokens" else x


@ON_EVERY_DEVICE
@DTYPES
@pytest.mark.parametrize("layout", testing.FEATURE_LAYOUTS)
@pytest.mark.parametrize("variant", VARIANTS)
def test_pool_matches_the_float64_oracle(device, dtype, layout, variant):
    options = VARIANTS[variant]
    values = testing.random_features(B, C, H, W, seed=3, dtype=torch.float64) + 0.05  # off the kink at 0
    x = testing.features_in_layout(values.to(dtype).to(device), layout).requires_grad_()
    pool = bt.BRNPAPool(K, **options)
    noise = torch.rand(B, K, H, W, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    call = dict(noise=(noise.flatten(2) if layout == "tokens" else noise).to(device)) if "seeds" in options else {}
    out = pool(x, **call)
    assert out.vectors.dtype == dtype and out.maps.dtype == dtype and out.vectors.device == device

    x64 = bchw(x.detach(), layout).double().cpu()
    if "seeds" in options:
        selection = noise.flatten(2).argmax(2)
    else:  # the operator's own seeds, in selection order, checked to be the greedy argmax
        selection = out.indices if options.get("order") != "activity" else bt.BRNPAPool(K)(x).indices
        testing.assert_greedy_seeds(x64.flatten(2), selection, SEED_REL[dtype])
    forced = F.one_hot(selection.cpu(), N).double()
    leaf = x64.clone().requires_grad_()
    ref = reference(leaf, K, refine=options.get("refine", True), noise=forced, order=options.get("order", "selection"))
    assert torch.equal(out.indices.cpu(), ref.indices)
    cond = testing.conditioning(ref.maps.detach().flatten(2))
    tol = testing.SCALED_TOLERANCE[dtype] * cond
    for name in ("vectors", "maps", "activity", "norms"):
        value = getattr(out, name).detach()
        value = as_maps(value, layout) if name in ("maps", "norms") else value
        testing.assert_scaled_close(value, getattr(ref, name).detach(), tol, name)

    g = torch.Generator().manual_seed(5)
    cotangents = [torch.randn(t.shape, generator=g, dtype=torch.float64) for t in (ref.vectors, ref.maps, ref.norms)]
    ref_loss = sum((c * t).sum() for c, t in zip(cotangents, (ref.vectors, ref.maps, ref.norms), strict=True))
    (ref_grad,) = torch.autograd.grad(ref_loss, leaf)
    outputs = (out.vectors, as_maps(out.maps, layout), as_maps(out.norms, layout))
    loss = sum((c.to(device, dtype) * t).float().sum() for c, t in zip(cotangents, outputs, strict=True))
    (grad,) = torch.autograd.grad(loss, x)
    assert grad.dtype == dtype and torch.isfinite(grad).all()
    testing.assert_scaled_close(bchw(grad, layout), ref_grad, tol * cond, "grad")
    if layout != "strided":  # a dense input's gradient has its strides
        assert grad.stride() == x.stride(), (grad.stride(), x.stride())

    again = pool(x.detach(), **call)
    for a, b in zip(out, again, strict=True):
        assert torch.equal(a.detach(), b), "two runs differ"


@ON_EVERY_DEVICE
@pytest.mark.parametrize("num_parts", range(1, 10))
def test_every_number_of_parts(device, num_parts):
    """K = 1..9 (the kernels group parts by four): float32 against the float64 oracle."""
    values = testing.random_features(B, 16, 3, 3, seed=num_parts, dtype=torch.float64) + 0.05
    out = bt.BRNPAPool(num_parts)(values.float().to(device))
    testing.assert_greedy_seeds(values.flatten(2), out.indices, SEED_REL[torch.float32])
    ref = reference(values, num_parts, noise=F.one_hot(out.indices.cpu(), 9).double())
    tol = testing.SCALED_TOLERANCE[torch.float32] * testing.conditioning(ref.maps.flatten(2))
    for name in ("vectors", "maps", "activity", "norms"):
        testing.assert_scaled_close(getattr(out, name), getattr(ref, name), tol, name)


def float64_twin(module: nn.Module) -> nn.Module:
    return copy.deepcopy(module).double().cpu()


def assert_gradients_close(module, twin, tol):
    for (name, p), q in zip(module.named_parameters(), twin.parameters(), strict=True):
        testing.assert_scaled_close(p.grad, q.grad, tol, f"{name}.grad")


@ON_EVERY_DEVICE
@pytest.mark.parametrize("tokens", [False, True], ids=["maps", "tokens"])
def test_classifier_on_device_matches_float64(device, tokens):
    """BRNPAClassifier (conv backbone, or one that hands tokens to the head) in float32 on the
    device: logits, pooled output and every parameter's gradient within float32's tolerance of a
    float64 copy on CPU."""
    torch.manual_seed(0)
    layers = [nn.Conv2d(3, C, 3, padding=1), nn.ReLU()] + ([nn.Flatten(2), Transpose()] if tokens else [])
    model = bt.BRNPAClassifier(nn.Sequential(*layers), C, 4, num_parts=K).to(device)
    twin = float64_twin(model)
    images = torch.rand(B, 3, H, W, generator=torch.Generator().manual_seed(1))
    labels = torch.tensor([1, 3])
    logits, out = model(images.to(device), return_output=True)
    ref_logits, ref = twin(images.double(), return_output=True)
    assert torch.equal(out.indices.cpu(), ref.indices)
    tol = testing.SCALED_TOLERANCE[torch.float32] * testing.conditioning(ref.maps.detach())
    testing.assert_scaled_close(logits, ref_logits.detach(), tol, "logits")
    testing.assert_scaled_close(out.maps, ref.maps.detach(), tol, "maps")
    F.cross_entropy(logits, labels.to(device)).backward()
    F.cross_entropy(ref_logits, labels).backward()
    assert_gradients_close(model, twin, tol * 10)


class Transpose(nn.Module):
    def forward(self, x):
        return x.transpose(1, 2)


@ON_EVERY_DEVICE
@pytest.mark.parametrize("dropout", [0.0, 0.5])
def test_head_in_training_mode_on_device_matches_float64(device, dropout):
    """BRNPAHead in training mode: the dropout mask drawn on the device (read off the Linear's
    input) applied to the float64 twin's pooled vectors gives the same logits and gradients."""
    torch.manual_seed(0)
    head = bt.BRNPAHead(C, 5, K, dropout=dropout).to(device)
    twin = float64_twin(head)
    seen = {}
    head.fc.register_forward_pre_hook(lambda _module, args: seen.update(input=args[0].detach()))
    features = testing.random_features(B, C, H, W, seed=6) + 0.05
    x, x64 = features.float().to(device).requires_grad_(), features.clone().requires_grad_()
    logits = head(x)
    kept = seen["input"] != 0  # the vectors are positive: only dropout zeroes an entry
    if dropout == 0.0:
        assert kept.all()
    else:
        assert not kept.all() and kept.any()
    ref = twin.pool(x64).vectors.flatten(1) * kept.cpu() / (1 - dropout)
    ref_logits = twin.fc(ref)
    testing.assert_scaled_close(logits, ref_logits.detach(), 1e-4, "logits")
    logits.square().sum().backward()
    ref_logits.square().sum().backward()
    testing.assert_scaled_close(x.grad, x64.grad, 1e-3, "features.grad")
    assert_gradients_close(head, twin, 1e-4)


@ON_EVERY_DEVICE
@pytest.mark.parametrize("variant", ["1x1", "authors"])
@pytest.mark.parametrize("wsdan_normalize", [False, True], ids=["plain", "wsdan"])
def test_bilinear_attention_pooling_on_device_matches_float64(device, variant, wsdan_normalize):
    torch.manual_seed(0)
    module = bt.BilinearAttentionPooling(C, 4, variant=variant, wsdan_normalize=wsdan_normalize).to(device)
    twin = float64_twin(module)
    features = testing.random_features(B, C, H, W, seed=7)
    x = features.float().to(device).requires_grad_()
    x64 = features.clone().requires_grad_()
    out, ref = module(x), twin(x64)
    for name in ("vectors", "maps"):
        testing.assert_scaled_close(getattr(out, name), getattr(ref, name).detach(), 1e-5, name)
    g = torch.randn(ref.vectors.shape, generator=torch.Generator().manual_seed(8), dtype=torch.float64)
    (out.vectors * g.float().to(device)).sum().backward()
    (ref.vectors * g).sum().backward()
    testing.assert_scaled_close(x.grad, x64.grad, 1e-4, "features.grad")
    assert_gradients_close(module, twin, 1e-4)
    if variant == "1x1":  # tokens: the same projection per token
        tokens = module(x.detach().flatten(2).transpose(1, 2))
        testing.assert_scaled_close(tokens.vectors, ref.vectors.detach(), 1e-5, "token vectors")
