"""A one-line progress report for long preprocessing runs: documents/s, tokens/s, MB/s, ETA."""

from __future__ import annotations

import sys
import time
from typing import TextIO


def _clock(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


class Progress:
    """Redraws one line on a terminal (every 0.5 s); prints a line every 30 s to a log file."""

    def __init__(self, label: str, total_bytes: int, stream: TextIO = sys.stderr) -> None:
        self.label, self.total_bytes, self.stream = label, max(total_bytes, 1), stream
        self.tty = stream.isatty()
        self.interval = 0.5 if self.tty else 30.0
        self.start = self.last = time.perf_counter()
        self.shown = False

    def line(self, documents: int, tokens: int, text_bytes: int, input_bytes: int) -> str:
        elapsed = max(time.perf_counter() - self.start, 1e-9)
        done = min(input_bytes / self.total_bytes, 1.0)
        eta = elapsed * (1 - done) / done if done > 0 else float("nan")
        return (f"{self.label}: {documents:,} docs {documents / elapsed:,.0f}/s | "
                f"{tokens / elapsed / 1e6:.2f}M tokens/s | {text_bytes / elapsed / 1e6:.1f} MB/s | "
                f"{100 * done:.0f}% | ETA {_clock(eta) if eta == eta else '?'}")

    def update(self, documents: int, tokens: int, text_bytes: int, input_bytes: int, force: bool = False) -> None:
        now = time.perf_counter()
        if not force and now - self.last < self.interval:
            return
        self.last = now
        text = self.line(documents, tokens, text_bytes, input_bytes)
        self.stream.write(f"\r{text}\x1b[K" if self.tty else text + "\n")
        self.stream.flush()
        self.shown = True

    def close(self) -> None:
        if self.shown and self.tty:
            self.stream.write("\n")
            self.stream.flush()
