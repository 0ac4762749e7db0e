"""Which views of the features the operator reads in place, and which are copied first.

The operator works on a (B, C, N) view. ``features.flatten(2)`` is a view exactly when the
(H, W) dims can be merged (stride_h == W * stride_w): contiguous NCHW, channels_last, a slice
with a step along W, tokens. A crop along W or a transposed (H, W) cannot be merged: flatten
copies those features once (and the gradient flows back through the copy).
"""

from __future__ import annotations

import pytest
import torch

import brnpa_triton as bt
from brnpa_triton.ops import torch_impl

BASE = torch.rand(2, 5, 4, 6, generator=torch.Generator().manual_seed(0))


def _seen_by_the_op(monkeypatch, call):
    seen = []
    forward = torch_impl.forward

    def spy(x, *args, **kwargs):
        seen.append(x)
        return forward(x, *args, **kwargs)

    monkeypatch.setattr(torch_impl, "forward", spy)
    call()
    return seen[0]


@pytest.mark.parametrize(
    "name, make, in_place",
    [
        ("nchw", lambda: BASE.clone(), True),
        ("channels_last", lambda: BASE.contiguous(memory_format=torch.channels_last), True),
        ("step along W", lambda: BASE.repeat_interleave(2, dim=3)[..., ::2], True),
        ("crop along H", lambda: BASE[:, :, 1:], True),
        ("crop along W", lambda: BASE[..., 1:], False),
        ("transpose(2, 3)", lambda: BASE.transpose(2, 3), False),
        ("channel slice", lambda: BASE[:, 1:4], True),
    ],
)
def test_feature_map_views_read_in_place_or_copied(monkeypatch, name, make, in_place):
    features = make()
    x = _seen_by_the_op(monkeypatch, lambda: bt.brnpa(features, 2, backend="torch"))
    same = x.untyped_storage().data_ptr() == features.untyped_storage().data_ptr()
    assert same == in_place, f"{name}: read in place = {same}"
    expected = bt.brnpa(features.contiguous(), 2, backend="torch")
    out = bt.brnpa(features, 2, backend="torch")
    assert torch.equal(out.indices, expected.indices)
    torch.testing.assert_close(out.maps, expected.maps)


@pytest.mark.parametrize(
    "make",
    [lambda: BASE.flatten(2).transpose(1, 2).contiguous(), lambda: BASE.flatten(2).transpose(1, 2)[:, 1:],
     lambda: BASE.flatten(2)[:, ::2].transpose(1, 2)],
    ids=["contiguous", "token slice", "channel step"],
)
def test_token_views_are_always_read_in_place(monkeypatch, make):
    tokens = make()
    x = _seen_by_the_op(monkeypatch, lambda: bt.brnpa_tokens(tokens, 2, backend="torch"))
    assert x.untyped_storage().data_ptr() == tokens.untyped_storage().data_ptr()
