"""Static performance report of the Triton kernels: compiled with no GPU, read from their SASS.

    python -m bench.kernels                       # writes to a scratch directory
    python -m bench.kernels --out bench/results   # the committed copy
    python -m bench.kernels --targets 90 --workers 2

Nothing here runs on a GPU: it is a proxy that steers the kernels' design until a GPU measures
them. It compiles, for sm_90, sm_80 and sm_89 (``triton.compile`` with a ``GPUTarget``), every
launch of the launch plans (``triton_impl.forward_plan`` / ``backward_plan`` at the benchmark
shapes, and every entry of ``plan_variants``), then reads:

* resources: registers, spills (local memory, stack), shared memory, threads per block and the
  blocks that fit on one SM (registers, shared memory, threads and the architecture's limits);
* each loop of the SASS (a backward branch closes a loop), mapped through the line info to the
  source ``for`` that the branch belongs to; loops that stream X carry a ``# streams X`` comment
  on their ``for`` line. Per loop: instructions, ``BAR.SYNC`` and other barriers, shuffles, and
  the widths of the global loads, X's among them;
* at each benchmark shape: the grid of each launch, programs per SM on an H100 and an A100, the
  bytes each plan moves, and the time those bytes take at the card's peak bandwidth next to the
  one-read and (K+1)-read floors.

Launch plans come from ``brnpa_triton.ops.triton_impl``.
Compilation runs in child processes with ``TRITON_INTERPRET=0`` (the test suite runs the
interpreter, under which kernels cannot be compiled), a few at a time.
"""

from __future__ import annotations

import argparse
import ast
import datetime as _dt
import json
import math
import os
import re
import subprocess
import sys
import tempfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCHEMA = "brnpa-kernels-static/1"
STATIC_NOTE = ("Static proxy: nothing here ran on a GPU. The kernels were compiled for each target with no "
               "GPU and their SASS was read; times are bytes divided by peak bandwidth, not measurements.")

# ---- what is reported --------------------------------------------------------------------
TARGETS = (90, 80, 89)
K_BENCH = 3
BENCH_SHAPES = ((32, 2048, 14, 14), (16, 2048, 56, 56), (64, 512, 28, 28))  # (B, C, H, W)
BENCH_DTYPES = ("fp32", "bf16")
LAYOUTS = ("nchw", "channels_last")
ELEMENT_BYTES = {"fp16": 2, "bf16": 2, "fp32": 4, "fp64": 8}
DRAM_LATENCY_S = 700e-9  # a load's round trip to DRAM, for the one-tile-in-flight bound


@dataclass(frozen=True)
class Card:
    name: str
    cc: int
    sm_count: int
    peak_bytes_per_s: float


# Peak DRAM bandwidths as the vendors state them (SXM parts).
CARDS = {
    "H100": Card("H100 SXM5 80 GB, HBM3", 90, 132, 3.35e12),
    "A100": Card("A100 SXM4 80 GB, HBM2e", 80, 108, 2.039e12),
}


@dataclass(frozen=True)
class ArchLimits:
    registers_per_sm: int
    max_threads_per_sm: int
    max_blocks_per_sm: int
    shared_per_sm: int  # bytes usable by blocks, at the largest carve-out
    shared_per_block: int  # largest opt-in dynamic shared memory of one block
    reserved_shared_per_block: int  # taken by the system for every resident block


# CUDA C Programming Guide, "Compute Capabilities" table.
ARCH_LIMITS = {
    80: ArchLimits(65536, 2048, 32, 164 * 1024, 163 * 1024, 1024),
    89: ArchLimits(65536, 1536, 24, 100 * 1024, 99 * 1024, 1024),
    90: ArchLimits(65536, 2048, 32, 228 * 1024, 227 * 1024, 1024),
}


def layout_strides(layout: str, C: int, N: int) -> tuple[int, int, int]:
    """(B, C, N) strides of a dense (B, C, H, W) input: NCHW, or channels_last (also tokens)."""
    return (C * N, N, 1) if layout == "nchw" else (N * C, 1, C)


# ---- SASS parsing (nvdisasm -c -gi output) -------------------------------------------------
_INSTR = re.compile(r"/\*([0-9a-fA-F]{4,})\*/\s+(.*?)\s*;")
_LABEL = re.compile(r"^\s*(\.L_x_\d+|\.L_\d+|[A-Za-z_.$][\w.$]*):\s*$")
_LINE_INFO = re.compile(r"^\s*//## File ")
_LOCATION = re.compile(r'"([^"]+)", line (\d+)')
_TARGET = re.compile(r"`\(([^)]+)\)")


@dataclass(frozen=True)
class Instr:
    addr: int
    opcode: str  # e.g. "LDG.E.128", "BAR.SYNC.DEFER_BLOCKING", "BRA"
    text: str  # the whole instruction, predicate included
    where: tuple[tuple[str, int], ...]  # source locations, innermost first (inlined call sites after)
    target: str | None = None  # label of a branch


@dataclass
class Loop:
    start: int  # address of the loop head (the backward branch's target)
    end: int  # address of the last backward branch to that head
    branch_where: tuple[tuple[str, int], ...]
    depth: int = 0  # 0 for outermost loops
    source: tuple[str, int] | None = None  # the `for` line the loop comes from, when known
    streams_x: bool = False
    children: list = field(default_factory=list)


