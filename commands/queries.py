"""Query request schemas: what a client may ask the read side (BEHAVIOUR C-2, WP-7, WQ-7, WQ-10).

They live beside the commands because clients and the service share them; the answers come
from the Postgres read models in `projections/`.
"""

from __future__ import annotations

import contextlib
import uuid
from datetime import datetime, timedelta
from enum import StrEnum
from typing import Annotated, Generic, TypeVar

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StringConstraints,
    ValidationInfo,
    field_validator,
)

from .bounds import (
    INT32_MAX,
    INT64_MAX,
    MAX_FILTER_VALUES,
    NonNegativeInt64,
    StoredText,
    UtcDatetime,
    check_storable_text,
)
from .concurrency_limits import LimitName
from .deployment_polls import MAX_DEPLOYMENTS_PER_POLL
from .flows import FlowName, Tag
from .states import StateType
from .variables import VariableName
from .work_pools import PoolName, QueueName
from .workers import WorkerName, WorkerStatus

DEFAULT_LIMIT = 200


class Query(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, str_max_length=100_000)

    # Read-your-writes: wait (bounded) until the read model has applied this stream sequence
    # (checkpoints are `bigint`).
    min_seq: Annotated[int, Field(ge=0, le=INT64_MAX)] | None = None


class Page(Query):
    limit: Annotated[int, Field(ge=0, le=DEFAULT_LIMIT)] = DEFAULT_LIMIT
    offset: NonNegativeInt64 = 0  # Postgres OFFSET is a bigint


T = TypeVar("T")


def _storable_values(values: list[T] | None) -> list[T] | None:
    """Text values must be storable text (commands/bounds.py), like what they match."""
    for i, value in enumerate(values or ()):
        if isinstance(value, str):
            try:
                check_storable_text(value)
            except ValueError as e:
                raise ValueError(f"value {i} {e}") from None
    return values


class AnyOf(BaseModel, Generic[T]):
    """Matches any of the values. Every value is one bind parameter: at most
    `MAX_FILTER_VALUES` per list, so that a query with all its filters stays under asyncpg's
    32,767 parameters."""

    model_config = ConfigDict(extra="forbid", frozen=True, str_max_length=100_000)

    any_: Annotated[list[T], Field(max_length=MAX_FILTER_VALUES)] | None = None

    _storable = field_validator("any_")(_storable_values)


class AllOf(BaseModel, Generic[T]):
    """Matches what holds every value given (a flow with all these tags)."""

    model_config = ConfigDict(extra="forbid", frozen=True, str_max_length=100_000)

    all_: Annotated[list[T], Field(max_length=MAX_FILTER_VALUES)] | None = None

    _storable = field_validator("all_")(_storable_values)


