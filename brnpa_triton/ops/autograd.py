"""The autograd rule of the custom ops, and an autograd.Function over them for torch.func.

One rule (``_setup_context`` / ``_backward``) serves both: registered on the custom op (for
``opcheck`` and direct op users) and used by ``BRNPAFunction``, which the public API calls
because functorch transforms (``grad``, ``vjp``, ``vmap``) need a new-style
``autograd.Function`` whose backward is itself a Function, and hand-written vmap rules: a
vmapped dimension simply joins the batch dimension (images are independent).
"""

from __future__ import annotations

import torch

from brnpa_triton.ops.registry import brnpa_backward, brnpa_forward


def _fold(t: torch.Tensor, bdim: int | None, size: int) -> torch.Tensor:
    """Move the vmapped dim to the front and merge it with the batch dim."""
    if bdim is None:
        t = t.expand(size, *t.shape)
    else:
        t = t.movedim(bdim, 0)
    return t.reshape(size * t.shape[1], *t.shape[2:])


def _unfold(t: torch.Tensor, size: int) -> torch.Tensor:
    return t.reshape(size, t.shape[0] // size, *t.shape[1:])


def _setup_context(ctx, inputs, output):
    x, _, refine, _, _, backend = inputs
    vectors, maps, indices, _, _, saved_norms, inv_sums = output
    # Every output is the caller's to edit in place: the backward keeps its own copies of the
    # per-part outputs it reads (K * (C + N + 1) values per image, small next to x's C * N).
    ctx.save_for_backward(x, vectors.clone(), maps.clone(), indices.clone(), saved_norms, inv_sums)
    ctx.refine, ctx.backend = refine, backend
    ctx.mark_non_differentiable(indices, saved_norms, inv_sums)


def _backward(ctx, grad_vectors, grad_maps, _grad_indices, grad_activity, grad_norms, _grad_saved, _grad_inv):
    x, vectors, maps, indices, saved_norms, inv_sums = ctx.saved_tensors
    grad_x = BRNPABackwardFunction.apply(
        x, grad_vectors, grad_maps, grad_activity, grad_norms, vectors, maps, indices, saved_norms, inv_sums,
        ctx.refine, ctx.backend,
    )
    return grad_x, None, None, None, None, None


FORWARD_MODE_UNSUPPORTED = (
    "brnpa_triton: forward-mode AD (torch.func.jvp, jacfwd, hessian, torch.autograd.forward_ad) is not "
    "supported; use reverse mode (loss.backward(), torch.autograd.grad, torch.func.grad / vjp / jacrev)"
)


def _no_forward_mode(ctx, *tangents):
    raise NotImplementedError(FORWARD_MODE_UNSUPPORTED)


class TracedBRNPAFunction(torch.autograd.Function):
    """What torch.compile traces (Dynamo rejects Functions that define ``jvp``)."""

    @staticmethod
    def forward(x, num_parts, refine, seed_indices, by_activity, backend):
        return brnpa_forward(x, num_parts, refine, seed_indices, by_activity, backend)

    setup_context = staticmethod(_setup_context)
    backward = staticmethod(_backward)

    @staticmethod
    def vmap(info, in_dims, x, num_parts, refine, seed_indices, by_activity, backend):
        x_dim, _, _, seeds_dim, _, _ = in_dims
        size = info.batch_size
        x = _fold(x, x_dim, size)
        if seed_indices.numel() or seeds_dim is not None:
            seed_indices = _fold(seed_indices, seeds_dim, size)
        out = BRNPAFunction.apply(x, num_parts, refine, seed_indices, by_activity, backend)
        return tuple(_unfold(t, size) for t in out), (0,) * len(out)


class BRNPAFunction(TracedBRNPAFunction):
    """The eager entry point: as above, and forward-mode AD gets a clear error."""

    jvp = staticmethod(_no_forward_mode)


class BRNPABackwardFunction(torch.autograd.Function):
    """Launches the backward op; a Function so that torch.func.grad can trace through it.

    Second derivatives are not implemented (BR-NPA is used as a first-order layer).
    """

    @staticmethod
    def forward(x, grad_vectors, grad_maps, grad_activity, grad_norms, vectors, maps, indices, norms, inv_sums,
                refine, backend):
        return brnpa_backward(
            x, grad_vectors, grad_maps, grad_activity, grad_norms, vectors, maps, indices, norms, inv_sums,
            refine, backend,
        )

    @staticmethod
    def setup_context(ctx, inputs, output):
        pass

    @staticmethod
    def backward(ctx, grad):
        raise NotImplementedError("brnpa_triton: double backward (gradients of gradients) is not supported")

    jvp = staticmethod(_no_forward_mode)

    @staticmethod
    def vmap(info, in_dims, *args):
        size = info.batch_size
        tensors = [
            _fold(arg, dim, size) if isinstance(arg, torch.Tensor) else arg  # None: no gradient
            for arg, dim in zip(args, in_dims, strict=True)
        ]
        grad_x = BRNPABackwardFunction.apply(*tensors)
        return _unfold(grad_x, size), 0


# The custom op's own autograd rule (opcheck, direct op users) is the same one.
torch.library.register_autograd("brnpa_triton::forward", _backward, setup_context=_setup_context)
