"""Running a configuration: build every provider once per problem, time each mode, probe its
peak memory, optionally re-time in interleaved rounds, and assemble the result record."""

from __future__ import annotations

import contextlib
import datetime as _dt
import gc
import sys
import time

import torch

from bench import analysis, report, timing
from bench.environment import environment, loadavg
from bench.presets import DTYPES, Config
from bench.providers import PROVIDERS, Case, availability

SCHEMA = "brnpa-bench/1"


def nominal_bytes(case: Case, mode: str) -> int:
    """The BR-NPA floor the bandwidth column is computed against: K+1 reads of X forward,
    1 read + 1 write backward (the same count for every provider of a problem)."""
    passes = {"forward": case.K + 1, "backward": 2, "fwd+bwd": case.K + 3}[mode]
    return passes * case.x_bytes


_GRADS: dict = {}


def _upstream_grad(out0: torch.Tensor) -> torch.Tensor:
    """A fixed random upstream gradient per output shape (the loss every provider gets)."""
    key = (tuple(out0.shape), out0.dtype, str(out0.device))
    if key not in _GRADS:
        g = torch.Generator(device="cpu").manual_seed(1)
        _GRADS[key] = torch.randn(out0.shape, generator=g).to(device=out0.device, dtype=out0.dtype)
    return _GRADS[key]


def _no_donation():
    """AOTAutograd donates saved buffers, which forbids backpropagating a graph twice."""
    try:
        return torch._functorch.config.patch(donated_buffer=False)
    except Exception:  # noqa: BLE001 - older torch: no such option
        return contextlib.nullcontext()


def _mode_callable(built, x, mode):
    """The call to time (and to probe for memory) in one mode."""
    inputs = [x] + list(built.params)
    if mode == "forward":
        return lambda: built.fn(x)  # a training forward: inputs require grad

    if mode == "fwd+bwd":
        def f():
            out = built.fn(x)
            return torch.autograd.grad(out[0], inputs, _upstream_grad(out[0]))
        return f
    fwd = built.fn_retain or built.fn
    with _no_donation():
        out = fwd(x)
        g = _upstream_grad(out[0])
        torch.autograd.grad(out[0], inputs, g, retain_graph=True)  # compiles fn_retain's backward
    return lambda: torch.autograd.grad(out[0], inputs, g, retain_graph=True)


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def expand(config: Config, providers_ok: set) -> list:
    """The ordered, de-duplicated list of (case, provider, modes) to run."""
    seen, plan = set(), {}
    for g in config.groups:
        for shape in g.shapes:
            for dt in g.dtypes:
                case = Case(*shape, dtype=DTYPES[dt], device=config.device)
                for p in g.providers:
                    if p not in providers_ok:
                        continue
                    for m in g.modes:
                        key = (case, p, m)
                        if key in seen:
                            continue
                        seen.add(key)
                        plan.setdefault(case, {}).setdefault(p, []).append(m)
    return [(case, p, modes) for case, per in plan.items() for p, modes in per.items()]


def dtype_name(dtype) -> str:
    return str(dtype).replace("torch.", "")


def _time(f, device, config, budget):
    if device.type == "cpu":
        return timing.time_fn(f, device, budget_s=budget, min_reps=config.min_reps)
    return timing.time_fn(f, device, budget_s=budget)


def _set_timing(row, t):
    row["timing"] = t.as_dict()
    row["median_ms"] = t.median_ms
    row["achieved_bytes_per_s"] = row["nominal_bytes"] / (t.median_ms / 1e3)


def _error(e: Exception) -> str:
    return f"{type(e).__name__}: {e}"[:500]


def run_one(case: Case, provider: str, modes: list, x: torch.Tensor, config: Config, bar=None, timers=None) -> list:
    """Rows of one provider on one problem. ``timers`` (a dict), when given, receives
    id(row) -> (row, timed callable, Timing) so that later rounds can add samples."""
    device = torch.device(config.device)
    rows = []
    base = dict(provider=provider, family=PROVIDERS[provider].family, B=case.B, C=case.C, H=case.H, W=case.W,
                K=case.K, dtype=dtype_name(case.dtype), x_bytes=case.x_bytes)
    compile_s = None
    try:
        built = PROVIDERS[provider].build(case, compile_backend=config.compile_backend)
        # first call: compile (torch.compile) / autotune / lazy init, forward and backward
        t0 = time.perf_counter()
        out = built.fn(x)
        torch.autograd.grad(out[0], [x] + list(built.params), _upstream_grad(out[0]))
        _sync(device)
        del out
        first_s = time.perf_counter() - t0
        if provider == "compiled":
            compile_s = first_s
    except Exception as e:  # noqa: BLE001 - one broken provider must not sink the run
        for m in modes:
            rows.append({**base, "mode": m, "status": "error", "error": _error(e)})
            if bar is not None:
                bar.update(1)
        return rows
    for mode in modes:
        row = {**base, "mode": mode, "nominal_bytes": nominal_bytes(case, mode), "info": built.info}
        if compile_s is not None:
            row["compile_s"] = compile_s
        try:
            f = _mode_callable(built, x, mode)
            t = _time(f, device, config, config.budget_s / config.rounds)
            _set_timing(row, t)
            if config.measure_memory:
                row["peak_bytes"] = timing.peak_memory(f, device)
            row["status"] = "ok"
            if timers is not None:
                timers[id(row)] = (row, f, t)
            del f
        except Exception as e:  # noqa: BLE001
            row["status"] = "error"
            row["error"] = _error(e)
        rows.append(row)
        if bar is not None:
            bar.update(1)
    return rows


