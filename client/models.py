"""What the client returns: the work pool, work queue, flow, variable, concurrency limit, task
tag concurrency limit, deployment, flow run, task run, state and run history reply shapes of the broker contract
(`work_pool_reply` / `work_queue_reply` in `runledger.commands.work_pools`, `Flow.reply` in
`runledger.commands.flows`, and the same for `Variable`, `ConcurrencyLimit`,
`TagConcurrencyLimit`, `Deployment`, `FlowRun`, `TaskRun` and `State`).

Unknown fields are kept (`extra="allow"`) so an older client still reads a newer service.
Datetimes dump back as the service writes them, in UTC with `Z`, so `model_dump(mode="json")`
reproduces the service's JSON (the CLI's `--json` relies on it)."""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, PlainSerializer

from runledger.commands.bounds import json_time

IsoDatetime = Annotated[datetime, PlainSerializer(json_time, return_type=str, when_used="json")]


class WorkPool(BaseModel):
    model_config = ConfigDict(extra="allow", frozen=True)

    id: uuid.UUID
    created: IsoDatetime
    updated: IsoDatetime
    name: str
    description: str | None = None
    type: str
    base_job_template: dict[str, Any] = {}
    is_paused: bool = False
    concurrency_limit: int | None = None
    status: str | None = None  # READY | NOT_READY | PAUSED; None for `prefect-agent` pools
    default_queue_id: uuid.UUID
    storage_configuration: dict[str, Any] = {}
    active_slots: int | None = None  # only with a concurrency limit


class WorkQueue(BaseModel):
    model_config = ConfigDict(extra="allow", frozen=True)

    id: uuid.UUID
    created: IsoDatetime
    updated: IsoDatetime
    name: str
    description: str | None = ""
    is_paused: bool = False
    concurrency_limit: int | None = None
    priority: int
    work_pool_id: uuid.UUID
    work_pool_name: str
    last_polled: IsoDatetime | None = None
    status: str | None = None  # READY | NOT_READY | PAUSED
    filter: Any = None  # Prefect's deprecated tag-based queue filter (legacy queues), else null
    active_slots: int | None = None  # only with a concurrency limit


class Flow(BaseModel):
    model_config = ConfigDict(extra="allow", frozen=True)

    id: uuid.UUID
    created: datetime  # not IsoDatetime: the service's `Flow.reply()` writes UTC as `Z`
    updated: datetime
    name: str
    tags: list[str] = []
    labels: dict[str, Any] = {}


class Variable(BaseModel):
    """A variable: a named JSON value (`Variable.reply` in `runledger.commands.variables`)."""

    model_config = ConfigDict(extra="allow", frozen=True)

    id: uuid.UUID
    created: datetime  # the service dumps the model itself: UTC as `Z`, as for a flow
    updated: datetime
    name: str
    value: Any = None
    tags: list[str] = []


class ConcurrencyLimit(BaseModel):
    """A global concurrency limit (`ConcurrencyLimit.reply` in
    `runledger.commands.concurrency_limits`; Prefect's `ConcurrencyLimitV2`)."""

    model_config = ConfigDict(extra="allow", frozen=True)

    id: uuid.UUID
    created: datetime
    updated: datetime
    name: str
    limit: int
    active: bool = True
    active_slots: int = 0
    denied_slots: int = 0
    slot_decay_per_second: float = 0.0
    avg_slot_occupancy_seconds: float = 2.0


class TagConcurrencyLimit(BaseModel):
    """A task tag concurrency limit (`TagConcurrencyLimit.reply` in
    `runledger.commands.tag_concurrency_limits`; Prefect's classic `ConcurrencyLimit`): at
    most `concurrency_limit` task runs carrying `tag` run at once; `active_slots` lists the
    task runs holding a slot."""

    model_config = ConfigDict(extra="allow", frozen=True)

    id: uuid.UUID
    created: datetime
    updated: datetime
    tag: str
    concurrency_limit: int
    active_slots: list[uuid.UUID] = []


