"""Triton kernel sources of the fused BR-NPA operator (launchers: ``brnpa_triton.ops.triton_impl``)."""

from brnpa_triton.ops.kernels.backward import brnpa_backward_kernel
from brnpa_triton.ops.kernels.forward import brnpa_forward_kernel

__all__ = ["brnpa_forward_kernel", "brnpa_backward_kernel"]
