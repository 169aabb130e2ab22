"""Deployments: how a flow is run (where, with what parameters, on which schedules).

A deployment is keyed on (flow, name): creating one whose pair exists updates it in place and
keeps its id (`created: false`), as Prefect's `POST /deployments/` does; the pair is a unique
key (`commands/unique_keys.py`). Its schedules live inside it (a schedule belongs to exactly
one deployment and is always read with it), so a change of schedules is one event of the
deployment.

`Deployment` is the one definition of a deployment's shape: the aggregate's state, the
payload of its events, the read model's row and both replies. The names of its queue and
pool are copied into it when the queue is chosen; reads take them from the queue as it is now
(a queue may be renamed later).

The runs a deployment's schedules made are listed in an index of its own
(`DEPLOYMENT_RUNS`), so that an upsert, an update, a pause or a delete deletes them in the
same decision. Every change of the deployment also notes its new `updated` in that index
(`ScheduledRunIndex.revision`), in the same batch: the scheduler, which writes the runs and the
index but not the deployment, thereby never makes runs from a deployment older than the one
the index follows (`follows`), and a change landing while it decides fails its append. The runs made on demand are not listed anywhere on the command side (that
would cost every run made a second write): a delete leaves them to the foreman's sweep,
`decide_delete_run_of_deleted_deployment`.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from datetime import datetime
from enum import StrEnum
from typing import Annotated, Any, ClassVar

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, StringConstraints

from . import concurrency_limits as cl
from . import slots
from . import work_pools as wp
from .bounds import (
    RUN_FROM_DEPLOYMENT_BYTES,
    RUN_STATE_HEADROOM_BYTES,
    UPDATE_SLACK_BYTES,
    JsonDocument,
    PositiveInt32,
    StoredText,
    UtcDatetime,
    check_json_document,
    parameters_size_problem,
)
from .decisions import Decision, NewEvent
from .events import register_event, register_upcaster
from .flow_runs import DeleteFlowRun, FlowRun, FlowRunDeleted, decide_delete_flow_run
from .flows import Tags
from .hydration import HydrationError, hydrate
from .json_schemas import CIRCULAR_SCHEMA, schema_problem, validation_problem
from .messages import Command, DecisionContext, Event, conflict, invalid, not_found
from .names import MAX_NAME_LENGTH, check_object_name
from .schedules import Schedule, with_anchor
from .states import TERMINAL, CreatedBy, StateType
from .unique_keys import UniqueKeyClaim, UniqueKeyScope

DEPLOYMENT = "deployment"
DEPLOYMENT_NAME = UniqueKeyScope("deployment_name")  # key: (flow id, deployment name)

# DP-6: JSON-serialised (compact) parameters larger than this are refused.
MAX_SCHEDULES = 100
DEFAULT_PARAMETER_SCHEMA: dict[str, Any] = {"type": "object", "properties": {}}


def _deployment_name(value: str) -> str:
    """C-1: a deployment's name may be empty (""), unlike other names."""
    return check_object_name(value) if value else value


DeploymentName = Annotated[str, StringConstraints(max_length=MAX_NAME_LENGTH), AfterValidator(_deployment_name)]
ShortText = Annotated[StoredText, StringConstraints(max_length=10_000)]
Slug = Annotated[StoredText, StringConstraints(min_length=1, max_length=MAX_NAME_LENGTH)]
MaxScheduledRuns = Annotated[int, Field(ge=1, le=50)]


def _json_list(value: list[Any]) -> list[Any]:
    check_json_document({"": value})
    return value


JsonList = Annotated[list[Any], Field(max_length=1_000), AfterValidator(_json_list)]


class Status(StrEnum):
    READY = "READY"
    NOT_READY = "NOT_READY"


class CollisionStrategy(StrEnum):
    ENQUEUE = "ENQUEUE"
    CANCEL_NEW = "CANCEL_NEW"


class ConcurrencyOptions(BaseModel):
    """What a run does when its deployment's limit is full."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    collision_strategy: CollisionStrategy = CollisionStrategy.ENQUEUE
    grace_period_seconds: Annotated[int, Field(ge=60, le=86_400)] | None = None


class DeploymentSchedule(BaseModel):
    """One schedule of a deployment, as stored and answered."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    id: uuid.UUID
    created: UtcDatetime
    updated: UtcDatetime
    deployment_id: uuid.UUID
    schedule: Schedule
    active: bool = True
    max_scheduled_runs: int | None = None
    parameters: dict[str, Any] = {}
    slug: str | None = None


