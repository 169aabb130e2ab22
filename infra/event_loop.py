"""The event loop runledger's own long-running processes (`runledger serve`, `up`,
`task-worker`) run on: uvloop where it is installed (a dependency on Linux and macOS),
asyncio's own loop elsewhere, or when the setting `event_loop` (`RUNLEDGER_EVENT_LOOP`) says
`asyncio`.

Why: the service and the task workers spend a large part of their CPU in the event loop
itself (socket reads and writes, readiness polling, callbacks: a quarter of the service's
profile under load, half of a task worker's). uvloop does the loop's own part in C (libuv;
the system calls stay): in alternating rounds the service's CPU per flow run created was
2 - 8 % lower one request at a time and 5 - 17 % lower with 8 clients (`bench/event_loop.py`,
docs/benchmarks.md, session 15). The code is the same on both loops; the test suite runs
on uvloop (tests/conftest.py), asyncio's loop is checked by tests/unit/test_event_loop.py."""

from __future__ import annotations

import asyncio
import importlib.util
from collections.abc import Coroutine
from typing import Any, Literal, TypeVar

T = TypeVar("T")

EventLoop = Literal["uvloop", "asyncio"]


def uvloop_available() -> bool:
    return importlib.util.find_spec("uvloop") is not None


def chosen_loop(wanted: EventLoop) -> EventLoop:
    """The loop `wanted` gets here: uvloop only where it is installed."""
    return "uvloop" if wanted == "uvloop" and uvloop_available() else "asyncio"


def running_loop_name() -> str:
    """`uvloop` or `asyncio`: the kind of loop this code runs on (the service logs it)."""
    return type(asyncio.get_running_loop()).__module__.split(".")[0]


def run(main: Coroutine[Any, Any, T], wanted: EventLoop = "uvloop") -> T:
    """`asyncio.run(main)`, on uvloop when `wanted` and installed."""
    if chosen_loop(wanted) == "uvloop":
        import uvloop

        return uvloop.run(main)
    return asyncio.run(main)
