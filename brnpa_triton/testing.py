"""Testing helpers: check a build of brnpa-triton the way its own test suite does.

Inputs in every memory layout (NaN around strided views, so a read outside the view shows),
per-dtype tolerances against a float64 computation, NaN-poisoned kernel outputs (an element
the kernels forget to write shows), and the check that seeds follow the greedy rule::

    from brnpa_triton import testing
    from brnpa_triton.ops import torch_impl, triton_impl

    x = testing.view_in_layout(testing.random_values(2, 64, 49, seed=0), "padded", device="cuda")
    with testing.poisoned_allocations(triton_impl):
        out = triton_impl.forward(x, 3, True)
    assert testing.greedy_seed_error(x, out.indices, rel=1e-4) is None
    ref = torch_impl.forward(x.double(), 3, True, out.indices)        # float64, same seeds
    testing.assert_scaled_close(out.maps, ref.maps, testing.SCALED_TOLERANCE[x.dtype], "maps")

The float64 computation here is the PyTorch backend run in float64; the repository's test
suite also checks that backend against a line-by-line transcription of the operator.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from types import ModuleType

import torch

from brnpa_triton.api import brnpa, brnpa_tokens
from brnpa_triton.ops.common import EPS

DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)

# (rtol, atol) for torch.testing.assert_close of an output in this dtype against float64;
# maps and vectors are O(1) or O(1/N), so atol is on that scale.
TOLERANCES = {
    torch.float64: (1e-9, 1e-11),
    torch.float32: (2e-5, 2e-6),
    torch.float16: (4e-3, 2e-3),
    torch.bfloat16: (3e-2, 1.6e-2),
}
# Largest error allowed relative to the largest magnitude of the expected tensor, per unit of
# conditioning (``conditioning``: 1 for non-negative features).
SCALED_TOLERANCE = {torch.float64: 1e-9, torch.float32: 2e-5, torch.float16: 4e-3, torch.bfloat16: 3e-2}
UNIT_ROUNDOFF = {torch.float64: 2.0**-52, torch.float32: 2.0**-23, torch.float16: 2.0**-10, torch.bfloat16: 2.0**-7}

# Layouts of (B, C, H, W) features as the public API takes them.
FEATURE_LAYOUTS = ("nchw", "channels_last", "tokens", "strided")
# Layouts of the (B, C, N) view the backends take.
VIEW_LAYOUTS = ("nchw", "channels_last", "padded", "padded_channels_last")


# ---- inputs ------------------------------------------------------------------------------

def random_features(B, C, H, W, *, seed, kind="relu", dtype=torch.float64, zero_positions=0, duplicate_columns=0):
    """(B, C, H, W) features: "relu" (non-negative, some exact zeros) or "signed".

    ``zero_positions`` positions are all-zero vectors; ``duplicate_columns`` positions get a
    bitwise copy of another position's vector (earlier or later in the flat order), so that
    exact ties are part of the input.
    """
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, C, H, W, generator=g, dtype=torch.float64)
    if kind == "relu":
        x = x.relu()
    flat = x.view(B, C, H * W)
    if zero_positions:
        idx = torch.randperm(H * W, generator=g)[:zero_positions]
        flat[:, :, idx] = 0.0
    for _ in range(duplicate_columns if H * W > 1 else 0):
        source, target = torch.randperm(H * W, generator=g)[:2].tolist()
        flat[:, :, target] = flat[:, :, source]
    return x.to(dtype)


def random_values(B, C, N, *, seed, kind="relu") -> torch.Tensor:
    """float64 (B, C, N) values: "relu" (non-negative, exact zeros), "signed", or "zero"."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, C, N, generator=g, dtype=torch.float64)
    if kind == "relu":
        x = x.relu()
    elif kind == "zero":
        x = torch.zeros_like(x)
    return x


