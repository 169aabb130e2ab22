"""Run history (`GetFlowRunHistory`, `GetTaskRunHistory`): runs counted per interval of their
expected start time, by state, with Prefect's estimates. One implementation for both kinds of
run: their tables share the columns it reads.

Prefect's estimates, as its `Run` model computes them in SQL (TR-7):
- estimated run time: `total_run_time`, plus the time since the current state began while
  the run is RUNNING;
- estimated lateness: `start_time - expected_start_time` when it started late; when it has
  not started, is not in a terminal state and was expected in the past, the time since it
  was expected; else 0.
Only positive values are summed, as Prefect does.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

from pydantic import BaseModel, ConfigDict
from sqlalchemy import DateTime, Float, Table, and_, case, cast, extract, func, literal, select
from sqlalchemy.dialects.postgresql import ARRAY

from runledger.commands import queries as q
from runledger.commands.states import TERMINAL, StateType

_NO_TIME = timedelta(0)
_LAST = datetime.max.replace(tzinfo=UTC)


def intervals(query: q.RunHistory) -> list[tuple[datetime, datetime]]:
    """The query's intervals, each `[start, end)`. The last may end after `history_end`;
    an end past what Python can hold is clamped (only near the year 9999)."""
    step = timedelta(seconds=query.history_interval_seconds)
    out = []
    for i in range(q.history_interval_count(query.history_start, query.history_end, query.history_interval_seconds)):
        start = query.history_start + i * step
        try:
            end = start + step
        except OverflowError:
            end = _LAST
        out.append((start, end))
    return out


def estimated_run_time(table: Table) -> Any:
    state_began = cast(table.c.state["timestamp"].astext, DateTime(timezone=True))
    return case((table.c.state_type == StateType.RUNNING.value, table.c.total_run_time + (func.now() - state_began)),
                else_=table.c.total_run_time)


def estimated_lateness(table: Table) -> Any:
    expected, started = table.c.expected_start_time, table.c.start_time
    return case(
        (started > expected, started - expected),
        (and_(started.is_(None), table.c.state_type.not_in([t.value for t in TERMINAL]), expected < func.now()),
         func.now() - expected),
        else_=literal(_NO_TIME))


def _seconds(interval: Any) -> Any:
    return func.sum(func.greatest(0, cast(extract("epoch", interval), Float)))


class HistoryState(BaseModel):
    """The runs of one interval in one state (type and name); durations in seconds."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    state_type: StateType | None
    state_name: str | None
    count_runs: int
    sum_estimated_run_time: float
    sum_estimated_lateness: float


class HistoryInterval(BaseModel):
    """One interval `[interval_start, interval_end)` and its runs by state (empty: none)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    interval_start: datetime
    interval_end: datetime
    states: list[HistoryState]


async def run_history(conn: Any, table: Table, runs: Any, query: q.RunHistory) -> list[dict[str, Any]]:
    """`runs`: a SELECT over `table` (or a join from it) with the query's filters applied; its
    rows are bucketed here. Returns `{interval_start, interval_end, states}` per interval, in
    order; `states` lists `{state_type, state_name, count_runs, sum_estimated_run_time,
    sum_estimated_lateness}` (seconds), empty for an interval without runs."""
    bounds = intervals(query)
    if not bounds:
        return []
    stamp = ARRAY(DateTime(timezone=True))
    iv = func.unnest(literal([s for s, _ in bounds], stamp), literal([e for _, e in bounds], stamp)).table_valued(
        "interval_start", "interval_end").render_derived(name="iv")
    expected = table.c.expected_start_time
    picked = runs.with_only_columns(
        expected.label("expected_start_time"), table.c.state_type, table.c.state_name,
        estimated_run_time(table).label("run_time"), estimated_lateness(table).label("lateness"),
    ).where(expected >= bounds[0][0], expected < bounds[-1][1]).subquery("runs")
    stmt = (select(iv.c.interval_start, picked.c.state_type, picked.c.state_name, func.count().label("count_runs"),
                   _seconds(picked.c.run_time).label("run_time"), _seconds(picked.c.lateness).label("lateness"))
            .select_from(picked.join(iv, and_(picked.c.expected_start_time >= iv.c.interval_start,
                                              picked.c.expected_start_time < iv.c.interval_end)))
            .group_by(iv.c.interval_start, picked.c.state_type, picked.c.state_name)
            .order_by(iv.c.interval_start, picked.c.state_type, picked.c.state_name))
    by_start: dict[datetime, list[HistoryState]] = {start: [] for start, _ in bounds}
    for row in await conn.execute(stmt):
        by_start[row.interval_start].append(HistoryState(
            state_type=row.state_type, state_name=row.state_name, count_runs=row.count_runs,
            sum_estimated_run_time=row.run_time or 0, sum_estimated_lateness=row.lateness or 0))
    return [HistoryInterval(interval_start=start, interval_end=end, states=by_start[start]).model_dump(mode="json")
            for start, end in bounds]
