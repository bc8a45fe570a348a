"""What a person sees while a command runs: log lines and progress bars.

Why one place: every command and every Ray worker sets up the same log format, and the long
stages (sharding, tokenizing) show the same kind of bar; filtering framework noise belongs here
too, at the source, rather than in each command.
"""
from __future__ import annotations

import logging
import time

from tqdm import tqdm

LOG_FORMAT = "%(asctime)s %(name)s %(message)s"


def setup_logging(level: int = logging.INFO) -> None:
    """Log lines of every mqscale logger on stderr, timestamped (a no-op when already set up)."""
    logging.basicConfig(level=level, format=LOG_FORMAT)


class Progress:
    """A progress bar with items/s on stderr (tqdm), silent when disabled."""

    def __init__(self, total: int, desc: str, unit: str, enabled: bool = True):
        self.t0 = time.perf_counter()
        self.count = 0
        self.bar = tqdm(total=total, desc=desc, unit=unit, dynamic_ncols=True, smoothing=0.1) if enabled else None

    def update(self, n: int = 1) -> None:
        self.count += n
        if self.bar is not None:
            self.bar.update(n)

    def close(self) -> float:
        """Closes the bar; returns items/s over its lifetime."""
        if self.bar is not None:
            self.bar.close()
        dt = time.perf_counter() - self.t0
        return self.count / dt if dt > 0 else 0.0