def random_grads(x: torch.Tensor, num_parts: int, *, seed: int) -> tuple[torch.Tensor, ...]:
    """Standard-normal gradients (of vectors (B, K, C), maps (B, K, N), norms (B, N)) for x
    (B, C, N), drawn in float64, then put on x's device and dtype. The stream is offset from
    ``seed`` so that they are not the values ``random_values`` draws with the same seed."""
    B, C, N = x.shape
    g = torch.Generator().manual_seed(seed + 7)
    shapes = ((B, num_parts, C), (B, num_parts, N), (B, N))
    return tuple(torch.randn(*s, generator=g, dtype=torch.float64).to(device=x.device, dtype=x.dtype) for s in shapes)


def duplicate_groups(features: torch.Tensor) -> torch.Tensor:
    """(B, N) int64: for every position, the lowest position holding a bitwise-identical vector."""
    x = features.flatten(2).transpose(1, 2)  # (B, N, C)
    same = (x[:, :, None, :] == x[:, None, :, :]).all(-1)  # (B, N, N)
    return same.int().argmax(-1)  # the first True


def features_in_layout(features: torch.Tensor, layout: str) -> torch.Tensor:
    """The same (B, C, H, W) values as the API takes them in ``layout`` (one of FEATURE_LAYOUTS).

    "tokens" gives (B, N, C); "strided" a view of every other column of a NaN-filled buffer.
    """
    B, C, H, W = features.shape
    if layout == "nchw":
        return features.contiguous()
    if layout == "channels_last":
        return features.contiguous(memory_format=torch.channels_last)
    if layout == "strided":
        big = torch.full((B, C, H, 2 * W), float("nan"), dtype=features.dtype, device=features.device)
        big[..., ::2] = features
        return big[..., ::2]
    if layout == "tokens":
        return features.flatten(2).transpose(1, 2).contiguous()
    raise ValueError(f"layout must be one of {FEATURE_LAYOUTS}; got {layout!r}")


def run_in_layout(x: torch.Tensor, layout: str, H: int, W: int, num_parts: int, **options):
    """``brnpa`` (``brnpa_tokens`` for "tokens") on ``features_in_layout(...)``, outputs in BCHW shapes."""
    if layout == "tokens":
        out = brnpa_tokens(x, num_parts, **options)
        return out._replace(maps=out.maps.unflatten(2, (H, W)), norms=out.norms.unflatten(1, (H, W)))
    return brnpa(x, num_parts, **options)


def view_in_layout(values: torch.Tensor, layout: str, device="cpu") -> torch.Tensor:
    """The same (B, C, N) values behind other strides (one of VIEW_LAYOUTS), on ``device``.

    "channels_last" is also the tokens layout; the "padded" ones sit inside a NaN-filled
    buffer with a row pitch that is not the row length.
    """
    B, C, N = values.shape
    v = values.to(device)
    if layout == "nchw":
        return v.contiguous()
    if layout == "channels_last":
        return v.transpose(1, 2).contiguous().transpose(1, 2)
    if layout == "padded":
        big = torch.full((B + 1, C + 2, N + 3), float("nan"), dtype=v.dtype, device=device)
        big[1:, 1 : C + 1, 2 : N + 2] = v
        return big[1:, 1 : C + 1, 2 : N + 2]
    if layout == "padded_channels_last":
        big = torch.full((B + 1, N + 3, C + 2), float("nan"), dtype=v.dtype, device=device)
        big[1:, 2 : N + 2, 1 : C + 1] = v.transpose(1, 2)
        return big[1:, 2 : N + 2, 1 : C + 1].transpose(1, 2)
    raise ValueError(f"layout must be one of {VIEW_LAYOUTS}; got {layout!r}")


# ---- NaN-poisoned allocations --------------------------------------------------------------

def _poisoned_empty(shape, dtype, device):
    t = torch.empty(shape, dtype=dtype, device=device)
    return t.fill_(float("nan")) if dtype.is_floating_point else t.fill_(-7)


def _poisoned_workspace(numel, dtype, device):
    """NaN for float workspaces, -7 (an impossible position or count) for integer ones."""
    fill = float("nan") if dtype.is_floating_point else -7
    return torch.full((max(numel, 1),), fill, dtype=dtype, device=device)


