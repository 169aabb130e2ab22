"""The work pools and work queues read model: its projector and the queries over it."""

from __future__ import annotations

import json
import uuid
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any, cast

from sqlalchemy import DateTime, and_, bindparam, case, func, literal_column, or_, select
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.ext.asyncio import AsyncConnection

from runledger.commands import queries as q
from runledger.commands import work_pools as wp
from runledger.commands.bounds import json_time
from runledger.commands.messages import Event, not_found
from runledger.infra.database import asyncpg_connection

from .filters import where_filter
from .scheduled_runs import count_filter_active
from .tables import flow_runs, work_pools, work_queues

_DELETED = object()
_ts = datetime.fromisoformat


def _pool_row(p: dict[str, Any]) -> dict[str, Any]:
    return {
        "id": p["id"], "name": p["name"], "description": p["description"], "type": p["type"],
        "base_job_template": p["base_job_template"], "is_paused": p["is_paused"],
        "concurrency_limit": p["concurrency_limit"], "storage_configuration": p["storage_configuration"],
        "status": p["status"], "default_queue_id": p["default_queue_id"],
        "created": _ts(p["created"]), "updated": _ts(p["updated"]),
    }


def _queue_row(pool_id: str, q: dict[str, Any]) -> dict[str, Any]:
    return {
        "id": q["id"], "work_pool_id": pool_id, "name": q["name"], "description": q["description"],
        "is_paused": q["is_paused"], "concurrency_limit": q["concurrency_limit"], "priority": q["priority"],
        "status": q["status"], "last_polled": _ts(q["last_polled"]) if q["last_polled"] else None,
        "created": _ts(q["created"]), "updated": _ts(q["updated"]), "filter": q.get("filter"),
    }


class WorkPoolsProjector:
    """Applies a batch in memory over the rows it touches, then writes them back in bulk.
    It reads payload dicts (`raw_payloads`): the events' snapshots map straight onto rows."""

    name = "work_pools"
    tables = (work_pools, work_queues)
    raw_payloads = True
    handles = frozenset(cls.event_type for cls in (
        wp.WorkPoolCreated, wp.WorkPoolUpdated, wp.WorkPoolDeleted, wp.WorkQueueCreated,
        wp.WorkQueueUpdated, wp.WorkQueueDeleted, wp.WorkQueuesReprioritized, wp.WorkPoolWorkersChanged,
        wp.WorkQueuesPolled, wp.WorkQueuesNotReady,
    ))

    async def apply(self, conn: AsyncConnection, events: Sequence[tuple[str, str, Event | dict]]) -> None:
        payloads = cast(Sequence[tuple[str, str, dict[str, Any]]], events)  # raw_payloads: dicts only
        pools: dict[str, Any] = {}
        queues: dict[str, Any] = {}
        moved_ids = {qid for _, _, e in payloads for qid in e.get("reprioritized", ())}
        # Polls and status changes touch a few fields of rows the batch may not hold.
        moved_ids.update(qid for _, t, e in payloads if t in ("WorkQueuesPolled", "WorkQueuesNotReady")
                         for qid in e["queue_ids"])
        if moved_ids:
            rows = await conn.execute(select(work_queues).where(work_queues.c.id.in_([uuid.UUID(i) for i in moved_ids])))
            queues.update({str(r.id): dict(r._mapping) for r in rows})
        status_pools = {pid for pid, t, e in payloads if t == "WorkPoolWorkersChanged" and e.get("status")}
        if status_pools:
            rows = await conn.execute(select(work_pools).where(work_pools.c.id.in_([uuid.UUID(i) for i in status_pools])))
            pools.update({str(r.id): dict(r._mapping) for r in rows})

        def move(priorities: dict[str, int], when: str) -> None:
            stamp = _ts(when)
            for qid, priority in priorities.items():
                row = queues.get(qid)
                if isinstance(row, dict):
                    queues[qid] = {**row, "priority": priority, "updated": stamp}

        for pool_id, event_type, e in payloads:
            match event_type:
                case "WorkPoolCreated":
                    pools[e["pool"]["id"]] = _pool_row(e["pool"])
                    queues[e["default_queue"]["id"]] = _queue_row(pool_id, e["default_queue"])
                case "WorkPoolUpdated":
                    pools[e["pool"]["id"]] = _pool_row(e["pool"])
                case "WorkQueueCreated" | "WorkQueueUpdated":
                    queues[e["queue"]["id"]] = _queue_row(pool_id, e["queue"])
                    move(e["reprioritized"], e["queue"]["updated"])
                case "WorkPoolDeleted":
                    pools[e["pool_id"]] = _DELETED
                    for qid in e["queue_ids"]:
                        queues[qid] = _DELETED
                case "WorkQueueDeleted":
                    queues[e["queue_id"]] = _DELETED
                    move(e["reprioritized"], e["deleted"])
                case "WorkQueuesReprioritized":
                    move(e["reprioritized"], e["updated"])
                case "WorkPoolWorkersChanged":
                    pool_row = pools.get(pool_id)
                    if e.get("status") and isinstance(pool_row, dict):
                        pools[pool_id] = {**pool_row, "status": e["status"]["new"]}
                case "WorkQueuesPolled":
                    polled, ready = _ts(e["polled"]), set(e["ready"])
                    for qid in e["queue_ids"]:
                        row = queues.get(qid)
                        if isinstance(row, dict):
                            queues[qid] = {**row, "last_polled": polled,
                                           "status": wp.Status.READY.value if qid in ready else row["status"]}
                case "WorkQueuesNotReady":
                    last_polled = e.get("last_polled") or {}  # v2: what expired routine polls said
                    for qid in e["queue_ids"]:
                        row = queues.get(qid)
                        if isinstance(row, dict):
                            last = last_polled.get(qid)
                            queues[qid] = {**row, "status": wp.Status.NOT_READY.value,
                                           "last_polled": _ts(last) if last else row["last_polled"]}
        await _write(conn, work_pools, pools)
        await _write(conn, work_queues, queues)


