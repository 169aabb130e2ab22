"""The deployments read model: its projector and the queries over it. A row is `Deployment`
as its latest event carries it, and an answer is `Deployment.reply()` of a row, with the
queue's and pool's names as they are now (DP-3: a queue may have been renamed since)."""

from __future__ import annotations

import math
import uuid
from collections.abc import Sequence
from typing import Any

from sqlalchemy import DateTime, bindparam, delete, func, select, text
from sqlalchemy.dialects.postgresql import ARRAY, JSONB, UUID, insert
from sqlalchemy.ext.asyncio import AsyncConnection

from runledger.commands import deployment_polls as dpp
from runledger.commands import deployments as dp
from runledger.commands import queries as q
from runledger.commands import work_pools as wp
from runledger.commands.messages import Event
from runledger.commands.states import StateType

from . import flow_runs as flow_runs_read_model
from .filters import where_filter
from .tables import (
    concurrency_limits,
    deleted_deployments,
    deployments,
    flows,
    work_pools,
    work_queues,
)

_JSON_COLUMNS = frozenset(c.name for c in deployments.columns if isinstance(c.type, JSONB))


def deployment_row(deployment: dp.Deployment) -> dict[str, Any]:
    """The row of a deployment: JSON columns as JSON, the rest as Python values."""
    as_json = deployment.model_dump(mode="json", include=set(_JSON_COLUMNS))
    return {**deployment.model_dump(exclude=set(_JSON_COLUMNS)), **as_json}



# Insert or replace whole rows; built once (building it per batch cost ~5 % of the CPU). A
# deployment's `status` and `last_polled` are read-side fields, written by polls and the
# foreman (`WorkQueuesPolled`, `WorkQueueDeploymentsNotReady`, `DeploymentsPolled`,
# `QueuelessDeploymentsNotReady`): a create or an update of an existing row keeps them.
_READ_SIDE = frozenset({"status", "last_polled"})
_UPSERT = insert(deployments).on_conflict_do_update(
    index_elements=["id"], set_={c.name: insert(deployments).excluded[c.name] for c in deployments.columns
                                 if c.name != "id" and c.name not in _READ_SIDE})
_POLLED = text("UPDATE deployments SET status = 'READY', last_polled = :polled WHERE work_queue_id = ANY(:queue_ids)")
# A routine poll changes no status (`WorkQueuesPolled.routine`: it leaves the log): a deployment
# not READY as the read model says here (written after the service read it for the poll) waits
# for the next poll, which is kept and makes it READY.
_ROUTINE_POLLED = text(
    "UPDATE deployments SET last_polled = :polled WHERE work_queue_id = ANY(:queue_ids) AND status = 'READY'"
).bindparams(bindparam("queue_ids", type_=ARRAY(UUID(as_uuid=True))))
_NOT_READY = text(
    "UPDATE deployments SET status = 'NOT_READY' WHERE id = ANY(:ids) AND work_queue_id = :queue_id"
    " AND status = 'READY' AND last_polled IS NOT NULL AND last_polled < :stale_before"
).bindparams(bindparam("ids", type_=ARRAY(UUID(as_uuid=True))))
# The deployments' last polls a not-ready event carries (`work_pools.last_polled_of`): the
# routine polls that set them expire from the log, so a rebuild gets them from here. Never
# moves one back; live, each equals the row's already.
_LAST_POLLED = text(
    "UPDATE deployments AS d SET last_polled = v.polled FROM unnest(:ids, :polled) AS v(id, polled)"
    " WHERE d.id = v.id AND (d.last_polled IS NULL OR d.last_polled < v.polled)"
).bindparams(bindparam("ids", type_=ARRAY(UUID(as_uuid=True))),
             bindparam("polled", type_=ARRAY(DateTime(timezone=True))))
