"""Shared test helpers."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")

AGENT_SLOTS = 2  # slots of the session cluster's agent


def eventually(fn: Callable[[], T], timeout: float = 20.0, interval: float = 0.05) -> T:
    """Return fn()'s first truthy value, or fail after ``timeout`` with its last result."""
    deadline = time.monotonic() + timeout
    last: T = fn()
    while not last:
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout}s; last value: {last!r}")
        time.sleep(interval)
        last = fn()
    return last