def _upsert_sql(table) -> str:
    cols = [c.name for c in table.columns]
    casts = ["::jsonb" if isinstance(c.type, JSONB) else "" for c in table.columns]
    values = ", ".join(f"${i}{cast}" for i, cast in enumerate(casts, start=1))
    updates = ", ".join(f"{c} = EXCLUDED.{c}" for c in cols if c != "id")
    return f"INSERT INTO {table.name} ({', '.join(cols)}) VALUES ({values}) ON CONFLICT (id) DO UPDATE SET {updates}"


_UPSERT = {t.name: _upsert_sql(t) for t in (work_pools, work_queues)}
_JSON_COLUMNS = {t.name: [isinstance(c.type, JSONB) for c in t.columns] for t in (work_pools, work_queues)}


async def _write(conn: AsyncConnection, table, rows: dict[str, Any]) -> None:
    """Bulk delete and upsert through asyncpg itself: SQLAlchemy's per-row parameter handling
    cost more than the database work at projection rates."""
    gone = [k for k, v in rows.items() if v is _DELETED]
    kept = [v for v in rows.values() if v is not _DELETED]
    if not gone and not kept:
        return
    driver = await asyncpg_connection(conn)
    if gone:
        await driver.execute(f"DELETE FROM {table.name} WHERE id = ANY($1::uuid[])", gone)
    if kept:
        json_cols = _JSON_COLUMNS[table.name]
        names = [c.name for c in table.columns]
        records = [
            tuple(json.dumps(row[n]) if is_json else row[n] for n, is_json in zip(names, json_cols, strict=True))
            for row in kept
        ]
        await driver.executemany(_UPSERT[table.name], records)


# ---------------------------------------------------------------------------------------------
# Queries


_iso = json_time  # the replies' one way of writing a time


