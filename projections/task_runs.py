"""The task-runs read model: one row per run (its current state included) and one per written
state (its history); the queries over them. A row is `TaskRun` as its latest event carries it,
and so is an answer: the same shape both ways."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, cast

from sqlalchemy import func, literal_column, select
from sqlalchemy.ext.asyncio import AsyncConnection

from runledger.commands import flow_runs as fr
from runledger.commands import queries as q
from runledger.commands import task_runs as tr
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
from .tables import task_run_states, task_runs

# A run written before a field existed lacks its key: its default, as the model would fill it.
_RUN_DEFAULTS = model_defaults(tr.TaskRun)
_RUN_EVENTS = frozenset({tr.TaskRunCreated.event_type, tr.TaskRunStateSet.event_type, tr.TaskRunUpdated.event_type,
                         tr.TaskRunWaiting.event_type})
# The events that write a state (an update, or why the run waits, carries its current one again).
_STATE_EVENTS = frozenset({tr.TaskRunCreated.event_type, tr.TaskRunStateSet.event_type})
_RUN_DEFAULTS_JSON = json_param(_RUN_DEFAULTS)


class TaskRunsProjector:
    """Reads payload dicts (`raw_payloads`): a run's events carry the whole run, so the batch's
    last one per run is its row, written with every state of the batch in two statements.
    The task cache (`TaskCacheEntryRecorded`) is the command side's alone: nothing reads it here."""

    name = "task_runs"
    tables = (task_runs, task_run_states)
    raw_payloads = True
    # A flow run's deletion takes its task runs with it (no task event can follow it: a task
    # run of a deleted flow run is not found by any command).
    handles = frozenset({*_RUN_EVENTS, tr.TaskRunDeleted.event_type, fr.FlowRunDeleted.event_type})

    async def apply(self, conn: AsyncConnection, events: Sequence[tuple[str, str, Event | dict]]) -> None:
        await run_writes(conn, self._writes(events)[0])

    def writes(self, events: Sequence[tuple[str, str, Event | dict]]) -> list[Write] | None:
        """None when a flow run's deletion follows: it deletes task runs the batch may have
        written, so it must run after them (`apply`)."""
        writes, in_any_order = self._writes(events)
        return writes if in_any_order else None

    def _writes(self, events: Sequence[tuple[str, str, Event | dict]]) -> tuple[list[Write], bool]:
        # A run's last event in the batch decides its row; every written state is kept.
        last: dict[str, dict[str, Any] | None] = {}
        states: dict[str, dict[str, Any]] = {}
        flow_runs_gone: list[str] = []
        for _, event_type, payload in cast(Sequence[tuple[str, str, dict[str, Any]]], events):
            if event_type in _RUN_EVENTS:
                run = payload["run"]
                last[run["id"]] = run
                state = run.get("state")
                if state is not None and event_type in _STATE_EVENTS:
                    states[state["id"]] = {**state, "task_run_id": run["id"]}
            elif event_type == tr.TaskRunDeleted.event_type:
                gone_id = payload["task_run_id"]
                last[gone_id] = None
                states = {k: v for k, v in states.items() if v["task_run_id"] != gone_id}
            elif event_type == fr.FlowRunDeleted.event_type:
                flow_runs_gone.append(payload["flow_run_id"])
        writes = runs_with_states_writes(task_runs, task_run_states, "task_run_id", _RUN_DEFAULTS, last, states)
        if flow_runs_gone:
            writes += [("""DELETE FROM task_run_states WHERE task_run_id IN
                           (SELECT id FROM task_runs WHERE flow_run_id = ANY($1::uuid[]))""", (flow_runs_gone,)),
                       ("DELETE FROM task_runs WHERE flow_run_id = ANY($1::uuid[])", (flow_runs_gone,))]
        return writes, not flow_runs_gone

    def raw_writes(self, events: Sequence[StoredEvent]) -> list[Write] | None:
        """The same writes, Postgres reading the rows out of the events as stored; None when a
        flow run's deletion is among them (`writes`)."""
        if any(event_type == fr.FlowRunDeleted.event_type for _, event_type, _ in events):
            return None
        return runs_with_states_envelope_writes(task_runs, task_run_states, "task_run_id", _RUN_DEFAULTS_JSON,
                                                events, _RUN_EVENTS, _STATE_EVENTS, tr.TaskRunDeleted.event_type)


async def queued_runs(engine: Any, older_than_seconds: float, limit: int = 5_000) -> list[tr.TaskRun]:
    """Runs whose current state queued them for a task worker (SCHEDULED, deferred) and that
    have waited longer than `older_than_seconds`: what the task recovery sweep checks are
    still on their key's subject. Oldest first."""
    stmt = (select(task_runs).where(task_runs.c.state_type == "SCHEDULED")
            .where(task_runs.c.queued_state_id == task_runs.c.state_id)
            .where(task_runs.c.updated < func.now() - func.make_interval(0, 0, 0, 0, 0, 0, older_than_seconds))
            .order_by(task_runs.c.updated).limit(limit))
    async with engine.connect() as conn:
        return [tr.TaskRun.model_validate(dict(row._mapping)) for row in await conn.execute(stmt)]


