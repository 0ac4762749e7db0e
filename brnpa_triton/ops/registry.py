"""BR-NPA as ``torch.library`` custom ops, with fake (meta) kernels.

The ops are defined with ``torch.library.Library`` rather than ``torch.library.custom_op``:
the latter wraps every implementation in a Dynamo guard that imports ``torch._dynamo`` (and
with it sympy and triton, seconds of imports) on the first call, even in a program that never
compiles. Here the guard is only taken when Dynamo is already loaded (see ``_outside_dynamo``).

Two ops: ``brnpa_triton::forward`` and ``brnpa_triton::backward``. The forward's autograd
rule (registered in ``autograd.py``, shared with the ``autograd.Function`` there) calls the
backward op, so ``torch.compile(fullgraph=True)`` sees two opaque ops and never traces into
the kernels. Each op runs the implementation named by ``backend`` ("torch": vectorised
PyTorch, "triton": the fused kernels); the public API resolves "auto" before the call.

The ops are public, so they check their arguments themselves, once, here: every tensor
must be dense and on x's device, of the shape the forward gives it; floating tensors of
another dtype are cast to the dtype both backends read them in (``_backward``). Whatever
indices they are given, no kernel reads or writes out of bounds: seed indices and the
backward's indices are range-checked on the host for CPU tensors and with
``torch._assert_async`` on CUDA (no host synchronisation).
"""

from __future__ import annotations

import functools
import sys

import torch

from brnpa_triton.dispatch import resolve_backend
from brnpa_triton.ops import torch_impl
from brnpa_triton.ops.common import SUPPORTED_DTYPES, SavedForward, accumulation_dtype

OP_BACKENDS = ("torch", "triton")


def _implementation(backend: str, device: torch.device):
    """The backend module; triton's is imported lazily (triton is optional on CPU installs)."""
    if not isinstance(backend, str) or backend not in OP_BACKENDS:
        raise ValueError(f"backend must be one of {', '.join(map(repr, OP_BACKENDS))}; got {backend!r}")
    if backend == "triton":
        resolve_backend(backend, device)  # triton installed, and CUDA tensors or the interpreter
        from brnpa_triton.ops import triton_impl

        return triton_impl
    return torch_impl


def _check_dense(name: str, t: torch.Tensor, device: torch.device) -> None:
    """A strided tensor on ``device`` (x's): the kernels take raw pointers and strides."""
    if t.layout != torch.strided:
        raise TypeError(f"{name} must be a dense (strided) tensor; got layout {t.layout}")
    if t.device != device:
        raise ValueError(f"{name} must be on x's device ({device}); got {t.device}")


def _check_x(x: torch.Tensor) -> None:
    if x.layout != torch.strided:
        raise TypeError(f"x must be a dense (strided) tensor; got layout {x.layout}")
    if x.dim() != 3:
        raise ValueError(f"x must have shape (B, C, N); got shape {tuple(x.shape)}")
    if x.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"x must be float16, bfloat16, float32 or float64; got {x.dtype}")
    if x.numel() == 0:
        raise ValueError(f"x must be non-empty; got shape {tuple(x.shape)}")


def _check_positions(name: str, indices: torch.Tensor, shape: tuple, N: int) -> None:
    """``indices`` must be int64 of ``shape`` with every value in [0, N)."""
    if indices.dtype != torch.int64:
        raise TypeError(f"{name} must be int64; got {indices.dtype}")
    if tuple(indices.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)}; got {tuple(indices.shape)}")
    message = f"{name} must lie in [0, N={N})"
    if indices.device.type == "cuda":
        torch._assert_async(((indices >= 0) & (indices < N)).all(), message)
    elif indices.numel() and not bool(((indices >= 0) & (indices < N)).all()):
        raise ValueError(f"{message}; got values from {int(indices.min())} to {int(indices.max())}")


