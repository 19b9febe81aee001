"""Progress of a conversion for whoever watches it (the CLI's progress bar).

The hook lives here rather than in the flow's parameters because Prefect records parameters,
and a callback is not data.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from typing import TextIO

from workers.records import UnitResult
from workers.units import WorkUnit

__all__ = ["UnitHook", "log_lines_above_bars", "progress_hook", "reporting_progress"]

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


@contextmanager
def log_lines_above_bars() -> Iterator[None]:
    """Inside this block, records reaching the root logger's console handlers print on lines of
    their own above the progress bars, instead of running on from a bar's carriage return.

    Import Prefect before entering: its logging set-up, on first import, replaces root handlers
    it does not take for the user's own, and this block's wrappers would be among them."""
    root = logging.getLogger()
    handlers = list(root.handlers)
    root.handlers = [_above_bars(h) for h in handlers]
    try:
        yield
    finally:
        root.handlers = handlers
