"""Benchmarks for brnpa-triton: ``python -m bench.run --quick`` (guide: bench/README.md).

One job per module: ``cli`` (flags, console summary), ``presets`` (what a run measures),
``runner`` (timing and memory probes of every provider), ``analysis`` (ratios, scaling, targets,
busy machine), ``report`` (JSON, markdown, plot), ``environment`` (machine record, CPU
allocator), ``providers`` (the implementations compared), ``timing`` (timers, peak memory, copy
bandwidth); ``run`` is the entry point.
"""
