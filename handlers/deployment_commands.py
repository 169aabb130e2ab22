"""The deployment command table: what each command loads before its pure decider runs."""

from __future__ import annotations

import asyncio
import dataclasses
import uuid
from collections.abc import Callable, Iterable
from datetime import UTC, datetime
from typing import Any

from pydantic import TypeAdapter

from runledger.commands import concurrency_limits as cl
from runledger.commands import deployment_runs as sc
from runledger.commands import deployments as dp
from runledger.commands import flow_runs as fr
from runledger.commands import flows as fl
from runledger.commands import hydration
from runledger.commands import slots as sl
from runledger.commands import subflows as sf
from runledger.commands import tag_concurrency_limits as tcl
from runledger.commands import task_runs as tr
from runledger.commands import unique_keys as uk
from runledger.commands import variables as va
from runledger.commands import work_pools as wp
from runledger.commands.decisions import Decision
from runledger.commands.messages import DecisionContext
from runledger.commands.states import StateCreate, StateType
from runledger.infra.aggregates import AggregateKind, SnapshotCodec

from .command_bus import AggregateKey, CommandSpec, Unit
from .flow_run_commands import initial_slots, key_holder, onto_parent_task, parent_task
from .task_run_commands import load_task_run
from .work_pool_commands import pool_by_name

# Every event of a deployment carries the whole deployment: its last event is its state.
# The index of a deployment's scheduled runs is a fold of small events, snapshotted when long
# (version 2: the index holds the deployment's `revision`).
_INDEX = TypeAdapter(dp.ScheduledRunIndex)
INDEX_SNAPSHOTS = SnapshotCodec(version=2, dump=lambda index: _INDEX.dump_python(index, mode="json"),
                                load=_INDEX.validate_python)
AGGREGATE_KINDS = [
    AggregateKind(dp.DEPLOYMENT, lambda: None, dp.evolve, last_event_only=True),
    # Each index holds a deployment's future scheduled runs (~0.8 KB each in memory): bounded by
    # runs held, so that a million runs scheduled ahead cannot fill the service's memory
    # (bench/history_memory.py); an index left out is loaded again from its snapshot.
    AggregateKind(dp.DEPLOYMENT_RUNS, dp.ScheduledRunIndex, dp.evolve_index, snapshots=INDEX_SNAPSHOTS,
                  weight=lambda index: 1 + len(index.runs), max_weight=dp.CACHED_INDEXED_RUNS),
]


async def _deployment(unit: Unit, deployment_id: uuid.UUID, *, fresh: bool = False) -> dp.Deployment | None:
    """The deployment as its commands see it: without a queue deleted since (WP-9), which the
    pool it names, loaded by name, tells (`dp.without_deleted_queue`). `fresh`: read from the
    log whatever this instance's cache holds."""
    deployment = await unit.load(dp.DEPLOYMENT, str(deployment_id), fresh=fresh)
    if deployment is None or deployment.work_queue_id is None:
        return deployment
    pool = await pool_by_name(unit, deployment.work_pool_name) if deployment.work_pool_name is not None else None
    return dp.without_deleted_queue(deployment, pool)


async def _limit(unit: Unit, deployment_id: uuid.UUID) -> dp.LimitState:
    """The deployment's global limit and its name's claim (loaded for their expected sequences)."""
    limit = await unit.load(cl.CONCURRENCY_LIMIT, str(dp.limit_id(deployment_id)))
    claim = await unit.load(uk.UNIQUE_KEY, cl.CONCURRENCY_LIMIT_NAME.aggregate_id(dp.limit_name(deployment_id)))
    return dp.LimitState(limit=limit, claim=claim)


async def _indexed(unit: Unit, deployment_id: uuid.UUID, only: Callable[[dp.ScheduledRunIndex], list[uuid.UUID]]
                   | None = None) -> dp.IndexedRuns:
    """The deployment's index of scheduled runs and those runs (all, or the ones `only`
    names), read side by side."""
    index = await unit.load(dp.DEPLOYMENT_RUNS, dp.index_id(deployment_id))
    ids = only(index) if only is not None else list(index.runs)
    runs = await asyncio.gather(*(unit.load(fr.FLOW_RUN, str(i)) for i in ids))
    return dp.IndexedRuns(index=index, runs=dict(zip(ids, runs, strict=True)))


