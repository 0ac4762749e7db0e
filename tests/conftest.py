"""Test-wide setup. TRITON_INTERPRET must be set before triton is imported anywhere, so that
kernels run on CPU tensors under the Triton interpreter."""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import hypothesis  # noqa: E402

# Interpreted kernels are slow and shapes vary: no deadline, few examples, reproducible runs.
hypothesis.settings.register_profile("ci", deadline=None, max_examples=20, derandomize=True, print_blob=True)
hypothesis.settings.load_profile("ci")
