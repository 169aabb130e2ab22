"""Flow runs: one execution of a flow, moved through its states by orchestration.

`FlowRun` is the one definition of a run's shape: the aggregate's state, the payload of its
events, the read model's row and both replies. Its current `state` is part of it; every
written state is also an event of its own (`FlowRunStateSet`), so a run's history is its log.
"""

from __future__ import annotations

import uuid
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Annotated, Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, model_validator

from . import concurrency_limits as cl
from . import orchestration_rules, slots
from . import work_pools as wp
from .bounds import (
    INT32_MAX,
    RUN_STATE_HEADROOM_BYTES,
    UPDATE_SLACK_BYTES,
    JsonDocument,
    SizedParameters,
    StoredText,
    UtcDatetime,
)
from .decisions import Decision, NewEvent
from .events import register_event
from .flows import Tags
from .messages import (
    EXPIRY_MARGIN_SECONDS,
    Command,
    DecisionContext,
    Event,
    empty_dict,
    empty_list,
    invalid,
    new_model_default,
    not_found,
)
from .names import MAX_NAME_LENGTH
from .schedules import scheduled_run_id
from .states import TERMINAL, CreatedBy, State, StateCreate, StateDetails, StateType
from .unique_keys import UniqueKeyClaim, UniqueKeyScope
from .workers import WorkerName

if TYPE_CHECKING:
    from .deployments import Deployment

FLOW_RUN = "flow_run"
# How many runs a service keeps decided state of (~6 KB each): the runs moving now. Older ones
# are loaded again from the log (one direct get) when touched.
CACHED_RUNS = 20_000
# A run's idempotency key is unique within its flow (FR-2): key (flow id, idempotency key).
FLOW_RUN_KEY = UniqueKeyScope("flow_run_key")