# Slot counts, from the flow runs read model (its index by queue and state type): a pool's
# PENDING and RUNNING runs in any of its queues, paused ones included; a queue's, through the
# pool API; a queue's with CANCELLING ones too, through the legacy queue API (but a tag-based
# queue's, there, by its filter: `legacy_queue_reply`).
_HOLDING = ("PENDING", "RUNNING")
_HOLDING_LEGACY = ("PENDING", "RUNNING", "CANCELLING")
_counted_queue = work_queues.alias("counted_queue")
_POOL_ACTIVE = (select(func.count()).select_from(flow_runs.join(_counted_queue, _counted_queue.c.id == flow_runs.c.work_queue_id))
                .where(_counted_queue.c.work_pool_id == work_pools.c.id, flow_runs.c.state_type.in_(_HOLDING))
                .scalar_subquery().label("active_slots"))


def _queue_active(states: tuple[str, ...], label: str, *, always: bool = False) -> Any:
    """A queue's count; in replies, only for a queue with a limit (they show none otherwise,
    and Postgres runs the subquery only in the CASE branch that needs it)."""
    count = (select(func.count()).select_from(flow_runs)
             .where(flow_runs.c.work_queue_id == work_queues.c.id, flow_runs.c.state_type.in_(states))
             .scalar_subquery())
    if always:
        return count.label(label)
    return case((work_queues.c.concurrency_limit.is_(None), None), else_=count).label(label)


_QUEUE_ACTIVE = (_queue_active(_HOLDING, "active_slots"), _queue_active(_HOLDING_LEGACY, "legacy_active_slots"))


def pool_reply(r) -> dict[str, Any]:
    """WP-3: `prefect-agent` pools report no status; SL-1: `active_slots` only with a limit."""
    return {
        "id": str(r.id), "created": _iso(r.created), "updated": _iso(r.updated), "name": r.name,
        "description": r.description, "type": r.type, "base_job_template": r.base_job_template,
        "is_paused": r.is_paused, "concurrency_limit": r.concurrency_limit,
        "status": None if r.type == wp.LEGACY_POOL_TYPE else r.status,
        "default_queue_id": str(r.default_queue_id), "storage_configuration": r.storage_configuration,
        "active_slots": r.active_slots if r.concurrency_limit is not None else None,
    }


def queue_reply(r, pool_name: str, *, legacy: bool = False) -> dict[str, Any]:
    """SL-2 (pool API) or SL-3 (`legacy`: the queue API, where CANCELLING runs count too):
    `active_slots` only with a limit."""
    active = r.legacy_active_slots if legacy else r.active_slots
    return {
        "id": str(r.id), "created": _iso(r.created), "updated": _iso(r.updated), "name": r.name,
        "description": r.description, "is_paused": r.is_paused, "concurrency_limit": r.concurrency_limit,
        "priority": r.priority, "work_pool_id": str(r.work_pool_id), "work_pool_name": pool_name,
        "last_polled": _iso(r.last_polled), "status": r.status, "filter": r.filter,
        "active_slots": active if r.concurrency_limit is not None else None,
    }


async def legacy_queue_reply(conn: AsyncConnection, r, pool_name: str) -> dict[str, Any]:
    """A queue through the legacy queue API (SL-3). A deprecated tag-based queue's slots are
    its filter's matches, not its own runs: counted apart, as Prefect does, since each filter
    is its own predicate (and such queues are few)."""
    reply = queue_reply(r, pool_name, legacy=True)
    if isinstance(r.filter, dict) and r.concurrency_limit is not None:
        reply["active_slots"] = await count_filter_active(conn, r.filter)
    return reply


def _pool_filter(stmt, f: q.WorkPoolFilter | None):
    return where_filter(stmt, work_pools, f)


def _queue_filter(stmt, f: q.WorkQueueFilter | None):
    return where_filter(stmt, work_queues, f)


# The hot lookups are built once with bound parameters: building a SQLAlchemy statement and
# its cache key per request was a third of a query's CPU (bench/queries.py).
_POOL_BY_NAME = select(work_pools, _POOL_ACTIVE).where(work_pools.c.name == bindparam("name"))


