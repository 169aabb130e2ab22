"""Runs made from a deployment: on demand (`CreateFlowRunFromDeployment`, one or a bulk of
them) and by its schedules (`ScheduleDeploymentRuns`: the dates its active schedules give, one
`Scheduled` run per date).

Each run's id is derived from (deployment, schedule, date) (`schedules.scheduled_run_id`): a
date scheduled twice — two scheduler passes, two scheduler instances, a retried command — is
the same run aggregate, and its creation is appended with the check that it does not exist
yet, so a duplicate cannot be written (Prefect relies on a unique index over an idempotency
key for this, and users still see duplicates around redeploys). The run also carries
Prefect's idempotency key, `scheduled <deployment> <schedule> <date>`, for its readers.

A run scheduled and later deleted (an upsert deletes the future ones) may be scheduled again:
it is created anew on the same aggregate.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Annotated, Any, ClassVar

from pydantic import BaseModel, ConfigDict, Field

from . import flow_runs as fr
from . import orchestration_rules
from . import subflows as sf
from . import work_pools as wp
from .bounds import JsonDocument, SizedParameters, StoredText, UtcDatetime
from .decisions import Decision, NewEvent
from .deployments import (
    Deployment,
    DeploymentRunsScheduled,
    DeploymentSchedule,
    IndexedRuns,
    ScheduledRunIndex,
    TrackedRun,
    deployment_not_found,
    forget_settled,
    index_id,
)
from .flows import Tags
from .hydration import HydrationError, hydrate
from .json_schemas import validation_problem
from .messages import (
    Command,
    DecisionContext,
    Rejection,
    conflict,
    empty_dict,
    empty_list,
    invalid,
    new_model_default,
)
from .schedules import (
    SCHEDULE_DEFAULTS,
    dates_to_schedule,
    schedule_timezone,
    schedule_type_name,
    scheduled_idempotency_key,
    scheduled_run_id,
)
from .states import CreatedBy, StateCreate, StateDetails, StateType
from .unique_keys import UniqueKeyClaim

# Runs one command may create: an atomic batch holds at most 1,000 messages, and Prefect
# inserts in batches of 500.
MAX_RUNS_PER_COMMAND = 500
AUTO_SCHEDULED_TAG = "auto-scheduled"


class ScheduleDeploymentRuns(Command):
    """Schedule runs from the deployment's active schedules. An unknown deployment is a
    silent no-op (no runs), as in Prefect."""

    deployment_id: uuid.UUID
    start_time: UtcDatetime | None = None
    end_time: UtcDatetime | None = None
    min_time: Annotated[float, Field(ge=0, le=100 * 365 * 86_400, allow_inf_nan=False)] | None = None
    min_runs: Annotated[int, Field(ge=0, le=1_000)] | None = None
    max_runs: Annotated[int, Field(ge=0, le=1_000)] | None = None


@dataclass(frozen=True)
class PlannedRun:
    run_id: uuid.UUID
    schedule: DeploymentSchedule
    date: datetime


def planned_runs(deployment: Deployment, cmd: ScheduleDeploymentRuns, now: datetime) -> list[PlannedRun]:
    """SC-1: for each active schedule, its dates from `start` (default now) to `end` (default
    start + 100 days), at most `max_runs`, stopping once both `min_runs` and `start + min_time`
    are reached; earliest first. All of them: the dates whose run exists are skipped before a
    command's `MAX_RUNS_PER_COMMAND` are taken (`to_create`), so that a repeated backfill of
    more dates than that goes on where the last one stopped."""
    start = cmd.start_time or now
    end = cmd.end_time or (start + SCHEDULE_DEFAULTS.max_time)
    min_time = timedelta(seconds=cmd.min_time) if cmd.min_time is not None else SCHEDULE_DEFAULTS.min_time
    min_runs = cmd.min_runs if cmd.min_runs is not None else SCHEDULE_DEFAULTS.min_runs
    max_runs = cmd.max_runs if cmd.max_runs is not None else SCHEDULE_DEFAULTS.max_runs
    planned = []
    for s in deployment.schedules:
        if not s.active:
            continue
        for date in dates_to_schedule(s.schedule, start=start, end=end, min_time=min_time, min_runs=min_runs,
                                      max_runs=max_runs):
            planned.append(PlannedRun(scheduled_run_id(deployment.id, s.id, date), s, date))
    planned.sort(key=lambda p: (p.date, str(p.run_id)))
    return planned


def to_create(planned: list[PlannedRun], existing: dict[uuid.UUID, fr.FlowRun | None]) -> list[PlannedRun]:
    """The planned dates whose run does not exist (`existing`: the runs as read, None or absent
    when there is none), earliest first, at most `MAX_RUNS_PER_COMMAND`."""
    return [p for p in planned if existing.get(p.run_id) is None][:MAX_RUNS_PER_COMMAND]


def scheduled_run(deployment: Deployment, planned: PlannedRun, ctx: DecisionContext) -> fr.FlowRun:
    """SC-2: the run of one date, in its first state (`Scheduled` at the date)."""
    s = planned.schedule
    labels = {**deployment.labels, "prefect.flow.id": str(deployment.flow_id),
              "prefect.deployment.id": str(deployment.id)}
    run = fr.FlowRun.model_validate({
        "id": planned.run_id, "created": ctx.now, "updated": ctx.now, "name": fr.run_name(planned.run_id),
        "flow_id": deployment.flow_id, "deployment_id": deployment.id, "deployment_version": deployment.version,
        "work_queue_name": deployment.work_queue_name, "work_queue_id": deployment.work_queue_id,
        "parameters": {**deployment.parameters, **s.parameters},
        "idempotency_key": scheduled_idempotency_key(deployment.id, s.id, planned.date, schedule_timezone(s.schedule)),
        "tags": [AUTO_SCHEDULED_TAG, *deployment.tags], "labels": labels, "auto_scheduled": True,
        "infrastructure_document_id": deployment.infrastructure_document_id,
        "created_by": CreatedBy(id=s.id, type="SCHEDULE", display_value=s.slug or schedule_type_name(s.schedule)),
    })
    first = StateCreate(type=StateType.SCHEDULED, message="Flow run scheduled",
                        state_details=StateDetails(scheduled_time=planned.date))
    return orchestration_rules.initial_flow_run_state(run, first, ctx).run


def scheduled_runs(deployment: Deployment, planned: list[PlannedRun], ctx: DecisionContext) -> list[fr.FlowRun]:
    """SC-2 for many dates at once. The first run of each schedule is made as `scheduled_run`
    makes it (validated, its first state through the rules and their bookkeeping); the others
    of that schedule are copies of it that differ only where the date makes them differ: id,
    name, idempotency key, state (its id, `scheduled_time` and `flow_run_id`) and the two start
    times the state sets. Validating and orchestrating each was most of a scheduler command's
    CPU; a unit test checks that the copies equal runs made one by one. The copies share their
    parameters, labels and tags with the first (frozen models, never changed in place)."""
    first_of: dict[uuid.UUID, fr.FlowRun] = {}
    runs = []
    for p in planned:
        template = first_of.get(p.schedule.id)
        if template is None:
            run = first_of[p.schedule.id] = scheduled_run(deployment, p, ctx)
        else:
            run = _same_run_another_date(template, deployment, p, ctx)
        runs.append(run)
    return runs


def _same_run_another_date(template: fr.FlowRun, deployment: Deployment, p: PlannedRun,
                           ctx: DecisionContext) -> fr.FlowRun:
    assert template.state is not None
    state = template.state
    state = state.model_copy(update={"id": ctx.new_id(), "state_details": state.state_details.model_copy(
        update={"scheduled_time": p.date, "flow_run_id": p.run_id})})
    key = scheduled_idempotency_key(deployment.id, p.schedule.id, p.date, schedule_timezone(p.schedule.schedule))
    return template.model_copy(update={"id": p.run_id, "name": fr.run_name(p.run_id), "idempotency_key": key,
                                       "state": state, "state_id": state.id, "expected_start_time": p.date,
                                       "next_scheduled_start_time": p.date})


def decide_schedule_runs(deployment: Deployment | None, planned: list[PlannedRun],
                         existing: dict[uuid.UUID, fr.FlowRun | None], ctx: DecisionContext,
                         indexed: IndexedRuns = IndexedRuns()) -> Decision:
    """SC-3: the dates whose run exists are skipped, then at most `MAX_RUNS_PER_COMMAND` of the
    others are made (`to_create`); the result is the ids created. The new
    runs join the deployment's index (a later upsert or pause finds them there), and the past
    ones of the index that have run or gone leave it (`indexed.runs`: those the caller read)."""
    if deployment is None:
        return Decision(events=[], result=[])
    created = scheduled_runs(deployment, to_create(planned, existing), ctx)
    events = [NewEvent(str(run.id), fr.FlowRunCreated(run=run)) for run in created]
    dates = {p.run_id: p for p in planned}
    if created:
        events.append(NewEvent(index_id(deployment.id), DeploymentRunsScheduled(runs={
            run.id: TrackedRun(date=dates[run.id].date, schedule_id=dates[run.id].schedule.id) for run in created})))
    events += forget_settled(deployment.id, indexed)
    return Decision(events=events, result=[run.id for run in created], after={str(run.id): run for run in created})


def past_runs(indexed: ScheduledRunIndex, now: datetime) -> list[uuid.UUID]:
    """The runs of the index whose date has passed: the scheduler reads them to prune it."""
    return [run_id for run_id, tracked in indexed.runs.items() if tracked.date <= now]


# ---------------------------------------------------------------------------------------------
# On demand (DP-11 ... DP-17)

MAX_BULK = 100


class FlowRunFromDeployment(BaseModel):
    """One run asked of a deployment (Prefect's `DeploymentFlowRunCreate`)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    state: StateCreate | None = None
    name: fr.RunName | None = None
    parameters: SizedParameters = empty_dict()
    enforce_parameter_schema: bool | None = None
    context: JsonDocument = empty_dict()
    infrastructure_document_id: uuid.UUID | None = None
    empirical_policy: fr.FlowRunPolicyInput = new_model_default(fr.FlowRunPolicyInput)
    tags: Tags = empty_list()
    idempotency_key: StoredText | None = None
    labels: JsonDocument = empty_dict()
    parent_task_run_id: uuid.UUID | None = None
    work_queue_name: wp.QueueName | None = None
    job_variables: JsonDocument = empty_dict()
    priority: fr.RunPriority = 0


class CreateFlowRunFromDeployment(FlowRunFromDeployment, Command):
    """One run of a deployment. `idempotency_key` is Prefect's (the existing run of the flow with this
    key comes back, `created: false`); the bus's own key is `request_idempotency_key`."""

    BUS_KEY_FIELD: ClassVar[str | None] = "request_idempotency_key"
    request_idempotency_key: StoredText | None = None
    deployment_id: uuid.UUID


class CreateFlowRunsFromDeployment(Command):
    """Up to 100 runs of a deployment; each item succeeds or fails on its own."""

    deployment_id: uuid.UUID
    runs: Annotated[list[FlowRunFromDeployment], Field(max_length=MAX_BULK)]


@dataclass(frozen=True)
class RunInputs:
    """What a run of a deployment may read beyond the deployment: the pool of its queue (job
    variables, a queue named in the request), the variables its parameters name, per
    idempotency key its claim and the run holding it, and (for the bulk form, which decides
    every item's copy itself) per `parent_task_run_id` the parent task run, None when it does
    not exist."""

    pool: wp.WorkPool | None = None
    variables: dict[str, Any] | None = None
    claims: dict[str, tuple[UniqueKeyClaim, fr.FlowRun | None]] | None = None
    parent_tasks: dict[uuid.UUID, sf.ParentTask | None] | None = None


def _parameters(deployment: Deployment, item: FlowRunFromDeployment, variables: dict[str, Any]) -> dict[str, Any]:
    """DP-12, DP-13 and DP-14: a shallow merge, hydrated, checked (`required` included)."""
    try:
        parameters = hydrate({**deployment.parameters, **item.parameters}, variables)
    except HydrationError as e:
        raise invalid(f"Error hydrating flow run parameters: {e}", field="parameters") from None
    enforce = item.enforce_parameter_schema if item.enforce_parameter_schema is not None \
        else deployment.enforce_parameter_schema
    if enforce:
        schema = deployment.parameter_openapi_schema
        if not isinstance(schema, dict):
            raise conflict("Error creating flow run: the deployment's parameter schema is not an object")
        problem = validation_problem(parameters, schema, ignore_required=False, preprocess=True)
        if problem is not None and "circular" in problem.lower():
            raise invalid(f"Error creating flow run: {problem}", field="parameters")
        if problem:
            raise conflict(f"Error creating flow run: {problem}")
    return parameters


def _queue(deployment: Deployment, item: FlowRunFromDeployment, pool: wp.WorkPool | None,
           ctx: DecisionContext) -> tuple[list[NewEvent], dict[str, Any]]:
    """DP-16: the deployment's queue, or the queue named in the request, of the deployment's
    pool, created if missing (the deployment is not changed)."""
    if item.work_queue_name is None:
        return [], {"work_queue_name": deployment.work_queue_name, "work_queue_id": deployment.work_queue_id}
    if deployment.work_queue_id is None or pool is None:
        raise invalid(f"Cannot create a flow run in work queue {item.work_queue_name!r} because deployment "
                      f"{deployment.id} is not associated with a work pool.", field="work_queue_name")
    found = pool.queue_named(item.work_queue_name)
    if found is not None:
        return [], {"work_queue_name": found.name, "work_queue_id": found.id}
    made = wp.decide_create_work_queue(wp.CreateWorkQueue(work_pool_name=pool.name, name=item.work_queue_name),
                                       pool, ctx)
    _, queue = made.result
    return made.events, {"work_queue_name": queue.name, "work_queue_id": queue.id}


def run_job_variables_problem(deployment: Deployment | None, pool: wp.WorkPool | None,
                              job_variables: dict[str, Any]) -> str | None:
    """DP-15: pool defaults, then the deployment's, then the run's, against the pool's schema
    with `required` enforced (null accepted for an optional variable, as DP-4); why they do not
    fit, or None."""
    if pool is None or deployment is None:
        return None
    schema = pool.base_job_template.get("variables") or {}
    if not isinstance(schema, dict) or not schema:
        return None
    properties = schema.get("properties") or {}
    defaults = {k: v["default"] for k, v in properties.items() if isinstance(v, dict) and "default" in v}
    return validation_problem({**defaults, **deployment.job_variables, **job_variables}, schema,
                              ignore_required=False, preprocess=True, allow_none_with_default=True)


def _check_job_variables(deployment: Deployment, item: FlowRunFromDeployment, pool: wp.WorkPool | None) -> None:
    problem = run_job_variables_problem(deployment, pool, item.job_variables)
    if problem:
        raise invalid(f"Error creating flow run: {problem}", field="job_variables")


def run_from_deployment(deployment: Deployment, item: FlowRunFromDeployment, inputs: RunInputs,
                        ctx: DecisionContext) -> Decision:
    """One run of a deployment (DP-12 ... DP-16), or the existing run of its key."""
    if item.idempotency_key is not None and inputs.claims is not None:
        claim, holder = inputs.claims.get(item.idempotency_key, (UniqueKeyClaim(), None))
        if claim.owner_id is not None:
            if holder is None:  # the claim and its owner are written together; never apart
                raise RuntimeError(f"flow run key is claimed by {claim.owner_id}, which does not exist")
            return Decision(events=[], result=holder, created=False)
    parameters = _parameters(deployment, item, inputs.variables or {})
    _check_job_variables(deployment, item, inputs.pool)
    queue_events, queue_fields = _queue(deployment, item, inputs.pool, ctx)
    run_id = ctx.new_id()
    labels = {**deployment.labels, "prefect.flow.id": str(deployment.flow_id),
              "prefect.deployment.id": str(deployment.id), **item.labels}
    run = fr.FlowRun.model_validate({
        "id": run_id, "created": ctx.now, "updated": ctx.now, "name": item.name or fr.run_name(run_id),
        "flow_id": deployment.flow_id, "deployment_id": deployment.id, "deployment_version": deployment.version,
        "parameters": parameters, "idempotency_key": item.idempotency_key, "context": item.context,
        "empirical_policy": item.empirical_policy.policy(),
        "tags": list(dict.fromkeys([*deployment.tags, *item.tags])), "labels": labels,
        "parent_task_run_id": item.parent_task_run_id,
        "infrastructure_document_id": item.infrastructure_document_id or deployment.infrastructure_document_id,
        "job_variables": item.job_variables, "priority": item.priority, **queue_fields,
    })
    first = item.state or StateCreate(type=StateType.SCHEDULED)
    run = orchestration_rules.initial_flow_run_state(run, first, ctx).run
    claims = ([fr.FLOW_RUN_KEY.claim(run.id, str(run.flow_id), item.idempotency_key)]
              if item.idempotency_key is not None else [])
    return Decision(events=[*queue_events, *claims, NewEvent(str(run.id), fr.FlowRunCreated(run=run))],
                    result=run, created=True, after={str(run.id): run})


def decide_run_from_deployment(cmd: CreateFlowRunFromDeployment, deployment: Deployment | None,
                               inputs: RunInputs, ctx: DecisionContext) -> Decision:
    if deployment is None:
        raise deployment_not_found(cmd.deployment_id)
    return run_from_deployment(deployment, cmd, inputs, ctx)


def decide_runs_from_deployment(cmd: CreateFlowRunsFromDeployment, deployment: Deployment | None,
                                inputs: RunInputs, ctx: DecisionContext) -> Decision:
    """DP-17: each item is `{flow_run_id, status: CREATED|FAILED, error}`; the created ones are
    appended together. Two items with one idempotency key make one run. A new run with a
    `parent_task_run_id` stands for that task run from its first state, as the single form's
    (FR-6, `subflows`): an unknown parent fails its item alone, and a second subflow of one
    parent copies its state on top of the first's."""
    if deployment is None:
        raise deployment_not_found(cmd.deployment_id)
    events: list[NewEvent] = []
    results: list[dict[str, Any]] = []
    after: dict[str, Any] = {}
    queue = []
    pool = inputs.pool
    claims = dict(inputs.claims or {})
    parents = dict(inputs.parent_tasks or {})
    for item in cmd.runs:
        try:
            made = run_from_deployment(deployment, item, RunInputs(pool, inputs.variables, claims), ctx)
            subflow = sf.state_written(made, None, str(made.result.id)) if made.created else None
            if subflow is not None and subflow.parent_task_run_id is not None:
                parent = parents.get(subflow.parent_task_run_id)
                made = sf.with_parent_task_state(made, subflow, parent, ctx, created=True)
                if parent is not None:
                    parents[parent.run.id] = parent.after(made)
        except Rejection as e:
            results.append({"flow_run_id": None, "status": "FAILED", "error": e.message})
            continue
        events.extend(made.events)
        after.update(made.after)
        queue.extend(made.queue)
        run = made.result
        for new in made.events:  # a queue made for one item exists for the next
            if new.aggregate_type == wp.WORK_POOL and pool is not None:
                pool = wp.evolve(pool, new.event)
        if item.idempotency_key is not None:
            claims[item.idempotency_key] = (UniqueKeyClaim(run.id), run)
        results.append({"flow_run_id": str(run.id), "status": "CREATED", "error": None})
    return Decision(events=events, result=results, after=after, queue=queue)