async def _placement(unit: Unit, pool_name: str | None, queue_name: str | None) -> dp.Placement:
    """The pools DP-3 may read: the named pool, or the legacy pool for a bare queue name."""
    if pool_name is not None:
        claim = await unit.load(wp.WORK_POOL_NAME, wp.name_aggregate_id(pool_name))
        pool = await unit.load(wp.WORK_POOL, str(claim.work_pool_id)) if claim.work_pool_id else None
        return dp.Placement(pool=pool)
    if queue_name is not None:
        claim = await unit.load(wp.WORK_POOL_NAME, wp.name_aggregate_id(wp.LEGACY_POOL_NAME))
        pool = await unit.load(wp.WORK_POOL, str(claim.work_pool_id)) if claim.work_pool_id else None
        return dp.Placement(legacy_claim=claim, legacy_pool=pool)
    return dp.Placement()


async def create_deployment(unit: Unit, cmd: dp.CreateDeployment, ctx: DecisionContext) -> Decision:
    claim = await unit.load(uk.UNIQUE_KEY, dp.name_key(cmd.flow_id, cmd.name))
    existing = await _deployment(unit, claim.owner_id) if claim.owner_id is not None else None
    flow = await unit.load(fl.FLOW, str(cmd.flow_id))
    placement = await _placement(unit, cmd.work_pool_name, cmd.work_queue_name)
    indexed = await _indexed(unit, existing.id) if existing is not None else dp.IndexedRuns()
    limit = await _limit(unit, existing.id) if existing is not None else dp.LimitState()
    return dp.decide_create_deployment(cmd, claim, existing, flow is not None, placement, ctx, indexed, limit,
                                       flow_labels=flow.labels if flow is not None else None)


async def update_deployment(unit: Unit, cmd: dp.UpdateDeployment, ctx: DecisionContext) -> Decision:
    deployment = await _deployment(unit, cmd.id)
    placement = await _placement(unit, cmd.work_pool_name, cmd.work_queue_name) if deployment else dp.Placement()
    indexed = await _indexed(unit, cmd.id) if deployment is not None else dp.IndexedRuns()
    variables = await _variables(unit, cmd.parameters) if "parameters" in cmd.explicitly_set() else {}
    limit = await _limit(unit, cmd.id) if "concurrency_limit" in cmd.explicitly_set() else dp.LimitState()
    return dp.decide_update_deployment(cmd, deployment, placement, ctx, indexed, variables, limit)


async def delete_deployment(unit: Unit, cmd: dp.DeleteDeployment, ctx: DecisionContext) -> Decision:
    deployment = await _deployment(unit, cmd.id)
    # The claim is released in the same batch: it must be loaded, for its expected sequence.
    claim = (await unit.load(uk.UNIQUE_KEY, dp.name_key(deployment.flow_id, deployment.name))
             if deployment is not None else None)
    indexed = await _indexed(unit, cmd.id) if deployment is not None else dp.IndexedRuns()
    limit = await _limit(unit, cmd.id) if deployment is not None else dp.LimitState()
    return dp.decide_delete_deployment(cmd, deployment, claim, ctx, indexed, limit)


async def pause_deployment(unit: Unit, cmd: dp.PauseDeployment, ctx: DecisionContext) -> Decision:
    deployment = await _deployment(unit, cmd.id)
    indexed = await _indexed(unit, cmd.id) if deployment is not None else dp.IndexedRuns()
    return dp.decide_set_paused(cmd.id, True, deployment, ctx, indexed)


async def _index(unit: Unit, deployment_id: uuid.UUID) -> dp.IndexedRuns:
    """The deployment's index alone, without its runs: a change that deletes none still notes
    itself there (`dp.revised`), appended with the index's expected sequence."""
    return dp.IndexedRuns(index=await unit.load(dp.DEPLOYMENT_RUNS, dp.index_id(deployment_id)))


