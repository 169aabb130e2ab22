"""What workers poll: a pool's scheduled runs within its queues' and its own concurrency limits
(`GetScheduledFlowRuns`), and the legacy poll of one queue by id (`GetLegacyQueueRuns`).

Read from the flow-runs, work-queues and work-pools read models. A poll is two statements: the
pool with its queues (a few rows: which queues are asked for, which are paused), then one
statement for the runs. That one takes, for each eligible queue, its first SCHEDULED runs in
poll order straight from the partial index `flow_runs_scheduled_by_queue` (as many as the
queue's free slots and the request's limit allow: a LATERAL subquery with a LIMIT), numbers
the union in the pool's order with a window function, and cuts it at the pool's free slots
and at the limit. Finished runs never enter the index, so a long history costs nothing.

Beyond Prefect: runs whose deployment's concurrency limit is full (and would send them to wait)
are left out, so they never take the place of runs that can start.

Order (runledger's, the same at each cut): first the waiting runs that a release handed the
slot it freed (`pool_slot_reserved`: they hold their queue's and pool's slot already, and
their claim is theirs alone), then queue priority, then the run's `priority` (lower first),
then `next_scheduled_start_time`, then id. Free slots: a queue's limit minus its PENDING and
RUNNING runs and the runs handed a slot; the pool's limit minus the same in its unpaused
queues (runs in a paused queue do not use up the pool's slots here, as in Prefect on
Postgres); a run handed a slot is offered whatever the free slots. Polling claims nothing:
the claim is the run's move to PENDING.

The caller (handlers/worker_polls.py) records the poll: `poll` says which queues it read.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass
from functools import cache
from typing import Any

from sqlalchemy import bindparam, text
from sqlalchemy.dialects.postgresql import ARRAY, UUID
from sqlalchemy.ext.asyncio import AsyncConnection

from runledger.commands import queries as q
from runledger.commands import work_pools as wp

from . import slot_counts
from .flow_runs import flow_run_values_reply
from .tables import flow_runs

# Prefect's internal caps on what one queue and one pool contribute to a poll.
PER_QUEUE_CAP = 1000
PER_POOL_CAP = 1000
_ACTIVE = slot_counts.ACTIVE

_POOL_AND_QUEUES = text(
    "SELECT p.id AS pool_id, p.name AS pool_name, p.is_paused AS pool_paused, p.concurrency_limit AS pool_limit,"
    " q.id, q.name, q.priority, q.is_paused, q.concurrency_limit, q.status"
    " FROM work_pools p LEFT JOIN work_queues q ON q.work_pool_id = p.id WHERE p.name = :name"
)
_RUN_COLUMNS = ", ".join(f"f.{c.name}" for c in flow_runs.columns)
# A run whose deployment's limit is full and would make it wait (ENQUEUE) is not offered: its
# claim could only send it to wait, and offering it would take the place of runs that can
# start (Prefect #19403: 200 such runs at the head of a queue held every other run back). A
# CANCEL_NEW deployment's runs are offered, so that their claim cancels them.
_DEPLOYMENT_FULL = f"""EXISTS (
            SELECT 1 FROM {slot_counts.DEPLOYMENT_LIMIT}
            WHERE d.id = f.deployment_id AND cl.active AND cl.active_slots >= cl."limit"
              AND {slot_counts.COLLISION_STRATEGY} <> 'CANCEL_NEW')"""
# A SCHEDULED state carries a lease id only when a release handed the run its deployment's
# slot (commands/slots.hand_over): that run holds the slot, and is offered however full.
_HOLDS_DEPLOYMENT_SLOT = "(f.state -> 'state_details' ->> 'deployment_concurrency_lease_id') IS NOT NULL"
_UUIDS = ARRAY(UUID(as_uuid=True))


@cache
def _runs_statement(after: bool, before: bool) -> Any:
    """The runs statement, with only the time bounds given (so each is an index condition)."""
    bounds = ("".join([" AND f.next_scheduled_start_time >= :after" if after else "",
                       " AND f.next_scheduled_start_time <= :before" if before else ""]))
    sql = f"""
