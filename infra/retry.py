"""Bounded retries with exponential backoff and full jitter for transient storage faults.

Only `TransientStorageError` is retried: backends translate their native exceptions first, so the
decision "transient or permanent" is made once, by class, in the backend.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from typing import TypeVar

from pydantic import BaseModel, ConfigDict, Field

from infra.errors import TransientStorageError

__all__ = ["RetryPolicy", "retry_call"]

T = TypeVar("T")


class RetryPolicy(BaseModel):
    """How often and how patiently a transient fault is retried."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    max_attempts: int = Field(default=6, ge=1, description="attempts in all, the first included")
    base_delay_s: float = Field(default=0.1, ge=0.0)
    max_delay_s: float = Field(default=8.0, ge=0.0)

    def delay(self, attempt: int, rng: random.Random | None = None) -> float:
        """Full-jitter delay before retry number `attempt` (1-based).

        Full jitter (uniform in [0, cap]) spreads a fleet of workers hit by the same SlowDown so
        they do not retry in lockstep.
        """
        cap = min(self.max_delay_s, self.base_delay_s * (2 ** (attempt - 1)))
        return (rng or random).uniform(0.0, cap)


def retry_call(
    fn: Callable[[], T],
    policy: RetryPolicy,
    *,
    sleep: Callable[[float], None] = time.sleep,
) -> T:
    """Call `fn`, retrying `TransientStorageError` up to `policy.max_attempts` attempts in all.

    The last transient error is re-raised unchanged once attempts are spent; any other error
    propagates at once.
    """
    attempt = 1
    while True:
        try:
            return fn()
        except TransientStorageError:
            if attempt >= policy.max_attempts:
                raise
            sleep(policy.delay(attempt))
            attempt += 1
