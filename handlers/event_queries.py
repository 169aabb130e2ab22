"""The query `ReadEvents`: the event log over the broker contract, a page at a time, in
runledger's vocabulary (the stored envelopes) or in Prefect's (commands/prefect_events.py).

Answered from the JetStream log, not from a read model: batched direct gets by subject filter
(`EventStore.read_subject`), so the aggregate type, id and event type are filtered by the
server. Everything else (the time filters: `occurred` is in the body; the Prefect event name;
a Prefect resource id) is filtered here, so a page is bounded in the work it does, not only in
what it returns:

- runledger vocabulary: a page reads at most `MAX_SCAN` events past the cursor and stops
  reading after `TIME_BUDGET` seconds; it may be short (even empty) and still carry a cursor;
- Prefect vocabulary: a Prefect event names what earlier events introduced (a queue's pool, a
  deployment's previous values, a run's previous state), so each page folds the matching
  aggregates' history from the start of the log (`ExportState`) up to the page's end, and
  emits only what lies past the cursor. A page reads at most `MAX_FOLD` events in all, from
  sequence 1: past that, with nothing to return yet, the query is `invalid` (narrow it by
  aggregate, or export with `runledger events --vocabulary prefect`).

Every page also fits the broker's max payload: it stops before the event that would not fit.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import Callable
from functools import partial
from typing import Any

from pydantic import ValidationError
from pydantic_core import to_json
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncConnection

from runledger.commands.concurrency_limits import CONCURRENCY_LIMIT
from runledger.commands.deployments import DEPLOYMENT
from runledger.commands.events import EventEnvelope
from runledger.commands.flow_runs import FLOW_RUN
from runledger.commands.flows import FLOW
from runledger.commands.messages import ErrorCode, Rejection
from runledger.commands.prefect_events import ExportState, PrefectEvent, to_prefect_events
from runledger.commands.queries import EventVocabulary, ReadEvents
from runledger.commands.variables import VARIABLE
from runledger.commands.work_pools import WORK_POOL
from runledger.infra.event_store import EventStore
from runledger.projections.tables import work_queues

log = logging.getLogger("runledger.queries")

# Measured on the 2-core reference machine: reading and parsing ~12,500 events/s, folding them
# into Prefect's vocabulary ~13,500 events/s; so a page takes at most ~0.4 s (runledger) or
# ~1.5 s (Prefect), inside the 3.2 s a query may take by default.
MAX_SCAN = 5_000  # runledger vocabulary: events a page reads past its cursor
MAX_FOLD = 20_000  # Prefect vocabulary: events a page reads in all, from sequence 1
TIME_BUDGET = 0.5  # seconds a page keeps reading once it has made progress
READ_BATCH = 256  # events per direct-get batch (and between two yields to the event loop)
# Room left in the max payload for the reply envelope around the events.
REPLY_OVERHEAD = 1024

# Prefect resource kinds whose id is their runledger aggregate's id. A work queue lives in its
# pool's aggregate: its pool is looked up in the read model.
RESOURCE_AGGREGATES = {"work-pool": WORK_POOL, "deployment": DEPLOYMENT, "flow": FLOW, "flow-run": FLOW_RUN,
                       "variable": VARIABLE, "concurrency-limit": CONCURRENCY_LIMIT}


async def _aggregate_of(conn: AsyncConnection, kind: str, object_id: str) -> tuple[str, str]:
    """(aggregate type, aggregate id) that holds the events of a Prefect resource."""
    if kind in RESOURCE_AGGREGATES:
        return RESOURCE_AGGREGATES[kind], object_id
    pool_id = (await conn.execute(select(work_queues.c.work_pool_id).where(
        work_queues.c.id == uuid.UUID(object_id)))).scalar_one_or_none()
    if pool_id is None:
        raise Rejection(ErrorCode.NOT_FOUND, f"Work queue {object_id} not found.", field="resource_id")
    return WORK_POOL, str(pool_id)


class _Page:
    """The events of one page, bounded by `limit` items and the reply's bytes."""

    def __init__(self, limit: int, max_bytes: int):
        self.limit, self.max_bytes = limit, max_bytes
        self.events: list[dict[str, Any]] = []
        self.size = 0

    @property
    def full(self) -> bool:
        return len(self.events) >= self.limit

    def add(self, seq: int, items: list[dict[str, Any]]) -> bool:
        """Add the items of the event at `seq`, all or none: False when they do not fit (the
        page ends before that event). An event too large for any page is `invalid`."""
        size = sum(len(to_json(item)) + 1 for item in items)
        if self.events and (len(self.events) + len(items) > self.limit or self.size + size > self.max_bytes):
            return False
        if size > self.max_bytes:
            raise Rejection(ErrorCode.INVALID, f"the event at seq {seq} takes {size:,} bytes as JSON, more than a reply "
                                               f"may carry ({self.max_bytes:,}); read it with `runledger events` "
                                               f"(or skip it: after_seq={seq})", field="after_seq")
        self.events.extend(items)
        self.size += size
        return True

    def result(self, next_after_seq: int | None) -> dict[str, Any]:
        return {"events": self.events, "next_after_seq": next_after_seq}


