"""Rebuilding read models from the log: into a fresh schema, up to a sequence or a moment,
and comparing a rebuild with the live read models."""

from __future__ import annotations

import asyncio
import contextlib
import json
import uuid
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, TypedDict

from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy
from sqlalchemy import select, text
from sqlalchemy.ext.asyncio import AsyncEngine

from runledger.commands.events import EventEnvelope
from runledger.infra.database import check_database, create_engine, migrate
from runledger.infra.event_store import EventStore
from runledger.infra.settings import Settings

from .runner import (
    ApplyFailure,
    Projector,
    RawEvent,
    advance_checkpoint,
    apply_batch,
    apply_in_pieces,
    is_transient,
    projection_subjects,
    read_checkpoint,
)
from .tables import MIGRATIONS, READ_MODEL_TABLES, projection_checkpoints


class _PullState(TypedDict):
    open: int  # messages the open pull request may still bring
    status: str | None  # the status that ended it
    pending: int  # messages the consumer had left after the last one delivered


async def iter_log(store: EventStore, subject_filter: str | Sequence[str], start_seq: int = 1, *,
                   until_seq: int | None = None, chunk: int = 4000) -> AsyncIterator[list[RawEvent]]:
    """The log in stream order, in chunks, up to `until_seq` (default: the end of the log when
    called), of the subjects `subject_filter` names (one filter, or several). Reads through an ephemeral pull consumer without acks: its deliveries carry only
    the stored headers and take the sequence from the reply subject, where a direct get's
    replies carry six more headers to parse per event. The next chunk is pulled while the
    caller works on the current one. The server removes the consumer if we die."""
    target = until_seq if until_seq is not None else await store.last_sequence()
    if target < start_seq:
        return
    nc, stream = store.nc, store.stream
    # Named here, so the create subject carries the name: the analyst role may create only
    # consumers named in the subject (infra/broker_auth.py), never the service's.
    filters = [subject_filter] if isinstance(subject_filter, str) else list(subject_filter)
    config = ConsumerConfig(
        name=f"read_{uuid.uuid4().hex}", filter_subject=filters[0] if len(filters) == 1 else None,
        filter_subjects=filters if len(filters) > 1 else None,
        ack_policy=AckPolicy.NONE, deliver_policy=DeliverPolicy.BY_START_SEQUENCE,
        opt_start_seq=max(1, start_seq), inactive_threshold=60, mem_storage=True, num_replicas=1,
    )
    consumer = await store.js.add_consumer(stream, config)
    api = f"{store.settings.js_api_prefix}.CONSUMER.MSG.NEXT.{stream}.{consumer.name}"
    inbox = nc.new_inbox()
    arrived: list[RawEvent] = []
    state: _PullState = {"open": 0, "status": None, "pending": 1}
    ready = asyncio.Event()

    async def on_message(msg) -> None:
        status = msg.headers.get("Status") if msg.headers else None
        if status:
            state["open"], state["status"] = 0, status
        else:
            tokens = msg.reply.split(".")
            stream_seq = int(tokens[5] if len(tokens) == 9 else tokens[7])
            stored_ns = int(tokens[7] if len(tokens) == 9 else tokens[9])
            state["pending"] = int(tokens[8] if len(tokens) == 9 else tokens[10])
            arrived.append(RawEvent(stream_seq, msg.subject, msg.data, stored_ns))
            state["open"] -= 1
        if state["open"] <= 0:
            ready.set()

    async def pull() -> None:
        state.update({"open": chunk, "status": None})
        ready.clear()
        await nc.publish(api, json.dumps({"batch": chunk, "no_wait": True}).encode(), reply=inbox)

    sub = await nc.subscribe(inbox, cb=on_message)
    try:
        await pull()
        while True:
            async with asyncio.timeout(store.settings.request_timeout * 4):
                await ready.wait()
            if state["status"] not in (None, "404", "408"):
                raise RuntimeError(f"reading the log failed: pull request ended with status {state['status']}")
            got = arrived[:]
            arrived.clear()
            done = not got or got[-1].seq >= target or state["pending"] == 0
            if not done:
                await pull()  # the next chunk travels while the caller applies this one
            kept = [e for e in got if e.seq <= target]
            if kept:
                yield kept
            if done or len(kept) < len(got):
                return
    finally:
        with contextlib.suppress(Exception):
            await sub.unsubscribe()
        with contextlib.suppress(Exception):
            await store.js.delete_consumer(stream, consumer.name)


def _stored_by(raw: RawEvent, moment: datetime) -> bool:
    """Whether the stream had stored the event by `moment`: by the stream's own time, which
    follows stream order (an event's `occurred` is when its command was decided, and two
    service instances decide side by side: a later event may say an earlier moment). Without
    the stored time, by `occurred`."""
    if raw.stored_ns:
        return raw.stored_ns <= int(moment.timestamp() * 1_000_000) * 1_000
    try:
        return EventEnvelope.model_validate_json(raw.data).occurred <= moment
    except ValueError:
        return True


