"""``python -m bench.gpu``: the GPU benchmark of BR-NPA in one command (guide: bench/README.md).

Per problem (shape, K, dtype, layout), most important first: the one-read floor (a sum over X),
then ours (``brnpa_triton.brnpa``, triton backend), ``torch.compile`` of the authors'-style
eager code and that eager code itself, each as a training forward and as a step (forward +
``torch.autograd.grad`` w.r.t. X), timed as CUDA-graph replays (GPU time) and as back-to-back
eager calls (host cost included), with the per-kernel GPU times of ours and their bandwidth.
Inputs rotate over three copies of X. ``--budget`` seconds bound the run: what would not fit
is skipped and recorded as skipped. Writes ``gpu-<device>.json`` and ``.md``; prints a short
table last. ``--device cpu`` rehearses the same code on CPU (tiny shapes, CPU timers; tests).
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from functools import partial
from pathlib import Path

import torch

from bench import gpu_report, gpu_timers
from bench.gpu_report import PROVIDERS, SCHEMA

DEFAULT_OUT = Path(__file__).resolve().parent / "results"
DEFAULT_BUDGET_S = 330.0
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
LAYOUTS = ("nchw", "channels_last")
# (B, C, H, W, K), most important first: the foundation problem, then the other shapes, then K=8.
GPU_SHAPES = [(8, 2048, 28, 28, 3), (32, 2048, 14, 14, 3), (16, 2048, 56, 56, 3), (64, 512, 28, 28, 3),
              (8, 2048, 28, 28, 8)]
CPU_SHAPES = [(2, 16, 6, 6, 2), (1, 8, 4, 4, 3)]  # --device cpu: the rehearsal's tiny shapes
REGISTRY_NAME = {"eager": "eager", "compile": "compiled"}  # bench.providers names
NO_CUDA = ("bench.gpu: no CUDA device here (torch {torch} reports torch.cuda.is_available() == False; CUDA build: "
           "{cuda}). It times GPU kernels: run it on a machine with an NVIDIA GPU, or rehearse it on CPU with "
           "`python -m bench.gpu --device cpu --quick`.")


@dataclass(frozen=True)
class Problem:
    B: int
    C: int
    H: int
    W: int
    K: int
    dtype: str
    layout: str

    @property
    def label(self) -> str:
        return f"{self.B}x{self.C}x{self.H}x{self.W} K={self.K} {self.dtype} {self.layout}"

    @property
    def x_bytes(self) -> int:
        return self.B * self.C * self.H * self.W * DTYPES[self.dtype].itemsize


@dataclass
class Repeats:
    """How many calls each measurement makes (``calls`` a multiple of the copies rotated over)."""

    calls: int = 12  # per CUDA graph / per back-to-back round
    replays: int = 5
    rounds: int = 5
    profile_reps: int = 5

    def calls_per_problem(self) -> int:
        """Calls of one function (fwd or step) a provider's timings make, warm-ups included."""
        return self.calls * (self.replays + 2) + 2 + self.calls * self.rounds + 1 + self.profile_reps + 1


QUICK_REPEATS = Repeats(calls=6, replays=3, rounds=3, profile_reps=3)


def device_slug(device: str) -> str:
    """"nvidia-h200" for a CUDA device (its name), else the device type ("cpu")."""
    d = torch.device(device)
    return gpu_report.slug(torch.cuda.get_device_name(d)) if d.type == "cuda" else d.type


@dataclass
class Config:
    problems: list
    device: str = "cuda"
    providers: tuple = PROVIDERS
    backend: str = "triton"
    compile_backend: str = "inductor"
    budget_s: float = DEFAULT_BUDGET_S
    out_dir: Path = DEFAULT_OUT
    copies: int = 3
    repeats: Repeats = field(default_factory=Repeats)
    peak_bytes: int = 2 << 30
    argv: list = field(default_factory=list)

    @property
    def device_slug(self) -> str:
        return device_slug(self.device)


def problems(shapes, dtypes, layouts) -> list[Problem]:
    """In priority order: shape by shape (as given), then dtype, then layout."""
    return [Problem(*s, dtype=d, layout=lay) for s in shapes for d in dtypes for lay in layouts]


