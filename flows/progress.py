"""Progress of a conversion for whoever watches it (the CLI's progress bar).

The hook lives here rather than in the flow's parameters because Prefect records parameters,
and a callback is not data.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar

from workers.records import UnitResult
from workers.units import WorkUnit

__all__ = ["UnitHook", "progress_hook", "reporting_progress"]

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