async def resume_deployment(unit: Unit, cmd: dp.ResumeDeployment, ctx: DecisionContext) -> Decision:
    deployment = await _deployment(unit, cmd.id)
    indexed = await _index(unit, cmd.id) if deployment is not None else dp.IndexedRuns()
    return dp.decide_set_paused(cmd.id, False, deployment, ctx, indexed)


async def create_schedules(unit: Unit, cmd: dp.CreateDeploymentSchedules, ctx: DecisionContext) -> Decision:
    deployment = await _deployment(unit, cmd.deployment_id)
    if deployment is not None:
        await _index(unit, cmd.deployment_id)  # for its expected sequence: the decision notes itself there
    return dp.decide_create_schedules(cmd, deployment, ctx)


async def update_schedule(unit: Unit, cmd: dp.UpdateDeploymentSchedule, ctx: DecisionContext) -> Decision:
    deployment = await _deployment(unit, cmd.deployment_id)
    indexed = await _indexed(unit, cmd.deployment_id) if deployment is not None else dp.IndexedRuns()
    return dp.decide_update_schedule(cmd, deployment, ctx, indexed)


async def delete_schedule(unit: Unit, cmd: dp.DeleteDeploymentSchedule, ctx: DecisionContext) -> Decision:
    deployment = await _deployment(unit, cmd.deployment_id)
    indexed = await _indexed(unit, cmd.deployment_id) if deployment is not None else dp.IndexedRuns()
    return dp.decide_delete_schedule(cmd, deployment, ctx, indexed)


async def schedule_runs(unit: Unit, cmd: sc.ScheduleDeploymentRuns, ctx: DecisionContext) -> Decision:
    """A date whose run exists is skipped. The runs of the planned dates the deployment's index
    holds (scheduled before) are read at once, one direct get each, side by side; a date the
    index does not hold is presumed new, without a read (`Unit.load`): its run's append checks
    that the run does not exist, and when it does (a run that left the index because it ran
    early, or was deleted), the command is decided again on the log.

    The index is read first, then the deployment: a copy of the deployment other than the one
    the index last noted (this instance's cache, older than a change another instance made) is
    read again from the log (`dp.follows`). The runs are appended with the index's expected
    sequence, so a change of the deployment landing meanwhile (it notes itself in the index)
    sends the command back to be decided on the log."""
    index = await unit.load(dp.DEPLOYMENT_RUNS, dp.index_id(cmd.deployment_id))
    deployment = await _deployment(unit, cmd.deployment_id)
    if not dp.follows(index, deployment):
        deployment = await _deployment(unit, cmd.deployment_id, fresh=True)
    planned = sc.planned_runs(deployment, cmd, ctx.now) if deployment is not None else []
    indexed_ids = [p.run_id for p in planned if p.run_id in index.runs]
    runs = await asyncio.gather(*(unit.load(fr.FLOW_RUN, str(i)) for i in indexed_ids))
    existing = dict(zip(indexed_ids, runs, strict=True))
    new = 0
    for p in planned:  # presumed new: no read, so no task of its own either
        if p.run_id not in existing:
            existing[p.run_id] = await unit.load(fr.FLOW_RUN, str(p.run_id), presumed_new=True)
        new += existing[p.run_id] is None
        if new == sc.MAX_RUNS_PER_COMMAND:  # the decider makes no more (`sc.to_create`)
            break
    indexed = (await _indexed(unit, cmd.deployment_id, lambda index: sc.past_runs(index, ctx.now))
               if deployment is not None else dp.IndexedRuns())
    return sc.decide_schedule_runs(deployment, planned, existing, ctx, indexed)


async def _variables(unit: Unit, *parameters: Any) -> dict[str, Any]:
    """The values of the workspace variables the parameters name (missing ones left out)."""
    names = sorted({n for p in parameters for n in hydration.variable_names(p)})
    variables: dict[str, Any] = {}
    if not names:  # most runs: not even an empty gather (each asks the loop for itself)
        return variables
    for name, claim in zip(names, await asyncio.gather(
            *(unit.load(uk.UNIQUE_KEY, va.VARIABLE_NAME.aggregate_id(n)) for n in names)), strict=True):
        variable = await unit.load(va.VARIABLE, str(claim.owner_id)) if claim.owner_id is not None else None
        if variable is not None:
            variables[name] = variable.value
    return variables


