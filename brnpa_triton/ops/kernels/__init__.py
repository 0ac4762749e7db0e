"""Triton kernel sources of the fused BR-NPA operator (launchers and launch plans:
``brnpa_triton.ops.triton_impl``). ``forward`` holds the forward's K + 2 launches, ``backward``
the backward's 2, ``common`` what they share."""

from brnpa_triton.ops.kernels.backward import backward_dx_kernel, backward_seeds_kernel
from brnpa_triton.ops.kernels.forward import forward_final_kernel, forward_norms_kernel, forward_part_kernel

__all__ = ["forward_norms_kernel", "forward_part_kernel", "forward_final_kernel", "backward_dx_kernel",
           "backward_seeds_kernel"]
