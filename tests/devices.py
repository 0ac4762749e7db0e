"""The devices the device tests run on: always "cpu", and "cuda", skipped with a reason when
there is no CUDA device, so that every such test runs in CPU CI and the same test runs on the GPU.

Decorate a test taking ``device`` with ``ON_EVERY_DEVICE``; mark what only CUDA has (CUDA graphs,
GradScaler with float16 autocast) ``CUDA_ONLY``::

    from tests.devices import ON_EVERY_DEVICE, float32_exact  # noqa: F401  (a fixture)

    pytestmark = pytest.mark.usefixtures("float32_exact")

    @ON_EVERY_DEVICE
    def test_something(device): ...
"""

from __future__ import annotations

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
NO_CUDA = "no CUDA device here: this case runs on a machine with a GPU (the same test runs on CPU)"
CUDA_ONLY = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device (no CPU equivalent); none here")

DEVICES = [
    pytest.param(torch.device("cpu"), id="cpu"),
    pytest.param(torch.device("cuda"), id="cuda", marks=pytest.mark.skipif(not HAS_CUDA, reason=NO_CUDA)),
]
# A test's ``device`` argument: torch.device("cpu"), and torch.device("cuda") when there is one.
ON_EVERY_DEVICE = pytest.mark.parametrize("device", DEVICES)


@pytest.fixture
def float32_exact():
    """float32 convolutions and matmuls in float32, not TensorFloat-32 (cuDNN's default for
    convolutions on Ampere and later rounds inputs to 10 bits: no float32 tolerance holds)."""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


def compile_backend(device: torch.device) -> str:
    """Inductor where it generates Triton code (CUDA); AOTAutograd without code generation on CPU,
    where inductor's C++ compile is slow on a small CI machine (the compiled training step: 53 s
    with a cold cache against 10 s, 2 busy cores). Both trace the same graph through Dynamo and
    AOTAutograd: fullgraph=True fails on a graph break either way."""
    return "inductor" if device.type == "cuda" else "aot_eager"


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
