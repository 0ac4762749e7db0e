"""Compile the kernels for Hopper (sm_90), without a GPU, and check the cubins for register
spills (no LOCAL memory, no STACK frame).

The launches compiled are those of ``triton_impl.plan_variants()`` at the benchmark dtypes and
layouts (float32 and bfloat16, NCHW and channels_last) plus float16 and float64 NCHW: each
plan's signature, constexprs, alignment attributes and compiler options are exactly what the
launchers use. (``python -m bench.kernels`` compiles every variant, for more targets.)

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

ROOT = Path(__file__).resolve().parents[1]
WORKERS = 2
CHECKED = ("fp32 nchw", "fp32 channels_last", "bf16 nchw", "bf16 channels_last", "fp16 nchw", "fp64 nchw")


def variants() -> list[dict]:
    from brnpa_triton.ops import triton_impl

    out = []
    for name, plan in triton_impl.plan_variants():
        if not any(f" {key} " in f" {name} " for key in CHECKED):
            continue
        for index, launch in enumerate(plan):
            out.append(dict(variant=name, index=index, launch=launch.name))
    return out


# ---- worker side (TRITON_INTERPRET=0) ---------------------------------------------------

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
    from brnpa_triton.ops import triton_impl

    launch = dict(triton_impl.plan_variants())[v["variant"]][v["index"]]
    src = _ast_source(launch.kernel, launch.signature, launch.constexprs, launch.attrs)
    compiled = triton.compile(src, target=GPUTarget("cuda", 90, 32), options=launch.options)
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(compiled.asm["cubin"])
        f.flush()
        text = subprocess.run([_cuobjdump(), "--dump-resource-usage", f.name],
                              check=True, capture_output=True, text=True).stdout
    usage = {k: int(n) for k, n in re.findall(r"\b(REG|STACK|SHARED|LOCAL):(\d+)", text)}
    return {**v, **usage, **launch.options}


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
    lines = [f"{'variant':80} {'launch':15} {'warps':>5} {'REG':>4} {'STACK':>5} {'LOCAL':>5} {'SHARED':>6}"]
    for r in results:
        if "error" in r:
            lines.append(f"{r['variant']:80} {r['launch']:15} ERROR {r['error'][:200]}")
            continue
        lines.append(f"{r['variant']:80} {r['launch']:15} {r.get('num_warps', -1):5} {r.get('REG', -1):4} "
                     f"{r.get('STACK', -1):5} {r.get('LOCAL', -1):5} {r.get('SHARED', -1):6}")
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
