"""A BR-NPA classifier trained as a training loop runs it, on every device (CPU always, CUDA when
present): torch.compile(fullgraph=True), a whole step captured in a CUDA graph, autocast with
bfloat16 and float16 (+ GradScaler), and torch.func transforms. Every result is compared with
plain eager training, or with float64, not just run.

On CUDA, ``backend="auto"`` runs the fused Triton kernels; on CPU the PyTorch path.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import brnpa_triton as bt
from brnpa_triton import testing
from tests.devices import (  # noqa: F401  (float32_exact: a fixture)
    CUDA_ONLY,
    ON_EVERY_DEVICE,
    compile_backend,
    float32_exact,
    synchronize,
)

pytestmark = pytest.mark.usefixtures("float32_exact")

B, C, H, W, CLASSES, PARTS = 2, 8, 6, 6, 3, 2


def make_model(device, seed=0) -> bt.BRNPAClassifier:
    """conv -> ReLU backbone ((B, 8, 6, 6) features) and the paper's head, in float32."""
    torch.manual_seed(seed)
    backbone = nn.Sequential(nn.Conv2d(3, C, 3, padding=1), nn.ReLU())
    return bt.BRNPAClassifier(backbone, C, CLASSES, PARTS).to(device)


def batches(device, count, seed=1):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(count):
        images = torch.rand(B, 3, H, W, generator=g)
        labels = torch.randint(0, CLASSES, (B,), generator=g)
        out.append((images.to(device), labels.to(device)))
    return out


def eager_training(model, data, lr=0.1):
    """Losses and final parameters of plain eager SGD over ``data``."""
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    losses = []
    for images, labels in data:
        optimizer.zero_grad(set_to_none=True)
        loss = F.cross_entropy(model(images), labels)
        loss.backward()
        optimizer.step()
        losses.append(loss.detach())
    return torch.stack(losses), [p.detach().clone() for p in model.parameters()]


def assert_params_close(actual, expected, rtol, atol):
    for a, e in zip(actual, expected, strict=True):
        torch.testing.assert_close(a, e, rtol=rtol, atol=atol)


# ---- torch.compile ---------------------------------------------------------------------------

@ON_EVERY_DEVICE
def test_compiled_training_step_matches_eager(device):
    """The forward of a training step compiled with fullgraph=True (any graph break raises), its
    AOTAutograd backward and an eager SGD step: the same losses and parameters as eager, step by step."""
    torch._dynamo.reset()
    data = batches(device, 3)
    model = make_model(device)
    reference = copy.deepcopy(model)
    compiled = torch.compile(model, fullgraph=True, backend=compile_backend(device))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    losses = []
    for images, labels in data:
        optimizer.zero_grad(set_to_none=True)
        loss = F.cross_entropy(compiled(images), labels)
        loss.backward()
        optimizer.step()
        losses.append(loss.detach())
    eager_losses, eager_params = eager_training(reference, data)
    torch.testing.assert_close(torch.stack(losses), eager_losses, rtol=1e-5, atol=1e-6)
    assert_params_close(list(model.parameters()), eager_params, rtol=1e-4, atol=1e-6)
    assert not torch.equal(eager_params[0], make_model(device).backbone[0].weight.detach())  # it trained


@ON_EVERY_DEVICE
def test_compiled_model_returns_the_eager_output(device):
    """return_output=True under fullgraph=True: every BRNPAOutput field equals eager's."""
    torch._dynamo.reset()
    model = make_model(device).eval()
    images, _ = batches(device, 1)[0]
    compiled = torch.compile(lambda x: model(x, return_output=True), fullgraph=True, backend=compile_backend(device))
    logits, out = compiled(images)
    eager_logits, eager_out = model(images, return_output=True)
    torch.testing.assert_close(logits, eager_logits, rtol=1e-5, atol=1e-6)
    assert torch.equal(out.indices, eager_out.indices)
    for name in ("vectors", "maps", "activity", "norms"):
        torch.testing.assert_close(getattr(out, name), getattr(eager_out, name), rtol=1e-5, atol=1e-6, msg=name)


# ---- CUDA graphs -----------------------------------------------------------------------------

OPTIMIZERS = {
    "sgd-momentum": lambda params: torch.optim.SGD(params, lr=0.1, momentum=0.9),
    "adam-capturable": lambda params: torch.optim.Adam(params, lr=1e-2, capturable=True),
}


