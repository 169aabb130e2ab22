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

A projector that gives its batch as statements (`writes`) has it written in one statement
with its checkpoint, so in one round trip to Postgres (`apply_in_one_statement`).

One active runner per projection: each projection runs only while its runner holds the lease
`projection.<name>` (infra/leases.py); another runner on the same servers waits as a standby
and takes over when the holder stops or dies. As a second guard, the checkpoint only moves
forward from the value the transaction read: a transaction that would not advance it fails.

A projection that meets an event it cannot apply (a data error, not an outage) finds that one
event by applying the batch in smaller pieces, commits everything before it, and stops there:
the failure is kept in `projection_failures` (and `ProjectionRunner.failures`) for `runledger
status` and `verify` to report, and the event is tried again every `stall_retry_seconds`, so a
fixed projector or database resumes by itself.

Each projection's consumer is filtered to the aggregate types it reads (`<ns>.evt.<type>.>`
each; `projection_subjects`), derived from the event types it `handles` through the event
registry, so a projection never receives, wakes up for or acknowledges another read model's
events (the second projection had cost a quarter to a third of the command throughput when
every consumer read the whole log: docs/benchmarks.md).

Its position must still move past the events it never receives, or a read-your-writes query
would wait for a projection with nothing to do. An idle projection *probes*: it takes a
candidate sequence S, the highest position of another projection of this runner or the
stream's last sequence (asked at most every `STREAM_LAST_SECONDS`), and asks the stream, with
one direct get per subject (`next_by_subj` from its position + 1), for its first event after
its position. If there is none at or below S, its position becomes S. This is safe because
S was taken before the get and the stream only grows: every message at or below S is
already stored, so the get sees all of this projection's events up to S, and those at or
below its position are applied. The probe runs
inside the projection's own loop, so its position cannot move under it. A position so
reached is reported in memory and saved at once (one statement, forward only).

It probes `IDLE_PROBE_SECONDS` (0.1 s) after its last batch or probe, woken (another
projection of this runner moved past it) or not (for events no projection of this runner
reads); and, when a query in this process waits for it (`want`), once `PROBE_SECONDS` passed:
such a query waits a few milliseconds, one in another process up to a tenth of a second more. A projection that keeps receiving batches does not probe: its own events move
it, and a busy projection's probes would mostly find one of them first.

The consumer's own info (`num_pending == 0` and its delivered stream sequence) looks like a
cheaper answer but says what the server has *sent*, not what the projection has *applied*:
messages in the socket or the client's queue would be passed over unless acknowledgements
were reconciled too, and a filtered consumer's delivered sequence moves past other subjects
only when the server looks for its next message, which new events of other subjects do not
trigger. The direct get asks the store itself about exactly the range the position would
skip.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
import math
import re
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Protocol, TypedDict

import asyncpg
import nats.errors
from nats.aio.client import Client as NATS
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy
from nats.js.errors import NotFoundError
from pydantic import ValidationError
from pydantic_core import from_json
from sqlalchemy import case, delete, select
from sqlalchemy import exc as sa_exc
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from runledger.commands.events import (
    EVENT_TYPES,
    NewerThanReader,
    UnknownEvent,
    decode_event,
    upcast_payload,
)
from runledger.commands.messages import Event
from runledger.infra.database import DatabaseUnavailable, DriverConnections, asyncpg_connection
from runledger.infra.leases import DEFAULT_TTL_SECONDS, Lease, stop_if_cancelled
from runledger.infra.settings import Settings

from .bulk_writes import SharedArgument, Write
from .tables import projection_checkpoints, projection_failures, skipped_events

log = logging.getLogger("runledger.projections")


class _PullState(TypedDict):
    open: int  # messages the open pull request may still bring
    status: str | None  # the status that ended it


class Projector(Protocol):
    """`apply` gets (aggregate id, event type, event) in stream order, for the types in
    `handles`: event models, or, when `raw_payloads` is true, the payload dicts in their current
    version's shape (the log was validated when written; a hot projector may skip validating
    it again).

    Its consumer reads the aggregate types of the event types in `handles` (the event
    registry names each type's aggregate). A projector may name them itself with an
    optional `aggregate_types` attribute (a set of aggregate type names), e.g. to read an
    aggregate whose event types this process does not know.

    A projector whose batches are plain statements may also give them: an optional
    `writes(events)` returns them (`bulk_writes.Write`: the SQL and its arguments), touching
    rows no other of them touches, so that they may run in any order, as one statement with
    the checkpoint (`apply_in_one_statement`); or None when this batch's must run in order.
    Its `apply` then runs the same statements one after the other. It may also give the same
    writes from the events as stored, unparsed: an optional `raw_writes(events)` of
    `bulk_writes.StoredEvent`s (Postgres reads the rows out of the envelopes), used when every
    event of the batch is at its current schema version (`stored_events`)."""

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
    # When the stream stored it (ns since the epoch, the server's clock: in stream order); 0
    # when not read (`replay`'s `as_of` reads it).
    stored_ns: int = 0


# Idle projections' positions, saved together: forward only, whatever the rows hold.
_MOVE_CHECKPOINTS_FORWARD_SQL = (
    "INSERT INTO projection_checkpoints (name, last_seq, updated) "
    "SELECT name, last_seq, $3 FROM unnest($1::text[], $2::bigint[]) AS t(name, last_seq) "
    "ON CONFLICT (name) DO UPDATE SET last_seq = EXCLUDED.last_seq, updated = EXCLUDED.updated "
    "WHERE projection_checkpoints.last_seq < EXCLUDED.last_seq")


# Every batch reads and moves its checkpoint: through asyncpg itself (SQLAlchemy's statement
# execution cost ~6 % of the service's CPU at flow-run rates, for two one-row statements).
_READ_CHECKPOINT_SQL = "SELECT last_seq FROM projection_checkpoints WHERE name = $1"
_ADVANCE_CHECKPOINT_SQL = (
    "INSERT INTO projection_checkpoints (name, last_seq, updated) VALUES ($1, $2, $3) "
    "ON CONFLICT (name) DO UPDATE SET last_seq = EXCLUDED.last_seq, updated = EXCLUDED.updated "
    "WHERE projection_checkpoints.last_seq = $4 AND projection_checkpoints.last_seq < EXCLUDED.last_seq")


async def _driver(conn: AsyncConnection) -> Any:
    return await asyncpg_connection(conn)  # in the batch's transaction


async def read_checkpoint(conn: AsyncConnection, name: str, *, lock: bool = False) -> int:
    sql = _READ_CHECKPOINT_SQL + (" FOR UPDATE" if lock else "")
    return await (await _driver(conn)).fetchval(sql, name) or 0