class Deployment(BaseModel):
    """A deployment, as stored, projected and answered (Prefect's field names)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    id: uuid.UUID
    created: UtcDatetime
    updated: UtcDatetime
    name: str
    flow_id: uuid.UUID
    version: str | None = None
    description: str | None = None
    paused: bool = False
    schedules: list[DeploymentSchedule] = []
    concurrency_limit: int | None = None
    concurrency_options: ConcurrencyOptions | None = None
    job_variables: dict[str, Any] = {}
    parameters: dict[str, Any] = {}
    parameter_openapi_schema: dict[str, Any] | None = None
    enforce_parameter_schema: bool = True
    pull_steps: list[Any] | None = None
    tags: list[str] = []
    labels: dict[str, Any] = {}
    work_queue_name: str | None = None
    work_queue_id: uuid.UUID | None = None
    work_pool_name: str | None = None
    path: str | None = None
    entrypoint: str | None = None
    storage_document_id: uuid.UUID | None = None
    infrastructure_document_id: uuid.UUID | None = None
    last_polled: UtcDatetime | None = None
    status: Status = Status.NOT_READY
    created_by: CreatedBy | None = None
    updated_by: CreatedBy | None = None

    def reply(self, active_slots: int = 0) -> dict[str, Any]:
        """The reply both sides give. SL-7: the limit is reported as the global limit
        `deployment:<id>` that holds it (with its `active_slots`, which the query side reads
        from the limits read model), and the deprecated `concurrency_limit` as null."""
        body = self.model_dump(mode="json", exclude={"schedules"})
        body["schedules"] = [s.model_dump(mode="json") for s in newest_first(self.schedules)]
        limit = body.pop("concurrency_limit")
        body["concurrency_limit"] = None
        body["global_concurrency_limit"] = None if limit is None else {
            "id": str(limit_id(self.id)), "name": f"deployment:{self.id}", "limit": limit, "active": True,
            "active_slots": active_slots, "slot_decay_per_second": 0.0,
        }
        return body


def newest_first(schedules: list[DeploymentSchedule]) -> list[DeploymentSchedule]:
    """Schedules in the order Prefect answers them (a deployment's, or its schedules read
    alone): last updated first; those updated together keep their order. They are stored in
    the order they were added."""
    return sorted(schedules, key=lambda s: s.updated, reverse=True)


def limit_id(deployment_id: uuid.UUID) -> uuid.UUID:
    """The id of the deployment's global limit `deployment:<id>` (SL-7): derived from the
    deployment's, so the command side finds it without a lookup."""
    return uuid.uuid5(deployment_id, "deployment-concurrency-limit")


def limit_name(deployment_id: uuid.UUID) -> str:
    return f"deployment:{deployment_id}"


@dataclass(frozen=True)
class LimitState:
    """The deployment's global limit as loaded (None: there is none) and its name's claim."""

    limit: cl.ConcurrencyLimit | None = None
    claim: UniqueKeyClaim = UniqueKeyClaim()


def limit_events(deployment_id: uuid.UUID, wanted: int | None, state: LimitState,
                 ctx: DecisionContext) -> list[NewEvent]:
    """SL-7: a deployment's `concurrency_limit` is stored as the global concurrency limit
    `deployment:<id>` (created, changed or deleted with the deployment, in the same batch), so
    it is read and listed like any other global limit, and slots will be counted on it."""
    if wanted is None:
        return cl.delete_limit_events(state.limit) if state.limit is not None else []
    if state.limit is not None:
        return cl.update_limit_events(state.limit, wanted, ctx)
    if state.claim.owner_id is not None:  # someone made a limit with this name by hand
        raise cl.name_taken(limit_name(deployment_id))
    return cl.new_limit_events(limit_id(deployment_id), limit_name(deployment_id), wanted, ctx)


# ---------------------------------------------------------------------------------------------
# Events


class _DeploymentEvent(Event):
    aggregate_type: ClassVar[str] = DEPLOYMENT


@register_event
class DeploymentCreated(_DeploymentEvent):
    event_type: ClassVar[str] = "DeploymentCreated"
    deployment: Deployment

    def append_headroom(self) -> int:
        # Its runs carry its parameters, labels and tags, with more of their own, then their
        # later states.
        return RUN_STATE_HEADROOM_BYTES + RUN_FROM_DEPLOYMENT_BYTES


@register_event
class DeploymentUpdated(_DeploymentEvent):
    """The deployment as it is now, and the fields that changed (Prefect's `updated` event
    names them)."""

    event_type: ClassVar[str] = "DeploymentUpdated"
    # v2 added `by_pause_or_resume`: a reader of v1 refuses it cleanly as newer, where it would
    # fail on the unknown field (events forbid extra fields).
    schema_version: ClassVar[int] = 2
    deployment: Deployment
    changed: list[str]
    # Written by PauseDeployment / ResumeDeployment: Prefect's pause and resume routes set the
    # flag without an event, where an update naming `paused` reports it.
    by_pause_or_resume: bool = False

    def append_headroom(self) -> int:
        """Nearly the room its creation left (so that what was made within the rules can
        always be changed); none for a pause or resume, which grows nothing and is the way out
        for a deployment too large for its runs (one stored before the rule, say)."""
        if self.by_pause_or_resume:
            return 0
        return RUN_STATE_HEADROOM_BYTES + RUN_FROM_DEPLOYMENT_BYTES - UPDATE_SLACK_BYTES


@register_upcaster("DeploymentUpdated", 1)
def _deployment_updated_v1(payload: dict[str, Any]) -> dict[str, Any]:
    """v2 only added `by_pause_or_resume`, whose default (False: an update reported as any
    other) is what a v1 event meant, so a v1 payload is read as it is. One written at v1 with
    the field already (before the version was raised) keeps its value."""
    return payload


@register_event
class DeploymentDeleted(_DeploymentEvent):
    event_type: ClassVar[str] = "DeploymentDeleted"
    deployment_id: uuid.UUID
    flow_id: uuid.UUID
    name: str
    deleted: datetime


# ---------------------------------------------------------------------------------------------
# Commands


class ScheduleCreate(BaseModel):
    """A schedule given in a create, an upsert or `CreateDeploymentSchedules`."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    schedule: Schedule
    active: bool = True
    max_scheduled_runs: MaxScheduledRuns | None = None
    parameters: JsonDocument = {}
    slug: Slug | None = None


class ScheduleUpdate(BaseModel):
    """A schedule given in an update: patched by slug (or by `replaces`, to rename it) when
    every schedule has a slug; otherwise the whole list replaces the deployment's."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    schedule: Schedule | None = None
    active: bool | None = None
    max_scheduled_runs: MaxScheduledRuns | None = None
    parameters: JsonDocument | None = None
    slug: Slug | None = None
    replaces: Slug | None = None


