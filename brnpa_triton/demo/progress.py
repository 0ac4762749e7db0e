"""Progress display for the demo: a tqdm bar when tqdm is installed, otherwise one line per
``line()`` call on stderr; nothing at all when disabled."""

from __future__ import annotations

import sys


class Progress:
    def __init__(self, total: int, desc: str, enabled: bool = True, unit: str = "step") -> None:
        self.enabled, self.total, self.n, self.desc = enabled, total, 0, desc
        self.bar = None
        if enabled:
            try:
                from tqdm.auto import tqdm

                self.bar = tqdm(total=total, desc=desc, unit=unit, dynamic_ncols=True, leave=True)
            except ImportError:
                self.bar = None

    def update(self, count: int = 1, postfix: str | None = None) -> None:
        self.n += count
        if self.bar is not None:
            if postfix is not None:
                self.bar.set_postfix_str(postfix, refresh=False)
            self.bar.update(count)

    def line(self, text: str) -> None:
        """A milestone: printed only without tqdm (the bar shows it otherwise)."""
        if self.enabled and self.bar is None:
            print(f"{self.desc} [{self.n}/{self.total}] {text}", file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