def quick_problems(device: str) -> list[Problem]:
    shape = CPU_SHAPES[0] if device == "cpu" else GPU_SHAPES[0]
    return [Problem(*shape, "float32", "nchw"), Problem(*shape, "bfloat16", "channels_last")]


# ---- budget --------------------------------------------------------------------------------

class Budget:
    """Seconds left until the deadline; ``fits`` says whether work estimated to take that long does."""

    def __init__(self, seconds: float, clock=time.monotonic):
        self.clock = clock
        self.start = clock()
        self.deadline = self.start + seconds

    def left(self) -> float:
        return self.deadline - self.clock()

    def elapsed(self) -> float:
        return self.clock() - self.start

    def fits(self, estimate_s: float) -> bool:
        return estimate_s <= self.left()


class SetupEstimates:
    """Expected seconds of a provider's first calls on a problem (kernel JIT, torch.compile:
    static shapes compile every problem anew), from the last few problems the run has seen.
    The first observation includes one-time costs (imports, compile workers): an over-estimate
    that shrinks as the run goes on."""

    FIRST = {"ours": 20.0, "compile": 45.0, "eager": 2.0}  # before any observation
    FIRST_OTHER = 20.0  # a provider not listed above
    WINDOW = 3

    def __init__(self):
        self.observed: dict[str, list] = {}

    def estimate(self, provider: str) -> float:
        seen = self.observed.get(provider, [])[-self.WINDOW:]
        return 1.25 * max(seen) if seen else self.FIRST.get(provider, self.FIRST_OTHER)

    def observe(self, provider: str, seconds: float) -> None:
        self.observed.setdefault(provider, []).append(seconds)


# ---- inputs and providers ------------------------------------------------------------------

def make_inputs(p: Problem, device: torch.device, copies: int) -> list[torch.Tensor]:
    """``copies`` different post-ReLU feature maps (B, C, H, W) in the layout, requiring grad."""
    fmt = torch.channels_last if p.layout == "channels_last" else torch.contiguous_format
    out = []
    for i in range(copies):
        g = torch.Generator(device=device).manual_seed(i)
        x = torch.randn(p.B, p.C, p.H, p.W, generator=g, device=device).relu_()
        out.append(x.to(dtype=DTYPES[p.dtype], memory_format=fmt).requires_grad_(True))
    return out


def build_provider(name: str, p: Problem, cfg: Config):
    """(fn(x) -> (vectors, maps, ...), None) or (None, why it cannot run here)."""
    from bench.providers import PROVIDERS as REGISTRY
    from bench.providers import Case

    registry_name = f"brnpa-{cfg.backend}" if name == "ours" else REGISTRY_NAME[name]
    provider = REGISTRY[registry_name]
    reason = provider.available(torch.device(cfg.device))
    if reason:
        return None, reason
    case = Case(p.B, p.C, p.H, p.W, p.K, DTYPES[p.dtype], cfg.device)
    kw = {"compile_backend": cfg.compile_backend} if name == "compile" else {}
    return provider.build(case, **kw).fn, None


def training_calls(fn, gv: torch.Tensor, gm: torch.Tensor):
    """(forward, step) of one input: the training forward, and forward + dL/dX."""

    def forward(x):
        return fn(x)

    def step(x):
        out = fn(x)
        loss = (out[0] * gv).sum() + (out[1] * gm).sum()
        (dx,) = torch.autograd.grad(loss, x)
        return dx

    return forward, step


def planned_bytes(p: Problem, x: torch.Tensor) -> dict[str, int]:
    """Kernel name -> DRAM bytes one launch reads and writes, from ours' launch plans."""
    from brnpa_triton.ops import triton_impl

    B, C, H, W = x.shape
    strides = x.flatten(2).stride()
    plans = (triton_impl.forward_plan(B, C, H * W, p.K, x.dtype, strides)
             + triton_impl.backward_plan(B, C, H * W, p.K, x.dtype, strides))
    return {launch.name.replace(".", "_") + "_kernel": launch.bytes_read + launch.bytes_written for launch in plans}


# ---- one problem ---------------------------------------------------------------------------

