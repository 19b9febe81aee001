"""Progress of a conversion for whoever watches it (the CLI's progress bar).

The hook lives here rather than in the flow's parameters because Prefect records parameters,
and a callback is not data.
"""

from __future__ import annotations

import logging
import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any, TextIO

from workers.records import UnitResult
from workers.units import WorkUnit

__all__ = ["UnitHook", "printing_above_bars", "progress_bar", "progress_hook", "reporting_progress"]

UnitHook = Callable[[WorkUnit, UnitResult], None]

_hook: ContextVar[UnitHook | None] = ContextVar("quantfleet_progress", default=None)
_global_hook: list[UnitHook] = []


def progress_hook() -> UnitHook | None:
    """The hook to call as each unit finishes, if someone is watching."""
    return _hook.get() or (_global_hook[0] if _global_hook else None)


@contextmanager
def reporting_progress(hook: UnitHook) -> Iterator[None]:
    """Call `hook` for every finished unit of conversions run inside this block."""
    token = _hook.set(hook)
    # Prefect runs tasks in worker threads that do not inherit context variables.
    _global_hook.insert(0, hook)
    try:
        yield
    finally:
        _hook.reset(token)
        _global_hook.remove(hook)


# Where no one watches a bar redraw in place (a scheduler's or CI's log, a file), how often it
# writes a line: carriage-return redraws reach such a log as one line, at the end of the run.
LOG_INTERVAL_S = 30.0


def progress_bar(**options: Any) -> Any:
    """A tqdm bar on stderr (`options`: tqdm's). On a terminal it redraws in place; elsewhere each
    redraw is a line of its own, at most every LOG_INTERVAL_S and once at the end."""
    from tqdm import tqdm

    if sys.stderr.isatty():
        return tqdm(file=sys.stderr, dynamic_ncols=True, **options)
    return tqdm(file=_RedrawsAsLines(sys.stderr), mininterval=LOG_INTERVAL_S, ncols=100, **options)


class _RedrawsAsLines:
    """A stream for a bar that is not on a terminal: each redraw ("\r" + the bar) becomes a line,
    and a redraw that repeats the last line or only clears it is dropped."""

    def __init__(self, stream: TextIO) -> None:
        self.stream = stream
        self.last = ""

    def write(self, text: str) -> int:
        line = text.replace("\r", "").rstrip()
        if line and line != self.last:
            self.stream.write(line + "\n")
            self.stream.flush()
            self.last = line
        return len(text)

    def flush(self) -> None:
        self.stream.flush()


class _AboveBars(logging.Handler):
    """A console handler that clears the progress bars before its record and redraws them after.

    It wraps the handler rather than replacing it (as tqdm's own logging redirect does), so the
    handler keeps its filters, formatter and colours: Prefect's console handler among them.
    """

    def __init__(self, inner: logging.StreamHandler[TextIO]) -> None:
        super().__init__(inner.level)
        self.inner = inner

    def handle(self, record: logging.LogRecord) -> bool:
        from tqdm import tqdm

        if not self.filter(record):
            return False
        with tqdm.external_write_mode(file=self.inner.stream):
            return bool(self.inner.handle(record))

    def emit(self, record: logging.LogRecord) -> None:  # handle() does the work
        self.inner.emit(record)


def _above_bars(handler: logging.Handler) -> logging.Handler:
    if isinstance(handler, logging.StreamHandler) and handler.stream in (sys.stdout, sys.stderr):
        return _AboveBars(handler)
    return handler


class _LinesAboveBars:
    """A console stream whose whole lines are written with the progress bars cleared, then
    redrawn. Ray prints its workers' log lines ("(convert pid=...) ...") to whatever `sys.stderr`
    is when they arrive, from a thread of its own."""

    def __init__(self, stream: TextIO) -> None:
        self.stream = stream
        self.pending = ""
        self.lock = threading.Lock()

    def write(self, text: str) -> int:
        from tqdm import tqdm

        with self.lock:
            lines, newline, self.pending = (self.pending + text).rpartition("\n")
            if newline:
                with tqdm.external_write_mode(file=self.stream):
                    self.stream.write(lines + newline)
                    self.stream.flush()
        return len(text)

    def close_line(self) -> None:
        if self.pending:
            self.write("\n")

    def __getattr__(self, name: str) -> Any:  # flush, fileno, isatty, encoding, ...
        return getattr(self.stream, name)


@contextmanager
def printing_above_bars() -> Iterator[None]:
    """Inside this block, what is printed to the console while progress bars are drawn prints on
    lines of its own above them, instead of running on from a bar's carriage return: records
    reaching the root logger's console handlers, and lines written to `sys.stdout`/`sys.stderr`
    (Ray's worker logs among them). Bars made before entering keep the real streams.

    Import Prefect before entering: its logging set-up, on first import, replaces root handlers
    it does not take for the user's own, and this block's wrappers would be among them."""
    root = logging.getLogger()
    handlers = list(root.handlers)
    root.handlers = [_above_bars(h) for h in handlers]
    streams = sys.stdout, sys.stderr
    sys.stdout, sys.stderr = wrapped = _LinesAboveBars(streams[0]), _LinesAboveBars(streams[1])
    try:
        yield
    finally:
        sys.stdout, sys.stderr = streams
        root.handlers = handlers
        for stream in wrapped:
            stream.close_line()
