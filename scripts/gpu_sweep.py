#!/usr/bin/env python
"""Launch-plan sweep of the fused kernels on a GPU: which chunking and warps per program fill it.

    python scripts/gpu_sweep.py        # writes $OUT/gpu_sweep.json, prints a table last

For each plan variant (programs per SM, warps per program and the matching tile sizes), checks
the forward and backward against the float64 PyTorch path at a small odd shape, then times the
forward and the backward replayed from CUDA graphs (GPU time, no launch overhead) at the
benchmark shapes. Also profiles the host side of one eager forward and backward (cProfile).
"""

from __future__ import annotations

import cProfile
import io
import json
import os
import pstats
import sys
import time
from pathlib import Path

os.environ.setdefault("TRITON_INTERPRET", "0")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from bench.timing import time_cuda_graph  # noqa: E402
from brnpa_triton import testing  # noqa: E402
from brnpa_triton.ops import torch_impl  # noqa: E402
from brnpa_triton.ops import triton_impl as ti  # noqa: E402

NCHW, CL = ti.N_CONTIGUOUS, ti.C_CONTIGUOUS
T = ti.Tiling
K = 3
CURRENT = (dict(ti._FORWARD_TILES), dict(ti._BACKWARD_TILES))
# The launch plans before this sweep: one-warp programs, 16 per SM.
ONE_WARP = ({(NCHW, 4): T(16, 16, 1, 16), (NCHW, 2): T(16, 16, 1, 16), (CL, 4): T(128, 8, 1, 16),
             (CL, 2): T(256, 4, 1, 16)},
            {(NCHW, 4): T(16, 16, 1, 16), (NCHW, 2): T(16, 16, 1, 16), (CL, 4): T(128, 2, 1, 16),
             (CL, 2): T(256, 1, 1, 16)})
# Four-warp programs: NCHW tiles four times as many channels high (the reduction over C crosses
# warps once per chunk), channels_last tiles four times as many positions wide.
FOUR_WARPS = ({(NCHW, 4): T(64, 16, 4, 16), (NCHW, 2): T(64, 16, 4, 16), (CL, 4): T(128, 32, 4, 16),
               (CL, 2): T(256, 16, 4, 16)},
              {(NCHW, 4): T(64, 16, 4, 16), (NCHW, 2): T(64, 16, 4, 16), (CL, 4): T(128, 8, 4, 16),
               (CL, 2): T(256, 4, 4, 16)})


def programs(variant, per_sm):
    return tuple({key: t._replace(programs_per_sm=per_sm) for key, t in table.items()} for table in variant)


VARIANTS = {
    "current": ({}, {}),
    "one-warp": ONE_WARP,
    "four-warp": FOUR_WARPS,
    "four-warp-P4": programs(FOUR_WARPS, 4),
    "one-warp-P8": programs(ONE_WARP, 8),
    "one-warp-P4": programs(ONE_WARP, 4),
}


def apply(variant):
    for table, current, override in zip((ti._FORWARD_TILES, ti._BACKWARD_TILES), CURRENT, variant, strict=True):
        table.clear()
        table.update(current)
        table.update(override)
    ti.clear_plan_caches()


DEVICE = "cuda"


def make(B, C, H, W, dtype, layout, seed=0):
    return testing.view_in_layout(testing.random_values(B, C, H * W, seed=seed).to(dtype), layout, device=DEVICE)


def check(dtype, layout):
    """Scaled error / tolerance of forward and backward at an odd shape with several chunks."""
    x = make(3, 200, 9, 13, dtype, layout, seed=1)
    out = ti.forward(x, K, True)
    ref = torch_impl.forward(x.double(), K, True, out.indices)
    gv, gm, gn = testing.random_grads(x, K, seed=2)
    dx = ti.backward(x, gv, gm, None, gn, out.saved(), True)
    dx_ref = torch_impl.backward(x.double(), gv.double(), gm.double(), None, gn.double(), ref.saved(), True)
    cond = testing.conditioning(ref.maps)
    tol = testing.SCALED_TOLERANCE[dtype] * cond
    e_f = max(testing.scaled_error(getattr(out, n), getattr(ref, n)) for n in ("vectors", "maps", "inv_sums"))
    e_b = testing.scaled_error(dx, dx_ref)
    greedy = testing.greedy_seed_error(x, out.indices, 1e-4) is None
    return dict(fwd=e_f / tol, bwd=e_b / (tol * cond), greedy=greedy, ok=greedy and e_f <= tol and e_b <= tol * cond)


