"""The flow-runs read model: one row per run (its current state included) and one per written
state (its history); the queries over them. A row is `FlowRun` as its latest event carries
it; an answer is that row with its queue's current name and pool (FR-9)."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any, cast

from sqlalchemy import func, select, text
from sqlalchemy.ext.asyncio import AsyncConnection

from runledger.commands import flow_runs as fr
from runledger.commands import queries as q
from runledger.commands import run_waits
from runledger.commands import work_pools as wp
from runledger.commands.messages import Event, not_found
from runledger.commands.states import State, StateType

from . import slot_counts
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
                         "FlowRunDeploymentLeaseExpired", "FlowRunDeploymentLeaseRenewed"})
_RUN_DEFAULTS_JSON = json_param(_RUN_DEFAULTS)
# The events that write a state (the others carry the run's current one again).
_STATE_EVENTS = frozenset({"FlowRunCreated", "FlowRunStateSet"})


# A deleted queue's runs keep existing without it (WP-9): their row's `work_queue_id` is cleared,
# and stays so whatever their later events, which were decided with the queue, carry (a run's
# queue is set at its creation and never changes otherwise). Served by `flow_runs_queue`.
_QUEUES_GONE_EVENTS = frozenset({wp.WorkPoolDeleted.event_type, wp.WorkQueueDeleted.event_type})
_QUEUES_GONE_SQL = "UPDATE flow_runs SET work_queue_id = NULL WHERE work_queue_id = ANY($1::uuid[])"
_KEPT_NULL = ("work_queue_id",)


def _gone_queue_ids(event_type: str, payload: dict[str, Any]) -> list[str]:
    return payload["queue_ids"] if event_type == wp.WorkPoolDeleted.event_type else [payload["queue_id"]]


def _in_order(kinds: Sequence[tuple[str, str]]) -> bool:
    """Whether a batch of (run id, event type) needs its writes in log order: it deletes
    queues, or deletes a run that it then makes again (its new row must not meet the old one's
    cleared queue)."""
    deleted: set[str] = set()
    for run_id, event_type in kinds:
        if event_type in _QUEUES_GONE_EVENTS or (event_type in _RUN_EVENTS and run_id in deleted):
            return True
        if event_type == "FlowRunDeleted":
            deleted.add(run_id)
    return False


class FlowRunsProjector:
    """Reads payload dicts (`raw_payloads`): a run's events carry the whole run, so the batch's
    last one per run is its row, written with every state of the batch in two statements
    (which the runner sends as one, with the checkpoint: `writes`). A batch that deletes queues
    (or a run it makes again) is written in log order instead, in pieces (`apply`)."""

    name = "flow_runs"
    tables = (flow_runs, flow_run_states)
    raw_payloads = True
    handles = frozenset({fr.FlowRunCreated.event_type, fr.FlowRunStateSet.event_type,
                         fr.FlowRunUpdated.event_type, fr.FlowRunWaiting.event_type, fr.FlowRunDeleted.event_type,
                         fr.FlowRunDeploymentLeaseExpired.event_type, fr.FlowRunDeploymentLeaseRenewed.event_type,
                         *_QUEUES_GONE_EVENTS})

    async def apply(self, conn: AsyncConnection, events: Sequence[tuple[str, str, Event | dict]]) -> None:
        payloads = cast(Sequence[tuple[str, str, dict[str, Any]]], events)
        if not _in_order([(i, t) for i, t, _ in payloads]):
            await run_writes(conn, self._run_writes(payloads))
            return
        # Pieces cut after each queue or run deletion: each piece's runs are written before
        # what follows it applies.
        piece: list[tuple[str, str, dict[str, Any]]] = []
        for aggregate_id, event_type, payload in payloads:
            if event_type in _QUEUES_GONE_EVENTS:
                await run_writes(conn, [*self._run_writes(piece),
                                        (_QUEUES_GONE_SQL, (_gone_queue_ids(event_type, payload),))])
                piece = []
                continue
            piece.append((aggregate_id, event_type, payload))
            if event_type == "FlowRunDeleted":
                await run_writes(conn, self._run_writes(piece))
                piece = []
        await run_writes(conn, self._run_writes(piece))

    def writes(self, events: Sequence[tuple[str, str, Event | dict]]) -> list[Write] | None:
        """Disjoint rows: a run deleted in the batch is neither written nor given states.
        None when the batch must be written in order (`_in_order`)."""
        payloads = cast(Sequence[tuple[str, str, dict[str, Any]]], events)
        if _in_order([(i, t) for i, t, _ in payloads]):
            return None
        return self._run_writes(payloads)

    @staticmethod
    def _run_writes(events: Sequence[tuple[str, str, dict[str, Any]]]) -> list[Write]:
        # A run's last event in the batch decides its row; every written state is kept.
        last: dict[str, dict[str, Any] | None] = {}
        states: dict[str, dict[str, Any]] = {}
        for _, event_type, payload in events:
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
        return runs_with_states_writes(flow_runs, flow_run_states, "flow_run_id", _RUN_DEFAULTS, last, states,
                                       kept_null=_KEPT_NULL)

    def raw_writes(self, events: Sequence[StoredEvent]) -> list[Write] | None:
        """The same writes, Postgres reading the rows out of the events as stored; None when
        the batch must be written in order."""
        if _in_order([(i, t) for i, t, _ in events]):
            return None
        return runs_with_states_envelope_writes(flow_runs, flow_run_states, "flow_run_id", _RUN_DEFAULTS_JSON,
                                                events, _RUN_EVENTS, _STATE_EVENTS, "FlowRunDeleted",
                                                kept_null=_KEPT_NULL)


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
    name (`current_queue_name`, `work_pool_id`, `work_pool_name`), and its estimates as of now."""
    run, pool_id, pool_name = _run_of(values)
    return _reply(run, pool_id, pool_name, datetime.now(UTC))


