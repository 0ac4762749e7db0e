"""The implementations the benchmark compares, in one registry (``PROVIDERS``).

Every provider turns a problem ``Case`` (B, C, H, W, K, dtype, device) into a callable
``fn(x) -> tuple of tensors`` whose first element is the pooled output (B, K, C) that the
benchmark's loss is taken on, plus the learned parameters (if any) that a training step would
also differentiate. Two families:

* ``brnpa``: the BR-NPA operator of ``docs/SPEC.md`` (same outputs, checked against
  the reference in tests/test_bench.py): the library per backend, the per-image reference
  loop, an authors'-style batched eager implementation and ``torch.compile`` of it;
* ``baseline``: the paper's parametric comparison point, bilinear attention pooling
  (B-CNN / WS-DAN): a different operator with the same output size, (B, M=K, C).

``brnpa_eager`` below is written for this project after the structure of the authors' code
(batched over images, one python loop over parts, and for every part the two
(B, N, C)-sized products ``x * seed`` and ``x * map`` materialised by broadcasting, forward
and, through autograd, backward). It is the cost model of the original code, not a copy of it.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

import brnpa_triton as bt
from brnpa_triton.ops.common import EPS


@dataclass(frozen=True)
class Case:
    """One problem: a (B, C, H, W) feature map pooled into K parts, in ``dtype`` on ``device``."""

    B: int
    C: int
    H: int
    W: int
    K: int
    dtype: torch.dtype = torch.float32
    device: str = "cpu"

    @property
    def N(self) -> int:
        return self.H * self.W

    @property
    def x_bytes(self) -> int:
        return self.B * self.C * self.N * torch.empty((), dtype=self.dtype).element_size()

    def make_input(self, seed: int = 0) -> torch.Tensor:
        """Post-ReLU features (as at the last stage of a CNN), NCHW contiguous, requires_grad."""
        g = torch.Generator(device="cpu").manual_seed(seed)
        x = torch.randn(self.B, self.C, self.H, self.W, generator=g).relu_()
        return x.to(device=self.device, dtype=self.dtype).requires_grad_(True)


@dataclass
class Built:
    fn: Callable[[torch.Tensor], tuple]
    params: list = field(default_factory=list)  # learned parameters a training step differentiates
    info: dict = field(default_factory=dict)  # recorded with every row (e.g. which module was used)
    fn_retain: Callable | None = None  # variant whose graph may be backpropagated repeatedly


@dataclass(frozen=True)
class Provider:
    name: str
    family: str  # "brnpa" (docs/SPEC.md's operator) or "baseline" (a different operator)
    description: str
    build: Callable[..., Built]
    available: Callable[[torch.device], str | None]  # None when usable, else the reason


# --------------------------------------------------------------------------------------------
# Authors'-style eager BR-NPA (cost model of the original code; written for this project)
# --------------------------------------------------------------------------------------------


def brnpa_eager(features: torch.Tensor, num_parts: int, refine: bool = True):
    """Batched BR-NPA as the authors' code computes it: (vectors, maps, indices, norms).

    Per part it broadcasts ``x * seed`` and ``x * map`` over the whole (B, N, C) feature tensor
    (two full-size temporaries, both saved by autograd for the backward), the norm is
    ``sqrt(sum x^2)`` (NaN gradient at an all-zero position, as in the original) and the score
    update is not detached. No degenerate-part handling (S_k ~ 0 divides by ~0).
    """
    B, C, H, W = features.shape
    x = features.permute(0, 2, 3, 1).reshape(B, H * W, C)  # (B, N, C): a copy for NCHW input
    norm = torch.sqrt(torch.pow(x, 2).sum(dim=-1)) + EPS  # (B, N)
    score = norm.clone()
    rows = torch.arange(B, device=x.device)[:, None]
    vectors, maps, indices = [], [], []
    for _ in range(num_parts):
        idx = score.argmax(dim=1, keepdim=True)  # (B, 1)
        seed = x[rows, idx]  # (B, 1, C)
        seed_norm = norm[rows, idx]  # (B, 1)
        sim = (x * seed).sum(dim=-1) / (norm * seed_norm)  # (B, N, C) product
        amap = sim / sim.sum(dim=1, keepdim=True)
        vec = (x * amap.unsqueeze(-1)).sum(dim=1)  # (B, N, C) product
        score = (1 - sim) * score
        vectors.append(vec if refine else seed[:, 0])
        maps.append(amap.reshape(B, 1, H, W))
        indices.append(idx)
    return torch.stack(vectors, 1), torch.cat(maps, 1), torch.cat(indices, 1), (norm - EPS).reshape(B, H, W)


# --------------------------------------------------------------------------------------------
# Parametric baseline: bilinear attention pooling (B-CNN / WS-DAN)
# --------------------------------------------------------------------------------------------


def _build_bap(case: Case, variant: str, **_):
    """The library's module, ``brnpa_triton.nn.BilinearAttentionPooling`` (M = K maps), with
    WS-DAN's signed square root and L2 normalisation for ``variant="wsdan"``."""
    from brnpa_triton.nn import BilinearAttentionPooling

    torch.manual_seed(0)
    module = BilinearAttentionPooling(case.C, case.K, wsdan_normalize=variant == "wsdan")
    for p in module.parameters():
        nn.init.normal_(p, std=case.C**-0.5)
    module = module.to(device=case.device, dtype=case.dtype)

    def fn(x):
        return tuple(module(x))

    return Built(fn, list(module.parameters()), {"variant": variant, "num_maps": case.K})