class _DeploymentFields(Command):
    """Fields a create and an update share (absent ones keep their value)."""

    version: ShortText | None = None
    description: ShortText | None = None
    paused: bool = False
    concurrency_limit: PositiveInt32 | None = None
    concurrency_options: ConcurrencyOptions | None = None
    job_variables: JsonDocument = {}
    parameters: JsonDocument = {}
    parameter_openapi_schema: JsonDocument | None = None
    enforce_parameter_schema: bool = True
    pull_steps: JsonList | None = None
    tags: Tags = []
    labels: JsonDocument = {}
    work_queue_name: wp.QueueName | None = None
    work_pool_name: wp.PoolName | None = None
    path: ShortText | None = None
    entrypoint: ShortText | None = None
    storage_document_id: uuid.UUID | None = None
    infrastructure_document_id: uuid.UUID | None = None


class CreateDeployment(_DeploymentFields):
    """An upsert on (flow_id, name): an existing pair is updated in place and keeps its id."""

    name: DeploymentName
    flow_id: uuid.UUID
    schedules: Annotated[list[ScheduleCreate], Field(max_length=MAX_SCHEDULES)] = []


class UpdateDeployment(_DeploymentFields):
    id: uuid.UUID
    schedules: Annotated[list[ScheduleUpdate], Field(max_length=MAX_SCHEDULES)] | None = None


class DeleteDeployment(Command):
    id: uuid.UUID


class DeleteRunOfDeletedDeployment(Command):
    """The foreman's: a run of a deleted deployment that the delete left (one made on demand)
    and that is still deletable goes after it. Nothing happens when the run is gone, names
    another deployment, or can no longer be deleted, or when the log shows the deployment
    existing, or never holding it."""

    id: uuid.UUID
    deployment_id: uuid.UUID


class PauseDeployment(Command):
    id: uuid.UUID


class ResumeDeployment(Command):
    id: uuid.UUID


class CreateDeploymentSchedules(Command):
    deployment_id: uuid.UUID
    schedules: Annotated[list[ScheduleCreate], Field(min_length=1, max_length=MAX_SCHEDULES)]


class UpdateDeploymentSchedule(Command):
    deployment_id: uuid.UUID
    schedule_id: uuid.UUID
    schedule: Schedule | None = None
    active: bool | None = None
    max_scheduled_runs: MaxScheduledRuns | None = None
    parameters: JsonDocument | None = None
    slug: Slug | None = None


class DeleteDeploymentSchedule(Command):
    deployment_id: uuid.UUID
    schedule_id: uuid.UUID


# ---------------------------------------------------------------------------------------------
# The runs a deployment's schedules made (its own small aggregate, id: the deployment's id)

DEPLOYMENT_RUNS = "deployment_runs"
# How many indexed runs, over all deployments, the command side's cache keeps in memory.
CACHED_INDEXED_RUNS = 200_000


def index_id(deployment_id: uuid.UUID) -> str:
    """The index's aggregate id: `runs-<deployment id>`, not the deployment's own id, since a
    decision's folded states (`Decision.after`) are keyed by aggregate id alone."""
    return f"runs-{deployment_id}"


