"""Which failures of a projection batch are outages (retry soon) and which may be the data
(find the event, stop there, report it)."""

from __future__ import annotations

import asyncpg
import nats.errors
import pytest
from sqlalchemy import exc as sa_exc

from runledger.infra.database import DatabaseUnavailable
from runledger.projections.runner import (
    _NOTHING,
    CheckpointConflict,
    RawEvent,
    _join_waiting,
    describe_error,
    event_type_of,
    is_transient,
)


def _wrapped(error: Exception) -> sa_exc.DBAPIError:
    """As SQLAlchemy raises it: the DBAPI adapter's error, caused by asyncpg's."""
    try:
        try:
            raise error
        except Exception as e:
            raise sa_exc.DBAPIError("INSERT ...", {}, e) from e
    except sa_exc.DBAPIError as outer:
        return outer


@pytest.mark.parametrize("error", [
    asyncpg.exceptions.ConnectionDoesNotExistError("connection was closed in the middle of operation"),
    asyncpg.exceptions.InterfaceError("connection is closed"),  # a pooled connection after a Postgres restart
    asyncpg.exceptions.AdminShutdownError("terminating connection due to administrator command"),
    asyncpg.exceptions.CannotConnectNowError("the database system is starting up"),
    asyncpg.exceptions.QueryCanceledError("canceling statement due to statement timeout"),
    asyncpg.exceptions.SerializationError("could not serialize access"),
    asyncpg.exceptions.DeadlockDetectedError("deadlock detected"),
    asyncpg.exceptions.TooManyConnectionsError("sorry, too many clients already"),
    ConnectionRefusedError(111, "Connection refused"),
    TimeoutError(),
    nats.errors.TimeoutError(),
    DatabaseUnavailable("cannot use Postgres"),
    CheckpointConflict("moved"),
])
def test_outages_are_transient(error):
    assert is_transient(error)
    assert is_transient(_wrapped(error)) or not isinstance(error, asyncpg.PostgresError)


@pytest.mark.parametrize("error", [
    asyncpg.exceptions.CharacterNotInRepertoireError('invalid byte sequence for encoding "UTF8": 0x00'),
    asyncpg.exceptions.UntranslatableCharacterError("unsupported Unicode escape sequence"),
    asyncpg.exceptions.NumericValueOutOfRangeError("value out of range for type integer"),
    asyncpg.exceptions.UniqueViolationError("duplicate key value violates unique constraint"),
    asyncpg.exceptions.NotNullViolationError("null value in column"),
    asyncpg.exceptions.UndefinedColumnError("column does not exist"),
    asyncpg.exceptions.DataError("invalid input for query argument $1"),  # client-side encoding
    asyncpg.exceptions.InterfaceError("cannot perform operation: another operation is in progress"),  # a bug
    KeyError("pool"),
    TypeError("bad"),
])
def test_data_errors_and_bugs_are_not(error):
    assert not is_transient(error)
    assert not is_transient(_wrapped(error))


def test_the_description_names_the_database_error_without_a_nul():
    error = _wrapped(asyncpg.exceptions.CharacterNotInRepertoireError('invalid byte sequence for encoding "UTF8": 0x00'))
    assert describe_error(error) == 'CharacterNotInRepertoireError: invalid byte sequence for encoding "UTF8": 0x00'
    assert describe_error(KeyError("a\x00b")) == "KeyError: 'a\\x00b'"
    assert "\x00" not in describe_error(ValueError("x\x00y"))


def test_the_event_type_comes_from_the_envelope_or_the_subject():
    assert event_type_of(RawEvent(1, "ns.evt.work_pool.1.WorkPoolCreated", b'{"type": "WorkPoolCreated"}')) == "WorkPoolCreated"
    assert event_type_of(RawEvent(1, "ns.evt.work_pool.1.WorkPoolCreated", b"not json")) == "WorkPoolCreated"


def test_a_batchs_statements_become_one_with_their_parameters_numbered_on():
    from runledger.projections.runner import _numbered_arguments, _one_statement_sql

    writes = [("DELETE FROM t WHERE id = ANY($1::uuid[])", (["a"],)),
              ("INSERT INTO u SELECT $1, $2 WHERE $2 > $1", (1, 2))]
    args: list = ["name", 9, "now", 7]
    numbers = _numbered_arguments(writes, args, "p")
    assert numbers == ((5,), (6, 7)) and args == ["name", 9, "now", 7, ["a"], 1, 2]
    sql = _one_statement_sql(tuple(s for s, _ in writes), numbers)
    # The checkpoint's four parameters come first; each statement's follow, in order.
    assert "w0 AS (DELETE FROM t WHERE id = ANY($5::uuid[]))" in sql
    assert "w1 AS (INSERT INTO u SELECT $6, $7 WHERE $7 > $6)" in sql
    assert sql.startswith("WITH checkpoint AS (UPDATE projection_checkpoints") and "$8" not in sql


