"""Test-wide setup: where the Triton kernels run.

With a CUDA device the kernels run compiled on it. Without one, the Triton interpreter runs
them on CPU tensors; TRITON_INTERPRET must be set before triton is imported anywhere, hence
here. An explicit TRITON_INTERPRET in the environment always wins.
"""

import os

import torch

os.environ.setdefault("TRITON_INTERPRET", "0" if torch.cuda.is_available() else "1")

import hypothesis  # noqa: E402

# Interpreted kernels are slow and shapes vary: no deadline, few examples, reproducible runs.
hypothesis.settings.register_profile("ci", deadline=None, max_examples=20, derandomize=True, print_blob=True)
hypothesis.settings.load_profile("ci")


def _kernel_mode() -> str:
    if os.environ["TRITON_INTERPRET"] == "1":
        return "Triton kernels ran under the interpreter, on CPU tensors (TRITON_INTERPRET=1)"
    if torch.cuda.is_available():
        return f"Triton kernels ran compiled, on {torch.cuda.get_device_name()}"
    return "Triton kernels did not run (no CUDA device and TRITON_INTERPRET=0)"


def pytest_report_header(config):
    return [_kernel_mode()]


def pytest_terminal_summary(terminalreporter):
    # Also under -q, which hides the header.
    terminalreporter.write_line(_kernel_mode())
