"""Modules check their options at construction, with the functional API's messages, and every
integer argument accepts numpy and 0-d tensor integers."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import brnpa_triton as bt


@pytest.mark.parametrize(
    "build, error, message",
    [
        (lambda: bt.BRNPAHead(8, 5, -2), ValueError, r"num_parts must be at least 1; got -2"),
        (lambda: bt.BRNPAHead(8, 5, 0), ValueError, r"num_parts must be at least 1; got 0"),
        (lambda: bt.BRNPAPool(2.5), TypeError, r"num_parts must be an int; got float 2.5"),
        (lambda: bt.BRNPAPool(True), TypeError, r"num_parts must be an int; got bool"),
        (
            lambda: bt.BRNPAPool(torch.tensor([2])),
            TypeError,
            r"num_parts must be an int; got a torch.int64 tensor of shape \(1,\)",
        ),
        (lambda: bt.BRNPAPool(torch.tensor(2.0)), TypeError, r"num_parts must be an int; got a torch.float32 tensor"),
        (lambda: bt.BRNPAPool(3, refine="no"), TypeError, r"refine must be True or False; got str 'no'"),
        (lambda: bt.BRNPAPool(3, refine=1), TypeError, r"refine must be True or False; got int"),
        (lambda: bt.BRNPAPool(3, check_finite=None), TypeError, r"check_finite must be True or False; got NoneType"),
        (
            lambda: bt.BRNPAPool(3, seeds="random", generator=7),
            TypeError,
            r"generator must be a torch.Generator; got int",
        ),
        (
            lambda: bt.BRNPAPool(3, generator=torch.Generator()),
            ValueError,
            r"generator is only used with seeds='random'",
        ),
        (lambda: bt.BRNPAPool(3, seeds=None), ValueError, r"seeds must be one of 'norm', 'random'; got None"),
        (lambda: bt.BRNPAHead(0, 5), ValueError, r"in_channels must be an int >= 1; got 0"),
        (lambda: bt.BRNPAHead(8, 0), ValueError, r"num_classes must be an int >= 1; got 0"),
        (lambda: bt.BRNPAHead(8.0, 5), TypeError, r"in_channels must be an int; got float 8.0"),
        (lambda: bt.BRNPAHead(8, 5, dropout=1.0), ValueError, r"dropout must be in \[0, 1\); got 1.0"),
        (lambda: bt.BRNPAHead(8, 5, dropout="0.1"), TypeError, r"dropout must be a float in \[0, 1\); got str '0.1'"),
        (lambda: bt.BRNPAHead(8, 5, bias="yes"), TypeError, r"bias must be True or False; got str 'yes'"),
        (lambda: bt.BRNPAClassifier(lambda x: x, 8, 5), TypeError, r"backbone must be a torch.nn.Module; got function"),
        (
            lambda: bt.brnpa(torch.rand(1, 2, 3, 3), 2, refine="no"),
            TypeError,
            r"refine must be True or False; got str 'no'",
        ),
        (lambda: bt.brnpa(torch.rand(1, 2, 3, 3), 2, check_finite=1), TypeError, r"check_finite must be True or False"),
    ],
)
def test_bad_options_raise_at_construction_naming_the_argument(build, error, message):
    with pytest.raises(error, match=message):
        build()


def test_keyword_only_options_are_rejected_positionally():
    with pytest.raises(TypeError, match="positional"):
        bt.BRNPAHead(512, 10, 3, 0.1)


@pytest.mark.parametrize("integer", [np.int64(2), np.int32(2), torch.tensor(2), torch.tensor(2, dtype=torch.int32)])
def test_numpy_and_tensor_integers_are_ints(integer):
    f = torch.rand(2, 8, 3, 3, generator=torch.Generator().manual_seed(0))
    expected = bt.brnpa(f, 2)
    for out in (bt.brnpa(f, integer), bt.BRNPAPool(integer)(f), bt.brnpa_tokens(f.flatten(2).transpose(1, 2), integer)):
        assert torch.equal(out.indices, expected.indices)
    head = bt.BRNPAHead(np.int64(8), torch.tensor(5), integer, refine=np.bool_(True))
    assert head.fc.in_features == 16 and head.fc.out_features == 5 and head(f).shape == (2, 5)
    assert isinstance(head.num_parts, int) and isinstance(head.in_channels, int)


@pytest.mark.parametrize(
    "features, error, message",
    [
        (
            torch.rand(2, 8, 3, 3, 1),
            ValueError,
            r"features must be \(B, C, H, W\) feature maps or \(B, N, C\) tokens; got 5 dims",
        ),
        (torch.rand(2, 8), ValueError, r"got 2 dims, shape \(2, 8\)"),
        (np.zeros((2, 8, 3, 3), dtype=np.float32), TypeError, r"features must be a torch.Tensor; got ndarray"),
        (
            torch.ones(2, 8, 3, 3, dtype=torch.int64),
            TypeError,
            r"features must be float16, bfloat16, float32 or float64",
        ),
        (
            torch.rand(2, 6, 3, 3),
            ValueError,
            r"BRNPAHead expects 8 channels; got \(B, C, H, W\) features of shape \(2, 6, 3, 3\) \(6 channels\)",
        ),
        (
            torch.rand(2, 9, 6),
            ValueError,
            r"BRNPAHead expects 8 channels; got \(B, N, C\) tokens of shape \(2, 9, 6\) \(6 channels\)",
        ),
    ],
)
def test_head_input_errors_say_what_is_wrong(features, error, message):
    with pytest.raises(error, match=message):
        bt.BRNPAHead(8, 5, 2)(features)


def test_options_are_read_only_views_and_repr():
    pool = bt.BRNPAPool(np.int64(4), refine=False, order="activity")
    assert (pool.num_parts, pool.refine, pool.seeds, pool.order, pool.backend) == (4, False, "norm", "activity", "auto")
    assert "num_parts=4, refine=False" in repr(pool)
    with pytest.raises(AttributeError):
        pool.num_parts = 3
    assert isinstance(bt.BRNPAClassifier(nn.Identity(), 8, 5, 2).head.pool, bt.BRNPAPool)
