"""Progress of the long offline commands (``extract-latents``, ``sample``, ``fid``): a tqdm bar, or with
``--no-progress`` one status line every ``every_s`` seconds (done / total, img/s, ETA), so that cluster
logs show where a job is without a bar's carriage returns. Under torchrun only rank 0 reports, its own
share, with the all-rank rate estimated as ``world_size`` times its own.
"""
from __future__ import annotations

import sys
import time
from typing import TextIO

STATUS_EVERY_S = 30.0


def format_eta(seconds: float) -> str:
    """``H:MM:SS`` (``?`` when unknown)."""
    if not seconds >= 0 or seconds == float("inf"):
        return "?"
    s = int(round(seconds))
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}"


class ProgressReporter:
    """Count ``total`` items (images) of one rank's share: a tqdm bar when ``bar``, else a status line on
    ``stream`` at most every ``every_s`` seconds and once at :meth:`close`. ``enabled=False`` (ranks
    other than 0) reports nothing. ``world_size`` > 1 adds the estimated rate of all ranks."""

    def __init__(self, total: int, *, desc: str, bar: bool = True, enabled: bool = True, unit: str = "img",
                 every_s: float = STATUS_EVERY_S, world_size: int = 1, stream: TextIO | None = None,
                 clock=time.perf_counter):
        if every_s <= 0:
            raise ValueError(f"status interval must be > 0 seconds, got {every_s}")
        self.total, self.desc, self.unit, self.every_s = int(total), desc, unit, float(every_s)
        self.world_size, self.done, self.enabled = world_size, 0, enabled
        self.stream = stream if stream is not None else sys.stderr
        self._clock = clock
        self._t0 = self._last = clock()
        self._bar = None
        if enabled and bar:
            from tqdm.auto import tqdm

            self._bar = tqdm(total=self.total, desc=desc, unit=unit, dynamic_ncols=True, file=self.stream)

    @property
    def rate(self) -> float:
        """Items per second of this rank so far."""
        return self.done / max(self._clock() - self._t0, 1e-9)

    def status_line(self) -> str:
        rate = self.rate
        pct = 100.0 * self.done / self.total if self.total else 100.0
        eta = (self.total - self.done) / rate if rate > 0 else float("inf")
        line = (f"{self.desc}: {self.done}/{self.total} {self.unit} ({pct:.1f}%), {rate:.1f} {self.unit}/s, "
                f"ETA {format_eta(eta)}")
        if self.world_size > 1:
            line += f" [rank 0 of {self.world_size}; all ranks ~{rate * self.world_size:.1f} {self.unit}/s]"
        return line

    def update(self, n: int) -> None:
        self.done += n
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.update(n)
            return
        now = self._clock()
        if now - self._last >= self.every_s:
            self._last = now
            print(self.status_line(), file=self.stream, flush=True)

    def close(self) -> None:
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.close()
        else:
            print(self.status_line() + " done", file=self.stream, flush=True)


def add_progress_arguments(parser) -> None:
    """``--no-progress`` and ``--status-every`` for a command."""
    parser.add_argument("--no-progress", action="store_true",
                        help="no progress bar: print a one-line status (done, img/s, ETA) every --status-every s")
    parser.add_argument("--status-every", type=float, default=STATUS_EVERY_S, metavar="SECONDS",
                        help="seconds between status lines with --no-progress")