# --------------------------------------------------------------------------------------------
# BR-NPA providers
# --------------------------------------------------------------------------------------------


def _build_library(case: Case, backend: str, **_):
    def fn(x):
        out = bt.brnpa(x, case.K, backend=backend)
        return out.vectors, out.maps, out.indices, out.norms

    return Built(fn)


def _build_reference(case: Case, **_):
    from reference import brnpa_reference

    def fn(x):
        vectors, maps, indices, _activity, norms = brnpa_reference(x, case.K)
        return vectors, maps, indices, norms

    return Built(fn)


def _build_eager(case: Case, **_):
    return Built(lambda x: brnpa_eager(x, case.K))


def _raise_recompile_limits(limit: int = 1024):
    cfg = torch._dynamo.config
    for name in ("recompile_limit", "cache_size_limit", "accumulated_recompile_limit", "accumulated_cache_size_limit"):
        if hasattr(cfg, name):
            setattr(cfg, name, max(getattr(cfg, name), limit))


def _brnpa_eager_retainable(features, num_parts):
    """Same code under another frame, so its dynamo cache entry is separate (see below)."""
    return brnpa_eager(features, num_parts)


def _build_compiled(case: Case, compile_backend: str = "inductor", compile_mode: str | None = None, **_):
    """``torch.compile`` of ``brnpa_eager``, static shapes (one compilation per problem; the
    recompile limits are raised so that dynamo never silently falls back to eager after the
    default 8 recompilations). The first call compiles; the runner
    records it as ``compile_s`` and excludes it from the timings.

    AOTAutograd donates saved buffers to the backward, which forbids ``retain_graph=True``;
    the "backward" mode (which replays one retained graph) therefore uses ``fn_retain``, a
    second compilation with ``donated_buffer=False``; forward and fwd+bwd use the default."""
    _raise_recompile_limits()
    compiled = torch.compile(brnpa_eager, backend=compile_backend, mode=compile_mode, dynamic=False)
    retain = torch.compile(_brnpa_eager_retainable, backend=compile_backend, mode=compile_mode, dynamic=False)

    def fn_retain(x):
        with torch._functorch.config.patch(donated_buffer=False):
            return retain(x, case.K)

    return Built(lambda x: compiled(x, case.K), info={"compile_backend": compile_backend, "compile_mode": compile_mode},
                 fn_retain=fn_retain)


def _triton_available(device: torch.device) -> str | None:
    if "triton" not in bt.available_backends(device):
        return f"backend 'triton' not available on {device.type} (CUDA, or TRITON_INTERPRET=1)"
    try:
        importlib.import_module("brnpa_triton.ops.triton_impl")
    except Exception as e:  # noqa: BLE001 - e.g. triton missing or broken: report, don't crash
        return f"brnpa_triton.ops.triton_impl does not import: {type(e).__name__}: {e}"
    return None


def _always(device: torch.device) -> str | None:
    return None


def _compile_available(device: torch.device) -> str | None:
    if not hasattr(torch, "compile"):
        return "torch.compile missing"
    return None


PROVIDERS: dict[str, Provider] = {
    p.name: p
    for p in [
        Provider(
            "brnpa-triton",
            "brnpa",
            "brnpa_triton.brnpa(backend='triton'): fused Triton kernels",
            lambda case, **kw: _build_library(case, "triton"),
            _triton_available,
        ),
        Provider(
            "brnpa-torch",
            "brnpa",
            "brnpa_triton.brnpa(backend='torch'): vectorised PyTorch, closed-form backward",
            lambda case, **kw: _build_library(case, "torch"),
            _always,
        ),
        Provider(
            "eager",
            "brnpa",
            "authors'-style batched eager (B,N,C) products per part (bench.providers.brnpa_eager)",
            _build_eager,
            _always,
        ),
        Provider("compiled", "brnpa", "torch.compile(brnpa_eager), static shapes", _build_compiled, _compile_available),
        Provider(
            "reference",
            "brnpa",
            "reference.brnpa_reference: per-image, per-part python loop (oracle)",
            _build_reference,
            _always,
        ),
        Provider(
            "bap-wsdan",
            "baseline",
            "bilinear attention pooling, WS-DAN: 1x1 conv+ReLU maps (M=K), avg-pool, signed sqrt, L2",
            lambda case, **kw: _build_bap(case, "wsdan", **kw),
            _always,
        ),
        Provider(
            "bap-bcnn",
            "baseline",
            "bilinear attention pooling, B-CNN: 1x1 conv+ReLU maps (M=K), avg-pool",
            lambda case, **kw: _build_bap(case, "bcnn", **kw),
            _always,
        ),
    ]
}

# The library provider the ratio columns are taken against, best first.
PRIMARY_ORDER = ["brnpa-triton", "brnpa-torch"]


def availability(names, device) -> dict[str, str | None]:
    """name -> None (usable) or the reason it is skipped."""
    device = torch.device(device)
    out = {}
    for name in names:
        if name not in PROVIDERS:
            raise KeyError(f"unknown provider {name!r}; known: {', '.join(PROVIDERS)}")
        out[name] = PROVIDERS[name].available(device)
    return out
