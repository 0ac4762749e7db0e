"""The machine a run measured: versions, device name, git state, load, and the CPU allocator
setting (which only takes effect in a fresh process, hence ``reexec_with_allocator``)."""

from __future__ import annotations

import os
import platform
import subprocess
import sys
from pathlib import Path

import torch

REPO_ROOT = Path(__file__).resolve().parent.parent

# CPU allocator settings, read by glibc / c10 at start-up. Large tensors on CPU come from mmap
# and are returned on free: every fresh (B, N, C)-sized allocation pays page faults (about 20 ms
# per 50 MB on a 2-core EPYC), which dominates any implementation that allocates big
# temporaries. "default" is what users get.
ALLOCATORS = {
    "default": {},
    "thp": {"THP_MEM_ALLOC_ENABLE": "1"},  # c10 madvise(MADV_HUGEPAGE) on >= 2 MB blocks
    "cached": {
        "MALLOC_MMAP_THRESHOLD_": str(1 << 40),
        "MALLOC_TRIM_THRESHOLD_": str(1 << 40),
    },  # glibc keeps freed memory
}
ALLOCATOR_VARS = sorted({k for v in ALLOCATORS.values() for k in v} | {"LD_PRELOAD"})


def allocator_in_effect() -> str:
    for name, env in ALLOCATORS.items():
        if env and all(os.environ.get(k) == v for k, v in env.items()):
            return name
    return "default" if not any(os.environ.get(k) for k in ALLOCATOR_VARS) else "custom"


def reexec_with_allocator(name: str, argv: list) -> None:
    """Replace this process by ``python -m bench.run argv`` with allocator ``name`` in effect
    (returns only when it already is)."""
    if name == "default" or allocator_in_effect() == name:
        return
    env = {**os.environ, **ALLOCATORS[name]}
    print(f"[bench] re-running with allocator {name}: {ALLOCATORS[name]}", file=sys.stderr)
    sys.stdout.flush()
    os.execve(sys.executable, [sys.executable, "-m", "bench.run", *argv], env)


def loadavg() -> tuple | None:
    return os.getloadavg() if hasattr(os, "getloadavg") else None


def _git(*args):
    try:
        return subprocess.run(["git", *args], cwd=REPO_ROOT, capture_output=True, text=True, timeout=10).stdout.strip()
    except Exception:  # noqa: BLE001 - no git, or not a checkout: recorded as unknown
        return None


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_tag(device: str) -> str:
    """File-name slug of a device: ``cpu`` or ``cuda-<model>``."""
    d = torch.device(device)
    if d.type == "cuda":
        name = torch.cuda.get_device_name(d).lower()
        slug = "".join(c if c.isalnum() else "-" for c in name).strip("-")
        while "--" in slug:
            slug = slug.replace("--", "-")
        return f"cuda-{slug}"
    return d.type


def environment(device: str) -> dict:
    d = torch.device(device)
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    env = {
        "device": device,
        "device_name": torch.cuda.get_device_name(d) if d.type == "cuda" else cpu_model(),
        "torch": torch.__version__,
        "triton": triton_version,
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "git_commit": _git("rev-parse", "HEAD"),
        "git_dirty": bool(_git("status", "--porcelain", "--untracked-files=no")),
        "triton_interpret": os.environ.get("TRITON_INTERPRET", "0"),
        "allocator": allocator_in_effect(),
        "allocator_env": {k: os.environ[k] for k in ALLOCATOR_VARS if k in os.environ},
    }
    try:
        import brnpa_triton

        env["brnpa_triton"] = brnpa_triton.__version__
        env["backends"] = brnpa_triton.available_backends(d)
    except Exception:  # noqa: BLE001 - the environment record must not sink the run
        pass
    return env