class FlowRunPolicy(BaseModel):
    """Prefect's `empirical_policy`: retries, and what pauses and retries have left behind."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    max_retries: int = 0  # deprecated in Prefect; kept for its clients
    retry_delay_seconds: float = 0  # deprecated in Prefect; kept for its clients
    retries: int | None = None
    retry_delay: int | None = None
    pause_keys: list[str] = []
    resuming: bool = False
    retry_type: Literal["in_process", "reschedule"] | None = None


class FlowRun(BaseModel):
    """A flow run, as stored, projected and answered (Prefect's field names; durations in
    seconds, as Prefect writes them)."""

    model_config = ConfigDict(extra="forbid", frozen=True, ser_json_timedelta="float")

    id: uuid.UUID
    created: UtcDatetime
    updated: UtcDatetime
    name: str
    flow_id: uuid.UUID
    state_id: uuid.UUID | None = None
    deployment_id: uuid.UUID | None = None
    deployment_version: str | None = None
    work_queue_name: str | None = None
    work_queue_id: uuid.UUID | None = None
    flow_version: str | None = None
    parameters: dict[str, Any] = empty_dict()
    idempotency_key: str | None = None
    context: dict[str, Any] = empty_dict()
    empirical_policy: FlowRunPolicy = new_model_default(FlowRunPolicy)
    tags: list[str] = empty_list()
    labels: dict[str, Any] = empty_dict()
    parent_task_run_id: uuid.UUID | None = None
    state_type: StateType | None = None
    state_name: str | None = None
    run_count: int = 0
    expected_start_time: UtcDatetime | None = None
    next_scheduled_start_time: UtcDatetime | None = None
    start_time: UtcDatetime | None = None
    end_time: UtcDatetime | None = None
    total_run_time: timedelta = Field(default=timedelta(0))
    auto_scheduled: bool = False
    infrastructure_document_id: uuid.UUID | None = None
    infrastructure_pid: str | None = None
    created_by: CreatedBy | None = None
    job_variables: dict[str, Any] = empty_dict()
    state: State | None = None
    # Beyond Prefect: a run's priority within its queue (lower first, like queue priorities),
    # changeable while it waits; and why it waits, when something holds it back.
    priority: int = 0
    waiting_reason: str | None = None
    # Beyond Prefect: the worker whose claim the run holds (named when it claimed it), while
    # the run is PENDING, RUNNING or CANCELLING; if that worker stops sending heartbeats the
    # run is crashed and its slots given back (`CrashFlowRunOfLostWorker`).
    worker_name: str | None = None
    # The run stayed PENDING longer than its deployment slot's lease lasts and gave the slot
    # back (`ExpireDeploymentSlotLease`): it holds none, and takes one again when it starts
    # running, or is cancelled if none is free (OR-6). Cleared by the next state written.
    deployment_lease_expired: bool = False
    # When the deployment slot's lease runs out, once the process running the run has renewed
    # it (`RenewDeploymentSlotLease`, as Prefect's engine renews it while the flow runs): from
    # then on the slot is given back at that time unless renewed again, whatever the state
    # that holds it. None: never renewed, so a PENDING run's lease lasts `lease_seconds` from
    # its PENDING state and a RUNNING one's lasts until the run ends (its worker's heartbeats
    # stand for it, as for Prefect's clients that do not renew). Kept while the run holds the
    # same lease; cleared with it.
    deployment_lease_expiration: UtcDatetime | None = None
    # Beyond Prefect: a release that woke this run (waiting for its deployment's slot) handed it
    # its queue's and pool's slot too, which it holds while it stays SCHEDULED, so that its
    # claim writes nothing but its own state (`slots.hand_over`). Cleared by the next state.
    pool_slot_reserved: bool = False


def run_estimates(run: Any, now: datetime) -> dict[str, float]:
    """Prefect's `estimated_run_time` and `estimated_start_time_delta` (seconds) of a flow or
    task run, as of `now`: they change while the run runs or waits, so they are computed when
    a reply is made, never stored. Run time: `total_run_time`, plus the time in the current
    state while RUNNING. Start delta: how late it started; if it has not started, is not
    finished and was expected already, how late it is now; else 0."""
    run_time = run.total_run_time
    if run.state_type is StateType.RUNNING and run.state is not None:
        run_time += now - run.state.timestamp
    expected, started = run.expected_start_time, run.start_time
    delta = timedelta(0)
    if started is not None and expected is not None and started > expected:
        delta = started - expected
    elif started is None and expected is not None and expected < now and run.state_type not in TERMINAL:
        delta = now - expected
    return {"estimated_run_time": run_time.total_seconds(), "estimated_start_time_delta": delta.total_seconds()}


def flow_run_reply(run: FlowRun, now: datetime) -> dict[str, Any]:
    """A run as replies carry it: the run, and its estimates as of `now` (FR-1)."""
    return {**run.model_dump(mode="json"), **run_estimates(run, now)}


# ---------------------------------------------------------------------------------------------
# Events


class _FlowRunEvent(Event):
    aggregate_type: ClassVar[str] = FLOW_RUN


@register_event
class FlowRunCreated(_FlowRunEvent):
    """A new run, with its first state (`run.state`)."""

    event_type: ClassVar[str] = "FlowRunCreated"
    run: FlowRun

    def append_headroom(self) -> int:
        return RUN_STATE_HEADROOM_BYTES  # every later state carries the whole run again


@register_event
class FlowRunStateSet(_FlowRunEvent):
    """A state was written (`run.state`, with the bookkeeping it caused)."""

    event_type: ClassVar[str] = "FlowRunStateSet"
    run: FlowRun


@register_event
class FlowRunUpdated(_FlowRunEvent):
    event_type: ClassVar[str] = "FlowRunUpdated"
    run: FlowRun
    changed: list[str]

    def append_headroom(self) -> int:
        # An update (parameters, job variables, tags) may grow the run: it must leave nearly the
        # room its creation had to, so that a run made within the rules can always be updated.
        return RUN_STATE_HEADROOM_BYTES - UPDATE_SLACK_BYTES


@register_event
class FlowRunWaiting(_FlowRunEvent):
    """A claim was refused because a limit is full, and nothing else was written: the run's
    `waiting_reason` says which (recorded when it changes, not at every refused claim)."""

    event_type: ClassVar[str] = "FlowRunWaiting"
    run: FlowRun


@register_event
class FlowRunDeploymentLeaseExpired(_FlowRunEvent):
    """The run's deployment slot's lease ran out (it stayed PENDING longer than the lease
    lasts, or the process running it stopped renewing it): the slot was given back in the same
    append (`run.deployment_lease_expired`; `lease_id`: the lease that expired)."""

    event_type: ClassVar[str] = "FlowRunDeploymentLeaseExpired"
    run: FlowRun
    lease_id: uuid.UUID


@register_event
class FlowRunDeploymentLeaseRenewed(_FlowRunEvent):
    """The process running the run renewed its deployment slot's lease: it now runs out at
    `run.deployment_lease_expiration` (`lease_seconds` from the renewal). The first renewal of
    a lease is kept in the log: it is what makes the lease run out at all. The later ones
    (`routine`) each carry the whole run, so only the latest matters: they expire from the log
    (`Settings.routine_retention_seconds`), but not while they may still be the run's latest
    word. A run renewing every few minutes would otherwise add hundreds of events a day to the
    log, for ever."""

    event_type: ClassVar[str] = "FlowRunDeploymentLeaseRenewed"
    run: FlowRun
    lease_id: uuid.UUID
    lease_seconds: float
    routine: bool = False

    def expires_no_sooner_than(self) -> float | None:
        # Past the moment the lease runs out without a newer renewal: by then a newer one, or the
        # foreman's FlowRunDeploymentLeaseExpired (kept), says what this one said.
        return self.lease_seconds + EXPIRY_MARGIN_SECONDS if self.routine else None


@register_event
class FlowRunDeleted(_FlowRunEvent):
    event_type: ClassVar[str] = "FlowRunDeleted"
    flow_run_id: uuid.UUID
    flow_id: uuid.UUID
    deleted: datetime


# ---------------------------------------------------------------------------------------------
# Commands

RunName = Annotated[StoredText, StringConstraints(max_length=MAX_NAME_LENGTH)]
ShortText = Annotated[StoredText, StringConstraints(max_length=10_000)]
RunPriority = Annotated[int, Field(ge=-INT32_MAX, le=INT32_MAX)]


class FlowRunPolicyInput(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    max_retries: Annotated[int, Field(ge=0, le=INT32_MAX)] = 0
    retry_delay_seconds: Annotated[float, Field(ge=0, le=INT32_MAX, allow_inf_nan=False)] = 0
    retries: Annotated[int, Field(ge=0, le=INT32_MAX)] | None = None
    retry_delay: Annotated[int, Field(ge=0, le=INT32_MAX)] | None = None
    pause_keys: Annotated[list[ShortText], Field(max_length=1_000)] = []
    resuming: bool = False
    retry_type: Literal["in_process", "reschedule"] | None = None

    @model_validator(mode="before")
    @classmethod
    def _deprecated_fields_still_retry(cls, values: Any) -> Any:
        """Prefect's `set_run_policy_deprecated_fields`: older clients send only `max_retries`
        and `retry_delay_seconds`, and their runs must retry all the same (OR-12)."""
        if not isinstance(values, dict):
            return values
        values = dict(values)
        if not values.get("retries") and values.get("max_retries", 0) != 0:
            values["retries"] = values["max_retries"]
        if not values.get("retry_delay") and values.get("retry_delay_seconds", 0) != 0:
            values["retry_delay"] = values["retry_delay_seconds"]
        return values

    def policy(self) -> FlowRunPolicy:
        if not self.model_fields_set:  # most runs: one shared, frozen default, neither dumped nor validated
            return _DEFAULT_POLICY
        return FlowRunPolicy.model_validate(self.model_dump())


_DEFAULT_POLICY = FlowRunPolicy()


class CreateFlowRun(Command):
    """A new run. `idempotency_key` is Prefect's: the existing run of this flow with this key comes
    back unchanged (`created: false`). The bus's own key is `request_idempotency_key` here."""

    BUS_KEY_FIELD: ClassVar[str | None] = "request_idempotency_key"
    request_idempotency_key: StoredText | None = None

    flow_id: uuid.UUID
    name: RunName | None = None
    state: StateCreate | None = None
    deployment_id: uuid.UUID | None = None
    deployment_version: ShortText | None = None
    flow_version: ShortText | None = None
    parameters: SizedParameters = empty_dict()
    context: JsonDocument = empty_dict()
    empirical_policy: FlowRunPolicyInput = new_model_default(FlowRunPolicyInput)
    tags: Tags = empty_list()
    labels: JsonDocument = empty_dict()
    parent_task_run_id: uuid.UUID | None = None
    work_pool_name: wp.PoolName | None = None
    work_queue_name: wp.QueueName | None = None
    infrastructure_document_id: uuid.UUID | None = None
    job_variables: JsonDocument = empty_dict()
    priority: RunPriority = 0