async def running_from_messages(engine: Any) -> dict[tuple[str, str], int]:
    """Runs started from a message that is still on its subject until their worker reports the
    end (RUNNING or CANCELLING with a `task_message`), per (task key, stream)."""
    stream = func.split_part(task_runs.c.task_message, literal_column("':'"), literal_column("1")).label("stream")
    stmt = (select(task_runs.c.task_key, stream, func.count())
            .where(task_runs.c.state_type.in_(["RUNNING", "CANCELLING"]))
            .where(task_runs.c.task_message.is_not(None))
            .group_by(task_runs.c.task_key, literal_column("stream")))
    async with engine.connect() as conn:
        return {(key, stream): n for key, stream, n in await conn.execute(stmt)}


def task_run_reply(row: Any) -> dict[str, Any]:
    return tr.reply(tr.TaskRun.model_validate(dict(row._mapping)))


def _state_reply(row: Any) -> dict[str, Any]:
    return State.model_validate({k: v for k, v in row._mapping.items() if k != "task_run_id"}).reply()


def _filtered(stmt: Any, f: q.TaskRunFilter | None) -> Any:
    stmt = where_filter(stmt, task_runs, f)
    if f is not None:
        if f.flow_run_id is not None and f.flow_run_id.is_null_ is not None:
            column = task_runs.c.flow_run_id
            stmt = stmt.where(column.is_(None) if f.flow_run_id.is_null_ else column.is_not(None))
        stmt = where_time_range(stmt, task_runs.c.expected_start_time, f.expected_start_time)
        stmt = where_time_range(stmt, task_runs.c.start_time, f.start_time)
        stmt = where_time_range(stmt, task_runs.c.end_time, f.end_time)
    return stmt


_SORTS: dict[q.TaskRunSort, list[Any]] = {
    q.TaskRunSort.ID_DESC: [task_runs.c.id.desc()],
    q.TaskRunSort.NAME_ASC: [task_runs.c.name, task_runs.c.id],
    q.TaskRunSort.NAME_DESC: [task_runs.c.name.desc(), task_runs.c.id],
    q.TaskRunSort.EXPECTED_START_TIME_ASC: [task_runs.c.expected_start_time.asc().nulls_last(), task_runs.c.id],
    q.TaskRunSort.EXPECTED_START_TIME_DESC: [task_runs.c.expected_start_time.desc().nulls_last(), task_runs.c.id],
    q.TaskRunSort.NEXT_SCHEDULED_START_TIME_ASC: [task_runs.c.next_scheduled_start_time.asc().nulls_last(),
                                                  task_runs.c.id],
    q.TaskRunSort.START_TIME_DESC: [task_runs.c.start_time.desc().nulls_last(), task_runs.c.id],
    q.TaskRunSort.END_TIME_DESC: [task_runs.c.end_time.desc().nulls_last(), task_runs.c.id],
}


async def get_task_run(conn: AsyncConnection, query: q.GetTaskRun) -> dict[str, Any]:
    row = (await conn.execute(select(task_runs).where(task_runs.c.id == query.id))).first()
    if row is None:
        raise tr.task_run_not_found()
    return task_run_reply(row)


async def list_task_runs(conn: AsyncConnection, query: q.ListTaskRuns) -> list[dict[str, Any]]:
    stmt = _filtered(select(task_runs), query.task_runs).order_by(*_SORTS[query.sort])
    rows = await conn.execute(stmt.limit(query.limit).offset(query.offset))
    return [task_run_reply(r) for r in rows]


async def count_task_runs(conn: AsyncConnection, query: q.CountTaskRuns) -> int:
    return (await conn.execute(_filtered(select(func.count()).select_from(task_runs), query.task_runs))).scalar_one()


async def list_task_run_states(conn: AsyncConnection, query: q.ListTaskRunStates) -> list[dict[str, Any]]:
    """A filter, as Prefect's `GET /task_run_states/`: an unknown run has no states, not an error."""
    rows = await conn.execute(select(task_run_states).where(task_run_states.c.task_run_id == query.task_run_id)
                              .order_by(task_run_states.c.timestamp, task_run_states.c.id))
    return [_state_reply(r) for r in rows]


async def get_task_run_state(conn: AsyncConnection, query: q.GetTaskRunState) -> dict[str, Any]:
    row = (await conn.execute(select(task_run_states).where(task_run_states.c.id == query.id))).first()
    if row is None:
        raise not_found("Task run state not found")
    return _state_reply(row)


async def get_task_run_history(conn: AsyncConnection, query: q.GetTaskRunHistory) -> list[dict[str, Any]]:
    return await run_history(conn, task_runs, _filtered(select(task_runs.c.id), query.task_runs), query)


QUERIES = {
    "GetTaskRun": (q.GetTaskRun, get_task_run),
    "ListTaskRuns": (q.ListTaskRuns, list_task_runs),
    "CountTaskRuns": (q.CountTaskRuns, count_task_runs),
    "ListTaskRunStates": (q.ListTaskRunStates, list_task_run_states),
    "GetTaskRunState": (q.GetTaskRunState, get_task_run_state),
    "GetTaskRunHistory": (q.GetTaskRunHistory, get_task_run_history),
}