MADE_BY_REPLAY = "made_by_replay"  # the marker table of a schema replay made, naming it


def default_schema(settings: Settings) -> str:
    """Where `runledger replay` rebuilds unless told otherwise."""
    return f"{settings.namespace}_replay"


class SchemaNotMadeByReplay(Exception):
    """The schema to rebuild into exists, holds something, and replay did not make it:
    dropping it would destroy what it holds (another service's tables, a typo's `public`)."""

    def __init__(self, schema: str, default: str):
        super().__init__(f'schema "{schema}" exists and was not made by replay; replay into --schema {default} '
                         f"or a new schema, or drop it yourself if it may go")
        self.schema = schema


async def _take_schema(engine: AsyncEngine, schema: str, default: str) -> None:
    """Leave `schema` empty and marked as replay's, or raise SchemaNotMadeByReplay. A rebuild
    drops its schema first (CASCADE), so it takes only a schema that is new, empty, its own
    default, or marked as made by replay under this name: the marker records the name, so a
    replayed schema renamed into service (the recovery swap in docs/operations.md) is no
    longer replay's to drop. The mark is made with the schema, in one transaction, so that a
    rebuild that dies half-way leaves a schema the next one may take."""
    if schema in ("public", "information_schema") or schema.startswith("pg_"):
        raise SchemaNotMadeByReplay(schema, default)  # the database's own, empty or not
    async with engine.begin() as conn:
        await conn.execute(text("SELECT pg_advisory_xact_lock(hashtext(:s))"), {"s": f"runledger-migrate:{schema}"})
        oid = (await conn.execute(text("SELECT oid FROM pg_namespace WHERE nspname = :s"), {"s": schema})).scalar()
        if oid is not None:
            marker = (await conn.execute(text("SELECT to_regclass(format('%I.%I', CAST(:s AS text), CAST(:t AS text)))"),
                                         {"s": schema, "t": MADE_BY_REPLAY})).scalar()
            made_here = marker is not None and schema in (await conn.execute(
                text(f'SELECT schema_name FROM "{schema}".{MADE_BY_REPLAY}'))).scalars().all()
            # What DROP SCHEMA ... CASCADE would remove: everything that depends on the schema.
            holds = (await conn.execute(text(
                "SELECT count(*) FROM pg_depend WHERE refclassid = 'pg_namespace'::regclass AND refobjid = :oid"),
                {"oid": oid})).scalar()
            if made_here or schema == default:
                await conn.execute(text(f'DROP SCHEMA "{schema}" CASCADE'))
                oid = None
            elif holds:
                raise SchemaNotMadeByReplay(schema, default)
        if oid is None:
            await conn.execute(text(f'CREATE SCHEMA "{schema}"'))
        await conn.execute(text(f'CREATE TABLE "{schema}".{MADE_BY_REPLAY} (schema_name text NOT NULL, '
                                "made timestamptz NOT NULL DEFAULT now())"))
        await conn.execute(text(f'INSERT INTO "{schema}".{MADE_BY_REPLAY} (schema_name) VALUES (:s)'), {"s": schema})


@dataclass
class ReplayResult:
    schema: str
    events: int
    last_seq: int  # the stream sequence the rebuild reflects
    seconds: float
    per_projection: dict[str, int] = field(default_factory=dict)


async def replay(
    settings: Settings,
    store: EventStore,
    projectors: Sequence[Projector],
    schema: str,
    *,
    until_seq: int | None = None,
    as_of: datetime | None = None,
    on_progress: Callable[[int, int], None] | None = None,
    until_each: Mapping[str, int] | None = None,
) -> ReplayResult:
    """Rebuild every read model into `schema` (dropped first; only a new or empty schema or
    one replay made, see `_take_schema`) from the log. `as_of`: only the events the stream
    had stored by that moment (a prefix of the log). `until_each`:
    a stream sequence per projection to stop each at (the live positions `verify` compares
    with: projections advance on their own, so at any moment they may differ).

    It reads the whole log, or the subjects of the one projection it rebuilds
    (`projection_subjects`), skipping the events no projection reads unparsed (by the type
    in their subject). A consumer filtered to the subjects of several read models, which are
    most of the log's aggregate types anyway, delivered 422 events/s from a log of task runs
    (nats-server looks through every subject of a message block for each next message, and
    each task run is a subject) where the whole log comes at ~180,000 events/s
    (docs/benchmarks.md, session 11). Having read the log up to its target, it sets each
    projection's checkpoint to its target: a live projection's position is often an event of
    another read model, or the stream's last sequence, which the rebuild never reads."""
    import time

    started = time.perf_counter()
    engine = create_engine(settings, schema=schema, pool_size=2)
    try:
        await check_database(engine, settings)
        await _take_schema(engine, schema, default_schema(settings))
        await migrate(engine, schema, MIGRATIONS)
        if until_each is not None:
            until_seq = max(until_each.values(), default=0)
        target = until_seq if until_seq is not None else await store.last_sequence()
        done = last = 0
        stopped = False
        subjects = sorted({s for p in projectors for s in projection_subjects(p, settings.event_subject_prefix)})
        read = subjects[0] if len(subjects) == 1 else f"{settings.event_subject_prefix}.>"
        async for batch in iter_log(store, read, until_seq=target):
            if as_of is not None:
                # The log as it was at that moment: the events stored by then, a prefix.
                cut = next((i for i, r in enumerate(batch) if not _stored_by(r, as_of)), len(batch))
                stop = cut < len(batch)
                batch = batch[:cut]
            else:
                stop = False
            if batch:
                await _apply_chunk(engine, projectors, batch, until_each)
                done += len(batch)
                last = batch[-1].seq
                if on_progress:
                    on_progress(done, last)
            if stop:
                stopped = True
                break
        if not stopped:  # the log was read up to the target: that is where each projection is
            await _mark_positions(engine, {p.name: until_each.get(p.name, 0) if until_each is not None else target
                                           for p in projectors})
            last = max(last, target)
        return ReplayResult(schema, done, last, time.perf_counter() - started)
    finally:
        await engine.dispose()


