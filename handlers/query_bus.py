"""Query answering from the Postgres read models, with bounded read-your-writes waits.

A query's `min_seq` asks the service to wait until the read models have applied that stream
sequence. Such waits are bounded three ways: a `min_seq` beyond the stream's last sequence is
refused at once (`invalid`: it can never be reached); at most `max_waiting` queries wait at
once (more: `unavailable`, busy); and a waiting query holds no database slot, so ordinary
queries go on beside any number of waits.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from pydantic import BaseModel
from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from runledger.commands.messages import ErrorCode, Rejection
from runledger.projections.tables import projection_checkpoints

from .command_bus import error, ok, parse_payload
from .endpoint import extend_deadline, run_bounded

log = logging.getLogger("runledger.queries")

QueryFn = Callable[[AsyncConnection, Any], Awaitable[Any]]

POLL_SECONDS = 0.02
MAX_WAITING = 32
FIRST_WAIT_SECONDS = 0.05  # before asking the stream whether a `min_seq` can be reached at all


@dataclass
class CheckpointWatch:
    """How far the read models have got. A projection runner in this process reports each
    commit through `applied`; otherwise one shared poller reads the checkpoints table while
    anyone waits (not one poll per waiter)."""

    engine: AsyncEngine
    projections: Sequence[str]
    local: bool = False
    _positions: dict[str, int] = field(default_factory=dict)
    _changed: asyncio.Event = field(default_factory=asyncio.Event)
    _polled: int = 0
    _waiters: int = 0
    _poller: asyncio.Task | None = None

    def applied(self, projection: str, seq: int) -> None:
        self._positions[projection] = seq
        self._notify()

    def released(self, projection: str) -> None:
        """This process stopped applying `projection` (its lease went to another process):
        from now on its position is read from the checkpoints table."""
        self._positions.pop(projection, None)
        self._notify()

    def _notify(self) -> None:
        changed, self._changed = self._changed, asyncio.Event()
        changed.set()

    def known(self) -> int:
        """The position known without a database round trip (0 when none is)."""
        if self.local and len(self._positions) == len(self.projections):
            return min(self._positions.values())
        return self._polled

    async def position(self) -> int:
        if self.local and len(self._positions) == len(self.projections):
            return min(self._positions.values())
        async with self.engine.connect() as conn:
            stmt = select(func.min(projection_checkpoints.c.last_seq), func.count()).where(
                projection_checkpoints.c.name.in_(list(self.projections))
            )
            low, count = (await conn.execute(stmt)).one()
        pos = (low or 0) if count == len(self.projections) else 0
        if pos > self._polled:
            self._polled = pos
        return pos

    async def _poll(self) -> None:
        while self._waiters > 0:
            before = self._polled
            try:
                async with asyncio.timeout(5):
                    await self.position()
            except Exception:  # the database is away: the waits end at their own deadlines
                await asyncio.sleep(0.5)
            if self._polled != before:
                self._notify()
            await asyncio.sleep(POLL_SECONDS)
        self._poller = None

    async def wait_for(self, seq: int, timeout: float) -> bool:
        if self.known() >= seq:
            return True
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        self._waiters += 1
        try:
            with contextlib.suppress(Exception):  # a stalled database: wait for the poller
                if self.known() < seq and await run_bounded(self.position(), min(timeout, 5.0)) >= seq:
                    return True
            while True:
                changed = self._changed
                if self.known() >= seq:
                    return True
                remaining = deadline - loop.time()
                if remaining <= 0:
                    return False
                if not self.local or len(self._positions) < len(self.projections):
                    if self._poller is None or self._poller.done():
                        self._poller = asyncio.create_task(self._poll())
                with contextlib.suppress(TimeoutError):
                    # asyncio.timeout, not wait_for: on 3.11 wait_for can swallow a cancel
                    async with asyncio.timeout(remaining):
                        await changed.wait()
        finally:
            self._waiters -= 1


@dataclass
class QueryBus:
    engine: AsyncEngine
    specs: dict[str, tuple[type[BaseModel], QueryFn]]
    watch: CheckpointWatch
    wait_timeout: float = 5.0
    # The stream's last sequence (a `min_seq` beyond it is refused); None: not checked.
    last_sequence: Callable[[], Awaitable[int]] | None = None
    # Queries reading the database at once, and how long one may take.
    concurrency: int = 64
    timeout: float = 4.0
    max_waiting: int = MAX_WAITING
    _slots: asyncio.Semaphore | None = None
    _waiting: int = 0
    _known_last: int = 0

    async def execute(self, name: str, raw: bytes) -> dict[str, Any]:
        spec = self.specs.get(name)
        if spec is None:
            return error(ErrorCode.INVALID, f"unknown query {name!r}")
        model, fn = spec
        parsed = parse_payload(model, raw)
        if isinstance(parsed, dict):
            return parsed
        if self._slots is None:
            self._slots = asyncio.Semaphore(self.concurrency)
        try:
            min_seq = getattr(parsed, "min_seq", None)
            if min_seq and self.watch.known() < min_seq:
                refused = await self._wait(min_seq)
                if refused is not None:
                    return refused
            async with self._slots, asyncio.timeout(self.timeout + 1.0):  # a backstop: the endpoint's deadline answers first
                result, seq = await self._read(fn, parsed)
            return ok(result, seq)
        except Rejection as r:
            return {"ok": False, "error": r.as_reply()}
        except TimeoutError:
            return error(ErrorCode.UNAVAILABLE, f"query {name} did not finish within {self.timeout:g} s (the database "
                                                "may be slow or unreachable); retry")
        except Exception:
            log.exception("query %s failed", name)
            return error(ErrorCode.UNAVAILABLE, f"query {name} failed on the server; see the service log")

    async def _read(self, fn: QueryFn, parsed: BaseModel) -> tuple[Any, int | None]:
        async with self.engine.connect() as conn:
            result = await fn(conn, parsed)
        return result, (await self.watch.position() if self.watch.local else None)

    async def _wait(self, min_seq: int) -> dict[str, Any] | None:
        """None once the read models reached `min_seq`; else the reply that refuses it.

        Usually the read model is a few milliseconds behind a client's own write: a short wait
        first, and only if that is not enough one round trip to learn the stream's last
        sequence (a `min_seq` beyond it is refused)."""
        if self._waiting >= self.max_waiting:
            return error(ErrorCode.UNAVAILABLE, f"busy: {self._waiting} queries already wait for the read model to "
                                                "catch up; retry shortly")
        self._waiting += 1
        # The wait is bounded by itself: the request's deadline is moved by the time it takes.
        loop = asyncio.get_running_loop()
        started = loop.time()
        extend_deadline(self.wait_timeout)
        try:
            if self.last_sequence is not None and min_seq > max(self._known_last, self.watch.known()):
                if await self.watch.wait_for(min_seq, min(FIRST_WAIT_SECONDS, self.wait_timeout)):
                    return None
                self._known_last = max(self._known_last, await run_bounded(self.last_sequence(), self.timeout))
                if min_seq > self._known_last:
                    return error(ErrorCode.INVALID, f"min_seq {min_seq} is beyond the stream's last sequence "
                                                    f"{self._known_last}: it can never be reached", field="min_seq")
            reached = await self.watch.wait_for(min_seq, max(0.0, self.wait_timeout - (loop.time() - started)))
        finally:
            self._waiting -= 1
            extend_deadline(-max(0.0, self.wait_timeout - (loop.time() - started)))
        if not reached:
            return error(ErrorCode.UNAVAILABLE, f"the read model did not reach stream sequence {min_seq} within "
                                                f"{self.wait_timeout:g} s")
        return None