_POLLED = _POLLED.bindparams(bindparam("queue_ids", type_=ARRAY(UUID(as_uuid=True))))
# WP-9: a deleted queue's deployments keep their `work_queue_name` text; the pool, read through
# the queue, goes with it (the command side writes them so from then on: dp.without_deleted_queue).
_QUEUES_GONE = text(
    "UPDATE deployments SET work_queue_id = NULL, work_pool_name = NULL WHERE work_queue_id = ANY(:queue_ids)"
).bindparams(bindparam("queue_ids", type_=ARRAY(UUID(as_uuid=True))))
# A runner's poll names deployments, not queues (DP-17); the foreman turns those without a queue
# NOT_READY by id (ST-3).
_RUNNER_POLLED = text(
    "UPDATE deployments SET status = 'READY', last_polled = :polled WHERE id = ANY(:ids)"
).bindparams(bindparam("ids", type_=ARRAY(UUID(as_uuid=True))))
# A routine one (`DeploymentsPolled.routine`: it leaves the log) changes no status, as a routine
# queue poll.
_RUNNER_ROUTINE_POLLED = text(
    "UPDATE deployments SET last_polled = :polled WHERE id = ANY(:ids) AND status = 'READY'"
).bindparams(bindparam("ids", type_=ARRAY(UUID(as_uuid=True))))
# The decider found each of them without a live queue in the log, a deleted queue counting as
# none (dp.without_deleted_queue); the row may still name that queue (an update decided before
# the queue's deletion and appended after it), so it drops it here as the log does, or the
# foreman would find the row READY with a queue at every pass and send it again. A queue set by
# an update decided after the check (`updated` past `checked`) is not the decider's to drop.
_QUEUELESS_NOT_READY = text(
    "UPDATE deployments SET status = 'NOT_READY', work_queue_id = NULL, work_pool_name = NULL"
    " WHERE id = ANY(:ids) AND (work_queue_id IS NULL OR updated <= :checked)"
    " AND status = 'READY' AND last_polled IS NOT NULL AND last_polled < :stale_before"
).bindparams(bindparam("ids", type_=ARRAY(UUID(as_uuid=True))))
# A deleted deployment's tombstone, for the foreman's sweep of the runs it left (tables.py).
_TOMBSTONES = insert(deleted_deployments).on_conflict_do_nothing(index_elements=["id"])


class DeploymentsProjector:
    name = "deployments"
    tables = (deployments, deleted_deployments)
    raw_payloads = False
    handles = frozenset({dp.DeploymentCreated.event_type, dp.DeploymentUpdated.event_type,
                         dp.DeploymentDeleted.event_type, wp.WorkQueuesPolled.event_type,
                         wp.WorkQueueDeploymentsNotReady.event_type, wp.WorkPoolDeleted.event_type,
                         wp.WorkQueueDeleted.event_type, dpp.DeploymentsPolled.event_type,
                         dpp.QueuelessDeploymentsNotReady.event_type})

    async def apply(self, conn: AsyncConnection, events: Sequence[tuple[str, str, Event | dict]]) -> None:
        # The last event of each deployment in the batch decides its row: one write each,
        # written before a poll or a not-ready check that follows it applies.
        last: dict[Any, dp.Deployment | None] = {}
        deleted: dict[Any, Any] = {}  # id: when, the batch's deletions (ids are never made again)
        for _, _, event in events:
            if isinstance(event, dp.DeploymentCreated | dp.DeploymentUpdated):
                last[event.deployment.id] = event.deployment
            elif isinstance(event, dp.DeploymentDeleted):
                last[event.deployment_id] = None
                deleted[event.deployment_id] = event.deleted
            elif isinstance(event, wp.WorkQueuesPolled):
                await self._write(conn, last)
                await conn.execute(_ROUTINE_POLLED if event.routine else _POLLED,
                                   {"polled": event.polled, "queue_ids": event.queue_ids})
            elif isinstance(event, wp.WorkQueueDeploymentsNotReady):
                await self._write(conn, last)
                await _restore_last_polled(conn, event.last_polled)
                await conn.execute(_NOT_READY, {"ids": event.deployment_ids, "queue_id": event.work_queue_id,
                                                "stale_before": event.checked - wp.NOT_READY_AFTER})
            elif isinstance(event, wp.WorkPoolDeleted | wp.WorkQueueDeleted):
                await self._write(conn, last)
                gone = event.queue_ids if isinstance(event, wp.WorkPoolDeleted) else [event.queue_id]
                await conn.execute(_QUEUES_GONE, {"queue_ids": gone})
            elif isinstance(event, dpp.DeploymentsPolled):
                await self._write(conn, last)
                await conn.execute(_RUNNER_ROUTINE_POLLED if event.routine else _RUNNER_POLLED,
                                   {"ids": event.deployment_ids, "polled": event.polled})
            elif isinstance(event, dpp.QueuelessDeploymentsNotReady):
                await self._write(conn, last)
                await _restore_last_polled(conn, event.last_polled)
                await conn.execute(_QUEUELESS_NOT_READY, {"ids": event.deployment_ids, "checked": event.checked,
                                                          "stale_before": event.checked - wp.NOT_READY_AFTER})
        await self._write(conn, last)
        if deleted:
            await conn.execute(_TOMBSTONES, [{"id": i, "deleted": when} for i, when in deleted.items()])

    @staticmethod
    async def _write(conn: AsyncConnection, last: dict[Any, dp.Deployment | None]) -> None:
        gone = [i for i, d in last.items() if d is None]
        if gone:
            await conn.execute(delete(deployments).where(deployments.c.id.in_(gone)))
        rows = [deployment_row(d) for d in last.values() if d is not None]
        if rows:
            await conn.execute(_UPSERT, rows)
        last.clear()