class SetFlowRunState(Command):
    """Propose a state; the orchestration rules decide what is written. `worker_name` (beyond
    Prefect): the worker of the run's pool that claims it; it must be ONLINE, and the run's
    claim then lasts as long as that worker's heartbeats."""

    id: uuid.UUID
    state: StateCreate
    force: bool = False
    worker_name: WorkerName | None = None


class MarkFlowRunLate(Command):
    """Sent by the clock: a run still `Scheduled` past its time is marked `Late`, keeping the
    time it was due, by Prefect's late-runs rules rather than the core ones: a run of a
    deployment that cancels new runs when full is cancelled instead while it is full. Nothing
    is written when the run has moved on or is late already."""

    id: uuid.UUID


class CrashFlowRunOfLostWorker(Command):
    """The foreman's: a run claimed by a worker that has gone OFFLINE (or was deleted) is
    crashed, and the slots it held are given back. Nothing happens when the run has moved on
    or its worker is ONLINE again."""

    id: uuid.UUID
    worker_name: WorkerName


class ExpireDeploymentSlotLease(Command):
    """The foreman's: a run that has held its deployment's slot in PENDING for longer than the
    slot's lease lasts (the deployment's `concurrency_options.grace_period_seconds`, else the
    service's `deployment_slot_lease_seconds`, 300 s by default) gives the slot back, as
    Prefect's lease reaper does. Beyond Prefect, the same for a waiting run that a release
    handed its slots (`slots.hand_over`) and that nobody claimed within the service's
    `handed_slot_seconds`. Nothing happens when the run has moved on, holds another lease, or
    its lease has time left."""

    id: uuid.UUID
    lease_id: uuid.UUID


# Prefect's bounds on a renewal's lease duration are 60 s to a day; runledger takes shorter ones.
MAX_LEASE_SECONDS = 86_400.0
LEASE_NOT_FOUND = "Lease not found - it may have expired or been revoked"


class RenewDeploymentSlotLease(Command):
    """The process running a flow run keeps the run's deployment concurrency slot: the lease
    then runs out `lease_seconds` from now unless renewed again (Prefect's lease renewal,
    which its engine sends every three quarters of the lease while the flow runs). Once a
    lease has been renewed, the foreman gives the slot back when it runs out, so a process
    that dies holds it no longer than that (Prefect issue #17415). `lease_id`: the lease the
    caller holds; none: whichever the run holds now. `not_found` when the run holds no lease,
    or not that one: it ran out, or the run gave the slot back."""

    id: uuid.UUID
    lease_id: uuid.UUID | None = None
    lease_seconds: Annotated[float, Field(gt=0, le=MAX_LEASE_SECONDS, allow_inf_nan=False)] = 300.0


