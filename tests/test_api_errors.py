"""Bad input gets a clear error naming the argument, what was expected and what came."""

from __future__ import annotations

import numpy as np
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


def _noise_with(value, shape=(2, 2, 4, 4), at=(0, 1, 2, 3)):
    noise = torch.rand(shape, generator=torch.Generator().manual_seed(0))
    noise[at] = value
    return noise


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_check_finite_rejects_non_finite_noise(backend, value):
    with pytest.raises(ValueError, match=r"noise must be finite \(check_finite=True\); got NaN or Inf values"):
        bt.brnpa(F, 2, seeds="random", noise=_noise_with(value), backend=backend, check_finite=True)
    tokens = F.flatten(2).transpose(1, 2)
    with pytest.raises(ValueError, match=r"noise must be finite \(check_finite=True\)"):
        bt.brnpa_tokens(tokens, 2, seeds="random", noise=_noise_with(value, (2, 2, 16), (1, 0, 5)), backend=backend,
                        check_finite=True)
    with pytest.raises(ValueError, match=r"noise must be finite \(check_finite=True\)"):
        bt.BRNPAPool(2, seeds="random", backend=backend, check_finite=True)(F, noise=_noise_with(value))


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_nan_noise_without_check_finite_seeds_its_part_there(backend):
    # Documented: argmax ranks NaN above every number, so part 1 of image 0 is seeded at the NaN.
    noise = _noise_with(float("nan"))
    out = bt.brnpa(F, 2, seeds="random", noise=noise, backend=backend)
    assert out.indices[0, 1] == 2 * 4 + 3
    assert torch.equal(out.indices, torch.nan_to_num(noise, nan=2.0).flatten(2).argmax(2))
    assert torch.isfinite(out.vectors).all() and torch.isfinite(out.maps).all()


SPARSE = F.to_sparse()


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda: bt.brnpa(SPARSE, 2), r"features must be a dense \(strided\) tensor; got layout torch.sparse_coo"),
        (lambda: bt.brnpa(F.to_sparse(2), 2), r"features must be a dense \(strided\) tensor"),  # hybrid
        (lambda: bt.BRNPAPool(2)(F.flatten(2).to_sparse()), r"tokens must be a dense \(strided\) tensor"),
        (lambda: bt.brnpa_tokens(F.flatten(2).to_sparse(), 2), r"tokens must be a dense \(strided\) tensor"),
        (lambda: bt.BRNPAPool(2)(SPARSE), r"features must be a dense \(strided\) tensor.*to_dense\(\)"),
        (lambda: bt.BRNPAHead(3, 5, 2)(SPARSE), r"features must be a dense \(strided\) tensor"),
        (
            lambda: bt.brnpa(F, 2, seeds="random", noise=torch.rand(2, 2, 4, 4).to_sparse()),
            r"noise must be a dense \(strided\) tensor; got layout torch.sparse_coo",
        ),
    ],
)
def test_non_strided_layouts_are_refused_naming_the_argument(call, message):
    with pytest.raises(TypeError, match=message):
        call()


def test_numpy_arrays_get_told_how_to_convert():
    noise = np.random.default_rng(0).random((2, 2, 4, 4))
    with pytest.raises(
        TypeError,
        match=r"noise must be a floating-point torch.Tensor; got a numpy.ndarray of dtype float64: "
        r"convert it with torch.from_numpy\(noise\)",
    ):
        bt.brnpa(F, 2, seeds="random", noise=noise)
    with pytest.raises(TypeError, match=r"noise must be a floating-point torch.Tensor; got list"):
        bt.brnpa(F, 2, seeds="random", noise=noise.tolist())
    with pytest.raises(TypeError, match=r"features must be a torch.Tensor .*; got ndarray \(convert it with "
                                        r"torch.from_numpy\(features\)\)"):
        bt.brnpa(F.numpy(), 2)
    with pytest.raises(TypeError, match=r"tokens must be a torch.Tensor .*torch.from_numpy\(tokens\)"):
        bt.brnpa_tokens(F[0].numpy(), 2)
