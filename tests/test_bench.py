"""Tests of bench/: every BR-NPA provider agrees with the reference on a tiny shape, the
baseline runs, and the runner writes its JSON/markdown with the documented schema. Fast (< 20 s):
torch.compile is exercised with the "aot_eager" backend (no C++ compile). The library's own
memory test is tests/test_torch_impl_memory.py."""

import json

import pytest
import torch

from bench import run as bench_run
from bench import timing
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
    for got, want, what in zip(out, ref, ("vectors", "maps", "indices", "norms")):
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
    assert timing.peak_memory_cpu(lambda: lib(x)) < case.x_bytes


def test_cpu_peak_memory_probe():
    def f():
        a = torch.empty(1 << 20, dtype=torch.uint8)
        b = torch.empty(2 << 20, dtype=torch.uint8)
        del a
        c = torch.empty(1 << 19, dtype=torch.uint8)  # noqa: F841 - reuses a's room: peak stays 3 MiB
        return b

    assert timing.peak_memory_cpu(f) == 3 << 20


def test_runner_micro_schema(tmp_path):
    result = bench_run.main(["--micro", "--out", str(tmp_path), "--compile-backend", "aot_eager", "--no-plot",
                             "--no-progress"])
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