class UpdateFlowRun(Command):
    """Only the fields named change. `priority` (beyond Prefect) only while the run
    waits (SCHEDULED)."""

    id: uuid.UUID
    name: RunName | None = None
    flow_version: ShortText | None = None
    parameters: SizedParameters | None = None
    empirical_policy: FlowRunPolicyInput | None = None
    tags: Tags | None = None
    infrastructure_pid: ShortText | None = None
    job_variables: JsonDocument | None = None
    priority: RunPriority | None = None


class DeleteFlowRun(Command):
    id: uuid.UUID


class DeleteFinishedFlowRun(Command):
    """The vacuum's (`RUNLEDGER_FLOW_RUN_RETENTION_SECONDS`): a run that ended before
    `ended_before` and is still in a final state is deleted as `DeleteFlowRun` deletes it.
    Nothing happens when the run is gone, has moved on from its final state (rerun), or
    ended later."""

    id: uuid.UUID
    ended_before: UtcDatetime


# ---------------------------------------------------------------------------------------------
# Evolve and decide


def evolve(run: FlowRun | None, event: Event) -> FlowRun | None:
    match event:
        case (FlowRunCreated(run=r) | FlowRunStateSet(run=r) | FlowRunUpdated(run=r) | FlowRunWaiting(run=r)
              | FlowRunDeploymentLeaseExpired(run=r) | FlowRunDeploymentLeaseRenewed(run=r)):
            return r
        case FlowRunDeleted():
            return None
    return run


def flow_run_not_found(flow_run_id: uuid.UUID | None = None) -> Exception:
    return not_found("Flow run not found")


def key_of(flow_id: uuid.UUID, idempotency_key: str) -> str:
    """The aggregate id of a run's (flow, idempotency key) claim."""
    return FLOW_RUN_KEY.aggregate_id(str(flow_id), idempotency_key)


_ADJECTIVES = ("amber", "bold", "brisk", "calm", "clever", "crimson", "daring", "eager", "fancy", "gentle",
               "golden", "hasty", "icy", "jolly", "keen", "lively", "lucky", "mellow", "nimble", "olive",
               "proud", "quick", "quiet", "rapid", "royal", "rustic", "silver", "smart", "snappy", "steady",
               "sturdy", "swift", "tidy", "tough", "urban", "vivid", "wise", "witty", "zesty", "zippy")
_ANIMALS = ("badger", "beaver", "bison", "bobcat", "camel", "cheetah", "coyote", "crane", "dingo", "dolphin",
            "eagle", "falcon", "ferret", "gazelle", "gecko", "heron", "ibis", "jackal", "jaguar", "koala",
            "lemur", "lynx", "marmot", "mink", "moose", "newt", "ocelot", "otter", "panda", "puffin",
            "quail", "raven", "seal", "sloth", "tapir", "toucan", "vulture", "walrus", "yak", "zebra")


def run_name(run_id: uuid.UUID) -> str:
    """A two-word name, as Prefect gives a run without one; derived from the id, so a decision
    replays to the same name."""
    n = run_id.int
    return f"{_ADJECTIVES[n % len(_ADJECTIVES)]}-{_ANIMALS[(n // len(_ADJECTIVES)) % len(_ANIMALS)]}"


def scheduled_run_of_key(idempotency_key: str) -> uuid.UUID | None:
    """The id of the run a schedule made under `idempotency_key`, when the key has the shape a
    schedule gives its runs (`scheduled <deployment id> <schedule id> <date>`); else None.
    A schedule writes no claim for its runs' keys (a claim per scheduled run cost too much):
    the key holds its run through that run's id, derived from the same three parts."""
    parts = idempotency_key.split(" ", 3)
    if len(parts) != 4 or parts[0] != "scheduled":
        return None
    try:
        deployment_id, schedule_id, date = uuid.UUID(parts[1]), uuid.UUID(parts[2]), datetime.fromisoformat(parts[3])
    except ValueError:
        return None
    if date.tzinfo is None:
        return None
    return scheduled_run_id(deployment_id, schedule_id, date)


def claim_of_scheduled_run(claim: UniqueKeyClaim, scheduled: FlowRun | None, flow_id: uuid.UUID,
                           idempotency_key: str) -> UniqueKeyClaim:
    """FR-2 for a key a schedule gave its run: `scheduled` (the run `scheduled_run_of_key`
    names, None if it does not exist) holds the key within its flow as a claim would, when it
    is of this flow and carries this very key. `claim`: the key's written claim."""
    if (claim.owner_id is None and scheduled is not None and scheduled.flow_id == flow_id
            and scheduled.idempotency_key == idempotency_key):
        return UniqueKeyClaim(scheduled.id)
    return claim


