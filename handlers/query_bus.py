"""Query answering from the Postgres read models, with bounded read-your-writes waits.

A query's `min_seq` asks the service to wait until the read models have applied that stream
sequence: every projection, unless `QueryBus.reads` names the ones a query reads. The service
names none yet: a query may join other read models' tables (deployments read flows, pools
and queues), so only an explicit list per query could say, and a wrong one would break
read-your-writes. Idle projections are woken by a wait in the projections' own process
(`CheckpointWatch.on_wait`), so waiting for all of them costs little.

A read model stopped at an event it cannot apply (a stall: projections/runner.py) at or before
a `min_seq` can never reach it: the wait leaves it out, the query answers from it as it stands
and says so in the reply (`stalled`), rather than every read failing while the stall lasts.

Such waits are bounded three ways: a `min_seq` beyond the stream's last sequence is refused
at once (`invalid`: it can never be reached); at most `max_waiting` queries wait at once
(more: `unavailable`, busy); and a waiting query holds no database slot, so ordinary queries
go on beside any number of waits.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from pydantic import BaseModel
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from runledger.commands.messages import ErrorCode, Rejection
from runledger.projections.tables import projection_checkpoints, projection_failures

from .command_bus import error, ok, parse_payload
from .endpoint import extend_deadline, run_bounded

log = logging.getLogger("runledger.queries")

QueryFn = Callable[[AsyncConnection, Any], Awaitable[Any]]

POLL_SECONDS = 0.02
MAX_WAITING = 32
FIRST_WAIT_SECONDS = 0.05  # before asking the stream whether a `min_seq` can be reached at all
STALLS_SECONDS = 1.0  # how long the projections known to be stalled are taken as known


@dataclass
class CheckpointWatch:
    """How far each read model has got. A projection runner in this process reports each
    position through `applied`; for the others one shared poller reads the checkpoints table
    while anyone waits (not one poll per waiter).

    A wait names the projections it needs (the ones its query reads; all by default): each
    projection filters the log to its own events, so one with nothing to do for a while
    moves past other events only when it probes (projections/runner.py). `on_wait` tells
    this process's runner that a query waits for one of its projections, so it probes at
    once instead of at its next turn."""

    engine: AsyncEngine
    projections: Sequence[str]
    local: bool = False
    on_wait: Callable[[str, int], None] | None = None
    _positions: dict[str, int] = field(default_factory=dict)  # reported by this process's runner
    _polled: dict[str, int] = field(default_factory=dict)  # read from the checkpoints table
    _changed: asyncio.Event = field(default_factory=asyncio.Event)
    _waiters: int = 0
    _poller: asyncio.Task | None = None
    # The projections stalled at an event, as last read (`stalled_before`), and when.
    _stalls: dict[str, tuple[int, str]] = field(default_factory=dict)
    _stalls_at: float = float("-inf")

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

    def names(self, projections: Sequence[str] | None) -> Sequence[str]:
        return self.projections if projections is None else projections

    async def stalled_before(self, seq: int, projections: Sequence[str] | None = None) -> list[dict[str, Any]]:
        """Those of `projections` (default: all) stopped at an event they cannot apply at or
        before `seq`, which they cannot reach until that is mended: `{"projection", "seq",
        "event_type"}` each, from the failures table (read at most every `STALLS_SECONDS`)."""
        loop = asyncio.get_running_loop()
        if loop.time() - self._stalls_at > STALLS_SECONDS:
            async with self.engine.connect() as conn:
                rows = await conn.execute(select(projection_failures.c.projection, projection_failures.c.seq,
                                                 projection_failures.c.event_type))
                self._stalls = {r.projection: (r.seq, r.event_type) for r in rows}
            self._stalls_at = loop.time()
        names = self.names(projections)
        return [{"projection": n, "seq": self._stalls[n][0], "event_type": self._stalls[n][1]}
                for n in names if n in self._stalls and self._stalls[n][0] <= seq]

    def _unreported(self, projections: Sequence[str] | None = None) -> list[str]:
        """The projections whose position only the checkpoints table knows."""
        return [n for n in self.names(projections) if n not in self._positions]

    def known(self, projections: Sequence[str] | None = None) -> int:
        """The lowest position of `projections` (default: all) known without a database
        round trip (0 when one is unknown)."""
        names = self.names(projections)
        if not names:
            return 0
        return min(max(self._positions.get(n, 0), self._polled.get(n, 0)) for n in names)

    async def position(self, projections: Sequence[str] | None = None) -> int:
        unreported = self._unreported(projections)
        if unreported:
            async with self.engine.connect() as conn:
                rows = await conn.execute(select(projection_checkpoints.c.name, projection_checkpoints.c.last_seq).where(
                    projection_checkpoints.c.name.in_(unreported)))
                for name, seq in rows:
                    if seq > self._polled.get(name, 0):
                        self._polled[name] = seq
        return self.known(projections)

    async def _poll(self) -> None:
        while self._waiters > 0:
            before = dict(self._polled)
            try:
                async with asyncio.timeout(5):
                    await self.position()
            except Exception:  # the database is away: the waits end at their own deadlines
                await asyncio.sleep(0.5)
            if self._polled != before:
                self._notify()
            await asyncio.sleep(POLL_SECONDS)
        self._poller = None

    async def wait_for(self, seq: int, timeout: float, projections: Sequence[str] | None = None) -> bool:
        """Whether `projections` (default: all) reached `seq` within `timeout` seconds."""
        if self.known(projections) >= seq:
            return True
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        self._waiters += 1
        try:
            if self.on_wait is not None:
                for name in self.names(projections):
                    if self._positions.get(name, seq) < seq:
                        self.on_wait(name, seq)
            with contextlib.suppress(Exception):  # a stalled database: wait for the poller
                if self.known(projections) < seq and await run_bounded(self.position(projections), min(timeout, 5.0)) >= seq:
                    return True
            while True:
                changed = self._changed
                if self.known(projections) >= seq:
                    return True
                remaining = deadline - loop.time()
                if remaining <= 0:
                    return False
                if self._unreported(projections):
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
    # Query name -> the projections whose read models it reads (every table it may join):
    # its `min_seq` waits for those alone. A query not named here waits for every projection.
    reads: Mapping[str, Sequence[str]] = field(default_factory=dict)
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
        reads = self.reads.get(name)
        stalled: list[dict[str, Any]] = []
        try:
            min_seq = getattr(parsed, "min_seq", None)
            if min_seq and self.watch.known(reads) < min_seq:
                refused, stalled = await self._wait(min_seq, reads)
                if refused is not None:
                    return refused
            async with self._slots, asyncio.timeout(self.timeout + 1.0):  # a backstop: the endpoint's deadline answers first
                result, seq = await self._read(fn, parsed, reads)
            reply = ok(result, seq)
            if stalled:
                reply["stalled"] = stalled
            return reply
        except Rejection as r:
            refused = {"ok": False, "error": r.as_reply()}
            if stalled:  # a "not found" may be the stall's doing: said in the message
                refused["stalled"] = stalled
                refused["error"]["message"] += "".join(
                    f" (read model {s['projection']} is stalled at stream sequence {s['seq']}: it lacks what came after)"
                    for s in stalled)
            return refused
        except TimeoutError:
            return error(ErrorCode.UNAVAILABLE, f"query {name} did not finish within {self.timeout:g} s (the database "
                                                "may be slow or unreachable); retry")
        except Exception:
            log.exception("query %s failed", name)
            return error(ErrorCode.UNAVAILABLE, f"query {name} failed on the server; see the service log")

    async def _read(self, fn: QueryFn, parsed: BaseModel, reads: Sequence[str] | None) -> tuple[Any, int | None]:
        async with self.engine.connect() as conn:
            result = await fn(conn, parsed)
        return result, (await self.watch.position(reads) if self.watch.local else None)

    async def _wait(self, min_seq: int, reads: Sequence[str] | None = None
                    ) -> tuple[dict[str, Any] | None, list[dict[str, Any]]]:
        """(None, stalled) once the read models `reads` (default: all) reached `min_seq`, but
        for those stalled before it (`stalled`: they cannot get there until mended, and a
        query that waited for them would fail, every read with it, for as long as the stall
        lasts; it answers from them as they stand and says so); else (the reply that refuses
        it, []).

        Usually the read model is a few milliseconds behind a client's own write: a short wait
        first, and only if that is not enough one round trip to learn the stream's last
        sequence (a `min_seq` beyond it is refused), and one to learn the stalls."""
        if self._waiting >= self.max_waiting:
            return error(ErrorCode.UNAVAILABLE, f"busy: {self._waiting} queries already wait for the read model to "
                                                "catch up; retry shortly"), []
        self._waiting += 1
        # The wait is bounded by itself: the request's deadline is moved by the time it takes.
        loop = asyncio.get_running_loop()
        started = loop.time()
        extend_deadline(self.wait_timeout)
        stalled: list[dict[str, Any]] = []
        waits: Sequence[str] | None = reads  # None: every projection
        try:
            if await self.watch.wait_for(min_seq, min(FIRST_WAIT_SECONDS, self.wait_timeout), reads):
                return None, []
            if self.last_sequence is not None and min_seq > max(self._known_last, self.watch.known(reads)):
                self._known_last = max(self._known_last, await run_bounded(self.last_sequence(), self.timeout))
                if min_seq > self._known_last:
                    return error(ErrorCode.INVALID, f"min_seq {min_seq} is beyond the stream's last sequence "
                                                    f"{self._known_last}: it can never be reached", field="min_seq"), []
            with contextlib.suppress(Exception):  # the database away: the wait ends at its deadline
                stalled = await run_bounded(self.watch.stalled_before(min_seq, reads), self.timeout)
            if stalled:
                gone = {s["projection"] for s in stalled}
                waits = [n for n in self.watch.names(reads) if n not in gone]
            reached = (waits is not None and not waits) or await self.watch.wait_for(
                min_seq, max(0.0, self.wait_timeout - (loop.time() - started)), waits)
        finally:
            self._waiting -= 1
            extend_deadline(-max(0.0, self.wait_timeout - (loop.time() - started)))
        if not reached:
            return error(ErrorCode.UNAVAILABLE, f"the read model did not reach stream sequence {min_seq} within "
                                                f"{self.wait_timeout:g} s"), []
        return None, stalled