WITH queue_room AS (
    SELECT q.id, q.priority,
           CASE WHEN q.concurrency_limit IS NULL THEN {PER_QUEUE_CAP}
                ELSE LEAST({PER_QUEUE_CAP}, GREATEST(0, q.concurrency_limit - (
                    {slot_counts.slots_taken("= q.id")})))
           END AS room
    FROM work_queues q WHERE q.id = ANY(:queue_ids)
),
pool_room AS (
    SELECT CASE WHEN CAST(:pool_limit AS integer) IS NULL THEN {PER_POOL_CAP}
                ELSE LEAST({PER_POOL_CAP}, GREATEST(0, CAST(:pool_limit AS integer) - (
                    {slot_counts.slots_taken("= ANY(:unpaused_ids)")})))
           END AS room
),
ranked AS (
    SELECT r.id, qr.id AS queue_id, r.handed,
           row_number() OVER (ORDER BY r.handed DESC, qr.priority, r.priority, r.next_scheduled_start_time, r.id) AS n,
           row_number() OVER (PARTITION BY r.handed
                              ORDER BY qr.priority, r.priority, r.next_scheduled_start_time, r.id) AS n_of_kind
    FROM queue_room qr CROSS JOIN LATERAL (
        (SELECT f.id, f.priority, f.next_scheduled_start_time, true AS handed FROM flow_runs f
         WHERE f.work_queue_id = qr.id AND f.pool_slot_reserved AND f.state_type = 'SCHEDULED'{bounds}
         LIMIT :limit)
        UNION ALL
        (SELECT f.id, f.priority, f.next_scheduled_start_time, false AS handed FROM flow_runs f
         WHERE f.work_queue_id = qr.id AND f.state_type = 'SCHEDULED' AND NOT f.pool_slot_reserved
           AND (f.empirical_policy ->> 'retry_type') IS DISTINCT FROM 'in_process'{bounds}
           AND ({_HOLDS_DEPLOYMENT_SLOT} OR NOT {_DEPLOYMENT_FULL})
         ORDER BY f.priority, f.next_scheduled_start_time, f.id
         LIMIT LEAST(qr.room, :limit))
    ) r
)
SELECT ranked.queue_id AS poll_queue_id, {_RUN_COLUMNS}, q.name AS current_queue_name,
       q.work_pool_id AS work_pool_id, CAST(:pool_name AS text) AS work_pool_name
FROM ranked
-- Each chosen run by its primary key (OFFSET 0 keeps it a per-row lookup: estimating up to a
-- thousand ranked rows, the planner hashed a scan of the whole table for a history of 100,000).
CROSS JOIN LATERAL (SELECT * FROM flow_runs f WHERE f.id = ranked.id OFFSET 0) f
JOIN work_queues q ON q.id = ranked.queue_id
WHERE (ranked.handed OR ranked.n_of_kind <= (SELECT room FROM pool_room)) AND ranked.n <= :limit
ORDER BY ranked.n"""
    return text(sql).bindparams(bindparam("queue_ids", type_=_UUIDS), bindparam("unpaused_ids", type_=_UUIDS))


@dataclass(frozen=True)
class Poll:
    """A poll's answer and what it read: the pool and the queues it polled (named or all)."""

    items: list[dict[str, Any]]
    work_pool_name: str
    polled_queue_ids: list[uuid.UUID]


async def poll(conn: AsyncConnection, query: q.GetScheduledFlowRuns) -> Poll:
    rows = (await conn.execute(_POOL_AND_QUEUES, {"name": query.work_pool_name})).all()
    if not rows:
        raise wp.pool_not_found(query.work_pool_name)
    pool = rows[0]
    queues = {r.name: r for r in rows if r.id is not None}
    if query.work_queue_names:
        polled = []
        for name in query.work_queue_names:  # every name must be a queue of this pool
            if name not in queues:
                raise wp.queue_not_found(query.work_pool_name, name)
            polled.append(queues[name])
    else:
        polled = list(queues.values())
    polled = list({r.id: r for r in polled}.values())
    eligible = [r.id for r in polled if not r.is_paused] if not pool.pool_paused else []
    items: list[dict[str, Any]] = []
    if eligible and query.limit > 0:
        stmt = _runs_statement(query.scheduled_after is not None, query.scheduled_before is not None)
        params: dict[str, Any] = {
            "queue_ids": eligible, "unpaused_ids": [r.id for r in queues.values() if not r.is_paused],
            "pool_limit": pool.pool_limit, "limit": query.limit, "pool_name": pool.pool_name,
        }
        if query.scheduled_after is not None:
            params["after"] = query.scheduled_after
        if query.scheduled_before is not None:
            params["before"] = query.scheduled_before
        for row in await conn.execute(stmt, params):
            values = dict(row._mapping)
            queue_id = values.pop("poll_queue_id")
            items.append({"work_pool_id": str(pool.pool_id), "work_queue_id": str(queue_id),
                          "flow_run": flow_run_values_reply(values)})
    return Poll(items, pool.pool_name, [r.id for r in polled])


async def get_scheduled_flow_runs(conn: AsyncConnection, query: q.GetScheduledFlowRuns) -> list[dict[str, Any]]:
    """The answer alone; the service answers through `poll` and records the poll as well."""
    return (await poll(conn, query)).items


# ---------------------------------------------------------------------------------------------
# The legacy queue poll


_QUEUE = text(
    "SELECT q.id, q.name, q.is_paused, q.concurrency_limit, q.filter, p.name AS pool_name FROM work_queues q"
    " JOIN work_pools p ON p.id = q.work_pool_id WHERE q.id = :id"
)


