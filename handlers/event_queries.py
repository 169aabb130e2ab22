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
- One deployment or flow run (by aggregate id or resource id) in Prefect's vocabulary is read
  with its neighbours (`prefect_events.Neighbours`), merged in stream order by one direct-get
  reader per subject: the aggregates that name what its events relate (its flow, deployment,
  pool, parent task run), and those that write events about it (a deployment's READY and
  NOT_READY come from its pools' polls and the runners' polls, which every runner poll's
  aggregate is read for). Of the neighbours' events only those about it are kept. A work
  queue's pool is found by the log's queue index, so a deleted queue's history is found too.

Every page also fits the broker's max payload: it stops before the event that would not fit.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncGenerator, Callable
from functools import partial
from typing import Any

from pydantic import ValidationError
from pydantic_core import to_json
from sqlalchemy.ext.asyncio import AsyncConnection

from runledger.commands.concurrency_limits import CONCURRENCY_LIMIT
from runledger.commands.deployments import DEPLOYMENT
from runledger.commands.events import EventEnvelope
from runledger.commands.flow_runs import FLOW_RUN
from runledger.commands.flows import FLOW
from runledger.commands.messages import ErrorCode, Rejection
from runledger.commands.prefect_events import (
    POOL_NAMING_EVENTS,
    ExportState,
    PrefectEvent,
    neighbours,
    to_prefect_events,
)
from runledger.commands.queries import EventVocabulary, ReadEvents
from runledger.commands.variables import VARIABLE
from runledger.commands.work_pools import WORK_POOL
from runledger.infra.event_store import EventStore
from runledger.infra.log_index import LogIndex

from .work_pool_commands import queue_index

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
# pool's aggregate: its pool is looked up in the log's queue index.
RESOURCE_AGGREGATES = {"work-pool": WORK_POOL, "deployment": DEPLOYMENT, "flow": FLOW, "flow-run": FLOW_RUN,
                       "variable": VARIABLE, "concurrency-limit": CONCURRENCY_LIMIT}
# The aggregates whose Prefect export reads other aggregates with them (`prefect_events.Neighbours`),
# by the Prefect resource kind each one is.
WITH_NEIGHBOURS = {DEPLOYMENT: "deployment", FLOW_RUN: "flow-run"}


async def _aggregate_of(queues: LogIndex, kind: str, object_id: str) -> tuple[str, str]:
    """(aggregate type, aggregate id) that holds the events of a Prefect resource. A queue is
    found by the log's own index, so a deleted queue's history (its deletion included) is
    found too; `not_found` only for a queue the log never had."""
    if kind in RESOURCE_AGGREGATES:
        return RESOURCE_AGGREGATES[kind], object_id
    pool_id = await queues.lookup(object_id)
    if pool_id is None:
        raise Rejection(ErrorCode.NOT_FOUND, f"Work queue {object_id} not found.", field="resource_id")
    return WORK_POOL, pool_id


