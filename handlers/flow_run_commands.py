"""The flow-run command table: what each command loads before its pure decider runs."""

from __future__ import annotations

import uuid
from collections.abc import Iterable
from datetime import UTC, datetime
from typing import Any

from runledger.commands import concurrency_limits as cl
from runledger.commands import deployment_runs as sc
from runledger.commands import deployments as dp
from runledger.commands import flow_runs as fr
from runledger.commands import flows as fl
from runledger.commands import slots as sl
from runledger.commands import subflows as sf
from runledger.commands import task_run_rules as task_rules
from runledger.commands import task_runs as tr
from runledger.commands import unique_keys as uk
from runledger.commands import work_pools as wp
from runledger.commands import workers as wk
from runledger.commands.decisions import Decision
from runledger.commands.messages import DecisionContext
from runledger.commands.states import State, StateCreate, StateType
from runledger.infra.aggregates import AggregateKind
from runledger.infra.log_index import LogIndex

from .command_bus import AggregateKey, CommandSpec, Unit
from .task_run_commands import load_task_run, tag_limits_of
from .work_pool_commands import pool_by_name

# Every event of a run, and of a pool's slot counts, carries the whole state: its last event
# is its state (one read to load it).
AGGREGATE_KINDS = [
    AggregateKind(fr.FLOW_RUN, lambda: None, fr.evolve, last_event_only=True, max_cached=fr.CACHED_RUNS),
    AggregateKind(sl.POOL_SLOTS, lambda: None, sl.evolve, last_event_only=True),
    AggregateKind(sl.LIMIT_WAITERS, lambda: None, sl.evolve_waiters, last_event_only=True),
]


async def pool_slots(unit: Unit, pool: wp.WorkPool) -> sl.PoolSlots:
    """A pool's slot counts, locked for the rest of the command (claims on one pool take turns)."""
    await unit.lock([(sl.POOL_SLOTS, sl.slots_id(pool.id))])
    return await unit.load(sl.POOL_SLOTS, sl.slots_id(pool.id)) or sl.PoolSlots(pool_id=pool.id)


async def initial_slots(unit: Unit, pool: wp.WorkPool | None, states: Iterable[StateCreate | None],
                        default: StateType) -> sl.PoolSlots | None:
    """The pool's counts when a create puts a run straight into a slot-holding state."""
    if pool is None or not any((s.type if s is not None else default) in sl.POOL_SLOT_STATES for s in states):
        return None
    return await pool_slots(unit, pool)


async def parent_task(unit: Unit, task_run_id: uuid.UUID, copied: StateCreate) -> sf.ParentTask | None:
    """A subflow's parent task run and what the forced rules that copy `copied` onto it read
    (None: no such task run). The task run is locked after the run's limits (`Unit.lock`'s
    order), and its tags' limits after it, as its own commands take them. A forced copy caches
    nothing (Prefect's minimal policy), unless the state is deferred and takes the background
    policy: only then are its cache key's entries loaded, to append the new one after them."""
    await unit.lock([(tr.TASK_RUN, str(task_run_id))])
    parent = await load_task_run(unit, task_run_id)
    if parent is None:
        return None
    flow_run = await unit.load(fr.FLOW_RUN, str(parent.flow_run_id)) if parent.flow_run_id is not None else None
    key = copied.state_details.cache_key
    cached = (await unit.load(tr.TASK_CACHE, tr.cache_id(key))
              if key is not None and copied.type is StateType.COMPLETED
              and task_rules.records_cache(copied, force=True) else None)
    return sf.ParentTask(run=parent, facts=(await tag_limits_of(unit, parent, copied, lock_global=False)).into(
        task_rules.TaskFacts(flow_run=flow_run, cached=cached)))


async def onto_parent_task(unit: Unit, decision: Decision, before: fr.FlowRun | None, run_id: str,
                           ctx: DecisionContext) -> Decision:
    """FR-6: a state written for a subflow is copied onto its parent task run in the same
    append (`subflows`)."""
    subflow = sf.state_written(decision, before, run_id)
    if subflow is None or subflow.parent_task_run_id is None:
        return decision
    parent = await parent_task(unit, subflow.parent_task_run_id, sf.parent_task_state(subflow))
    return sf.with_parent_task_state(decision, subflow, parent, ctx, created=before is None)