@CUDA_ONLY
@pytest.mark.parametrize("make_optimizer", OPTIMIZERS.values(), ids=list(OPTIMIZERS))
def test_training_step_captured_in_a_cuda_graph_replays_the_eager_losses(make_optimizer):
    """Forward, backward and optimizer step captured once in a CUDA graph, replayed on new
    batches copied into static inputs: the same losses and parameters as the same steps run
    eagerly. (The capture fails if anything synchronises with the host.)"""
    device = torch.device("cuda")
    warmup, data = batches(device, 1, seed=2)[0], batches(device, 4, seed=3)
    model = make_model(device)
    reference = copy.deepcopy(model)
    optimizer = make_optimizer(model.parameters())
    static_images, static_labels = (t.clone() for t in warmup)

    def step():
        optimizer.zero_grad(set_to_none=False)
        loss = F.cross_entropy(model(static_images), static_labels)
        loss.backward()
        optimizer.step()
        return loss

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up (kernel compilation, plan cache, optimizer state) off the capture
        for _ in range(3):
            step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_loss = step()
    losses = []
    for images, labels in data:
        static_images.copy_(images)
        static_labels.copy_(labels)
        graph.replay()
        losses.append(static_loss.clone())
    synchronize(device)

    ref_optimizer = make_optimizer(reference.parameters())
    ref_losses = []
    for i, (images, labels) in enumerate([warmup] * 3 + data):
        ref_optimizer.zero_grad(set_to_none=False)
        loss = F.cross_entropy(reference(images), labels)
        loss.backward()
        ref_optimizer.step()
        if i >= 3:
            ref_losses.append(loss.detach())
    torch.testing.assert_close(torch.stack(losses), torch.stack(ref_losses), rtol=1e-5, atol=1e-6)
    assert_params_close(list(model.parameters()), [p.detach() for p in reference.parameters()], 1e-4, 1e-6)
    assert len(set(torch.stack(losses).tolist())) == len(data)  # each replay saw its own batch


@CUDA_ONLY
def test_brnpa_forward_and_backward_replayed_in_a_cuda_graph_are_bitwise_eager():
    """The operator alone (fused kernels, greedy seeds, NaN-poisoned allocations): outputs and
    gradient of a replay equal the eager ones bit for bit."""
    from brnpa_triton.ops import triton_impl

    device = torch.device("cuda")
    x = testing.view_in_layout(testing.random_values(4, 128, 14 * 14, seed=3).float(), "channels_last", device=device)
    grads = testing.random_grads(x, 3, seed=3)
    with testing.poisoned_allocations(triton_impl):
        eager = triton_impl.forward(x, 3, True)
        eager_dx = triton_impl.backward(x, grads[0], grads[1], None, grads[2], eager.saved(), True)
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            warm = triton_impl.forward(x, 3, True)
            triton_impl.backward(x, grads[0], grads[1], None, grads[2], warm.saved(), True)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = triton_impl.forward(x, 3, True)
            dx = triton_impl.backward(x, grads[0], grads[1], None, grads[2], out.saved(), True)
        graph.replay()
    synchronize(device)
    for a, b in zip(out, eager, strict=True):
        assert torch.equal(a, b)
    assert torch.equal(dx, eager_dx)


# ---- autocast ----------------------------------------------------------------------------------

def autocast_supported(device, dtype) -> bool:
    """Whether this torch autocasts a conv to ``dtype`` on ``device`` (CPU float16: recent torch only)."""
    with torch.autocast(device.type, dtype=dtype):
        conv = nn.Conv2d(1, 1, 1).to(device)
        return conv(torch.ones(1, 1, 1, 1, device=device)).dtype == dtype


HALF_DTYPES = pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])