async def neighbour_subjects(store: EventStore, queues: LogIndex, aggregate_type: str, aggregate_id: str,
                             end: int) -> list[str]:
    """The subjects of the aggregates the Prefect export of this one reads with it (its
    `Neighbours`: a run's flow, deployment, pool and parent task run; a deployment's flow and
    pools, and the runners' polls), found from its own events up to `end`."""
    if aggregate_type not in WITH_NEIGHBOURS:
        return []
    rows = await store.read_subject(store.aggregate_filter(aggregate_type, aggregate_id), 1, max_messages=MAX_FOLD)
    found = neighbours(env for seq, _, data, _ in rows if seq <= end and (env := _envelope(seq, data)) is not None)
    pools = {pool_id for queue_id in sorted(found.queue_ids) if (pool_id := await queues.lookup(queue_id))}
    own = [f"{store.prefix}.{kind}.{i}.*" for kind, i in sorted(found.aggregates)]
    naming = [f"{store.prefix}.{WORK_POOL}.{pool_id}.{t}" for pool_id in sorted(pools) for t in sorted(POOL_NAMING_EVENTS)]
    if aggregate_type != DEPLOYMENT:
        # A run's events need only the names of its pool and queue, not the pool's polls (a
        # busy pool's workers write thousands a day, which would use up the page's reads).
        return own + naming
    # A deployment's need its pools' polls and the runners' polls too, whose ready and
    # not-ready are about it, unless there are too many of them for a page to read: then it
    # is read without them (its ready and not-ready left out) rather than refused.
    polls = ([f"{store.prefix}.{WORK_POOL}.{pool_id}.*" for pool_id in sorted(pools)]
             + [f"{store.prefix}.{kind}.*.*" for kind in sorted(found.aggregate_types)])
    if sum([await _count(store, subject) for subject in polls]) > MAX_FOLD // 2:
        log.info("ReadEvents of deployment %s leaves out its pools' and the runners' polls: more than %d",
                 aggregate_id, MAX_FOLD // 2)
        return own + naming
    return own + polls


async def _count(store: EventStore, subject: str) -> int:
    """How many events the log holds on `subject` (a wildcard: summed over the subjects it
    matches, which the server counts)."""
    info = await store.js.stream_info(store.stream, subjects_filter=subject)
    return sum((info.state.subjects or {}).values())


async def read_merged(store: EventStore, subjects: list[str], start: int, end: int, batch: int
                      ) -> AsyncGenerator[tuple[list[tuple[int, str, bytes, dict]], bool], None]:
    """The events matching any of `subjects` from `start` through `end`, in stream order, a
    batch at a time by direct gets, with whether it is the last batch. Each subject is read a
    batch ahead; what is given out never passes the last sequence read of a subject that may
    hold more, so the merge is in stream order."""
    subjects = list(dict.fromkeys(subjects))
    next_start = dict.fromkeys(subjects, start)
    buffered: dict[str, list[tuple[int, str, bytes, dict]]] = {s: [] for s in subjects}
    unfinished = set(subjects)
    while True:
        for subject in subjects:
            if subject in unfinished and not buffered[subject]:
                rows = await store.read_subject(subject, next_start[subject], batch=batch, max_messages=batch)
                kept = [r for r in rows if r[0] <= end]
                if len(kept) < batch:
                    unfinished.discard(subject)
                if kept:
                    next_start[subject] = kept[-1][0] + 1
                buffered[subject] = kept
        frontier = min((buffered[s][-1][0] for s in unfinished), default=end)
        out = sorted((r for s in subjects for r in buffered[s] if r[0] <= frontier), key=lambda r: r[0])
        for subject in subjects:
            buffered[subject] = [r for r in buffered[subject] if r[0] > frontier]
        last = not unfinished and not any(buffered.values())
        yield out, last
        if last:
            return


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


async def read_events(conn: AsyncConnection, query: ReadEvents, *, store: EventStore,
                      queues: LogIndex | None = None) -> dict[str, Any]:
    """One page of the log (see the module docstring for what a page reads). `queues`: the
    service's queue index (queue id -> pool id, read from the log); one is made if not given."""
    queues = queues if queues is not None else queue_index(store)
    aggregate_type, aggregate_id = query.aggregate_type, query.aggregate_id
    resource = None
    if query.resource_id is not None:
        _, kind, object_id = query.resource_id.split(".", 2)
        resource = f"prefect.{kind}.{object_id.lower()}"  # as the export writes it
        aggregate_type, aggregate_id = await _aggregate_of(queues, kind, object_id.lower())
    page = _Page(query.limit, store.max_payload - REPLY_OVERHEAD)
    end = await store.last_sequence()  # the page ends there, whatever is appended meanwhile
    if query.after_seq >= end:
        return page.result(None)
    prefect = query.vocabulary == EventVocabulary.PREFECT
    # The Prefect vocabulary folds every event of the aggregates, whatever their type.
    event_type = None if prefect else query.event_type
    subjects = [".".join([store.prefix, aggregate_type or "*", aggregate_id or "*", event_type or "*"])]
    # In Prefect's vocabulary, one deployment or run is read with its neighbours; of their
    # events, only those about it are kept (a deployment's READY and NOT_READY).
    about = None
    if prefect and aggregate_type in WITH_NEIGHBOURS and aggregate_id is not None:
        subjects += await neighbour_subjects(store, queues, aggregate_type, aggregate_id, end)
        about = f"prefect.{WITH_NEIGHBOURS[aggregate_type]}.{aggregate_id}"

    def wanted(env: EventEnvelope) -> bool:
        return not ((query.event_type and env.type != query.event_type)
                    or (query.since and env.occurred < query.since)
                    or (query.until and env.occurred > query.until))

    def exported(seq: int, env: EventEnvelope, events: list[PrefectEvent]) -> list[dict[str, Any]]:
        prefix = query.prefect_event_prefix
        own = about is None or (env.aggregate_type == aggregate_type and env.aggregate_id == aggregate_id)
        return [{"seq": seq, **e} for e in events
                if (prefix is None or e["event"].startswith(prefix))
                and (resource is None or e["resource"].get("prefect.resource.id") == resource)
                and (own or e["resource"].get("prefect.resource.id") == about)]

    state = ExportState() if prefect else None
    loop = asyncio.get_running_loop()
    deadline = loop.time() + TIME_BUDGET
    position = query.after_seq  # the last event this page has dealt with: the cursor
    start = 1 if prefect else query.after_seq + 1
    read = 0
    async with contextlib.aclosing(read_merged(store, subjects, start, end, READ_BATCH)) as batches:
        async for rows, last in batches:
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
                    items = (exported(seq, env, events) if events is not None
                             else [{"seq": seq, **env.model_dump(mode="json")}])
                    if items and not page.add(seq, items):
                        return page.result(position)
                position = seq
                if page.full:
                    return page.result(None if position >= end else position)
            if last:
                return page.result(None)  # the log's end (as it was when the query arrived)
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
    return page.result(None)


def event_queries(store: EventStore) -> dict[str, tuple[type[ReadEvents], Callable[..., Any]]]:
    """The query registry entry (name -> (model, function)) for a service."""
    return {"ReadEvents": (ReadEvents, partial(read_events, store=store, queues=queue_index(store)))}
