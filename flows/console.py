"""What the console shows of a Prefect run: the CLI's one line, not Prefect's tracebacks.

Prefect's engine logs every failed task and flow run at ERROR with its traceback (about 60 lines
for one bad weight), and then the CLI prints its own one-line message. A bad weight, a failed
gate or a failed unit is an expected outcome, so on the console those engine records are held
back; the run is still marked failed on the Prefect server, with the message as its state
message, and the records still reach the server's log. `-v` or QUANTFLEET_DEBUG=1 shows them.
For an unexpected error nothing is lost: the CLI re-raises it with its own traceback.
"""

from __future__ import annotations

import logging
import os

__all__ = ["hide_run_failures_on_console"]

# The loggers Prefect's run engines report task and flow run states on.
_RUN_LOGGERS = ("prefect.task_runs", "prefect.flow_runs")


class _HideRunFailures(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.levelno >= logging.ERROR and record.name.startswith(_RUN_LOGGERS))


def hide_run_failures_on_console(verbose: bool = False) -> None:
    """Filter the console handlers (idempotent); a no-op with `verbose` or QUANTFLEET_DEBUG.

    The engine's records reach the console through the root logger's handlers (Prefect's console
    handler, or the CLI's own when it configured logging first); the Prefect server gets them
    through the handlers on the run loggers themselves, which are left alone.
    """
    if verbose or os.environ.get("QUANTFLEET_DEBUG"):
        return
    for handler in logging.getLogger().handlers:
        if not any(isinstance(f, _HideRunFailures) for f in handler.filters):
            handler.addFilter(_HideRunFailures())
