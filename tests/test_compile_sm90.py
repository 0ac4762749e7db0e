"""Compile every kernel variant the launchers can launch for Hopper (sm_90), without a GPU,
and check the cubins for register spills (no LOCAL memory, no STACK frame).

A variant is (kernel, block configuration from ``triton_impl.all_configs()``, input dtype,
refine, given seeds, layout). The layout matters because Triton specialises integer
arguments equal to 1: NCHW launches get ``stride_n == 1`` (loads vectorised along N),
channels_last and (B, N, C) tokens get ``stride_c == 1``. Pointers carry the 16-byte
divisibility a torch allocation has; strides carry none (N = 196 is not a multiple of 16),
which is the register-hungry case (one 64-bit address per element).

The conftest turns the Triton interpreter on for the whole test process, under which
``triton.jit`` builds interpreted functions that cannot be compiled; so the compilation runs
in child processes (this file, run as a script) with TRITON_INTERPRET=0. Run
``python tests/test_compile_sm90.py`` to print the resource table.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
DTYPE_NAMES = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32", torch.float64: "fp64"}
LAYOUTS = {
    "nchw": ("stride_xn", "stride_dn"),
    "channels_last": ("stride_xc", "stride_dc"),
    # C, N and the strides multiples of 16 (C = 2048): the loads vectorise (fp32, bf16 only)
    "channels_last_aligned": ("stride_xc", "stride_dc"),
}
ALIGNED = {"channels_last_aligned"}
WORKERS = 2


def variants() -> list[dict]:
    from brnpa_triton.ops import triton_impl

    out = []
    for kernel, items in triton_impl.all_configs().items():
        for dtype, cfg in items:
            for refine in (True, False):
                for seeds in ((False, True) if kernel == "forward" else (False,)):
                    for layout in LAYOUTS:
                        if layout in ALIGNED and dtype not in (torch.float32, torch.bfloat16):
                            continue
                        out.append(dict(kernel=kernel, config=cfg, dtype=DTYPE_NAMES[dtype], refine=refine,
                                        seeds=seeds, layout=layout))
    return out


# ---- worker side (TRITON_INTERPRET=0) ---------------------------------------------------

def _signature(fn, v: dict):
    import triton.language as tl

    acc = "fp64" if v["dtype"] == "fp64" else "fp32"
    ptr_types = {"seeds_ptr": "*i64", "idx_ptr": "*i64", "inv_ptr": f"*{acc}", "ws_ptr": f"*{acc}"}
    from brnpa_triton.ops import triton_impl

    options = triton_impl.launch_options(v["config"])
    cfg = triton_impl.block_sizes(v["config"])
    constexprs = {"REFINE": v["refine"], "ACC": tl.float64 if acc == "fp64" else tl.float32, **cfg}
    if v["kernel"] == "forward":
        constexprs["GIVEN_SEEDS"] = v["seeds"]
    for name in LAYOUTS[v["layout"]]:
        if name in fn.arg_names:
            constexprs[name] = 1
    signature, attrs = {}, {}
    for i, name in enumerate(fn.arg_names):
        if name in constexprs:
            signature[name] = "constexpr"
        elif name.endswith("_ptr"):
            signature[name] = ptr_types.get(name, f"*{v['dtype']}")
            attrs[(i,)] = [["tt.divisibility", 16]]
        else:
            signature[name] = "i32"
            if v["layout"] in ALIGNED and name != "K":
                attrs[(i,)] = [["tt.divisibility", 16]]
    return signature, constexprs, attrs, options


def _ast_source(fn, signature, constexprs, attrs):
    """ASTSource across Triton versions: name-keyed (>= 3.2) or index-keyed (3.0/3.1)."""
    from triton.compiler import ASTSource

    try:
        return ASTSource(fn, signature, constexprs, attrs)
    except TypeError:  # Triton 3.0/3.1: index-keyed signature and constants, no constexpr entries
        idx = {n: i for i, n in enumerate(fn.arg_names)}
        sig = {idx[n]: t for n, t in signature.items() if t != "constexpr"}
        consts = {idx[n]: c for n, c in constexprs.items()}
        return ASTSource(fn, sig, consts)


def _cuobjdump() -> str:
    import triton

    try:
        from triton import knobs

        return knobs.nvidia.cuobjdump.path
    except Exception:
        return str(Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump")


def compile_variant(v: dict) -> dict:
    import tempfile

    import triton

    try:
        from triton.backends.compiler import GPUTarget
    except ImportError:  # older layout
        from triton.compiler.compiler import GPUTarget
    from brnpa_triton.ops import kernels

    fn = kernels.brnpa_forward_kernel if v["kernel"] == "forward" else kernels.brnpa_backward_kernel
    signature, constexprs, attrs, options = _signature(fn, v)
    src = _ast_source(fn, signature, constexprs, attrs)
    compiled = triton.compile(src, target=GPUTarget("cuda", 90, 32), options=options)
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(compiled.asm["cubin"])
        f.flush()
        text = subprocess.run([_cuobjdump(), "--dump-resource-usage", f.name],
                              check=True, capture_output=True, text=True).stdout
    usage = {k: int(n) for k, n in re.findall(r"\b(REG|STACK|SHARED|LOCAL):(\d+)", text)}
    return {**v, **usage, **options}


def _worker() -> None:
    todo = json.loads(sys.stdin.read())
    results = []
    for v in todo:
        try:
            results.append(compile_variant(v))
        except Exception as e:  # reported, and failed by the test
            results.append({**v, "error": f"{type(e).__name__}: {e}"[:2000]})
    print(json.dumps(results))


# ---- driver side ---------------------------------------------------------------------------

def compile_all(todo: list[dict], workers: int = WORKERS) -> list[dict]:
    env = {**os.environ, "TRITON_INTERPRET": "0", "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    chunks = [todo[i::workers] for i in range(workers)]
    procs = [
        subprocess.Popen([sys.executable, __file__, "--worker"], stdin=subprocess.PIPE,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT)
        for chunk in chunks if chunk
    ]
    results = []
    for proc, chunk in zip(procs, [c for c in chunks if c]):
        out, err = proc.communicate(json.dumps(chunk))
        if proc.returncode != 0:
            raise RuntimeError(f"compile worker failed ({proc.returncode}):\n{err[-4000:]}")
        results += json.loads(out.strip().splitlines()[-1])
    return results


def format_table(results: list[dict]) -> str:
    lines = [f"{'kernel':9} {'config':50} {'dtype':5} {'refine':6} {'seeds':5} {'layout':21} "
             f"{'maxnreg':>7} {'REG':>4} {'STACK':>5} {'LOCAL':>5} {'SHARED':>6}"]
    for r in results:
        cfg = ",".join(f"{k}={v}" for k, v in r["config"].items())
        if "error" in r:
            lines.append(f"{r['kernel']:9} {cfg:50} {r['dtype']:5} ERROR {r['error'][:200]}")
            continue
        lines.append(f"{r['kernel']:9} {cfg:50} {r['dtype']:5} {r['refine']!s:6} {r['seeds']!s:5} "
                     f"{r['layout']:21} {r.get('maxnreg', -1):7} {r.get('REG', -1):4} {r.get('STACK', -1):5} {r.get('LOCAL', -1):5} "
                     f"{r.get('SHARED', -1):6}")
    return "\n".join(lines)


def test_compile_sm90_no_spills():
    import pytest

    pytest.importorskip("triton")
    results = compile_all(variants())
    print("\n" + format_table(results))
    errors = [r for r in results if "error" in r]
    assert not errors, format_table(errors)
    spills = [r for r in results if r.get("STACK", 1) != 0 or r.get("LOCAL", 1) != 0 or "REG" not in r]
    assert not spills, "register spills (or unparsed cuobjdump output):\n" + format_table(spills)


if __name__ == "__main__":
    if "--worker" in sys.argv:
        _worker()
    else:
        sys.path.insert(0, str(ROOT))
        res = compile_all(variants())
        print(format_table(res))
        if "--json" in sys.argv:
            print(json.dumps(res))
