"""A task worker's reports to the service, sent together when they come together.

Each task run costs a worker two reports (its start, its outcome), and a busy worker makes
many at the same moment: the runs it started together end together. Sent one request each,
every report pays the request's own cost on the worker, the broker and the service, which
is about half of what a report costs there. So a report made while `REQUESTS_OUT` requests
are already out waits for one of them to come back and goes with the others made meanwhile,
as one `SetTaskRunStates`. A lone report still goes at once, alone: nothing waits on a
timer, so an idle worker's reports are as quick as before.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import Awaitable, Callable
from typing import Any

# Requests out at once, per worker. One would make every report wait for a slow one.
REQUESTS_OUT = 2
# What one request carries at most: the command's own limit, and a body a broker takes
# whatever the results (a result of up to 256 KiB travels in its report).
MAX_REPORTS_PER_REQUEST = 100
MAX_REQUEST_BYTES = 512 * 1024
# After a request of several reports got no answer, reports go one by one this long.
ALONE_AFTER_FAILURE_SECONDS = 60.0

log = logging.getLogger("runledger.task_worker")

# (command name, body) -> the reply, decoded; raises when no reply came (a timeout, no
# responders, a broker away).
Request = Callable[[str, bytes], Awaitable[dict[str, Any]]]


class ReportBatcher:
    """`report(body)` answers each `SetTaskRunState` body with its own reply, as if it had been
    sent alone, or raises what its request raised."""

    def __init__(self, request: Request) -> None:
        self._request = request
        self._waiting: list[tuple[bytes, asyncio.Future[dict[str, Any]]]] = []
        self._out = 0  # requests out now
        self._sending: set[asyncio.Task[None]] = set()
        self.bulks = 0  # `SetTaskRunStates` answered item by item so far (tests, benchmarks)
        self._alone_until = 0.0  # loop time before which reports go one by one (a bulk got no answer)

    async def report(self, body: dict[str, Any]) -> dict[str, Any]:
        encoded = json.dumps(body).encode()
        if self._out < REQUESTS_OUT and not self._waiting:
            # Room: sent at once, from here (a task of its own would cost a turn of the loop).
            self._out += 1
            try:
                return await self._request("SetTaskRunState", encoded)
            finally:
                self._out -= 1
                self._send_waiting()
        future: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._waiting.append((encoded, future))
        self._send_waiting()
        return await future

    def _send_waiting(self) -> None:
        while self._waiting and self._out < REQUESTS_OUT:
            self._out += 1
            task = asyncio.create_task(self._send(self._next_request()))
            self._sending.add(task)
            task.add_done_callback(self._sent)

    def _sent(self, task: asyncio.Task[None]) -> None:
        self._sending.discard(task)
        self._out -= 1
        self._send_waiting()

    def _next_request(self) -> list[tuple[bytes, asyncio.Future[dict[str, Any]]]]:
        """The oldest reports waiting, as many as one request carries (at least one)."""
        taken, size = 0, 0
        for body, _ in self._waiting:
            if taken and (taken == MAX_REPORTS_PER_REQUEST or size + len(body) > MAX_REQUEST_BYTES):
                break
            taken, size = taken + 1, size + len(body) + 1
        batch, self._waiting = self._waiting[:taken], self._waiting[taken:]
        return batch

    async def _send(self, batch: list[tuple[bytes, asyncio.Future[dict[str, Any]]]]) -> None:
        batch = [(body, future) for body, future in batch if not future.done()]  # callers gone
        if len(batch) == 1:
            await self._send_one(*batch[0])
            return
        if not batch:
            return
        loop = asyncio.get_running_loop()
        if loop.time() < self._alone_until:
            await asyncio.gather(*(self._send_one(body, future) for body, future in batch))
            return
        try:
            reply = await self._request("SetTaskRunStates", b'{"states":[' + b",".join(b for b, _ in batch) + b"]}")
        except Exception as e:
            # No answer. A broker whose configuration predates the command refuses it without
            # one, and the request times out: each alone now (as a resend after a lost reply
            # would be), and none together for a while.
            log.warning("a task worker's reports sent together got no answer (%s); sending them one by one "
                        "for %.0f s (if the broker refuses %s, regenerate its configuration: "
                        "runledger broker-config)", type(e).__name__, ALONE_AFTER_FAILURE_SECONDS, "SetTaskRunStates")
            self._alone_until = loop.time() + ALONE_AFTER_FAILURE_SECONDS
            await asyncio.gather(*(self._send_one(body, future) for body, future in batch))
            return
        items = reply.get("result") if reply.get("ok") else None
        if not isinstance(items, list) or len(items) != len(batch):
            # Refused whole (one invalid item refuses all; a service without the command): each
            # alone, so that each hears its own answer.
            await asyncio.gather(*(self._send_one(body, future) for body, future in batch))
            return
        self.bulks += 1
        for (_, future), item in zip(batch, items, strict=True):
            if not future.done():
                future.set_result(item)

    async def _send_one(self, body: bytes, future: asyncio.Future[dict[str, Any]]) -> None:
        try:
            reply = await self._request("SetTaskRunState", body)
        except Exception as e:
            if not future.done():
                future.set_exception(e)
            return
        with contextlib.suppress(asyncio.InvalidStateError):
            future.set_result(reply)