# ---------------------------------------------------------------------------------------------
# Deployments, flow runs and states. The service dumps these models itself (pydantic's format,
# UTC as `Z`), so plain datetimes reproduce its JSON. Nested shapes the client does not read
# (a schedule's definition, a run's policy) stay JSON objects, kept as the service sent them.


class DeploymentSchedule(BaseModel):
    """One schedule of a deployment. `schedule` is `{"interval": seconds, "anchor_date",
    "timezone"}`, `{"cron", "timezone", "day_or"}` or `{"rrule", "timezone"}`."""

    model_config = ConfigDict(extra="allow", frozen=True)

    id: uuid.UUID
    created: datetime
    updated: datetime
    deployment_id: uuid.UUID
    schedule: dict[str, Any]
    active: bool = True
    max_scheduled_runs: int | None = None
    parameters: dict[str, Any] = {}
    slug: str | None = None


class Deployment(BaseModel):
    """A deployment (`Deployment.reply` in `runledger.commands.deployments`; Prefect's
    `DeploymentResponse`). Its concurrency limit is `global_concurrency_limit` (the global
    limit `deployment:<id>` that holds it); `concurrency_limit` is always null, as in Prefect."""

    model_config = ConfigDict(extra="allow", frozen=True)

    id: uuid.UUID
    created: datetime
    updated: datetime
    name: str
    flow_id: uuid.UUID
    version: str | None = None
    description: str | None = None
    paused: bool = False
    schedules: list[DeploymentSchedule] = []
    concurrency_limit: int | None = None
    global_concurrency_limit: dict[str, Any] | None = None
    concurrency_options: dict[str, Any] | None = None
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
    last_polled: datetime | None = None
    status: str | None = None  # READY | NOT_READY
    created_by: dict[str, Any] | None = None
    updated_by: dict[str, Any] | None = None


class DeploymentPage(BaseModel):
    """One page of `paginate_deployments`: the deployments, how many match in all, and the
    number of pages (0 when `limit` is 0)."""

    model_config = ConfigDict(extra="allow", frozen=True)

    results: list[Deployment]
    count: int
    limit: int
    page: int
    pages: int


class State(BaseModel):
    """A written state of a run (`State.reply` in `runledger.commands.states`): `type` is one
    of SCHEDULED, PENDING, RUNNING, COMPLETED, FAILED, CANCELLED, CRASHED, PAUSED, CANCELLING;
    `name` refines it (`AwaitingRetry`, `Late`, ...)."""

    model_config = ConfigDict(extra="allow", frozen=True)

    id: uuid.UUID
    type: str
    name: str
    timestamp: datetime
    message: str | None = None
    data: Any = None
    state_details: dict[str, Any] = {}


class FlowRun(BaseModel):
    """A flow run (`FlowRun` in `runledger.commands.flow_runs`; Prefect's field names).
    `total_run_time` is in seconds, as the service writes it. Reads also carry the run's pool
    (`work_pool_id`, `work_pool_name`); a command's reply does not."""

    model_config = ConfigDict(extra="allow", frozen=True)

    id: uuid.UUID
    created: datetime
    updated: datetime
    name: str
    flow_id: uuid.UUID
    state_id: uuid.UUID | None = None
    deployment_id: uuid.UUID | None = None
    deployment_version: str | None = None
    work_queue_name: str | None = None
    work_queue_id: uuid.UUID | None = None
    flow_version: str | None = None
    parameters: dict[str, Any] = {}
    idempotency_key: str | None = None
    context: dict[str, Any] = {}
    empirical_policy: dict[str, Any] = {}
    tags: list[str] = []
    labels: dict[str, Any] = {}
    parent_task_run_id: uuid.UUID | None = None
    state_type: str | None = None
    state_name: str | None = None
    run_count: int = 0
    expected_start_time: datetime | None = None
    next_scheduled_start_time: datetime | None = None
    start_time: datetime | None = None
    end_time: datetime | None = None
    total_run_time: float = 0.0
    auto_scheduled: bool = False
    infrastructure_document_id: uuid.UUID | None = None
    infrastructure_pid: str | None = None
    created_by: dict[str, Any] | None = None
    job_variables: dict[str, Any] = {}
    state: State | None = None
    priority: int = 0  # beyond Prefect: lower runs first within its queue
    # Beyond Prefect: why it waits, when something holds it back. `read_flow_run` also says why a
    # scheduled run is not offered to workers (a paused or full pool, queue or deployment, no
    # worker polling...), worked out as it reads; lists carry only what a refused claim stored.
    waiting_reason: str | None = None
    worker_name: str | None = None  # beyond Prefect: the worker whose claim it holds, while it holds one
    # Beyond Prefect's reply: it stayed PENDING past its deployment slot's lease and gave the
    # slot back; it takes one again when it starts running, or is cancelled if none is free.
    deployment_lease_expired: bool = False
    # Beyond Prefect: a release woke it and handed it its queue's and pool's slot, which it
    # holds while it is SCHEDULED (for the service's `handed_slot_seconds` at most, 30 s by
    # default), so no other run takes it meanwhile.
    pool_slot_reserved: bool = False
    # When its deployment slot's lease runs out, once its process renewed it
    # (`renew_deployment_slot_lease`, `hold_deployment_slot`); None: never renewed.
    deployment_lease_expiration: datetime | None = None