class WorkPoolFilter(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    id: AnyOf[uuid.UUID] | None = None
    name: AnyOf[str] | None = None
    type: AnyOf[str] | None = None


class WorkQueueFilter(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    id: AnyOf[uuid.UUID] | None = None
    name: AnyOf[str] | None = None


class GetWorkPool(Query):
    name: PoolName


class ListWorkPools(Page):
    """Ordered by name ascending."""

    work_pools: WorkPoolFilter | None = None


class CountWorkPools(Query):
    work_pools: WorkPoolFilter | None = None


class GetWorkQueue(Query):
    work_pool_name: PoolName
    work_queue_name: QueueName


class ListWorkQueues(Page):
    """The queues of one pool, ordered by priority ascending."""

    work_pool_name: PoolName
    work_queues: WorkQueueFilter | None = None


class CountWorkQueues(Query):
    work_pool_name: PoolName
    work_queues: WorkQueueFilter | None = None


class GetWorkQueueById(Query):
    id: uuid.UUID


class GetWorkPoolConcurrencyStatus(Query):
    """Who holds a pool's slots: the pool's count, then its queues in priority order (a page of
    `limit` queues, `page` from 1), each with its count and its first `flow_run_limit` holders."""

    work_pool_name: PoolName
    page: Annotated[int, Field(ge=1, le=INT64_MAX)] = 1
    limit: Annotated[int, Field(ge=0, le=DEFAULT_LIMIT)] = DEFAULT_LIMIT
    flow_run_limit: Annotated[int, Field(ge=0, le=200)] = 10


class GetWorkQueueConcurrencyStatus(Query):
    """Who holds a queue's slots, as the legacy queue API counts them (CANCELLING too, and runs
    linked to the queue by name only): the total and a page of the holders, by id."""

    id: uuid.UUID
    page: Annotated[int, Field(ge=1, le=INT64_MAX)] = 1
    limit: Annotated[int, Field(ge=0, le=DEFAULT_LIMIT)] = DEFAULT_LIMIT


class GetWorkQueueStatus(Query):
    """A queue's health (the legacy queue API): healthy while none of its runs is Late and a
    worker polled it within the last 60 s."""

    id: uuid.UUID


class GetLegacyWorkQueue(Query):
    """A queue by name, inside `default-agent-pool` only (the legacy queue API)."""

    name: QueueName


class ListAllWorkQueues(Page):
    """Every pool's queues, ordered by name ascending (the legacy queue API)."""

    work_queues: WorkQueueFilter | None = None



class FlowFilter(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    id: AnyOf[uuid.UUID] | None = None
    name: AnyOf[str] | None = None
    tags: AllOf[str] | None = None


class GetFlow(Query):
    id: uuid.UUID


class GetFlowByName(Query):
    name: FlowName


class ListFlows(Page):
    """Ordered by name ascending."""

    flows: FlowFilter | None = None


class CountFlows(Query):
    flows: FlowFilter | None = None


class DeploymentFilter(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    id: AnyOf[uuid.UUID] | None = None
    name: AnyOf[str] | None = None
    flow_id: AnyOf[uuid.UUID] | None = None
    work_queue_id: AnyOf[uuid.UUID] | None = None
    tags: AllOf[str] | None = None
    paused: bool | None = None


class GetDeployment(Query):
    id: uuid.UUID


class GetDeploymentByName(Query):
    """By `<flow name>/<deployment name>`, given as its two parts."""

    flow_name: FlowName
    deployment_name: Annotated[StoredText, Field(max_length=255)]


class ListDeployments(Page):
    """Ordered by name ascending, then id. `work_pool_name` / `work_queue_name` match the
    deployment's queue as it is named now."""

    deployments: DeploymentFilter | None = None
    flow_name: AnyOf[str] | None = None
    work_pool_name: AnyOf[str] | None = None
    work_queue_name: AnyOf[str] | None = None


class CountDeployments(Query):
    deployments: DeploymentFilter | None = None
    flow_name: AnyOf[str] | None = None
    work_pool_name: AnyOf[str] | None = None
    work_queue_name: AnyOf[str] | None = None


class PaginateDeployments(CountDeployments):
    """A page of deployments with the total count and the number of pages."""

    page: Annotated[int, Field(ge=1, le=INT64_MAX)] = 1
    limit: Annotated[int, Field(ge=0, le=DEFAULT_LIMIT)] = DEFAULT_LIMIT


class ListDeploymentSchedules(Query):
    deployment_id: uuid.UUID


class VariableNameFilter(AnyOf[str]):
    """Prefect's `VariableFilterName`: `any_` of the names, or `like_`: names that contain it,
    ignoring case (SQL `ILIKE '%<like_>%'`, so `%` and `_` are wildcards)."""

    like_: Annotated[str, Field(max_length=1_000)] | None = None

    _storable_like = field_validator("like_")(lambda v: check_storable_text(v) if v is not None else v)


class VariableFilter(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    id: AnyOf[uuid.UUID] | None = None
    name: VariableNameFilter | None = None
    tags: AllOf[str] | None = None


class GetVariable(Query):
    id: uuid.UUID


class GetVariableByName(Query):
    name: VariableName


class ListVariables(Page):
    """Ordered by name ascending (Prefect's default sort)."""

    variables: VariableFilter | None = None


class CountVariables(Query):
    variables: VariableFilter | None = None


class GetConcurrencyLimit(Query):
    id: uuid.UUID


class GetConcurrencyLimitByName(Query):
    name: LimitName


class ListConcurrencyLimits(Page):
    """Ordered by name ascending, as Prefect's (which takes no filter)."""


class CountConcurrencyLimits(Query):
    pass


class GetTagConcurrencyLimit(Query):
    """A task tag concurrency limit, by its tag, with the task runs holding its slots."""

    tag: Tag


class ListTagConcurrencyLimits(Page):
    """Task tag concurrency limits, ordered by tag (Prefect's order; it takes no filter)."""


class TimeRange(BaseModel):
    """Times at or after `after_` and at or before `before_`."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    after_: UtcDatetime | None = None
    before_: UtcDatetime | None = None
    is_null_: bool | None = None


class FlowRunFilter(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    id: AnyOf[uuid.UUID] | None = None
    name: AnyOf[str] | None = None
    flow_id: AnyOf[uuid.UUID] | None = None
    deployment_id: AnyOf[uuid.UUID] | None = None
    work_queue_id: AnyOf[uuid.UUID] | None = None
    work_queue_name: AnyOf[str] | None = None
    state_type: AnyOf[StateType] | None = None
    state_name: AnyOf[str] | None = None
    tags: AllOf[str] | None = None
    parent_task_run_id: AnyOf[uuid.UUID] | None = None
    idempotency_key: AnyOf[str] | None = None
    expected_start_time: TimeRange | None = None
    next_scheduled_start_time: TimeRange | None = None
    start_time: TimeRange | None = None


class FlowRunSort(StrEnum):
    """Prefect's flow-run orders. START_TIME_*: by when the run started, or (not started yet)
    when it is expected to."""

    ID_DESC = "ID_DESC"
    START_TIME_ASC = "START_TIME_ASC"
    START_TIME_DESC = "START_TIME_DESC"
    EXPECTED_START_TIME_ASC = "EXPECTED_START_TIME_ASC"
    EXPECTED_START_TIME_DESC = "EXPECTED_START_TIME_DESC"
    NAME_ASC = "NAME_ASC"
    NAME_DESC = "NAME_DESC"
    NEXT_SCHEDULED_START_TIME_ASC = "NEXT_SCHEDULED_START_TIME_ASC"
    END_TIME_DESC = "END_TIME_DESC"


class GetFlowRun(Query):
    id: uuid.UUID


class ListFlowRuns(Page):
    """Ordered by `sort` (Prefect's default: newest id first)."""

    flow_runs: FlowRunFilter | None = None
    work_pool_name: AnyOf[str] | None = None
    sort: FlowRunSort = FlowRunSort.ID_DESC


class CountFlowRuns(Query):
    flow_runs: FlowRunFilter | None = None
    work_pool_name: AnyOf[str] | None = None


class ListFlowRunStates(Query):
    """A run's state history, oldest first."""

    flow_run_id: uuid.UUID


class GetFlowRunState(Query):
    """One written state of a flow run, by its id."""

    id: uuid.UUID


# Prefect answers the first 500 intervals of a longer range and drops the rest without a word;
# runledger refuses such a range instead (TR-7).
MAX_HISTORY_INTERVALS = 500


class RunHistory(Query):
    """Runs counted per interval of their expected start time: `[history_start, history_end)`
    cut into intervals of `history_interval_seconds` (the last one may end after
    `history_end`), each with the runs whose `expected_start_time` falls inside it, grouped by
    state type and name. At most 500 intervals, so that one answer stays small."""

    history_start: UtcDatetime
    history_end: UtcDatetime
    history_interval_seconds: Annotated[float, Field(le=INT32_MAX, allow_inf_nan=False)]

    @field_validator("history_interval_seconds")
    @classmethod
    def _at_least_one_second(cls, value: float, info: ValidationInfo) -> float:
        if value < 1:
            raise ValueError("History interval must not be less than 1 second.")
        start, end = info.data.get("history_start"), info.data.get("history_end")
        if start is not None and end is not None and history_interval_count(start, end, value) > MAX_HISTORY_INTERVALS:
            raise ValueError(f"History must not have more than {MAX_HISTORY_INTERVALS} intervals: "
                             "choose a longer interval or a shorter range.")
        return value


def history_interval_count(start: datetime, end: datetime, interval_seconds: float) -> int:
    """How many intervals of that length, from `start`, begin before `end`."""
    span = (end - start) // timedelta(microseconds=1)
    step = timedelta(seconds=interval_seconds) // timedelta(microseconds=1)
    return max(0, -(-span // step))


class GetFlowRunHistory(RunHistory):
    """Flow runs per interval of their expected start time, filtered as `ListFlowRuns`."""

    flow_runs: FlowRunFilter | None = None
    work_pool_name: AnyOf[str] | None = None


class FlowRunIdFilter(AnyOf[uuid.UUID]):
    """A task run's flow run: `any_` of these, and/or `is_null_` (true: background tasks,
    which have none; false: tasks of a flow run)."""

    is_null_: bool | None = None


class TaskRunFilter(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    id: AnyOf[uuid.UUID] | None = None
    name: AnyOf[str] | None = None
    flow_run_id: FlowRunIdFilter | None = None
    task_key: AnyOf[str] | None = None
    state_type: AnyOf[StateType] | None = None
    state_name: AnyOf[str] | None = None
    tags: AllOf[str] | None = None
    expected_start_time: TimeRange | None = None
    start_time: TimeRange | None = None
    end_time: TimeRange | None = None


class TaskRunSort(StrEnum):
    ID_DESC = "ID_DESC"
    NAME_ASC = "NAME_ASC"
    NAME_DESC = "NAME_DESC"
    EXPECTED_START_TIME_ASC = "EXPECTED_START_TIME_ASC"
    EXPECTED_START_TIME_DESC = "EXPECTED_START_TIME_DESC"
    NEXT_SCHEDULED_START_TIME_ASC = "NEXT_SCHEDULED_START_TIME_ASC"
    START_TIME_DESC = "START_TIME_DESC"
    END_TIME_DESC = "END_TIME_DESC"


class GetTaskRun(Query):
    id: uuid.UUID


class ListTaskRuns(Page):
    """Ordered by `sort` (Prefect's default: newest id first)."""

    task_runs: TaskRunFilter | None = None
    sort: TaskRunSort = TaskRunSort.ID_DESC


class CountTaskRuns(Query):
    task_runs: TaskRunFilter | None = None


class ListTaskRunStates(Query):
    """A task run's state history, oldest first."""

    task_run_id: uuid.UUID


class GetTaskRunState(Query):
    """One written state of a task run, by its id."""

    id: uuid.UUID


class GetTaskRunResult(Query):
    """One chunk of a task run's result stored apart (its COMPLETED state's data is
    `{"type": "reference", "attempt": ..., "chunks": n, ...}`): chunk `chunk`, base64. With the
    reference's `attempt` it is read from the result store at once; without, the reference is
    looked up in the read model first (which may not hold the run's end yet)."""

    id: uuid.UUID
    attempt: uuid.UUID | None = None
    chunk: Annotated[int, Field(ge=0, le=INT32_MAX)] = 0


class ListTaskWorkers(Query):
    """The task workers serving now (each heartbeat within the last three intervals), with the
    keys they serve; only those serving any of `task_keys` when given."""

    task_keys: Annotated[list[Annotated[StoredText, StringConstraints(max_length=2_000)]],
                         Field(max_length=MAX_FILTER_VALUES)] | None = None


class GetTaskRunHistory(RunHistory):
    """Task runs per interval of their expected start time, filtered as `ListTaskRuns`."""

    task_runs: TaskRunFilter | None = None


class WorkerStatusFilter(AnyOf[WorkerStatus]):
    """Workers whose stored status is any of these."""


class HeartbeatTimeRange(BaseModel):
    """Last heartbeats at or before `before_` and at or after `after_`."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    before_: UtcDatetime | None = None
    after_: UtcDatetime | None = None


class WorkerFilter(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    status: WorkerStatusFilter | None = None
    last_heartbeat_time: HeartbeatTimeRange | None = None


class ListWorkers(Page):
    """The workers of one pool, the most recent heartbeat first."""

    work_pool_name: PoolName
    workers: WorkerFilter | None = None


class GetWorker(Query):
    work_pool_name: PoolName
    name: WorkerName


class GetScheduledFlowRuns(Query):
    """What a worker polls: the pool's SCHEDULED runs that its queues' and its own concurrency
    limits leave room for, in queue priority order, then each run's priority (lower first),
    then its next scheduled start time, then its id. Both time bounds are inclusive. Names no
    queues (absent or empty): every queue of the pool. Recorded as a poll of those queues."""

    work_pool_name: PoolName
    work_queue_names: Annotated[list[QueueName], Field(max_length=MAX_FILTER_VALUES)] | None = None
    scheduled_before: UtcDatetime | None = None
    scheduled_after: UtcDatetime | None = None
    limit: Annotated[int, Field(ge=0, le=DEFAULT_LIMIT)] = DEFAULT_LIMIT


class GetLegacyQueueRuns(Query):
    """A queue's SCHEDULED runs by the queue's name (any pool), earliest first, within the
    queue's concurrency limit; nothing when the queue is paused. Recorded as a poll of the
    queue unless `from_ui` (Prefect's `X-Prefect-UI` header)."""

    id: uuid.UUID
    limit: Annotated[int, Field(ge=0, le=DEFAULT_LIMIT)] = DEFAULT_LIMIT
    scheduled_before: UtcDatetime | None = None
    from_ui: bool = False


class GetScheduledFlowRunsForDeployments(Query):
    """What a runner polls: the SCHEDULED runs of these deployments, the earliest
    `next_scheduled_start_time` first (then id), at or before `scheduled_before` when given.
    Unknown ids match nothing. Recorded as a poll of those deployments (they become READY)."""

    deployment_ids: Annotated[list[uuid.UUID], Field(max_length=MAX_DEPLOYMENTS_PER_POLL)]
    scheduled_before: UtcDatetime | None = None
    limit: Annotated[int, Field(ge=0, le=DEFAULT_LIMIT)] = DEFAULT_LIMIT


# ---------------------------------------------------------------------------------------------
# Reading the event log (`ReadEvents`): answered from the JetStream log, not a read model.

READ_EVENTS_DEFAULT_LIMIT = 100
READ_EVENTS_MAX_LIMIT = 1000
# One subject token as runledger writes them (commands/names.py `encode_token`): no dots,
# wildcards, spaces or anything else a subject filter would read as structure.
SubjectToken = Annotated[str, Field(min_length=1, max_length=255, pattern=r"^[A-Za-z0-9_~-]+$")]
# A Prefect resource id naming one object: `prefect.<kind>.<uuid>`.
PREFECT_RESOURCE_KINDS = ("work-pool", "work-queue", "deployment", "flow", "flow-run", "variable",
                          "concurrency-limit")
PrefectResourceId = Annotated[str, Field(
    max_length=100,
    pattern=r"^prefect\.(" + "|".join(PREFECT_RESOURCE_KINDS) + r")\.[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-"
            r"[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$")]


class EventVocabulary(StrEnum):
    RUNLEDGER = "runledger"
    PREFECT = "prefect"


class ReadEvents(Query):
    """The event log in stream order, a page at a time: the stored envelopes (each with its
    stream sequence `seq`), or the events Prefect emits for the same facts (each with the `seq`
    of the runledger event it comes from). Filters: aggregate type and id (or a Prefect
    resource id such as `prefect.deployment.<uuid>`), runledger event type, the moment an event
    occurred (`since`/`until`, inclusive; naive times are UTC) and, in Prefect's vocabulary, a
    prefix of the Prefect event name. `after_seq` is the cursor: events with a greater
    sequence. The result is `{events, next_after_seq}`; `next_after_seq` is null once the end
    of the log (as it was when the query arrived) was reached, and a page may be short, even
    empty, and still carry a cursor: each page reads a bounded part of the log."""

    aggregate_type: SubjectToken | None = None
    aggregate_id: SubjectToken | None = None
    resource_id: PrefectResourceId | None = None
    event_type: SubjectToken | None = None
    since: UtcDatetime | None = None
    until: UtcDatetime | None = None
    after_seq: NonNegativeInt64 = 0
    limit: Annotated[int, Field(ge=1, le=READ_EVENTS_MAX_LIMIT)] = READ_EVENTS_DEFAULT_LIMIT
    vocabulary: EventVocabulary = EventVocabulary.RUNLEDGER
    prefect_event_prefix: Annotated[str, Field(min_length=1, max_length=255)] | None = None

    @field_validator("aggregate_id")
    @classmethod
    def _uuid_as_stored(cls, value):
        """A hyphenated UUID in upper case is the one the log stores in lower case (a subject
        token matches exactly); any other id is taken as it is."""
        if value is not None and len(value) == 36 and value.count("-") == 4:
            with contextlib.suppress(ValueError):
                return str(uuid.UUID(value))
        return value

    @field_validator("resource_id")
    @classmethod
    def _one_aggregate(cls, value, info):
        if value is not None and (info.data.get("aggregate_id") is not None
                                  or info.data.get("aggregate_type") is not None):
            raise ValueError("names the aggregate itself: give resource_id or aggregate_type/aggregate_id, not both")
        return value

    @field_validator("until")
    @classmethod
    def _since_before_until(cls, value, info):
        since = info.data.get("since")
        if value is not None and since is not None and since > value:
            raise ValueError("must not be before since")
        return value

    @field_validator("prefect_event_prefix")
    @classmethod
    def _prefect_only(cls, value, info):
        if value is not None and info.data.get("vocabulary") != EventVocabulary.PREFECT:
            raise ValueError("applies only with vocabulary prefect")
        return check_storable_text(value) if value is not None else value
