"""Argument checks of the public API: each error names the argument, what was expected and what came."""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import torch

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
SEED_MODES = ("norm", "random")
ORDERS = ("selection", "activity")
BACKENDS = ("auto", "torch", "triton")


def check_choice(name: str, value, choices) -> None:
    if not isinstance(value, str) or value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, choices))}; got {value!r}")


def check_features(name: str, features, layout: str) -> None:
    """``layout`` is "BCHW" or "BNC": the expected dimension names."""
    if not isinstance(features, torch.Tensor):
        raise TypeError(
            f"{name} must be a torch.Tensor of shape ({', '.join(layout)}); got {type(features).__name__}"
            + (f" (convert it with torch.from_numpy({name}))" if isinstance(features, np.ndarray) else "")
        )
    check_dense(name, features)
    if features.dim() != len(layout):
        raise ValueError(
            f"{name} must have {len(layout)} dims ({', '.join(layout)}); "
            f"got {features.dim()} dims, shape {tuple(features.shape)}"
        )
    if features.dtype not in SUPPORTED_DTYPES:
        raise TypeError(
            f"{name} must be float16, bfloat16, float32 or float64; got {features.dtype}"
        )
    empty = [f"{d}={s}" for d, s in zip(layout, features.shape, strict=True) if s == 0]
    if empty:
        raise ValueError(f"{name} must have no empty dimension; got shape {tuple(features.shape)} ({', '.join(empty)})")


def check_dense(name: str, tensor: torch.Tensor) -> None:
    """Sparse and other non-strided layouts have no strides for the kernels to read."""
    if tensor.layout != torch.strided:
        raise TypeError(f"{name} must be a dense (strided) tensor; got layout {tensor.layout}: use {name}.to_dense()")


def _describe(value) -> str:
    if isinstance(value, torch.Tensor):
        return f"a {value.dtype} tensor of shape {tuple(value.shape)}"
    return f"{type(value).__name__} {value!r}" if isinstance(value, (str, float)) else type(value).__name__


def as_int(name: str, value, *, minimum: int | None = None) -> int:
    """An integer argument as a Python int: ints, numpy integers and 0-d integer tensors are
    accepted (``np.int64(2)``, ``torch.tensor(2)``); bools, floats and the rest are not."""
    if isinstance(value, torch.Tensor):
        if value.dim() != 0 or value.dtype == torch.bool or value.is_floating_point() or value.is_complex():
            raise TypeError(f"{name} must be an int; got {_describe(value)}")
        value = int(value.item())
    elif isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name} must be an int; got {_describe(value)}")
    value = int(value)
    if minimum is not None and value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}; got {value}")
    return value


def as_bool(name: str, value) -> bool:
    """A flag: True or False (numpy bools too), nothing that merely has a truth value."""
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name} must be True or False; got {_describe(value)}")
    return bool(value)


def as_float(name: str, value) -> float:
    """A real number as a Python float: ints, floats and numpy numbers (not bools, strings or tensors)."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise TypeError(f"{name} must be a float; got {_describe(value)}")
    return float(value)


def as_probability(name: str, value) -> float:
    """A float in [0, 1) (ints and numpy numbers accepted)."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise TypeError(f"{name} must be a float in [0, 1); got {_describe(value)}")
    value = float(value)
    if not 0.0 <= value < 1.0:
        raise ValueError(f"{name} must be in [0, 1); got {value}")
    return value


def check_num_parts(num_parts: int, num_positions: int) -> None:
    """``num_parts`` (already an int, see ``as_int``) against the input's number of positions."""
    if not 1 <= num_parts <= num_positions:
        raise ValueError(
            f"num_parts must be between 1 and the number of positions ({num_positions}); got {num_parts}"
        )


class Options(NamedTuple):
    """The operator's options, checked once: by ``brnpa`` / ``brnpa_tokens`` on every call and by
    the modules at construction. ``num_parts`` is checked against the input's size per call."""

    num_parts: int
    refine: bool
    seeds: str
    order: str
    backend: str
    check_finite: bool


