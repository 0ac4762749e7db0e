#!/usr/bin/env python
"""Where the time of the fused kernels goes on a GPU: host overhead or kernels.

    python scripts/gpu_profile.py [--budget SECONDS]   # writes $OUT/gpu_profile.json, prints a table last

Per shape, layout and dtype: the latency of one eager call (CUDA events around it, as a
training loop sees it), the CPU time of issuing the call (no synchronisation), the GPU time of
the same call replayed from a CUDA graph (no launch overhead), and the GPU time of each kernel
under the PyTorch profiler. The same for ``torch.compile`` of the authors'-style eager code.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("TRITON_INTERPRET", "0")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from bench.timing import time_cuda_graph  # noqa: E402
from brnpa_triton import testing  # noqa: E402
from brnpa_triton.ops import triton_impl  # noqa: E402

VIEW_OF = {"nchw": "nchw", "channels_last": "channels_last"}


def events_us(fn, reps=50):
    fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) * 1e3)
    times.sort()
    return times[len(times) // 2], times[len(times) // 5], times[4 * len(times) // 5]


def host_us(fn, reps=50):
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        torch.cuda.synchronize()
        t = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t) * 1e6)
    torch.cuda.synchronize()
    times.sort()
    return times[len(times) // 2]


def kernel_us(fn, reps=10):
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(reps):
            fn()
        torch.cuda.synchronize()
    out = {}
    for e in prof.key_averages():
        if e.device_type.name == "CUDA" and e.count:
            total = getattr(e, "device_time_total", None) or getattr(e, "cuda_time_total", 0)
            out[e.key[:60]] = round(total / reps, 2)
    return out


def main():
    budget = float(sys.argv[sys.argv.index("--budget") + 1]) if "--budget" in sys.argv else 200.0
    out_dir = Path(os.environ.get("OUT", ROOT / "bench" / "results"))
    from bench.providers import brnpa_eager  # authors'-style eager; compiled below

    rows = []
    cases = [(8, 2048, 28, 28, 3), (32, 2048, 14, 14, 3), (16, 2048, 56, 56, 3), (16, 2048, 28, 28, 3)]
    t0 = time.time()
    compiled = torch.compile(brnpa_eager, dynamic=False)
    for B, C, H, W, K in cases:
        for dtype in (torch.float32, torch.bfloat16):
            for layout in ("nchw", "channels_last"):
                if time.time() - t0 > budget:
                    break
                x = testing.view_in_layout(testing.random_values(B, C, H * W, seed=0).to(dtype), VIEW_OF[layout],
                                           device="cuda")
                N = H * W
                gv, ga, gn = (torch.randn(*s, device="cuda", dtype=dtype) for s in ((B, K, C), (B, K, N), (B, N)))
                fwd_out = triton_impl.forward(x, K, True)

                def fwd(x=x, K=K):
                    return triton_impl.forward(x, K, True)

                saved = fwd_out.saved()

                def bwd(x=x, gv=gv, ga=ga, gn=gn, saved=saved):
                    return triton_impl.backward(x, gv, ga, None, gn, saved, True)

                row = dict(shape=f"{B}x{C}x{H}x{W} K={K}", dtype=str(dtype).split(".")[-1], layout=layout,
                           x_MB=x.numel() * x.element_size() / 1e6)
                try:
                    for name, fn in (("fwd", fwd), ("bwd", bwd)):
                        row[f"{name}_eager_us"] = events_us(fn)
                        row[f"{name}_host_us"] = host_us(fn)
                        row[f"{name}_graph_us"] = time_cuda_graph(fn, calls=20)
                        row[f"{name}_kernels_us"] = kernel_us(fn)
                except Exception as e:  # noqa: BLE001 -- reported, the profile goes on
                    row["error"] = f"{type(e).__name__}: {e}"[:300]
                if dtype == torch.float32 and layout == "nchw":
                    x4 = x.view(B, C, H, W)
                    try:
                        with torch.no_grad():
                            row["compiled_fwd_eager_us"] = events_us(lambda x4=x4, K=K: compiled(x4, K))
                            row["compiled_fwd_graph_us"] = time_cuda_graph(lambda x4=x4, K=K: compiled(x4, K), calls=20)
                    except Exception as e:  # noqa: BLE001 -- reported, the profile goes on
                        row["compiled_error"] = f"{type(e).__name__}: {e}"[:300]
                rows.append(row)
                print(json.dumps(row), flush=True)
                torch.cuda.empty_cache()
    env = dict(device=torch.cuda.get_device_name(), torch=torch.__version__,
               triton=__import__("triton").__version__)
    (out_dir / "gpu_profile.json").write_text(json.dumps(dict(environment=env, rows=rows), indent=1))
    print(f"\n== gpu_profile on {env} ==")
    print(f"{'shape':22} {'dtype':8} {'layout':13} {'fwd eager':>9} {'host':>6} {'graph':>7} "
          f"{'bwd eager':>9} {'host':>6} {'graph':>7} {'cmp graph':>9}  (us)")
    nan = [float("nan")] * 3
    for r in rows:
        f = [r.get("fwd_eager_us", nan)[0], r.get("fwd_host_us", nan[0]), r.get("fwd_graph_us", nan)[0],
             r.get("bwd_eager_us", nan)[0], r.get("bwd_host_us", nan[0]), r.get("bwd_graph_us", nan)[0],
             r.get("compiled_fwd_graph_us", nan)[0]]
        print(f"{r['shape']:22} {r['dtype']:8} {r['layout']:13} {f[0]:9.1f} {f[1]:6.0f} {f[2]:7.1f} "
              f"{f[3]:9.1f} {f[4]:6.0f} {f[5]:7.1f} {f[6]:9.1f}")


if __name__ == "__main__":
    main()