def parse_sass(text: str) -> tuple[list[Instr], dict[str, int]]:
    """Instructions (with their source locations) and label addresses of nvdisasm output."""
    instrs: list[Instr] = []
    pending_labels: list[str] = []
    labels: dict[str, int] = {}
    where: tuple[tuple[str, int], ...] = ()
    for line in text.splitlines():
        if _LINE_INFO.match(line):
            where = tuple((f, int(n)) for f, n in _LOCATION.findall(line))
            continue
        m = _INSTR.search(line)
        if m:
            addr = int(m.group(1), 16)
            body = m.group(2).strip()
            tokens = body.split()
            if tokens and tokens[0].startswith("@"):
                tokens = tokens[1:]
            if not tokens:
                continue
            opcode = tokens[0]
            t = _TARGET.search(body)
            for name in pending_labels:
                labels[name] = addr
            pending_labels = []
            instrs.append(Instr(addr, opcode, body, where, t.group(1) if t else None))
            continue
        m = _LABEL.match(line)
        if m:
            pending_labels.append(m.group(1))
    return instrs, labels


def find_loops(instrs: list[Instr], labels: dict[str, int]) -> list[Loop]:
    """Loops from backward branches: [target, branch]; one loop per head (the furthest branch),
    nested by containment, sorted by address."""
    by_head: dict[int, Loop] = {}
    for ins in instrs:
        if not ins.opcode.startswith("BRA") or ins.target not in labels:
            continue
        head = labels[ins.target]
        if head >= ins.addr:  # forward branch, or the self-loop that ends every kernel
            continue
        loop = by_head.get(head)
        if loop is None or ins.addr > loop.end:
            by_head[head] = Loop(head, ins.addr, ins.where)
    loops = sorted(by_head.values(), key=lambda lp: (lp.start, -lp.end))
    stack: list[Loop] = []
    for lp in loops:
        while stack and not (stack[-1].start <= lp.start and lp.end <= stack[-1].end):
            stack.pop()
        lp.depth = len(stack)
        if stack:
            stack[-1].children.append(lp)
        stack.append(lp)
    return loops


def load_width_bits(opcode: str) -> int | None:
    """Width in bits of a global load (LDG, or LDGSTS: a global-to-shared copy); None otherwise."""
    parts = opcode.split(".")
    if parts[0] not in ("LDG", "LDGSTS"):
        return None
    for p in parts[1:]:
        if p in ("128", "64"):
            return int(p)
        if p in ("U16", "S16"):
            return 16
        if p in ("U8", "S8"):
            return 8
    return 32


def site_name(where: tuple[tuple[str, int], ...]) -> str:
    """'common.py:41 <- forward.py:84': a source location and the calls it was inlined into."""
    return " <- ".join(f"{Path(f).name}:{n}" for f, n in where) or "?"