def make_options(
    num_parts, *, refine=True, seeds="norm", order="selection", backend="auto", check_finite=False, positions=None
) -> Options:
    """Checked options; ``positions`` (the input's number of positions), when known, bounds num_parts."""
    num_parts = as_int("num_parts", num_parts)
    if positions is not None:
        check_num_parts(num_parts, positions)
    elif num_parts < 1:
        raise ValueError(f"num_parts must be at least 1; got {num_parts}")
    check_choice("seeds", seeds, SEED_MODES)
    check_choice("order", order, ORDERS)
    check_choice("backend", backend, BACKENDS)
    return Options(num_parts, as_bool("refine", refine), seeds, order, backend, as_bool("check_finite", check_finite))


def check_finite(name: str, features: torch.Tensor) -> None:
    """Opt-in: reading the answer synchronises with the device. Under torch.compile the check
    is an assertion inside the graph (``torch._assert_async``), which raises RuntimeError."""
    _assert(torch.isfinite(features).all(), f"{name} must be finite (check_finite=True); got NaN or Inf values")


def check_norms_finite(name: str, norms: torch.Tensor) -> None:
    """After the op: finite features whose norm ||x_n|| overflows the accumulation dtype."""
    _assert(
        torch.isfinite(norms).all(),
        f"{name} have positions whose norm overflows {str(norms.dtype).replace('torch.', '')} "
        f"(largest finite value {torch.finfo(norms.dtype).max:.3g}), so their outputs are not finite "
        "(check_finite=True); scale the features down (maps and seeds do not depend on the scale, "
        "up to eps) or pass float64 features",
    )


def _assert(ok: torch.Tensor, message: str) -> None:
    if torch.compiler.is_compiling():
        torch._assert_async(ok, message)  # traceable: no data-dependent Python branch
    elif not bool(ok):
        raise ValueError(message)


def _same_device(a: torch.device, b: torch.device) -> bool:
    """Equal devices, a missing CUDA index meaning the current device."""
    def normal(d):
        if d.type == "cuda" and d.index is None:
            return torch.device("cuda", torch.cuda.current_device())
        return torch.device(d.type) if d.type == "cpu" else d
    return normal(torch.device(a)) == normal(torch.device(b))


def check_random_source(seeds: str, generator, noise, expected_noise_shape, device) -> None:
    if seeds == "norm":
        if generator is not None or noise is not None:
            raise ValueError("generator and noise are only used with seeds='random'; got seeds='norm'")
        return
    if (generator is None) == (noise is None):
        raise ValueError(
            "seeds='random' needs exactly one source of randomness: generator=torch.Generator "
            "or noise=Tensor (the global RNG is never used)"
        )
    if generator is not None:
        if not isinstance(generator, torch.Generator):
            raise TypeError(f"generator must be a torch.Generator; got {type(generator).__name__}")
        if not _same_device(generator.device, device):
            raise ValueError(f"generator must be on the features' device ({device}); got {generator.device}")
        return
    if isinstance(noise, np.ndarray):
        raise TypeError(
            f"noise must be a floating-point torch.Tensor; got a numpy.ndarray of dtype {noise.dtype}: "
            "convert it with torch.from_numpy(noise), on the features' device"
        )
    if not isinstance(noise, torch.Tensor):
        raise TypeError(f"noise must be a floating-point torch.Tensor; got {type(noise).__name__}")
    if not noise.is_floating_point():
        raise TypeError(f"noise must be a floating-point torch.Tensor; got {noise.dtype}")
    check_dense("noise", noise)
    if tuple(noise.shape) != tuple(expected_noise_shape):
        raise ValueError(
            f"noise must have shape {tuple(expected_noise_shape)} (B, K, positions); got {tuple(noise.shape)}"
        )
    if not _same_device(noise.device, device):
        raise ValueError(f"noise must be on the features' device ({device}); got {noise.device}")
