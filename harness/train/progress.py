"""Progress bars of training's phases (data rendering, tokenisation, the steps): a live tqdm bar on a terminal;
in a log file (stderr not a terminal) one plain line per `LOG_INTERVAL_S` with tqdm's rate and ETA, so that a
long phase shows a sign of life without flooding the log with carriage returns."""

from __future__ import annotations

import sys
from typing import Any, TextIO

__all__ = ["LOG_INTERVAL_S", "bar"]

LOG_INTERVAL_S = 30.0  # seconds between lines when the output is a log, not a terminal


class _Lines:
    """A stream for tqdm that turns its carriage-return redraws into whole lines."""

    def __init__(self, stream: TextIO):
        self.stream = stream

    def write(self, text: str) -> None:
        line = text.replace("\r", "").rstrip()
        if line:
            self.stream.write(line + "\n")

    def flush(self) -> None:
        self.stream.flush()


def _is_terminal(stream: TextIO) -> bool:
    isatty = getattr(stream, "isatty", None)
    return bool(isatty and isatty())


def bar(total: int, desc: str, unit: str, enabled: bool = True, stream: TextIO | None = None, **kwargs: Any):
    """A tqdm bar over `total` units; in a log, sparse plain lines (first at once, then every LOG_INTERVAL_S,
    and the final count when it closes)."""
    from tqdm.auto import tqdm

    stream = stream or sys.stderr
    if _is_terminal(stream):
        return tqdm(total=total, desc=desc, unit=unit, disable=not enabled, file=stream, leave=False,
                    dynamic_ncols=True, **kwargs)
    return tqdm(total=total, desc=desc, unit=unit, disable=not enabled, file=_Lines(stream), leave=True,
                mininterval=LOG_INTERVAL_S, maxinterval=LOG_INTERVAL_S, ncols=100, ascii=True, **kwargs)