def _progress_bar(config: Config, total: int):
    if not config.progress:
        return None
    try:
        from tqdm import tqdm
    except ImportError:
        return None
    return tqdm(total=total, desc=f"bench {config.preset}", unit="row", file=sys.stderr)


def _more_rounds(config: Config, timers: dict, device) -> None:
    """Every row once per later round, in plan order, so that a burst of load on a shared
    machine hits all providers alike; each row's statistics pool the samples of all rounds."""
    for _ in range(1, config.rounds):
        for key, (row, f, t) in list(timers.items()):
            try:
                extra = _time(f, device, config, config.budget_s / config.rounds)
            except Exception as e:  # noqa: BLE001
                row["status"], row["error"] = "error", _error(e)
                timers.pop(key)
                continue
            t = timing.from_samples(t.samples + extra.samples, t.method)
            timers[key] = (row, f, t)
            _set_timing(row, t)
    for row, _f, _t in timers.values():
        row["timing"]["rounds"] = config.rounds
    timers.clear()


def measure(config: Config) -> dict:
    """Run ``config`` and return the result record (nothing written)."""
    start = time.perf_counter()
    device = torch.device(config.device)
    load_start = loadavg()
    names = list(dict.fromkeys(p for g in config.groups for p in g.providers))
    avail = availability(names, device)
    providers_ok = {n for n, reason in avail.items() if reason is None}
    for n, reason in avail.items():
        if reason is not None:
            print(f"[bench] skipping {n}: {reason}", file=sys.stderr)
    copy_bw = timing.copy_bandwidth(device, config.copy_bytes, budget_s=min(0.5, max(config.budget_s, 0.05)))
    plan = expand(config, providers_ok)
    bar = _progress_bar(config, sum(len(m) for _, _, m in plan))
    rows, current, x = [], None, None
    timers = {} if config.rounds > 1 else None
    for case, provider, modes in plan:
        if case != current:
            x = None
            gc.collect()
            gc.freeze()  # later collections skip the (large) import-time heap
            if device.type == "cuda":
                torch.cuda.empty_cache()
            x = case.make_input()
            current = case
        if bar is not None:
            bar.set_postfix_str(f"{provider} {case.B}x{case.C}x{case.H}x{case.W} K={case.K} {dtype_name(case.dtype)}")
        rows.extend(run_one(case, provider, modes, x, config, bar, timers))
    if bar is not None:
        bar.close()
    if timers is not None:
        _more_rounds(config, timers, device)
    gc.unfreeze()
    analysis.add_ratios(rows)
    result = {
        "schema": SCHEMA,
        "preset": config.preset,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join(["python -m bench.run", *config.argv]),
        "env": environment(config.device),
        "config": {"budget_s": config.budget_s, "rounds": config.rounds, "min_reps": config.min_reps,
                   "compile_backend": config.compile_backend,
                   "input": "relu(randn) NCHW contiguous, requires_grad",
                   "loss": "grad of output[0] (vectors / pooled (B,K,C)) against fixed randn",
                   "modes": {"forward": "training forward (inputs require grad)",
                             "backward": "autograd.grad of a retained graph",
                             "fwd+bwd": "forward then autograd.grad"},
                   "nominal_bytes": "forward (K+1)*|X|, backward 2*|X|, fwd+bwd (K+3)*|X|",
                   "peak_memory": "bytes allocated beyond what exists before the call (input, params, "
                                  "retained graph); CUDA max_memory_allocated, CPU torch.profiler memory events"},
        "copy_bandwidth": copy_bw,
        "providers": {n: {"family": PROVIDERS[n].family, "description": PROVIDERS[n].description,
                          "status": "ok" if avail[n] is None else f"skipped: {avail[n]}"} for n in names},
        "rows": rows,
        "scaling": analysis.scaling_fits(rows),
        "checks": analysis.check_targets(rows),
    }
    if load_start is not None:
        result["loadavg"] = {"start": load_start, "end": loadavg()}
    result["duration_s"] = time.perf_counter() - start
    return result


def run(config: Config) -> dict:
    """Run ``config``, write its JSON, markdown and plot under ``config.out_dir``, and return
    the result record (with ``files``, the paths written)."""
    result = measure(config)
    result["files"] = report.write(result, config)
    return result