@contextlib.contextmanager
def poisoned_allocations(launchers: ModuleType) -> Iterator[None]:
    """Inside the block, the Triton launchers' outputs and workspaces start as NaN (-7 for
    integers), so an element a kernel forgets to write, or reads before writing, shows."""
    names = ("_empty", "_empty_like", "_workspace")
    saved = {name: getattr(launchers, name) for name in names}
    launchers._empty = _poisoned_empty
    launchers._empty_like = lambda x: torch.empty_like(x).fill_(float("nan"))
    launchers._workspace = _poisoned_workspace
    try:
        yield
    finally:
        for name, value in saved.items():
            setattr(launchers, name, value)


# ---- checks --------------------------------------------------------------------------------

def assert_close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype, what: str = "") -> None:
    """torch.testing.assert_close with the TOLERANCES of ``dtype`` (the dtype ``actual`` was computed in)."""
    rtol, atol = TOLERANCES[dtype]
    torch.testing.assert_close(actual.to(expected.dtype), expected, rtol=rtol, atol=atol, msg=lambda m: f"{what}: {m}")


def scaled_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """Largest |actual - expected| over the largest |expected| (inf if actual is not finite);
    against an all-zero ``expected``, over 1e-30 (so only about zero passes). However small the
    expected values are, the error is relative to them: tiny features are held to the same
    tolerance as any others."""
    actual, expected = actual.detach().cpu().double(), expected.detach().cpu().double()
    if not bool(torch.isfinite(actual).all()):
        return float("inf")
    if expected.numel() == 0:
        return 0.0
    largest = expected.abs().max().item()
    return (actual - expected).abs().max().item() / (largest if largest > 0 else 1e-30)


def assert_scaled_close(actual: torch.Tensor, expected: torch.Tensor, tol: float, what: str) -> None:
    """Every element finite and within ``tol`` times the largest |expected| of it."""
    assert actual.shape == expected.shape, (what, tuple(actual.shape), tuple(expected.shape))
    assert bool(torch.isfinite(actual).all()), f"{what}: non-finite values (unwritten or bad reads)"
    error = scaled_error(actual, expected)
    assert error <= tol, f"{what}: max error {error:.3g} of the largest magnitude, tolerance {tol:.3g}"


def assert_greedy_seeds(x: torch.Tensor, indices: torch.Tensor, rel: float) -> None:
    """Fails with ``greedy_seed_error``'s message unless ``indices`` follow the greedy rule."""
    error = greedy_seed_error(x, indices, rel)
    assert error is None, error


def conditioning(maps: torch.Tensor) -> float:
    """max_k sum_n |a_kn| (>= 1): how much cancellation in S_k amplifies rounding errors."""
    return float(maps.abs().sum(-1).max())


def greedy_seed_error(x: torch.Tensor, indices: torch.Tensor, rel: float) -> str | None:
    """None if ``indices`` (B, K) follow the greedy rule on x (B, C, N); else what is wrong.

    Part by part, the chosen position must reach the float64 maximum of the score (given the
    previous seeds) to within ``rel`` of its range, and be the lowest among exact float64 ties.
    """
    xd = x.detach().cpu().double()
    idx = indices.cpu()
    B, C, N = xd.shape
    rho = torch.linalg.vector_norm(xd, dim=1) + EPS
    score = rho.clone()
    for k in range(idx.shape[1]):
        i = idx[:, k]
        if not bool(((i >= 0) & (i < N)).all()):
            return f"part {k}: index out of range: {i.tolist()}"
        best = score.max(dim=1).values
        spread = best - score.min(dim=1).values + best.abs()
        chosen = score.gather(1, i[:, None])[:, 0]
        if not bool(torch.all(chosen >= best - rel * spread)):
            return f"part {k}: chosen scores {chosen.tolist()} below the best {best.tolist()}"
        exact = score == best[:, None]
        first = exact.float().argmax(dim=1)
        tied = exact.gather(1, i[:, None])[:, 0]
        if not bool(torch.all(~tied | (i == first))):
            return f"part {k}: tie not broken to the lowest index"
        seed = xd.gather(2, i[:, None, None].expand(B, C, 1))
        sim = (seed * xd).sum(1) / (rho * rho.gather(1, i[:, None]))
        score = score * (1 - sim)
    return None
