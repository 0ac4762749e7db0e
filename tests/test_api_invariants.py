"""Properties every BR-NPA output must have, whatever the input."""

from __future__ import annotations

import torch
from hypothesis import given
from hypothesis import strategies as st

import brnpa_triton as bt
from brnpa_triton.testing import random_features


@st.composite
def feature_maps(draw, kind=None):
    B, C = draw(st.integers(1, 3)), draw(st.integers(1, 8))
    H, W = draw(st.integers(1, 6)), draw(st.integers(1, 6))
    K = draw(st.integers(1, min(H * W, 4)))
    kind = kind or draw(st.sampled_from(["relu", "signed"]))
    f = random_features(B, C, H, W, seed=draw(st.integers(0, 2**31 - 1)), kind=kind,
                        zero_positions=draw(st.integers(0, min(2, H * W - 1))))
    return f, K


@given(feature_maps())
def test_maps_sum_to_one_and_vectors_are_map_weighted_features(case):
    f, K = case
    out = bt.brnpa(f, K)
    torch.testing.assert_close(out.maps.sum((2, 3)), torch.ones_like(out.activity))
    torch.testing.assert_close(out.vectors, torch.einsum("bkn,bcn->bkc", out.maps.flatten(2), f.flatten(2)))
    assert torch.isfinite(out.vectors).all() and torch.isfinite(out.maps).all()


@given(feature_maps(kind="relu"))
def test_non_negative_features_give_convex_combinations(case):
    f, K = case
    out = bt.brnpa(f, K)
    assert (out.maps >= 0).all()
    x = f.flatten(2)
    low, high = x.min(2).values[:, None, :], x.max(2).values[:, None, :]
    assert (out.vectors >= low - 1e-12).all() and (out.vectors <= high + 1e-12).all()


@given(feature_maps(), st.floats(0.25, 8.0))
def test_positive_scaling_keeps_maps_and_scales_vectors(case, scale):
    """Exact up to eps = 1e-5 in rho = ||x|| + eps, which does not scale: the features here have
    norms of order 1, so the relative change is ~1e-5."""
    f, K = case
    f = f + 0.1 * f.sign()  # no near-zero positions whose similarities eps would dominate
    out, scaled = bt.brnpa(f, K), bt.brnpa(f * scale, K)
    assert torch.equal(out.indices, scaled.indices)
    torch.testing.assert_close(scaled.maps, out.maps, rtol=1e-3, atol=1e-4)
    torch.testing.assert_close(scaled.vectors, out.vectors * scale, rtol=1e-3, atol=1e-4 * scale)


@given(feature_maps(), st.integers(0, 2**31 - 1))
def test_spatial_permutation_equivariance(case, perm_seed):
    """Permuting positions permutes maps and seeds and leaves vectors alone (no ties here:
    continuous random features, zero positions removed)."""
    f, K = case
    # No exact ties (zero positions tie with each other): shift by distinct random amounts.
    f = f + 0.1 + 0.1 * torch.rand(f.shape, generator=torch.Generator().manual_seed(perm_seed), dtype=f.dtype)
    tokens = f.flatten(2).transpose(1, 2)  # (B, N, C)
    N = tokens.shape[1]
    perm = torch.randperm(N, generator=torch.Generator().manual_seed(perm_seed))
    out, permuted = bt.brnpa_tokens(tokens, K), bt.brnpa_tokens(tokens[:, perm], K)
    torch.testing.assert_close(permuted.vectors, out.vectors)
    torch.testing.assert_close(permuted.maps, out.maps[:, :, perm])
    assert torch.equal(perm[permuted.indices], out.indices)


@given(feature_maps())
def test_bitwise_deterministic(case):
    f, K = case
    a, b = bt.brnpa(f.float(), K), bt.brnpa(f.float(), K)
    for x, y in zip(a, b, strict=True):
        assert torch.equal(x, y)
    x = f.clone().requires_grad_()
    grads = [torch.autograd.grad(bt.brnpa(x, K).vectors.sum(), x)[0] for _ in range(2)]
    assert torch.equal(*grads)


def test_unrefined_vectors_are_the_seed_features():
    f = random_features(2, 5, 4, 3, seed=1)
    out = bt.brnpa(f, 3, refine=False)
    seeds = f.flatten(2).gather(2, out.indices[:, None, :].expand(-1, 5, -1)).transpose(1, 2)
    assert torch.equal(out.vectors, seeds)
    torch.testing.assert_close(out.maps, bt.brnpa(f, 3).maps)


def test_first_part_is_seeded_at_the_highest_norm():
    f = random_features(3, 6, 5, 5, seed=2)
    out = bt.brnpa(f, 2)
    assert torch.equal(out.indices[:, 0], f.flatten(2).norm(dim=1).argmax(1))
    torch.testing.assert_close(out.norms, f.norm(dim=1))


def test_random_seeds_come_only_from_the_generator():
    f = random_features(2, 4, 5, 5, seed=3)
    global_state = torch.get_rng_state()
    a = bt.brnpa(f, 3, seeds="random", generator=torch.Generator().manual_seed(7))
    b = bt.brnpa(f, 3, seeds="random", generator=torch.Generator().manual_seed(7))
    c = bt.brnpa(f, 3, seeds="random", generator=torch.Generator().manual_seed(8))
    assert torch.equal(torch.get_rng_state(), global_state)
    assert torch.equal(a.indices, b.indices) and torch.equal(a.vectors, b.vectors)
    assert not torch.equal(a.indices, c.indices)


def test_activity_order_is_a_stable_descending_permutation_of_selection_order():
    f = random_features(4, 6, 5, 4, seed=4)
    sel, act = bt.brnpa(f, 4), bt.brnpa(f, 4, order="activity")
    rank = torch.sort(sel.activity, dim=1, descending=True, stable=True).indices
    assert torch.equal(act.indices, sel.indices.gather(1, rank))
    assert torch.equal(act.activity, sel.activity.gather(1, rank))
    torch.testing.assert_close(act.activity, sel.vectors.gather(1, rank[..., None].expand(-1, -1, 6)).norm(dim=2))