def _run_of(values: dict[str, Any]) -> tuple[fr.FlowRun, Any, str | None]:
    """The run of a row's values, and its pool's id and name."""
    queue_name = values.pop("current_queue_name")
    pool_id, pool_name = values.pop("work_pool_id"), values.pop("work_pool_name")
    if values["work_queue_id"] is not None and queue_name is not None:
        values["work_queue_name"] = queue_name
    return fr.FlowRun.model_validate(values), pool_id, pool_name


def _reply(run: fr.FlowRun, pool_id: Any, pool_name: str | None, now: datetime) -> dict[str, Any]:
    reply = fr.flow_run_reply(run, now)
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


# Prefect's START_TIME_* order by coalesce(start_time, expected_start_time): a run that has not
# started sorts by when it is due. Runs without the time sort last; ties by id.
_STARTED_OR_DUE = func.coalesce(flow_runs.c.start_time, flow_runs.c.expected_start_time)
_SORTS: dict[q.FlowRunSort, list[Any]] = {
    q.FlowRunSort.ID_DESC: [flow_runs.c.id.desc()],
    q.FlowRunSort.NAME_ASC: [flow_runs.c.name, flow_runs.c.id],
    q.FlowRunSort.NAME_DESC: [flow_runs.c.name.desc(), flow_runs.c.id],
    q.FlowRunSort.EXPECTED_START_TIME_ASC: [flow_runs.c.expected_start_time.asc().nulls_last(), flow_runs.c.id],
    q.FlowRunSort.EXPECTED_START_TIME_DESC: [flow_runs.c.expected_start_time.desc().nulls_last(), flow_runs.c.id],
    q.FlowRunSort.NEXT_SCHEDULED_START_TIME_ASC: [flow_runs.c.next_scheduled_start_time.asc().nulls_last(),
                                                  flow_runs.c.id],
    q.FlowRunSort.START_TIME_ASC: [_STARTED_OR_DUE.asc().nulls_last(), flow_runs.c.id],
    q.FlowRunSort.START_TIME_DESC: [_STARTED_OR_DUE.desc().nulls_last(), flow_runs.c.id],
    q.FlowRunSort.END_TIME_DESC: [flow_runs.c.end_time.desc().nulls_last(), flow_runs.c.id],
}


