"""The timers of ``python -m bench.gpu``, each with a CPU path so that the whole benchmark runs
(on tiny shapes) in tests on a machine without a GPU.

* ``Rotation``: calls ``fn`` on the next of several copies of the input each time, so that no
  call finds its input in L2 (the previous call read another copy).
* ``replay_us``: device time per call, without the host. CUDA: ``calls`` calls captured in one
  CUDA graph (``bench.timing.time_cuda_graph``) and replayed; CPU: the same calls back to back
  under ``perf_counter`` (a CPU has no launch overhead to remove).
* ``back_to_back_us``: what an eager training loop sees: ``calls`` calls issued back to back,
  from before the first until the device has finished the last (host cost included), and the
  host's time to issue them (before the final synchronisation).
* ``kernel_times``: device time per kernel under ``torch.profiler`` (CUDA activity); on CPU the
  aten operators' self CPU time stands in for kernels.
* ``read_floor_us``: a sum over X (one read of it): the one-read floor measured on the device.
"""

from __future__ import annotations

import statistics
import time
import warnings

import torch

from bench.timing import _without_profiler_log, time_cuda_graph


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Rotation:
    """A zero-argument callable: ``fn(inputs[i % len(inputs)])`` for i = 0, 1, 2, ..."""

    def __init__(self, fn, inputs):
        self.fn, self.inputs, self.calls = fn, list(inputs), 0

    def __call__(self):
        x = self.inputs[self.calls % len(self.inputs)]
        self.calls += 1
        return self.fn(x)


def _spread(per_call_us: list) -> dict:
    return {"us": statistics.median(per_call_us), "min_us": min(per_call_us), "max_us": max(per_call_us),
            "samples": len(per_call_us)}


def replay_us(fn, device: torch.device, calls: int, replays: int) -> dict:
    """Median, min and max microseconds per call over ``replays`` replays of ``calls`` calls."""
    if device.type == "cuda":
        median, lo, hi = time_cuda_graph(fn, calls=calls, replays=replays)
        return {"us": median, "min_us": lo, "max_us": hi, "samples": replays, "timer": "cuda-graph"}
    fn()
    per_call = []
    for _ in range(replays):
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        per_call.append((time.perf_counter() - start) * 1e6 / calls)
    return {**_spread(per_call), "timer": "perf_counter"}


def back_to_back_us(fn, device: torch.device, calls: int, rounds: int) -> dict:
    """Per call: wall time of ``calls`` back-to-back calls until the device is idle again, and
    ``host_us``, the time the host took to issue them."""
    fn()
    synchronize(device)
    done, issued = [], []
    for _ in range(rounds):
        synchronize(device)
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        issued.append((time.perf_counter() - start) * 1e6 / calls)
        synchronize(device)
        done.append((time.perf_counter() - start) * 1e6 / calls)
    return {**_spread(done), "host_us": statistics.median(issued), "timer": "perf_counter+synchronize"}


def _event_time_us(event, device: torch.device) -> float:
    if device.type == "cuda":  # device_time_total since torch 2.4; cuda_time_total before
        total = getattr(event, "device_time_total", None)
        return float(total if total is not None else getattr(event, "cuda_time_total", 0.0))
    return float(event.self_cpu_time_total)


def kernel_times(fn, device: torch.device, reps: int) -> list[dict]:
    """[{name, launches, us}] per call, longest first: each kernel's launches per call and
    device microseconds per call (all its launches together)."""
    from torch.profiler import ProfilerActivity, profile

    fn()
    synchronize(device)
    activity = ProfilerActivity.CUDA if device.type == "cuda" else ProfilerActivity.CPU
    with warnings.catch_warnings(), _without_profiler_log():
        warnings.simplefilter("ignore")  # "Profiler clears events at the end of each cycle"
        with profile(activities=[activity]) as prof:
            for _ in range(reps):
                fn()
            synchronize(device)
        averages = prof.key_averages()
    wanted = "CUDA" if device.type == "cuda" else "CPU"
    rows = []
    for e in averages:
        if getattr(e.device_type, "name", str(e.device_type)) != wanted or not e.count:
            continue
        us = _event_time_us(e, device) / reps
        if us > 0:
            rows.append({"name": e.key[:100], "launches": e.count / reps, "us": us})
    return sorted(rows, key=lambda r: -r["us"])


def read_floor_us(inputs, device: torch.device, calls: int, replays: int) -> dict:
    """One read of X: ``x.sum()`` rotated over the copies (no autograd)."""

    def read(x):
        with torch.no_grad():
            return x.sum()

    return replay_us(Rotation(read, inputs), device, calls, replays)


def peak_read(device: torch.device, nbytes: int, replays: int) -> dict:
    """Read bandwidth of the device: a sum over a float32 buffer of ``nbytes`` (far larger than L2)."""
    buffer = torch.ones(nbytes // 4, dtype=torch.float32, device=device)
    t = replay_us(buffer.sum, device, calls=3, replays=replays)
    return {"bytes": nbytes // 4 * 4, **t, "bytes_per_s": nbytes // 4 * 4 / (t["us"] * 1e-6)}
