"""Tests of bench/: every BR-NPA provider agrees with the reference on a tiny shape, the
baseline runs, the runner writes its JSON/markdown with the documented schema to a scratch
folder unless ``--out`` names one, and the markdown and the plot carry the p20-p80 spread and
the busy-machine warning. Fast (< 20 s): torch.compile is exercised with the "aot_eager"
backend (no C++ compile). The library's own memory test is tests/test_torch_impl_memory.py."""

import json
from pathlib import Path

import pytest
import torch

from bench import cli, host, report, timing
from bench import run as bench_run
from bench.analysis import add_ratios
from bench.presets import RESULTS_DIR, SCRATCH_DIR
from bench.providers import PROVIDERS, Case, availability, brnpa_eager

CASE = Case(2, 6, 4, 5, 3, torch.float64)
BRNPA = [n for n, p in PROVIDERS.items() if p.family == "brnpa" and n != "reference"]


def _outputs_and_grad(name, case, x):
    built = PROVIDERS[name].build(case, compile_backend="aot_eager")
    out = built.fn(x)
    g = torch.linspace(-1, 1, out[0].numel(), dtype=out[0].dtype).reshape(out[0].shape)
    (gx,) = torch.autograd.grad(out[0], x, g)
    return out, gx


@pytest.mark.parametrize("name", BRNPA)
def test_provider_matches_reference(name):
    reason = availability([name], "cpu")[name]
    if reason is not None:
        pytest.skip(reason)
    x = CASE.make_input(seed=3)
    ref, gref = _outputs_and_grad("reference", CASE, x)
    out, gx = _outputs_and_grad(name, CASE, x)
    for got, want, what in zip(out, ref, ("vectors", "maps", "indices", "norms"), strict=True):
        assert got.shape == want.shape, what
        torch.testing.assert_close(got, want, rtol=1e-7, atol=1e-9, msg=f"{name}: {what}")
    torch.testing.assert_close(gx, gref, rtol=1e-6, atol=1e-9, msg=f"{name}: grad")


@pytest.mark.parametrize("name", ["bap-wsdan", "bap-bcnn"])
def test_baseline_runs(name):
    x = CASE.make_input(seed=3)
    built = PROVIDERS[name].build(CASE)
    pooled = built.fn(x)[0]
    assert pooled.shape == (CASE.B, CASE.K, CASE.C)
    (gx, *gp) = torch.autograd.grad(pooled.sum(), [x] + built.params)
    assert torch.isfinite(gx).all() and all(torch.isfinite(g).all() for g in gp)
    if name == "bap-wsdan":  # L2-normalised (B, M*C)
        torch.testing.assert_close(pooled.flatten(1).norm(dim=1), torch.ones(CASE.B, dtype=CASE.dtype))


def test_eager_materialises_bnc_products():
    """The authors' cost model: one (B, N, C) temporary per product, K parts."""
    case = Case(2, 256, 8, 8, 3)
    x = case.make_input()
    peak = timing.peak_memory_cpu(lambda: brnpa_eager(x, case.K))
    assert peak >= case.x_bytes
    lib = PROVIDERS["brnpa-torch"].build(case).fn
    lib(x)  # the first call per problem size also checks the BLAS once (blas_ties), on x's size
    assert timing.peak_memory_cpu(lambda: lib(x)) < case.x_bytes


def test_cpu_peak_memory_probe():
    def f():
        a = torch.empty(1 << 20, dtype=torch.uint8)
        b = torch.empty(2 << 20, dtype=torch.uint8)
        del a
        c = torch.empty(1 << 19, dtype=torch.uint8)  # noqa: F841 - reuses a's room: peak stays 3 MiB
        return b

    assert timing.peak_memory_cpu(f) == 3 << 20


def _snapshot(folder):
    return {p.name: p.stat().st_mtime_ns for p in folder.iterdir()} if folder.exists() else {}


def test_out_defaults_to_a_scratch_folder():
    assert cli.parse_args([]).out == SCRATCH_DIR
    assert RESULTS_DIR not in (SCRATCH_DIR, *SCRATCH_DIR.parents)
    assert cli.config_from_args(cli.parse_args(["--micro"])).out_dir == SCRATCH_DIR
    assert cli.config_from_args(cli.parse_args(["--micro", "--out", "x/y"])).out_dir == Path("x/y")


def test_runner_micro_schema(tmp_path, monkeypatch, capfd):
    """Without --out the run writes to the scratch folder (here a temporary one) and leaves the
    committed results alone; the profiler's log lines do not reach the terminal."""
    monkeypatch.setattr(cli, "SCRATCH_DIR", tmp_path)
    committed = _snapshot(RESULTS_DIR)
    result = bench_run.main(["--micro", "--compile-backend", "aot_eager", "--no-plot", "--no-progress"])
    assert _snapshot(RESULTS_DIR) == committed
    captured = capfd.readouterr()
    assert "profiler_start" not in captured.err + captured.out
    files = {p.name for p in tmp_path.iterdir()}
    assert {"cpu-micro.json", "cpu-micro.md"} <= files
    data = json.loads((tmp_path / "cpu-micro.json").read_text())
    assert data["schema"] == bench_run.SCHEMA and data["preset"] == "micro"
    for key in ("device", "device_name", "torch", "triton", "git_commit", "torch_threads"):
        assert key in data["env"]
    assert data["copy_bandwidth"]["bytes_per_s"] > 0
    rows = data["rows"]
    assert {r["mode"] for r in rows} == set(bench_run.MODES)
    want = {"brnpa-torch", "eager", "compiled", "reference", "bap-wsdan"}
    assert want <= {r["provider"] for r in rows}
    for r in rows:
        assert r["status"] == "ok", r
        for key in ("provider", "family", "mode", "B", "C", "H", "W", "K", "dtype", "x_bytes", "nominal_bytes",
                    "median_ms", "timing", "peak_bytes", "achieved_bytes_per_s", "time_vs", "mem_vs"):
            assert key in r, (key, r)
        t = r["timing"]
        assert 0 < t["min_ms"] <= t["median_ms"] and t["p20_ms"] <= t["median_ms"] <= t["p80_ms"]
        assert r["peak_bytes"] >= 0
    assert any(f["variable"] == "HW" for f in data["scaling"])
    md = (tmp_path / "cpu-micro.md").read_text()
    assert "## forward" in md and "## fwd+bwd" in md and "## backward" in md
    assert result["rows"] and result["files"]