def inherited_labels(flow_id: uuid.UUID, flow_labels: dict[str, Any], deployment: Deployment | None) -> dict[str, Any]:
    """The labels a new run starts from, before its request's own (Prefect's
    `with_system_labels_for_flow_run`): a run naming an existing deployment takes the
    deployment's labels, then `prefect.flow.id` (the deployment's flow) and
    `prefect.deployment.id`; any other run its flow's labels, then `prefect.flow.id`."""
    if deployment is not None:
        return {**deployment.labels, "prefect.flow.id": str(deployment.flow_id),
                "prefect.deployment.id": str(deployment.id)}
    return {**flow_labels, "prefect.flow.id": str(flow_id)}


def _queue_fields(cmd: CreateFlowRun, pool: wp.WorkPool | None) -> dict[str, Any]:
    """FR-2: a pool means its default queue, or the named queue of it, which must exist."""
    if cmd.work_pool_name is None:
        return {"work_queue_name": cmd.work_queue_name, "work_queue_id": None}
    if pool is None:
        raise not_found(f'Work pool "{cmd.work_pool_name}" not found.')
    if cmd.work_queue_name is None:
        queue = pool.queues[pool.default_queue_id]
    else:
        found = pool.queue_named(cmd.work_queue_name)
        if found is None:
            raise not_found(f'Work queue "{cmd.work_queue_name}" not found in work pool "{cmd.work_pool_name}".')
        queue = found
    return {"work_queue_name": queue.name, "work_queue_id": queue.id}


def new_flow_run(cmd: CreateFlowRun, pool: wp.WorkPool | None, ctx: DecisionContext,
                 *, run_id: uuid.UUID | None = None, extra: dict[str, Any] | None = None,
                 inherited: dict[str, Any] | None = None) -> FlowRun:
    """The run a create makes, before its first state (the caller orchestrates that).
    `inherited`: the labels the request's own are laid over (`inherited_labels`)."""
    run_id = run_id or ctx.new_id()
    return FlowRun.model_validate({
        "id": run_id, "created": ctx.now, "updated": ctx.now, "name": cmd.name or run_name(run_id),
        "flow_id": cmd.flow_id, "deployment_id": cmd.deployment_id, "deployment_version": cmd.deployment_version,
        "flow_version": cmd.flow_version, "parameters": cmd.parameters, "idempotency_key": cmd.idempotency_key,
        "context": cmd.context, "empirical_policy": cmd.empirical_policy.policy(),
        "tags": list(dict.fromkeys(cmd.tags)), "labels": {**(inherited or {}), **cmd.labels},
        "parent_task_run_id": cmd.parent_task_run_id,
        "infrastructure_document_id": cmd.infrastructure_document_id, "job_variables": cmd.job_variables,
        "priority": cmd.priority, **_queue_fields(cmd, pool), **(extra or {}),
    })


def decide_create_flow_run(cmd: CreateFlowRun, claim: UniqueKeyClaim | None, existing: FlowRun | None,
                           flow_exists: bool, pool: wp.WorkPool | None, ctx: DecisionContext,
                           inherited: dict[str, Any] | None = None) -> Decision:
    """FR-2: an existing run of this flow with this key comes back unchanged, its state not
    applied; otherwise a new run, its first state applied with `force` semantics. `claim`: the
    key's holder (`claim_of_scheduled_run` included); `inherited`: the labels the new run
    starts from (`inherited_labels`; the handler always gives them)."""
    if not flow_exists:
        raise not_found(f"Flow {cmd.flow_id} not found.")
    if claim is not None and claim.owner_id is not None:
        if existing is None:  # the claim and its owner are written together; never apart
            raise RuntimeError(f"flow run key is claimed by {claim.owner_id}, which does not exist")
        return Decision(events=[], result=existing, created=False)
    run = new_flow_run(cmd, pool, ctx, inherited=inherited)
    transition = orchestration_rules.initial_flow_run_state(run, cmd.state, ctx)
    run = transition.run
    claims = ([FLOW_RUN_KEY.claim(run.id, str(cmd.flow_id), cmd.idempotency_key)]
              if cmd.idempotency_key is not None else [])
    return Decision(events=[*claims, NewEvent(str(run.id), FlowRunCreated(run=run))], result=run, created=True,
                    after={str(run.id): run})


def decide_set_state(cmd: SetFlowRunState, run: FlowRun | None, ctx: DecisionContext,
                     limits: slots.Limits = slots.NO_LIMITS) -> Decision:
    """FR-3: the result is the state written, or the current one when nothing is written.
    `limits`: the pool, queue and deployment limits the run may take or give back a slot of;
    their counts change in the same batch as the state (`slots.slot_events`)."""
    if run is None:
        raise flow_run_not_found(cmd.id)
    transition = orchestration_rules.set_flow_run_state(run, cmd.state, force=cmd.force, ctx=ctx, limits=limits,
                                                        claimant=cmd.worker_name)
    return _transition_decided(run, transition, cmd.worker_name, ctx, limits)


def decide_mark_late(cmd: MarkFlowRunLate, run: FlowRun | None, ctx: DecisionContext,
                     limits: slots.Limits = slots.NO_LIMITS) -> Decision:
    """FR-7, as `decide_set_state` answers: the state written (`Late`, or `Cancelled`), or the
    current one."""
    if run is None:
        raise flow_run_not_found(cmd.id)
    return _transition_decided(run, orchestration_rules.mark_flow_run_late(run, ctx, limits), None, ctx, limits)


