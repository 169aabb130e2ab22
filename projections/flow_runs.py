"""The flow-runs read model: one row per run (its current state included) and one per written
state (its history); the queries over them. A row is `FlowRun` as its latest event carries
it; an answer is that row with its queue's current name and pool (FR-9)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, cast

from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncConnection

from runledger.commands import flow_runs as fr
from runledger.commands import queries as q
from runledger.commands.messages import Event, not_found
from runledger.commands.states import State

from .bulk_writes import (
    StoredEvent,
    Write,
    json_param,
    model_defaults,
    run_writes,
    runs_with_states_envelope_writes,
    runs_with_states_writes,
)
from .filters import where_filter, where_time_range
from .run_history import run_history
from .tables import flow_run_states, flow_runs, work_pools, work_queues

# A run written before a field existed lacks its key: its default, as the model would fill it.
_RUN_DEFAULTS = model_defaults(fr.FlowRun)
_RUN_EVENTS = frozenset({"FlowRunCreated", "FlowRunStateSet", "FlowRunUpdated", "FlowRunWaiting",
                         "FlowRunDeploymentLeaseExpired"})
_RUN_DEFAULTS_JSON = json_param(_RUN_DEFAULTS)
# The events that write a state (the others carry the run's current one again).
_STATE_EVENTS = frozenset({"FlowRunCreated", "FlowRunStateSet"})


class FlowRunsProjector:
    """Reads payload dicts (`raw_payloads`): a run's events carry the whole run, so the batch's
    last one per run is its row, written with every state of the batch in two statements
    (which the runner sends as one, with the checkpoint: `writes`)."""

    name = "flow_runs"
    tables = (flow_runs, flow_run_states)
    raw_payloads = True
    handles = frozenset({fr.FlowRunCreated.event_type, fr.FlowRunStateSet.event_type,
                         fr.FlowRunUpdated.event_type, fr.FlowRunWaiting.event_type, fr.FlowRunDeleted.event_type,
                         fr.FlowRunDeploymentLeaseExpired.event_type})

    async def apply(self, conn: AsyncConnection, events: Sequence[tuple[str, str, Event | dict]]) -> None:
        await run_writes(conn, self.writes(events))

    def writes(self, events: Sequence[tuple[str, str, Event | dict]]) -> list[Write]:
        """Disjoint rows: a run deleted in the batch is neither written nor given states."""
        # A run's last event in the batch decides its row; every written state is kept.
        last: dict[str, dict[str, Any] | None] = {}
        states: dict[str, dict[str, Any]] = {}
        for _, event_type, payload in cast(Sequence[tuple[str, str, dict[str, Any]]], events):
            if event_type in _RUN_EVENTS:
                run = payload["run"]
                last[run["id"]] = run
                state = run.get("state")
                if state is not None and event_type in _STATE_EVENTS:
                    states[state["id"]] = {**state, "flow_run_id": run["id"]}
            elif event_type == "FlowRunDeleted":
                gone_id = payload["flow_run_id"]
                last[gone_id] = None
                states = {k: v for k, v in states.items() if v["flow_run_id"] != gone_id}
        return runs_with_states_writes(flow_runs, flow_run_states, "flow_run_id", _RUN_DEFAULTS, last, states)

    def raw_writes(self, events: Sequence[StoredEvent]) -> list[Write]:
        """The same writes, Postgres reading the rows out of the events as stored."""
        return runs_with_states_envelope_writes(flow_runs, flow_run_states, "flow_run_id", _RUN_DEFAULTS_JSON,
                                                events, _RUN_EVENTS, _STATE_EVENTS, "FlowRunDeleted")


_queue = work_queues.alias("q")
_pool = work_pools.alias("p")
_JOINED = (flow_runs.outerjoin(_queue, _queue.c.id == flow_runs.c.work_queue_id)
           .outerjoin(_pool, _pool.c.id == _queue.c.work_pool_id))
_READ = select(flow_runs, _queue.c.name.label("current_queue_name"), _pool.c.id.label("work_pool_id"),
               _pool.c.name.label("work_pool_name")).select_from(_JOINED)


def flow_run_reply(row: Any) -> dict[str, Any]:
    return flow_run_values_reply(dict(row._mapping))


def flow_run_values_reply(values: dict[str, Any]) -> dict[str, Any]:
    """A run's reply from its row's values with its queue's current name and its pool's id and
    name (`current_queue_name`, `work_pool_id`, `work_pool_name`)."""
    queue_name = values.pop("current_queue_name")
    pool_id, pool_name = values.pop("work_pool_id"), values.pop("work_pool_name")
    if values["work_queue_id"] is not None and queue_name is not None:
        values["work_queue_name"] = queue_name
    reply = fr.FlowRun.model_validate(values).model_dump(mode="json")
    reply["work_pool_id"] = str(pool_id) if pool_id is not None else None
    reply["work_pool_name"] = pool_name
    return reply


def _filtered(stmt: Any, query: q.ListFlowRuns | q.CountFlowRuns | q.GetFlowRunHistory) -> Any:
    f = query.flow_runs
    stmt = where_filter(stmt, flow_runs, f)
    if f is not None:
        stmt = where_time_range(stmt, flow_runs.c.expected_start_time, f.expected_start_time)
        stmt = where_time_range(stmt, flow_runs.c.next_scheduled_start_time, f.next_scheduled_start_time)
        stmt = where_time_range(stmt, flow_runs.c.start_time, f.start_time)
    if query.work_pool_name is not None and query.work_pool_name.any_ is not None:
        stmt = stmt.where(_pool.c.name.in_(query.work_pool_name.any_))
    return stmt


_SORTS: dict[q.FlowRunSort, list[Any]] = {
    q.FlowRunSort.ID_DESC: [flow_runs.c.id.desc()],
    q.FlowRunSort.NAME_ASC: [flow_runs.c.name, flow_runs.c.id],
    q.FlowRunSort.EXPECTED_START_TIME_ASC: [flow_runs.c.expected_start_time.asc().nulls_last(), flow_runs.c.id],
    q.FlowRunSort.EXPECTED_START_TIME_DESC: [flow_runs.c.expected_start_time.desc().nulls_last(), flow_runs.c.id],
    q.FlowRunSort.NEXT_SCHEDULED_START_TIME_ASC: [flow_runs.c.next_scheduled_start_time.asc().nulls_last(),
                                                  flow_runs.c.id],
    q.FlowRunSort.START_TIME_DESC: [flow_runs.c.start_time.desc().nulls_last(), flow_runs.c.id],
}


async def get_flow_run(conn: AsyncConnection, query: q.GetFlowRun) -> dict[str, Any]:
    row = (await conn.execute(_READ.where(flow_runs.c.id == query.id))).first()
    if row is None:
        raise fr.flow_run_not_found(query.id)
    return flow_run_reply(row)


async def list_flow_runs(conn: AsyncConnection, query: q.ListFlowRuns) -> list[dict[str, Any]]:
    stmt = _filtered(_READ, query).order_by(*_SORTS[query.sort])
    rows = await conn.execute(stmt.limit(query.limit).offset(query.offset))
    return [flow_run_reply(r) for r in rows]


async def count_flow_runs(conn: AsyncConnection, query: q.CountFlowRuns) -> int:
    return (await conn.execute(_filtered(select(func.count()).select_from(_JOINED), query))).scalar_one()


async def list_flow_run_states(conn: AsyncConnection, query: q.ListFlowRunStates) -> list[dict[str, Any]]:
    rows = await conn.execute(select(flow_run_states).where(flow_run_states.c.flow_run_id == query.flow_run_id)
                              .order_by(flow_run_states.c.timestamp, flow_run_states.c.id))
    found = [State.model_validate({k: v for k, v in r._mapping.items() if k != "flow_run_id"}).reply() for r in rows]
    if not found and (await conn.execute(select(flow_runs.c.id).where(flow_runs.c.id == query.flow_run_id))).first() is None:
        raise fr.flow_run_not_found(query.flow_run_id)
    return found


async def get_flow_run_state(conn: AsyncConnection, query: q.GetFlowRunState) -> dict[str, Any]:
    row = (await conn.execute(select(flow_run_states).where(flow_run_states.c.id == query.id))).first()
    if row is None:
        raise not_found("Flow run state not found")
    return State.model_validate({k: v for k, v in row._mapping.items() if k != "flow_run_id"}).reply()


async def get_flow_run_history(conn: AsyncConnection, query: q.GetFlowRunHistory) -> list[dict[str, Any]]:
    return await run_history(conn, flow_runs, _filtered(select(flow_runs.c.id).select_from(_JOINED), query), query)


QUERIES = {
    "GetFlowRun": (q.GetFlowRun, get_flow_run),
    "ListFlowRuns": (q.ListFlowRuns, list_flow_runs),
    "CountFlowRuns": (q.CountFlowRuns, count_flow_runs),
    "ListFlowRunStates": (q.ListFlowRunStates, list_flow_run_states),
    "GetFlowRunState": (q.GetFlowRunState, get_flow_run_state),
    "GetFlowRunHistory": (q.GetFlowRunHistory, get_flow_run_history),
}
