"""The vacuum: a single-active background service (role and lease `vacuum`)
that deletes finished runs older than `flow_run_retention_seconds` from the read models, as
Prefect's `db_vacuum` deletes old flow runs, so that `flow_runs`, `flow_run_states`,
`task_runs` and `task_run_states` stop growing for ever. Off while the setting is 0 (the
default, as in Prefect).

Every `interval` (5 minutes) it finds in the read models, oldest end first, in batches of
`BATCH`:

1. flow runs in a final state (COMPLETED, FAILED, CANCELLED, CRASHED) that ended before the
   cutoff (now minus the retention), top-level ones (no parent task run) and subflow runs whose
   parent task run is gone (their parent flow run was deleted: a deleted parent's subflow runs
   become top-level runs in Prefect too, so they go at the next pass). A subflow run whose
   parent is still there is never deleted on its own. Each goes through
   `DeleteFinishedFlowRun`, which checks on the log that the run is still in a final state
   and ended before the cutoff, then deletes it as a user's `DeleteFlowRun` does: an event in
   the log, and its task runs and their states go with it in the read models, so a replay
   rebuilds the same read models. A run made by a schedule whose date
   is not past the cutoff too (one cancelled before its date) is kept: deleted, the scheduler
   would make it again for that date, as a new SCHEDULED run.
2. background task runs (no flow run) in a final state that ended before the cutoff:
   `DeleteFinishedTaskRun`, checked again on the log as the flow runs are.

Deleting a finished run gives back nothing: it holds no slot. The deciders read the run from
the log, so a run deleted meanwhile, or rerun since (forced out of its final state), is
counted as nothing and kept.

Both kinds are read oldest end first through an index on their end time (`flow_runs_ended`,
`task_runs_end`), so a batch costs the same however long the history.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import Select, exists, or_, select, tuple_
from sqlalchemy.ext.asyncio import AsyncEngine

from runledger.commands.states import TERMINAL
from runledger.projections.tables import flow_runs, projection_failures, task_runs

from .background import each_bounded, every

log = logging.getLogger("runledger.vacuum")

VACUUM_INTERVAL = 300.0
BATCH = 200  # Prefect's `db_vacuum` batch size
# Batches of each kind in one pass: 5,000 runs, then the interval. A long history, when the
# vacuum is first turned on, goes over a few passes, each one short.
MAX_BATCHES = 25
_FINAL = sorted(TERMINAL)


@dataclass
class VacuumPass:
    """What one pass deleted (a run someone else deleted meanwhile is not counted)."""

    flow_runs_deleted: int = 0
    task_runs_deleted: int = 0


@dataclass
class Vacuum:
    engine: AsyncEngine
    send: Callable[[str, dict[str, Any]], Awaitable[dict[str, Any]]]
    retention_seconds: float  # Settings.flow_run_retention_seconds; 0: it deletes nothing
    interval: float = VACUUM_INTERVAL
    clock: Callable[[], datetime] = field(default=lambda: datetime.now(UTC))
    passes: int = 0
    last: VacuumPass = field(default_factory=VacuumPass)  # the last pass's figures

    def old_flow_runs(self, cutoff: datetime) -> Select[Any]:
        """Step 1's candidates (without the order and the batch). A subflow run counts as
        orphaned only while the task-runs projection is not stalled: a stalled one may lack its
        parent task run."""
        runs = flow_runs.c
        task_runs_stalled = exists().where(projection_failures.c.projection == "task_runs")
        parent_gone = ~exists().where(task_runs.c.id == runs.parent_task_run_id)
        return (select(runs.id, runs.end_time)
                .where(runs.state_type.in_(_FINAL), runs.end_time < cutoff,
                       or_(runs.parent_task_run_id.is_(None), parent_gone & ~task_runs_stalled),
                       or_(runs.auto_scheduled.is_(False), runs.expected_start_time < cutoff)))

    def old_background_task_runs(self, cutoff: datetime) -> Select[Any]:
        runs = task_runs.c
        return (select(runs.id, runs.end_time)
                .where(runs.flow_run_id.is_(None), runs.state_type.in_(_FINAL), runs.end_time < cutoff))

    async def _delete_each(self, candidates: Select[Any], table: Any, command: str,
                           extra: dict[str, Any] | None = None) -> int:
        """`command` for each candidate, oldest end first, batch after batch (each one after the
        last row of the one before, so a read model that has not applied the deletes yet does
        not send them again) until one is short or `MAX_BATCHES` were sent."""
        deleted = 0
        after: tuple[datetime, Any] | None = None
        extra = extra or {}

        async def one(row: Any) -> None:
            nonlocal deleted
            reply = await self.send(command, {"id": str(row.id), **extra})
            # Each says whether it deleted the run (`created`).
            if reply.get("ok") and reply.get("created") is True:
                deleted += 1

        for _ in range(MAX_BATCHES):
            stmt = candidates
            if after is not None:
                stmt = stmt.where(tuple_(table.c.end_time, table.c.id) > tuple_(*after))
            async with self.engine.connect() as conn:
                rows = list(await conn.execute(stmt.order_by(table.c.end_time, table.c.id).limit(BATCH)))
            await each_bounded(rows, one)
            if len(rows) < BATCH:
                break
            after = (rows[-1].end_time, rows[-1].id)
        return deleted

    async def run_pass(self) -> VacuumPass:
        self.last = VacuumPass()
        if self.retention_seconds > 0:
            cutoff = self.clock() - timedelta(seconds=self.retention_seconds)
            self.last.flow_runs_deleted = await self._delete_each(self.old_flow_runs(cutoff), flow_runs,
                                                                  "DeleteFinishedFlowRun",
                                                                  {"ended_before": cutoff.isoformat()})
            self.last.task_runs_deleted = await self._delete_each(self.old_background_task_runs(cutoff), task_runs,
                                                                  "DeleteFinishedTaskRun",
                                                                  {"ended_before": cutoff.isoformat()})
            if self.last.flow_runs_deleted or self.last.task_runs_deleted:
                log.info("vacuum: %d flow runs and %d background task runs that ended before %s deleted",
                         self.last.flow_runs_deleted, self.last.task_runs_deleted, cutoff.isoformat())
        self.passes += 1
        return self.last

    async def run(self) -> None:
        await every(self.interval, "vacuum", self.run_pass)
