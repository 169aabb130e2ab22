"""The flow-run command table: what each command loads before its pure decider runs."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from runledger.commands import deployment_runs as sc
from runledger.commands import deployments as dp
from runledger.commands import flow_runs as fr
from runledger.commands import flows as fl
from runledger.commands import unique_keys as uk
from runledger.commands.decisions import Decision
from runledger.commands.messages import DecisionContext
from runledger.commands.states import State
from runledger.infra.aggregates import AggregateKind

from .command_bus import AggregateKey, CommandSpec, Unit
from .work_pool_commands import pool_by_name

# Every event of a run carries the whole run: its last event is its state (one read to load it).
AGGREGATE_KINDS = [AggregateKind(fr.FLOW_RUN, lambda: None, fr.evolve, last_event_only=True)]


async def create_flow_run(unit: Unit, cmd: fr.CreateFlowRun, ctx: DecisionContext) -> Decision:
    claim = existing = None
    if cmd.idempotency_key is not None:
        claim = await unit.load(uk.UNIQUE_KEY, fr.key_of(cmd.flow_id, cmd.idempotency_key))
        if claim.owner_id is not None:
            existing = await unit.load(fr.FLOW_RUN, str(claim.owner_id))
    flow = await unit.load(fl.FLOW, str(cmd.flow_id))
    pool = await pool_by_name(unit, cmd.work_pool_name) if cmd.work_pool_name is not None else None
    return fr.decide_create_flow_run(cmd, claim, existing, flow is not None, pool, ctx)


async def set_flow_run_state(unit: Unit, cmd: fr.SetFlowRunState, ctx: DecisionContext) -> Decision:
    return fr.decide_set_state(cmd, await unit.load(fr.FLOW_RUN, str(cmd.id)), ctx)


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


async def delete_flow_run(unit: Unit, cmd: fr.DeleteFlowRun, ctx: DecisionContext) -> Decision:
    run = await unit.load(fr.FLOW_RUN, str(cmd.id))
    claim = None
    if run is not None and run.idempotency_key is not None:
        claim = await unit.load(uk.UNIQUE_KEY, fr.key_of(run.flow_id, run.idempotency_key))
    return fr.decide_delete_flow_run(cmd, run, claim, ctx)


def _run_reply(run: fr.FlowRun) -> dict[str, Any]:
    return run.model_dump(mode="json")


def _state_reply(state: State | None) -> dict[str, Any] | None:
    return state.reply() if state is not None else None


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


COMMANDS = {
    "CreateFlowRun": CommandSpec(fr.CreateFlowRun, create_flow_run, _run_reply, _create_locks),
    "SetFlowRunState": CommandSpec(fr.SetFlowRunState, set_flow_run_state, _state_reply, _by_id),
    "UpdateFlowRun": CommandSpec(fr.UpdateFlowRun, update_flow_run, _nothing, _by_id),
    "DeleteFlowRun": CommandSpec(fr.DeleteFlowRun, delete_flow_run, _nothing, _by_id),
}