async def _pool_row_by_name(conn: AsyncConnection, name: str):
    row = (await conn.execute(_POOL_BY_NAME, {"name": name})).first()
    if row is None:
        raise wp.pool_not_found(name)
    return row


async def get_work_pool(conn: AsyncConnection, query: q.GetWorkPool) -> dict[str, Any]:
    return pool_reply(await _pool_row_by_name(conn, query.name))


async def list_work_pools(conn: AsyncConnection, query: q.ListWorkPools) -> list[dict[str, Any]]:
    stmt = _pool_filter(select(work_pools, _POOL_ACTIVE), query.work_pools).order_by(work_pools.c.name, work_pools.c.id)
    rows = await conn.execute(stmt.limit(query.limit).offset(query.offset))
    return [pool_reply(r) for r in rows]


async def count_work_pools(conn: AsyncConnection, query: q.CountWorkPools) -> int:
    stmt = _pool_filter(select(func.count()).select_from(work_pools), query.work_pools)
    return (await conn.execute(stmt)).scalar_one()


_queue_with_pool = select(work_queues, *_QUEUE_ACTIVE, work_pools.c.name.label("pool_name")).join(
    work_pools, work_pools.c.id == work_queues.c.work_pool_id
)


_QUEUE_BY_NAMES = _queue_with_pool.where(work_pools.c.name == bindparam("pool"), work_queues.c.name == bindparam("queue"))
_QUEUES_OF_POOL = (
    select(work_queues, *_QUEUE_ACTIVE).where(work_queues.c.work_pool_id == bindparam("pool_id"))
    .order_by(work_queues.c.priority, work_queues.c.created, work_queues.c.id)
    .limit(bindparam("limit")).offset(bindparam("offset"))
)
_QUEUE_BY_ID = _queue_with_pool.where(work_queues.c.id == bindparam("id"))


async def get_work_queue(conn: AsyncConnection, query: q.GetWorkQueue) -> dict[str, Any]:
    """WQ-7: an unknown pool gets the queue's message too (Prefect looks the pair up at once)."""
    row = (await conn.execute(_QUEUE_BY_NAMES, {"pool": query.work_pool_name, "queue": query.work_queue_name})).first()
    if row is None:
        raise wp.queue_not_found(query.work_pool_name, query.work_queue_name)
    return queue_reply(row, row.pool_name)


async def list_work_queues(conn: AsyncConnection, query: q.ListWorkQueues) -> list[dict[str, Any]]:
    pool = await _pool_row_by_name(conn, query.work_pool_name)
    if query.work_queues is None:
        rows = await conn.execute(_QUEUES_OF_POOL, {"pool_id": pool.id, "limit": query.limit, "offset": query.offset})
        return [queue_reply(r, pool.name) for r in rows]
    stmt = _queue_filter(select(work_queues, *_QUEUE_ACTIVE).where(work_queues.c.work_pool_id == pool.id),
                         query.work_queues)
    stmt = stmt.order_by(work_queues.c.priority, work_queues.c.created, work_queues.c.id)
    rows = await conn.execute(stmt.limit(query.limit).offset(query.offset))
    return [queue_reply(r, pool.name) for r in rows]


async def count_work_queues(conn: AsyncConnection, query: q.CountWorkQueues) -> int:
    pool = await _pool_row_by_name(conn, query.work_pool_name)
    stmt = select(func.count()).select_from(work_queues).where(work_queues.c.work_pool_id == pool.id)
    return (await conn.execute(_queue_filter(stmt, query.work_queues))).scalar_one()


async def get_work_queue_by_id(conn: AsyncConnection, query: q.GetWorkQueueById) -> dict[str, Any]:
    row = (await conn.execute(_QUEUE_BY_ID, {"id": query.id})).first()
    if row is None:
        raise wp.queue_id_not_found(query.id)
    return await legacy_queue_reply(conn, row, row.pool_name)