# A projection of several subjects binds to the whole log when more than this many of its own
# events wait (at a bind, or while it runs); it binds back to its own subjects once a batch of
# the whole log leaves at most NARROW_PENDING behind (`consumer_filter`).
WIDE_BACKLOG = 2_000
NARROW_PENDING = 100
CHECKPOINT_SAVE_SECONDS = 0.02  # a projection with nothing to apply saves its position this much later, at most
PROBE_SECONDS = 0.02  # a projection a query in this process waits for probes at most this often
# Any other idle projection probes at most this often, woken or not: with many read models,
# probing each one at every other projection's batch cost a probe and a transaction per read
# model per batch (a quarter of the service's CPU with eight idle projections).
IDLE_PROBE_SECONDS = 0.1
POSITIONS_GATHER_SECONDS = 0.005  # idle positions wait this long for the others' to be saved with them
STREAM_LAST_SECONDS = 0.1  # a runner asks the stream's last sequence this often at most


def aggregate_types(projector: Projector) -> frozenset[str]:
    """The aggregate types whose events `projector` reads: its own `aggregate_types` when it
    names them, else those of the event types it handles. An event type the registry does
    not know, or a projector that would read nothing, is refused: its filter could not be
    right."""
    explicit = getattr(projector, "aggregate_types", None)
    if explicit is not None:
        types = frozenset(explicit)
    else:
        unknown = sorted(t for t in projector.handles if t not in EVENT_TYPES)
        if unknown:
            raise ValueError(f"projection {projector.name} handles event types the event registry does not know "
                             f"({', '.join(unknown)}): register them, or give the projector `aggregate_types`")
        types = frozenset(EVENT_TYPES[t].aggregate_type for t in projector.handles)
    if not types:
        raise ValueError(f"projection {projector.name} reads no aggregate type: it handles no event type")
    return types


def projection_subjects(projector: Projector, prefix: str) -> list[str]:
    """The subjects of the log `projector` reads, sorted (the consumer's filter, and the
    probe's): `<prefix>.<aggregate type>.>` for each aggregate type of which it reads half
    the event types or more; for one of which it reads fewer, `<prefix>.<type>.*.<event
    type>` for each of those (an aggregate id is one token). A read model that needs a few
    events of another's busy aggregate (the deployments' two poll events among a pool's
    slot changes; the task runs' flow-run deletion among every flow run's transitions) is
    then not sent the rest."""
    subjects: list[str] = []
    handled = getattr(projector, "aggregate_types", None) is None
    for t in sorted(aggregate_types(projector)):
        of_type = sorted(name for name, spec in EVENT_TYPES.items() if spec.aggregate_type == t)
        mine = [name for name in of_type if name in projector.handles] if handled else of_type
        if 2 * len(mine) >= len(of_type):
            subjects.append(f"{prefix}.{t}.>")
        else:
            subjects += [f"{prefix}.{t}.*.{name}" for name in mine]
    return sorted(subjects)


def concerns(projector: Projector, raw: RawEvent) -> bool:
    """Whether applying `raw` writes anything for `projector`: an event type it handles, or
    one unknown here (recorded as skipped). The type is the subject's last token (the store
    writes it so, and only the service may write)."""
    event_type = raw.subject[raw.subject.rfind(".") + 1:]
    return event_type in projector.handles or event_type not in EVENT_TYPES


def decode_batch(projector: Projector, fresh: Sequence[RawEvent],
                 now: datetime) -> tuple[list[tuple[str, str, Event | dict]], list[dict]]:
    """The events of `fresh` that `projector` handles, as it reads them, and the rows of
    `skipped_events` for those it cannot read. One of a type it handles at a version written by
    a newer runledger (`NewerThanReader`) raises: the projection stalls there until it runs
    that version."""
    decoded: list[tuple[str, str, Event | dict]] = []
    skipped: list[dict] = []
    raw_payloads = getattr(projector, "raw_payloads", False)
    for raw in fresh:
        if not concerns(projector, raw):  # skipped unparsed
            continue
        try:
            envelope = from_json(raw.data)
            event_type = envelope["type"]
            if event_type not in projector.handles:
                if event_type not in EVENT_TYPES:
                    raise UnknownEvent(f"unknown event type {event_type!r}")
                continue
            event: Event | dict
            if raw_payloads:
                event = upcast_payload(event_type, envelope["schema_version"], envelope["payload"])
            else:
                event = decode_event(event_type, envelope["schema_version"], envelope["payload"])
            decoded.append((envelope["aggregate_id"], event_type, event))
        except NewerThanReader:
            raise
        except (UnknownEvent, ValidationError, ValueError, KeyError, TypeError) as e:
            skipped.append({"projection": projector.name, "seq": raw.seq, "subject": raw.subject,
                            "reason": _clean(f"{type(e).__name__}: {e}")[:2000], "recorded": now})
    return decoded, skipped


def stored_events(projector: Projector, fresh: Sequence[RawEvent]) -> list[tuple[str, str, bytes]] | None:
    """The events of `fresh` that `projector` handles, as stored, for its optional
    `raw_writes`: (aggregate id, event type, envelope bytes), the first two from the subject
    (`<prefix>.<aggregate type>.<aggregate id>.<event type>`), nothing parsed. None when one
    needs reading first: an unknown event type, or an envelope not at its type's current
    schema version (`decode_batch` upcasts it, or records why it cannot)."""
    out: list[tuple[str, str, bytes]] = []
    for raw in fresh:
        tokens = raw.subject.rsplit(".", 2)
        if len(tokens) != 3:
            return None
        _, aggregate_id, event_type = tokens
        if event_type not in projector.handles:
            if event_type not in EVENT_TYPES:
                return None
            continue
        data = raw.data
        head_end = data.find(b'"payload":')
        if head_end < 0 or data.find(_current_version(event_type), 0, head_end) < 0:
            return None
        out.append((aggregate_id, event_type, data))
    return out


@functools.cache
def _current_version(event_type: str) -> bytes:
    """How an envelope of this type at its current version says so, as the store writes it
    (`encode_event`: compact JSON, the version before the payload)."""
    return b'"schema_version":%d,' % EVENT_TYPES[event_type].schema_version


async def apply_batch(conn: AsyncConnection, projector: Projector, batch: Sequence[RawEvent]) -> int:
    """Apply the events above the checkpoint and move it, inside the caller's transaction.
    Returns the new checkpoint. Unreadable or unknown events are recorded and skipped; a newer
    version of a type it handles raises (`decode_batch`)."""
    checkpoint = await read_checkpoint(conn, projector.name, lock=True)
    fresh = [e for e in batch if e.seq > checkpoint]
    if not fresh:
        return checkpoint
    now = datetime.now(UTC)
    decoded, skipped = decode_batch(projector, fresh, now)
    if decoded:
        await projector.apply(conn, decoded)
    if skipped:
        log.warning("projection %s skipped %d event(s) it cannot read, first at seq %d", projector.name, len(skipped), skipped[0]["seq"])
        await conn.execute(insert(skipped_events).on_conflict_do_nothing(), skipped)
    last = fresh[-1].seq
    await advance_checkpoint(conn, projector.name, checkpoint, last, now)
    return last


