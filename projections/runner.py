"""Runs projectors over the event log, exactly once in effect.

One durable pull consumer per projection. Each fetched batch is applied in one Postgres
transaction together with the projection's checkpoint (the last applied stream sequence), and
acknowledged only after the commit. Events at or below the checkpoint are skipped, so a
redelivery after a crash changes nothing. At start the consumer is re-created at checkpoint+1:
the checkpoint in Postgres, not the consumer's ack state, is the position of record. A gap in
the consumer sequence (a fetched batch lost in the client) also re-creates it, so no event is
ever passed over.

Driven with nats-py directly: FastStream's default ack policy drops a message whose handler
raises, and its pull loop can drop a fetched batch (../shared/notes/STACK-FACTS.md).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Protocol

import nats.errors
from nats.aio.client import Client as NATS
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy
from nats.js.errors import NotFoundError
from pydantic import ValidationError
from sqlalchemy import select
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from runledger.commands.events import EventEnvelope, UnknownEvent
from runledger.commands.messages import Event
from runledger.infra.settings import Settings

from .tables import projection_checkpoints, skipped_events

log = logging.getLogger("runledger.projections")


class Projector(Protocol):
    name: str
    handles: frozenset[str]
    tables: tuple

    async def apply(self, conn: AsyncConnection, events: Sequence[tuple[str, Event]]) -> None: ...


@dataclass(frozen=True)
class RawEvent:
    seq: int
    subject: str
    data: bytes


async def read_checkpoint(conn: AsyncConnection, name: str, *, lock: bool = False) -> int:
    stmt = select(projection_checkpoints.c.last_seq).where(projection_checkpoints.c.name == name)
    if lock:
        stmt = stmt.with_for_update()
    return (await conn.execute(stmt)).scalar_one_or_none() or 0


async def apply_batch(conn: AsyncConnection, projector: Projector, batch: Sequence[RawEvent]) -> int:
    """Apply the events above the checkpoint and move it, inside the caller's transaction.
    Returns the new checkpoint. Unreadable or unknown events are recorded and skipped."""
    checkpoint = await read_checkpoint(conn, projector.name, lock=True)
    fresh = [e for e in batch if e.seq > checkpoint]
    if not fresh:
        return checkpoint
    decoded: list[tuple[str, Event]] = []
    skipped: list[dict] = []
    now = datetime.now(UTC)
    for raw in fresh:
        try:
            envelope = EventEnvelope.model_validate_json(raw.data)
            if envelope.type not in projector.handles:
                continue
            decoded.append((envelope.aggregate_id, envelope.decode()))
        except (UnknownEvent, ValidationError, ValueError) as e:
            skipped.append({"projection": projector.name, "seq": raw.seq, "subject": raw.subject,
                            "reason": f"{type(e).__name__}: {e}"[:2000], "recorded": now})
    if decoded:
        await projector.apply(conn, decoded)
    if skipped:
        log.warning("projection %s skipped %d event(s) it cannot read, first at seq %d", projector.name, len(skipped), skipped[0]["seq"])
        await conn.execute(insert(skipped_events).on_conflict_do_nothing(), skipped)
    last = fresh[-1].seq
    stmt = insert(projection_checkpoints).values(name=projector.name, last_seq=last, updated=now)
    await conn.execute(stmt.on_conflict_do_update(index_elements=["name"], set_={"last_seq": last, "updated": now}))
    return last


@dataclass
class ProjectionRunner:
    nc: NATS
    settings: Settings
    engine: AsyncEngine
    projectors: Sequence[Projector]
    on_applied: Callable[[str, int], None] | None = None
    batch_size: int = 1000
    # Test hooks to simulate a crash between the steps that matter.
    crash_after_fetch: bool = False
    crash_after_commit: bool = False
    _tasks: list[asyncio.Task] = field(default_factory=list)
    applied: dict[str, int] = field(default_factory=dict)

    def consumer_name(self, projector: Projector) -> str:
        return f"projection_{projector.name}"

    async def start(self) -> None:
        for projector in self.projectors:
            self._tasks.append(asyncio.create_task(self._run(projector), name=f"projection:{projector.name}"))

    async def stop(self) -> None:
        for t in self._tasks:
            t.cancel()
        for t in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await t
        self._tasks.clear()

    async def _bind(self, projector: Projector):
        js = self.nc.jetstream(timeout=self.settings.request_timeout)
        async with self.engine.connect() as conn:
            checkpoint = await read_checkpoint(conn, projector.name)
        name = self.consumer_name(projector)
        with contextlib.suppress(NotFoundError):
            await js.delete_consumer(self.settings.stream_name, name)
        config = ConsumerConfig(
            durable_name=name,
            filter_subject=f"{self.settings.event_subject_prefix}.>",
            ack_policy=AckPolicy.ALL,
            ack_wait=300,
            max_ack_pending=-1,
            max_deliver=-1,
            deliver_policy=DeliverPolicy.BY_START_SEQUENCE if checkpoint else DeliverPolicy.ALL,
            opt_start_seq=checkpoint + 1 if checkpoint else None,
        )
        await js.add_consumer(self.settings.stream_name, config)
        sub = await js.pull_subscribe_bind(durable=name, stream=self.settings.stream_name)
        self.applied[projector.name] = checkpoint
        if self.on_applied:
            self.on_applied(projector.name, checkpoint)
        return sub

    async def _run(self, projector: Projector) -> None:
        while True:
            try:
                await self._consume(projector)
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("projection %s failed; restarting from its checkpoint in 1 s", projector.name)
                await asyncio.sleep(1)

    async def _consume(self, projector: Projector) -> None:
        sub = await self._bind(projector)
        expected_consumer_seq = None
        while True:
            try:
                msgs = await sub.fetch(self.batch_size, timeout=1.0)
            except (TimeoutError, nats.errors.TimeoutError):
                continue
            if not msgs:
                continue
            first = msgs[0].metadata.sequence.consumer
            if expected_consumer_seq is not None and first != expected_consumer_seq:
                log.warning("projection %s saw a delivery gap; re-binding at its checkpoint", projector.name)
                return  # _run re-binds at checkpoint + 1
            expected_consumer_seq = msgs[-1].metadata.sequence.consumer + 1
            batch = [RawEvent(m.metadata.sequence.stream, m.subject, m.data) for m in msgs]
            if self.crash_after_fetch:
                raise _SimulatedCrash("after fetch, before commit")
            started = time.perf_counter()
            async with self.engine.begin() as conn:
                last = await apply_batch(conn, projector, batch)
            if self.crash_after_commit:
                raise _SimulatedCrash("after commit, before ack")
            await msgs[-1].ack()  # AckPolicy.ALL: acknowledges the whole batch
            self.applied[projector.name] = last
            if self.on_applied:
                self.on_applied(projector.name, last)
            log.debug("projection %s applied %d events in %.1f ms", projector.name, len(batch), (time.perf_counter() - started) * 1000)


class _SimulatedCrash(BaseException):
    """Stops a runner dead, like a killed process (not caught by the restart loop)."""