async def _mark_positions(engine: AsyncEngine, positions: Mapping[str, int]) -> None:
    """Each projection's checkpoint moved up to its position (never back)."""
    now = datetime.now(UTC)
    async with engine.begin() as conn:
        for name, seq in positions.items():
            checkpoint = await read_checkpoint(conn, name, lock=True)
            if seq > checkpoint:
                await advance_checkpoint(conn, name, checkpoint, seq, now)


class ReplayStopped(Exception):
    """The rebuild met an event a projection cannot apply; everything before it is in the
    schema."""

    def __init__(self, failure: ApplyFailure):
        super().__init__(f"replay stopped at stream sequence {failure.seq} ({failure.event_type}) in projection "
                         f"{failure.projection}: {failure.error}")
        self.failure = failure


async def _apply_chunk(engine: AsyncEngine, projectors: Sequence[Projector], batch: Sequence[RawEvent],
                       until_each: Mapping[str, int] | None = None) -> None:
    if until_each is not None and any(batch[-1].seq > until_each.get(p.name, 0) for p in projectors):
        for projector in projectors:  # each up to its own position
            mine = [r for r in batch if r.seq <= until_each.get(projector.name, 0)]
            if mine:
                await _apply_chunk(engine, [projector], mine)
        return
    try:
        async with engine.begin() as conn:
            for projector in projectors:
                await apply_batch(conn, projector, batch)
        return
    except Exception as e:
        if is_transient(e):
            raise
    _, failure = await apply_in_pieces(engine, projectors, batch)
    if failure is not None:
        raise ReplayStopped(failure)


def _normalise(value: Any) -> Any:
    if isinstance(value, dict | list):
        return json.dumps(value, sort_keys=True, default=str)
    return value


async def snapshot(engine: AsyncEngine, projection_names: Sequence[str]) -> tuple[int, dict[str, dict[Any, dict]]]:
    """The read models and the lowest sequence they reflect, read in one consistent snapshot."""
    positions, tables = await snapshot_each(engine, projection_names)
    seq = min(positions.values()) if len(positions) == len(projection_names) else 0
    return seq, tables


async def snapshot_each(engine: AsyncEngine, projection_names: Sequence[str],
                        ) -> tuple[dict[str, int], dict[str, dict[Any, dict]]]:
    """The read models and each projection's position, read in one consistent snapshot."""
    async with engine.connect() as conn:
        await conn.execute(text("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ"))
        rows = await conn.execute(select(projection_checkpoints.c.name, projection_checkpoints.c.last_seq))
        positions = {r.name: r.last_seq for r in rows if r.name in projection_names}
        tables: dict[str, dict[Any, dict]] = {}
        for table in READ_MODEL_TABLES:
            result = await conn.execute(select(table))
            tables[table.name] = {r.id: {k: _normalise(v) for k, v in r._mapping.items()} for r in result}
        await conn.rollback()
    return positions, tables


@dataclass(frozen=True)
class Difference:
    table: str
    key: Any
    kind: str  # "only live" | "only rebuilt" | "differs"
    detail: str


def compare(live: dict[str, dict[Any, dict]], rebuilt: dict[str, dict[Any, dict]]) -> list[Difference]:
    out: list[Difference] = []
    for table in sorted(set(live) | set(rebuilt)):
        a, b = live.get(table, {}), rebuilt.get(table, {})
        for key in sorted(set(a) | set(b), key=str):
            if key not in b:
                out.append(Difference(table, key, "only live", json.dumps(a[key], default=str)))
            elif key not in a:
                out.append(Difference(table, key, "only rebuilt", json.dumps(b[key], default=str)))
            elif a[key] != b[key]:
                cols = sorted(c for c in set(a[key]) | set(b[key]) if a[key].get(c) != b[key].get(c))
                detail = "; ".join(f"{c}: live={a[key].get(c)!r} rebuilt={b[key].get(c)!r}" for c in cols)
                out.append(Difference(table, key, "differs", detail))
    return out