async def key_holder(unit: Unit, flow_id: uuid.UUID, idempotency_key: str
                     ) -> tuple[uk.UniqueKeyClaim, fr.FlowRun | None]:
    """Who holds a run's idempotency key within its flow, and that run: the key's claim, or
    (a schedule writes none) the scheduled run the key names (`fr.scheduled_run_of_key`). Only
    the claim is locked: a scheduled run is not a holder to take turns with, it is there or not."""
    claim = await unit.load(uk.UNIQUE_KEY, fr.key_of(flow_id, idempotency_key))
    if claim.owner_id is None and (scheduled_id := fr.scheduled_run_of_key(idempotency_key)) is not None:
        scheduled = await unit.load(fr.FLOW_RUN, str(scheduled_id))
        claim = fr.claim_of_scheduled_run(claim, scheduled, flow_id, idempotency_key)
    holder = await unit.load(fr.FLOW_RUN, str(claim.owner_id)) if claim.owner_id is not None else None
    return claim, holder


async def create_flow_run(unit: Unit, cmd: fr.CreateFlowRun, ctx: DecisionContext) -> Decision:
    claim = existing = None
    if cmd.idempotency_key is not None:
        claim, existing = await key_holder(unit, cmd.flow_id, cmd.idempotency_key)
    flow = await unit.load(fl.FLOW, str(cmd.flow_id))
    pool = await pool_by_name(unit, cmd.work_pool_name) if cmd.work_pool_name is not None else None
    inherited = None
    if flow is not None and existing is None:
        # A run naming a deployment inherits its labels; an unknown one, its flow's (as Prefect).
        deployment = await unit.load(dp.DEPLOYMENT, str(cmd.deployment_id)) if cmd.deployment_id is not None else None
        inherited = fr.inherited_labels(cmd.flow_id, flow.labels, deployment)
    decision = fr.decide_create_flow_run(cmd, claim, existing, flow is not None, pool, ctx, inherited)
    if not decision.created:
        return decision
    decision = sl.with_initial_slots(decision, await initial_slots(unit, pool, [cmd.state], StateType.PENDING))
    return await onto_parent_task(unit, decision, None, str(decision.result.id), ctx)


async def update_flow_run(unit: Unit, cmd: fr.UpdateFlowRun, ctx: DecisionContext) -> Decision:
    run = await unit.load(fr.FLOW_RUN, str(cmd.id))
    problem = None
    if run is not None and cmd.job_variables is not None and run.deployment_id is not None:
        # FR-8 checks new job variables as a run of the deployment would be checked (DP-15).
        deployment = await unit.load(dp.DEPLOYMENT, str(run.deployment_id))
        pool = (await pool_by_name(unit, deployment.work_pool_name)
                if deployment is not None and deployment.work_pool_name is not None else None)
        problem = sc.run_job_variables_problem(deployment, pool, cmd.job_variables)
    return fr.decide_update_flow_run(cmd, run, ctx, problem)




def _run_reply(run: fr.FlowRun) -> dict[str, Any]:
    return fr.flow_run_reply(run, datetime.now(UTC))


def _state_reply(state: State | None) -> dict[str, Any] | None:
    return state.reply() if state is not None else None


def _lease_reply(run: fr.FlowRun) -> dict[str, Any]:
    """The lease renewed, and when it runs out unless renewed again."""
    lease = sl.deployment_lease(run)
    return {"lease_id": str(lease) if lease else None,
            "expiration": run.model_dump(mode="json", include={"deployment_lease_expiration"})[
                "deployment_lease_expiration"]}


def _nothing(_: Any) -> None:
    return None


def _create_locks(cmd: fr.CreateFlowRun) -> Iterable[AggregateKey]:
    """A keyed create locks its key; an unkeyed one makes a new aggregate and locks nothing
    that another command could touch (its own id is not known yet)."""
    if cmd.idempotency_key is not None:
        return [(uk.UNIQUE_KEY, fr.key_of(cmd.flow_id, cmd.idempotency_key))]
    return []


def _by_id(cmd: Any) -> Iterable[AggregateKey]:
    return [(fr.FLOW_RUN, str(cmd.id))]


