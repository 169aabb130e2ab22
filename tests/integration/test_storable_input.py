"""Property: whatever text, JSON, integer or datetime the command models accept, the work pools
projection can store in the real Postgres, unchanged (commands/bounds.py). Bodies go the way
the service takes them: JSON bytes, strict validation (`parse_payload`), the decider, the
event as encoded for the log, then the projector's own bulk writes. Each example runs in a
transaction that is rolled back. A modest number of examples, for CI time."""

from __future__ import annotations

import asyncio
import json
from datetime import datetime
from typing import Any

from hypothesis import HealthCheck, example, given
from hypothesis import settings as examples
from hypothesis import strategies as st
from pydantic_core import from_json
from sqlalchemy import select

from runledger.commands import work_pools as wp
from runledger.commands.events import encode_event
from runledger.commands.messages import DecisionContext, Rejection
from runledger.handlers.command_bus import parse_payload
from runledger.infra.database import create_engine, drop_schema, migrate
from runledger.projections.tables import MIGRATIONS, work_pools, work_queues
from runledger.projections.work_pools import WorkPoolsProjector

# Any code point, surrogates and controls included, with the troublesome ones often.
CHARS = st.characters(codec=None, exclude_categories=()) | st.sampled_from("\x00\t\n\x1b\x7f\x85\ud800 a'\"{}")
# Plain text half the time, so that many examples get through every command.
TEXT = st.text("abcXYZ09 -_", min_size=1, max_size=8) | st.text(CHARS, max_size=12)
JSON = st.recursive(
    st.none() | st.booleans() | st.integers(min_value=-(2**66), max_value=2**66) | st.floats() | TEXT,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(TEXT, inner, max_size=3),
    max_leaves=12,
)
INTS = st.none() | st.integers(min_value=-3, max_value=2**33) | st.sampled_from([2**31 - 1, 2**31])


@st.composite
def timestamps(draw) -> str:
    when = draw(st.datetimes(min_value=datetime(1, 1, 1), max_value=datetime(9999, 12, 31, 23, 59, 59)))
    minutes = draw(st.none() | st.integers(min_value=-1439, max_value=1439))
    if minutes is None:
        return when.isoformat()
    sign, minutes = ("-" if minutes < 0 else "+"), abs(minutes)
    return f"{when.isoformat()}{sign}{minutes // 60:02d}:{minutes % 60:02d}"


@st.composite
def histories(draw) -> list[tuple[type[wp.Command], dict[str, Any]]]:
    pool = {"name": draw(TEXT), "type": draw(TEXT), "description": draw(st.none() | TEXT),
            "concurrency_limit": draw(INTS),
            "base_job_template": draw(st.just({}) | st.builds(
                lambda extra, conf: {"job_configuration": {"x": conf}, "variables": {"properties": {}}, **extra},
                st.dictionaries(TEXT, JSON, max_size=2), JSON)),
            "storage_configuration": {"bundle_upload_step": draw(st.none() | st.dictionaries(TEXT, JSON, max_size=3)),
                                      "bundle_execution_step": draw(st.none() | st.dictionaries(TEXT, JSON, max_size=3))}}
    queue = {"name": draw(TEXT), "description": draw(st.none() | TEXT), "concurrency_limit": draw(INTS),
             "priority": draw(INTS)}
    update = {"description": draw(TEXT), "last_polled": draw(timestamps()), "priority": draw(INTS)}
    return [(wp.CreateWorkPool, pool), (wp.CreateWorkQueue, queue), (wp.UpdateWorkQueue, update)]


ALL_THROUGH = [
    (wp.CreateWorkPool, {"name": "p\u00e9", "type": "process", "description": "d", "concurrency_limit": 2**31 - 1,
                         "base_job_template": {}, "storage_configuration": {"bundle_upload_step": {"k": [1, 2.5, None]}}}),
    (wp.CreateWorkQueue, {"name": "q", "description": None, "concurrency_limit": 0, "priority": 2**31 - 1}),
    (wp.UpdateWorkQueue, {"description": "\u2603", "last_polled": "9999-12-30T10:00:00+14:00", "priority": 1}),
]


