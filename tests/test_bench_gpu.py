"""``python -m bench.gpu`` without a GPU: its plan, budget, timers' CPU path, JSON schema and
reports (run end to end on CPU tensors at tiny shapes), its refusal without CUDA, and the
logic of scripts/gpu_check.sh (with a stand-in python)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from bench import gpu, gpu_report, gpu_timers

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--device", "cpu", "--shapes", "1x8x4x4:2", "--compile-backend", "aot_eager"]


def _measured(row: dict, provider: str) -> list[str]:
    return [k for k in gpu_report.measured_keys(provider) if "host" not in k]


# ---- arguments and plan ----------------------------------------------------------------------

def test_every_option_has_a_help_text_and_the_defaults_are_the_gpu_run():
    args = gpu.parse_args([])
    assert args.budget == gpu.DEFAULT_BUDGET_S == 330 and args.out == ROOT / "bench" / "results"
    assert args.providers == ("ours", "compile", "eager") and args.device == "cuda"
    parser_help = subprocess.run([sys.executable, "-m", "bench.gpu", "--help"], capture_output=True, text=True,
                                 cwd=ROOT, timeout=120).stdout
    for option in ("--quick", "--budget", "--out", "--device", "--shapes", "--dtypes", "--layouts", "--providers",
                   "--backend", "--compile-backend", "--show"):
        assert option in parser_help
    assert parser_help.count("(default:") >= 9, parser_help


@pytest.mark.parametrize("argv, message", [
    (["--shapes", "8x2048x28"], "BxCxHxW"),
    (["--shapes", "8x2048x28x28:0"], "positive"),
    (["--dtypes", "float16"], "float32, bfloat16"),
    (["--layouts", "tokens"], "nchw, channels_last"),
    (["--providers", "ours,reference"], "ours, compile, eager"),
])
def test_bad_arguments_say_what_was_expected(argv, message, capsys):
    with pytest.raises(SystemExit) as e:
        gpu.parse_args(argv)
    assert e.value.code == 2
    assert message in capsys.readouterr().err


def test_the_gpu_plan_puts_the_foundation_problem_first_and_covers_every_case():
    cfg = gpu.config_from_args(gpu.parse_args([]))
    labels = [p.label for p in cfg.problems]
    assert len(labels) == len(set(labels)) == 5 * 2 * 2
    assert labels[:4] == ["8x2048x28x28 K=3 float32 nchw", "8x2048x28x28 K=3 float32 channels_last",
                          "8x2048x28x28 K=3 bfloat16 nchw", "8x2048x28x28 K=3 bfloat16 channels_last"]
    shapes = {(p.B, p.C, p.H, p.W, p.K) for p in cfg.problems}
    assert shapes == {(8, 2048, 28, 28, 3), (32, 2048, 14, 14, 3), (16, 2048, 56, 56, 3), (64, 512, 28, 28, 3),
                      (8, 2048, 28, 28, 8)}
    assert all(p.K == 8 for p in cfg.problems[-4:])
    assert cfg.backend == "triton" and cfg.repeats.calls % cfg.copies == 0
    quick = gpu.config_from_args(gpu.parse_args(["--quick"]))
    assert [p.label for p in quick.problems] == ["8x2048x28x28 K=3 float32 nchw",
                                                 "8x2048x28x28 K=3 bfloat16 channels_last"]
    assert quick.repeats.calls < cfg.repeats.calls


def test_budget_and_setup_estimates():
    now = [100.0]
    budget = gpu.Budget(10, clock=lambda: now[0])
    assert budget.fits(10) and not budget.fits(10.5)
    now[0] = 107.0
    assert budget.left() == pytest.approx(3) and budget.elapsed() == pytest.approx(7) and not budget.fits(4)
    est = gpu.SetupEstimates()
    assert est.estimate("compile") == est.FIRST["compile"]
    for seconds in (30.0, 8.0, 6.0, 7.0):
        est.observe("compile", seconds)
    assert est.estimate("compile") == pytest.approx(1.25 * 8.0)  # the last three only


def test_rotation_reads_a_different_copy_each_call():
    copies = [torch.full((2,), float(i)) for i in range(3)]
    rotated = gpu_timers.Rotation(lambda x: float(x[0]), copies)
    assert [rotated() for _ in range(7)] == [0, 1, 2, 0, 1, 2, 0]


def test_the_cuda_paths_delegate_to_the_graph_timer_and_read_device_time(monkeypatch):
    cuda = torch.device("cuda")
    seen = []
    monkeypatch.setattr(gpu_timers, "time_cuda_graph",
                        lambda fn, calls, replays: seen.append((fn, calls, replays)) or (2.0, 1.0, 3.0))
    t = gpu_timers.replay_us(print, cuda, calls=12, replays=5)
    assert seen == [(print, 12, 5)]
    assert t == {"us": 2.0, "min_us": 1.0, "max_us": 3.0, "samples": 5, "timer": "cuda-graph"}

    class Event:  # a profiler average: device_time_total since torch 2.4, cuda_time_total before
        def __init__(self, **times):
            self.__dict__.update(times)

    assert gpu_timers._event_time_us(Event(device_time_total=7.0, cuda_time_total=1.0), cuda) == 7.0
    assert gpu_timers._event_time_us(Event(cuda_time_total=5.0), cuda) == 5.0
    assert gpu_timers._event_time_us(Event(self_cpu_time_total=3.0), torch.device("cpu")) == 3.0


def test_floors_and_kernel_bandwidth():
    row = {"K": 3, "x_bytes": 4_000_000, "floor_one_read_us": 2.0}
    f = gpu_report.floors(row)
    assert f == {"floor_fwd_us": 8.0, "floor_step_us": 12.0, "floor_one_read_GBps": pytest.approx(2000.0)}
    assert gpu_report.floors({"K": 3, "x_bytes": 1, "floor_one_read_us": None}) == {}
    kernels = [{"name": "forward_part_kernel", "launches": 3.0, "us": 30.0}, {"name": "other", "launches": 1, "us": 5}]
    out = gpu_report.kernel_bandwidth(kernels, {"forward_part_kernel": 1_000_000}, peak_bytes_per_s=2e11)
    assert out[0]["bytes"] == 3_000_000 and out[0]["GBps"] == pytest.approx(100.0)
    assert out[0]["pct_peak"] == pytest.approx(50.0)
    assert "GBps" not in out[1]


def test_planned_bytes_name_the_profiled_kernels():
    p = gpu.Problem(2, 64, 7, 7, 3, "float32", "channels_last")
    x = gpu.make_inputs(p, torch.device("cpu"), 1)[0]
    sizes = gpu.planned_bytes(p, x)
    assert set(sizes) == {"forward_norms_kernel", "forward_part_kernel", "forward_final_kernel",
                          "backward_dx_kernel", "backward_seeds_kernel"}
    assert sizes["forward_norms_kernel"] >= p.x_bytes and sizes["backward_dx_kernel"] >= 2 * p.x_bytes


# ---- end to end on CPU -----------------------------------------------------------------------

def _check_result(result: dict, out: Path, providers=("ours", "compile", "eager")):
    assert result["schema"] == gpu_report.SCHEMA and result["device"] == "cpu" and result["complete"]
    on_disk = json.loads((out / "gpu-cpu.json").read_text())
    assert on_disk["rows"] == json.loads(json.dumps(result["rows"]))
    for row in on_disk["rows"]:
        assert set(gpu_report.ROW_KEYS) <= set(row)
        assert row["device"] == "cpu" and len(row["shape"]) == 4 and not row["errors"], row["errors"]
        keys = ["floor_one_read_us", "floor_fwd_us", "floor_step_us"]
        keys += [k for prov in providers for k in _measured(row, prov)]
        for k in keys:
            assert isinstance(row[k], float) and math.isfinite(row[k]) and row[k] > 0, (k, row[k])
            if k.endswith("_us") and not k.endswith(("min_us", "max_us")) and f"{k[:-3]}_min_us" in row:
                assert row[f"{k[:-3]}_min_us"] <= row[k] <= row[f"{k[:-3]}_max_us"]
        if "ours" in providers:
            assert row["ours_kernels"]["fwd"] and row["ours_kernels"]["step"]
    md = (out / "gpu-cpu.md").read_text()
    assert md.startswith(gpu_report.GENERATED_MARK) and "| 1x8x4x4 K=2 | float32 | channels_last |" in md


def test_end_to_end_on_cpu_writes_the_json_and_prints_the_table_last(tmp_path, capsys):
    argv = [*TINY, "--dtypes", "float32", "--layouts", "channels_last", "--out", str(tmp_path)]
    assert gpu.main(argv) == 0
    printed = capsys.readouterr().out.strip().splitlines()
    assert printed[-3].startswith("== bench.gpu on") and printed[-1].startswith("1x8x4x4 K=2")
    result = json.loads((tmp_path / "gpu-cpu.json").read_text())
    assert [(r["shape"], r["K"], r["dtype"], r["layout"]) for r in result["rows"]] == [
        ([1, 8, 4, 4], 2, "float32", "channels_last")]
    _check_result(result, tmp_path)
    assert result["rows"][0]["compile_first_calls_s"] > 0 and result["peak_read"]["bytes_per_s"] > 0
    shown = subprocess.run([sys.executable, "-m", "bench.gpu", "--show", str(tmp_path / "gpu-cpu.json")],
                           capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert shown.returncode == 0 and shown.stdout.strip().splitlines()[-1] == printed[-1]


def test_ours_is_skipped_with_the_reason_where_the_triton_backend_cannot_run(monkeypatch):
    monkeypatch.setattr("brnpa_triton.dispatch.TRITON_INTERPRETER", False)  # a CPU without the interpreter
    cfg = gpu.Config([], device="cpu", providers=("ours",), backend="triton", repeats=gpu.QUICK_REPEATS)
    row = gpu.measure_problem(gpu.Problem(1, 8, 4, 4, 2, "float32", "nchw"), cfg, gpu.Budget(60), gpu.SetupEstimates(),
                              None)
    assert "backend 'triton' not available on cpu" in row["skipped"]["ours"] and row["ours_fwd_us"] is None
    assert row["floor_one_read_us"] > 0


def test_what_does_not_fit_the_budget_is_recorded_as_skipped(tmp_path):
    cfg = gpu.config_from_args(gpu.parse_args([*TINY, "--budget", "0", "--out", str(tmp_path)]))
    result = gpu.run(cfg)
    assert result["rows"] == [] and result["peak_read"] is None
    assert [s["what"] for s in result["skipped"]] == [p.label for p in cfg.problems]
    assert all(s["reason"].startswith("budget") for s in result["skipped"])
    assert "## Skipped" in (tmp_path / "gpu-cpu.md").read_text()
    # A provider whose first calls do not fit: skipped, the rest of the problem still measured.
    est = gpu.SetupEstimates()
    est.observe("compile", 1e6)
    row = gpu.measure_problem(cfg.problems[0], gpu.Config(cfg.problems, device="cpu", providers=("compile", "eager"),
                                                            compile_backend="aot_eager", repeats=gpu.QUICK_REPEATS),
                              gpu.Budget(60), est, None)
    assert row["skipped"]["compile"].startswith("budget: first calls need") and row["compile_fwd_us"] is None
    assert row["eager_fwd_us"] > 0


def test_a_hand_written_markdown_of_the_same_name_is_kept(tmp_path):
    result = {"device": "cpu", "env": {}, "created": "now", "budget_s": 1, "timer": "t", "rows": [],
              "config": {"copies": 3}, "skipped": []}
    (tmp_path / "gpu-cpu.md").write_text("# notes by hand\n")
    paths = gpu_report.write(result, tmp_path)
    assert (tmp_path / "gpu-cpu.md").read_text() == "# notes by hand\n"
    assert paths["md"].name == "gpu-cpu-bench.md" and paths["md"].read_text().startswith(gpu_report.GENERATED_MARK)
    gpu_report.write(result, tmp_path / "fresh")
    assert (tmp_path / "fresh" / "gpu-cpu.md").read_text().startswith(gpu_report.GENERATED_MARK)


def test_without_cuda_it_exits_with_a_message_not_a_traceback():
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    result = subprocess.run([sys.executable, "-m", "bench.gpu", "--quick"], capture_output=True, text=True,
                            cwd=ROOT, env=env, timeout=120)
    assert result.returncode == 2
    assert "no CUDA device" in result.stderr and "--device cpu" in result.stderr
    assert "Traceback" not in result.stderr + result.stdout


# ---- scripts/gpu_check.sh ----------------------------------------------------------------------

STAND_IN = """#!/usr/bin/env bash
# Stands in for python on a GPU machine: records its arguments, answers the CUDA probe, plays
# a passing pytest, and runs the real bench.gpu on CPU (budget 0: nothing measured) and --show.
echo "$*" >> "$CALLS"
case "$1 $2" in
  "-c "*) exit 0 ;;
  "-m pytest") echo "7 passed in 1.00s"; exit 0 ;;
  "-m bench.gpu") shift 2
    if [ "$1" = --show ]; then exec "$REAL" -m bench.gpu "$@"; fi
    exec "$REAL" -m bench.gpu --device cpu --shapes 1x8x4x4:2 "$@" --budget 0 ;;