def _timed(row: dict, key: str, measure) -> dict | None:
    try:
        return measure()
    except Exception as e:  # noqa: BLE001 - recorded in the row; the run goes on
        row.setdefault("errors", {})[key] = f"{type(e).__name__}: {e}"[:300]
        return None


def _store(row: dict, prefix: str, t: dict | None) -> None:
    row[f"{prefix}_us"] = t["us"] if t else None
    row[f"{prefix}_min_us"] = t["min_us"] if t else None
    row[f"{prefix}_max_us"] = t["max_us"] if t else None


def measure_provider(row: dict, name: str, p: Problem, cfg: Config, budget: Budget, est: SetupEstimates,
                     inputs: list, grads: tuple, peak_bps: float | None) -> None:
    device = torch.device(cfg.device)
    fn, reason = build_provider(name, p, cfg)
    if fn is None:
        row["skipped"][name] = reason
        return
    need = est.estimate(name)
    if not budget.fits(need):
        row["skipped"][name] = f"budget: first calls need ~{need:.0f} s, {max(budget.left(), 0):.0f} s left"
        return
    forward, step = training_calls(fn, *grads)
    start = time.perf_counter()
    try:
        for x in inputs:  # compiles (JIT, torch.compile, autotuning) and warms the allocator
            step(x)
        gpu_timers.synchronize(device)
    except Exception as e:  # noqa: BLE001 - recorded in the row; the run goes on
        row["errors"][name] = f"first calls: {type(e).__name__}: {e}"[:300]
        return
    first_s = time.perf_counter() - start
    est.observe(name, first_s)
    row[f"{name}_first_calls_s"] = first_s
    t0 = time.perf_counter()
    step(inputs[0])
    gpu_timers.synchronize(device)
    per_call = time.perf_counter() - t0
    need = 2 * cfg.repeats.calls_per_problem() * per_call + 1.0
    if not budget.fits(need):
        row["skipped"][name] = f"budget: timings need ~{need:.0f} s, {max(budget.left(), 0):.0f} s left"
        return
    r = cfg.repeats
    for mode, call in (("fwd", forward), ("step", step)):
        rotated = gpu_timers.Rotation(call, inputs)
        t = _timed(row, f"{name}_{mode}", partial(gpu_timers.replay_us, rotated, device, r.calls, r.replays))
        _store(row, f"{name}_{mode}", t)
        t = _timed(row, f"{name}_eager_{mode}", partial(gpu_timers.back_to_back_us, rotated, device, r.calls, r.rounds))
        _store(row, f"{name}_eager_{mode}", t)
        row[f"{name}_host_{mode}_us"] = t["host_us"] if t else None
    if name == "ours":
        row["ours_kernels"] = profile_kernels(row, p, cfg, inputs, {"fwd": forward, "step": step}, peak_bps)


def profile_kernels(row: dict, p: Problem, cfg: Config, inputs: list, calls: dict, peak_bps: float | None) -> dict:
    """mode -> ours' kernels: GPU time per call and, from the launch plans, bytes and bandwidth."""
    device = torch.device(cfg.device)
    sizes = _timed(row, "ours_planned_bytes", partial(planned_bytes, p, inputs[0])) if cfg.backend == "triton" else {}
    kernels = {}
    for mode, call in calls.items():
        rotated = gpu_timers.Rotation(call, inputs)
        found = _timed(row, f"ours_kernels_{mode}", partial(gpu_timers.kernel_times, rotated, device,
                                                            cfg.repeats.profile_reps))
        kernels[mode] = gpu_report.kernel_bandwidth(found or [], sizes or {}, peak_bps)
    return kernels


