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
import json
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Protocol

from nats.aio.client import Client as NATS
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy
from nats.js.errors import NotFoundError
from pydantic import ValidationError
from pydantic_core import from_json
from sqlalchemy import select
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from runledger.commands.events import EVENT_TYPES, UnknownEvent, decode_event, upcast_payload
from runledger.commands.messages import Event
from runledger.infra.settings import Settings

from .tables import projection_checkpoints, skipped_events

log = logging.getLogger("runledger.projections")


class Projector(Protocol):
    """`apply` gets (aggregate id, event type, event) in stream order, for the types in
    `handles`: event models, or, when `raw_payloads` is true, the payload dicts in their current
    version's shape (the log was validated when written; a hot projector may skip validating
    it again)."""

    name: str
    handles: frozenset[str]
    tables: tuple
    raw_payloads: bool

    async def apply(self, conn: AsyncConnection, events: Sequence[tuple[str, str, Event | dict]]) -> None: ...


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
    decoded: list[tuple[str, str, Event | dict]] = []
    skipped: list[dict] = []
    now = datetime.now(UTC)
    raw_payloads = getattr(projector, "raw_payloads", False)
    for raw in fresh:
        try:
            # Plain JSON first: a projector skips the types it does not handle unvalidated.
            envelope = from_json(raw.data)
            event_type = envelope["type"]
            if event_type not in projector.handles:
                if event_type not in EVENT_TYPES:
                    raise UnknownEvent(f"unknown event type {event_type!r}")
                continue
            if raw_payloads:
                event = upcast_payload(event_type, envelope["schema_version"], envelope["payload"])
            else:
                event = decode_event(event_type, envelope["schema_version"], envelope["payload"])
            decoded.append((envelope["aggregate_id"], event_type, event))
        except (UnknownEvent, ValidationError, ValueError, KeyError, TypeError) as e:
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
        self.applied[projector.name] = checkpoint
        if self.on_applied:
            self.on_applied(projector.name, checkpoint)

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
        """Fetches the next batch while the current one is applied (the two round trips, to
        NATS and to Postgres, overlap); applies, commits and acknowledges strictly in order."""
        await self._bind(projector)
        batches: asyncio.Queue = asyncio.Queue(maxsize=2)
        reader = asyncio.create_task(self._read(projector, batches))
        try:
            while True:
                getting = asyncio.ensure_future(batches.get())
                try:
                    await asyncio.wait({getting, reader}, return_when=asyncio.FIRST_COMPLETED)
                except asyncio.CancelledError:
                    getting.cancel()
                    raise
                if not getting.done():  # the reader ended without handing anything over
                    getting.cancel()
                    raise RuntimeError("the projection's reader stopped") from (reader.exception() if not reader.cancelled() else None)
                item = getting.result()
                if isinstance(item, BaseException):
                    raise item
                if item is None:
                    return  # a delivery gap: _run re-binds at checkpoint + 1
                batch, last_msg = item
                if self.crash_after_fetch:
                    raise _SimulatedCrash("after fetch, before commit")
                started = time.perf_counter()
                async with self.engine.begin() as conn:
                    last = await apply_batch(conn, projector, batch)
                if self.crash_after_commit:
                    raise _SimulatedCrash("after commit, before ack")
                await last_msg.ack()  # AckPolicy.ALL: acknowledges the whole batch
                self.applied[projector.name] = last
                if self.on_applied:
                    self.on_applied(projector.name, last)
                log.debug("projection %s applied %d events in %.1f ms", projector.name, len(batch), (time.perf_counter() - started) * 1000)
        finally:
            reader.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await reader

    async def _read(self, projector: Projector, batches: asyncio.Queue) -> None:
        """Pulls with raw `CONSUMER.MSG.NEXT` requests into a callback subscription and hands
        over whatever has arrived as one batch. (nats-py's `fetch` waits on a timer per message,
        which cost a third of the projection's time at catch-up rates.) One pull request is
        open at a time; it ends when its messages have all come or the server sends a status
        (408: it expired)."""
        api = f"$JS.API.CONSUMER.MSG.NEXT.{self.settings.stream_name}.{self.consumer_name(projector)}"
        inbox = self.nc.new_inbox()
        arrived: list = []
        pull = {"open": 0, "status": None}  # messages the open request may still bring
        wake = asyncio.Event()

        async def on_message(msg) -> None:
            status = msg.headers.get("Status") if msg.headers else None
            if status:
                pull["open"], pull["status"] = 0, status
            else:
                arrived.append(msg)
                pull["open"] = max(0, pull["open"] - 1)
            wake.set()

        sub = None
        expected_consumer_seq = None
        try:
            sub = await self.nc.subscribe(inbox, cb=on_message)
            while True:
                if pull["open"] == 0:
                    if pull["status"] not in (None, "404", "408"):
                        raise RuntimeError(f"pull request failed with status {pull['status']}")
                    pull.update(open=self.batch_size, status=None)
                    request = {"batch": self.batch_size, "expires": 1_000_000_000}
                    await self.nc.publish(api, json.dumps(request).encode(), reply=inbox)
                try:
                    # Not `asyncio.wait_for`: on Python 3.11 it swallows a cancel that lands
                    # just after the event was set, and this reader, then never ending, held
                    # up the `await reader` of `_consume` (a crash or `stop()`) for good.
                    async with asyncio.timeout(5):
                        await wake.wait()
                except TimeoutError:
                    raise RuntimeError("the consumer stopped answering pull requests") from None
                wake.clear()
                if not arrived:
                    continue
                msgs = arrived[:]
                arrived.clear()
                first = _sequences(msgs[0].reply)[1]
                if expected_consumer_seq is not None and first != expected_consumer_seq:
                    log.warning("projection %s saw a delivery gap; re-binding at its checkpoint", projector.name)
                    await batches.put(None)
                    return
                expected_consumer_seq = _sequences(msgs[-1].reply)[1] + 1
                batch = [RawEvent(_sequences(m.reply)[0], m.subject, m.data) for m in msgs]
                await batches.put((batch, msgs[-1]))
        except asyncio.CancelledError:
            raise
        except Exception as e:  # hand it to the applying side, which restarts from the checkpoint
            await batches.put(e)
        finally:
            if sub is not None:
                with contextlib.suppress(Exception):
                    await sub.unsubscribe()


def _sequences(reply: str) -> tuple[int, int]:
    """(stream sequence, consumer sequence) from a JetStream ack subject, without building
    nats-py's full metadata object for every message:
    `$JS.ACK.<stream>.<consumer>.<delivered>.<sseq>.<cseq>.<ts>.<pending>` or the v2 form with a
    domain and an account hash after `ACK` and a random token at the end."""
    tokens = reply.split(".")
    if len(tokens) == 9:
        return int(tokens[5]), int(tokens[6])
    return int(tokens[7]), int(tokens[8])


class _SimulatedCrash(BaseException):
    """Stops a runner dead, like a killed process (not caught by the restart loop)."""