# The checkpoint moved with a batch's writes, in one statement (`apply_in_one_statement`):
# forward only, and only from below the batch's first event.
_MOVE_CHECKPOINT_CTE = ("checkpoint AS (UPDATE projection_checkpoints SET last_seq = $2, updated = $3 "
                        "WHERE name = $1 AND last_seq < $4 RETURNING 1)")
_PARAMETER = re.compile(r"\$(\d+)")


@functools.lru_cache(maxsize=256)
def _one_statement_sql(statements: tuple[str, ...], numbers: tuple[tuple[int, ...], ...]) -> str:
    """`statements` as data-modifying parts of one statement after the checkpoint's; the
    `$k` of statement i becomes `$numbers[i][k - 1]` (numbered on from the checkpoint's four;
    an argument several of them share is one parameter)."""
    def renumbered(sql: str, mine: tuple[int, ...]) -> str:
        return _PARAMETER.sub(lambda m: f"${mine[int(m.group(1)) - 1]}", sql)

    parts = [_MOVE_CHECKPOINT_CTE]
    parts += [f"w{i} AS ({renumbered(sql, mine)})" for i, (sql, mine) in enumerate(zip(statements, numbers, strict=True))]
    return ("WITH " + ", ".join(parts) +
            " SELECT CASE WHEN EXISTS (SELECT FROM checkpoint) THEN $2 ELSE projection_checkpoint_moved($1) END")


@functools.lru_cache(maxsize=256)
def _parameter_count(sql: str) -> int:
    return max((int(n) for n in _PARAMETER.findall(sql)), default=0)


def _numbered_arguments(writes: Sequence[Write], args: list[Any], projection: str) -> tuple[tuple[int, ...], ...]:
    """Appends the writes' arguments to `args` and says which parameter number each of their
    `$k` takes: a `SharedArgument` passed by several writes is sent once."""
    numbers: list[tuple[int, ...]] = []
    shared: dict[int, int] = {}
    for statement, values in writes:
        count = _parameter_count(statement)
        if len(values) != count:
            raise ValueError(f"projection {projection}: a write takes {count} parameters, "
                             f"was given {len(values)}: {statement[:80]}")
        mine = []
        for value in values:
            number = shared.get(id(value)) if isinstance(value, SharedArgument) else None
            if number is None:
                args.append(value)
                number = len(args)
                if isinstance(value, SharedArgument):
                    shared[id(value)] = number
            mine.append(number)
        numbers.append(tuple(mine))
    return tuple(numbers)


async def apply_in_one_statement(connections: DriverConnections, projector: Projector, batch: Sequence[RawEvent],
                                 position: int) -> int | None:
    """Apply the events of `batch` above `position` (this runner's) and move the checkpoint,
    in one statement, so one round trip to Postgres instead of five or six (BEGIN, the
    checkpoint's read, each write, the checkpoint's move, COMMIT), which were a tenth of the
    service's CPU at flow-run rates. Returns the new checkpoint, or None when this batch
    needs `apply_batch`: a projector without `writes`, writes that must run in order, an
    event it cannot read.

    Safe without the checkpoint's row lock: the checkpoint moves only from below the batch's
    first event, and a statement that finds it elsewhere (another runner applied these events)
    fails whole (`projection_checkpoint_moved`), its writes with it. Every batch that writes
    moves the checkpoint past its events, so a checkpoint below the first one says that none
    of the batch was applied."""
    writes_of = getattr(projector, "writes", None)
    if writes_of is None:
        return None
    fresh = [e for e in batch if e.seq > position]
    if not fresh:
        return None
    now = datetime.now(UTC)
    writes = None
    raw_writes_of = getattr(projector, "raw_writes", None)
    if raw_writes_of is not None:
        stored = stored_events(projector, fresh)
        writes = raw_writes_of(stored) if stored else None
    if writes is None:
        decoded, skipped = decode_batch(projector, fresh, now)
        writes = writes_of(decoded) if decoded else []
        if skipped or writes is None:
            return None
    args: list[Any] = [projector.name, fresh[-1].seq, now, fresh[0].seq]
    numbers = _numbered_arguments(writes, args, projector.name)
    sql = _one_statement_sql(tuple(statement for statement, _ in writes), numbers)
    async with (await connections.pool()).acquire() as driver:  # no BEGIN: the statement is its own transaction
        try:
            await driver.fetchval(sql, *args)
        except asyncpg.exceptions.SerializationError as e:
            if "its checkpoint moved past this batch" in str(e):  # projection_checkpoint_moved's
                raise CheckpointConflict(f"projection {projector.name}: the checkpoint moved past {position}") from e
            raise
    return fresh[-1].seq


class CheckpointConflict(RuntimeError):
    """The checkpoint is no longer where this transaction found it: another runner applied
    these events first. The transaction must not commit."""


async def advance_checkpoint(conn: AsyncConnection, name: str, expected: int, last: int, now: datetime) -> None:
    """Move the checkpoint from `expected` (what this transaction read, 0 for no row) to
    `last`, or raise `CheckpointConflict`. The row lock of `read_checkpoint(lock=True)`
    serialises runners once the row exists; for the first row, two inserts race and the
    second finds a row it did not expect."""
    if last <= expected:
        raise CheckpointConflict(f"projection {name}: checkpoint {expected} would not advance to {last}")
    status = await (await _driver(conn)).execute(_ADVANCE_CHECKPOINT_SQL, name, last, now, expected)
    if not status.endswith(" 1"):  # "INSERT 0 1": one row written
        raise CheckpointConflict(f"projection {name}: the checkpoint moved past {expected} under this transaction")


# ---------------------------------------------------------------------------------------------
# Events a projection cannot apply

# SQLSTATE classes of an outage rather than of the data: connection exceptions, transaction
# rollbacks (serialization failure, deadlock), insufficient resources, operator intervention
# (shutdown, statement timeout, cancel), system errors.
_TRANSIENT_SQLSTATE_CLASSES = frozenset({"08", "40", "53", "57", "58"})


def _causes(error: BaseException) -> Iterator[BaseException]:
    seen: set[int] = set()
    todo: list[BaseException | None] = [error]
    while todo:
        e = todo.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        yield e
        todo.extend([e.__cause__, e.__context__, getattr(e, "orig", None)])


