"""A one-line progress display for long loops over images (prepare, submit)."""

from __future__ import annotations

import sys
import time

LOG_INTERVAL_S = 60.0  # not a TTY (a log file): one line a minute, not one per update


def duration(seconds: float) -> str:
    """``42 s``, ``7 min 05 s``, ``1 h 02 min``."""
    seconds = max(0, int(round(seconds)))
    if seconds < 60:
        return f"{seconds} s"
    if seconds < 3600:
        return f"{seconds // 60} min {seconds % 60:02d} s"
    return f"{seconds // 3600} h {seconds % 3600 // 60:02d} min"


class Progress:
    """A one-line progress display on stderr (redrawn on a TTY, a line a minute otherwise)
    plus a final line. While running it shows images/s and an ETA, both from the updates
    after the first: the first one carries the start-up (loading networks, tracing)."""

    def __init__(self, label: str, total: int, enabled: bool) -> None:
        self.label, self.total, self.enabled = label, total, enabled
        self.tty = enabled and sys.stderr.isatty()
        self.done = 0
        self.start = time.perf_counter()
        self._first: tuple[float, int] | None = None  # (time, done) at the first update
        self._logged = self.start

    def _line(self, final: bool = False) -> str:
        now = time.perf_counter()
        seconds = now - self.start
        rate = self.done / seconds if seconds > 0 else 0.0
        eta = ""
        if not final and self._first is not None and self.done > self._first[1]:
            rate = (self.done - self._first[1]) / max(now - self._first[0], 1e-9)
            eta = f", ETA {duration((self.total - self.done) / rate)}"
        digits = 2 if rate < 10 else 1  # 1024 px with folds runs at a fraction of an image/s
        return (f"{self.label}: {self.done}/{self.total} images, {rate:.{digits}f} img/s, "
                f"{seconds:.1f} s{eta}")

    def restart(self) -> None:
        self.start = self._logged = time.perf_counter()
        self._first = None

    def update(self, n: int) -> None:
        self.done += n
        if self._first is None:
            self._first = (time.perf_counter(), self.done)
        if self.tty:
            sys.stderr.write("\r" + self._line() + "\033[K")
            sys.stderr.flush()
        elif self.enabled and time.perf_counter() - self._logged >= LOG_INTERVAL_S:
            self._logged = time.perf_counter()
            sys.stderr.write(self._line() + "\n")
            sys.stderr.flush()

    def close(self) -> None:
        if self.enabled:
            line = self._line(final=True)
            sys.stderr.write(("\r" + line + "\033[K" if self.tty else line) + "\n")
            sys.stderr.flush()