# The runs a legacy queue serves, and the active ones counted against its limit: by the
# queue's name (CANCELLING counted too), or, for Prefect's deprecated tag-based `filter`, every
# tag of the filter and a deployment, one of the filter's when it names some, whatever queue
# the run names (PENDING and RUNNING counted).
_MATCHES_NAME = "{a}.work_queue_name = :queue_name"
_MATCHES_FILTER = ("{a}.deployment_id IS NOT NULL AND {a}.tags @> CAST(:tags AS jsonb)"
                   " AND (CAST(:deployment_ids AS uuid[]) IS NULL OR {a}.deployment_id = ANY(CAST(:deployment_ids AS uuid[])))")


_FILTER_ACTIVE = text(f"SELECT count(*) FROM flow_runs a WHERE {_MATCHES_FILTER.format(a='a')}"
                      f" AND a.state_type IN {_ACTIVE}")


def filter_params(queue_filter: dict[str, Any]) -> dict[str, Any]:
    """The bind parameters of `_MATCHES_FILTER` for a queue's deprecated tag-based filter."""
    ids = queue_filter.get("deployment_ids")
    return {"tags": json.dumps(queue_filter.get("tags") or []),
            "deployment_ids": [uuid.UUID(i) for i in ids] if ids is not None else None}


async def count_filter_active(conn: AsyncConnection, queue_filter: dict[str, Any]) -> int:
    """SL-3: a deprecated tag-based queue's slots are held by the PENDING and RUNNING runs its
    filter matches, wherever they are queued: what its legacy poll counts against its limit."""
    return (await conn.execute(_FILTER_ACTIVE, filter_params(queue_filter))).scalar_one()


@cache
def _legacy_statement(before: bool, by_filter: bool) -> Any:
    bound = " AND f.next_scheduled_start_time <= :before" if before else ""
    matches, active = ((_MATCHES_FILTER, "'PENDING', 'RUNNING'") if by_filter
                       else (_MATCHES_NAME, "'PENDING', 'RUNNING', 'CANCELLING'"))
    sql = f"""
SELECT {_RUN_COLUMNS}, q.name AS current_queue_name, p.id AS work_pool_id, p.name AS work_pool_name
FROM flow_runs f LEFT JOIN work_queues q ON q.id = f.work_queue_id LEFT JOIN work_pools p ON p.id = q.work_pool_id
WHERE f.state_type = 'SCHEDULED' AND {matches.format(a="f")}{bound}
ORDER BY f.next_scheduled_start_time, f.id
LIMIT GREATEST(0, LEAST(:limit, CASE WHEN CAST(:queue_limit AS integer) IS NULL THEN :limit
    ELSE CAST(:queue_limit AS integer) - (SELECT count(*) FROM flow_runs a WHERE {matches.format(a="a")}
                               AND a.state_type IN ({active})) END))"""
    return text(sql)


@dataclass(frozen=True)
class LegacyPoll:
    runs: list[dict[str, Any]]
    work_pool_name: str | None  # None when nothing is to be recorded (a paused queue still is)
    queue_id: uuid.UUID


async def legacy_poll(conn: AsyncConnection, query: q.GetLegacyQueueRuns) -> LegacyPoll:
    """Runs matched by the queue's name, in any pool (its id is not consulted); active runs
    are counted by name too, CANCELLING included. A queue with Prefect's deprecated tag-based
    `filter` matches runs by the filter instead, and counts PENDING and RUNNING ones."""
    queue = (await conn.execute(_QUEUE, {"id": query.id})).first()
    if queue is None:
        raise wp.queue_id_not_found(query.id)
    runs: list[dict[str, Any]] = []
    if not queue.is_paused and query.limit > 0:
        params: dict[str, Any] = {"queue_name": queue.name, "limit": query.limit,
                                  "queue_limit": queue.concurrency_limit}
        if query.scheduled_before is not None:
            params["before"] = query.scheduled_before
        by_filter = isinstance(queue.filter, dict)  # a deprecated tag-based queue: by tags and deployments
        statement = _legacy_statement(query.scheduled_before is not None, by_filter)
        if by_filter:
            params.update(filter_params(queue.filter))
        rows = await conn.execute(statement, params)
        runs = [flow_run_values_reply(dict(r._mapping)) for r in rows]
    return LegacyPoll(runs, None if query.from_ui else queue.pool_name, queue.id)


async def get_legacy_queue_runs(conn: AsyncConnection, query: q.GetLegacyQueueRuns) -> list[dict[str, Any]]:
    return (await legacy_poll(conn, query)).runs


QUERIES = {
    "GetScheduledFlowRuns": (q.GetScheduledFlowRuns, get_scheduled_flow_runs),
    "GetLegacyQueueRuns": (q.GetLegacyQueueRuns, get_legacy_queue_runs),
}
