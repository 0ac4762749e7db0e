"""The functional API: pure functions, a NamedTuple out, randomness passed in explicitly."""

from __future__ import annotations

from typing import NamedTuple

import torch

from brnpa_triton import _validation as check
from brnpa_triton.dispatch import resolve_backend
from brnpa_triton.ops.autograd import BRNPAFunction, TracedBRNPAFunction


class BRNPAOutput(NamedTuple):
    """What ``brnpa`` returns. Spatial outputs follow the input: (H, W) for maps, (N,) for tokens."""

    vectors: torch.Tensor  # (B, K, C) refined vectors v_k (seed vectors r_k when refine=False)
    maps: torch.Tensor  # (B, K, H, W) attention maps, each summing to 1
    indices: torch.Tensor  # (B, K) int64 flat seed positions h*W + w
    activity: torch.Tensor  # (B, K) ||v_k||
    norms: torch.Tensor  # (B, H, W) ||x_n||


def brnpa(
    features: torch.Tensor,
    num_parts: int = 3,
    *,
    refine: bool = True,
    seeds: str = "norm",
    generator: torch.Generator | None = None,
    noise: torch.Tensor | None = None,
    order: str = "selection",
    backend: str = "auto",
    check_finite: bool = False,
) -> BRNPAOutput:
    """BR-NPA pooling of a feature map ``features`` (B, C, H, W) into ``num_parts`` parts.

    Any strides work. The (B, C, H*W) view is read in place whenever H and W can be merged
    (NCHW, channels_last, ...); a crop along W or transposed (H, W) is copied once by
    ``flatten`` (see the README, "Which views are read in place"). ``seeds="random"`` is the
    paper's ablation: each part's seed is the argmax of fresh uniform noise, drawn from
    ``generator`` or given as ``noise`` (B, K, H, W); the global RNG is never touched.
    ``order="activity"`` re-ranks the parts by ``activity``, descending (stable).
    ``check_finite=True`` rejects NaN/Inf input (``features`` and ``noise``) and finite input
    whose norms overflow the accumulation dtype (this synchronises with the device; under
    torch.compile it is an in-graph assertion). Without it, a NaN in ``noise`` seeds its part
    there (``argmax`` ranks NaN above every number).
    """
    check.check_features("features", features, "BCHW")
    options = check.make_options(
        num_parts, refine=refine, seeds=seeds, order=order, backend=backend, check_finite=check_finite,
        positions=features.shape[2] * features.shape[3],
    )
    return run(features, options, generator=generator, noise=noise)


def brnpa_tokens(
    tokens: torch.Tensor,
    num_parts: int = 3,
    *,
    refine: bool = True,
    seeds: str = "norm",
    generator: torch.Generator | None = None,
    noise: torch.Tensor | None = None,
    order: str = "selection",
    backend: str = "auto",
    check_finite: bool = False,
) -> BRNPAOutput:
    """BR-NPA over transformer tokens (B, N, C): as ``brnpa`` with positions n = 0..N-1.

    ``maps`` come out as (B, K, N), ``norms`` as (B, N) and ``noise`` is (B, K, N).
    """
    check.check_features("tokens", tokens, "BNC")
    options = check.make_options(
        num_parts, refine=refine, seeds=seeds, order=order, backend=backend, check_finite=check_finite,
        positions=tokens.shape[1],
    )
    return run(tokens, options, generator=generator, noise=noise)


_UNTRACEABLE_GENERATOR = (
    "seeds='random' with generator=... cannot be traced by torch.compile(fullgraph=True): Dynamo "
    "cannot pass a torch.Generator into a graph. Draw the noise outside the compiled function, "
    "noise = torch.rand((B, K, H, W), generator=g) ((B, K, N) for tokens), and pass noise=noise "
    "(modules: forward(x, noise=noise)); without fullgraph=True the noise is drawn eagerly"
)


def _draw_noise(shape, generator: torch.Generator, device) -> torch.Tensor:
    if torch.compiler.is_compiling():
        # A generator cannot enter a graph: break it here (the draw runs eagerly), and give
        # fullgraph=True users the reason and the way out. (Imported here: torch._dynamo takes
        # seconds to import, and is already loaded whenever something is being compiled.)
        from torch._dynamo import graph_break

        graph_break(msg=_UNTRACEABLE_GENERATOR)
    return torch.rand(shape, generator=generator, device=device)


def run(features: torch.Tensor, options: check.Options, *, generator=None, noise=None) -> BRNPAOutput:
    """BR-NPA of checked ``options`` over (B, C, H, W) maps or (B, N, C) tokens (by dims).

    ``brnpa``, ``brnpa_tokens`` and the modules (which check their options once, at
    construction) all end here.
    """
    maps_input = features.dim() == 4
    name = "features" if maps_input else "tokens"
    if maps_input:
        B, C, H, W = features.shape
        x, spatial = features.flatten(2), (H, W)  # (B, C, N) view
    else:
        B, N, C = features.shape
        x, spatial = features.transpose(1, 2), (N,)
    K = options.num_parts
    N = x.shape[2]
    check.check_num_parts(K, N)
    check.check_random_source(options.seeds, generator, noise, (B, K, *spatial), features.device)
    if options.check_finite:
        check.check_finite(name, features)
        if noise is not None:  # argmax would seed the part at a NaN
            check.check_finite("noise", noise)
    backend = resolve_backend(options.backend, features.device)

    if options.seeds == "random":
        if noise is None:
            noise = _draw_noise((B, K, *spatial), generator, features.device)
        seed_indices = noise.reshape(B, K, N).argmax(dim=2)  # lowest index on ties
    else:
        seed_indices = x.new_empty(0, dtype=torch.int64)

    function = TracedBRNPAFunction if torch.compiler.is_compiling() else BRNPAFunction
    vectors, maps, indices, activity, norms, saved_norms, _ = function.apply(
        x, K, options.refine, seed_indices, options.order == "activity", backend
    )
    if options.check_finite:
        check.check_norms_finite(name, saved_norms)
    return BRNPAOutput(vectors, maps.unflatten(2, spatial), indices, activity, norms.unflatten(1, spatial))
