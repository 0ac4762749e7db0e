"""Benchmarks for brnpa-triton: ``python -m bench.run --quick`` (see bench/run.py).

``bench.providers`` holds the implementations compared (one registry), ``bench.timing`` the
timers, peak-memory probes and copy-bandwidth measurement, ``bench.run`` the presets, the
runner and the JSON / markdown / PNG writers.
"""
