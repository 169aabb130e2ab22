"""The one list of what runledger runs: aggregate kinds, commands, queries and projectors
(what reacts to decisions: see the note below the projectors). The service, the broker contract (AsyncAPI), replay and verify, the broker's
permissions (one consumer per projector) and the benchmarks all read it, so adding an
aggregate is one module of rules, one of commands, one read model, and a line each here.

Tables and migrations stay with their read models (`projections/tables.py`): the schema's
history is ordered, and its versions must not depend on the order of this list.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

from runledger.commands.slots import DEFAULT_DEPLOYMENT_LEASE_SECONDS, HANDED_SLOT_SECONDS
from runledger.infra.aggregates import AggregateKind
from runledger.infra.event_store import EventStore
from runledger.projections import concurrency_limits as concurrency_limits_read_model
from runledger.projections import deployments as deployments_read_model
from runledger.projections import flow_runs as flow_runs_read_model
from runledger.projections import flows as flows_read_model
from runledger.projections import scheduled_runs as scheduled_runs_read_model
from runledger.projections import tag_concurrency_limits as tag_concurrency_limits_read_model
from runledger.projections import task_runs as task_runs_read_model
from runledger.projections import variables as variables_read_model
from runledger.projections import work_pools as work_pools_read_model
from runledger.projections import workers as workers_read_model
from runledger.projections.runner import Projector

from . import (
    concurrency_limit_commands,
    deployment_commands,
    flow_commands,
    flow_run_commands,
    tag_concurrency_limit_commands,
    task_run_commands,
    variable_commands,
    work_pool_commands,
    worker_commands,
    worker_polls,
)
from .command_bus import BulkSpec, CommandSpec

AGGREGATE_KINDS: list[AggregateKind] = [
    *work_pool_commands.AGGREGATE_KINDS,
    *flow_commands.AGGREGATE_KINDS,
    *deployment_commands.AGGREGATE_KINDS,
    *flow_run_commands.AGGREGATE_KINDS,
    *task_run_commands.AGGREGATE_KINDS,
    *tag_concurrency_limit_commands.AGGREGATE_KINDS,
    *variable_commands.AGGREGATE_KINDS,
    *concurrency_limit_commands.AGGREGATE_KINDS,
    *worker_commands.AGGREGATE_KINDS,
    *worker_polls.AGGREGATE_KINDS,
]

# Each read model's projector, made fresh per runner (projectors may keep per-run state).
PROJECTORS: list[Callable[[], Projector]] = [
    work_pools_read_model.WorkPoolsProjector,
    flows_read_model.FlowsProjector,
    deployments_read_model.DeploymentsProjector,
    flow_runs_read_model.FlowRunsProjector,
    variables_read_model.VariablesProjector,
    concurrency_limits_read_model.ConcurrencyLimitsProjector,
    workers_read_model.WorkersProjector,
    task_runs_read_model.TaskRunsProjector,
    tag_concurrency_limits_read_model.TagConcurrencyLimitsProjector,
]

# What reacts to decisions is not a list of event consumers, each where it is cheapest and
# safest: waking a slot's next waiter is part of the release's own decision (same atomic batch,
# commands/flow_runs.waiter_events); queuing a task run and announcing a finished one follow
# the append in the command bus (`CommandBus.after_append`: handlers/task_dispatch.TaskDispatch),
# with a leased sweep for what an outage left unpublished (TaskRecovery, role `task_recovery`);
# crashing a lost worker's runs is the foreman's (handlers/foreman.py, leased).

# Query name -> (request model, handler(conn, query)). The health query is added by the
# service: it reads the service's own runner and the stream.
QUERIES: dict[str, tuple[Any, Any]] = {
    **work_pools_read_model.QUERIES,
    **flows_read_model.QUERIES,
    **deployments_read_model.QUERIES,
    **flow_runs_read_model.QUERIES,
    **variables_read_model.QUERIES,
    **concurrency_limits_read_model.QUERIES,
    **workers_read_model.QUERIES,
    **task_runs_read_model.QUERIES,
    **tag_concurrency_limits_read_model.QUERIES,
    # The service serves these (and the runner poll, GetScheduledFlowRunsForDeployments) with
    # their side effect (a poll is recorded): handlers/worker_polls.py.
    **scheduled_runs_read_model.QUERIES,
}


def command_specs(store: EventStore | None,
                  takeover_allowed: Callable[[], bool] = lambda: True,
                  bound_task_workers: Mapping[str, Sequence[str]] | None = None,
                  deployment_lease_seconds: float = DEFAULT_DEPLOYMENT_LEASE_SECONDS,
                  handed_slot_seconds: float = HANDED_SLOT_SECONDS) -> dict[str, CommandSpec | BulkSpec]:
    """Command name -> spec. `store`: what commands that find their aggregate through the log
    read it from (None where nothing runs, e.g. for the contract's schemas). `takeover_allowed`:
    whether a task worker may take over a run another holds now (not just after a broker
    restart). `bound_task_workers`: the task workers bound to keys (Settings.task_worker_keys).
    `deployment_lease_seconds`, `handed_slot_seconds`: the settings of those names (the first
    is `deployment_slot_lease_seconds`)."""
    queues = work_pool_commands.queue_index(store) if store is not None else None
    return {
        **work_pool_commands.command_specs(queues),
        **flow_commands.COMMANDS,
        **deployment_commands.COMMANDS,
        **flow_run_commands.command_specs(queues, deployment_lease_seconds, handed_slot_seconds),
        **task_run_commands.command_specs(takeover_allowed, bound_task_workers),
        **tag_concurrency_limit_commands.COMMANDS,
        **variable_commands.COMMANDS,
        **concurrency_limit_commands.COMMANDS,
        **worker_commands.COMMANDS,
        **worker_polls.COMMANDS,
    }


def projectors() -> list[Projector]:
    return [make() for make in PROJECTORS]