def _parsed(model, body: dict[str, Any]):
    """The command as the service would take it from the wire, or None if it refuses it."""
    raw = json.dumps({k: v for k, v in body.items() if v is not None}).encode()  # ASCII: surrogates escaped
    parsed = parse_payload(model, raw)
    return None if isinstance(parsed, dict) else parsed


def _numbers_as_floats(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _numbers_as_floats(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_numbers_as_floats(v) for v in value]
    if isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    return value


async def _store(engine, history) -> int:
    """Decide and project what is accepted; return how many commands were. Checks that what
    the read model holds is what the commands said."""
    ctx = DecisionContext()
    (_, pool_body), (_, queue_body), (_, update_body) = history
    create = _parsed(wp.CreateWorkPool, pool_body)
    if create is None:
        return 0
    try:
        made = wp.decide_create_work_pool(create, wp.WorkPoolNameClaim(), ctx)
    except Rejection:
        return 0
    decisions = [made]
    pool = made.result
    queue = None
    add = _parsed(wp.CreateWorkQueue, {**queue_body, "work_pool_name": pool.name})
    if add is not None:
        try:
            decision = wp.decide_create_work_queue(add, pool, ctx)
            pool, queue = decision.result
            decisions.append(decision)
        except Rejection:
            pass
    change = None
    if queue is not None:
        change = _parsed(wp.UpdateWorkQueue, {**update_body, "work_pool_name": pool.name, "work_queue_name": queue.name})
        if change is not None:
            try:
                decision = wp.decide_update_work_queue(change, pool, ctx)
                pool, queue = decision.result
                decisions.append(decision)
            except Rejection:
                change = None
    events = []
    for decision in decisions:
        for new in decision.events:
            if new.aggregate_type != wp.WORK_POOL:
                continue
            envelope = from_json(encode_event(new.aggregate_id, new.event, occurred=ctx.now, event_id=ctx.new_id()).data)
            events.append((envelope["aggregate_id"], envelope["type"], envelope["payload"]))
    async with engine.connect() as conn:
        tx = await conn.begin()
        try:
            await WorkPoolsProjector().apply(conn, events)
            row = (await conn.execute(select(work_pools).where(work_pools.c.id == pool.id))).one()
            assert (row.name, row.description, row.type, row.concurrency_limit) == (
                pool.name, pool.description, pool.type, pool.concurrency_limit)
            # jsonb keeps numbers as decimals: 5.98e+16 comes back as 59800000000000000
            assert _numbers_as_floats(row.storage_configuration) == _numbers_as_floats(
                pool.storage_configuration.model_dump(mode="json"))
            assert _numbers_as_floats(row.base_job_template) == _numbers_as_floats(pool.base_job_template)
            for q in pool.queues.values():
                stored = (await conn.execute(select(work_queues).where(work_queues.c.id == q.id))).one()
                assert (stored.name, stored.description, stored.priority, stored.concurrency_limit, stored.last_polled) == (
                    q.name, q.description, q.priority, q.concurrency_limit, q.last_polled)
        finally:
            await tx.rollback()
    return len(decisions)


def test_what_the_command_models_accept_the_projection_stores(settings):
    test_settings = settings
    loop = asyncio.new_event_loop()
    engine = create_engine(test_settings, pool_size=1)
    accepted: list[int] = []
    try:
        loop.run_until_complete(migrate(engine, test_settings.db_schema, MIGRATIONS))

        @given(histories())
        @example(ALL_THROUGH)  # at least one history that every command accepts, whatever the draw
        @examples(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
        def check(history):
            accepted.append(loop.run_until_complete(_store(engine, history)))

        check()
        assert max(accepted) == 3  # some examples went all the way through
    finally:
        loop.run_until_complete(drop_schema(engine, test_settings.db_schema))
        loop.run_until_complete(engine.dispose())
        loop.close()
