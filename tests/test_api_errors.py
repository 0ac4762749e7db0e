"""Bad input gets a clear error naming the argument, what was expected and what came."""

from __future__ import annotations

import pytest
import torch

import brnpa_triton as bt

F = torch.rand(2, 3, 4, 4)


@pytest.mark.parametrize(
    "call, error, message",
    [
        (
            lambda: bt.brnpa(torch.rand(3, 4, 4)),
            ValueError,
            r"features must have 4 dims \(B, C, H, W\); got 3 dims, shape \(3, 4, 4\)",
        ),
        (lambda: bt.brnpa_tokens(F), ValueError, r"tokens must have 3 dims \(B, N, C\); got 4 dims"),
        (lambda: bt.brnpa([[1.0]]), TypeError, r"features must be a torch.Tensor .* got list"),
        (
            lambda: bt.brnpa(torch.ones(2, 3, 4, 4, dtype=torch.int64)),
            TypeError,
            r"features must be float16, bfloat16, float32 or float64; got torch.int64",
        ),
        (
            lambda: bt.brnpa(torch.rand(2, 0, 4, 4)),
            ValueError,
            r"features must have no empty dimension; got shape \(2, 0, 4, 4\) \(C=0\)",
        ),
        (lambda: bt.brnpa(torch.rand(0, 3, 4, 4)), ValueError, r"\(B=0\)"),
        (lambda: bt.brnpa(F, 0), ValueError, r"num_parts must be between 1 and the number of positions \(16\); got 0"),
        (
            lambda: bt.brnpa(F, 17),
            ValueError,
            r"num_parts must be between 1 and the number of positions \(16\); got 17",
        ),
        (lambda: bt.brnpa(F, 2.0), TypeError, r"num_parts must be an int; got float"),
        (lambda: bt.brnpa(F, seeds="uniform"), ValueError, r"seeds must be one of 'norm', 'random'; got 'uniform'"),
        (lambda: bt.brnpa(F, order="norm"), ValueError, r"order must be one of 'selection', 'activity'; got 'norm'"),
        (
            lambda: bt.brnpa(F, backend="cuda"),
            ValueError,
            r"backend must be one of 'auto', 'torch', 'triton'; got 'cuda'",
        ),
        (lambda: bt.brnpa(F, seeds="random"), ValueError, r"seeds='random' needs exactly one source of randomness"),
        (
            lambda: bt.brnpa(F, generator=torch.Generator()),
            ValueError,
            r"generator and noise are only used with seeds='random'",
        ),
        (
            lambda: bt.brnpa(F, 3, seeds="random", noise=torch.rand(2, 3, 16)),
            ValueError,
            r"noise must have shape \(2, 3, 4, 4\) \(B, K, positions\); got \(2, 3, 16\)",
        ),
        (
            lambda: bt.brnpa(F, 3, seeds="random", noise=torch.ones(2, 3, 4, 4, dtype=torch.int64)),
            TypeError,
            r"noise must be a floating-point torch.Tensor; got torch.int64",
        ),
        (
            lambda: bt.brnpa(F, 3, seeds="random", generator=object()),
            TypeError,
            r"generator must be a torch.Generator; got object",
        ),
    ],
)
def test_bad_input_raises_clear_error(call, error, message):
    with pytest.raises(error, match=message):
        call()


def test_triton_backend_on_cpu_needs_the_interpreter(monkeypatch):
    monkeypatch.setattr("brnpa_triton.dispatch.TRITON_INTERPRETER", False)  # read once, at import
    with pytest.raises(RuntimeError, match="backend='triton' runs on CUDA tensors.*TRITON_INTERPRET=1"):
        bt.brnpa(F, backend="triton")


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(seeds="uniform"), r"seeds must be one of 'norm', 'random'; got 'uniform'"),
        (dict(order="norm"), r"order must be one of 'selection', 'activity'; got 'norm'"),
        (dict(backend="cuda"), r"backend must be one of 'auto', 'torch', 'triton'; got 'cuda'"),
    ],
)
def test_module_rejects_bad_options_at_construction(kwargs, message):
    with pytest.raises(ValueError, match=message):
        bt.BRNPAPool(3, **kwargs)