def _envelope(seq: int, data: bytes) -> EventEnvelope | None:
    try:
        return EventEnvelope.model_validate_json(data)
    except ValidationError:
        log.warning("ReadEvents skipped the unreadable event at seq %d", seq)
        return None


async def read_events(conn: AsyncConnection, query: ReadEvents, *, store: EventStore) -> dict[str, Any]:
    """One page of the log (see the module docstring for what a page reads)."""
    aggregate_type, aggregate_id = query.aggregate_type, query.aggregate_id
    resource = None
    if query.resource_id is not None:
        _, kind, object_id = query.resource_id.split(".", 2)
        resource = f"prefect.{kind}.{object_id.lower()}"  # as the export writes it
        aggregate_type, aggregate_id = await _aggregate_of(conn, kind, object_id.lower())
    page = _Page(query.limit, store.max_payload - REPLY_OVERHEAD)
    end = await store.last_sequence()  # the page ends there, whatever is appended meanwhile
    if query.after_seq >= end:
        return page.result(None)
    prefect = query.vocabulary == EventVocabulary.PREFECT
    # The Prefect vocabulary folds every event of the aggregates, whatever their type.
    event_type = None if prefect else query.event_type
    subject = ".".join([store.prefix, aggregate_type or "*", aggregate_id or "*", event_type or "*"])

    def wanted(env: EventEnvelope) -> bool:
        return not ((query.event_type and env.type != query.event_type)
                    or (query.since and env.occurred < query.since)
                    or (query.until and env.occurred > query.until))

    def exported(seq: int, events: list[PrefectEvent]) -> list[dict[str, Any]]:
        prefix = query.prefect_event_prefix
        return [{"seq": seq, **e} for e in events
                if (prefix is None or e["event"].startswith(prefix))
                and (resource is None or e["resource"].get("prefect.resource.id") == resource)]

    state = ExportState() if prefect else None
    loop = asyncio.get_running_loop()
    deadline = loop.time() + TIME_BUDGET
    position = query.after_seq  # the last event this page has dealt with: the cursor
    start = 1 if prefect else query.after_seq + 1
    read = 0
    while True:
        rows = [r for r in await store.read_subject(subject, start, batch=READ_BATCH, max_messages=READ_BATCH)
                if r[0] <= end]
        for seq, _, data, _ in rows:
            read += 1
            env = _envelope(seq, data)
            if env is None:
                position = max(position, seq)
                continue
            events = to_prefect_events(env, state) if state is not None else None  # folded, kept or not
            if seq <= query.after_seq:
                continue
            if wanted(env):
                items = exported(seq, events) if events is not None else [{"seq": seq, **env.model_dump(mode="json")}]
                if items and not page.add(seq, items):
                    return page.result(position)
            position = seq
            if page.full:
                return page.result(None if position >= end else position)
        if len(rows) < READ_BATCH:
            return page.result(None)  # the log's end (as it was when the query arrived)
        start = rows[-1][0] + 1
        progressed = position > query.after_seq
        if progressed and (loop.time() >= deadline or read >= (MAX_FOLD if prefect else MAX_SCAN)):
            return page.result(position)
        if not progressed and prefect and read >= MAX_FOLD:
            raise Rejection(ErrorCode.INVALID, f"the Prefect vocabulary folds each aggregate's history from the start "
                                               f"of the log, and this page would read more than {MAX_FOLD:,} events "
                                               "before its first: narrow it by aggregate_type/aggregate_id or "
                                               "resource_id, or export with `runledger events --vocabulary prefect`",
                            field="vocabulary")
        await asyncio.sleep(0)  # let the service's other requests run between batches


def event_queries(store: EventStore) -> dict[str, tuple[type[ReadEvents], Callable[..., Any]]]:
    """The query registry entry (name -> (model, function)) for a service."""
    return {"ReadEvents": (ReadEvents, partial(read_events, store=store))}
