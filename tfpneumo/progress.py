"""A one-line progress display for long loops over images (prepare, submit)."""

from __future__ import annotations

import sys
import time


class Progress:
    """A one-line progress display on stderr (redrawn only on a TTY) plus a final line."""

    def __init__(self, label: str, total: int, enabled: bool) -> None:
        self.label, self.total, self.enabled = label, total, enabled
        self.tty = enabled and sys.stderr.isatty()
        self.done = 0
        self.start = time.perf_counter()

    def _line(self) -> str:
        seconds = time.perf_counter() - self.start
        rate = self.done / seconds if seconds > 0 else 0.0
        return (f"{self.label}: {self.done}/{self.total} images, {rate:.1f} img/s, "
                f"{seconds:.1f} s")

    def restart(self) -> None:
        self.start = time.perf_counter()

    def update(self, n: int) -> None:
        self.done += n
        if self.tty:
            sys.stderr.write("\r" + self._line() + "\033[K")
            sys.stderr.flush()

    def close(self) -> None:
        if self.enabled:
            sys.stderr.write(("\r" + self._line() + "\033[K" if self.tty else self._line()) + "\n")
            sys.stderr.flush()