def _transition_decided(run: FlowRun, transition: orchestration_rules.Transition, claimant: str | None,
                        ctx: DecisionContext, limits: slots.Limits) -> Decision:
    """The events of a transition: its state with the run's claim and why it waits, and the
    slot counts and waiters that follow."""
    waiting = transition.orchestration.reason if transition.waiting_for_a_slot else None
    if transition.state is not None and transition.state.type is not StateType.SCHEDULED:
        waiting = None  # cancelled (CANCEL_NEW) rather than waiting
    if transition.state is None:
        if waiting is None or waiting == run.waiting_reason:
            return Decision(events=[], result=run.state, orchestration=transition.orchestration)
        after = run.model_copy(update={"waiting_reason": waiting, "updated": ctx.now})
        return Decision(events=[NewEvent(str(run.id), FlowRunWaiting(run=after))], result=run.state,
                        after={str(run.id): after}, orchestration=transition.orchestration)
    after = transition.run.model_copy(update={"waiting_reason": waiting,
                                              "worker_name": _claimed_by(run, transition.run, claimant)})
    enqueued = waiting is not None and transition.refused_by == "secure_flow_concurrency_slots"
    events = [NewEvent(str(run.id), FlowRunStateSet(run=after)), *slot_bookkeeping(run, after, enqueued, limits, ctx)]
    return Decision(events=events, result=after.state, created=True, after={str(run.id): after},
                    orchestration=transition.orchestration)


def _claimed_by(before: FlowRun, after: FlowRun, claimant: str | None) -> str | None:
    """A run keeps the worker that claimed it while it holds its claim; a state proposed by
    another named worker (the one that runs it now) takes the claim over."""
    if after.state_type not in slots.DEPLOYMENT_SLOT_STATES:
        return None
    return claimant or before.worker_name


LOST_WORKER_MESSAGE = "Worker {name!r} of work pool {pool!r} stopped sending heartbeats; its run crashed."


def decide_crash_run_of_lost_worker(cmd: CrashFlowRunOfLostWorker, run: FlowRun | None, worker_online: bool,
                                    pool_name: str, ctx: DecisionContext,
                                    limits: slots.Limits = slots.NO_LIMITS) -> Decision:
    """`worker_online`: the worker exists and is ONLINE (it came back: its runs are its own)."""
    if run is None:
        raise flow_run_not_found(cmd.id)
    if worker_online or run.worker_name != cmd.worker_name or run.state_type not in slots.DEPLOYMENT_SLOT_STATES:
        return Decision(events=[], result=run.state)
    crash = SetFlowRunState(id=run.id, force=True, state=StateCreate(
        type=StateType.CRASHED, message=LOST_WORKER_MESSAGE.format(name=cmd.worker_name, pool=pool_name)))
    return decide_set_state(crash, run, ctx, limits)


def deployment_lease_runs_out(run: FlowRun, limits: slots.Limits) -> datetime | None:
    """When the deployment slot's lease the run holds runs out, if it does: once renewed, when
    the last renewal said (`deployment_lease_expiration`), in whichever state holds the slot;
    never renewed, `limits.lease_seconds` after its PENDING state, and never while RUNNING or
    CANCELLING (a run claimed by a worker is crashed when its worker goes offline, and a
    process that does not renew would lose its slot while its flow still runs)."""
    if run.state is None or slots.deployment_lease(run) is None or run.state_type not in slots.DEPLOYMENT_SLOT_STATES:
        return None
    if run.deployment_lease_expiration is not None:
        return run.deployment_lease_expiration
    if run.state_type is StateType.PENDING:
        return run.state.timestamp + timedelta(seconds=limits.lease_seconds)
    return None


def decide_renew_deployment_slot_lease(cmd: RenewDeploymentSlotLease, run: FlowRun | None,
                                       ctx: DecisionContext) -> Decision:
    """As Prefect's lease storage, a lease is renewed as long as the run holds it, even past
    its time when the foreman has not given it back yet: whichever of the two is decided first
    on the log wins, and the other sees its outcome."""
    if run is None:
        raise flow_run_not_found(cmd.id)
    lease = slots.deployment_lease(run)
    if (lease is None or run.state_type not in slots.DEPLOYMENT_SLOT_STATES
            or (cmd.lease_id is not None and cmd.lease_id != lease)):
        raise not_found(LEASE_NOT_FOUND)
    after = run.model_copy(update={"deployment_lease_expiration": ctx.now + timedelta(seconds=cmd.lease_seconds)})
    renewed = FlowRunDeploymentLeaseRenewed(run=after, lease_id=lease, lease_seconds=cmd.lease_seconds,
                                            routine=run.deployment_lease_expiration is not None)
    return Decision(events=[NewEvent(str(run.id), renewed)], result=after, after={str(run.id): after})


