"""Which implementation runs: "torch" (vectorised PyTorch) or "triton" (fused kernels).

Besides the device, the choice depends on two facts of the process, both read once, here, at
import: whether triton is installed and whether its interpreter is on. torch.compile traces
these functions into the caller's graph, and Dynamo cannot trace the look-ups themselves on
every supported torch (``importlib.util.find_spec`` up to 2.12, ``os.environ`` on 2.4). Triton
itself reads TRITON_INTERPRET once, when the kernels are defined.

(Not named backends.py: torch.compile skips any path matching "triton/backends".)
"""

from __future__ import annotations

import importlib.util
import os

import torch

TRITON_INSTALLED = importlib.util.find_spec("triton") is not None
TRITON_INTERPRETER = os.environ.get("TRITON_INTERPRET", "0") == "1"

TRITON_MISSING = (
    "backend='triton' needs the triton package, which is not installed: pip install 'brnpa-triton[triton]' "
    "(CUDA builds of PyTorch already include triton), or use backend='torch'"
)


def triton_installed() -> bool:
    return TRITON_INSTALLED


def triton_interpreter_enabled() -> bool:
    return TRITON_INTERPRETER


def available_backends(device: torch.device | str = "cpu") -> list[str]:
    """The backends that can run on ``device`` in this process."""
    if not isinstance(device, torch.device):
        device = torch.device(device)  # torch.device(a device) does not trace on torch 2.6
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
                "interpreter: set TRITON_INTERPRET=1 before importing brnpa_triton (slow, for testing), "
                "or use backend='torch'"
            )
    return backend