# A run's queue and pool as the pool poll sees them (the pool's slots over its unpaused queues).
_QUEUE_FACTS = text(f"""
SELECT p.name AS pool_name, p.is_paused AS pool_paused, p.concurrency_limit AS pool_limit,
       {slot_counts.slots_taken("IN (SELECT u.id FROM work_queues u WHERE u.work_pool_id = p.id AND NOT u.is_paused)")}
         AS pool_slots_taken,
       q.name AS queue_name, q.is_paused AS queue_paused, q.concurrency_limit AS queue_limit,
       {slot_counts.slots_taken("= q.id")} AS queue_slots_taken, q.last_polled
FROM work_queues q JOIN work_pools p ON p.id = q.work_pool_id WHERE q.id = :queue_id""")
_DEPLOYMENT_LIMIT_FACTS = text(f"""
SELECT cl."limit", cl.active_slots AS slots_taken, cl.active, {slot_counts.COLLISION_STRATEGY} AS collision_strategy
FROM {slot_counts.DEPLOYMENT_LIMIT} WHERE d.id = :deployment_id""")


async def _why_waiting(conn: AsyncConnection, run: fr.FlowRun, now: datetime) -> str | None:
    """Why a SCHEDULED run no claim was refused for is not handed to a worker now
    (`run_waits.why_waiting`), from the read models as they are."""
    if run.work_queue_id is None:
        return None  # not the pool poll's to offer
    found = (await conn.execute(_QUEUE_FACTS, {"queue_id": run.work_queue_id})).first()
    if found is None:
        return run_waits.queue_gone(run)
    queue, deployment_limit = run_waits.QueueFacts(**found._mapping), None
    if run.deployment_id is not None:
        limit = (await conn.execute(_DEPLOYMENT_LIMIT_FACTS, {"deployment_id": run.deployment_id})).first()
        deployment_limit = run_waits.DeploymentLimitFacts(**limit._mapping) if limit is not None else None
    return run_waits.why_waiting(run, queue, deployment_limit, now)


async def get_flow_run(conn: AsyncConnection, query: q.GetFlowRun) -> dict[str, Any]:
    """A SCHEDULED run in a queue gets its `waiting_reason` computed now, when something keeps
    it from the pool poll (`run_waits`), whatever a refused claim recorded: limits and pauses
    change after a refusal, and the recorded words (a pool's limit of 1, since raised) would
    then name the wrong cause. When nothing holds it back now, a recorded reason is given as
    what it was, said to be past. Nothing is stored."""
    row = (await conn.execute(_READ.where(flow_runs.c.id == query.id))).first()
    if row is None:
        raise fr.flow_run_not_found(query.id)
    run, pool_id, pool_name = _run_of(dict(row._mapping))
    now = datetime.now(UTC)
    if run.state_type is StateType.SCHEDULED and run.work_queue_id is None and run.work_queue_name is not None:
        # Its queue deleted (the read model keeps the name, not the id): no poll offers it again.
        run = run.model_copy(update={"waiting_reason": run_waits.queue_gone(run)})
    elif run.state_type is StateType.SCHEDULED and run.work_queue_id is not None:
        live = await _why_waiting(conn, run, now)
        if live is None and run.waiting_reason is not None:
            live = (f"{run.waiting_reason.rstrip('.')} (said when its last claim was refused; nothing holds it back "
                    "now: a worker's next poll may offer it).")
        run = run.model_copy(update={"waiting_reason": live})
    return _reply(run, pool_id, pool_name, now)


async def list_flow_runs(conn: AsyncConnection, query: q.ListFlowRuns) -> list[dict[str, Any]]:
    stmt = _filtered(_READ, query).order_by(*_SORTS[query.sort])
    rows = await conn.execute(stmt.limit(query.limit).offset(query.offset))
    return [flow_run_reply(r) for r in rows]


async def count_flow_runs(conn: AsyncConnection, query: q.CountFlowRuns) -> int:
    return (await conn.execute(_filtered(select(func.count()).select_from(_JOINED), query))).scalar_one()


async def list_flow_run_states(conn: AsyncConnection, query: q.ListFlowRunStates) -> list[dict[str, Any]]:
    """A filter, as Prefect's `GET /flow_run_states/`: an unknown run has no states, not an error."""
    rows = await conn.execute(select(flow_run_states).where(flow_run_states.c.flow_run_id == query.flow_run_id)
                              .order_by(flow_run_states.c.timestamp, flow_run_states.c.id))
    return [State.model_validate({k: v for k, v in r._mapping.items() if k != "flow_run_id"}).reply() for r in rows]


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