def decide_expire_deployment_slot_lease(cmd: ExpireDeploymentSlotLease, run: FlowRun | None,
                                        ctx: DecisionContext, limits: slots.Limits = slots.NO_LIMITS) -> Decision:
    """A slot held by a run whose infrastructure never came up, or by a run whose process died
    after renewing its lease, would otherwise be held for ever, and every other run of the
    deployment would wait behind it (Prefect bounds it with the lease's time to live;
    runledger's worker heartbeats cover a worker that died, not a worker that is alive but
    whose run never starts, nor a run no worker claimed). The slot goes back and wakes the
    next waiter; the run stays in its state: a PENDING one takes a slot again at its start
    (OR-6), or is cancelled; a RUNNING one runs on without it, as in Prefect, and its
    process, told so by its next renewal, may stop it."""
    if run is None:
        raise flow_run_not_found(cmd.id)
    lease = slots.deployment_lease(run)
    if slots.holds_handed_slots(run):
        return _unclaimed_handed_slots(cmd, run, ctx, limits)
    runs_out = deployment_lease_runs_out(run, limits)
    # A renewed lease runs out even when its limit is gone (nothing to give back then): its last
    # renewal is a routine event that leaves the log, so the run's state must not rest on it.
    no_limit = limits.deployment_limit is None and run.deployment_lease_expiration is None
    if lease is None or lease != cmd.lease_id or no_limit or runs_out is None or ctx.now < runs_out:
        return Decision(events=[], result=run.state)
    after = run.model_copy(update={"deployment_lease_expired": True, "deployment_lease_expiration": None,
                                   "updated": ctx.now})
    events = [NewEvent(str(run.id), FlowRunDeploymentLeaseExpired(run=after, lease_id=lease)),
              *slot_bookkeeping(run, after, False, limits, ctx)]
    return Decision(events=events, result=after.state, created=True, after={str(run.id): after})


def _unclaimed_handed_slots(cmd: ExpireDeploymentSlotLease, run: FlowRun, ctx: DecisionContext,
                            limits: slots.Limits) -> Decision:
    """A waiter handed its slots by a release, whose worker never came for it (it stopped
    polling, or polls other queues): the slots go back, to the next waiter if there is one,
    and the run waits again at the end of the line, due now, so a poll still offers it."""
    assert run.state is not None
    if (slots.deployment_lease(run) != cmd.lease_id
            or ctx.now < run.state.timestamp + timedelta(seconds=limits.handed_slot_seconds)):
        return Decision(events=[], result=run.state)
    again = StateCreate(type=StateType.SCHEDULED, name=_AWAITING, state_details=StateDetails(scheduled_time=ctx.now),
                        message=f"The slot handed to this run went unclaimed for {limits.handed_slot_seconds:g} s "
                                "and was given back; the run waits for its turn again.")
    after = orchestration_rules.set_flow_run_state(run, again, force=True, ctx=ctx).run
    events = [NewEvent(str(run.id), FlowRunStateSet(run=after)), *slot_bookkeeping(run, after, True, limits, ctx)]
    return Decision(events=events, result=after.state, created=True, after={str(run.id): after})


def slot_bookkeeping(before: FlowRun | None, after: FlowRun | None, enqueued: bool, limits: slots.Limits,
                     ctx: DecisionContext) -> list[NewEvent]:
    """What follows from the run going from `before` to `after` (None: created, or deleted):
    its slot counts (`slots.slot_events`), then its deployment limit's waiters."""
    changes = slots.slot_events(before, after, limits)
    return [*changes, *waiter_events(before, after, enqueued, limits, ctx, changes)]


def waiter_events(before: FlowRun | None, after: FlowRun | None, enqueued: bool, limits: slots.Limits,
                  ctx: DecisionContext, changes: list[NewEvent]) -> list[NewEvent]:
    """A run sent to wait for its deployment's slot (`enqueued`) joins the limit's waiters; a
    run that gives its slot back wakes the first waiter still waiting and hands it the slots
    it freed (`slots.hand_over`): its next attempt is due at once, not after the retry delay,
    and no other run can take them meanwhile. A waiter that took a slot, or moved on, leaves.
    `changes`: the slot events of `before` -> `after`, which the hand-over follows."""
    waiters = limits.waiters
    run = after or before
    if waiters is None or run is None:
        return []
    ids = list(waiters.run_ids)
    added = woken = None
    dropped: list[uuid.UUID] = []
    events: list[NewEvent] = []
    if enqueued and run.id not in ids and len(ids) < slots.MAX_WAITERS:
        ids.append(run.id)
        added = run.id
    if slots.deployment_lease(after) is not None and run.id in ids:
        ids.remove(run.id)  # it holds a slot now
    freed = any(isinstance(new.event, cl.ConcurrencyLimitSlotReleased) for new in changes)
    if freed and slots.deployment_lease(after) is None:
        for waiter_id in ids[:slots.WAKE_LOOKAHEAD]:
            if waiter_id not in limits.first_waiters:
                break  # not loaded: leave it for the next release
            waiter = limits.first_waiters[waiter_id]
            if waiter is None or waiter.state_type is not StateType.SCHEDULED or waiter.state_name != _AWAITING:
                dropped.append(waiter_id)
                continue
            wake = StateCreate(type=StateType.SCHEDULED, name=_AWAITING,
                               message="A slot of the deployment's concurrency limit was freed.",
                               state_details=StateDetails(scheduled_time=ctx.now))
            woke = orchestration_rules.set_flow_run_state(waiter, wake, force=True, ctx=ctx).run
            after_release = slots.limits_after(limits, changes)
            handed = slots.hand_over(woke, after_release, ctx.new_id())
            events.append(NewEvent(str(waiter.id), FlowRunStateSet(run=handed)))
            events += slots.slot_events(waiter, handed, after_release)
            woken = waiter_id
            break
        ids = [i for i in ids if i not in dropped and i != woken]
    if ids != waiters.run_ids:
        changed = slots.LimitWaitersChanged(waiters=waiters.model_copy(update={"run_ids": ids}), added=added,
                                            woken=woken, dropped=dropped)
        events.append(NewEvent(slots.waiters_id(waiters.limit_id), changed))
    return events