def test_an_argument_several_writes_share_is_one_parameter():
    """The events of a run read model's batch are sent once for its two tables; an equal
    argument that is not shared on purpose stays a parameter of its own."""
    from runledger.projections.bulk_writes import SharedArgument
    from runledger.projections.runner import _numbered_arguments, _one_statement_sql

    events = SharedArgument("[]")
    writes = [("INSERT INTO s SELECT $1::jsonb, $2::int[]", (events, [1])),
              ("INSERT INTO r SELECT $1::jsonb, $2::int[], $3", (events, [2], "[]"))]
    args: list = ["name", 9, "now", 7]
    numbers = _numbered_arguments(writes, args, "p")
    assert numbers == ((5, 6), (5, 7, 8)) and args == ["name", 9, "now", 7, events, [1], [2], "[]"]
    sql = _one_statement_sql(tuple(s for s, _ in writes), numbers)
    assert "w0 AS (INSERT INTO s SELECT $5::jsonb, $6::int[])" in sql
    assert "w1 AS (INSERT INTO r SELECT $5::jsonb, $7::int[], $8)" in sql
    with pytest.raises(ValueError, match="takes 2 parameters, was given 1"):
        _numbered_arguments([("SELECT $1, $2", (1,))], [], "p")


def _queued(*items):
    import asyncio

    queue: asyncio.Queue = asyncio.Queue()
    for item in items:
        queue.put_nowait(item)
    return queue


def _events(*seqs: int) -> list[RawEvent]:
    return [RawEvent(seq, f"ns.evt.flow_run.{seq}.FlowRunCreated", b"{}") for seq in seqs]


def test_batches_waiting_behind_a_batch_join_it_in_order():
    queue = _queued((_events(3, 4), "ack-4"), (_events(5), "ack-5"))
    batch, last_msg, carried = _join_waiting(queue, _events(1, 2), "ack-2", limit=100)
    assert [e.seq for e in batch] == [1, 2, 3, 4, 5]
    assert last_msg == "ack-5"  # acknowledging it acknowledges them all (AckPolicy.ALL)
    assert carried is _NOTHING and queue.empty()


def test_a_rebind_or_an_error_behind_a_batch_is_carried_to_the_next_turn_not_joined():
    boom = RuntimeError("the reader failed")
    for behind in (None, boom):
        queue = _queued((_events(2), "ack-2"), behind, (_events(9), "ack-9"))
        batch, last_msg, carried = _join_waiting(queue, _events(1), "ack-1", limit=100)
        assert [e.seq for e in batch] == [1, 2] and last_msg == "ack-2"
        assert carried is behind
        assert queue.qsize() == 1  # what follows waits for the re-bind's or the error's handling


def test_a_batch_that_would_pass_the_limit_waits_for_the_next_turn():
    waiting = (_events(3, 4, 5), "ack-5")
    batch, last_msg, carried = _join_waiting(_queued(waiting), _events(1, 2), "ack-2", limit=4)
    assert [e.seq for e in batch] == [1, 2] and last_msg == "ack-2"
    assert carried is waiting


def test_events_as_stored_are_used_only_when_nothing_needs_reading_first():
    """`stored_events` hands a projector the envelopes unparsed only when every one it handles
    is at its type's current version and well formed; otherwise the decoded path (which
    upcasts, or records what it cannot read) takes the batch."""
    from runledger.commands.events import EVENT_TYPES
    from runledger.projections.flow_runs import FlowRunsProjector
    from runledger.projections.runner import stored_events

    version = EVENT_TYPES["FlowRunCreated"].schema_version
    current = b'{"id":"e","type":"FlowRunCreated","schema_version":%d,"payload":{"run":{}}}' % version
    older = b'{"id":"e","type":"FlowRunCreated","schema_version":%d,"payload":{"run":{}}}' % (version - 1)
    projector = FlowRunsProjector()
    subject = "ns.evt.flow_run.r1.FlowRunCreated"
    assert stored_events(projector, [RawEvent(1, subject, current)]) == [("r1", "FlowRunCreated", current)]
    assert stored_events(projector, [RawEvent(1, subject, current), RawEvent(2, subject, older)]) is None
    assert stored_events(projector, [RawEvent(1, subject, b'{"schema_version":%d,}' % version)]) is None
    assert stored_events(projector, [RawEvent(1, "FlowRunCreated", current)]) is None
    assert stored_events(projector, [RawEvent(1, "ns.evt.flow_run.r1.NoSuchEvent", current)]) is None
    # Another read model's event is left out, unread.
    assert stored_events(projector, [RawEvent(1, "ns.evt.flow.f1.FlowCreated", b"not json")]) == []