async def _restore_last_polled(conn: AsyncConnection, last_polled: dict[Any, Any]) -> None:
    if last_polled:
        await conn.execute(_LAST_POLLED, {"ids": list(last_polled), "polled": list(last_polled.values())})


# Reads: the deployment row with its queue's and pool's current names.
_queue = work_queues.alias("q")
_pool = work_pools.alias("p")
# The slots taken of its concurrency limit, from the limits read model (by the limit's name).
_LIMIT_ACTIVE = (select(concurrency_limits.c.active_slots)
                 .where(concurrency_limits.c.name == func.concat("deployment:", deployments.c.id))
                 .scalar_subquery().label("limit_active_slots"))
_READ = (
    select(deployments, _queue.c.name.label("current_queue_name"), _pool.c.name.label("current_pool_name"),
           _LIMIT_ACTIVE)
    .select_from(deployments.outerjoin(_queue, _queue.c.id == deployments.c.work_queue_id)
                 .outerjoin(_pool, _pool.c.id == _queue.c.work_pool_id))
)


def deployment_reply(row: Any) -> dict[str, Any]:
    values = dict(row._mapping)
    queue_name, pool_name = values.pop("current_queue_name"), values.pop("current_pool_name")
    active_slots = values.pop("limit_active_slots", None) or 0
    if values["work_queue_id"] is not None and queue_name is not None:
        values["work_queue_name"], values["work_pool_name"] = queue_name, pool_name
    return dp.Deployment.model_validate(values).reply(active_slots)


def _filtered(stmt: Any, query: q.CountDeployments | q.ListDeployments) -> Any:
    f = query.deployments
    stmt = where_filter(stmt, deployments, f)
    if f is not None and f.paused is not None:
        stmt = stmt.where(deployments.c.paused == f.paused)
    if query.flow_name is not None and query.flow_name.any_ is not None:
        stmt = stmt.where(deployments.c.flow_id.in_(select(flows.c.id).where(flows.c.name.in_(query.flow_name.any_))))
    if query.work_queue_name is not None and query.work_queue_name.any_ is not None:
        stmt = stmt.where(_queue.c.name.in_(query.work_queue_name.any_))
    if query.work_pool_name is not None and query.work_pool_name.any_ is not None:
        stmt = stmt.where(_pool.c.name.in_(query.work_pool_name.any_))
    return stmt


async def all_ready(conn: AsyncConnection, deployment_ids: Sequence[Any]) -> bool:
    """Whether none of these deployments is known and not READY: a runner's poll of them then
    makes none READY (`RecordDeploymentsPolled.all_ready`)."""
    found = await conn.execute(select(deployments.c.id).where(
        deployments.c.id.in_(list(deployment_ids)), deployments.c.status != "READY").limit(1))
    return found.first() is None


async def any_not_ready_on(conn: AsyncConnection, queue_ids: Sequence[Any]) -> bool:
    """Whether a deployment on these queues is not READY: a poll of them then makes it READY,
    a change the log keeps (`RecordWorkQueuesPolled.readies_deployments`)."""
    if not queue_ids:
        return False
    # The status inlined, not bound: a partial index (`deployments_not_ready_by_queue`) serves
    # only a predicate the planner can see implies its own.
    found = await conn.execute(select(deployments.c.id).where(
        deployments.c.work_queue_id.in_(list(queue_ids)), text("deployments.status <> 'READY'")).limit(1))
    return found.first() is not None