class LeaseRenewal(BaseModel):
    """A deployment slot's lease renewed: which one, and when it now runs out."""

    model_config = ConfigDict(extra="allow", frozen=True)

    lease_id: uuid.UUID
    expiration: datetime


class TaskRun(BaseModel):
    """A task run (`TaskRun` in `runledger.commands.task_runs`; Prefect's field names).
    `flow_run_id` is null for a background task; `total_run_time` is in seconds.
    `parameters`, `queued_state_id`, `task_worker_id`, `task_message` and `waiting_reason`
    are runledger's: a background task's parameters, the state that last queued it for a task
    worker, the worker that holds it while it runs and the message it started it from, and why
    it waits when its tags' concurrency limits hold it back."""

    model_config = ConfigDict(extra="allow", frozen=True)

    id: uuid.UUID
    created: datetime
    updated: datetime
    name: str
    flow_run_id: uuid.UUID | None = None
    task_key: str
    dynamic_key: str
    cache_key: str | None = None
    cache_expiration: datetime | None = None
    task_version: str | None = None
    empirical_policy: dict[str, Any] = {}
    tags: list[str] = []
    labels: dict[str, Any] = {}
    task_inputs: dict[str, Any] = {}
    state_id: uuid.UUID | None = None
    state_type: str | None = None
    state_name: str | None = None
    run_count: int = 0
    flow_run_run_count: int = 0
    expected_start_time: datetime | None = None
    next_scheduled_start_time: datetime | None = None
    start_time: datetime | None = None
    end_time: datetime | None = None
    total_run_time: float = 0.0
    state: State | None = None
    parameters: dict[str, Any] = {}
    queued_state_id: uuid.UUID | None = None
    task_worker_id: str | None = None
    task_message: str | None = None
    waiting_reason: str | None = None


class TaskWorker(BaseModel):
    """A task worker serving now (Prefect's `TaskWorkerResponse`): its identifier, the task keys
    it serves and its last heartbeat."""

    model_config = ConfigDict(extra="allow", frozen=True)

    identifier: str
    task_keys: list[str] = []
    timestamp: datetime


class HistoryState(BaseModel):
    """The runs of one history interval in one state: how many, and the sums of their
    estimated run time and lateness (seconds)."""

    model_config = ConfigDict(extra="allow", frozen=True)

    state_type: str | None = None
    state_name: str | None = None
    count_runs: int
    sum_estimated_run_time: float
    sum_estimated_lateness: float


class HistoryInterval(BaseModel):
    """One interval of a run history, `[interval_start, interval_end)`, and its runs by state
    (empty when it has none)."""

    model_config = ConfigDict(extra="allow", frozen=True)

    interval_start: datetime
    interval_end: datetime
    states: list[HistoryState] = []


class OrchestrationDetails(BaseModel):
    """Why the orchestration decided as it did: `reason` (REJECT, ABORT, WAIT) and
    `delay_seconds` (WAIT: propose again after that long)."""

    model_config = ConfigDict(extra="allow", frozen=True)

    reason: str | None = None
    delay_seconds: int | float | None = None