esac
exit 99
"""


def test_gpu_check_sh_runs_gpu_tests_first_then_the_bench_in_the_time_left(tmp_path):
    stand_in = tmp_path / "python"
    stand_in.write_text(STAND_IN)
    stand_in.chmod(0o755)
    calls = tmp_path / "calls.txt"
    env = {**os.environ, "PYTHON": str(stand_in), "REAL": sys.executable, "CALLS": str(calls),
           "OUT": str(tmp_path / "out"), "GPU_CHECK_TOTAL_S": "300"}
    result = subprocess.run(["bash", str(ROOT / "scripts" / "gpu_check.sh")], capture_output=True, text=True,
                            cwd=tmp_path, env=env, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    pytest_call, bench_call, torch_call = (line.split() for line in calls.read_text().splitlines()[1:4])
    files = [a for a in pytest_call if a.startswith("tests/")]
    assert not {"tests/test_bench_kernels.py", "tests/test_bench_gpu.py"} & set(files)
    assert "tests/test_triton_kernels.py" in files and "tests/test_api_views.py" in files
    cuda_files = [f for f in files if "cuda" in (ROOT / f).read_text().lower()]
    assert files[:len(cuda_files)] == cuda_files  # the GPU files first
    budget = int(bench_call[bench_call.index("--budget") + 1])
    assert 150 <= budget <= 300 - 40 - 60 and bench_call[bench_call.index("--out") + 1] == str(tmp_path / "out")
    # then the torch backend on CUDA against the uncompiled eager code, in its own folder
    assert torch_call[torch_call.index("--backend") + 1] == "torch" and "--quick" in torch_call
    assert torch_call[torch_call.index("--providers") + 1] == "ours,eager"
    assert torch_call[torch_call.index("--out") + 1] == str(tmp_path / "out" / "torch-backend")
    assert (tmp_path / "out" / "torch-backend" / "gpu-cpu.json").exists()
    lines = result.stdout.strip().splitlines()
    summary = next(i for i, line in enumerate(lines) if line.startswith("== gpu_check: pytest rc"))
    assert "pytest rc 0: 7 passed in 1.00s; bench.gpu rc 0; torch backend rc 0" in lines[summary]
    assert lines[summary + 1].startswith("== bench.gpu on")
    assert lines[-1] == "skipped: 4 (see the .md)"  # 2 dtypes x 2 layouts
    assert (tmp_path / "out" / "gpu_check-pytest.log").exists() and (tmp_path / "out" / "gpu-cpu.json").exists()
