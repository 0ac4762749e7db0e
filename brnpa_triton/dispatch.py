"""Which implementation runs: "torch" (vectorised PyTorch) or "triton" (fused kernels).

(Not named backends.py: torch.compile skips any path matching "triton/backends".)
"""

from __future__ import annotations

import importlib.util
import os

import torch

TRITON_MISSING = (
    "backend='triton' needs the triton package, which is not installed: pip install 'brnpa-triton[triton]' "
    "(CUDA builds of PyTorch already include triton), or use backend='torch'"
)


def triton_installed() -> bool:
    return importlib.util.find_spec("triton") is not None


def triton_interpreter_enabled() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def available_backends(device: torch.device | str = "cpu") -> list[str]:
    """The backends that can run on ``device`` in this process."""
    device = torch.device(device)
    names = ["torch"]
    if triton_installed() and (device.type == "cuda" or triton_interpreter_enabled()):
        names.append("triton")
    return names


def resolve_backend(backend: str, device: torch.device) -> str:
    """Map "auto" to a concrete backend and reject impossible requests with a clear reason."""
    if backend == "auto":
        return "triton" if device.type == "cuda" and triton_installed() else "torch"
    if backend == "triton":
        if not triton_installed():
            raise RuntimeError(TRITON_MISSING)
        if device.type != "cuda" and not triton_interpreter_enabled():
            raise RuntimeError(
                f"backend='triton' runs on CUDA tensors; for {device.type} tensors it needs the Triton "
                "interpreter: set TRITON_INTERPRET=1 before importing triton (slow, for testing), "
                "or use backend='torch'"
            )
    return backend