async def _run_inputs(unit: Unit, deployment: dp.Deployment,
                      items: list[sc.FlowRunFromDeployment]) -> sc.RunInputs:
    """The deployment's pool, the variables the parameters name, and the claims of the
    idempotency keys given, read side by side."""
    pool = await pool_by_name(unit, deployment.work_pool_name) if deployment.work_pool_name is not None else None
    variables = await _variables(unit, *({**deployment.parameters, **item.parameters} for item in items))
    keys = sorted({item.idempotency_key for item in items if item.idempotency_key is not None})
    claims = {}
    for key in keys:
        claims[key] = await key_holder(unit, deployment.flow_id, key)
    return sc.RunInputs(pool=pool, variables=variables, claims=claims)


async def create_run(unit: Unit, cmd: sc.CreateFlowRunFromDeployment, ctx: DecisionContext) -> Decision:
    deployment = await _deployment(unit, cmd.deployment_id)
    inputs = await _run_inputs(unit, deployment, [cmd]) if deployment is not None else sc.RunInputs()
    decision = sc.decide_run_from_deployment(cmd, deployment, inputs, ctx)
    decision = sl.with_initial_slots(decision, await initial_slots(unit, inputs.pool, [cmd.state], StateType.SCHEDULED))
    if not decision.created:
        return decision
    # A subflow run from a deployment (Prefect's `run_deployment` inside a task) stands for
    # that task run too, from its first state on.
    return await onto_parent_task(unit, decision, None, str(decision.result.id), ctx)


async def _parent_tasks(unit: Unit, items: list[sc.FlowRunFromDeployment]) -> dict[uuid.UUID, sf.ParentTask | None]:
    """The parent task runs the items name, by id (None: no such task run), each with what the
    forced copy of the first item naming it reads (a later item's copy applies on top, decided
    by the decider). The task runs are locked at once, then the limits of all their tags at
    once, so that two commands with several parents each take them in one order."""
    firsts: dict[uuid.UUID, StateCreate] = {}
    for item in items:
        if item.parent_task_run_id is not None and item.parent_task_run_id not in firsts:
            firsts[item.parent_task_run_id] = item.state or StateCreate(type=StateType.SCHEDULED)
    if not firsts:
        return {}
    await unit.lock([(tr.TASK_RUN, str(i)) for i in firsts])
    runs = [await load_task_run(unit, i) for i in sorted(firsts)]
    await unit.lock([(tcl.TAG_CONCURRENCY_LIMIT, tcl.limit_id(tag)) for run in runs if run is not None
                     for tag in run.tags])
    return {i: await parent_task(unit, i, firsts[i]) for i in sorted(firsts)}


async def create_runs(unit: Unit, cmd: sc.CreateFlowRunsFromDeployment, ctx: DecisionContext) -> Decision:
    deployment = await _deployment(unit, cmd.deployment_id)
    inputs = await _run_inputs(unit, deployment, cmd.runs) if deployment is not None else sc.RunInputs()
    # The pool's slots are locked before the parent task runs, as the single form takes them.
    slots = await initial_slots(unit, inputs.pool, [item.state for item in cmd.runs], StateType.SCHEDULED)
    if deployment is not None:  # FR-6, as `create_run`: each subflow stands for its parent task run
        inputs = dataclasses.replace(inputs, parent_tasks=await _parent_tasks(unit, cmd.runs))
    decision = sc.decide_runs_from_deployment(cmd, deployment, inputs, ctx)
    return sl.with_initial_slots(decision, slots)


def _deployment_reply(deployment: dp.Deployment) -> dict[str, Any]:
    return deployment.reply()


def _schedules_reply(schedules: list[dp.DeploymentSchedule]) -> list[dict[str, Any]]:
    return [s.model_dump(mode="json") for s in schedules]