def _synthetic_result(busy: bool) -> dict:
    """A result record with two resolutions of one problem and known spreads."""
    rows = []
    for prov, scale in (("brnpa-torch", 1.0), ("eager", 3.0)):
        for hw, (p20, med, p80) in ((14, (1.0, 1.5, 2.5)), (28, (4.0, 5.0, 7.0))):
            t = {"median_ms": med * scale, "p20_ms": p20 * scale, "p80_ms": p80 * scale, "min_ms": p20 * scale,
                 "reps": 5, "method": "perf_counter"}
            rows.append(dict(provider=prov, family="brnpa", mode="forward", B=2, C=8, H=hw, W=hw, K=3,
                             dtype="float32", x_bytes=1 << 20, nominal_bytes=4 << 20, status="ok", timing=t,
                             median_ms=t["median_ms"], achieved_bytes_per_s=1e9, peak_bytes=1 << 20))
    add_ratios(rows)
    load = (3.5, 3.0, 2.0) if busy else (0.1, 0.1, 0.1)
    return {"preset": "test", "created": "now", "duration_s": 1.0, "rows": rows, "scaling": [], "checks": [],
            "env": {"device": "cpu", "device_name": "test CPU", "torch": "x", "triton": None, "torch_threads": 2,
                    "git_commit": None, "git_dirty": False, "cpu_count": 2, "allocator": "default"},
            "loadavg": {"start": load, "end": load}, "config": {"budget_s": 0.1, "rounds": 1},
            "copy_bandwidth": {"bytes_per_s": 1e10},
            "providers": {p: {"family": "brnpa", "status": "ok", "description": p} for p in ("brnpa-torch", "eager")}}


@pytest.mark.parametrize("busy", [True, False])
def test_markdown_and_plot_carry_spread_and_busy_warning(busy):
    result = _synthetic_result(busy)
    md = report.markdown(result)
    assert "p20-p80 ms" in md and "| 4-7 |" in md and "| 12-21 |" in md  # eager's 28x28 spread: 3x (4, 7)
    assert ("machine was busy" in md) == busy
    data = report.plot_data(result)
    assert data["panels"]["forward"]["eager"] == [(196, 4.5, 3.0, 7.5), (784, 15.0, 12.0, 21.0)]
    assert (data["warning"] is not None) == busy
    if busy:
        assert "3.50" in data["warning"]
    pytest.importorskip("matplotlib")
    import matplotlib.pyplot as plt
    from matplotlib.container import ErrorbarContainer

    fig = report.figure(result)
    try:
        (ax,) = fig.axes
        bars = {c.get_label(): c for c in ax.containers if isinstance(c, ErrorbarContainer)}
        assert set(bars) == {"brnpa-torch", "eager"}
        (vertical,) = bars["eager"].lines[2]
        spans = sorted((seg[0][1], seg[1][1]) for seg in vertical.get_segments())
        assert spans == [(3.0, 7.5), (12.0, 21.0)]
        texts = " ".join(t.get_text() for t in fig.texts)
        assert ("busy machine" in texts) == busy
    finally:
        plt.close(fig)


def test_host_benchmark_times_the_launchers_without_launching(tmp_path):
    from brnpa_triton.ops import triton_impl

    run = triton_impl._run
    rows = host.measure(shapes=[(2, 8, 3, 3, 2)], calls=2, repeats=3)
    assert triton_impl._run is run  # the stub is removed again
    assert [r["shape"] for r in rows] == ["2x8x3x3 K=2"]
    for direction in ("forward", "backward"):
        t = rows[0][direction]
        assert 0 < t["min_us"] <= t["median_us"] <= t["max_us"]


def test_cpu_ratio_summarises_and_writes_each_repeat(tmp_path):
    from bench import cpu_ratio

    times = {"brnpa-torch|forward": [10.0, 12.0, 11.0], "compiled|forward": [13.0, 12.0, 14.3],
             "brnpa-torch|fwd+bwd": [20.0, 21.0, 22.0], "compiled|fwd+bwd": [100.0, 80.0, 110.0]}
    result = {"threads": 2, "load_start": "0.10 0.20 0.30", "load_end": "0.40 0.50 0.60", "times": times}
    lines = cpu_ratio.summarise(result)
    # forward ratios 1.3, 1.0, 1.3: median 1.3 meets 1.2; fwd+bwd ratios 5, 3.81, 5: median 5 meets 4
    assert "ratio compiled/torch 1.3 (1-1.3) over 3 repeats (target >= 1.2x: met)" in lines[1]
    assert "(target >= 4.0x: met)" in lines[2]
    cpu_ratio.write(str(tmp_path), [result], ["header", *lines], {"threads": "2", "repeats": 3, "budget": 1.0})
    record = json.loads((tmp_path / "cpu-ratio.json").read_text())
    assert record["results"][0]["times"] == times and record["targets"] == cpu_ratio.TARGETS
    assert lines[1] in (tmp_path / "cpu-ratio.md").read_text()
