"""Large fresh CPU buffers backed by transparent huge pages.

glibc serves every allocation above 32 MB with a fresh mmap and unmaps it on free, so each
backward's dX (the size of the features) is faulted in 4 KB page by page: at (8, 2048, 28x28)
float32 that was ~13 ms of a ~23 ms backward on a 2-core AMD EPYC, ~4 ms with huge pages.
Where THP is in "madvise" mode (common), asking for it on our own buffer before its first
touch is enough. This touches nothing but that buffer; PyTorch's THP_MEM_ALLOC_ENABLE=1 does
the same for every allocation. Elsewhere (not Linux, CUDA, small buffers) it is a no-op.
"""

from __future__ import annotations

import ctypes
import sys

import torch

_MADV_HUGEPAGE = 14
_PAGE = 4096
_MIN_BYTES = 4 << 20  # below this, faults are cheap and glibc's heap reuses the memory anyway


def _load_madvise():
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        madvise = libc.madvise
    except (OSError, AttributeError):
        return None
    madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    madvise.restype = ctypes.c_int
    return madvise


_madvise = _load_madvise()


def empty_like_hugepages(x: torch.Tensor) -> torch.Tensor:
    """``torch.empty_like(x)`` (same strides when x is dense), advised to use huge pages."""
    out = torch.empty_like(x)
    nbytes = out.untyped_storage().nbytes()
    if _madvise is not None and out.device.type == "cpu" and nbytes >= _MIN_BYTES:
        start = (out.data_ptr() + _PAGE - 1) & ~(_PAGE - 1)
        end = (out.data_ptr() + nbytes) & ~(_PAGE - 1)
        _madvise(start, end - start, _MADV_HUGEPAGE)  # advice only: failure changes nothing
    return out
