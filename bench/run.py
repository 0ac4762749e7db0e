"""Entry point: ``python -m bench.run [--quick | --foundation | --full | --micro] [options]``.

The guide (presets, options, providers, how to read the tables) is bench/README.md;
``python -m bench.run --help`` lists the flags. From Python, ``bench.run.main(["--quick"])``
returns the result record and writes its files; ``bench.run.run(config)`` does the same from a
``bench.presets.Config``.
"""

from bench.cli import main
from bench.presets import DTYPES, MODES, Config
from bench.runner import SCHEMA, run

__all__ = ["DTYPES", "MODES", "SCHEMA", "Config", "main", "run"]

if __name__ == "__main__":
    main()