def _run_ids_reply(run_ids: list[Any]) -> dict[str, Any]:
    return {"flow_run_ids": [str(i) for i in run_ids]}


def _run_reply(run: fr.FlowRun) -> dict[str, Any]:
    return fr.flow_run_reply(run, datetime.now(UTC))


def _as_is(result: Any) -> Any:
    return result


def _nothing(_: Any) -> None:
    return None


def _pool_locks(cmd: dp.CreateDeployment | dp.UpdateDeployment) -> list[AggregateKey]:
    """A deployment may create a queue in the pool it names (DP-3): it locks that pool's name,
    as the pool's own commands do."""
    if cmd.work_pool_name is not None:
        return [(wp.WORK_POOL_NAME, cmd.work_pool_name)]
    if cmd.work_queue_name is not None:
        return [(wp.WORK_POOL_NAME, wp.LEGACY_POOL_NAME)]
    return []


def _create_locks(cmd: dp.CreateDeployment) -> Iterable[AggregateKey]:
    return [(uk.UNIQUE_KEY, dp.name_key(cmd.flow_id, cmd.name)), *_pool_locks(cmd)]


def _update_locks(cmd: dp.UpdateDeployment) -> Iterable[AggregateKey]:
    return [(dp.DEPLOYMENT, str(cmd.id)), *_pool_locks(cmd)]


def _run_locks(cmd: sc.CreateFlowRunFromDeployment | sc.CreateFlowRunsFromDeployment) -> Iterable[AggregateKey]:
    """Runs with one idempotency key take turns (the key's claim is an aggregate of the run's
    flow, which is known only once the deployment is read: the lock is named by deployment and
    key, which determine it); so do runs that may create a queue in the deployment's pool. Runs
    without either lock nothing: each is a new aggregate."""
    items = cmd.runs if isinstance(cmd, sc.CreateFlowRunsFromDeployment) else [cmd]
    keys: list[AggregateKey] = [("deployment_run_key", f"{cmd.deployment_id}/{item.idempotency_key}")
                                for item in items if item.idempotency_key is not None]
    if any(item.work_queue_name is not None for item in items):
        keys.append((dp.DEPLOYMENT, str(cmd.deployment_id)))
    return keys


def _by_id(cmd: Any) -> Iterable[AggregateKey]:
    return [(dp.DEPLOYMENT, str(cmd.id))]


def _by_deployment_id(cmd: Any) -> Iterable[AggregateKey]:
    return [(dp.DEPLOYMENT, str(cmd.deployment_id))]


COMMANDS = {
    "CreateDeployment": CommandSpec(dp.CreateDeployment, create_deployment, _deployment_reply, _create_locks),
    "UpdateDeployment": CommandSpec(dp.UpdateDeployment, update_deployment, _deployment_reply, _update_locks),
    "DeleteDeployment": CommandSpec(dp.DeleteDeployment, delete_deployment, _nothing, _by_id),
    "PauseDeployment": CommandSpec(dp.PauseDeployment, pause_deployment, _nothing, _by_id),
    "ResumeDeployment": CommandSpec(dp.ResumeDeployment, resume_deployment, _nothing, _by_id),
    "CreateDeploymentSchedules": CommandSpec(dp.CreateDeploymentSchedules, create_schedules, _schedules_reply,
                                             _by_deployment_id),
    "UpdateDeploymentSchedule": CommandSpec(dp.UpdateDeploymentSchedule, update_schedule, _nothing,
                                            _by_deployment_id),
    "CreateFlowRunFromDeployment": CommandSpec(sc.CreateFlowRunFromDeployment, create_run, _run_reply, _run_locks),
    "CreateFlowRunsFromDeployment": CommandSpec(sc.CreateFlowRunsFromDeployment, create_runs, _as_is, _run_locks),
    "ScheduleDeploymentRuns": CommandSpec(sc.ScheduleDeploymentRuns, schedule_runs, _run_ids_reply,
                                          _by_deployment_id),
    "DeleteDeploymentSchedule": CommandSpec(dp.DeleteDeploymentSchedule, delete_schedule, _nothing,
                                            _by_deployment_id),
}