def host_profile():
    x = make(8, 2048, 28, 28, torch.float32, "nchw")
    out = ti.forward(x, K, True)
    gv, gm, gn = testing.random_grads(x, K, seed=2)
    saved = out.saved()
    ti.backward(x, gv, gm, None, gn, saved, True)  # compiled before the profile starts
    torch.cuda.synchronize()
    prof = cProfile.Profile()
    t = time.perf_counter()
    prof.enable()
    for _ in range(100):
        ti.forward(x, K, True)
        ti.backward(x, gv, gm, None, gn, saved, True)
        torch.cuda.synchronize()
    prof.disable()
    wall = (time.perf_counter() - t) / 100 * 1e6
    s = io.StringIO()
    pstats.Stats(prof, stream=s).sort_stats("tottime").print_stats(22)
    return wall, s.getvalue()


def main():
    out_dir = Path(os.environ.get("OUT", ROOT / "bench" / "results"))
    t0 = time.time()
    wall, report = host_profile()
    print(f"host profile: fwd+bwd+sync {wall:.0f} us per step (under cProfile)\n{report[:6000]}", flush=True)
    shapes = [(8, 2048, 28, 28), (32, 2048, 14, 14), (16, 2048, 56, 56)]
    cases = [(s, torch.float32, lay) for s in shapes for lay in ("nchw", "channels_last")]
    cases += [(shapes[0], torch.bfloat16, lay) for lay in ("nchw", "channels_last")]
    rows = []
    for name, v in VARIANTS.items():
        apply(v)
        checks = {}
        for dtype in (torch.float32, torch.bfloat16):
            for lay in ("nchw", "channels_last"):
                try:
                    checks[f"{str(dtype)[6:]}-{lay}"] = check(dtype, lay)
                except Exception as e:  # noqa: BLE001 -- reported, the sweep goes on
                    checks[f"{str(dtype)[6:]}-{lay}"] = dict(ok=False, error=f"{type(e).__name__}: {e}"[:300])
        print(f"[{time.time() - t0:5.0f}s] {name}: checks {json.dumps(checks)}", flush=True)
        for (B, C, H, W), dtype, lay in cases:
            if time.time() - t0 > 300:
                print("time budget spent", flush=True)
                break
            row = dict(variant=name, shape=f"{B}x{C}x{H}x{W}", dtype=str(dtype)[6:], layout=lay,
                       checks_ok=all(c.get("ok") for c in checks.values()))
            try:
                x = make(B, C, H, W, dtype, lay)
                out = ti.forward(x, K, True)
                gv, gm, gn = testing.random_grads(x, K, seed=2)
                saved = out.saved()
                row["S"] = ti.forward_plan(B, C, H * W, K, dtype, x.stride())[0].grid[1]
                row["fwd_us"] = time_cuda_graph(lambda x=x: ti.forward(x, K, True))
                row["bwd_us"] = time_cuda_graph(lambda x=x, gv=gv, gm=gm, gn=gn, saved=saved:
                                         ti.backward(x, gv, gm, None, gn, saved, True))
            except Exception as e:  # noqa: BLE001 -- reported, the sweep goes on
                row["error"] = f"{type(e).__name__}: {e}"[:300]
            rows.append(row)
            print(json.dumps(row), flush=True)
            torch.cuda.empty_cache()
    env = dict(device=torch.cuda.get_device_name(), torch=torch.__version__, triton=__import__("triton").__version__)
    (out_dir / "gpu_sweep.json").write_text(json.dumps(dict(environment=env, host_profile_us=wall,
                                                            host_profile=report, rows=rows), indent=1))
    print(f"\n== gpu_sweep on {env} (graph replay, median us) ==")
    print(f"{'variant':8} {'shape':16} {'dtype':8} {'layout':13} {'S':>4} {'fwd':>8} {'bwd':>8} checks")
    for r in rows:
        f, b = r.get("fwd_us", [float("nan")])[0], r.get("bwd_us", [float("nan")])[0]
        print(f"{r['variant']:8} {r['shape']:16} {r['dtype']:8} {r['layout']:13} {r.get('S', 0):4d} {f:8.1f} {b:8.1f} "
              f"{'ok' if r['checks_ok'] else 'FAIL'} {r.get('error', '')}")


if __name__ == "__main__":
    main()