async def get_deployment(conn: AsyncConnection, query: q.GetDeployment) -> dict[str, Any]:
    row = (await conn.execute(_READ.where(deployments.c.id == query.id))).first()
    if row is None:
        raise dp.deployment_not_found(query.id)
    return deployment_reply(row)


async def get_deployment_by_name(conn: AsyncConnection, query: q.GetDeploymentByName) -> dict[str, Any]:
    flow_ids = select(flows.c.id).where(flows.c.name == query.flow_name)
    stmt = _READ.where(deployments.c.flow_id.in_(flow_ids), deployments.c.name == query.deployment_name)
    row = (await conn.execute(stmt)).first()
    if row is None:
        raise dp.deployment_not_found()
    return deployment_reply(row)


async def list_deployments(conn: AsyncConnection, query: q.ListDeployments) -> list[dict[str, Any]]:
    stmt = _filtered(_READ, query).order_by(deployments.c.name, deployments.c.id)
    rows = await conn.execute(stmt.limit(query.limit).offset(query.offset))
    return [deployment_reply(r) for r in rows]


async def _count(conn: AsyncConnection, query: q.CountDeployments) -> int:
    base = (select(func.count()).select_from(
        deployments.outerjoin(_queue, _queue.c.id == deployments.c.work_queue_id)
        .outerjoin(_pool, _pool.c.id == _queue.c.work_pool_id)))
    return (await conn.execute(_filtered(base, query))).scalar_one()


async def count_deployments(conn: AsyncConnection, query: q.CountDeployments) -> int:
    return await _count(conn, query)


async def paginate_deployments(conn: AsyncConnection, query: q.PaginateDeployments) -> dict[str, Any]:
    """C-6: `pages = ceil(count / limit)`, 0 when `limit` is 0; a page past the end is empty."""
    count = await _count(conn, query)
    offset = (query.page - 1) * query.limit
    stmt = _filtered(_READ, query).order_by(deployments.c.name, deployments.c.id)
    rows: Any = await conn.execute(stmt.limit(query.limit).offset(offset)) if query.limit and offset < count else []
    return {"results": [deployment_reply(r) for r in rows], "count": count, "limit": query.limit,
            "page": query.page, "pages": math.ceil(count / query.limit) if query.limit else 0}


async def list_deployment_schedules(conn: AsyncConnection, query: q.ListDeploymentSchedules) -> list[dict[str, Any]]:
    row = (await conn.execute(select(deployments.c.schedules).where(deployments.c.id == query.deployment_id))).first()
    if row is None:
        raise dp.deployment_not_found(query.deployment_id)
    schedules = [dp.DeploymentSchedule.model_validate(s) for s in row.schedules]
    return [s.model_dump(mode="json") for s in dp.newest_first(schedules)]


async def get_scheduled_flow_runs_for_deployments(conn: AsyncConnection,
                                                  query: q.GetScheduledFlowRunsForDeployments) -> list[dict[str, Any]]:
    """DP-17: the runs as `ListFlowRuns` answers them (Prefect answers full flow runs too), by
    the index on the runs' deployment and state type. No queue, pool or limit is consulted: a
    runner serves its own deployments."""
    runs = q.FlowRunFilter(deployment_id=q.AnyOf[uuid.UUID](any_=query.deployment_ids),
                           state_type=q.AnyOf[StateType](any_=[StateType.SCHEDULED]),
                           next_scheduled_start_time=q.TimeRange(before_=query.scheduled_before))
    return await flow_runs_read_model.list_flow_runs(conn, q.ListFlowRuns(
        flow_runs=runs, sort=q.FlowRunSort.NEXT_SCHEDULED_START_TIME_ASC, limit=query.limit))


QUERIES = {
    "GetDeployment": (q.GetDeployment, get_deployment),
    "GetDeploymentByName": (q.GetDeploymentByName, get_deployment_by_name),
    "ListDeployments": (q.ListDeployments, list_deployments),
    "CountDeployments": (q.CountDeployments, count_deployments),
    "PaginateDeployments": (q.PaginateDeployments, paginate_deployments),
    "ListDeploymentSchedules": (q.ListDeploymentSchedules, list_deployment_schedules),
    # The service serves it with its side effect (the poll is recorded): handlers/worker_polls.py.
    "GetScheduledFlowRunsForDeployments": (q.GetScheduledFlowRunsForDeployments,
                                           get_scheduled_flow_runs_for_deployments),
}
