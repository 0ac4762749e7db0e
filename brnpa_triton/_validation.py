"""Argument checks of the public API: each error names the argument, what was expected and what came."""

from __future__ import annotations

import torch

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
SEED_MODES = ("norm", "random")
ORDERS = ("selection", "activity")
BACKENDS = ("auto", "torch", "triton")


def check_choice(name: str, value, choices) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, choices))}; got {value!r}")


def check_features(name: str, features, layout: str) -> None:
    """``layout`` is "BCHW" or "BNC": the expected dimension names."""
    if not isinstance(features, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of shape ({', '.join(layout)}); got {type(features).__name__}")
    if features.dim() != len(layout):
        raise ValueError(
            f"{name} must have {len(layout)} dims ({', '.join(layout)}); got {features.dim()} dims, shape {tuple(features.shape)}"
        )
    if features.dtype not in SUPPORTED_DTYPES:
        raise TypeError(
            f"{name} must be float16, bfloat16, float32 or float64; got {features.dtype}"
        )
    empty = [f"{d}={s}" for d, s in zip(layout, features.shape) if s == 0]
    if empty:
        raise ValueError(f"{name} must have no empty dimension; got shape {tuple(features.shape)} ({', '.join(empty)})")


def check_num_parts(num_parts, num_positions: int) -> None:
    if isinstance(num_parts, bool) or not isinstance(num_parts, int):
        raise TypeError(f"num_parts must be an int; got {type(num_parts).__name__}")
    if not 1 <= num_parts <= num_positions:
        raise ValueError(
            f"num_parts must be between 1 and the number of positions ({num_positions}); got {num_parts}"
        )


def check_finite(name: str, features: torch.Tensor) -> None:
    """Opt-in: reading the answer synchronises with the device."""
    if not bool(torch.isfinite(features).all()):
        raise ValueError(f"{name} must be finite (check_finite=True); got NaN or Inf values")


def check_norms_finite(name: str, norms: torch.Tensor) -> None:
    """After the op: finite features whose norm ||x_n|| overflows the accumulation dtype."""
    if not bool(torch.isfinite(norms).all()):
        raise ValueError(
            f"{name} have positions whose norm overflows {str(norms.dtype).replace('torch.', '')} "
            f"(largest finite value {torch.finfo(norms.dtype).max:.3g}), so their outputs are not finite "
            "(check_finite=True); scale the features down (maps and seeds do not depend on the scale, "
            "up to eps) or pass float64 features"
        )


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
    if not isinstance(noise, torch.Tensor) or not noise.is_floating_point():
        raise TypeError(f"noise must be a floating-point torch.Tensor; got {getattr(noise, 'dtype', type(noise).__name__)}")
    if tuple(noise.shape) != tuple(expected_noise_shape):
        raise ValueError(f"noise must have shape {tuple(expected_noise_shape)} (B, K, positions); got {tuple(noise.shape)}")
    if not _same_device(noise.device, device):
        raise ValueError(f"noise must be on the features' device ({device}); got {noise.device}")