def command_specs(queues: LogIndex | None,
                  deployment_lease_seconds: float = sl.DEFAULT_DEPLOYMENT_LEASE_SECONDS,
                  handed_slot_seconds: float = sl.HANDED_SLOT_SECONDS) -> dict[str, CommandSpec]:
    """`queues`: where a run's queue id finds its pool (None only where nothing is executed).
    `deployment_lease_seconds`: how long a deployment slot's lease lasts while its run is
    PENDING, for deployments that name no grace period (Settings.deployment_slot_lease_seconds).
    `handed_slot_seconds`: how long a waiting run keeps the slots a release handed it
    (Settings.handed_slot_seconds)."""

    async def limits_of(unit: Unit, run: fr.FlowRun | None) -> sl.Limits:
        """The limits the run's transitions touch: its queue's pool and that pool's counts, and
        its deployment's limit, locked together (claims on one pool take turns). Loaded for
        every transition (from the cache, mostly): which rule needs them depends on what the
        rules decide."""
        if run is None:
            return sl.NO_LIMITS
        pool = deployment = None
        if run.work_queue_id is not None:
            assert queues is not None
            pool_id = await queues.lookup(str(run.work_queue_id))
            pool = await unit.load(wp.WORK_POOL, pool_id) if pool_id else None
            if pool_id is not None and pool is not None and run.work_queue_id not in pool.queues:
                # Deleted (its runs are in no pool: `slots.slot_events`), or created after this
                # instance cached the pool: the log tells which.
                pool = await unit.load(wp.WORK_POOL, pool_id, fresh=True)
        if run.deployment_id is not None:
            deployment = await unit.load(dp.DEPLOYMENT, str(run.deployment_id))
        limited = deployment is not None and deployment.concurrency_limit is not None
        limit_id = str(dp.limit_id(deployment.id)) if deployment is not None and limited else None
        # The limit and its waiters change together: both are locked (and chained) with it.
        await unit.lock([*([(sl.POOL_SLOTS, sl.slots_id(pool.id))] if pool is not None else []),
                         *([(cl.CONCURRENCY_LIMIT, limit_id), (sl.LIMIT_WAITERS, sl.waiters_id(uuid.UUID(limit_id)))]
                           if limit_id is not None else [])])
        slots = None
        if pool is not None:
            slots = await unit.load(sl.POOL_SLOTS, sl.slots_id(pool.id)) or sl.PoolSlots(pool_id=pool.id)
        if deployment is None:
            return sl.Limits(pool=pool, slots=slots, deployment_found=run.deployment_id is None,
                             handed_slot_seconds=handed_slot_seconds)
        limit = waiters = None
        first_waiters: dict[uuid.UUID, fr.FlowRun | None] = {}
        if limit_id is not None:
            limit = await unit.load(cl.CONCURRENCY_LIMIT, limit_id)
        if limit is not None:
            waiters = (await unit.load(sl.LIMIT_WAITERS, sl.waiters_id(limit.id))
                       or sl.LimitWaiters(limit_id=limit.id))
            if sl.deployment_lease(run) is not None:  # this transition may give the slot back
                for waiter_id in waiters.run_ids[:sl.WAKE_LOOKAHEAD]:
                    first_waiters[waiter_id] = await unit.load(fr.FLOW_RUN, str(waiter_id))
        options = deployment.concurrency_options
        return sl.Limits(pool=pool, slots=slots, deployment_limit=limit,
                         collision_strategy=options.collision_strategy.value if options else "ENQUEUE",
                         lease_seconds=(options.grace_period_seconds if options and options.grace_period_seconds
                                        else deployment_lease_seconds),
                         handed_slot_seconds=handed_slot_seconds,
                         waiters=waiters, first_waiters=first_waiters)

    async def set_flow_run_state(unit: Unit, cmd: fr.SetFlowRunState, ctx: DecisionContext) -> Decision:
        run = await unit.load(fr.FLOW_RUN, str(cmd.id))
        decision = fr.decide_set_state(cmd, run, ctx, await limits_of(unit, run))
        return await onto_parent_task(unit, decision, run, str(cmd.id), ctx)

    async def mark_flow_run_late(unit: Unit, cmd: fr.MarkFlowRunLate, ctx: DecisionContext) -> Decision:
        run = await unit.load(fr.FLOW_RUN, str(cmd.id))
        decision = fr.decide_mark_late(cmd, run, ctx, await limits_of(unit, run))
        return await onto_parent_task(unit, decision, run, str(cmd.id), ctx)

    async def deletion_inputs(unit: Unit, run: fr.FlowRun | None) -> tuple[uk.UniqueKeyClaim | None, sl.Limits]:
        """What a run's deletion writes to besides the run: its idempotency key's claim (released
        in the same batch, so loaded for its expected sequence) and its limits."""
        claim = None
        if run is not None and run.idempotency_key is not None:
            claim = await unit.load(uk.UNIQUE_KEY, fr.key_of(run.flow_id, run.idempotency_key))
        return claim, await limits_of(unit, run)

    async def delete_flow_run(unit: Unit, cmd: fr.DeleteFlowRun, ctx: DecisionContext) -> Decision:
        run = await unit.load(fr.FLOW_RUN, str(cmd.id))
        claim, limits = await deletion_inputs(unit, run)
        return fr.decide_delete_flow_run(cmd, run, claim, ctx, limits)

    async def delete_finished_flow_run(unit: Unit, cmd: fr.DeleteFinishedFlowRun, ctx: DecisionContext) -> Decision:
        """A subflow run's parent is looked for in the log: the vacuum found it gone in a read
        model that may lag behind the runs' (a rebuild under way)."""
        run = await unit.load(fr.FLOW_RUN, str(cmd.id))
        parent = (await load_task_run(unit, run.parent_task_run_id)
                  if run is not None and run.parent_task_run_id is not None else None)
        claim, limits = await deletion_inputs(unit, run)
        return fr.decide_delete_finished_flow_run(cmd, run, claim, ctx, limits, parent_exists=parent is not None)

    async def delete_run_of_deleted_deployment(unit: Unit, cmd: dp.DeleteRunOfDeletedDeployment,
                                               ctx: DecisionContext) -> Decision:
        """The deployment is read from the log (`fresh`), whatever this instance's cache holds:
        the decision writes nothing to it, so no expected-sequence check would catch a cache
        that missed its deletion on another instance. Its sequence tells a deleted deployment
        (its log has events) from one never created (none)."""
        run = await unit.load(fr.FLOW_RUN, str(cmd.id))
        deployment = await unit.load(dp.DEPLOYMENT, str(cmd.deployment_id), fresh=True)
        in_log = unit.loaded[(dp.DEPLOYMENT, str(cmd.deployment_id))] != 0
        claim, limits = await deletion_inputs(unit, run)
        return dp.decide_delete_run_of_deleted_deployment(cmd, run, deployment, in_log, claim, ctx, limits)

    async def crash_run_of_lost_worker(unit: Unit, cmd: fr.CrashFlowRunOfLostWorker,
                                       ctx: DecisionContext) -> Decision:
        run = await unit.load(fr.FLOW_RUN, str(cmd.id))
        limits = await limits_of(unit, run)
        pool = limits.pool
        worker = await unit.load(wk.WORKER, str(wk.worker_id(pool.id, cmd.worker_name))) if pool is not None else None
        online = worker is not None and worker.status is wk.WorkerStatus.ONLINE
        decision = fr.decide_crash_run_of_lost_worker(cmd, run, online, pool.name if pool else "", ctx, limits)
        return await onto_parent_task(unit, decision, run, str(cmd.id), ctx)

    async def expire_deployment_slot_lease(unit: Unit, cmd: fr.ExpireDeploymentSlotLease,
                                           ctx: DecisionContext) -> Decision:
        run = await unit.load(fr.FLOW_RUN, str(cmd.id))
        decision = fr.decide_expire_deployment_slot_lease(cmd, run, ctx, await limits_of(unit, run))
        return await onto_parent_task(unit, decision, run, str(cmd.id), ctx)

    async def renew_deployment_slot_lease(unit: Unit, cmd: fr.RenewDeploymentSlotLease,
                                          ctx: DecisionContext) -> Decision:
        return fr.decide_renew_deployment_slot_lease(cmd, await unit.load(fr.FLOW_RUN, str(cmd.id)), ctx)

    return {
        "CreateFlowRun": CommandSpec(fr.CreateFlowRun, create_flow_run, _run_reply, _create_locks),
        "CrashFlowRunOfLostWorker": CommandSpec(fr.CrashFlowRunOfLostWorker, crash_run_of_lost_worker, _state_reply,
                                                _by_id),
        "SetFlowRunState": CommandSpec(fr.SetFlowRunState, set_flow_run_state, _state_reply, _by_id),
        "MarkFlowRunLate": CommandSpec(fr.MarkFlowRunLate, mark_flow_run_late, _state_reply, _by_id),
        "ExpireDeploymentSlotLease": CommandSpec(fr.ExpireDeploymentSlotLease, expire_deployment_slot_lease,
                                                 _state_reply, _by_id),
        "RenewDeploymentSlotLease": CommandSpec(fr.RenewDeploymentSlotLease, renew_deployment_slot_lease,
                                                _lease_reply, _by_id),
        "UpdateFlowRun": CommandSpec(fr.UpdateFlowRun, update_flow_run, _nothing, _by_id),
        "DeleteFlowRun": CommandSpec(fr.DeleteFlowRun, delete_flow_run, _nothing, _by_id),
        "DeleteFinishedFlowRun": CommandSpec(fr.DeleteFinishedFlowRun, delete_finished_flow_run, _nothing, _by_id),
        "DeleteRunOfDeletedDeployment": CommandSpec(dp.DeleteRunOfDeletedDeployment, delete_run_of_deleted_deployment,
                                                    _nothing, _by_id),
    }