async def get_legacy_work_queue(conn: AsyncConnection, query: q.GetLegacyWorkQueue) -> dict[str, Any]:
    row = (await conn.execute(_queue_with_pool.where(
        work_pools.c.name == wp.LEGACY_POOL_NAME, work_queues.c.name == query.name
    ))).first()
    if row is None:
        raise not_found(f"Work queue '{query.name}' not found.")
    return await legacy_queue_reply(conn, row, row.pool_name)


async def list_all_work_queues(conn: AsyncConnection, query: q.ListAllWorkQueues) -> list[dict[str, Any]]:
    stmt = _queue_filter(_queue_with_pool, query.work_queues).order_by(work_queues.c.name, work_queues.c.id)
    rows = await conn.execute(stmt.limit(query.limit).offset(query.offset))
    return [await legacy_queue_reply(conn, r, r.pool_name) for r in rows]


# A queue's Late runs, by state name as Prefect counts them, from the partial index
# `flow_runs_late_by_queue` (the name is a literal, not a parameter, so that even a generic
# plan of the prepared statement matches the index's predicate).
_LATE_RUNS = (select(func.count()).select_from(flow_runs)
              .where(flow_runs.c.work_queue_id == work_queues.c.id, flow_runs.c.state_name == literal_column("'Late'"))
              .scalar_subquery().label("late_runs_count"))
_QUEUE_HEALTH = select(work_queues.c.last_polled, _LATE_RUNS).where(work_queues.c.id == bindparam("id"))


async def get_work_queue_status(conn: AsyncConnection, query: q.GetWorkQueueStatus) -> dict[str, Any]:
    row = (await conn.execute(_QUEUE_HEALTH, {"id": query.id})).first()
    if row is None:
        raise not_found(f"Work queue with id {query.id} not found")
    return wp.work_queue_health(row.late_runs_count, row.last_polled, datetime.now(UTC))


# ---------------------------------------------------------------------------------------------
# Concurrency status: who holds the slots


def _slot_summary(r: Any, now: datetime) -> dict[str, Any]:
    """Prefect's `FlowRunSlotSummary`."""
    return {"id": str(r.id), "name": r.name, "state_type": r.state_type, "state_name": r.state_name,
            "start_time": _iso(r.start_time), "state_timestamp": _iso(r.state_timestamp),
            "time_in_current_state": (now - r.state_timestamp).total_seconds() if r.state_timestamp else None}


# The status view counts every queue's holders, limited or not.
_COUNTED_QUEUES_OF_POOL = (
    select(work_queues, _queue_active(_HOLDING, "active_slots", always=True))
    .where(work_queues.c.work_pool_id == bindparam("pool_id"))
    .order_by(work_queues.c.priority, work_queues.c.created, work_queues.c.id)
    .limit(bindparam("limit")).offset(bindparam("offset"))
)
_STATE_TIMESTAMP = func.cast(flow_runs.c.state["timestamp"].astext, DateTime(timezone=True)).label("state_timestamp")
_SUMMARY_COLUMNS = (flow_runs.c.id, flow_runs.c.name, flow_runs.c.state_type, flow_runs.c.state_name,
                    flow_runs.c.start_time, _STATE_TIMESTAMP)