_AWAITING = "AwaitingConcurrencySlot"


def decide_update_flow_run(cmd: UpdateFlowRun, run: FlowRun | None, ctx: DecisionContext,
                           job_variables_problem: str | None = None) -> Decision:
    """FR-8. Job variables change only while the run is SCHEDULED and has a deployment, and
    must fit its pool's schema (`job_variables_problem`: why they do not, found by the caller
    from the deployment and its pool); a null clears them whatever the state, as in Prefect,
    which checks only new ones. A run's priority changes only while it waits (SCHEDULED). A
    null or empty name gives the run a fresh one, as Prefect's update does."""
    if run is None:
        raise flow_run_not_found(cmd.id)
    given = cmd.explicitly_set() - {"id"}
    values: dict[str, Any] = {f: getattr(cmd, f) for f in given}
    if values.get("job_variables") is not None:
        if run.state_type is None:
            raise invalid("Flow run state is required to update job variables but none exists", field="job_variables")
        if run.state_type is not StateType.SCHEDULED:
            raise invalid(f"Job variables for a flow run in state {run.state_type.value} cannot be updated",
                          field="job_variables")
        if run.deployment_id is None:
            raise invalid("A deployment for the flow run could not be found", field="job_variables")
        if job_variables_problem is not None:
            raise invalid(f"Error updating flow run: {job_variables_problem}", field="job_variables")
    if "priority" in values and run.state_type is not StateType.SCHEDULED:
        raise invalid("A flow run's priority can change only while it is scheduled", field="priority")
    for nullable in ("parameters", "job_variables", "tags"):
        if nullable in values and values[nullable] is None:
            values[nullable] = [] if nullable == "tags" else {}
    if "tags" in values:
        values["tags"] = list(dict.fromkeys(values["tags"]))
    if values.get("empirical_policy") is not None:
        values["empirical_policy"] = values["empirical_policy"].policy()
    elif "empirical_policy" in values:
        values["empirical_policy"] = FlowRunPolicy()
    if "name" in values and not values["name"]:
        values["name"] = run_name(ctx.new_id())
    if "priority" in values and values["priority"] is None:
        raise invalid("priority cannot be null", field="priority")
    after = run.model_copy(update=values)
    changed = sorted(f for f in values if getattr(run, f) != getattr(after, f))
    if not changed:
        return Decision(events=[], result=None)
    after = after.model_copy(update={"updated": ctx.now})
    return Decision(events=[NewEvent(str(run.id), FlowRunUpdated(run=after, changed=changed))], result=None,
                    after={str(run.id): after})


def decide_delete_finished_flow_run(cmd: DeleteFinishedFlowRun, run: FlowRun | None, claim: UniqueKeyClaim | None,
                                    ctx: DecisionContext, limits: slots.Limits = slots.NO_LIMITS, *,
                                    parent_exists: bool = False) -> Decision:
    """The vacuum finds its candidates in read models, which may lag: the run's end is checked
    again on the log, so a run rerun meanwhile (forced out of its final state) is kept, and so
    is a subflow run whose parent task run is still there (`parent_exists`, in the log): it
    goes with its parent. `created` says whether it was deleted."""
    if (run is None or run.state_type not in TERMINAL or run.end_time is None or run.end_time >= cmd.ended_before
            or parent_exists):
        return Decision(events=[], result=None, created=False)
    deleted = decide_delete_flow_run(DeleteFlowRun(id=run.id), run, claim, ctx, limits)
    return Decision(events=deleted.events, result=None, created=True)


def decide_delete_flow_run(cmd: DeleteFlowRun, run: FlowRun | None, claim: UniqueKeyClaim | None,
                           ctx: DecisionContext, limits: slots.Limits = slots.NO_LIMITS) -> Decision:
    """The run's idempotency key is free again at once, and so are the slots it held (FR-8)."""
    if run is None:
        raise flow_run_not_found(cmd.id)
    releases = ([FLOW_RUN_KEY.release(run.id, str(run.flow_id), run.idempotency_key)]
                if run.idempotency_key is not None and claim is not None and claim.owner_id == run.id else [])
    deleted = FlowRunDeleted(flow_run_id=run.id, flow_id=run.flow_id, deleted=ctx.now)
    return Decision(events=[*releases, *slot_bookkeeping(run, None, False, limits, ctx), NewEvent(str(run.id), deleted)],
                    result=None)