def measure_problem(p: Problem, cfg: Config, budget: Budget, est: SetupEstimates, peak_bps: float | None) -> dict:
    device = torch.device(cfg.device)
    row = {"shape": [p.B, p.C, p.H, p.W], "K": p.K, "dtype": p.dtype, "layout": p.layout, "device": cfg.device_slug,
           "x_bytes": p.x_bytes, "skipped": {}, "errors": {}}
    for key in gpu_report.ROW_KEYS:
        row.setdefault(key, None)
    inputs = make_inputs(p, device, cfg.copies)
    g = torch.Generator(device=device).manual_seed(123)
    gv = torch.randn(p.B, p.K, p.C, generator=g, device=device).to(DTYPES[p.dtype])
    gm = torch.randn(p.B, p.K, p.H, p.W, generator=g, device=device).to(DTYPES[p.dtype])
    r = cfg.repeats
    t = _timed(row, "floor_one_read", partial(gpu_timers.read_floor_us, inputs, device, r.calls, r.replays))
    _store(row, "floor_one_read", t)
    row.update(gpu_report.floors(row))
    for name in cfg.providers:
        measure_provider(row, name, p, cfg, budget, est, inputs, (gv, gm), peak_bps)
    return row


# ---- the run -------------------------------------------------------------------------------

def _log(budget: Budget, msg: str) -> None:
    print(f"[bench.gpu {budget.elapsed():6.1f}s] {msg}", flush=True)


def _progress(row: dict) -> str:
    def us(key):
        return "-" if row.get(key) is None else f"{row[key]:.1f}"

    notes = "; ".join(f"{k}: {v}" for k, v in {**row["skipped"], **row["errors"]}.items())
    return (f"floor {us('floor_one_read_us')} | ours fwd {us('ours_fwd_us')} step {us('ours_step_us')} eager step "
            f"{us('ours_eager_step_us')} | compile fwd {us('compile_fwd_us')} step {us('compile_step_us')} | eager "
            f"fwd {us('eager_fwd_us')} step {us('eager_step_us')} us{' | ' + notes if notes else ''}")


def run(cfg: Config) -> dict:
    """Measure every problem that fits the budget; write and return the result record."""
    from bench.environment import environment

    budget = Budget(cfg.budget_s)
    device = torch.device(cfg.device)
    env = environment(cfg.device)
    result = {"schema": SCHEMA, "tool": "python -m bench.gpu", "created": datetime.now(timezone.utc).isoformat(),
              "command": ["python", "-m", "bench.gpu", *cfg.argv], "device": cfg.device_slug, "env": env,
              "timer": "cuda-graph replay" if device.type == "cuda" else "CPU perf_counter (rehearsal)",
              "config": {"providers": list(cfg.providers), "backend": cfg.backend,
                         "compile_backend": cfg.compile_backend, "copies": cfg.copies, "repeats": asdict(cfg.repeats)},
              "budget_s": cfg.budget_s, "peak_read": None, "rows": [], "skipped": [], "complete": False}
    _log(budget, f"{env.get('device_name')}: {len(cfg.problems)} problems, providers {', '.join(cfg.providers)}, "
                 f"budget {cfg.budget_s:.0f} s")
    peak = None
    if budget.fits(5.0):
        peak = _timed(result, "peak_read", partial(gpu_timers.peak_read, device, cfg.peak_bytes, cfg.repeats.replays))
        result["peak_read"] = peak
        if peak:
            _log(budget, f"peak read bandwidth {peak['bytes_per_s'] / 1e9:.0f} GB/s")
    peak_bps = peak["bytes_per_s"] if peak else None
    est = SetupEstimates()
    for p in cfg.problems:
        if not budget.fits(3.0):
            result["skipped"].append({"what": p.label, "reason": f"budget: {max(budget.left(), 0):.0f} s left"})
            continue
        try:
            row = measure_problem(p, cfg, budget, est, peak_bps)
        except Exception as e:  # noqa: BLE001 - e.g. out of memory making the inputs: recorded
            result["skipped"].append({"what": p.label, "reason": f"failed: {type(e).__name__}: {e}"[:300]})
            continue
        finally:
            if device.type == "cuda":
                torch.cuda.empty_cache()  # this problem's inputs and graph pools
        result["rows"].append(row)
        result["skipped"] += [{"what": f"{p.label} {k}", "reason": v} for k, v in row["skipped"].items()]
        _log(budget, f"{p.label}: {_progress(row)}")
        result["duration_s"] = budget.elapsed()
        gpu_report.write(result, cfg.out_dir)  # after every problem: a killed run keeps what it measured
    result["complete"] = True
    result["duration_s"] = budget.elapsed()
    result["files"] = {k: str(v) for k, v in gpu_report.write(result, cfg.out_dir).items()}
    return result


