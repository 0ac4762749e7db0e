"""What a benchmark run measures: the presets (problem groups, providers, modes) and the run
configuration they fill in."""

from __future__ import annotations

import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch

MODES = ("forward", "backward", "fwd+bwd")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "float64": torch.float64}
RESULTS_DIR = Path(__file__).resolve().parent / "results"  # the committed results; written only with --out
SCRATCH_DIR = Path(tempfile.gettempdir()) / "brnpa-bench"  # where a run writes unless told otherwise

# The foundation problem: the size the library's speed and memory targets are stated at.
FOUNDATION = dict(B=8, C=2048, H=28, W=28, K=3, dtype="float32")
FOUNDATION_SHAPE = (FOUNDATION["B"], FOUNDATION["C"], FOUNDATION["H"], FOUNDATION["W"], FOUNDATION["K"])


@dataclass
class Group:
    """A set of problems run with the same providers and modes."""

    shapes: list  # (B, C, H, W, K)
    dtypes: list  # dtype names
    providers: list
    modes: list = field(default_factory=lambda: list(MODES))


@dataclass
class Config:
    preset: str
    groups: list
    device: str = "cpu"
    budget_s: float = 0.25  # timing budget per row (CPU: wall clock; CUDA: do_bench rep time)
    min_reps: int = 3
    out_dir: Path = SCRATCH_DIR
    plot: bool = True
    progress: bool = True
    compile_backend: str = "inductor"
    measure_memory: bool = True
    rounds: int = 1  # > 1: time every row again in later rounds, interleaved (fairer on a busy machine)
    copy_bytes: int | None = None
    argv: list = field(default_factory=list)
    threads_suffix: bool = False  # name the files after a non-default thread count


def _sweep(B, C, hw, K):
    return [(B, C, r, r, K) for r in hw]


def preset_groups(name: str, device: str) -> tuple[list, float]:
    """(groups, per-row timing budget) of a preset on ``device``."""
    cuda = torch.device(device).type == "cuda"
    lib = ["brnpa-triton", "brnpa-torch"] if cuda else ["brnpa-torch"]
    half = "float16" if cuda else "bfloat16"
    fshape = FOUNDATION_SHAPE
    if name == "micro":
        return [Group([(2, 8, 4, 4, 2), (2, 8, 6, 6, 2)], ["float32"],
                      lib + ["eager", "compiled", "reference", "bap-wsdan"])], 0.01
    if name == "foundation":
        return [Group([fshape], ["float32"], lib + ["eager", "compiled"], ["forward", "fwd+bwd"])], \
            (0.5 if cuda else 4.0)
    if name == "quick" and not cuda:
        base = ["eager", "reference", "bap-wsdan"]
        return [
            # resolution sweep (C=512) and channel sweep, K=3
            Group(_sweep(2, 512, (14, 28, 56), 3) + [(2, 2048, 14, 14, 3)], ["float32"], lib + base),
            # parts sweep
            Group([(2, 512, 28, 28, 1), (2, 512, 28, 28, 8)], ["float32"], lib + base),
            # half precision
            Group([(2, 512, 28, 28, 3)], ["bfloat16"], lib + ["eager", "bap-wsdan"]),
            # torch.compile: one compile per problem, so only two problems here
            Group([(2, 512, 28, 28, 3), fshape], ["float32"], ["compiled"]),
            Group([fshape], ["float32"], lib + ["eager", "bap-wsdan"]),
        ], 0.15
    if name == "quick":  # CUDA
        return [
            Group(_sweep(16, 2048, (14, 28, 56), 3), ["float32", "bfloat16"], lib + ["eager", "bap-wsdan"]),
            Group(_sweep(16, 2048, (14, 28), 3), ["float32"], ["reference"]),
            Group([(16, 512, 28, 28, 3), (16, 2048, 28, 28, 1), (16, 2048, 28, 28, 8)], ["float32"],
                  lib + ["eager", "bap-wsdan"]),
            Group([(32, 2048, 14, 14, 3), (64, 512, 28, 28, 3)], ["float32"], lib + ["eager", "bap-wsdan"]),
            Group([(16, 2048, 28, 28, 3)], [half], lib + ["eager"]),
            Group([(16, 2048, 28, 28, 3), fshape], ["float32"], ["compiled"]),
            Group([fshape], ["float32"], lib + ["eager"]),
        ], 0.3
    if name == "full":
        dtypes = ["float32", "bfloat16", "float16"] if cuda else ["float32", "bfloat16"]
        grid = [(B, C, r, r, K) for B in (8, 32) for C in (512, 2048) for r in (14, 28, 56) for K in (1, 3, 8)]
        paper = [(32, 2048, 14, 14, 3), (16, 2048, 56, 56, 3), (64, 512, 28, 28, 3), (64, 2048, 28, 28, 3)]
        return [
            Group(grid + paper, dtypes, lib + ["eager", "bap-wsdan", "bap-bcnn"]),
            Group([s for s in grid if s[0] == 8 and s[4] <= 3] + paper[:1], ["float32"], ["reference"]),
            Group([s for s in grid if s[4] == 3] + paper, dtypes, ["compiled"]),
            Group([fshape], ["float32"], lib + ["eager", "compiled"]),
        ], (0.4 if cuda else 0.5)
    raise ValueError(f"unknown preset {name!r}")
