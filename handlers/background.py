"""Background services: the scheduler and the clock. Each is single-active: it works only while
it holds its lease (`scheduler`, `clock`; infra/leases.py), and another process waits as a
standby. Each finds its candidates in a read model and acts through ordinary commands, whose
deciders re-check everything against the log, so a stale read, a restart or two holders at once
(a paused holder past its TTL) can never write anything twice:

- the **scheduler** asks every deployment that is not paused and has an active schedule short
  of runs (fewer than 3 future ones, or none an hour ahead) to schedule its runs
  (`ScheduleDeploymentRuns`, now to now + 100 days, at least 3 runs and 1 h ahead), every
  `scheduler_interval_seconds` (60); and, every `scheduler_recent_interval_seconds` (5), the
  deployments updated since the last pass. A run's id is derived from its deployment,
  schedule and date, so a pass that repeats another appends nothing.
- the **clock** marks `Late` the runs still `Scheduled` 15 s after their start time (FR-7), in
  batches of 400 every 5 s, through `MarkFlowRunLate` (the late-runs rules: a run that moved
  meanwhile is left alone; a run of a full CANCEL_NEW deployment is cancelled).

An error for one deployment or run is logged and the others go on.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from nats.aio.client import Client as NATS
from sqlalchemy import and_, column, func, literal, or_, select
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.ext.asyncio import AsyncEngine

from runledger.commands.orchestration_rules import LATE_AFTER
from runledger.commands.schedules import SCHEDULE_DEFAULTS
from runledger.infra.leases import Lease, stop_if_cancelled
from runledger.infra.settings import Settings
from runledger.projections.tables import deployments, flow_runs

log = logging.getLogger("runledger.background")

LATE_BATCH = 400
SCHEDULER_BATCH = 100


@dataclass
class CommandSender:
    """Commands as any client sends them: through the broker, so a background service may run
    in a process without the command role."""

    nc: NATS
    settings: Settings
    timeout: float = 10.0

    async def __call__(self, name: str, body: dict[str, Any]) -> dict[str, Any]:
        reply = await self.nc.request(self.settings.command_subject(name), json.dumps(body).encode(),
                                      timeout=self.timeout)
        return json.loads(reply.data)


async def each_bounded(items: list[Any], work: Callable[[Any], Awaitable[None]], concurrency: int = 16) -> None:
    """`work` on every item, `concurrency` at a time; one failure does not stop the others."""
    gate = asyncio.Semaphore(concurrency)

    async def one(item: Any) -> None:
        async with gate:
            try:
                await work(item)
            except asyncio.CancelledError:
                raise
            except Exception as e:
                log.warning("background work on %s failed: %s: %s", item, type(e).__name__, e)

    await asyncio.gather(*(one(i) for i in items))


async def every(interval: float, name: str, one_pass: Callable[[], Awaitable[Any]]) -> None:
    """`one_pass`, then a pause of `interval` seconds, for ever: the loop of a single-active
    background role. A pass that fails (Postgres or the broker away) is logged and the next
    one tries again; only a cancel ends it."""
    while True:
        stop_if_cancelled()
        try:
            await one_pass()
        except asyncio.CancelledError:
            raise
        except Exception as e:
            log.warning("%s pass failed: %s: %s", name, type(e).__name__, e)
        await asyncio.sleep(interval)


def short_of_runs(now: datetime) -> Any:
    """A deployment some active schedule of which has fewer than 3 future SCHEDULED runs that
    it made, or none later than an hour from now: only those are asked to schedule on a full
    pass, as Prefect's scheduler selects them. Asking every deployment every minute would send
    a command for each whatever it needs (10,000 deployments: 10,000 commands a minute that
    change nothing), and bring back within a minute a future run a user deleted, where
    Prefect brings it back only when the schedule runs short."""
    schedule = func.jsonb_array_elements(deployments.c.schedules).table_valued(column("value", JSONB)).alias("schedule")
    of_schedule = and_(flow_runs.c.deployment_id == deployments.c.id, flow_runs.c.state_type == "SCHEDULED",
                       flow_runs.c.auto_scheduled.is_(True), flow_runs.c.next_scheduled_start_time >= now,
                       flow_runs.c.created_by["id"].astext == schedule.c.value["id"].astext)
    count = select(func.count()).where(of_schedule).correlate(deployments).scalar_subquery()
    latest = select(func.max(flow_runs.c.next_scheduled_start_time)).where(of_schedule).correlate(deployments).scalar_subquery()
    return (select(literal(1)).select_from(schedule)
            .where(schedule.c.value["active"].as_boolean().is_(True),
                   or_(count < SCHEDULE_DEFAULTS.min_runs, latest < now + SCHEDULE_DEFAULTS.min_time))
            .exists())


@dataclass
class Scheduler:
    engine: AsyncEngine
    send: Callable[[str, dict[str, Any]], Awaitable[dict[str, Any]]]
    interval: float = 60.0
    recent_interval: float = 5.0
    clock: Callable[[], datetime] = field(default=lambda: datetime.now(UTC))
    passes: int = 0  # full passes made (for tests and status)

    async def schedulable(self, updated_since: datetime | None = None) -> list[str]:
        """Deployments not paused with an active schedule: those updated since `updated_since`
        when given (the recent loop), else those with an active schedule short of runs
        (`short_of_runs`)."""
        stmt = (select(deployments.c.id).where(deployments.c.paused.is_(False))
                .where(deployments.c.schedules.contains([{"active": True}])).order_by(deployments.c.id))
        if updated_since is not None:
            stmt = stmt.where(deployments.c.updated >= updated_since)
        else:
            stmt = stmt.where(short_of_runs(self.clock()))
        async with self.engine.connect() as conn:
            return [str(r.id) for r in await conn.execute(stmt)]

    async def schedule(self, deployment_ids: list[str]) -> int:
        made = 0

        async def one(deployment_id: str) -> None:
            nonlocal made
            reply = await self.send("ScheduleDeploymentRuns", {"deployment_id": deployment_id})
            if not reply.get("ok"):
                raise RuntimeError(reply.get("error"))
            made += len(reply["result"]["flow_run_ids"])

        for start in range(0, len(deployment_ids), SCHEDULER_BATCH):
            await each_bounded(deployment_ids[start:start + SCHEDULER_BATCH], one)
        return made

    async def run(self) -> None:
        """Full passes every `interval`, recent updates every `recent_interval` in between."""
        last_full = None
        last_recent = self.clock()
        while True:
            stop_if_cancelled()
            now = self.clock()
            try:
                if last_full is None or (now - last_full).total_seconds() >= self.interval:
                    made = await self.schedule(await self.schedulable())
                    last_full = last_recent = now
                    self.passes += 1
                    if made:
                        log.info("scheduler: %d runs scheduled", made)
                else:
                    # One second of overlap: an update committed just before the last look.
                    await self.schedule(await self.schedulable(updated_since=last_recent - timedelta(seconds=1)))
                    last_recent = now
            except asyncio.CancelledError:
                raise
            except Exception as e:  # Postgres or the broker away: try again next time
                log.warning("scheduler pass failed: %s: %s", type(e).__name__, e)
            await asyncio.sleep(self.recent_interval)


@dataclass
class Clock:
    engine: AsyncEngine
    send: Callable[[str, dict[str, Any]], Awaitable[dict[str, Any]]]
    interval: float = 5.0
    clock: Callable[[], datetime] = field(default=lambda: datetime.now(UTC))
    marked: int = 0

    async def late_runs(self) -> list[str]:
        """FR-7: runs still `Scheduled` (exactly: AwaitingRetry and AwaitingConcurrencySlot are
        never late) 15 s past their start, oldest first."""
        stmt = (select(flow_runs.c.id)
                .where(flow_runs.c.state_type == "SCHEDULED", flow_runs.c.state_name == "Scheduled",
                       flow_runs.c.next_scheduled_start_time <= self.clock() - LATE_AFTER)
                .order_by(flow_runs.c.next_scheduled_start_time).limit(LATE_BATCH))
        async with self.engine.connect() as conn:
            return [str(r.id) for r in await conn.execute(stmt)]

    async def mark_late(self) -> int:
        marked = 0

        async def one(run_id: str) -> None:
            nonlocal marked
            reply = await self.send("MarkFlowRunLate", {"id": run_id})
            if reply.get("ok") and reply.get("orchestration", {}).get("status") == "ACCEPT":
                marked += 1

        await each_bounded(await self.late_runs(), one)
        self.marked += marked
        return marked

    async def run(self) -> None:
        await every(self.interval, "clock", self.mark_late)


async def run_leased(lease: Lease | None, name: str, work: Callable[[], Awaitable[None]]) -> None:
    """`work` while holding `lease` (for ever: a lost lease is waited for again)."""
    while True:
        try:
            if lease is None:
                await work()
            else:
                await lease.run(work)
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("%s: the lease handling failed; trying again in 1 s", name)
        await asyncio.sleep(1)