def _as_dtype(name: str, t: torch.Tensor, shape: tuple, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A floating tensor of ``shape`` on x's device, cast to ``dtype``: the one dtype each
    backend reads it in (the kernels take typed pointers; the PyTorch path would cast it too)."""
    _check_dense(name, t, device)
    if not t.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor (it is cast to {dtype}); got {t.dtype}")
    if tuple(t.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)}; got {tuple(t.shape)}")
    return t.to(dtype)


_LIBRARY = torch.library.Library("brnpa_triton", "DEF")
_LIBRARY.define(
    "forward(Tensor x, SymInt num_parts, bool refine, Tensor seed_indices, bool by_activity, str backend) "
    "-> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)"
)
_LIBRARY.define(
    "backward(Tensor x, Tensor? grad_vectors, Tensor? grad_maps, Tensor? grad_activity, Tensor? grad_norms, "
    "Tensor vectors, Tensor maps, Tensor indices, Tensor norms, Tensor inv_sums, bool refine, str backend) -> Tensor"
)


def _outside_dynamo(fn):
    """Run ``fn`` where torch.compile never traces into it (it is an opaque op's body).

    Dynamo can only be tracing if it has been imported; until then ``fn`` is called directly,
    so that an eager program never pays for importing it.
    """
    disabled = None

    @functools.wraps(fn)
    def run(*args):
        nonlocal disabled
        if "torch._dynamo" not in sys.modules:
            return fn(*args)
        if disabled is None:
            disabled = torch._dynamo.disable(fn)
        return disabled(*args)

    return run


def _implement(name: str):
    def register(fn):
        _LIBRARY.impl(name, _outside_dynamo(fn), "CompositeExplicitAutograd")
        return fn

    return register


@_implement("forward")
def _forward(
    x: torch.Tensor,
    num_parts: int,
    refine: bool,
    seed_indices: torch.Tensor,
    by_activity: bool,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """x (B, C, N), any strides. ``seed_indices`` (B, K) int64, or empty for greedy selection.

    Returns (vectors (B,K,C), maps (B,K,N), indices (B,K), activity (B,K), norms (B,N),
    saved_norms (B,N), inv_sums (B,K)); saved_norms and inv_sums are in the accumulation
    dtype (float32, or float64), the rest in x's dtype. ``by_activity`` ranks the parts by
    activity, descending (stable).
    """
    _check_x(x)
    impl = _implementation(backend, x.device)
    B, _, N = x.shape
    if not 1 <= num_parts <= N:
        raise ValueError(f"num_parts must be between 1 and N={N}; got {num_parts}")
    _check_dense("seed_indices", seed_indices, x.device)
    seeds = None
    if seed_indices.numel():
        _check_positions("seed_indices", seed_indices, (B, num_parts), N)
        seeds = seed_indices
    return tuple(impl.forward(x, num_parts, refine, seeds, by_activity))


# The fake kernels check devices and layouts too: a call mixing meta tensors with real ones is
# dispatched to them, and must not return an uninitialised tensor on x's device.
@torch.library.register_fake("brnpa_triton::forward")
def _(x, num_parts, refine, seed_indices, by_activity, backend):
    _check_dense("seed_indices", seed_indices, x.device)
    B, C, N = x.shape
    K = num_parts
    acc = accumulation_dtype(x.dtype)
    return (
        x.new_empty(B, K, C),
        x.new_empty(B, K, N),
        x.new_empty(B, K, dtype=torch.int64),
        x.new_empty(B, K),
        x.new_empty(B, N),
        x.new_empty(B, N, dtype=acc),
        x.new_empty(B, K, dtype=acc),
    )


@_implement("backward")
def _backward(
    x: torch.Tensor,
    grad_vectors: torch.Tensor | None,
    grad_maps: torch.Tensor | None,
    grad_activity: torch.Tensor | None,
    grad_norms: torch.Tensor | None,
    vectors: torch.Tensor,
    maps: torch.Tensor,
    indices: torch.Tensor,
    norms: torch.Tensor,
    inv_sums: torch.Tensor,
    refine: bool,
    backend: str,
) -> torch.Tensor:
    """dL/dx for ``brnpa_triton::forward``, in x's dtype and shape (B, C, N).

    The gradients of outputs that did not reach the loss may be None; ``norms`` are the
    forward's ``saved_norms``. Every tensor must be dense and on x's device; floating tensors
    of another dtype are cast, as the forward would have made them: the gradients, ``vectors``
    and ``maps`` to x's dtype, ``norms`` and ``inv_sums`` to the accumulation dtype. So both
    backends take the same inputs and read them in the same dtype.
    """
    _check_x(x)
    impl = _implementation(backend, x.device)
    B, C, N = x.shape
    _check_dense("indices", indices, x.device)
    K = indices.shape[1] if indices.dim() == 2 else 0
    if indices.dim() != 2 or not 1 <= K <= N:
        raise ValueError(
            f"indices must have shape (B={B}, K) with 1 <= K <= N={N}, as the forward returns them; "
            f"got {tuple(indices.shape)}"
        )
    _check_positions("indices", indices, (B, K), N)
    acc = accumulation_dtype(x.dtype)
    vectors = _as_dtype("vectors", vectors, (B, K, C), x.dtype, x.device)
    maps = _as_dtype("maps", maps, (B, K, N), x.dtype, x.device)
    norms = _as_dtype("norms", norms, (B, N), acc, x.device)
    inv_sums = _as_dtype("inv_sums", inv_sums, (B, K), acc, x.device)
    grads = [
        None if g is None else _as_dtype(name, g, shape, x.dtype, x.device)
        for name, g, shape in (
            ("grad_vectors", grad_vectors, (B, K, C)),
            ("grad_maps", grad_maps, (B, K, N)),
            ("grad_activity", grad_activity, (B, K)),
            ("grad_norms", grad_norms, (B, N)),
        )
    ]
    saved = SavedForward(vectors, maps, indices, norms, inv_sums)
    return impl.backward(x, *grads, saved, refine)


@torch.library.register_fake("brnpa_triton::backward")
def _(x, grad_vectors, grad_maps, grad_activity, grad_norms, vectors, maps, indices, norms, inv_sums, refine, backend):
    named = dict(grad_vectors=grad_vectors, grad_maps=grad_maps, grad_activity=grad_activity, grad_norms=grad_norms,
                 vectors=vectors, maps=maps, indices=indices, norms=norms, inv_sums=inv_sums)
    for name, t in named.items():
        if t is not None:
            _check_dense(name, t, x.device)
    return torch.empty_like(x)


# The public ops (OpOverloads: call them, or pass them to torch.library.opcheck).
brnpa_forward = torch.ops.brnpa_triton.forward.default
brnpa_backward = torch.ops.brnpa_triton.backward.default