def loop_stats(loop: Loop, instrs: list[Instr], is_x_load=lambda where: False) -> dict:
    """Counts over the loop's address range (nested loops included).

    ``is_x_load(where)`` says whether a load site reads X. X's tile loads are the X sites that
    move at least half as many bytes per iteration as the busiest X site (a tile, against the
    1-D seed rows that may be gathered in the same loop)."""
    body = [i for i in instrs if loop.start <= i.addr <= loop.end]
    ops = Counter(i.opcode.split(".")[0] for i in body)
    sites: dict[tuple, Counter] = {}
    for i in body:
        w = load_width_bits(i.opcode)
        if w is not None:
            sites.setdefault(i.where, Counter())[w] += 1
    x_bytes = {s: sum(w // 8 * n for w, n in c.items()) for s, c in sites.items() if is_x_load(s)}
    top = max(x_bytes.values(), default=0)
    tiles = [s for s, b in x_bytes.items() if b > 0 and b * 2 >= top]
    tile_widths: Counter = Counter()
    for s in tiles:
        tile_widths.update(sites[s])
    return {
        "start": f"{loop.start:#06x}",
        "end": f"{loop.end:#06x}",
        "depth": loop.depth,
        "source": f"{Path(loop.source[0]).name}:{loop.source[1]}" if loop.source else None,
        "streams_x": loop.streams_x,
        "instructions": len(body),
        "bar_sync": sum(1 for i in body if i.opcode.startswith("BAR.SYNC")),
        "barriers": ops.get("BAR", 0),
        "shuffles": ops.get("SHFL", 0),
        "global_loads": {site_name(s): {str(w): n for w, n in sorted(c.items())}
                         for s, c in sorted(sites.items(), key=lambda kv: site_name(kv[0]))},
        "x_load_sites": sorted(site_name(s) for s in x_bytes),
        "x_tile_load_sites": sorted(site_name(s) for s in tiles),
        "x_tile_load_widths": {str(w): n for w, n in sorted(tile_widths.items())},
    }


# ---- source loops -------------------------------------------------------------------------
_STREAMS_X = re.compile(r"#\s*streams X\b")


def marked_for_lines(source: str) -> set[int]:
    """Lines of the ``for`` statements marked ``# streams X`` (the comment on the for line)."""
    lines = source.splitlines()
    return {node.lineno for node in ast.walk(ast.parse(source))
            if isinstance(node, ast.For) and _STREAMS_X.search(lines[node.lineno - 1])}


def source_for_loops(source: str) -> list[tuple[int, int]]:
    """(first line, last line) of every ``for`` statement."""
    return [(n.lineno, n.end_lineno) for n in ast.walk(ast.parse(source)) if isinstance(n, ast.For)]


X_POINTERS = ("x_ptr",)  # kernel parameters that point at X
_NAME = re.compile(r"[A-Za-z_]\w*")


def _names(node) -> set[str]:
    return {n.id for n in ast.walk(node) if isinstance(n, ast.Name)}


def x_derived_names(trees: dict[str, ast.Module], roots=X_POINTERS) -> dict[str, set[str]]:
    """Per file, the names that hold X or pointers into it: the ``x_ptr`` parameters, whatever
    is assigned from an expression using such a name, and the parameters of helpers (defined in
    these files) that are passed one. Names are per file, not per scope: an over-approximation."""
    funcs = {}
    for path, tree in trees.items():
        for f in ast.walk(tree):
            if isinstance(f, ast.FunctionDef):
                funcs[f.name] = (path, [a.arg for a in f.args.args])
    tainted = {path: set() for path in trees}
    for path, tree in trees.items():
        for f in ast.walk(tree):
            if isinstance(f, ast.FunctionDef):
                tainted[path].update(a.arg for a in f.args.args if a.arg in roots)
    changed = True
    while changed:
        changed = False
        for path, tree in trees.items():
            mine = tainted[path]
            for node in ast.walk(tree):
                new: list[tuple[str, str]] = []
                if isinstance(node, (ast.Assign, ast.AugAssign, ast.AnnAssign)) and node.value is not None:
                    if _names(node.value) & mine and _pointer_arithmetic(node.value):
                        targets = node.targets if isinstance(node, ast.Assign) else [node.target]
                        new += [(path, n) for t in targets for n in _names(t)]
                elif isinstance(node, ast.Call):
                    callee = getattr(node.func, "id", getattr(node.func, "attr", None))
                    if callee in funcs:
                        cpath, params = funcs[callee]
                        new += [
                            (cpath, params[i]) for i, a in enumerate(node.args) if i < len(params) and _names(a) & mine
                        ]
                        new += [(cpath, k.arg) for k in node.keywords if k.arg in params and _names(k.value) & mine]
                for p_, n in new:
                    if n not in tainted[p_]:
                        tainted[p_].add(n)
                        changed = True
    return tainted


_POINTER_CALLS = {"to", "cast", "multiple_of", "max_contiguous", "max_constancy", "where", "program_id", "arange",
                  "make_block_ptr", "advance", "broadcast_to", "expand_dims", "reshape", "view"}


def _pointer_arithmetic(value) -> bool:
    """An expression that can only move a pointer (no load, no helper call): what it gives
    still points into X, whereas a loaded value is data."""
    return all(getattr(c.func, "id", getattr(c.func, "attr", None)) in _POINTER_CALLS
               for c in ast.walk(value) if isinstance(c, ast.Call))


class SourceIndex:
    """The ``for`` loops of the files named in line info, which of them stream X, and which
    source lines load X."""

    def __init__(self, streaming=marked_for_lines):
        self._streaming = streaming
        self._files: dict[str, dict | None] = {}
        self._x_names: dict[str, set[str]] | None = None

    def _file(self, path: str):
        if path not in self._files:
            try:
                src = Path(path).read_text()
                tree = ast.parse(src)
                stmts = [
                    n
                    for n in ast.walk(tree)
                    if isinstance(n, ast.stmt)
                    and not isinstance(n, (ast.For, ast.While, ast.If, ast.FunctionDef, ast.With))
                ]
                self._files[path] = {"loops": source_for_loops(src), "streaming": self._streaming(src), "tree": tree,
                                     "lines": src.splitlines(), "stmts": stmts}
                self._x_names = None
            except (OSError, SyntaxError, ValueError):
                self._files[path] = None
        return self._files[path]

    def attach(self, loop: Loop, instrs: list[Instr] = ()) -> None:
        """Map a SASS loop to its ``for``: the branch closing a loop carries the for's line; failing
        that, the innermost ``for`` around the branch's location. An innermost SASS loop whose
        body lies in a marked ``for`` of an inlined helper is that ``for``, even when its branch
        carries the caller's line (as the backward branch of an inlined loop can)."""
        if not loop.children:
            marked = self._marked_loop_around(i.where for i in instrs if loop.start <= i.addr <= loop.end)
            if marked is not None:
                loop.source, loop.streams_x = marked, True
                return
        for f, n in loop.branch_where:
            info = self._file(f)
            if info and any(lo == n for lo, _ in info["loops"]):
                loop.source, loop.streams_x = (f, n), n in info["streaming"]
                return
        for f, n in loop.branch_where:
            info = self._file(f)
            around = [(lo, hi) for lo, hi in (info["loops"] if info else []) if lo <= n <= hi]
            if around:
                lo = max(around)[0]
                loop.source, loop.streams_x = (f, lo), lo in info["streaming"]
                return

    def _marked_loop_around(self, wheres) -> tuple[str, int] | None:
        """The marked ``for`` that the loop's instructions come from: either their location lies
        inside it, or (when the line info keeps only the call site of an inlined helper) the
        helper called on that line holds it, directly or through the helpers it calls."""
        votes: Counter = Counter()
        for where in wheres:
            for f, n in where:
                found = self._marked_for_at(f, n)
                if found is not None:
                    votes[found] += 1
                    break
        return votes.most_common(1)[0][0] if votes else None

    def _marked_for_at(self, f: str, n: int) -> tuple[str, int] | None:
        info = self._file(f)
        if not info:
            return None
        around = [lo for lo, hi in info["loops"] if lo <= n <= hi]
        if around and max(around) in info["streaming"]:
            return (f, max(around))
        functions = {d.name: d for d in ast.walk(info["tree"]) if isinstance(d, ast.FunctionDef)}
        called = [c.func.id for c in ast.walk(info["tree"])
                  if isinstance(c, ast.Call) and isinstance(c.func, ast.Name) and c.lineno == n]
        seen: set[str] = set()
        while called:
            name = called.pop(0)
            if name in seen or name not in functions:
                continue
            seen.add(name)
            body = functions[name]
            marked = sorted(x.lineno for x in ast.walk(body)
                            if isinstance(x, ast.For) and x.lineno in info["streaming"])
            if marked:
                return (f, marked[0])
            called += [c.func.id for c in ast.walk(body) if isinstance(c, ast.Call) and isinstance(c.func, ast.Name)]
        return None

    def is_x_load(self, where: tuple[tuple[str, int], ...]) -> bool:
        """Whether the statement of a load's innermost location uses a name that holds X."""
        if not where:
            return False
        for f, _ in where:
            self._file(f)
        if self._x_names is None:
            self._x_names = x_derived_names({p: i["tree"] for p, i in self._files.items() if i})
        f, n = where[0]
        info = self._files.get(f)
        if not info:
            return False
        around = [st for st in info["stmts"] if st.lineno <= n <= (st.end_lineno or st.lineno)]
        text = (ast.get_source_segment("\n".join(info["lines"]), min(around, key=lambda st: st.end_lineno - st.lineno))
                if around else info["lines"][n - 1])
        return bool(set(_NAME.findall(text or "")) & self._x_names.get(f, set()))


def analyse_sass(text: str, index: SourceIndex) -> dict:
    instrs, labels = parse_sass(text)
    loops = find_loops(instrs, labels)
    for lp in loops:
        index.attach(lp, instrs)
    return {"instructions": len(instrs), "loops": [loop_stats(lp, instrs, index.is_x_load) for lp in loops]}


# ---- occupancy ---------------------------------------------------------------------------

def resident_blocks(cc: int, registers: int, threads: int, shared_bytes: int) -> dict:
    """Blocks of one kernel that fit on one SM, and what limits them (CUDA occupancy rules:
    registers allocated per warp in units of 256, in four SM sub-partitions)."""
    lim = ARCH_LIMITS[cc]
    warps = math.ceil(threads / 32)
    regs_per_warp = math.ceil(max(registers, 1) * 32 / 256) * 256
    by = {
        "registers": 4 * ((lim.registers_per_sm // 4) // regs_per_warp) // warps,
        "threads": lim.max_threads_per_sm // threads,
        "shared": lim.shared_per_sm // (shared_bytes + lim.reserved_shared_per_block),
        "blocks": lim.max_blocks_per_sm,
    }
    if shared_bytes > lim.shared_per_block:
        by["shared"] = 0
    n = min(by.values())
    return {"blocks_per_sm": n, "limited_by": [k for k, v in by.items() if v == n], "warps_per_sm": n * warps}


# ---- launch plans -------------------------------------------------------------------------

def plan_source():
    """The module that provides the launch plans, and its name."""
    from brnpa_triton.ops import triton_impl

    return triton_impl, "brnpa_triton.ops.triton_impl"


def bench_requests(cards=tuple(CARDS)) -> list[dict]:
    """One plan request per benchmark shape, dtype, layout, direction and card."""
    out = []
    for B, C, H, W in BENCH_SHAPES:
        for dtype in BENCH_DTYPES:
            for layout in LAYOUTS:
                for direction in ("forward", "backward"):
                    for card in cards:
                        out.append({"kind": direction, "B": B, "C": C, "H": H, "W": W, "K": K_BENCH,
                                    "dtype": dtype, "layout": layout, "card": card})
    return out


def make_plan(source, request: dict) -> list[tuple[str, list]]:
    """[(label, launches)] for a request: every plan variant, or one plan at one shape."""
    import torch

    if request["kind"] == "variants":
        return [(label, list(launches)) for label, launches in source.plan_variants()]
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32, "fp64": torch.float64}[
        request["dtype"]
    ]
    B, C, N, K = request["B"], request["C"], request["H"] * request["W"], request["K"]
    strides = layout_strides(request["layout"], C, N)
    sm = CARDS[request["card"]].sm_count
    if request["kind"] == "forward":
        launches = source.forward_plan(B, C, N, K, dtype, strides, refine=True, given_seeds=False, sm_count=sm)
    else:
        launches = source.backward_plan(B, C, N, K, dtype, strides, refine=True, sm_count=sm)
    return [(request_label(request), list(launches))]


def request_label(r: dict) -> str:
    if r["kind"] == "variants":
        return "variants"
    return f"{r['kind']} B={r['B']} C={r['C']} {r['H']}x{r['W']} K={r['K']} {r['dtype']} {r['layout']} {r['card']}"


def kernel_name(kernel) -> str:
    fn = getattr(kernel, "fn", kernel)
    return f"{fn.__module__}.{fn.__name__}"


def _plain(v):
    """A JSON-able, stable description of a constexpr value (dtypes by name)."""
    if isinstance(v, (bool, int, float, str)) or v is None:
        return v
    return str(v)


def compile_key(launch, cc: int) -> str:
    """Two launches with the same key compile to the same binary."""
    return json.dumps([
        kernel_name(launch.kernel), cc,
        sorted(launch.signature.items()),
        sorted((k, _plain(v)) for k, v in launch.constexprs.items()),
        sorted((str(k), v) for k, v in launch.attrs.items()),
        sorted(launch.options.items()),
    ])


def launch_summary(launch) -> dict:
    return {
        "name": launch.name,
        "kernel": kernel_name(launch.kernel),
        "grid": list(launch.grid),
        "repeats": launch.repeats,
        "pointers": {k: v for k, v in launch.signature.items() if v.startswith("*")},
        "bytes_read": launch.bytes_read,
        "bytes_written": launch.bytes_written,
        "constexprs": {k: _plain(v) for k, v in launch.constexprs.items()},
        "divisibility_16": sorted(_arg_name(launch, k) for k in launch.attrs),
        "options": dict(launch.options),
    }


def _arg_name(launch, key) -> str:
    names = list(launch.signature)
    i = key[0] if isinstance(key, tuple) else key
    return names[i] if isinstance(i, int) and i < len(names) else str(key)


# ---- compiling (worker side: TRITON_INTERPRET=0) -------------------------------------------

def _tool(name: str) -> str:
    import triton

    try:
        from triton import knobs

        path = getattr(knobs.nvidia, name).path
        if path:
            return path
    except Exception:
        pass
    return str(Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / name)


def _ast_source(launch):
    """ASTSource across Triton versions: name-keyed (>= 3.2) or index-keyed (3.0/3.1)."""
    from triton.compiler import ASTSource

    try:
        return ASTSource(launch.kernel, launch.signature, launch.constexprs, launch.attrs)
    except TypeError:
        idx = {n: i for i, n in enumerate(launch.kernel.arg_names)}
        sig = {idx[n]: t for n, t in launch.signature.items() if t != "constexpr"}
        return ASTSource(launch.kernel, sig, {idx[n]: c for n, c in launch.constexprs.items()})


def compile_and_analyse(launch, cc: int, index: SourceIndex) -> dict:
    """Compile one launch for sm_<cc>; resources from cuobjdump, loops from nvdisasm."""
    import triton

    try:
        from triton.backends.compiler import GPUTarget
    except ImportError:
        from triton.compiler.compiler import GPUTarget

    compiled = triton.compile(_ast_source(launch), target=GPUTarget("cuda", cc, 32), options=dict(launch.options))
    meta = compiled.metadata
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(compiled.asm["cubin"])
        f.flush()
        usage_text = subprocess.run([_tool("cuobjdump"), "--dump-resource-usage", f.name],
                                    check=True, capture_output=True, text=True).stdout
        sass = subprocess.run([_tool("nvdisasm"), "-c", "-gi", f.name],
                              check=True, capture_output=True, text=True).stdout
    usage = {k: int(n) for k, n in re.findall(r"\b(REG|STACK|SHARED|LOCAL):(\d+)", usage_text)}
    num_warps = int(getattr(meta, "num_warps", launch.options.get("num_warps", 4)))
    threads = 32 * num_warps
    dynamic_shared = int(getattr(meta, "shared", 0) or 0)
    shared = dynamic_shared + usage.get("SHARED", 0)
    out = {
        "registers": usage.get("REG"),
        "stack_bytes": usage.get("STACK"),
        "local_bytes": usage.get("LOCAL"),
        "shared_static_bytes": usage.get("SHARED"),
        "shared_dynamic_bytes": dynamic_shared,
        "threads_per_block": threads,
        "maxnreg": launch.options.get("maxnreg"),
        **resident_blocks(cc, usage.get("REG", 255), threads, shared),
    }
    out.update(analyse_sass(sass, index))
    return out


def _worker() -> None:
    """Read jobs (JSON on stdin), print one JSON result per job, each on its own line."""
    import triton

    jobs = json.loads(sys.stdin.read())
    source, _ = plan_source()
    index = SourceIndex(marked_for_lines)
    plans: dict[str, list] = {}
    for job in jobs:
        key = json.dumps(job["request"], sort_keys=True)
        result = {"job": job, "triton": triton.__version__}
        try:
            if key not in plans:
                plans[key] = make_plan(source, job["request"])
            launch = plans[key][job["entry"]][1][job["launch"]]
            result.update(compile_and_analyse(launch, job["cc"], index))
        except Exception as e:  # reported, and failed by the tests
            result["error"] = f"{type(e).__name__}: {e}"[:2000]
        print(json.dumps(result), flush=True)


# ---- compiling (driver side) --------------------------------------------------------------

def run_jobs(jobs: list[dict], workers: int = 2, python: str | None = None) -> list[dict]:
    """Compile jobs ({request, entry, launch, cc}) in ``workers`` child processes; results in
    the jobs' order."""
    if not jobs:
        return []
    env = {
        **os.environ,
        "TRITON_INTERPRET": "0",
        "TRITON_DEFAULT_FP_FUSION": os.environ.get("TRITON_DEFAULT_FP_FUSION", "1"),
        "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
    }
    env.pop("TRITON_DISABLE_LINE_INFO", None)  # loops are mapped to the source through line info
    # Deal jobs round-robin, heaviest kinds spread evenly.
    chunks = [jobs[i::workers] for i in range(max(1, workers))]
    procs = []
    for chunk in chunks:
        if not chunk:
            continue
        p = subprocess.Popen([python or sys.executable, "-m", "bench.kernels", "--worker"], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT)
        p.stdin.write(json.dumps(chunk))
        p.stdin.close()
        procs.append((p, chunk))
    by_job: dict[str, dict] = {}
    for p, chunk in procs:
        out = p.stdout.read()
        err = p.stderr.read()
        p.wait()
        got = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
        if p.returncode != 0 or len(got) != len(chunk):
            raise RuntimeError(
                f"compile worker failed (exit {p.returncode}, {len(got)}/{len(chunk)} results):\n{err[-4000:]}"
            )
        for r in got:
            by_job[json.dumps(r["job"], sort_keys=True)] = r
    return [by_job[json.dumps(j, sort_keys=True)] for j in jobs]


@dataclass
class Collected:
    """Every launch of the requested plans, and the distinct compilations they need."""
    source_name: str
    plans: dict  # request label -> [(entry label, [launch summary + compile keys per target])]
    jobs: dict  # compile key -> job
    requests: list


def collect(requests: list[dict], targets, *, select=None) -> Collected:
    """Build the plans of ``requests`` here and list each distinct compilation once per target.

    ``select(request, plan_label, launch_summary, cc) -> bool`` narrows which launches are
    compiled (the tests compile a subset)."""
    source, source_name = plan_source()
    plans, jobs = {}, {}
    for request in requests:
        entries = []
        for e, (label, launches) in enumerate(make_plan(source, request)):
            rows = []
            for li, launch in enumerate(launches):
                row = launch_summary(launch)
                row["compiled"] = {}
                for cc in targets:
                    if select is not None and not select(request, label, row, cc):
                        continue
                    key = compile_key(launch, cc)
                    jobs.setdefault(key, {"request": request, "entry": e, "launch": li, "cc": cc})
                    row["compiled"][str(cc)] = key
                rows.append(row)
            entries.append((label, rows))
        plans[request_label(request)] = entries
    return Collected(source_name, plans, jobs, requests)


def compile_collected(col: Collected, workers: int = 2, python: str | None = None) -> dict:
    """compile key -> result."""
    keys = list(col.jobs)
    results = run_jobs([col.jobs[k] for k in keys], workers, python)
    return dict(zip(keys, results, strict=True))


# ---- the report ---------------------------------------------------------------------------

def _x_bytes(r: dict) -> int:
    return r["B"] * r["C"] * r["H"] * r["W"] * ELEMENT_BYTES[r["dtype"]]


def _streaming(result: dict | None) -> list[dict]:
    return [lp for lp in (result or {}).get("loops", []) if lp["streams_x"]]


def shape_rows(col: Collected, compiled: dict) -> list[dict]:
    """One row per benchmark shape, dtype, layout and direction, with both cards' plans."""
    rows = {}
    for r in col.requests:
        if r["kind"] == "variants":
            continue
        key = (r["B"], r["C"], r["H"], r["W"], r["dtype"], r["layout"], r["kind"])
        card = CARDS[r["card"]]
        (_label, launches), = col.plans[request_label(r)]
        xb = _x_bytes(r)
        moved = sum(ln["repeats"] * (ln["bytes_read"] + ln["bytes_written"]) for ln in launches)
        per_launch = []
        latency_s = 0.0
        for ln in launches:
            programs = math.prod(ln["grid"])
            res = compiled.get(ln["compiled"].get(str(card.cc)))
            stream = _streaming(res)
            widths = sorted({int(w) for lp in stream for w in lp["x_tile_load_widths"]})
            tile = min((sum(int(w) // 8 * n for w, n in lp["x_tile_load_widths"].items()) for lp in stream), default=0)
            tile *= res.get("threads_per_block", 0) if res else 0
            concurrent = min(programs, card.sm_count * (res or {}).get("blocks_per_sm", 0))
            if tile and concurrent:
                latency_s += ln["repeats"] * (ln["bytes_read"] / (concurrent * tile / DRAM_LATENCY_S)
                                              + ln["bytes_written"] / card.peak_bytes_per_s)
            else:
                latency_s += ln["repeats"] * (ln["bytes_read"] + ln["bytes_written"]) / card.peak_bytes_per_s
            per_launch.append({
                "name": ln["name"], "grid": ln["grid"], "repeats": ln["repeats"], "programs": programs,
                "programs_per_sm": round(programs / card.sm_count, 3),
                "resident_blocks_per_sm": res.get("blocks_per_sm") if res else None,
                "registers": res.get("registers") if res else None,
                "streaming_loops": len(stream),
                "x_load_widths_bits": widths,
                "bar_sync_in_streaming_loops": [lp["bar_sync"] for lp in stream],
                "x_tile_bytes_per_iteration": tile,
                "bytes_read": ln["bytes_read"], "bytes_written": ln["bytes_written"],
            })
        row = rows.setdefault(key, {
            "B": r["B"], "C": r["C"], "HxW": f"{r['H']}x{r['W']}", "N": r["H"] * r["W"], "K": r["K"],
            "dtype": r["dtype"], "layout": r["layout"], "direction": r["kind"], "x_bytes": xb, "cards": {}})
        floors = {"one_read_us": xb / card.peak_bytes_per_s * 1e6}
        if r["kind"] == "forward":
            floors["k_plus_1_reads_us"] = (r["K"] + 1) * xb / card.peak_bytes_per_s * 1e6
        else:
            floors["read_and_write_us"] = 2 * xb / card.peak_bytes_per_s * 1e6
        row["cards"][r["card"]] = {
            "target": f"sm_{card.cc}", "sm_count": card.sm_count, "peak_tb_per_s": card.peak_bytes_per_s / 1e12,
            "launches": per_launch, "bytes_moved": moved,
            "bandwidth_bound_us": moved / card.peak_bytes_per_s * 1e6,
            "one_tile_in_flight_us": max(latency_s, moved / card.peak_bytes_per_s) * 1e6, **floors,
        }
    return list(rows.values())


def variant_rows(col: Collected, compiled: dict) -> list[dict]:
    """Resources per distinct compiled launch (plan variants and benchmark plans), per target."""
    seen, out = {}, []
    for plan_label, entries in col.plans.items():
        for label, launches in entries:
            for ln in launches:
                ident = json.dumps(
                    [ln["kernel"], ln["pointers"], ln["constexprs"], ln["divisibility_16"], ln["options"]],
                    sort_keys=True,
                )
                row = seen.get(ident)
                if row is None:
                    row = seen[ident] = {"used_by": [], "launch": ln["name"], "kernel": ln["kernel"],
                                         "x_dtype": next(iter(ln["pointers"].values()), "?")[1:],
                                         "constexprs": ln["constexprs"], "divisibility_16": ln["divisibility_16"],
                                         "options": ln["options"], "targets": {}}
                    out.append(row)
                row["used_by"].append(label if plan_label == "variants" else plan_label)
                for cc, key in ln["compiled"].items():
                    res = compiled.get(key)
                    if res is not None:
                        row["targets"][f"sm_{cc}"] = {k: v for k, v in res.items() if k != "job"}
    return out


def build_report(col: Collected, compiled: dict, targets) -> dict:
    import triton

    return {
        "schema": SCHEMA,
        "note": STATIC_NOTE,
        "generated": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "triton": triton.__version__,
        "plan_source": col.source_name,
        "targets": [f"sm_{cc}" for cc in targets],
        "cards": {k: {"name": c.name, "target": f"sm_{c.cc}", "sm_count": c.sm_count,
                      "peak_tb_per_s": c.peak_bytes_per_s / 1e12} for k, c in CARDS.items()},
        "arch_limits": {f"sm_{cc}": vars(lim) for cc, lim in ARCH_LIMITS.items()},
        "assumptions": [
            "Bandwidth-bound time = sum over launches of repeats x (bytes read + bytes written) / peak; "
            "it assumes the grid keeps every SM streaming, which the programs-per-SM column checks.",
            "Bytes per launch are the plan's own figures (DRAM traffic; re-reads that hit cache are not counted).",
            "Resident blocks per SM: registers rounded to 256 per warp over four sub-partitions, threads, "
            "dynamic + static shared memory + 1 KB reserved per block, and the blocks-per-SM cap.",
            "X's loads: load sites (source line and inlining chain) whose statement uses a pointer derived from "
            "x_ptr; its tile loads, in a loop that streams X, are those moving at least half as many bytes per "
            "iteration as the busiest X site of that loop (a tile, not a gathered seed row).",
            "One-tile-in-flight bound: each program keeps one iteration's X tile (the smallest over its loops "
            "that stream X) in flight for a 700 ns DRAM round trip, as when a barrier or reduction separates "
            "iterations; the programs that fit at once share it. Pessimistic for loops the compiler pipelines.",
            "Benchmark plans: refine=True, seeds from the norms, K=3.",
        ],
        "shapes": shape_rows(col, compiled),
        "variants": variant_rows(col, compiled),
        "errors": [{"job": r["job"], "error": r["error"]} for r in compiled.values() if "error" in r],
    }


_DIR = {"forward": "fwd", "backward": "bwd"}


def _us(v: float) -> str:
    return f"{v:.0f}" if v >= 10 else f"{v:.1f}"


def _grid(ln: dict) -> str:
    g = "x".join(str(d) for d in ln["grid"])
    return f"{ln['name']} ({g})" + (f" x{ln['repeats']}" if ln["repeats"] != 1 else "")


def render_markdown(rep: dict) -> str:
    out = [
        "# Static kernel report",
        "",
        f"**{rep['note']}**",
        "",
        f"Generated {rep['generated']} by `python -m bench.kernels`; triton {rep['triton']}; "
        f"launch plans from `{rep['plan_source']}`; targets {', '.join(rep['targets'])}.",
        "",
        "Cards assumed: " + "; ".join(f"{k}: {c['name']}, {c['sm_count']} SMs, {c['peak_tb_per_s']:.2f} TB/s peak, "
                                      f"compiled for {c['target']}" for k, c in rep["cards"].items()) + ".",
        "",
        *[f"- {a}" for a in rep["assumptions"]],
        "",
    ]
    if rep["errors"]:
        out += ["## Compile errors", ""] + [f"- `{e['job']}`: {e['error'][:300]}" for e in rep["errors"]] + [""]

    out += [
        "## Benchmark shapes: launch plans and structure",
        "",
        "Programs per SM and resident blocks: per launch, on the H100 plan (sm_90) / the A100 plan (sm_80). "
        "X loads: the widths (bits) of the loads of X in the loops that stream X, sm_90. "
        "BAR.SYNC: per loop that streams X, sm_90.",
        "",
        "| B, C, HxW | dtype | layout | dir | launches (grid) H100 "
        "| programs/SM H100 / A100 | blocks/SM resident sm_90 / sm_80 | X loads (bits) | BAR.SYNC in X loops |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rep["shapes"]:
        h, a = row["cards"].get("H100"), row["cards"].get("A100")
        if not h:
            continue
        lns_a = a["launches"] if a else [None] * len(h["launches"])
        grids = "<br>".join(_grid(ln) for ln in h["launches"])
        pps = "<br>".join(f"{lh['programs_per_sm']:.2f} / " + (f"{la['programs_per_sm']:.2f}" if la else "-")
                          for lh, la in zip(h["launches"], lns_a, strict=False))
        res = "<br>".join(f"{lh['resident_blocks_per_sm']} / " + (f"{la['resident_blocks_per_sm']}" if la else "-")
                          for lh, la in zip(h["launches"], lns_a, strict=False))
        widths = "<br>".join(",".join(map(str, ln["x_load_widths_bits"])) or "-" for ln in h["launches"])
        bars = "<br>".join(",".join(map(str, ln["bar_sync_in_streaming_loops"])) or "-" for ln in h["launches"])
        out.append(
            f"| {row['B']}, {row['C']}, {row['HxW']} | {row['dtype']} | {row['layout']} | {_DIR[row['direction']]} "
            f"| {grids} | {pps} | {res} | {widths} | {bars} |"
        )

    out += [
        "",
        "## Benchmark shapes: bytes and bandwidth-bound times (us)",
        "",
        "Est: the plan's bytes at the card's peak. Floors: one read of X; forward (K+1) reads; "
        "backward one read plus one write of X. 1 tile in flight: the latency bound described above.",
        "",
        "| B, C, HxW | dtype | layout | dir | X MB | moved MB "
        "| H100 est | H100 1-read | H100 floor | H100 1 tile in flight "
        "| A100 est | A100 1-read | A100 floor | A100 1 tile in flight |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rep["shapes"]:
        cells = []
        for card in ("H100", "A100"):
            c = row["cards"].get(card)
            if not c:
                cells += ["-"] * 4
                continue
            floor = c.get("k_plus_1_reads_us", c.get("read_and_write_us"))
            cells += [_us(c["bandwidth_bound_us"]), _us(c["one_read_us"]), _us(floor), _us(c["one_tile_in_flight_us"])]
        moved = row["cards"].get("H100", row["cards"].get("A100", {})).get("bytes_moved", 0)
        out.append(
            f"| {row['B']}, {row['C']}, {row['HxW']} | {row['dtype']} | {row['layout']} | {_DIR[row['direction']]} "
            f"| {row['x_bytes'] / 1e6:.1f} | {moved / 1e6:.1f} | " + " | ".join(cells) + " |"
        )

    targets = rep["targets"]
    out += [
        "",
        "## Resources per compiled variant",
        "",
        "Per target: registers / spilled bytes (local + stack) / shared bytes (dynamic + static) / threads per block / "
        "resident blocks per SM (limited by).",
        "",
        "| launch | variant | " + " | ".join(targets) + " |",
        "|---|---|" + "---|" * len(targets),
    ]
    for v in rep["variants"]:
        desc = f"{v['x_dtype']}; " + ", ".join(f"{k}={val}" for k, val in v["constexprs"].items())
        if v["divisibility_16"]:
            desc += "; div16: " + ",".join(v["divisibility_16"])
        cells = []
        for t in targets:
            r = v["targets"].get(t)
            if r is None:
                cells.append("-")
            elif "error" in r:
                cells.append("ERROR")
            else:
                spill = (r["local_bytes"] or 0) + (r["stack_bytes"] or 0)
                cells.append(
                    f"{r['registers']} / {spill} / {r['shared_dynamic_bytes'] + (r['shared_static_bytes'] or 0)} / "
                    f"{r['threads_per_block']} / {r['blocks_per_sm']} ({','.join(r['limited_by'])})"
                )
        out.append(f"| {v['launch']} | {desc} | " + " | ".join(cells) + " |")

    out += ["", "## Loops of the SASS at the benchmark shapes (sm_90)", "",
            "Each backward branch closes a loop; `source` is the `for` it comes from. Instructions and counts cover "
            "the loop's address range, nested loops included.", ""]
    shown = set()
    for row in rep["shapes"]:
        h = row["cards"].get("H100")
        if not h:
            continue
        for v in rep["variants"]:
            r = v["targets"].get("sm_90")
            if not r or "loops" not in r:
                continue
            tag = (
                f"{v['launch']} {row['dtype']} {row['layout']} {row['B']}, {row['C']}, {row['HxW']} {row['direction']}"
            )
            if not any(u.startswith(f"{row['direction']} B={row['B']} C={row['C']} {row['HxW']} K={row['K']} "
                                    f"{row['dtype']} {row['layout']} H100") for u in v["used_by"]):
                continue
            ident = id(v)
            if ident in shown:
                continue
            shown.add(ident)
            out += [
                f"### {tag}",
                "",
                f"{r['registers']} registers, {r['instructions']} instructions.",
                "",
                "| loop | depth | source "
                "| streams X | instr | BAR.SYNC | SHFL | X loads (bits: count) | all global loads |",
                "|---|---|---|---|---|---|---|---|---|",
            ]
            for i, lp in enumerate(r["loops"]):
                xw = ", ".join(f"{w}: {n}" for w, n in lp["x_tile_load_widths"].items()) or "-"
                allw = (
                    "; ".join(
                        f"{s} " + ",".join(f"{w}x{n}" for w, n in c.items()) for s, c in lp["global_loads"].items()
                    )
                    or "-"
                )
                out.append(
                    f"| {i} {lp['start']}-{lp['end']} | {lp['depth']} | {lp['source'] or '?'} | "
                    f"{'yes' if lp['streams_x'] else ''} "
                    f"| {lp['instructions']} | {lp['bar_sync']} | {lp['shuffles']} | {xw} | {allw} |"
                )
            out.append("")
    return "\n".join(out) + "\n"


def write_report(rep: dict, out_dir: Path, stem: str = "kernels-static") -> tuple[Path, Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    js, md = out_dir / f"{stem}.json", out_dir / f"{stem}.md"
    js.write_text(json.dumps(rep, separators=(",", ":")) + "\n")  # compact: per-loop detail of every variant
    md.write_text(render_markdown(rep))
    return js, md


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(prog="python -m bench.kernels", description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=None, help="output directory (default: a new scratch directory)")
    ap.add_argument("--targets", default=",".join(map(str, TARGETS)), help="compute capabilities, e.g. 90,80,89")
    ap.add_argument("--stem", default="kernels-static", help="file name stem (default kernels-static)")
    ap.add_argument("--workers", type=int, default=2, help="compile processes (default 2)")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        _worker()
        return {}
    targets = tuple(int(t) for t in args.targets.split(",") if t)
    unknown = [t for t in targets if t not in ARCH_LIMITS]
    if unknown:
        ap.error(f"--targets: expected compute capabilities among {sorted(ARCH_LIMITS)}; got {unknown}")
    col = collect([{"kind": "variants"}] + bench_requests(), targets)
    print(f"{len(col.jobs)} compilations ({len(targets)} targets), plans from {col.source_name}", file=sys.stderr)
    compiled = compile_collected(col, args.workers)
    rep = build_report(col, compiled, targets)
    out = args.out or Path(tempfile.mkdtemp(prefix="kernels-static-"))
    js, md = write_report(rep, out, args.stem)
    print(f"{STATIC_NOTE}\nwrote {js} and {md}", file=sys.stderr)
    return rep


if __name__ == "__main__":
    main()
