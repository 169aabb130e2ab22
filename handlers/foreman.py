"""The foreman: a single-active background service (lease `foreman`, like the scheduler and the
clock in handlers/background.py) that, every 15 s, in this order:

1. marks OFFLINE the ONLINE workers whose last heartbeat is older than three heartbeat
   intervals (30 s for a worker that gave none): `MarkWorkerOffline`; then crashes the runs
   such workers (and deleted ones) still hold, giving their slots back:
   `CrashFlowRunOfLostWorker` (beyond Prefect, whose runs stay RUNNING for ever);
2. marks NOT_READY the READY pools with no ONLINE worker left: `MarkWorkPoolNotReady`;
3. marks NOT_READY the READY deployments last polled more than 60 s ago whose queue was not
   polled within 60 s either: `MarkDeploymentsNotReady`, one per queue; and those without a
   queue: `MarkQueuelessDeploymentsNotReady`;
4. marks NOT_READY the READY queues last polled more than 60 s ago: `MarkWorkQueuesNotReady`,
   one per pool.
5. gives back the deployment slots of runs PENDING for longer than the slot's lease lasts
   (the deployment's `concurrency_options.grace_period_seconds`, else the service's
   `deployment_slot_lease_seconds`), and of runs whose process renewed their lease and then
   stopped renewing it past its time (`RenewDeploymentSlotLease`; its process died, most
   likely): `ExpireDeploymentSlotLease`, as Prefect's lease reaper;
   and the slots a release handed to a waiting run that nobody claimed within
   `handed_slot_seconds` (30 s by default).
6. crashes the task runs left RUNNING or CANCELLING in a flow run that ended (COMPLETED,
   FAILED, CANCELLED or CRASHED) more than one pass ago: a proposed `CRASHED` state through
   `SetTaskRunState`, which gives back their tag concurrency slots (SL-8). The process that
   ran them is gone, so nothing else would ever end them, and their slots would stay held until
   someone reset the tag's limit (Prefect issue #17415). Background task runs (no flow run) are
   not touched: a dead task worker's runs are delivered to another one, with their slots.
7. deletes the runs of deleted deployments (their tombstones in the read model) still
   SCHEDULED, never run and not `AwaitingConcurrencySlot`: `DeleteRunOfDeletedDeployment`. A
   deployment's delete takes the runs its schedules made, which it finds in the log; the runs
   made from it on demand are found only in the read model, so they go here, within a pass of
   the delete.
8. gives back the tag concurrency slots held by task runs that are gone (a flow run's delete
   takes its task runs with it, and writes nothing on their limits) or no longer RUNNING or
   CANCELLING: `ReleaseTagSlotsOfGoneTaskRuns`, one per tag, for its classic limit and its
   global `tag:<tag>` one. Without it such a slot stays taken for good, and the tag's next
   runs wait for ever.

It finds candidates in the read models and acts through commands whose deciders check the
condition again against the log (the worker's last heartbeat, the pool's online workers, the
queue's last poll), so a stale read model, a restart or two foremen at once change nothing
wrongly: a candidate that is no longer one is left as it is. It never makes anything READY.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import (
    DateTime,
    Float,
    and_,
    exists,
    func,
    literal,
    literal_column,
    or_,
    select,
    text,
)
from sqlalchemy.ext.asyncio import AsyncEngine

from runledger.commands import tag_concurrency_limits as tcl
from runledger.commands import work_pools as wp
from runledger.commands import workers as wk
from runledger.commands.slots import DEFAULT_DEPLOYMENT_LEASE_SECONDS, HANDED_SLOT_SECONDS
from runledger.commands.states import TERMINAL
from runledger.projections.tables import (
    deleted_deployments,
    deployments,
    flow_runs,
    task_runs,
    work_pools,
    work_queues,
    workers,
)

from .background import each_bounded, every

log = logging.getLogger("runledger.foreman")

FOREMAN_INTERVAL = 15.0
BATCH = 500
# Step 8's candidates. A classic limit lists its holders (`active_slots`); a `tag:<tag>` global
# limit only counts them, so it is a candidate when it counts more than the tag's running runs.
_CLASSIC_GONE_HOLDERS = text(
    "SELECT l.tag, array_agg(h.holder::uuid) AS task_run_ids"
    " FROM tag_concurrency_limits l CROSS JOIN LATERAL jsonb_array_elements_text(l.active_slots) AS h(holder)"
    " LEFT JOIN task_runs t ON t.id = h.holder::uuid"
    " WHERE t.id IS NULL OR t.state_type IS NULL OR t.state_type NOT IN ('RUNNING', 'CANCELLING')"
    " GROUP BY l.tag ORDER BY l.tag LIMIT 500")
_GLOBAL_OVERCOUNTED = text(
    "SELECT substr(c.name, 5) AS tag FROM concurrency_limits c"
    " WHERE c.name LIKE 'tag:%' AND c.active_slots > 0 AND c.active_slots > ("
    "   SELECT count(*) FROM task_runs t"
    "   WHERE t.tags ? substr(c.name, 5) AND t.state_type IN ('RUNNING', 'CANCELLING'))"
    " ORDER BY c.name LIMIT 500")
# How long after its flow run ended a task run still RUNNING is left alone: a run's last task
# reports may arrive just after its flow's own terminal state (they are sent in batches).
ENDED_FLOW_RUN_GRACE_SECONDS = FOREMAN_INTERVAL
ENDED_FLOW_RUN_MESSAGE = "Its flow run ended ({state}) while this task run was still running."


@dataclass
class ForemanPass:
    """What one pass asked for: workers it turned OFFLINE, and the pools, deployments and
    queues it sent to their deciders (which may have found nothing left to do)."""

    workers_offline: int = 0
    runs_crashed: int = 0
    leases_expired: int = 0
    task_runs_crashed: int = 0
    runs_of_deleted_deployments: int = 0
    tag_slots_released: int = 0
    pools_not_ready: int = 0
    deployments_checked: int = 0
    queues_checked: int = 0


@dataclass
class Foreman:
    engine: AsyncEngine
    send: Callable[[str, dict[str, Any]], Awaitable[dict[str, Any]]]
    interval: float = FOREMAN_INTERVAL
    clock: Callable[[], datetime] = field(default=lambda: datetime.now(UTC))
    deployment_lease_seconds: float = DEFAULT_DEPLOYMENT_LEASE_SECONDS  # Settings.deployment_slot_lease_seconds
    handed_slot_seconds: float = HANDED_SLOT_SECONDS  # Settings.handed_slot_seconds
    ended_flow_run_grace_seconds: float = ENDED_FLOW_RUN_GRACE_SECONDS
    passes: int = 0
    last: ForemanPass = field(default_factory=ForemanPass)  # the last pass's figures
    _just_offline: set[tuple[str, str]] = field(default_factory=set)  # (pool, worker) marked this pass

    async def _rows(self, stmt: Any) -> list[Any]:
        async with self.engine.connect() as conn:
            return list(await conn.execute(stmt))

    async def workers_offline(self) -> set[str]:
        """Workers gone silent; the pools they belonged to."""
        now = self.clock()
        interval = func.coalesce(func.nullif(workers.c.heartbeat_interval_seconds, 0), wk.HEARTBEAT_FALLBACK_SECONDS)
        stmt = (select(work_pools.c.name.label("pool"), workers.c.name)
                .join(work_pools, work_pools.c.id == workers.c.work_pool_id)
                .where(workers.c.status == wk.WorkerStatus.ONLINE.value,
                       workers.c.last_heartbeat_time
                       < literal(now) - func.make_interval(0, 0, 0, 0, 0, 0, interval * wk.OFFLINE_MULTIPLIER))
                .order_by(workers.c.last_heartbeat_time).limit(BATCH))
        pools: set[str] = set()
        marked = 0

        async def one(row: Any) -> None:
            nonlocal marked
            reply = await self.send("MarkWorkerOffline", {"work_pool_name": row.pool, "name": row.name})
            if reply.get("ok") and (reply.get("result") or {}).get("status") == wk.WorkerStatus.OFFLINE.value:
                marked += 1
                pools.add(row.pool)
                self._just_offline.add((row.pool, row.name))

        self._just_offline = set()
        await each_bounded(await self._rows(stmt), one)
        self.last.workers_offline = marked
        return pools

    async def runs_of_lost_workers(self) -> int:
        """Runs still claimed by a worker that is OFFLINE in the read model, was just marked so
        (the read model may not show it yet), or was deleted, whether or not their queue still
        exists: each is crashed by its decider, which checks the worker against the log again."""
        gone = or_(workers.c.id.is_(None), workers.c.status == wk.WorkerStatus.OFFLINE.value)
        if self._just_offline:
            pairs = [and_(work_pools.c.name == pool, flow_runs.c.worker_name == name)
                     for pool, name in sorted(self._just_offline)]
            gone = or_(gone, *pairs)
        stmt = (select(flow_runs.c.id, flow_runs.c.worker_name)
                .join(work_queues, work_queues.c.id == flow_runs.c.work_queue_id)
                .join(work_pools, work_pools.c.id == work_queues.c.work_pool_id)
                .outerjoin(workers, and_(workers.c.work_pool_id == work_pools.c.id,
                                         workers.c.name == flow_runs.c.worker_name))
                .where(flow_runs.c.worker_name.is_not(None),
                       flow_runs.c.state_type.in_(("PENDING", "RUNNING", "CANCELLING")), gone)
                .limit(BATCH))
        # A run whose queue (or pool) was deleted after its claim has no queue in the read model
        # any more, but still holds its slots in the log: a candidate while no worker of that
        # name is ONLINE in any pool (its decider finds its pool in the log and checks there).
        online_namesake = select(workers.c.id).where(workers.c.name == flow_runs.c.worker_name,
                                                     workers.c.status == wk.WorkerStatus.ONLINE.value)
        just_offline = sorted({name for _, name in self._just_offline})
        orphaned = (select(flow_runs.c.id, flow_runs.c.worker_name)
                    .where(flow_runs.c.worker_name.is_not(None), flow_runs.c.work_queue_id.is_(None),
                           flow_runs.c.state_type.in_(("PENDING", "RUNNING", "CANCELLING")),
                           or_(~online_namesake.exists(), flow_runs.c.worker_name.in_(just_offline)))
                    .limit(BATCH))
        crashed = 0

        async def one(row: Any) -> None:
            nonlocal crashed
            reply = await self.send("CrashFlowRunOfLostWorker", {"id": str(row.id), "worker_name": row.worker_name})
            if reply.get("ok") and (reply.get("result") or {}).get("type") == "CRASHED":
                crashed += 1

        await each_bounded([*await self._rows(stmt), *await self._rows(orphaned)], one)
        self.last.runs_crashed = crashed
        return crashed

    async def pools_not_ready(self, also: frozenset[str] | set[str] = frozenset()) -> int:
        """READY pools without an ONLINE worker in the read model, and the pools of the workers
        just marked offline (the read model may not show that yet): the decider knows."""
        online = select(workers.c.id).where(workers.c.work_pool_id == work_pools.c.id,
                                            workers.c.status == wk.WorkerStatus.ONLINE.value)
        stmt = (select(work_pools.c.name).where(work_pools.c.status == wp.Status.READY.value)
                .where(or_(~online.exists(), work_pools.c.name.in_(sorted(also)))).order_by(work_pools.c.name))
        names = [r.name for r in await self._rows(stmt)]
        marked = 0

        async def one(name: str) -> None:
            nonlocal marked
            reply = await self.send("MarkWorkPoolNotReady", {"work_pool_name": name})
            if reply.get("ok"):
                marked += 1

        await each_bounded(names, one)
        self.last.pools_not_ready = marked
        return marked

    async def deployments_not_ready(self) -> int:
        """Outer-joined to their queues, as Prefect's foreman: a deployment without a queue
        (polled by a runner, or its queue deleted) goes NOT_READY on its own last poll, through
        `MarkQueuelessDeploymentsNotReady`; one with a queue through its pool, by queue."""
        stale_before = self.clock() - wp.NOT_READY_AFTER
        stmt = (select(work_pools.c.name.label("pool"), work_queues.c.id.label("queue_id"), deployments.c.id,
                       deployments.c.last_polled)
                .outerjoin(work_queues, work_queues.c.id == deployments.c.work_queue_id)
                .outerjoin(work_pools, work_pools.c.id == work_queues.c.work_pool_id)
                .where(deployments.c.status == "READY", deployments.c.last_polled.is_not(None),
                       deployments.c.last_polled < stale_before,
                       or_(work_queues.c.last_polled.is_(None), work_queues.c.last_polled < stale_before))
                .order_by(deployments.c.last_polled).limit(BATCH))
        by_queue: dict[tuple[str, Any], dict[str, str]] = defaultdict(dict)
        for row in await self._rows(stmt):
            # Each one's last poll goes with it: the routine polls that set it leave the log.
            by_queue[(row.pool, row.queue_id) if row.queue_id is not None else ("", None)][str(row.id)] = \
                row.last_polled.isoformat()
        sent = 0

        async def one(item: tuple[tuple[str, Any], dict[str, str]]) -> None:
            nonlocal sent
            (pool, queue_id), last_polled = item
            ids = list(last_polled)
            if queue_id is None:
                reply = await self.send("MarkQueuelessDeploymentsNotReady",
                                        {"deployment_ids": ids, "last_polled": last_polled})
            else:
                reply = await self.send("MarkDeploymentsNotReady", {"work_pool_name": pool, "work_queue_id": str(queue_id),
                                                                    "deployment_ids": ids, "last_polled": last_polled})
            if reply.get("ok"):
                sent += len(ids)

        await each_bounded(list(by_queue.items()), one)
        self.last.deployments_checked = sent
        return sent

    async def queues_not_ready(self) -> int:
        stale_before = self.clock() - wp.NOT_READY_AFTER
        stmt = (select(work_pools.c.name.label("pool"), work_queues.c.id)
                .join(work_pools, work_pools.c.id == work_queues.c.work_pool_id)
                .where(and_(work_queues.c.status == wp.Status.READY.value, work_queues.c.last_polled.is_not(None),
                            work_queues.c.last_polled < stale_before))
                .order_by(work_queues.c.last_polled).limit(BATCH))
        by_pool: dict[str, list[str]] = defaultdict(list)
        for row in await self._rows(stmt):
            by_pool[row.pool].append(str(row.id))
        sent = 0

        async def one(item: tuple[str, list[str]]) -> None:
            nonlocal sent
            pool, ids = item
            reply = await self.send("MarkWorkQueuesNotReady", {"work_pool_name": pool, "work_queue_ids": ids})
            if reply.get("ok"):
                sent += len(ids)

        await each_bounded(list(by_pool.items()), one)
        self.last.queues_checked = sent
        return sent

    async def deployment_leases_expired(self) -> int:
        """Runs PENDING for longer than their deployment slot's lease lasts, runs whose renewed
        lease ran out, and waiting runs handed a slot by a release longer ago than
        `handed_slot_seconds`, in the read model:
        each is sent to its decider, which checks the run, its lease and the time against the
        log again."""
        state = flow_runs.c.state
        lease = state["state_details"]["deployment_concurrency_lease_id"].astext
        since = state["timestamp"].astext.cast(DateTime(timezone=True))
        grace = deployments.c.concurrency_options["grace_period_seconds"].astext.cast(Float)
        lasts = func.coalesce(grace, self.deployment_lease_seconds)
        now = literal(self.clock())
        pending_too_long = and_(flow_runs.c.state_type == "PENDING", flow_runs.c.deployment_lease_expired.is_(False),
                                flow_runs.c.deployment_lease_expiration.is_(None),
                                since < now - func.make_interval(0, 0, 0, 0, 0, 0, lasts))
        # A lease its run's process renewed, and then stopped renewing (it died, most likely).
        renewal_ran_out = and_(flow_runs.c.deployment_lease_expiration < now,
                               flow_runs.c.state_type.in_(("PENDING", "RUNNING", "CANCELLING")),
                               flow_runs.c.deployment_lease_expired.is_(False))
        # Also when the deployment or its limit is gone meanwhile: the run still holds its pool slot.
        handed_unclaimed = and_(flow_runs.c.state_type == "SCHEDULED",
                                flow_runs.c.state_name == "AwaitingConcurrencySlot",
                                since < now - func.make_interval(0, 0, 0, 0, 0, 0, self.handed_slot_seconds))
        stmt = (select(flow_runs.c.id, lease.label("lease_id"))
                .outerjoin(deployments, deployments.c.id == flow_runs.c.deployment_id)
                .where(lease.is_not(None),
                       or_(and_(pending_too_long, deployments.c.concurrency_limit.is_not(None)), renewal_ran_out,
                           handed_unclaimed))
                .order_by(since).limit(BATCH))
        expired = 0

        async def one(row: Any) -> None:
            nonlocal expired
            reply = await self.send("ExpireDeploymentSlotLease", {"id": str(row.id), "lease_id": row.lease_id})
            if reply.get("ok") and reply.get("created") is True:  # its lease expired now
                expired += 1

        await each_bounded(await self._rows(stmt), one)
        self.last.leases_expired = expired
        return expired

    async def task_runs_of_ended_flow_runs(self) -> int:
        """Task runs RUNNING or CANCELLING in the read model whose flow run ended more than
        `ended_flow_run_grace_seconds` ago. The state proposed is not forced, so that the task
        rules refuse to crash a run that has ended meanwhile (a stale read model, a second
        foreman): a forced state would overwrite its outcome. Served by the index on the task
        runs' state type (the few live runs), then the flow runs' primary key."""
        ended_before = self.clock() - timedelta(seconds=self.ended_flow_run_grace_seconds)
        flow_state_since = flow_runs.c.state["timestamp"].astext.cast(DateTime(timezone=True))
        stmt = (select(task_runs.c.id, flow_runs.c.state_type.label("flow_state"))
                .join(flow_runs, flow_runs.c.id == task_runs.c.flow_run_id)
                .where(task_runs.c.state_type.in_(sorted(tcl.SLOT_STATES)),
                       flow_runs.c.state_type.in_(sorted(TERMINAL)), flow_state_since < literal(ended_before))
                .limit(BATCH))
        crashed = 0

        async def one(row: Any) -> None:
            nonlocal crashed
            state = {"type": "CRASHED", "message": ENDED_FLOW_RUN_MESSAGE.format(state=row.flow_state)}
            reply = await self.send("SetTaskRunState", {"id": str(row.id), "state": state})
            if reply.get("ok") and (reply.get("orchestration") or {}).get("status") == "ACCEPT":
                crashed += 1

        await each_bounded(await self._rows(stmt), one)
        self.last.task_runs_crashed = crashed
        return crashed

    async def runs_of_deleted_deployments(self) -> int:
        """Runs still SCHEDULED, never run and not waiting for a slot, whose deployment was
        deleted (its tombstone in `deleted_deployments`, its row gone), up to `BATCH`: each is
        sent to its decider, which checks the run and the deployment's deletion against the log
        again (a run that moved on is left as it is). A deployment merely absent from the read
        model is not enough: a run may name one that never existed, which the decider keeps,
        and 500 such runs, found first at every pass, had hidden the rest for ever.

        Served by the partial index `flow_runs_deletable_by_deployment` (the runs such a delete
        may take: few, however long the history), its predicate written out literally so that
        the planner may use it: a skip scan lists the deployments the index names, one probe
        each (a recursive query), the tombstones' and deployments' primary keys keep those that
        were deleted, and their runs are read from the same index."""
        runs = flow_runs.c
        deletable = and_(runs.state_type == literal_column("'SCHEDULED'"), runs.run_count == literal_column("0"),
                         runs.state_name != literal_column("'AwaitingConcurrencySlot'"),
                         runs.deployment_id.is_not(None))

        def first_after(after: Any) -> Any:
            stmt = select(runs.deployment_id).where(deletable)
            if after is not None:
                stmt = stmt.where(runs.deployment_id > after)
            return stmt.order_by(runs.deployment_id).limit(1).scalar_subquery()

        named = select(first_after(None).label("id")).cte("named", recursive=True)
        named = named.union_all(select(first_after(named.c.id)).where(named.c.id.is_not(None)))
        gone = (select(named.c.id)
                .where(named.c.id.is_not(None), exists().where(deleted_deployments.c.id == named.c.id),
                       ~exists().where(deployments.c.id == named.c.id)))
        stmt = select(runs.id, runs.deployment_id).where(deletable, runs.deployment_id.in_(gone)).limit(BATCH)
        deleted = 0

        async def one(row: Any) -> None:
            nonlocal deleted
            reply = await self.send("DeleteRunOfDeletedDeployment",
                                    {"id": str(row.id), "deployment_id": str(row.deployment_id)})
            if reply.get("ok") and reply.get("created") is True:  # deleted now
                deleted += 1

        await each_bounded(await self._rows(stmt), one)
        self.last.runs_of_deleted_deployments = deleted
        return deleted

    async def tag_slots_of_gone_task_runs(self) -> int:
        """Tags whose limits list a task run holding a slot that, in the read model, is gone or
        no longer RUNNING or CANCELLING (a flow run's deletion takes its task runs with it and
        writes nothing on their limits); and `tag:<tag>` global limits counting more slots than
        the tag has running task runs (their holders are in no read model). Each tag gets
        `ReleaseTagSlotsOfGoneTaskRuns`, whose decider reads every candidate from the log: a
        stale read model (a run just started) releases nothing."""
        async with self.engine.connect() as conn:
            classic = list(await conn.execute(_CLASSIC_GONE_HOLDERS))
            global_ = list(await conn.execute(_GLOBAL_OVERCOUNTED))
        bodies = [{"tag": row.tag, "task_run_ids": [str(i) for i in row.task_run_ids[:tcl.MAX_GONE_HOLDERS]]}
                  for row in classic]
        bodies += [{"tag": row.tag} for row in global_ if row.tag not in {b["tag"] for b in bodies}]
        released = 0

        async def one(body: dict[str, Any]) -> None:
            nonlocal released
            reply = await self.send("ReleaseTagSlotsOfGoneTaskRuns", body)
            if reply.get("ok"):
                released += len((reply.get("result") or {}).get("released") or [])

        await each_bounded(bodies, one)
        self.last.tag_slots_released = released
        return released

    async def run_pass(self) -> ForemanPass:
        """One tick, in the foreman's order."""
        self.last = ForemanPass()
        pools = await self.workers_offline()
        await self.runs_of_lost_workers()
        await self.pools_not_ready(pools)
        await self.deployments_not_ready()
        await self.queues_not_ready()
        await self.deployment_leases_expired()
        await self.task_runs_of_ended_flow_runs()
        await self.runs_of_deleted_deployments()
        await self.tag_slots_of_gone_task_runs()
        self.passes += 1
        return self.last

    async def run(self) -> None:
        await every(self.interval, "foreman", self.run_pass)