class TrackedRun(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    date: UtcDatetime
    schedule_id: uuid.UUID


class ScheduledRunIndex(BaseModel):
    """The auto-scheduled runs of a deployment that an upsert, an update, a pause or a delete
    may still have to delete: the command side finds them here,
    in the log, not in a read model. A run leaves the index once it can no longer be deleted
    (it ran, or is gone); the scheduler prunes the past ones it passes."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    runs: dict[uuid.UUID, TrackedRun] = {}
    # The `updated` of the deployment as its last change left it (its deletion's time once
    # deleted); None while it is as created (or changed only before runledger noted changes).
    revision: UtcDatetime | None = None


class _IndexEvent(Event):
    aggregate_type: ClassVar[str] = DEPLOYMENT_RUNS


@register_event
class DeploymentRunsScheduled(_IndexEvent):
    event_type: ClassVar[str] = "DeploymentRunsScheduled"
    runs: dict[uuid.UUID, TrackedRun]


@register_event
class DeploymentRunsForgotten(_IndexEvent):
    """Runs that leave the index; written by a change of the deployment, it also carries the
    deployment's new `updated` (`revision`), even when no run leaves, so that a scheduler that
    read the deployment before the change cannot append its runs after it (see the module
    docstring)."""

    event_type: ClassVar[str] = "DeploymentRunsForgotten"
    # v2 added `revision`: a reader of v1 refuses it cleanly as newer, where it would fail on the
    # unknown field (events forbid extra fields).
    schema_version: ClassVar[int] = 2
    run_ids: list[uuid.UUID]
    revision: datetime | None = None


@register_upcaster("DeploymentRunsForgotten", 1)
def _deployment_runs_forgotten_v1(payload: dict[str, Any]) -> dict[str, Any]:
    """v2 only added `revision`, whose default (None: no change of the deployment noted) is
    what a v1 event meant."""
    return payload


def evolve_index(index: ScheduledRunIndex, event: Event) -> ScheduledRunIndex:
    match event:
        case DeploymentRunsScheduled(runs=added):
            return ScheduledRunIndex(runs={**index.runs, **added})
        case DeploymentRunsForgotten(run_ids=gone, revision=revision):
            dropped = set(gone)
            return ScheduledRunIndex(runs={k: v for k, v in index.runs.items() if k not in dropped},
                                     revision=revision if revision is not None else index.revision)
    return index


def follows(index: ScheduledRunIndex, deployment: Deployment | None) -> bool:
    """Whether `deployment` is the deployment as the index last noted it: the scheduler reads
    the deployment again from the log when it is not (its copy may be older than a change
    another instance made). An index that noted no change stands for the deployment as created
    (`updated` equal to `created`), which a create does not note, to keep it one event less; a
    deployment changed only before runledger noted changes is always read again."""
    if deployment is None:
        return False
    return deployment.updated == (index.revision if index.revision is not None else deployment.created)


@dataclass(frozen=True)
class IndexedRuns:
    """What the deletion rules read: the index, and each indexed run as loaded (None: gone)."""

    index: ScheduledRunIndex = ScheduledRunIndex()
    runs: dict[uuid.UUID, FlowRun | None] = field(default_factory=dict)


def deletable(run: FlowRun) -> bool:
    """Prefect's filter for the runs a deployment change deletes: scheduled, never run, and not
    waiting for a concurrency slot (that run belongs to the limit's queue of waiters)."""
    return (run.state_type is StateType.SCHEDULED and run.run_count == 0
            and run.state_name != "AwaitingConcurrencySlot")


def delete_scheduled_runs(deployment_id: uuid.UUID, indexed: IndexedRuns, now: datetime, *,
                          future_only: bool, revision: datetime | None = None) -> list[NewEvent]:
    """The deletions of DP-2(a) (`future_only`: next start after now), DP-9 and SC-7 (past ones
    too); the runs that can no longer be deleted leave the index at the same time. `revision`:
    the deployment changed (its new `updated`), which the index notes even with no run to
    delete (`revised`)."""
    events: list[NewEvent] = []
    forgotten: list[uuid.UUID] = []
    for run_id in indexed.index.runs:
        run = indexed.runs.get(run_id)
        if run is None or not deletable(run):
            if run is None or run.run_count > 0 or run.state_type in TERMINAL:
                forgotten.append(run_id)
            continue
        start = run.next_scheduled_start_time
        if future_only and (start is None or start <= now):
            continue
        events.append(NewEvent(str(run_id), FlowRunDeleted(flow_run_id=run_id, flow_id=run.flow_id, deleted=now)))
        forgotten.append(run_id)
    if forgotten or revision is not None:
        events.append(NewEvent(index_id(deployment_id), DeploymentRunsForgotten(run_ids=forgotten,
                                                                                revision=revision)))
    return events


def revised(deployment_id: uuid.UUID, revision: datetime) -> NewEvent:
    """A change of the deployment that deletes no run, noted in its index: the one event of the
    index such a decision writes (the caller loaded the index, for its expected sequence)."""
    return NewEvent(index_id(deployment_id), DeploymentRunsForgotten(run_ids=[], revision=revision))


def forget_settled(deployment_id: uuid.UUID, indexed: IndexedRuns) -> list[NewEvent]:
    """The loaded runs of the index that can no longer be deleted (gone, run, or ended) leave
    it: the scheduler calls this for the past runs it passes, so the index stays small."""
    settled = [run_id for run_id, run in indexed.runs.items() if run_id in indexed.index.runs
               and (run is None or run.run_count > 0 or run.state_type in TERMINAL)]
    return [NewEvent(index_id(deployment_id), DeploymentRunsForgotten(run_ids=settled))] if settled else []


# ---------------------------------------------------------------------------------------------
# Evolve


def evolve(deployment: Deployment | None, event: Event) -> Deployment | None:
    match event:
        case DeploymentCreated(deployment=d) | DeploymentUpdated(deployment=d):
            return d
        case DeploymentDeleted():
            return None
    return deployment


def without_deleted_queue(deployment: Deployment, pool: wp.WorkPool | None) -> Deployment:
    """WP-9: a deployment whose queue was deleted since, alone or with its pool, has no queue
    and so no pool (Prefect's foreign key sets the queue null, and the pool is read through
    it); its `work_queue_name` text stays. A pool's deletion does not know its deployments, so
    no event of theirs says so: whoever reads a deployment to write it or to make its runs
    passes it through here, with `pool` the pool it names as that pool is now."""
    if deployment.work_queue_id is None or (pool is not None and deployment.work_queue_id in pool.queues):
        return deployment
    return deployment.model_copy(update={"work_queue_id": None, "work_pool_name": None})


# ---------------------------------------------------------------------------------------------
# Rules


def deployment_not_found(deployment_id: uuid.UUID | None = None) -> Exception:
    return not_found("Deployment not found.")


def name_key(flow_id: uuid.UUID, name: str) -> str:
    """The aggregate id of the (flow, name) claim."""
    return DEPLOYMENT_NAME.aggregate_id(str(flow_id), name)


def job_variables_problem(pool: wp.WorkPool, job_variables: dict[str, Any]) -> str | None:
    """DP-4: the pool's variable defaults overlaid by the deployment's job variables must fit
    the pool's variables schema, `required` aside (a run may supply the rest). Null is
    accepted for an optional variable even when it has a default, as Prefect accepts it (blocks
    hold null defaults)."""
    variables = pool.base_job_template.get("variables") or {}
    if not isinstance(variables, dict) or not variables:
        return None
    properties = variables.get("properties") or {}
    defaults = {k: v["default"] for k, v in properties.items() if isinstance(v, dict) and "default" in v}
    return validation_problem({**defaults, **job_variables}, variables, ignore_required=True, preprocess=True,
                              allow_none_with_default=True)


def _check_parameters(cmd: CreateDeployment, parameters: dict[str, Any], schema: dict[str, Any] | None) -> None:
    """DP-5 and DP-6 at create. Quirk kept: the schema is enforced only when the request itself
    says `enforce_parameter_schema: true`."""
    problem = parameters_size_problem(parameters)
    if problem:
        raise invalid(problem, field="parameters")
    if "enforce_parameter_schema" not in cmd.model_fields_set or not cmd.enforce_parameter_schema:
        return
    schema = schema if schema is not None else DEFAULT_PARAMETER_SCHEMA
    problem = schema_problem(schema)
    if problem:
        raise invalid(problem, field="parameter_openapi_schema")
    problem = validation_problem(parameters, schema, ignore_required=True)
    if problem:
        raise invalid(problem, field="parameters")


def _slugs_unique(schedules: list[DeploymentSchedule]) -> None:
    slugs = [s.slug for s in schedules if s.slug is not None]
    if len(slugs) != len(set(slugs)):
        raise conflict("Schedule slugs must be unique within a deployment.")


def _new_schedules(given: list[ScheduleCreate] | list[ScheduleUpdate], deployment_id: uuid.UUID,
                   ctx: DecisionContext, *, keep_max_runs: bool) -> list[DeploymentSchedule]:
    """Schedules made from a request. Quirk kept (Prefect re-creates an upsert's schedules, and
    makes an update's new ones, without it): `max_scheduled_runs` is dropped unless
    `keep_max_runs` (`CreateDeploymentSchedules`)."""
    made = []
    for s in given:
        if s.schedule is None:
            raise invalid("Unable to create new deployment schedules without a schedule configuration.",
                          field="schedules")
        made.append(DeploymentSchedule(
            id=ctx.new_id(), created=ctx.now, updated=ctx.now, deployment_id=deployment_id,
            schedule=with_anchor(s.schedule, ctx.now), active=True if s.active is None else s.active,
            max_scheduled_runs=s.max_scheduled_runs if keep_max_runs else None,
            parameters=s.parameters or {}, slug=s.slug,
        ))
    return made


def _patched(schedule: DeploymentSchedule, given: ScheduleUpdate | UpdateDeploymentSchedule,
             now: datetime) -> DeploymentSchedule:
    """The schedule with the given fields. A null changes nothing, as Prefect patches a
    schedule with the request's non-null fields only (`exclude_none`)."""
    fields = given.model_fields_set & {"schedule", "active", "max_scheduled_runs", "parameters", "slug"}
    values: dict[str, Any] = {f: getattr(given, f) for f in fields if getattr(given, f) is not None}
    if "schedule" in values:
        values["schedule"] = with_anchor(values["schedule"], now)
    return schedule.model_copy(update={**values, "updated": now})


def _updated_schedules(existing: list[DeploymentSchedule], given: list[ScheduleUpdate], deployment_id: uuid.UUID,
                       ctx: DecisionContext) -> list[DeploymentSchedule]:
    """DP-7: patch by slug when every existing and every given schedule has one; refuse a list
    without slugs for a deployment whose schedules all have them (it would drop them all by
    accident); otherwise replace the whole list with the given items that have a schedule."""
    all_given_slugged = all(s.slug is not None for s in given)
    all_existing_slugged = bool(existing) and all(s.slug is not None for s in existing)
    if not (all_given_slugged and all_existing_slugged):
        if all_existing_slugged:
            raise invalid("Please provide a slug for each schedule in your request to ensure schedules are "
                          "updated correctly.", field="schedules")
        # Prefect re-creates only the items that carry a schedule; the others are dropped.
        return _new_schedules([s for s in given if s.schedule is not None], deployment_id, ctx,
                              keep_max_runs=False)
    replaced: dict[str, str] = {}
    for s in given:
        if s.replaces:
            if s.replaces in replaced:
                raise invalid(f"Multiple schedules have 'replaces' targeting the same slug: {s.replaces}",
                              field="schedules")
            replaced[s.replaces] = s.slug or ""
    by_slug = {s.slug: s for s in existing}
    for s in given:
        if s.replaces and s.slug in by_slug and s.slug not in replaced:
            raise invalid(f"Cannot rename schedule from '{s.replaces}' to '{s.slug}': a schedule with slug "
                          f"'{s.slug}' already exists.", field="schedules")
    result = list(existing)
    for s in given:
        target = s.replaces or s.slug
        at = next((i for i, e in enumerate(result) if e.slug == target), None)
        if at is not None:
            result[at] = _patched(result[at], s, ctx.now)
        else:  # made as Prefect makes them, without `max_scheduled_runs`
            result.extend(_new_schedules([s], deployment_id, ctx, keep_max_runs=False))
    return result


def _queue_of(pool: wp.WorkPool | None, legacy_pool: wp.WorkPool | None, pool_name: str | None,
              queue_name: str | None, legacy_claim: wp.WorkPoolNameClaim | None,
              ctx: DecisionContext) -> tuple[list[NewEvent], wp.WorkPool | None, wp.WorkQueue | None]:
    """DP-3: the queue a deployment names, with the events that create it when it is missing
    (a named queue of a pool, or a pool-less name in the legacy pool)."""
    if pool_name is not None:
        if pool is None:
            raise not_found(f'Work pool "{pool_name}" not found.')
        if queue_name is None:
            return [], pool, pool.queues[pool.default_queue_id]
        existing = pool.queue_named(queue_name)
        if existing is not None:
            return [], pool, existing
        made = wp.decide_create_work_queue(wp.CreateWorkQueue(work_pool_name=pool_name, name=queue_name), pool, ctx)
        after_pool, queue = made.result
        return made.events, after_pool, queue
    if queue_name is not None:
        if legacy_pool is not None and legacy_pool.queue_named(queue_name) is not None:
            return [], legacy_pool, legacy_pool.queue_named(queue_name)
        if legacy_pool is not None and queue_name == wp.DEFAULT_QUEUE_NAME:
            # WQ-12: "default" is the legacy pool's default queue, whatever it is called now.
            return [], legacy_pool, legacy_pool.queues[legacy_pool.default_queue_id]
        assert legacy_claim is not None
        made = wp.decide_create_legacy_work_queue(
            wp.CreateLegacyWorkQueue(name=queue_name, priority=1), legacy_claim, legacy_pool, ctx)
        after_pool, queue = made.result
        return made.events, after_pool, queue
    return [], None, None


@dataclass(frozen=True)
class Placement:
    """What the command side read to place a deployment on a queue: the pool it names
    (None when it names none or the pool does not exist), and the legacy pool with its name
    claim, for a queue named without a pool."""

    pool: wp.WorkPool | None = None
    legacy_claim: wp.WorkPoolNameClaim | None = None
    legacy_pool: wp.WorkPool | None = None


def _placed(cmd: _DeploymentFields, placement: Placement, ctx: DecisionContext
            ) -> tuple[list[NewEvent], dict[str, Any]]:
    """The queue events and the deployment fields of DP-3's resolution."""
    events, pool, queue = _queue_of(placement.pool, placement.legacy_pool, cmd.work_pool_name,
                                    cmd.work_queue_name, placement.legacy_claim, ctx)
    if queue is None or pool is None:
        return events, {"work_queue_id": None, "work_queue_name": None, "work_pool_name": None}
    return events, {"work_queue_id": queue.id, "work_queue_name": queue.name, "work_pool_name": pool.name}


_COMPARED = frozenset(Deployment.model_fields) - {"updated", "created"}


def changed_fields(before: Deployment, after: Deployment) -> list[str]:
    return sorted(f for f in _COMPARED if getattr(before, f) != getattr(after, f))


def _updated(before: Deployment, after: Deployment) -> Decision:
    changed = changed_fields(before, after)
    events = [NewEvent(str(after.id), DeploymentUpdated(deployment=after, changed=changed))] if changed else []
    return Decision(events=events, result=after, created=False, after={str(after.id): after} if changed else {})


_COPIED_FIELDS = ("version", "description", "paused", "concurrency_limit", "concurrency_options", "job_variables",
                  "parameters", "parameter_openapi_schema", "enforce_parameter_schema", "pull_steps", "labels",
                  "path", "entrypoint", "storage_document_id", "infrastructure_document_id")


def _given_values(cmd: _DeploymentFields) -> dict[str, Any]:
    given = cmd.explicitly_set()
    values = {f: getattr(cmd, f) for f in _COPIED_FIELDS if f in given}
    if "tags" in given:
        values["tags"] = list(dict.fromkeys(cmd.tags))
    return values


def _with_system_labels(cmd: CreateDeployment, flow_labels: dict[str, Any]) -> dict[str, Any]:
    """DP-1: the labels a create, or an upsert that gives labels, stores, as Prefect's
    `with_system_labels_for_deployment` makes them: the flow's, then the system label, then
    the request's (which may override either). An upsert without labels keeps the stored ones
    (DP-1: absent fields keep their values), where Prefect would reset them."""
    return {**flow_labels, "prefect.flow.id": str(cmd.flow_id), **cmd.labels}


def decide_create_deployment(cmd: CreateDeployment, claim: UniqueKeyClaim, existing: Deployment | None,
                             flow_exists: bool, placement: Placement, ctx: DecisionContext,
                             indexed: IndexedRuns = IndexedRuns(), limit: LimitState = LimitState(),
                             flow_labels: dict[str, Any] | None = None) -> Decision:
    """DP-1: create, or update in place the deployment that holds (flow, name); an update
    deletes the future runs its schedules made (DP-2(a): they reflect the old deployment).
    `flow_labels`: the flow's, which the deployment's labels start from."""
    if not flow_exists:
        raise not_found(f"Flow {cmd.flow_id} not found.")
    if cmd.work_pool_name is not None and placement.pool is not None:
        problem = job_variables_problem(placement.pool, cmd.job_variables)
        if problem:
            raise invalid(f"Error creating deployment: {problem}", field="job_variables")
    _check_parameters(cmd, cmd.parameters, cmd.parameter_openapi_schema)
    if claim.owner_id is not None and existing is None:  # written together; never apart
        raise RuntimeError(f"deployment name is claimed by {claim.owner_id}, which does not exist")
    deployment_id = existing.id if existing is not None else ctx.new_id()
    schedules = _new_schedules(cmd.schedules, deployment_id, ctx, keep_max_runs=False)
    _slugs_unique(schedules)
    queue_events, queue_fields = _placed(cmd, placement, ctx)
    values = {**_given_values(cmd), "schedules": schedules, "updated": ctx.now}
    if existing is None or "labels" in values:
        values["labels"] = _with_system_labels(cmd, flow_labels or {})
    if existing is not None:
        if cmd.work_pool_name is not None or cmd.work_queue_name is not None:
            values.update(queue_fields)
        after = existing.model_validate({**existing.model_dump(), **values})
        made = _updated(existing, after)
        deletions = delete_scheduled_runs(existing.id, indexed, ctx.now, future_only=True,
                                          revision=after.updated if made.events else None)
        limits = (limit_events(existing.id, cmd.concurrency_limit, limit, ctx)
                  if "concurrency_limit" in cmd.explicitly_set() else [])
        return Decision(events=queue_events + made.events + deletions + limits, result=after, created=False,
                        after=made.after)
    deployment = Deployment.model_validate({
        "id": deployment_id, "created": ctx.now, "name": cmd.name, "flow_id": cmd.flow_id,
        "parameter_openapi_schema": DEFAULT_PARAMETER_SCHEMA, **values, **queue_fields,
    })
    limits = limit_events(deployment.id, cmd.concurrency_limit, LimitState(), ctx)
    return Decision(
        events=[*queue_events, DEPLOYMENT_NAME.claim(deployment.id, str(cmd.flow_id), cmd.name),
                NewEvent(str(deployment.id), DeploymentCreated(deployment=deployment)), *limits],
        result=deployment, created=True, after={str(deployment.id): deployment},
    )


def decide_update_deployment(cmd: UpdateDeployment, deployment: Deployment | None, placement: Placement,
                             ctx: DecisionContext, indexed: IndexedRuns = IndexedRuns(),
                             variables: dict[str, Any] | None = None, limit: LimitState = LimitState()) -> Decision:
    """DP-7: a partial update; schedules patched by slug or replaced; parameters checked
    against the schema when enforcement is on. Every update, even an empty one, deletes the
    future runs the schedules made."""
    if deployment is None:
        raise deployment_not_found(cmd.id)
    given = cmd.explicitly_set()
    if cmd.work_pool_name is not None and placement.pool is not None:
        problem = job_variables_problem(placement.pool, cmd.job_variables)
        if problem:
            raise conflict(f"Error creating deployment: {problem}")
    values = _given_values(cmd)
    if "parameters" in values:  # given parameters are hydrated (`variables`: those they name)
        try:
            values["parameters"] = hydrate(values["parameters"], variables or {})
        except HydrationError as e:
            raise invalid(f"Error hydrating deployment parameters: {e}", field="parameters") from None
    parameters = values.get("parameters", deployment.parameters)
    problem = parameters_size_problem(parameters)
    if problem:
        raise invalid(problem, field="parameters")
    enforce = values.get("enforce_parameter_schema", deployment.enforce_parameter_schema)
    schema = values.get("parameter_openapi_schema") or deployment.parameter_openapi_schema
    if enforce:
        if not isinstance(schema, dict):
            raise conflict("Error updating deployment: the parameter schema is not an object")
        problem = schema_problem(schema) or validation_problem(parameters, schema, ignore_required=True,
                                                               preprocess=True)
        if problem == CIRCULAR_SCHEMA:  # the schema is at fault, not the parameters: Prefect's 422
            raise invalid(problem, field="parameter_openapi_schema")
        if problem:
            raise conflict(f"Error updating deployment: {problem}")
    queue_events: list[NewEvent] = []
    if "work_pool_name" in given and cmd.work_pool_name is None:
        values.update(work_queue_id=None, work_queue_name=None, work_pool_name=None)
    elif cmd.work_pool_name is not None or cmd.work_queue_name is not None:
        queue_events, queue_fields = _placed(cmd, placement, ctx)
        values.update(queue_fields)
    if cmd.schedules is not None:
        values["schedules"] = _updated_schedules(deployment.schedules, cmd.schedules, deployment.id, ctx)
        _slugs_unique(values["schedules"])
    after = deployment.model_validate({**deployment.model_dump(), **values, "updated": ctx.now})
    made = _updated(deployment, after)
    deletions = delete_scheduled_runs(deployment.id, indexed, ctx.now, future_only=True,
                                      revision=after.updated if made.events else None)
    limits = limit_events(deployment.id, cmd.concurrency_limit, limit, ctx) if "concurrency_limit" in given else []
    return Decision(events=queue_events + made.events + deletions + limits, result=after, created=False,
                    after=made.after)


def decide_delete_deployment(cmd: DeleteDeployment, deployment: Deployment | None, claim: UniqueKeyClaim | None,
                             ctx: DecisionContext, indexed: IndexedRuns = IndexedRuns(),
                             limit: LimitState = LimitState()) -> Decision:
    """DP-8: the (flow, name) key is free again at once; its limit goes with it, and its
    schedules' runs that never ran (past ones too). Its runs made on demand that never ran go
    after it, by the foreman (`DeleteRunOfDeletedDeployment`)."""
    if deployment is None:
        raise deployment_not_found(cmd.id)
    releases = ([DEPLOYMENT_NAME.release(deployment.id, str(deployment.flow_id), deployment.name)]
                if claim is not None and claim.owner_id == deployment.id else [])
    deleted = DeploymentDeleted(deployment_id=deployment.id, flow_id=deployment.flow_id, name=deployment.name,
                                deleted=ctx.now)
    deletions = delete_scheduled_runs(deployment.id, indexed, ctx.now, future_only=False, revision=ctx.now)
    limits = limit_events(deployment.id, None, limit, ctx)
    return Decision(events=[*releases, *deletions, *limits, NewEvent(str(deployment.id), deleted)], result=None)


def decide_delete_run_of_deleted_deployment(cmd: DeleteRunOfDeletedDeployment, run: FlowRun | None,
                                            deployment: Deployment | None, deployment_in_log: bool,
                                            claim: UniqueKeyClaim | None, ctx: DecisionContext,
                                            limits: slots.Limits = slots.NO_LIMITS) -> Decision:
    """DP-8's runs made on demand, deleted after the deployment by a sweep rather than with it.
    The command side cannot list them without reading the read model: a run names its
    deployment, not the other way round, and an index of them in the log, written with every
    run made from a deployment, doubled the cost of the busiest write there is. So the delete
    takes the auto-scheduled runs it indexes at once, and the foreman finds the rest in the
    read model and sends each here, where everything is checked again on the log (a stale read
    model, a repeat or a second foreman change nothing): the run must still name the
    deployment and be `deletable` (the same rule as the auto-scheduled ones), and the
    deployment must be gone from a log that held it (`deployment_in_log`: it has events). A
    run naming a deployment the log never held is kept, as Prefect keeps it. The deletion is
    `DeleteFlowRun`'s (idempotency key, slots); `created` says whether it happened."""
    if (run is None or run.deployment_id != cmd.deployment_id or deployment is not None or not deployment_in_log
            or not deletable(run)):
        return Decision(events=[], result=None, created=False)
    deleted = decide_delete_flow_run(DeleteFlowRun(id=run.id), run, claim, ctx, limits)
    return Decision(events=deleted.events, result=None, created=True)


def decide_set_paused(deployment_id: uuid.UUID, paused: bool, deployment: Deployment | None,
                      ctx: DecisionContext, indexed: IndexedRuns = IndexedRuns()) -> Decision:
    """DP-9 and DP-10: idempotent; the schedules' `active` flags stay as they are. A pause
    deletes the runs the schedules made that never ran, past ones (Late) too; a resume makes
    none (the scheduler does). A change is noted in the index (`indexed.index` loaded for it,
    its runs only for a pause)."""
    if deployment is None:
        raise deployment_not_found(deployment_id)
    if deployment.paused == paused:
        deletions = delete_scheduled_runs(deployment.id, indexed, ctx.now, future_only=False) if paused else []
        return Decision(events=deletions, result=None)
    after = deployment.model_copy(update={"paused": paused, "updated": ctx.now})
    index_events = (delete_scheduled_runs(deployment.id, indexed, ctx.now, future_only=False, revision=after.updated)
                    if paused else [revised(deployment.id, after.updated)])
    return Decision(events=[NewEvent(str(after.id), DeploymentUpdated(deployment=after, changed=["paused"],
                                                                      by_pause_or_resume=True)),
                            *index_events], result=None, after={str(after.id): after})


def decide_create_schedules(cmd: CreateDeploymentSchedules, deployment: Deployment | None,
                            ctx: DecisionContext) -> Decision:
    """SC-7: added beside the existing ones (their `max_scheduled_runs` kept)."""
    if deployment is None:
        raise deployment_not_found(cmd.deployment_id)
    made = _new_schedules(cmd.schedules, deployment.id, ctx, keep_max_runs=True)
    schedules = [*deployment.schedules, *made]
    if len(schedules) > MAX_SCHEDULES:
        raise invalid(f"a deployment has at most {MAX_SCHEDULES} schedules", field="schedules")
    _slugs_unique(schedules)
    after = deployment.model_copy(update={"schedules": schedules, "updated": ctx.now})
    return Decision(events=[NewEvent(str(after.id), DeploymentUpdated(deployment=after, changed=["schedules"])),
                            revised(deployment.id, after.updated)],
                    result=made, created=True, after={str(after.id): after})


def _schedule_at(deployment: Deployment, schedule_id: uuid.UUID) -> int:
    at = next((i for i, s in enumerate(deployment.schedules) if s.id == schedule_id), None)
    if at is None:
        raise not_found("Schedule not found.")
    return at


def decide_update_schedule(cmd: UpdateDeploymentSchedule, deployment: Deployment | None,
                           ctx: DecisionContext, indexed: IndexedRuns = IndexedRuns()) -> Decision:
    """SC-7: the deployment's future scheduled runs go (they may no longer match)."""
    if deployment is None:
        raise deployment_not_found(cmd.deployment_id)
    at = _schedule_at(deployment, cmd.schedule_id)
    schedules = list(deployment.schedules)
    schedules[at] = _patched(schedules[at], cmd, ctx.now)
    _slugs_unique(schedules)
    after = deployment.model_copy(update={"schedules": schedules, "updated": ctx.now})
    made = _updated(deployment, after)
    deletions = delete_scheduled_runs(deployment.id, indexed, ctx.now, future_only=True,
                                      revision=after.updated if made.events else None)
    return Decision(events=made.events + deletions, result=None, after=made.after)


def decide_delete_schedule(cmd: DeleteDeploymentSchedule, deployment: Deployment | None,
                           ctx: DecisionContext, indexed: IndexedRuns = IndexedRuns()) -> Decision:
    """SC-7: every auto-scheduled run of the deployment that never ran goes, past ones too, not
    only this schedule's (Prefect deletes them all; the scheduler makes the others again)."""
    if deployment is None:
        raise deployment_not_found(cmd.deployment_id)
    at = _schedule_at(deployment, cmd.schedule_id)
    schedules = [s for i, s in enumerate(deployment.schedules) if i != at]
    after = deployment.model_copy(update={"schedules": schedules, "updated": ctx.now})
    deletions = delete_scheduled_runs(deployment.id, indexed, ctx.now, future_only=False, revision=after.updated)
    return Decision(events=[NewEvent(str(after.id), DeploymentUpdated(deployment=after, changed=["schedules"])),
                            *deletions], result=None, after={str(after.id): after})