class OrchestrationResult(BaseModel):
    """What a proposed state came to (Prefect's `OrchestrationResult`): `status` ACCEPT (the
    state was written), REJECT (another state was written instead, e.g. AwaitingRetry), WAIT
    (nothing written; propose again after `details.delay_seconds`) or ABORT (nothing written).
    `state` is the run's state after the decision: the one written, or the current one."""

    model_config = ConfigDict(extra="allow", frozen=True)

    status: str
    state: State | None = None
    details: OrchestrationDetails = OrchestrationDetails()

    @property
    def accepted(self) -> bool:
        return self.status == "ACCEPT"


class FlowRunCreateResult(BaseModel):
    """One item of `create_flow_runs_from_deployment`: `status` CREATED (with its
    `flow_run_id`) or FAILED (with the `error`)."""

    model_config = ConfigDict(extra="allow", frozen=True)

    flow_run_id: uuid.UUID | None = None
    status: str
    error: str | None = None


class Worker(BaseModel):
    """A worker of a pool (`Worker` in `runledger.commands.workers`): its status is stored,
    ONLINE on each heartbeat, OFFLINE once it missed three."""

    model_config = ConfigDict(extra="allow", frozen=True)

    id: uuid.UUID
    created: datetime
    updated: datetime
    name: str
    work_pool_id: uuid.UUID
    last_heartbeat_time: datetime
    heartbeat_interval_seconds: int | None = None
    status: str  # ONLINE | OFFLINE


class WorkerFlowRun(BaseModel):
    """One run of a pool poll, with the pool and the queue it was found in."""

    model_config = ConfigDict(extra="allow", frozen=True)

    work_pool_id: uuid.UUID
    work_queue_id: uuid.UUID
    flow_run: FlowRun


class FlowRunSlotSummary(BaseModel):
    """A run that holds a slot, as the concurrency status views show it (Prefect's
    `FlowRunSlotSummary`; `time_in_current_state` in seconds)."""

    model_config = ConfigDict(extra="allow", frozen=True)

    id: uuid.UUID
    name: str
    state_type: str | None = None
    state_name: str | None = None
    start_time: datetime | None = None
    state_timestamp: datetime | None = None
    time_in_current_state: float | None = None


class WorkQueueConcurrencyStatusDetail(BaseModel):
    """One queue of a pool's concurrency status: its count and its first holders."""

    model_config = ConfigDict(extra="allow", frozen=True)

    queue_id: uuid.UUID
    queue_name: str
    active_slots: int
    concurrency_limit: int | None = None
    flow_runs: list[FlowRunSlotSummary] = []
    flow_run_count: int = 0


class _ConcurrencyStatusPage(BaseModel):
    """A count of slot holders with one page of what it counts (`count` items in `pages`)."""

    model_config = ConfigDict(extra="allow", frozen=True)

    active_slots: int
    concurrency_limit: int | None = None
    count: int = 0
    limit: int = 0
    page: int = 1
    pages: int = 0


class WorkPoolConcurrencyStatus(_ConcurrencyStatusPage):
    """Who holds a pool's slots (`active_slots`: every queue's, not only the page's; the page
    is of queues)."""

    queues: list[WorkQueueConcurrencyStatusDetail] = []


class WorkQueueConcurrencyStatus(_ConcurrencyStatusPage):
    """Who holds a queue's slots, counted as the legacy queue API does (the page is of runs)."""

    flow_runs: list[FlowRunSlotSummary] = []


class WorkQueueHealthPolicy(BaseModel):
    """What a queue's health is judged by (the same for every queue)."""

    model_config = ConfigDict(extra="allow", frozen=True)

    maximum_late_runs: int | None = 0
    maximum_seconds_since_last_polled: int | None = 60


class WorkQueueStatusDetail(BaseModel):
    """A queue's health: no Late run in it, and polled within the policy's seconds."""

    model_config = ConfigDict(extra="allow", frozen=True)

    healthy: bool
    late_runs_count: int = 0
    last_polled: IsoDatetime | None = None
    health_check_policy: WorkQueueHealthPolicy