@ON_EVERY_DEVICE
@HALF_DTYPES
def test_autocast_pools_in_the_half_dtype_to_its_tolerance(device, dtype):
    """Under autocast the conv hands BR-NPA half-precision features: it pools them in that dtype
    (outputs in it), within the dtype's tolerance of float64 on the same features (the same seeds),
    and the gradient reaching the features is within tolerance of float64's."""
    if not autocast_supported(device, dtype):
        pytest.skip(f"this torch has no {dtype} autocast on {device.type}")
    model = make_model(device)
    images, labels = batches(device, 1)[0]
    with torch.autocast(device.type, dtype=dtype):
        features = model.backbone(images)
        features.retain_grad()
        logits, out = model.head(features, return_output=True)
        loss = F.cross_entropy(logits, labels)
    assert features.dtype == dtype and out.vectors.dtype == dtype and out.maps.dtype == dtype
    loss.backward()
    testing.assert_greedy_seeds(features.flatten(2), out.indices, rel=1e-2)

    x64 = features.detach().double().cpu().requires_grad_()
    noise = F.one_hot(out.indices.cpu(), H * W).double().view(B, PARTS, H, W)
    ref = bt.brnpa(x64, PARTS, seeds="random", noise=noise)
    cond = testing.conditioning(ref.maps.detach().flatten(2))
    tol = testing.SCALED_TOLERANCE[dtype] * cond
    for name in ("vectors", "maps", "norms", "activity"):
        testing.assert_scaled_close(getattr(out, name).float().cpu(), getattr(ref, name).detach(), tol, name)
    # The same loss in float64 (the head's weights upcast): the features' gradient to tolerance.
    weight, bias = (t.detach().double().cpu() for t in (model.head.fc.weight, model.head.fc.bias))
    F.cross_entropy(F.linear(ref.vectors.flatten(1), weight, bias), labels.cpu()).backward()
    assert features.grad.dtype == dtype
    testing.assert_scaled_close(features.grad.double().cpu(), x64.grad, tol * cond, "features.grad")


@ON_EVERY_DEVICE
@HALF_DTYPES
def test_autocast_training_tracks_float32_training(device, dtype):
    """A few SGD steps under autocast (float16 with a GradScaler) stay within the dtype's
    tolerance of the same steps in float32."""
    if not autocast_supported(device, dtype):
        pytest.skip(f"this torch has no {dtype} autocast on {device.type}")
    data = batches(device, 3)
    model = make_model(device)
    reference = copy.deepcopy(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler(device.type, init_scale=2.0**10, enabled=dtype == torch.float16)
    losses = []
    for images, labels in data:
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=dtype):
            loss = F.cross_entropy(model(images), labels)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        losses.append(loss.detach().float())
    eager_losses, eager_params = eager_training(reference, data)
    tol = 10 * testing.SCALED_TOLERANCE[dtype]  # a few roundings in conv, pooling and linear per step
    torch.testing.assert_close(torch.stack(losses), eager_losses, rtol=tol, atol=tol)
    assert_params_close(list(model.parameters()), eager_params, rtol=tol, atol=tol)
    if dtype == torch.float16:
        assert scaler.get_scale() == 2.0**10  # no step was skipped: the gradients were finite


@ON_EVERY_DEVICE
@pytest.mark.parametrize("zero_vector", [True, False], ids=["zero-vector", "no-zero-vector"])
def test_grad_scaler_skips_the_step_when_float16_gradients_overflow(device, zero_vector):
    """At an all-zero position the true gradient of the maps is ~1/eps = 1e5 times the seed
    direction, past float16's range: it overflows to inf (as PyTorch's own gradients do), so
    GradScaler sees it, skips the step (parameters unchanged) and lowers its scale. Without the zero
    vector the same loss has finite gradients and the step is taken."""
    if not autocast_supported(device, torch.float16):
        pytest.skip(f"this torch has no float16 autocast on {device.type}")
    torch.manual_seed(0)
    head = bt.BRNPAHead(C, CLASSES, PARTS).to(device)
    features = torch.rand(B, C, H, W, generator=torch.Generator().manual_seed(4)).to(device) + 0.1
    if zero_vector:
        features[:, :, 0, 0] = 0.0
    features.requires_grad_()
    before = [p.detach().clone() for p in head.parameters()]
    optimizer = torch.optim.SGD(list(head.parameters()) + [features], lr=0.1)
    scaler = torch.amp.GradScaler(device.type, init_scale=1.0)
    labels = torch.zeros(B, dtype=torch.long, device=device)
    with torch.autocast(device.type, dtype=torch.float16):
        out = head.pool(features.half())
        loss = out.maps[:, :, 0, 0].sum() * 100 + F.cross_entropy(head.fc(out.vectors.flatten(1)), labels)
    scaler.scale(loss).backward()
    scaler.step(optimizer)
    scaler.update()
    changed = [not torch.equal(p.detach(), q) for p, q in zip(head.parameters(), before, strict=True)]
    if zero_vector:
        assert torch.isinf(features.grad[:, :, 0, 0]).any()
        assert scaler.get_scale() < 1.0 and not any(changed)
    else:
        assert torch.isfinite(features.grad).all()
        assert scaler.get_scale() == 1.0 and all(changed)


