"""Timers, peak-memory probes and the copy-bandwidth yardstick.

Time
  * CUDA: ``triton.testing.do_bench`` (L2 flushed between calls, CUDA-event timed, median and
    20th/80th percentiles); CUDA events if triton is missing.
  * CPU: ``time.perf_counter`` around each call after warm-up calls, garbage collector off,
    repeated until a time budget is spent (at least ``min_reps`` calls); median, p20, p80, min.

Peak memory beyond what exists before the call (the input, parameters, and for the backward
mode the saved autograd graph): everything the call allocates and holds at its high-water
mark, its outputs included.
  * CUDA: ``torch.cuda.max_memory_allocated()`` after ``reset_peak_memory_stats``, minus the
    ``memory_allocated()`` before the call.
  * CPU: torch has no CPU peak counter, and ``tracemalloc`` never sees tensor storage (it is
    allocated by c10, not by Python's allocator). ``torch.profiler`` with ``profile_memory=True``
    reports every c10 CPU allocation and free as a signed ``[memory]`` event; their running sum
    in time order is the live bytes allocated during the call, and its maximum is the peak.
    Frees of blocks that existed before the call are ignored (the profiler does not know their
    size), which can only over-state the peak; memory that libraries allocate outside c10
    (oneDNN/MKL scratch, OpenMP stacks, inductor's C++ stack buffers) is not seen.
"""

from __future__ import annotations

import contextlib
import gc
import math
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import torch


@dataclass
class Timing:
    median_ms: float
    p20_ms: float
    p80_ms: float
    min_ms: float
    reps: int
    method: str
    samples: list = field(default_factory=list, repr=False)  # every timed call, ms (not serialised)

    def as_dict(self):
        d = asdict(self)
        d.pop("samples")
        return d


def from_samples(samples, method: str) -> Timing:
    """Statistics of a list of per-call times (ms)."""
    times = sorted(samples)
    return Timing(statistics.median(times), _quantile(times, 0.2), _quantile(times, 0.8), times[0], len(times),
                  method, times)


def _quantile(sorted_values, q):
    if len(sorted_values) == 1:
        return sorted_values[0]
    pos = q * (len(sorted_values) - 1)
    lo, hi = math.floor(pos), math.ceil(pos)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (pos - lo)


def time_cpu(fn: Callable[[], object], budget_s: float = 0.5, min_reps: int = 3, max_reps: int = 200,
             warmup: int = 1) -> Timing:
    """Median of repeated wall-clock timings of ``fn()`` on CPU after ``warmup`` calls."""
    for _ in range(warmup):
        fn()
    enabled = gc.isenabled()
    gc.disable()
    times = []
    try:
        start = time.perf_counter()
        while len(times) < max_reps and (len(times) < min_reps or time.perf_counter() - start < budget_s):
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    finally:
        if enabled:
            gc.enable()
    return from_samples(times, "perf_counter")


def time_cuda(fn: Callable[[], object], warmup_ms: float = 25, rep_ms: float = 100) -> Timing:
    """``triton.testing.do_bench`` (median, p20, p80); CUDA events if triton is missing."""
    try:
        from triton.testing import do_bench
    except ImportError:
        do_bench = None
    if do_bench is not None:
        times = do_bench(fn, warmup=warmup_ms, rep=rep_ms, return_mode="all")
        if isinstance(times, (list, tuple)) and times:
            return from_samples([float(t) for t in times], "triton.testing.do_bench")
        med, p20, p80, lo = do_bench(fn, warmup=warmup_ms, rep=rep_ms, quantiles=[0.5, 0.2, 0.8, 0.0])
        return Timing(float(med), float(p20), float(p80), float(lo), -1, "triton.testing.do_bench")
    fn()
    torch.cuda.synchronize()
    times = []
    deadline = time.perf_counter() + rep_ms / 1e3
    while len(times) < 5 or time.perf_counter() < deadline:
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return from_samples(times, "cuda events")


def time_cuda_graph(fn: Callable[[], object], calls: int = 10, replays: int = 5) -> tuple[float, float, float]:
    """(median, min, max) microseconds per call of ``fn`` replayed from a CUDA graph that holds
    ``calls`` calls: the GPU's time, without the host's launch overhead. ``fn`` runs twice on a
    side stream first (compilation, allocator warm-up), outside the capture."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(calls):
            fn()
    graph.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(replays):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e3 / calls)
    return statistics.median(times), min(times), max(times)


def time_fn(fn, device: torch.device, budget_s: float = 0.5, **kw) -> Timing:
    if device.type == "cuda":
        return time_cuda(fn, rep_ms=budget_s * 1e3 / 4)
    return time_cpu(fn, budget_s=budget_s, **kw)


def peak_memory_cuda(fn: Callable[[], object], device: torch.device) -> int:
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    out = fn()
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device) - before
    del out
    return int(peak)


# Kineto writes a line per profiler start/stop/stage straight to file descriptor 2, which would
# interleave with the progress bar; these prefixes mark them.
_PROFILER_LOG_PREFIXES = (b"USDT:", b"STAGE:")


@contextlib.contextmanager
def _without_profiler_log():
    """Capture what C++ code writes to fd 2 meanwhile; pass on all but the profiler's lines."""
    sys.stderr.flush()
    try:
        saved = os.dup(2)
    except OSError:  # no fd 2 (embedded interpreter): nothing to filter
        yield
        return
    with tempfile.TemporaryFile() as sink:
        os.dup2(sink.fileno(), 2)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            sink.seek(0)
            kept = [ln for ln in sink.read().splitlines(keepends=True) if not ln.startswith(_PROFILER_LOG_PREFIXES)]
            if kept:
                os.write(2, b"".join(kept))


def peak_memory_cpu(fn: Callable[[], object]) -> int:
    """Peak of the live bytes c10 allocates during ``fn()`` (see the module docstring)."""
    from torch.profiler import ProfilerActivity, profile

    with _without_profiler_log():
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            out = fn()
            del out
    events = [e for e in prof.profiler.kineto_results.events()
              if e.name() == "[memory]" and str(e.device_type()).endswith("CPU")]
    events.sort(key=lambda e: e.start_ns())
    live = peak = 0
    for e in events:
        live += e.nbytes()
        peak = max(peak, live)
    return int(peak)


def peak_memory(fn, device: torch.device) -> int:
    if device.type == "cuda":
        return peak_memory_cuda(fn, device)
    return peak_memory_cpu(fn)


def copy_bandwidth(device: torch.device, nbytes: int | None = None, budget_s: float = 0.5) -> dict:
    """Device copy bandwidth, bytes/s with the read and the write both counted (``dst.copy_(src)``
    of a buffer far larger than the last-level cache)."""
    if nbytes is None:
        nbytes = 1 << 30 if device.type == "cuda" else 256 << 20
    n = nbytes // 4
    src = torch.ones(n, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    t = time_fn(lambda: dst.copy_(src), device, budget_s=budget_s, warmup=2)
    moved = 2 * n * 4
    return {"bytes_per_s": moved / (t.median_ms / 1e3), "buffer_bytes": n * 4, "timing": t.as_dict()}