def is_transient(error: BaseException) -> bool:
    """An outage (retry soon, as before) rather than something wrong with an event or the
    projector. Anything not known to be an outage is treated as possibly deterministic: the
    batch is then applied in pieces, and only an event that fails alone, twice, stalls."""
    import asyncpg

    for e in _causes(error):
        if isinstance(e, CheckpointConflict | DatabaseUnavailable | OSError | TimeoutError | nats.errors.Error):
            return True
        if isinstance(e, asyncpg.exceptions.ConnectionDoesNotExistError | asyncpg.exceptions.InternalClientError):
            return True
        # A pooled connection whose server went away (a killed or restarted Postgres): asyncpg
        # refuses to use it before sending anything. Not an event's fault: it must not stall.
        if isinstance(e, asyncpg.exceptions.InterfaceError) and "connection is closed" in str(e):
            return True
        if isinstance(e, sa_exc.DBAPIError) and e.connection_invalidated:
            return True
        if isinstance(e, sa_exc.DisconnectionError | sa_exc.TimeoutError | sa_exc.ResourceClosedError):
            return True
        sqlstate = getattr(e, "sqlstate", None)
        if isinstance(sqlstate, str) and len(sqlstate) == 5:
            return sqlstate[:2] in _TRANSIENT_SQLSTATE_CLASSES
    return False


def describe_error(error: BaseException) -> str:
    """`<ErrorClass>: <first line>`, of the innermost database error when there is one."""
    import asyncpg

    causes = list(_causes(error))
    chosen = next((e for e in causes if isinstance(e, asyncpg.PostgresError | asyncpg.InterfaceError)), None)
    if chosen is None:
        chosen = next((e for e in causes if getattr(e, "sqlstate", None) and not isinstance(e, sa_exc.DBAPIError)), error)
    lines = str(chosen).strip().splitlines()
    return _clean(f"{type(chosen).__name__}: {lines[0]}" if lines else type(chosen).__name__)[:500]


def _clean(value: str) -> str:
    """Postgres stores no NUL: never let one into the failure record."""
    return value.replace("\x00", "\\x00")


def event_type_of(raw: RawEvent) -> str:
    try:
        return _clean(str(from_json(raw.data)["type"]))[:200]
    except (ValueError, KeyError, TypeError):
        return raw.subject.rsplit(".", 1)[-1]


@dataclass(frozen=True)
class ApplyFailure:
    """The one event a projection cannot apply, and why."""

    projection: str
    seq: int
    subject: str
    event_type: str
    error: str

    def describe(self) -> str:
        return f"projection {self.projection} is stopped at stream sequence {self.seq} ({self.event_type}): {self.error}"

    def as_dict(self) -> dict:
        return {"projection": self.projection, "seq": self.seq, "subject": self.subject,
                "event_type": self.event_type, "error": self.error}


class ProjectionStalled(Exception):
    def __init__(self, failure: ApplyFailure):
        super().__init__(failure.describe())
        self.failure = failure


class _ProjectorFailed(Exception):
    def __init__(self, projection: str, error: Exception):
        super().__init__(f"{projection}: {error}")
        self.projection, self.error = projection, error


