"""What a person sees while a command runs: log lines and progress bars.

Why one place: every command and every Ray worker sets up the same log format, and the long
stages (sharding, tokenizing) show the same kind of bar; filtering framework noise belongs here
too, at the source, rather than in each command.
"""
from __future__ import annotations

import importlib.util
import logging
import sys
import time
import warnings

from tqdm import tqdm

LOG_FORMAT = "%(asctime)s %(name)s %(message)s"


# Framework lines that tell a user of this system nothing, each dropped by its exact opening at the
# logger that emits it, never by level, so that a real error or an unknown warning still shows.
QUIET_LINES: dict[str, tuple[str, ...]] = {
    # a local Ray announcing the token authentication it turned on by default (it stays on)
    "ray._private.authentication.authentication_token_setup":
        ("Token authentication is enabled for this Ray cluster",),
    # Ray Train's placement-group cleaner asks the State API every second whether the controller
    # lives; without the dashboard (local runs start none) that API is absent and every poll warns
    "ray.train.v2._internal.execution.controller.placement_group_cleaner":
        ("Failed to query Ray Train Controller actor state",),
    # Ray Train's resource request timing out on a busy CPU; Ray's own line calls it safe to ignore
    "ray.train.v2._internal.execution.scaling_policy.autoscaling_coordinator_client":
        ("Failed to send resource request for",),
    # DeepSpeed's print() after it loads its CPU comm op (Ray Train turns a worker's prints into
    # root-logger records)
    "": ("DeepSpeed deepspeed.ops.comm.deepspeed_shm_comm_op built successfully",),
}
# Loggers named by their module's file path (Ray's ``getLogger(__file__)``), so the level set in
# RunConfig's logging_config, which covers ``ray.train.*`` names, misses them.
QUIET_FILE_LINES: dict[str, tuple[str, ...]] = {
    # the full metrics dict of every ray.train.report, at INFO
    "ray.train.v2._internal.execution.context": ("Reporting training result",),
}
# Deprecation notices about the frameworks' own internals (not calls made here), by exact text.
QUIET_WARNINGS = [
    (FutureWarning, r"`torch\.distributed\.all_gather_into_tensor` is deprecated\. Please use "
                    r"`torch\.distributed\.all_gather_single` instead"),
]


class _DropLines(logging.Filter):
    def __init__(self, openings: tuple[str, ...]):
        super().__init__()
        self.openings = openings

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(self.openings)


def _drop(logger: logging.Logger, openings: tuple[str, ...]) -> None:
    if not any(isinstance(f, _DropLines) for f in logger.filters):
        logger.addFilter(_DropLines(openings))


def quiet_frameworks() -> None:
    """Install the filters above in this process (idempotent). Ray runs it in every worker process
    of a job (``worker_process_setup_hook``), Ray Train's own actors included."""
    for name, openings in QUIET_LINES.items():
        _drop(logging.getLogger(name), openings)
    if "ray" in sys.modules:   # (only processes that run Ray need these; finding them imports Ray)
        for module, openings in QUIET_FILE_LINES.items():
            spec = importlib.util.find_spec(module)
            if spec is not None and spec.origin:
                _drop(logging.getLogger(spec.origin), openings)
    for category, message in QUIET_WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=category)


def setup_logging(level: int = logging.INFO) -> None:
    """Log lines of every mqscale logger on stderr, timestamped (a no-op when already set up), and
    the frameworks' chatter filtered (``quiet_frameworks``)."""
    logging.basicConfig(level=level, format=LOG_FORMAT)
    quiet_frameworks()


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