# ---- torch.func --------------------------------------------------------------------------------

@ON_EVERY_DEVICE
def test_func_grad_of_the_parameters_matches_backward(device):
    """torch.func.grad over the parameters (functional_call), as functional training loops do,
    equals loss.backward()'s gradients; the same in float64 on CPU to float32's tolerance."""
    model = make_model(device)
    images, labels = batches(device, 1)[0]
    params = {k: v.detach() for k, v in model.named_parameters()}

    def loss_fn(p, x, y, model=model):
        return F.cross_entropy(torch.func.functional_call(model, p, (x,)), y)

    grads = torch.func.grad(loss_fn)(params, images, labels)
    model.zero_grad()
    loss_fn(dict(model.named_parameters()), images, labels).backward()
    model64 = copy.deepcopy(model).double().cpu()
    params64 = {k: v.detach() for k, v in model64.named_parameters()}
    grads64 = torch.func.grad(loss_fn)(params64, images.double().cpu(), labels.cpu(), model64)
    for name, p in model.named_parameters():
        torch.testing.assert_close(grads[name], p.grad, rtol=1e-5, atol=1e-7, msg=name)
        testing.assert_scaled_close(grads[name].double().cpu(), grads64[name], 1e-4, name)


@ON_EVERY_DEVICE
def test_per_sample_gradients_with_vmap_of_grad(device):
    """vmap(grad) over the batch, the usual per-sample-gradient recipe: each equals the gradient
    of that one image computed alone."""
    model = make_model(device)
    images, labels = batches(device, 1)[0]
    params = {k: v.detach() for k, v in model.named_parameters()}

    def one_loss(p, x, y):
        logits = torch.func.functional_call(model, p, (x[None],))
        return F.cross_entropy(logits, y[None])

    per_sample = torch.func.vmap(torch.func.grad(one_loss), in_dims=(None, 0, 0))(params, images, labels)
    for i in range(B):
        alone = torch.func.grad(one_loss)(params, images[i], labels[i])
        for name in params:
            testing.assert_scaled_close(per_sample[name][i], alone[name], 1e-5, name)


@ON_EVERY_DEVICE
def test_func_vjp_jacrev_and_vmap_match_float64(device):
    """vjp and jacrev of every differentiable output, and vmap of the forward over a stack of
    feature maps, against float64 autograd on CPU."""
    g = torch.Generator().manual_seed(5)
    x64 = torch.rand(3, B, C, 3, 2, generator=g, dtype=torch.float64) + 0.05  # (V, B, C, H, W)
    x = x64.float().to(device)

    def outputs(f):
        out = bt.brnpa(f, PARTS)
        return out.vectors, out.maps, out.norms, out.activity

    primals, vjp_fn = torch.func.vjp(outputs, x[0])
    cotangents = tuple(torch.randn(t.shape, generator=g, dtype=torch.float64) for t in primals)
    (vjp,) = vjp_fn(tuple(c.float().to(device) for c in cotangents))
    leaf = x[0].detach().double().cpu().requires_grad_()
    ref_outputs = outputs(leaf)
    (ref_vjp,) = torch.autograd.grad(ref_outputs, leaf, cotangents)
    testing.assert_scaled_close(vjp.double().cpu(), ref_vjp, 1e-4, "vjp")

    jac = torch.func.jacrev(lambda f: bt.brnpa(f, PARTS).vectors)(x[0])
    ref_jac = torch.autograd.functional.jacobian(lambda f: bt.brnpa(f, PARTS).vectors, leaf.detach())
    testing.assert_scaled_close(jac.double().cpu(), ref_jac, 1e-4, "jacrev")

    batched = torch.func.vmap(outputs)(x)
    for i in range(x.shape[0]):
        for a, e in zip(batched, outputs(x64[i]), strict=True):
            testing.assert_scaled_close(a[i].double().cpu(), e, 1e-5, f"vmap[{i}]")