async def apply_in_pieces(engine: AsyncEngine, projectors: Sequence[Projector], batch: Sequence[RawEvent], *,
                          first_piece: int | None = None, tries_alone: int = 2,
                          ) -> tuple[int, ApplyFailure | None]:
    """Apply `batch` (after a failure of the whole) in consecutive pieces, each in its own
    transaction, halving a piece that fails until the failing event stands alone; everything
    before it is committed. An event that fails alone `tries_alone` times is the failure.
    Returns the last sequence committed (0 for none) and the failure or None. An outage
    (`is_transient`) propagates."""
    pending = list(batch)
    size = max(1, first_piece or len(pending) // 2)
    last, tried_alone = 0, 0
    while pending:
        piece = pending[:size]
        try:
            async with engine.begin() as conn:
                for projector in projectors:
                    try:
                        await apply_batch(conn, projector, piece)
                    except Exception as e:
                        raise _ProjectorFailed(projector.name, e) from e
        except _ProjectorFailed as failed:
            if is_transient(failed.error):
                raise failed.error from None
            if len(piece) > 1:
                size = max(1, len(piece) // 2)
                continue
            tried_alone += 1
            if tried_alone < tries_alone:
                await asyncio.sleep(0.2)
                continue
            raw = piece[0]
            return last, ApplyFailure(failed.projection, raw.seq, raw.subject, event_type_of(raw), describe_error(failed.error))
        last = piece[-1].seq
        pending = pending[len(piece):]
        tried_alone = 0
    return last, None


async def record_failure(engine: AsyncEngine, failure: ApplyFailure) -> None:
    """Keep (or refresh) a projection's failure row, in its own transaction."""
    now = datetime.now(UTC)
    stmt = insert(projection_failures).values(**failure.as_dict(), attempts=1, first_seen=now, last_seen=now)
    same = projection_failures.c.seq == stmt.excluded.seq
    stmt = stmt.on_conflict_do_update(index_elements=["projection"], set_={
        "seq": stmt.excluded.seq, "subject": stmt.excluded.subject, "event_type": stmt.excluded.event_type,
        "error": stmt.excluded.error, "last_seen": stmt.excluded.last_seen,
        "attempts": case((same, projection_failures.c.attempts + 1), else_=1),
        "first_seen": case((same, projection_failures.c.first_seen), else_=stmt.excluded.first_seen),
    })
    async with engine.begin() as conn:
        await conn.execute(stmt)


async def read_failures(conn: AsyncConnection) -> list[dict]:
    rows = await conn.execute(select(projection_failures).order_by(projection_failures.c.projection))
    return [dict(r._mapping) for r in rows]


# How `skipped_events` records an event type a projection went past before it handled it.
MISSED_TYPE_REASON = "written while an older version ran projection"
REBUILD_RETRY_SECONDS = 600.0  # a failed rebuild of a missed type waits this long to be tried again


@dataclass
class ProjectionRunner:
    nc: NATS
    settings: Settings
    engine: AsyncEngine
    projectors: Sequence[Projector]
    on_applied: Callable[[str, int], None] | None = None
    # Called when this runner stops applying a projection (its lease lost, or stopped): its
    # position is no longer this process's to report.
    on_released: Callable[[str], None] | None = None
    batch_size: int = 1000
    # Test hooks to simulate a crash between the steps that matter.
    crash_after_fetch: bool = False
    crash_after_commit: bool = False
    # One active runner per projection (infra/leases.py); off only for tests of other things.
    use_leases: bool = True
    lease_ttl: int = DEFAULT_TTL_SECONDS
    # How often a projection stopped at an event it cannot apply tries that event again.
    stall_retry_seconds: float = 30.0
    # Whether a projection that went past events of a type it now handles rebuilds its read
    # model (`_rebuild_missed`) or only says so (`_note_missed_types`).
    rebuild_missed: bool = False
    _rebuilds: dict[str, asyncio.Task] = field(default_factory=dict)
    # Per projection: not before this (event-loop time) is a failed rebuild started again.
    _rebuild_not_before: dict[str, float] = field(default_factory=dict)
    _tasks: list[asyncio.Task] = field(default_factory=list)
    applied: dict[str, int] = field(default_factory=dict)
    failures: dict[str, ApplyFailure] = field(default_factory=dict)
    leases: dict[str, Lease] = field(default_factory=dict)
    # Per projection: the subjects it reads; what a query in this process waits for; the
    # event that wakes it to probe at once.
    _subjects: dict[str, list[str]] = field(default_factory=dict)
    _wanted: dict[str, int] = field(default_factory=dict)
    _wake: dict[str, asyncio.Event] = field(default_factory=dict)
    # The stream's last sequence as last asked (event-loop time of the asking).
    _stream_last: int = 0
    _stream_last_at: float = float("-inf")
    # Per projection of several aggregate types: whether its consumer reads the whole log.
    _wide: dict[str, bool] = field(default_factory=dict)
    # Idle projections' positions waiting for the one statement that saves them together.
    _positions_to_save: dict[str, int] = field(default_factory=dict)
    _position_saver: asyncio.Task | None = None
    _positions_failing: bool = False
    # The hot statements' connections (a batch in one statement, positions saved): straight
    # from asyncpg, connected as `engine` is.
    statements: DriverConnections = field(init=False)

    def __post_init__(self) -> None:
        self.statements = DriverConnections(self.engine)

    @staticmethod
    def consumer_name(projector: Projector) -> str:
        return f"projection_{projector.name}"

    def subjects(self, projector: Projector) -> list[str]:
        """The subjects `projector`'s consumer reads (`projection_subjects`)."""
        if projector.name not in self._subjects:
            self._subjects[projector.name] = projection_subjects(projector, self.settings.event_subject_prefix)
        return self._subjects[projector.name]

    def consumer_filter(self, projector: Projector, backlog: int = 0) -> list[str]:
        """What the consumer reads: its subjects (`subjects`); for a projector of several, the
        whole log (skipped by type, unparsed) while it catches up on more than `WIDE_BACKLOG`
        of its own events (`backlog`: the pending count of a consumer of its subjects, bound
        first to learn it; sparse among others, they come quickly).

        nats-server 2.15 finds a multi-filter consumer's next message by looking through the
        subjects of a message block: at the tail that costs what one filter costs, but
        through a backlog where its events are many and their subjects too (a task run is a
        subject) it delivered ~1,900 events/s against ~40,000 for the whole log
        (`bench/consumer_filters.py`). The whole log at the tail, in turn, sent the
        deployments' read model every task run's events. The probe still looks only at the
        projector's own subjects."""
        subjects = self.subjects(projector)
        if len(subjects) == 1 or backlog <= WIDE_BACKLOG:
            return subjects
        return [f"{self.settings.event_subject_prefix}.>"]

    def reads_the_whole_log(self, projector: Projector) -> bool:
        """Whether its consumer is bound to the whole log (catching up), not its subjects."""
        return self._wide.get(projector.name, False)

    def _should_rebind(self, projector: Projector, pending: int) -> bool:
        """Whether its consumer should read otherwise: the whole log caught up with, or its own
        subjects fallen far behind."""
        if len(self.subjects(projector)) == 1:
            return False
        if self.reads_the_whole_log(projector):
            return pending <= NARROW_PENDING
        return pending > WIDE_BACKLOG

    def lease_key(self, projector: Projector) -> str:
        return f"projection.{projector.name}"

    @property
    def stalled(self) -> dict[str, ApplyFailure]:
        """The projections stopped at an event they cannot apply."""
        return dict(self.failures)

    async def start(self) -> None:
        for projector in self.projectors:  # a projector whose subjects cannot be derived fails here
            self.subjects(projector)
        leases: dict[str, Lease] = {}
        if self.use_leases:
            js = self.nc.jetstream(timeout=self.settings.request_timeout)
            for projector in self.projectors:
                leases[projector.name] = await Lease.open(
                    js, self.settings, self.lease_key(projector), ttl=self.lease_ttl, label=f"projection {projector.name}")
        self.leases = leases
        for projector in self.projectors:
            lease = leases.get(projector.name)
            work = self._run(projector) if lease is None else self._run_leased(projector, lease)
            self._tasks.append(asyncio.create_task(work, name=f"projection:{projector.name}"))

    async def stop(self) -> None:
        for t in [*self._tasks, *self._rebuilds.values()]:
            t.cancel()
        for t in self._rebuilds.values():
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await t
        self._rebuilds.clear()
        for t in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await t
        self._tasks.clear()
        if self._position_saver is not None:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._position_saver  # what the stopped projections reached, saved
        await self.statements.close()

    def want(self, projection: str, seq: int) -> None:
        """A query in this process waits until `projection` reaches `seq`: it probes as soon
        as it may, and asks the stream's last sequence if nothing else it knows reaches `seq`."""
        if projection not in self.applied or self.applied[projection] >= seq:
            return
        self._wanted[projection] = max(seq, self._wanted.get(projection, 0))
        self._wake_event(projection).set()

    def _wake_event(self, projection: str) -> asyncio.Event:
        return self._wake.setdefault(projection, asyncio.Event())

    def _report(self, projector: Projector, seq: int) -> None:
        self.applied[projector.name] = seq
        if self.on_applied:
            self.on_applied(projector.name, seq)
        for other, position in self.applied.items():  # behind this one: it may move up to here
            if position < seq:
                self._wake_event(other).set()

    async def _bind(self, projector: Projector):
        js = self.nc.jetstream(timeout=self.settings.request_timeout)
        async with self.engine.begin() as conn:
            # A row to lock from the first batch on (`apply_batch` reads it FOR UPDATE).
            await conn.execute(insert(projection_checkpoints).values(
                name=projector.name, last_seq=0, updated=datetime.now(UTC)).on_conflict_do_nothing())
            await self._note_missed_types(conn, js, projector)
            checkpoint = await read_checkpoint(conn, projector.name)
            row = (await conn.execute(select(projection_failures).where(
                projection_failures.c.projection == projector.name))).first()
            missed = (await conn.execute(select(skipped_events.c.seq).where(
                skipped_events.c.projection == projector.name,
                skipped_events.c.reason.startswith(MISSED_TYPE_REASON)).limit(1))).first()
        if missed is not None and self.rebuild_missed:
            self._start_rebuild(projector)
        if row is not None and projector.name not in self.failures:
            self.failures[projector.name] = ApplyFailure(row.projection, row.seq, row.subject, row.event_type, row.error)
        name = self.consumer_name(projector)
        with contextlib.suppress(NotFoundError):
            await js.delete_consumer(self.settings.stream_name, name)
        # Deleted and created again at every bind, so a consumer of an older version (one that
        # read the whole log) gets this projection's filter too.
        info = await js.add_consumer(self.settings.stream_name, self._consumer_config(projector, checkpoint, 0))
        self._wide[projector.name] = False
        if info.num_pending is not None and info.num_pending > WIDE_BACKLOG and len(self.subjects(projector)) > 1:
            # Many of its own events to catch up on: the whole log instead (`consumer_filter`).
            await js.delete_consumer(self.settings.stream_name, name)
            await js.add_consumer(self.settings.stream_name, self._consumer_config(projector, checkpoint, info.num_pending))
            self._wide[projector.name] = True
        # Not below a position this runner reached already (bound again, with another filter).
        self._report(projector, max(checkpoint, self.applied.get(projector.name, 0)))

    async def _note_missed_types(self, conn: AsyncConnection, js: Any, projector: Projector) -> None:
        """A projection that handles an event type it did not handle when it was last bound
        (this version knows a type the one before did not) may have gone past events of that
        type: during a rolling upgrade, a newer command process wrote them while an older
        process ran the projection, whose consumer did not even receive them. They are not in
        its read model, and a rebuild would have them (`runledger verify` shows the
        difference). When the log holds one below the checkpoint, this says so once, in the
        log and in `skipped_events` (the first such event of each type), with the way to
        rebuild the read model (`runledger rebuild`, projections/rebuild.py: beside the live
        one, then swapped in); the projection goes on applying what comes next. (Rebuilding
        it here, in place, would move its checkpoint back, which the forward-only checkpoint
        writes of a process that lost its lease would then undo.) The types are recorded at
        every bind, in the checkpoint's row."""
        row = (await conn.execute(select(projection_checkpoints.c.last_seq, projection_checkpoints.c.handles)
                                  .where(projection_checkpoints.c.name == projector.name).with_for_update())).one()
        current = sorted(projector.handles)
        if row.handles is not None and row.last_seq > 0:
            for event_type in sorted(set(current) - set(row.handles)):
                first = await self._first_of(js, event_type)
                if first is None or first[0] > row.last_seq:
                    continue
                reason = (f"{MISSED_TYPE_REASON} {projector.name}, which never received "
                          f"{event_type} events (before its checkpoint {row.last_seq}): its read model lacks them; "
                          f"rebuild it, while the service runs: runledger rebuild {projector.name}")
                log.error("projection %s now handles %s, but the log holds such events below its checkpoint (%d, "
                          "first at stream sequence %d): %s", projector.name, event_type, row.last_seq, first[0], reason)
                await conn.execute(insert(skipped_events).values(
                    projection=projector.name, seq=first[0], subject=first[1], reason=reason,
                    recorded=datetime.now(UTC)).on_conflict_do_nothing())
        if row.handles != current:
            await conn.execute(projection_checkpoints.update().where(projection_checkpoints.c.name == projector.name)
                               .values(handles=current))

    def _start_rebuild(self, projector: Projector) -> None:
        """The read model that missed events rebuilt beside the live one and swapped in, in the
        background (the projection goes on meanwhile); the rows that record the miss go with
        the swap. Until then each bind of the projection, in any process, starts it again: a
        rebuild cut short (the process stopped) leaves them, and a second one at once is
        refused (one per projection). One that failed waits `REBUILD_RETRY_SECONDS` (a bind
        comes every few seconds while a projection is in trouble, and each try replays the
        log); one refused as invalid (tables with grants, another version's) is not tried
        again by this process."""
        running = self._rebuilds.get(projector.name)
        if asyncio.get_running_loop().time() < self._rebuild_not_before.get(projector.name, float("-inf")):
            return
        if running is None or running.done():
            self._rebuilds[projector.name] = asyncio.create_task(self._rebuild_missed(projector),
                                                                 name=f"rebuild:{projector.name}")

    async def _rebuild_missed(self, projector: Projector) -> None:
        from runledger.infra.event_store import EventStore

        from .rebuild import RebuildFailed, rebuild_live

        log.warning("projection %s: rebuilding its read model from the log, for the events it missed", projector.name)
        retry_at = asyncio.get_running_loop().time() + REBUILD_RETRY_SECONDS
        try:
            result = await rebuild_live(self.settings, EventStore(self.nc, self.settings), projector)
        except RebuildFailed as e:
            log.warning("projection %s: not rebuilt: %s", projector.name, e)
            self._rebuild_not_before[projector.name] = float("inf") if e.kind == "invalid" else retry_at
        except asyncio.CancelledError:
            raise
        except Exception as e:
            log.error("projection %s: its rebuild failed (%s); rebuild it with `runledger rebuild %s`",
                      projector.name, describe_error(e), projector.name)
            self._rebuild_not_before[projector.name] = retry_at
        else:
            log.warning("projection %s: rebuilt from the log up to seq %d and swapped in (%.1f s)",
                        projector.name, result.last_seq, result.seconds)

    async def _first_of(self, js: Any, event_type: str) -> tuple[int, str] | None:
        """The stream sequence and subject of the log's first event of this type, if any (by
        the subjects of its aggregate type: a wildcard over every subject of the log would have
        the server look through each task run's)."""
        spec = EVENT_TYPES.get(event_type)
        aggregate = spec.aggregate_type if spec is not None else "*"
        try:
            msg = await js.get_msg(self.settings.stream_name, seq=1, next=True,
                                   subject=f"{self.settings.event_subject_prefix}.{aggregate}.*.{event_type}")
        except NotFoundError:
            return None
        return (msg.seq, msg.subject) if msg.seq is not None else None

    def _consumer_config(self, projector: Projector, checkpoint: int, backlog: int) -> ConsumerConfig:
        subjects = self.consumer_filter(projector, backlog)
        return ConsumerConfig(
            filter_subject=subjects[0] if len(subjects) == 1 else None,
            filter_subjects=subjects if len(subjects) > 1 else None,
            ack_policy=AckPolicy.ALL,
            ack_wait=300,
            max_ack_pending=-1,
            max_deliver=-1,
            deliver_policy=DeliverPolicy.BY_START_SEQUENCE if checkpoint else DeliverPolicy.ALL,
            opt_start_seq=checkpoint + 1 if checkpoint else None,
            # Its position is the Postgres checkpoint, from which every bind starts: state on
            # disk would only add a synced write per acknowledged batch (sync_interval: always)
            # that competes with the appends' syncs (the lag's p99 doubled).
            mem_storage=True,
            # One copy, on a cluster too: a copy on each node would only replicate every
            # acknowledgement. If its node dies the reader stops hearing from it and binds
            # again, and the server places the new consumer on a node that is up.
            num_replicas=1,
            durable_name=self.consumer_name(projector),
        )

    async def _run_leased(self, projector: Projector, lease: Lease) -> None:
        while True:
            try:
                await lease.run(lambda: self._run(projector))
            except asyncio.CancelledError:
                raise
            except Exception:  # a bug in the lease handling must not end the projection for good
                log.exception("projection %s: the lease handling failed; trying again in 1 s", projector.name)
                await asyncio.sleep(1)

    async def _run(self, projector: Projector) -> None:
        try:
            while True:
                stop_if_cancelled()  # a cancel swallowed on the way must still end the loop
                try:
                    await self._consume(projector)
                except asyncio.CancelledError:
                    raise
                except ProjectionStalled as stalled:
                    await self._stalled(projector, stalled.failure)
                except Exception:
                    log.exception("projection %s failed; restarting from its checkpoint in 1 s", projector.name)
                    await asyncio.sleep(1)
        finally:
            self.applied.pop(projector.name, None)
            if self.on_released:
                self.on_released(projector.name)

    async def _stalled(self, projector: Projector, failure: ApplyFailure) -> None:
        known = self.failures.get(projector.name)
        self.failures[projector.name] = failure
        if known != failure:
            log.error("%s; it applies nothing past it and tries again every %g s. "
                      "See docs/operations.md, 'A stalled projection'.", failure.describe(), self.stall_retry_seconds)
        else:
            log.warning("%s (still)", failure.describe())
        try:
            await record_failure(self.engine, failure)
        except Exception:
            log.exception("projection %s: recording its failure failed", projector.name)
        await asyncio.sleep(self.stall_retry_seconds)

    async def _resumed(self, projector: Projector, last: int) -> None:
        failure = self.failures.get(projector.name)
        if failure is None or last < failure.seq:
            return
        async with self.engine.begin() as conn:
            await conn.execute(delete(projection_failures).where(projection_failures.c.projection == projector.name))
        del self.failures[projector.name]
        log.info("projection %s applied stream sequence %d, where it had stopped; resumed", projector.name, failure.seq)

    async def _apply(self, projector: Projector, batch: Sequence[RawEvent]) -> int:
        """Apply one batch with its checkpoint; on a failure that is not an outage, find the
        event that fails, commit what precedes it and raise `ProjectionStalled`."""
        try:
            last = await apply_in_one_statement(self.statements, projector, batch, self.applied.get(projector.name, 0))
            if last is not None:
                return last
            async with self.engine.begin() as conn:
                return await apply_batch(conn, projector, batch)
        except Exception as e:
            if is_transient(e):
                raise
            log.warning("projection %s: a batch of %d events up to seq %d failed (%s); finding the event",
                        projector.name, len(batch), batch[-1].seq, describe_error(e))
        known = self.failures.get(projector.name)
        fresh = [r for r in batch if r.seq > self.applied.get(projector.name, 0)]
        first_piece = 1 if known is not None and fresh and fresh[0].seq == known.seq else None
        last, failure = await apply_in_pieces(self.engine, [projector], fresh or batch, first_piece=first_piece)
        if last:
            self._report(projector, max(last, self.applied.get(projector.name, 0)))
        if failure is not None:
            raise ProjectionStalled(failure)
        return self.applied[projector.name]

    async def _consume(self, projector: Projector) -> None:
        """Fetches the next batch while the current one is applied (the two round trips, to
        NATS and to Postgres, overlap); applies, commits and acknowledges strictly in order,
        the batches that queued meanwhile joined into one (`_join_waiting`).

        A batch with no event type this projector handles writes nothing at once: its
        position is reported in memory (read-your-writes in this process sees it) and saved
        at most `CHECKPOINT_SAVE_SECONDS` later, or with the next batch that writes (a
        transaction per such batch had doubled the transactions and the lag's p50). When idle,
        it probes past the events it does not receive (see the module's docstring)."""
        await self._bind(projector)
        batches: asyncio.Queue = asyncio.Queue(maxsize=2)
        reader = asyncio.create_task(self._read(projector, batches))
        loop = asyncio.get_running_loop()
        wake = self._wake_event(projector.name)
        getting: asyncio.Future | None = None
        waking: asyncio.Future | None = None
        carried: Any = _NOTHING  # an item taken from the queue behind a batch, handled next
        unsaved: int | None = None  # reached without writing; not yet saved
        unsaved_since = 0.0
        probe_due = True  # woken (or just bound): probe once PROBE_SECONDS passed without a batch or probe
        last_active = float("-inf")  # when it last received a batch or probed

        def probe_at() -> float:
            wanted = self._wanted.get(projector.name, 0) > self.applied.get(projector.name, 0)
            if probe_due and wanted:
                return last_active + PROBE_SECONDS
            # On a grid shared by every idle projection of this process: they probe together,
            # and their positions are saved in one statement.
            if last_active == float("-inf"):
                return last_active
            return math.ceil((last_active + IDLE_PROBE_SECONDS) / IDLE_PROBE_SECONDS) * IDLE_PROBE_SECONDS

        def reached(seq: int) -> None:
            nonlocal unsaved, unsaved_since
            self._report(projector, seq)
            if unsaved is None:
                unsaved_since = loop.time()
            unsaved = seq

        try:
            while True:
                # The probe's requests to NATS can swallow a cancel (Python 3.11's wait_for in
                # nats-py): without this the loop would probe on for ever after `stop()`.
                stop_if_cancelled()
                if getting is None:
                    if carried is not _NOTHING:  # taken from the queue behind the last batch
                        getting = loop.create_future()
                        getting.set_result(carried)
                        carried = _NOTHING
                    else:
                        getting = asyncio.ensure_future(batches.get())
                if waking is None and not probe_due:  # woken once is enough until it probes
                    waking = asyncio.ensure_future(wake.wait())
                deadline = probe_at() if unsaved is None else min(probe_at(), unsaved_since + CHECKPOINT_SAVE_SECONDS)
                await asyncio.wait({getting, reader} if waking is None else {getting, reader, waking},
                                   timeout=max(0.0, deadline - loop.time()), return_when=asyncio.FIRST_COMPLETED)
                if waking is not None and waking.done():
                    wake.clear()
                    waking, probe_due = None, True
                if not getting.done():
                    if reader.done():  # the reader ended without handing anything over
                        raise RuntimeError("the projection's reader stopped") from (reader.exception() if not reader.cancelled() else None)
                    if loop.time() >= probe_at():  # idle: move past the events it does not receive
                        last_active, probe_due = loop.time(), False
                        if projector.name not in self.failures:
                            seq = await self._probe(projector)
                            if seq > self.applied.get(projector.name, 0):
                                # Saved at once: probes come at most every PROBE_SECONDS, as
                                # delayed saves would, and a reader in another process sees it
                                # without the delay.
                                self._report(projector, seq)
                                await self._save_position(projector, seq)
                                unsaved = None
                    if unsaved is not None and loop.time() - unsaved_since >= CHECKPOINT_SAVE_SECONDS:
                        await self._save_position(projector, unsaved)
                        unsaved = None
                    continue
                item, getting = getting.result(), None
                if isinstance(item, BaseException):
                    raise item
                if item is None:  # a delivery gap, or another filter: _run binds again at checkpoint + 1
                    if unsaved is not None:
                        await self._save_position(projector, unsaved)
                    return
                batch, last_msg = item
                batch, last_msg, carried = _join_waiting(batches, batch, last_msg, self.batch_size)
                last_active = loop.time()
                if self.crash_after_fetch:
                    raise _SimulatedCrash("after fetch, before commit")
                started = time.perf_counter()
                seen = self.applied.get(projector.name, 0)
                if projector.name not in self.failures and not any(
                        concerns(projector, r) for r in batch if r.seq > seen):
                    await last_msg.ack()
                    reached(max(seen, batch[-1].seq))
                    if unsaved is not None and loop.time() - unsaved_since >= CHECKPOINT_SAVE_SECONDS:
                        await self._save_position(projector, unsaved)
                        unsaved = None
                    continue
                last = await self._apply(projector, batch)  # saves the checkpoint, past `unsaved` too
                unsaved = None
                if self.crash_after_commit:
                    raise _SimulatedCrash("after commit, before ack")
                await last_msg.ack()  # AckPolicy.ALL: acknowledges the whole batch
                self._report(projector, last)
                if projector.name in self.failures:
                    await self._resumed(projector, last)
                log.debug("projection %s applied %d events in %.1f ms", projector.name, len(batch), (time.perf_counter() - started) * 1000)
        finally:
            for pending in (getting, waking):
                if pending is not None:
                    pending.cancel()
            reader.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await reader

    async def _probe(self, projector: Projector) -> int:
        """The position `projector` may take without applying anything: S (see the module's
        docstring) when the stream holds no event of its subjects after its position up to
        S, else its position. A broker that does not answer leaves the position as it is."""
        position = self.applied.get(projector.name, 0)
        try:
            candidate = await self._candidate(projector.name, position)
            if candidate <= position:
                return position
            js = self.nc.jetstream(timeout=self.settings.request_timeout)
            for subject in self.subjects(projector):
                try:
                    found = await js.get_msg(self.settings.stream_name, seq=position + 1, subject=subject,
                                             next=True, direct=True)
                except NotFoundError:  # none of this subject after the position
                    continue
                if found.seq is None or found.seq <= candidate:
                    return position  # its own event comes first: the consumer brings it
        except (nats.errors.Error, TimeoutError) as e:  # the reader meets an outage too, and re-binds
            log.warning("projection %s: probing past other events failed (%s: %s)", projector.name, type(e).__name__, e)
            return position
        return candidate

    async def _candidate(self, projection: str, position: int) -> int:
        """S: the highest sequence known to be in the stream, from this runner's other
        positions, or the stream's last sequence (asked again only when that would not
        reach what is wanted, and at most every `STREAM_LAST_SECONDS`)."""
        best = max((seq for name, seq in self.applied.items() if name != projection), default=0)
        best = max(best, self._stream_last)
        goal = max(position + 1, self._wanted.get(projection, 0))
        loop = asyncio.get_running_loop()
        if best < goal and loop.time() - self._stream_last_at >= STREAM_LAST_SECONDS:
            self._stream_last_at = loop.time()
            js = self.nc.jetstream(timeout=self.settings.request_timeout)
            info = await js.stream_info(self.settings.stream_name)
            self._stream_last = max(self._stream_last, info.state.last_seq)
            best = max(best, self._stream_last)
        return best

    async def _save_position(self, projector: Projector, seq: int) -> None:
        """The checkpoint of a projection that applied nothing up to `seq`, saved with those of
        the other idle projections in one statement a moment later (`POSITIONS_GATHER_SECONDS`).
        Idle projections probe together (`probe_at`); a transaction each had cost a tenth of
        the service's CPU while task runs streamed past nine idle read models. Not waited for:
        a position lost with its statement is only found again by the next probe."""
        self._positions_to_save[projector.name] = max(seq, self._positions_to_save.get(projector.name, 0))
        if self._position_saver is None or self._position_saver.done():
            self._position_saver = asyncio.create_task(self._save_positions())

    async def _save_positions(self) -> None:
        while self._positions_to_save:
            await asyncio.sleep(POSITIONS_GATHER_SECONDS)
            positions, self._positions_to_save = self._positions_to_save, {}
            try:
                async with (await self.statements.pool()).acquire() as driver:  # one statement, forward only
                    await driver.execute(
                        _MOVE_CHECKPOINTS_FORWARD_SQL, list(positions), list(positions.values()), datetime.now(UTC))
                self._positions_failing = False
            except Exception as e:  # noqa: BLE001 - an outage: the next batch or probe saves it
                if not self._positions_failing:  # once per outage, not at every probe round
                    log.warning("projections: saving the positions of %s failed (%s); trying again at the next "
                                "probe", ", ".join(positions), describe_error(e))
                self._positions_failing = True

    async def _read(self, projector: Projector, batches: asyncio.Queue) -> None:
        """Pulls with raw `CONSUMER.MSG.NEXT` requests into a callback subscription and hands
        over whatever has arrived as one batch. (nats-py's `fetch` waits on a timer per message,
        which cost a third of the projection's time at catch-up rates.) One pull request is
        open at a time; it ends when its messages have all come or the server sends a status
        (408: it expired)."""
        api = f"$JS.API.CONSUMER.MSG.NEXT.{self.settings.stream_name}.{self.consumer_name(projector)}"
        inbox = self.nc.new_inbox()
        arrived: list = []
        pull: _PullState = {"open": 0, "status": None}  # messages the open request may still bring
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
                    pull.update({"open": self.batch_size, "status": None})
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
                if self._should_rebind(projector, _pending(msgs[-1].reply)):
                    # Bound again at its checkpoint once this batch is applied (`consumer_filter`).
                    log.debug("projection %s binds again, to %s", projector.name,
                              "its own subjects" if self.reads_the_whole_log(projector) else "the whole log")
                    await batches.put(None)
                    return
        except asyncio.CancelledError:
            raise
        except Exception as e:  # hand it to the applying side, which restarts from the checkpoint
            await batches.put(e)
        finally:
            if sub is not None:
                with contextlib.suppress(Exception):
                    await sub.unsubscribe()


_NOTHING = object()


def _join_waiting(batches: asyncio.Queue, batch: list[RawEvent], last_msg: Any,
                  limit: int) -> tuple[list[RawEvent], Any, Any]:
    """`batch` with the batches the reader queued behind it while the one before was applied,
    up to `limit` events: one statement and one acknowledgement for them all (under load a
    third of the flow-run read model's batches had another waiting behind them, ~4 events
    each, and a batch's own cost is several times an event's). Returns the joined batch, its
    last message, and the item taken from the queue that could not join (a re-bind, an
    error, a batch past the limit), to be handled next, or `_NOTHING`."""
    while not batches.empty():
        item = batches.get_nowait()
        if not isinstance(item, tuple) or len(batch) + len(item[0]) > limit:
            return batch, last_msg, item
        batch, last_msg = batch + item[0], item[1]
    return batch, last_msg, _NOTHING


def _pending(reply: str) -> int:
    """The messages of the consumer's filter still to deliver after this one (the last token
    of `$JS.ACK.<stream>.<consumer>.<delivered>.<sseq>.<cseq>.<ts>.<pending>`; the v2 form
    ends with a random token after it)."""
    tokens = reply.split(".")
    return int(tokens[8] if len(tokens) == 9 else tokens[10])


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