# ---- command line --------------------------------------------------------------------------

def _shape(text: str) -> tuple:
    """"BxCxHxW" or "BxCxHxW:K" (K=3 by default)."""
    dims, _, k = text.strip().partition(":")
    try:
        values = [int(v) for v in dims.lower().split("x")] + [int(k) if k else 3]
    except ValueError:
        values = []
    if len(values) != 5 or min(values) < 1:
        raise argparse.ArgumentTypeError(f"a shape is BxCxHxW or BxCxHxW:K with positive integers; got {text!r}")
    return tuple(values)


def _choices(allowed):
    def parse(text: str) -> tuple:
        values = tuple(v.strip() for v in text.split(",") if v.strip())
        bad = [v for v in values if v not in allowed]
        if bad or not values:
            raise argparse.ArgumentTypeError(f"expected a comma list of {', '.join(allowed)}; got {text!r}")
        return values

    return parse


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m bench.gpu", description=__doc__.splitlines()[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--quick", action="store_true",
                    help="smoke set: the first shape in fp32 NCHW and bf16 channels_last, fewer repeats")
    ap.add_argument("--budget", type=float, default=DEFAULT_BUDGET_S, metavar="SECONDS",
                    help="time for the whole run; what would not fit is skipped and recorded as skipped")
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT, help="folder for gpu-<device>.json and .md")
    ap.add_argument("--device", default="cuda", help="cuda[:i], or cpu: a rehearsal with CPU timers and tiny shapes")
    ap.add_argument("--shapes", type=lambda s: [_shape(v) for v in s.split(",") if v.strip()], default=None,
                    help="comma list of BxCxHxW[:K] (default: the GPU set in bench/README.md; tiny ones on cpu)")
    ap.add_argument("--dtypes", type=_choices(tuple(DTYPES)), default=tuple(DTYPES), help="comma list")
    ap.add_argument("--layouts", type=_choices(LAYOUTS), default=LAYOUTS, help="comma list")
    ap.add_argument("--providers", type=_choices(PROVIDERS), default=PROVIDERS,
                    help="comma list: ours (brnpa_triton.brnpa), compile (torch.compile of the eager code), eager")
    ap.add_argument("--backend", choices=("triton", "torch"), default=None,
                    help="the library backend timed as 'ours' (default: triton; torch with --device cpu)")
    ap.add_argument("--compile-backend", default="inductor", help="torch.compile backend of 'compile'")
    ap.add_argument("--show", type=Path, default=None, metavar="JSON",
                    help="print the table of an earlier run's JSON and exit (measures nothing)")
    return ap.parse_args(argv)


def config_from_args(args: argparse.Namespace, argv=()) -> Config:
    cpu = torch.device(args.device).type == "cpu"
    if args.shapes:
        chosen = problems(args.shapes, args.dtypes, args.layouts)
    elif args.quick:
        chosen = [p for p in quick_problems("cpu" if cpu else "cuda")
                  if p.dtype in args.dtypes and p.layout in args.layouts]
    else:
        chosen = problems(CPU_SHAPES if cpu else GPU_SHAPES, args.dtypes, args.layouts)
    cfg = Config(problems=chosen, device=args.device, providers=args.providers,
                 backend=args.backend or ("torch" if cpu else "triton"), compile_backend=args.compile_backend,
                 budget_s=args.budget, out_dir=args.out, repeats=QUICK_REPEATS if args.quick or cpu else Repeats(),
                 peak_bytes=(64 << 20) if cpu else (2 << 30), argv=list(argv))
    return cfg


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    if args.show:
        import json

        if not args.show.is_file():
            print(f"bench.gpu --show: no such file {args.show}", file=sys.stderr)
            return 2
        print(gpu_report.render_table(json.loads(args.show.read_text())))
        return 0
    if torch.device(args.device).type == "cuda" and not torch.cuda.is_available():
        print(NO_CUDA.format(torch=torch.__version__, cuda=torch.version.cuda), file=sys.stderr)
        return 2
    cfg = config_from_args(args, argv)
    result = run(cfg)
    print("[bench.gpu] wrote " + ", ".join(result["files"].values()))
    print(gpu_report.render_table(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