async def get_work_pool_concurrency_status(conn: AsyncConnection,
                                           query: q.GetWorkPoolConcurrencyStatus) -> dict[str, Any]:
    """SL-6: the pool's `active_slots` counts every queue (SL-1), not only the page's; each
    queue's holders are its first by id, as Prefect's `get_work_pool_slot_holders` cuts them."""
    pool = await _pool_row_by_name(conn, query.work_pool_name)
    now = datetime.now(UTC)
    offset = (query.page - 1) * query.limit
    queues = list(await conn.execute(_COUNTED_QUEUES_OF_POOL, {"pool_id": pool.id, "limit": query.limit,
                                                               "offset": offset}))
    total_queues = (await conn.execute(select(func.count()).select_from(work_queues)
                                       .where(work_queues.c.work_pool_id == pool.id))).scalar_one()
    holders: dict[Any, list[dict[str, Any]]] = {r.id: [] for r in queues}
    if queues and query.flow_run_limit:
        ranked = (select(*_SUMMARY_COLUMNS, flow_runs.c.work_queue_id,
                         func.row_number().over(partition_by=flow_runs.c.work_queue_id, order_by=flow_runs.c.id)
                         .label("n"))
                  .where(flow_runs.c.work_queue_id.in_(list(holders)), flow_runs.c.state_type.in_(_HOLDING))
                  .subquery())
        for r in await conn.execute(select(ranked).where(ranked.c.n <= query.flow_run_limit)
                                    .order_by(ranked.c.work_queue_id, ranked.c.n)):
            holders[r.work_queue_id].append(_slot_summary(r, now))
    return {
        "active_slots": pool.active_slots, "concurrency_limit": pool.concurrency_limit,
        "queues": [{"queue_id": str(r.id), "queue_name": r.name, "active_slots": r.active_slots,
                    "concurrency_limit": r.concurrency_limit, "flow_runs": holders[r.id],
                    "flow_run_count": r.active_slots} for r in queues],
        "count": total_queues, "limit": query.limit, "page": query.page,
        "pages": -(-total_queues // query.limit) if query.limit else 0,
    }


async def get_work_queue_concurrency_status(conn: AsyncConnection,
                                            query: q.GetWorkQueueConcurrencyStatus) -> dict[str, Any]:
    """SL-6 (legacy queue API): PENDING, RUNNING and CANCELLING runs of the queue, or linked to
    it by name only; `active_slots` is the total, the page is by run id."""
    queue = (await conn.execute(_QUEUE_BY_ID, {"id": query.id})).first()
    if queue is None:
        raise not_found("Work queue not found.")
    held_here = and_(flow_runs.c.state_type.in_(_HOLDING_LEGACY),
                     or_(flow_runs.c.work_queue_id == queue.id,
                         and_(flow_runs.c.work_queue_id.is_(None), flow_runs.c.work_queue_name == queue.name)))
    total = (await conn.execute(select(func.count()).select_from(flow_runs).where(held_here))).scalar_one()
    rows = await conn.execute(select(*_SUMMARY_COLUMNS).where(held_here).order_by(flow_runs.c.id)
                              .limit(query.limit).offset((query.page - 1) * query.limit))
    now = datetime.now(UTC)
    return {"active_slots": total, "concurrency_limit": queue.concurrency_limit,
            "flow_runs": [_slot_summary(r, now) for r in rows], "count": total, "limit": query.limit,
            "page": query.page, "pages": -(-total // query.limit) if query.limit else 0}


QUERIES = {
    "GetWorkPoolConcurrencyStatus": (q.GetWorkPoolConcurrencyStatus, get_work_pool_concurrency_status),
    "GetWorkQueueConcurrencyStatus": (q.GetWorkQueueConcurrencyStatus, get_work_queue_concurrency_status),
    "GetWorkPool": (q.GetWorkPool, get_work_pool),
    "ListWorkPools": (q.ListWorkPools, list_work_pools),
    "CountWorkPools": (q.CountWorkPools, count_work_pools),
    "GetWorkQueue": (q.GetWorkQueue, get_work_queue),
    "ListWorkQueues": (q.ListWorkQueues, list_work_queues),
    "CountWorkQueues": (q.CountWorkQueues, count_work_queues),
    "GetWorkQueueById": (q.GetWorkQueueById, get_work_queue_by_id),
    "GetWorkQueueStatus": (q.GetWorkQueueStatus, get_work_queue_status),
    "GetLegacyWorkQueue": (q.GetLegacyWorkQueue, get_legacy_work_queue),
    "ListAllWorkQueues": (q.ListAllWorkQueues, list_all_work_queues),
}
