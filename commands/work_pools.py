"""The work pool aggregate: a pool and its work queues (BEHAVIOUR §1, §2).

Queues live inside their pool's aggregate because the pool is the consistency boundary for
what queues share: names unique within the pool and the priority order (PR-1). Pool names are
unique across the server through the `work_pool_name` aggregate (one per name), which a create
claims and a delete releases in the same atomic batch as the pool's own event.

Each decision writes at most one event per aggregate; events carry the full state of what
they change (a snapshot), plus the `changes` that Prefect's `updated` events report.

What workers and polls change here is small and frequent, so it has small events of its own
rather than pool snapshots: `WorkPoolWorkersChanged` (which workers are online, and the status
that follows from them; commands/workers.py decides it beside the worker's own event),
`WorkQueuesPolled` (one per poll, whatever the number of queues, runs or deployments it
touches), `WorkQueuesNotReady` and `WorkQueueDeploymentsNotReady` (the foreman's). The pool
keeps the names of its online workers, so that its status decisions (a heartbeat, a resume,
the foreman) are checked against the log and never against a read model.
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta
from enum import StrEnum
from operator import attrgetter
from typing import Annotated, Any, ClassVar

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, StringConstraints

from . import messages
from .bounds import (
    INT32_MAX,
    JsonDocument,
    NonNegativeInt32,
    PositiveInt32,
    StoredText,
    UtcDatetime,
    check_storable_text,
    first_past_int32,
    json_time,
)
from .decisions import Decision, NewEvent
from .events import register_event, register_upcaster
from .flows import Tag
from .job_templates import (
    base_job_template_problem,
    references_a_block,
    variable_defaults_problem,
    variables_schema_problem,
)
from .messages import (
    Command,
    DecisionContext,
    Event,
    Rejection,
    conflict,
    forbidden,
    invalid,
    not_found,
)
from .names import (
    MAX_NAME_LENGTH,
    check_object_name,
    check_work_pool_name,
    encode_token,
    is_reserved_work_pool_name,
)
from .priorities import DuplicateTargetPriorities, next_free_priority, reprioritize

WORK_POOL = "work_pool"
WORK_POOL_NAME = "work_pool_name"
WORK_QUEUE = "work_queue"  # a queue addressed by its id (its events are its pool's)
LEGACY_POOL_NAME = "default-agent-pool"
LEGACY_POOL_TYPE = "prefect-agent"
DEFAULT_QUEUE_NAME = "default"
DEFAULT_QUEUE_DESCRIPTION = "The work pool's default queue."
RECENTLY_POLLED = timedelta(seconds=60)
# How long a queue or a deployment stays READY without a poll (the foreman's timeouts).
NOT_READY_AFTER = timedelta(seconds=60)
MAX_QUEUES_PER_COMMAND = 1_000
PoolName = Annotated[str, StringConstraints(max_length=MAX_NAME_LENGTH), AfterValidator(check_work_pool_name)]
QueueName = Annotated[str, StringConstraints(max_length=MAX_NAME_LENGTH), AfterValidator(check_object_name)]
Description = Annotated[str, StringConstraints(max_length=10_000), AfterValidator(check_storable_text)]
# Stored in `integer` columns (commands/bounds.py): concurrency limits and priorities.
NonNegative = NonNegativeInt32
Positive = PositiveInt32
# Any string, "" too (Prefect), that the read model can store.
PoolType = Annotated[str, StringConstraints(max_length=MAX_NAME_LENGTH), AfterValidator(check_storable_text)]


class Status(StrEnum):
    READY = "READY"
    NOT_READY = "NOT_READY"
    PAUSED = "PAUSED"


class StorageConfiguration(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    bundle_upload_step: JsonDocument | None = None
    bundle_execution_step: JsonDocument | None = None
    default_result_storage_block_id: uuid.UUID | None = None


# ---------------------------------------------------------------------------------------------
# State


@dataclass(frozen=True, slots=True)
class WorkQueue:
    id: uuid.UUID
    name: str
    description: str | None
    is_paused: bool
    concurrency_limit: int | None
    priority: int
    status: Status
    last_polled: datetime | None
    created: datetime
    updated: datetime
    filter: QueueFilter | None = None


@dataclass(frozen=True, slots=True)
class WorkPool:
    id: uuid.UUID
    name: str
    description: str | None
    type: str
    base_job_template: dict[str, Any]
    is_paused: bool
    concurrency_limit: int | None
    storage_configuration: StorageConfiguration
    status: Status | None  # None for `prefect-agent` pools (WP-3)
    default_queue_id: uuid.UUID
    created: datetime
    updated: datetime
    queues: dict[uuid.UUID, WorkQueue] = field(default_factory=dict)
    has_online_worker: bool = False
    # The names of the pool's workers whose status is ONLINE (`has_online_worker` follows it).
    online_workers: frozenset[str] = frozenset()
    # Queue name -> id, kept by `evolve` beside `queues` so lookups by name cost O(1).
    queue_ids_by_name: dict[str, uuid.UUID] = field(default_factory=dict)

    def queue_named(self, name: str) -> WorkQueue | None:
        queue_id = self.queue_ids_by_name.get(name)
        return self.queues[queue_id] if queue_id is not None else None

    def priorities(self) -> dict[uuid.UUID, int]:
        return dict(zip(self.queues, map(_priority_of, self.queues.values()), strict=True))

    def priority_values(self) -> list[int]:
        """The priorities alone: no map keyed by queue id to build (UUID hashing is slow)."""
        return list(map(_priority_of, self.queues.values()))

    def queues_by_priority(self) -> list[WorkQueue]:
        return sorted(self.queues.values(), key=lambda q: (q.priority, q.created, str(q.id)))


_priority_of = attrgetter("priority")


@dataclass(frozen=True, slots=True)
class WorkPoolNameClaim:
    """Who holds a pool name; `work_pool_id` is None when the name is free."""

    work_pool_id: uuid.UUID | None = None


# ---------------------------------------------------------------------------------------------
# Event payloads


class QueueFilter(BaseModel):
    """Prefect's deprecated tag-based work queue filter: a queue with one serves, through the
    legacy queue poll, the scheduled runs that have all of `tags` and belong to a deployment
    (one of `deployment_ids` when given), whatever queue they name."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    tags: Annotated[list[Tag], Field(max_length=1_000)] | None = None
    deployment_ids: Annotated[list[uuid.UUID], Field(max_length=1_000)] | None = None


class WorkQueueSnapshot(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    id: uuid.UUID
    name: StoredText
    description: StoredText | None
    is_paused: bool
    concurrency_limit: NonNegativeInt32 | None
    priority: PositiveInt32
    status: Status
    last_polled: datetime | None
    created: datetime
    updated: datetime
    filter: QueueFilter | None = None

    @classmethod
    def of(cls, q: WorkQueue) -> WorkQueueSnapshot:
        return cls(**{f: getattr(q, f) for f in cls.model_fields})

    def to_state(self) -> WorkQueue:
        return WorkQueue(**self.__dict__)


class WorkPoolSnapshot(BaseModel):
    """A pool's own fields, without its queues."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    id: uuid.UUID
    name: StoredText
    description: StoredText | None
    type: StoredText
    # Checked where it enters (the commands' `JsonDocument`), not on every read of the log:
    # walking a large template on each decode doubled the cost of loading a pool event.
    base_job_template: dict[str, Any]
    is_paused: bool
    concurrency_limit: NonNegativeInt32 | None
    storage_configuration: StorageConfiguration
    status: Status | None
    default_queue_id: uuid.UUID
    created: datetime
    updated: datetime

    @classmethod
    def of(cls, p: WorkPool) -> WorkPoolSnapshot:
        return cls(**{f: getattr(p, f) for f in cls.model_fields})


class Change(BaseModel):
    """`{old, new}` of one field; exported as Prefect's `{from, to}`."""

    model_config = ConfigDict(frozen=True)

    old: Any
    new: Any


class _PoolEvent(Event):
    aggregate_type: ClassVar[str] = WORK_POOL


@register_event
class WorkPoolCreated(_PoolEvent):
    """A pool and its default queue."""

    event_type: ClassVar[str] = "WorkPoolCreated"
    pool: WorkPoolSnapshot
    default_queue: WorkQueueSnapshot


@register_event
class WorkPoolUpdated(_PoolEvent):
    """`changes` lists changed fields; `status` is set on every status write, even
    when the status stays the same (a repeated pause)."""

    event_type: ClassVar[str] = "WorkPoolUpdated"
    pool: WorkPoolSnapshot
    changes: dict[str, Change] = {}
    status: Change | None = None


@register_event
class WorkPoolDeleted(_PoolEvent):
    """The pool with all its queues: `queue_ids` lists what went with it."""

    event_type: ClassVar[str] = "WorkPoolDeleted"
    pool_id: uuid.UUID
    name: str
    queue_ids: list[uuid.UUID]
    deleted: datetime


@register_event
class WorkQueueCreated(_PoolEvent):
    """`reprioritized` holds the other queues the priority rules moved: queue id -> new priority."""

    event_type: ClassVar[str] = "WorkQueueCreated"
    queue: WorkQueueSnapshot
    reprioritized: dict[uuid.UUID, PositiveInt32] = {}


@register_event
class WorkQueueUpdated(_PoolEvent):
    event_type: ClassVar[str] = "WorkQueueUpdated"
    queue: WorkQueueSnapshot
    changes: dict[str, Change] = {}
    status: Change | None = None
    reprioritized: dict[uuid.UUID, PositiveInt32] = {}


@register_event
class WorkQueueDeleted(_PoolEvent):
    event_type: ClassVar[str] = "WorkQueueDeleted"
    queue_id: uuid.UUID
    name: str
    reprioritized: dict[uuid.UUID, PositiveInt32] = {}
    deleted: datetime


@register_event
class WorkQueuesReprioritized(_PoolEvent):
    """A bulk priority map applied by the priority rules."""

    event_type: ClassVar[str] = "WorkQueuesReprioritized"
    reprioritized: dict[uuid.UUID, PositiveInt32]
    updated: datetime


@register_event
class WorkPoolWorkersChanged(_PoolEvent):
    """Workers of the pool came online (`online`) or stopped being online (`offline`, by name),
    and, when it follows, the pool's status (`status`): ready on a heartbeat, not ready when no
    worker is online any more."""

    event_type: ClassVar[str] = "WorkPoolWorkersChanged"
    online: list[str] = []
    offline: list[str] = []
    status: Change | None = None


@register_event
class WorkQueuesPolled(_PoolEvent):
    """A worker polled these queues at `polled`: each gets `last_polled`, those in `ready`
    (they were NOT_READY) become READY, and so do the deployments on any of them (with their
    `last_polled`). A `routine` poll changes no status: it moves the `last_polled` of its
    queues and of their READY deployments only.

    A `routine` poll (every queue it names was READY already, and so was every deployment on
    them as the service read them when it answered, so only `last_polled` moves) expires from the log (`Settings.routine_retention_seconds`), but not before its
    queues would be marked NOT_READY without a newer poll: by then a newer poll, or the
    foreman's `WorkQueuesNotReady` (kept, with each queue's last poll), says what it said. A
    worker polls every 10 s or so: ~8,600 events a day each, for ever, without this."""

    event_type: ClassVar[str] = "WorkQueuesPolled"
    schema_version: ClassVar[int] = 2
    queue_ids: list[uuid.UUID]
    ready: list[uuid.UUID] = []
    polled: datetime
    routine: bool = False

    def expires_no_sooner_than(self) -> float | None:
        if not self.routine:
            return None
        return NOT_READY_AFTER.total_seconds() + messages.EXPIRY_MARGIN_SECONDS


@register_upcaster("WorkQueuesPolled", 1)
def _work_queues_polled_v1(payload: dict[str, Any]) -> dict[str, Any]:
    """v2 added `routine`; a v1 poll was kept for ever, which the default (False) means."""
    return payload


@register_event
class WorkQueuesNotReady(_PoolEvent):
    """READY queues not polled for more than 60 seconds became NOT_READY; `last_polled` is each
    one's last poll (absent before v2), which the routine polls that said it may outlive."""

    event_type: ClassVar[str] = "WorkQueuesNotReady"
    schema_version: ClassVar[int] = 2
    queue_ids: list[uuid.UUID]
    checked: datetime
    last_polled: dict[uuid.UUID, datetime] = {}


@register_upcaster("WorkQueuesNotReady", 1)
def _work_queues_not_ready_v1(payload: dict[str, Any]) -> dict[str, Any]:
    """v2 added `last_polled`; a v1 event left the queues' last polls as they were, which the
    empty default means."""
    return payload


@register_event
class WorkQueueDeploymentsNotReady(_PoolEvent):
    """The deployments on a queue not polled for more than 60 seconds (as of `checked`) that
    were READY and not polled themselves since become NOT_READY; `deployment_ids` are the
    candidates, the read model keeps only those still READY and still on that queue."""

    event_type: ClassVar[str] = "WorkQueueDeploymentsNotReady"
    schema_version: ClassVar[int] = 2
    work_queue_id: uuid.UUID
    deployment_ids: list[uuid.UUID]
    checked: datetime
    # Each deployment's last poll (absent before v2), which the routine polls that said it may
    # outlive (`last_polled_of`).
    last_polled: dict[uuid.UUID, datetime] = {}


@register_upcaster("WorkQueueDeploymentsNotReady", 1)
def _work_queue_deployments_not_ready_v1(payload: dict[str, Any]) -> dict[str, Any]:
    """v2 added `last_polled`; empty (leave the deployments' as they are) is what v1 meant."""
    return payload


def last_polled_of(ids: list[uuid.UUID], told: Mapping[uuid.UUID, datetime], now: datetime) -> dict[uuid.UUID, datetime]:
    """The last polls of the deployments a not-ready event names, as the foreman read them in
    the read model (a deployment's last poll is a read-side fact: no aggregate holds it), never
    later than now. The routine polls that set them expire from the log; the event keeps them,
    so a rebuild gives the deployments the `last_polled` they have live, wherever their queue
    went since."""
    return {i: min(told[i], now) for i in ids if i in told}


class _NameEvent(Event):
    aggregate_type: ClassVar[str] = WORK_POOL_NAME


@register_event
class WorkPoolNameClaimed(_NameEvent):
    event_type: ClassVar[str] = "WorkPoolNameClaimed"
    name: str
    work_pool_id: uuid.UUID


@register_event
class WorkPoolNameReleased(_NameEvent):
    event_type: ClassVar[str] = "WorkPoolNameReleased"
    name: str
    work_pool_id: uuid.UUID


# ---------------------------------------------------------------------------------------------
# Commands


class CreateWorkPool(Command):
    name: PoolName
    description: Description | None = None
    type: PoolType = LEGACY_POOL_TYPE
    base_job_template: JsonDocument = {}
    is_paused: bool = False
    concurrency_limit: NonNegative | None = None
    storage_configuration: StorageConfiguration = StorageConfiguration()


class UpdateWorkPool(Command):
    name: PoolName
    description: Description | None = None
    is_paused: bool | None = None
    base_job_template: JsonDocument | None = None
    concurrency_limit: NonNegative | None = None
    storage_configuration: StorageConfiguration | None = None


class DeleteWorkPool(Command):
    name: PoolName


class CreateWorkQueue(Command):
    work_pool_name: PoolName
    name: QueueName
    description: Description | None = ""
    is_paused: bool = False
    concurrency_limit: NonNegative | None = None
    priority: Positive | None = None


class UpdateWorkQueue(Command):
    """Through the pool API: a priority change moves the other queues down to make room."""

    work_pool_name: PoolName
    work_queue_name: QueueName
    name: QueueName | None = None
    description: Description | None = None
    is_paused: bool | None = None
    concurrency_limit: NonNegative | None = None
    priority: Positive | None = None
    last_polled: UtcDatetime | None = None


class DeleteWorkQueue(Command):
    work_pool_name: PoolName
    work_queue_name: QueueName


class SetWorkQueuePriorities(Command):
    """A bulk priority change with a map of queue name -> priority; unknown names are ignored."""

    work_pool_name: PoolName
    priorities: dict[QueueName, Positive]


class CreateLegacyWorkQueue(Command):
    """A queue in `default-agent-pool`, creating that pool when missing. `filter`: Prefect's
    deprecated tag-based queue (`QueueFilter`)."""

    name: QueueName
    description: Description | None = ""
    is_paused: bool = False
    concurrency_limit: NonNegative | None = None
    priority: Positive | None = None
    filter: QueueFilter | None = None


class UpdateWorkQueueById(Command):
    """The legacy `/work_queues/{id}` update: the priority is stored as given."""

    id: uuid.UUID
    name: QueueName | None = None
    description: Description | None = None
    is_paused: bool | None = None
    concurrency_limit: NonNegative | None = None
    priority: Positive | None = None
    last_polled: UtcDatetime | None = None
    filter: QueueFilter | None = None  # Prefect's deprecated tag-based queue; null removes it


class DeleteWorkQueueById(Command):
    id: uuid.UUID


class RecordWorkQueuesPolled(Command):
    """A worker polled these queues of the pool (ids of other pools' queues are ignored): sent
    by the service after it answers a poll."""

    work_pool_name: PoolName
    work_queue_ids: Annotated[list[uuid.UUID], Field(max_length=MAX_QUEUES_PER_COMMAND)]
    # Some deployment on these queues was not READY when the service answered the poll (it
    # reads the read model): the poll makes it READY, a change the log keeps (not routine).
    readies_deployments: bool = False


class MarkWorkPoolNotReady(Command):
    """The foreman's: a READY pool with no online worker becomes NOT_READY (else nothing)."""

    work_pool_name: PoolName


class MarkWorkQueuesNotReady(Command):
    """The foreman's: those of these queues still READY and last polled more than 60 seconds
    ago become NOT_READY."""

    work_pool_name: PoolName
    work_queue_ids: Annotated[list[uuid.UUID], Field(max_length=MAX_QUEUES_PER_COMMAND)]


class MarkDeploymentsNotReady(Command):
    """The foreman's: when the queue was not polled for more than 60 seconds, the READY
    deployments among `deployment_ids` on it not polled since become NOT_READY."""

    work_pool_name: PoolName
    work_queue_id: uuid.UUID
    deployment_ids: Annotated[list[uuid.UUID], Field(max_length=MAX_QUEUES_PER_COMMAND)]
    # Each one's last poll as the foreman read it (`WorkQueueDeploymentsNotReady.last_polled`).
    last_polled: Annotated[dict[uuid.UUID, UtcDatetime], Field(max_length=MAX_QUEUES_PER_COMMAND)] = {}


# ---------------------------------------------------------------------------------------------
# Errors


def pool_not_found(name: str) -> Rejection:
    return not_found(f'Work pool "{name}" not found.')


def queue_not_found(pool_name: str, queue_name: str) -> Rejection:
    return not_found(f"Work pool queue '{pool_name}/{queue_name}' not found.")


def queue_id_not_found(queue_id: uuid.UUID) -> Rejection:
    return not_found(f"Work queue {queue_id} not found.")


def name_aggregate_id(name: str) -> str:
    return encode_token(name)


# ---------------------------------------------------------------------------------------------
# Evolve


def evolve(pool: WorkPool | None, event: Event) -> WorkPool | None:
    match event:
        case WorkPoolCreated(pool=p, default_queue=q):
            return WorkPool(**p.__dict__, queues={q.id: q.to_state()}, queue_ids_by_name={q.name: q.id})
        case WorkPoolDeleted():
            return None
    if pool is None:
        return None  # events after a delete cannot happen; ignore defensively
    match event:
        case WorkPoolUpdated(pool=p):
            return replace(pool, **p.__dict__)
        case WorkQueueCreated(queue=q, reprioritized=moved) | WorkQueueUpdated(queue=q, reprioritized=moved):
            names = dict(pool.queue_ids_by_name)
            previous = pool.queues.get(q.id)
            if previous is not None and previous.name != q.name:
                del names[previous.name]
            names[q.name] = q.id
            queues = {**pool.queues, q.id: q.to_state()}
            return _with_priorities(replace(pool, queues=queues, queue_ids_by_name=names), moved, q.updated)
        case WorkQueueDeleted(queue_id=qid, reprioritized=moved, deleted=when):
            queues = dict(pool.queues)
            gone = queues.pop(qid, None)
            names = dict(pool.queue_ids_by_name)
            if gone is not None:
                names.pop(gone.name, None)
            return _with_priorities(replace(pool, queues=queues, queue_ids_by_name=names), moved, when)
        case WorkQueuesReprioritized(reprioritized=moved, updated=when):
            return _with_priorities(pool, moved, when)
        case WorkPoolWorkersChanged(online=online, offline=offline, status=status):
            online_now = (pool.online_workers | frozenset(online)) - frozenset(offline)
            new_status = Status(status.new) if status is not None and status.new is not None else pool.status
            return replace(pool, online_workers=online_now, has_online_worker=bool(online_now), status=new_status)
        case WorkQueuesPolled(queue_ids=ids, ready=ready, polled=when):
            queues = dict(pool.queues)
            for qid in ids:
                if qid in queues:
                    queue_status = Status.READY if qid in ready else queues[qid].status
                    queues[qid] = replace(queues[qid], last_polled=when, status=queue_status)
            return replace(pool, queues=queues)
        case WorkQueuesNotReady(queue_ids=ids, last_polled=last_polled):
            queues = dict(pool.queues)
            for qid in ids:
                if qid in queues:
                    queues[qid] = replace(queues[qid], status=Status.NOT_READY,
                                          last_polled=last_polled.get(qid, queues[qid].last_polled))
            return replace(pool, queues=queues)
    return pool


def _with_priorities(pool: WorkPool, moved: dict[uuid.UUID, int], when: datetime) -> WorkPool:
    if not moved:
        return pool
    queues = dict(pool.queues)
    for qid, priority in moved.items():
        if qid in queues:
            queues[qid] = replace(queues[qid], priority=priority, updated=when)
    return replace(pool, queues=queues)


def evolve_name(claim: WorkPoolNameClaim, event: Event) -> WorkPoolNameClaim:
    match event:
        case WorkPoolNameClaimed(work_pool_id=pid):
            return WorkPoolNameClaim(pid)
        case WorkPoolNameReleased():
            return WorkPoolNameClaim(None)
    return claim


# ---------------------------------------------------------------------------------------------
# Decide


def decide_create_work_pool(
    cmd: CreateWorkPool, claim: WorkPoolNameClaim, ctx: DecisionContext, *, internal: bool = False
) -> Decision:
    problem = base_job_template_problem(cmd.base_job_template)  # a schema check in Prefect: first (422)
    if problem:
        raise invalid(problem, field="base_job_template")
    if is_reserved_work_pool_name(cmd.name) and not internal:
        raise forbidden("Work pools starting with 'Prefect' are reserved for internal use.")
    # Then Prefect checks the variables' schema, resolves the defaults' block references and
    # checks the defaults against the schema: after the 403.
    if (problem := variables_schema_problem(cmd.base_job_template)) is not None:
        raise invalid(problem, field="base_job_template")
    if references_a_block(cmd.base_job_template):
        raise not_found("Block not found.")
    if (problem := variable_defaults_problem(cmd.base_job_template)) is not None:
        raise invalid(problem, field="base_job_template")
    if claim.work_pool_id is not None:
        raise conflict("A work pool with this name already exists.")
    pool_id, queue_id = ctx.new_id(), ctx.new_id()
    if cmd.type == LEGACY_POOL_TYPE:
        status = None
    else:
        status = Status.PAUSED if cmd.is_paused else Status.NOT_READY
    default_queue = WorkQueueSnapshot(
        id=queue_id, name=DEFAULT_QUEUE_NAME, description=DEFAULT_QUEUE_DESCRIPTION, is_paused=False,
        concurrency_limit=None, priority=1, status=Status.NOT_READY, last_polled=None,
        created=ctx.now, updated=ctx.now,
    )
    pool = WorkPoolSnapshot(
        id=pool_id, name=cmd.name, description=cmd.description, type=cmd.type,
        base_job_template=cmd.base_job_template, is_paused=cmd.is_paused,
        concurrency_limit=cmd.concurrency_limit, storage_configuration=cmd.storage_configuration,
        status=status, default_queue_id=queue_id, created=ctx.now, updated=ctx.now,
    )
    created = WorkPoolCreated(pool=pool, default_queue=default_queue)
    state = evolve(None, created)
    return Decision(
        events=[
            NewEvent(name_aggregate_id(cmd.name), WorkPoolNameClaimed(name=cmd.name, work_pool_id=pool_id)),
            NewEvent(str(pool_id), created),
        ],
        result=state,
        created=True,
    )


_POOL_UPDATE_FIELDS = ("description", "is_paused", "base_job_template", "concurrency_limit", "storage_configuration")
_POOL_UPDATE_ALLOWED_WHEN_RESERVED = {"is_paused", "concurrency_limit"}


def decide_update_work_pool(cmd: UpdateWorkPool, pool: WorkPool | None, ctx: DecisionContext) -> Decision:
    given = cmd.explicitly_set() - {"name"}
    problem = base_job_template_problem(cmd.base_job_template) if cmd.base_job_template is not None else None
    if problem:  # a schema check in Prefect: before the 403 and the 404
        raise invalid(problem, field="base_job_template")
    if is_reserved_work_pool_name(cmd.name) and not given <= _POOL_UPDATE_ALLOWED_WHEN_RESERVED:
        raise forbidden("Work pools starting with 'Prefect' are reserved for internal use and can only be updated to set concurrency limits or pause.")
    if pool is None:
        raise pool_not_found(cmd.name)
    values: dict[str, Any] = {}
    for name in _POOL_UPDATE_FIELDS:
        if name not in given:
            continue
        value = getattr(cmd, name)
        if value is None and name in ("is_paused", "base_job_template", "storage_configuration"):
            continue  # not nullable: an explicit null means "leave it"
        values[name] = value
    changes = {k: Change(old=_dump(getattr(pool, k)), new=_dump(v)) for k, v in values.items() if getattr(pool, k) != v}
    status_change = None
    new_status = pool.status
    if "is_paused" in values and pool.type != LEGACY_POOL_TYPE:
        if values["is_paused"]:
            new_status = Status.PAUSED
        else:
            new_status = Status.READY if pool.has_online_worker else Status.NOT_READY
        status_change = Change(old=pool.status, new=new_status)
    if not changes and status_change is None:
        return Decision(events=[], result=pool, created=False)
    updated = replace(pool, **values, status=new_status, updated=ctx.now)
    event = WorkPoolUpdated(pool=WorkPoolSnapshot.of(updated), changes=changes, status=status_change)
    return Decision(events=[NewEvent(str(pool.id), event)], result=updated)


def decide_delete_work_pool(cmd: DeleteWorkPool, pool: WorkPool | None, ctx: DecisionContext) -> Decision:
    if is_reserved_work_pool_name(cmd.name):
        raise forbidden("Work pools starting with 'Prefect' are reserved for internal use and can not be deleted.")
    if pool is None:
        raise pool_not_found(cmd.name)
    queue_ids = [q.id for q in pool.queues_by_priority()]
    return Decision(
        events=[
            NewEvent(name_aggregate_id(pool.name), WorkPoolNameReleased(name=pool.name, work_pool_id=pool.id)),
            NewEvent(str(pool.id), WorkPoolDeleted(pool_id=pool.id, name=pool.name, queue_ids=queue_ids, deleted=ctx.now)),
        ],
        result=None,
    )


def _refuse_past_int32(pool: WorkPool, priorities: dict[uuid.UUID, int], field: str | None,
                       new_queue: tuple[uuid.UUID, str] | None = None) -> None:
    """Priorities live in an `integer` column: a command whose priority rules (PR-1, WQ-2)
    would move any queue past 2^31-1 is invalid, whatever queue it would be."""
    past = first_past_int32(priorities)
    if past is None:
        return
    queue_id, priority = past
    if new_queue is not None and queue_id == new_queue[0]:
        name = new_queue[1]
    else:
        name = pool.queues[queue_id].name if queue_id in pool.queues else str(queue_id)
    raise invalid(
        f"the priority rules would move work queue '{name}' to priority {priority}, past the largest "
        f"priority that can be stored ({INT32_MAX})", field=field)


def _new_queue_events(pool: WorkPool, name: str, description: str | None, is_paused: bool,
                      concurrency_limit: int | None, priority: int | None, ctx: DecisionContext,
                      queue_filter: QueueFilter | None = None) -> Decision:
    if pool.queue_named(name) is not None:
        raise conflict("A work queue with this name already exists.")
    queue_id = ctx.new_id()
    if priority is None:
        given, moved = next_free_priority(pool.priority_values()), {}
    else:
        # WQ-3: created with p, then the pool is re-prioritised with {new queue: p}.
        current = pool.priorities()
        after = reprioritize({**current, queue_id: priority}, {queue_id: priority})
        given = after.pop(queue_id)
        moved = {qid: p for qid, p in after.items() if current[qid] != p}
    _refuse_past_int32(pool, {queue_id: given, **moved}, "priority", (queue_id, name))
    queue = WorkQueueSnapshot(
        id=queue_id, name=name, description=description, is_paused=is_paused,
        concurrency_limit=concurrency_limit, priority=given, status=Status.NOT_READY,  # WQ-4 quirk
        last_polled=None, created=ctx.now, updated=ctx.now, filter=queue_filter,
    )
    event = WorkQueueCreated(queue=queue, reprioritized=moved)
    after_pool = evolve(pool, event)
    assert after_pool is not None
    return Decision(events=[NewEvent(str(pool.id), event)], result=(after_pool, after_pool.queues[queue_id]), created=True,
                    after={str(pool.id): after_pool})


def decide_create_work_queue(cmd: CreateWorkQueue, pool: WorkPool | None, ctx: DecisionContext) -> Decision:
    if pool is None:
        raise pool_not_found(cmd.work_pool_name)
    return _new_queue_events(pool, cmd.name, cmd.description, cmd.is_paused, cmd.concurrency_limit, cmd.priority, ctx)


def decide_create_legacy_work_queue(
    cmd: CreateLegacyWorkQueue, claim: WorkPoolNameClaim, pool: WorkPool | None, ctx: DecisionContext
) -> Decision:
    """WQ-9: create `default-agent-pool` first when it is missing."""
    events: list[NewEvent] = []
    if pool is None:
        made = decide_create_work_pool(
            CreateWorkPool(name=LEGACY_POOL_NAME, type=LEGACY_POOL_TYPE), claim, ctx, internal=True
        )
        events, pool = made.events, made.result
        assert pool is not None
        if cmd.name == DEFAULT_QUEUE_NAME:
            return Decision(events=events, result=(pool, pool.queues[pool.default_queue_id]), created=True)
    made = _new_queue_events(pool, cmd.name, cmd.description, cmd.is_paused, cmd.concurrency_limit, cmd.priority, ctx,
                             cmd.filter)
    return Decision(events=events + made.events, result=made.result, created=True)


_QUEUE_UPDATE_FIELDS = ("name", "description", "is_paused", "concurrency_limit", "priority", "last_polled", "filter")


def _decide_update_queue(pool: WorkPool, queue: WorkQueue, cmd: UpdateWorkQueue | UpdateWorkQueueById,
                         ctx: DecisionContext, *, run_pr1: bool) -> Decision:
    given = cmd.explicitly_set()
    values: dict[str, Any] = {}
    for name in _QUEUE_UPDATE_FIELDS:
        if name in given:  # `filter` only by id (the legacy queue API)
            value = getattr(cmd, name)
            if value is None and name in ("name", "is_paused", "priority"):  # last_polled may be cleared (C-4)
                continue
            values[name] = value
    if "name" in values and values["name"] != queue.name and pool.queue_named(values["name"]) is not None:
        raise conflict("A work queue with this name already exists.")
    # WQ-8: status follows a pause or an unpause.
    status_change = None
    new_status = queue.status
    if values.get("is_paused") is True and queue.status != Status.PAUSED:
        new_status = Status.PAUSED
    elif values.get("is_paused") is False and queue.status == Status.PAUSED:
        last_polled = values.get("last_polled", queue.last_polled)
        recent = last_polled is not None and ctx.now - last_polled <= RECENTLY_POLLED
        new_status = Status.READY if recent else Status.NOT_READY
    if new_status != queue.status:
        status_change = Change(old=queue.status, new=new_status)
    moved: dict[uuid.UUID, int] = {}
    if "priority" in values and run_pr1:
        current = pool.priorities()
        after = reprioritize(current, {queue.id: values["priority"]})
        values["priority"] = after[queue.id]
        moved = {qid: p for qid, p in after.items() if qid != queue.id and current[qid] != p}
        _refuse_past_int32(pool, {queue.id: after[queue.id], **moved}, "priority")
    changes = {k: Change(old=_dump(getattr(queue, k)), new=_dump(v)) for k, v in values.items() if getattr(queue, k) != v}
    if not changes and status_change is None and not moved:
        return Decision(events=[], result=(pool, queue), created=False)
    updated = replace(queue, **values, status=new_status, updated=ctx.now)
    event = WorkQueueUpdated(queue=WorkQueueSnapshot.of(updated), changes=changes, status=status_change, reprioritized=moved)
    after_pool = evolve(pool, event)
    assert after_pool is not None
    return Decision(events=[NewEvent(str(pool.id), event)], result=(after_pool, after_pool.queues[queue.id]),
                    after={str(pool.id): after_pool})


def decide_update_work_queue(cmd: UpdateWorkQueue, pool: WorkPool | None, ctx: DecisionContext) -> Decision:
    if pool is None:
        raise pool_not_found(cmd.work_pool_name)
    queue = pool.queue_named(cmd.work_queue_name)
    if queue is None:
        raise queue_not_found(cmd.work_pool_name, cmd.work_queue_name)
    return _decide_update_queue(pool, queue, cmd, ctx, run_pr1=True)


def decide_update_work_queue_by_id(cmd: UpdateWorkQueueById, pool: WorkPool | None, ctx: DecisionContext) -> Decision:
    queue = pool.queues.get(cmd.id) if pool else None
    if pool is None or queue is None:
        raise queue_id_not_found(cmd.id)
    return _decide_update_queue(pool, queue, cmd, ctx, run_pr1=False)


def _decide_delete_queue(pool: WorkPool, queue: WorkQueue, ctx: DecisionContext) -> Decision:
    if queue.id == pool.default_queue_id:
        raise conflict("Can't delete a pool's default queue.")
    remaining = {q.id: q.priority for q in pool.queues.values() if q.id != queue.id}
    after = reprioritize(remaining, {})  # PR-4
    moved = {qid: p for qid, p in after.items() if remaining[qid] != p}
    _refuse_past_int32(pool, moved, None)  # only queues that share a priority (WQ-11) can be pushed
    event = WorkQueueDeleted(queue_id=queue.id, name=queue.name, reprioritized=moved, deleted=ctx.now)
    return Decision(events=[NewEvent(str(pool.id), event)], result=None)


def decide_delete_work_queue(cmd: DeleteWorkQueue, pool: WorkPool | None, ctx: DecisionContext) -> Decision:
    if pool is None:
        raise pool_not_found(cmd.work_pool_name)
    queue = pool.queue_named(cmd.work_queue_name)
    if queue is None:
        raise queue_not_found(cmd.work_pool_name, cmd.work_queue_name)
    return _decide_delete_queue(pool, queue, ctx)


def decide_delete_work_queue_by_id(cmd: DeleteWorkQueueById, pool: WorkPool | None, ctx: DecisionContext) -> Decision:
    queue = pool.queues.get(cmd.id) if pool else None
    if pool is None or queue is None:
        raise queue_id_not_found(cmd.id)
    return _decide_delete_queue(pool, queue, ctx)


def decide_set_work_queue_priorities(cmd: SetWorkQueuePriorities, pool: WorkPool | None, ctx: DecisionContext) -> Decision:
    if pool is None:
        raise pool_not_found(cmd.work_pool_name)
    current = {q.id: q.priority for q in pool.queues.values()}
    by_name = {q.name: q.id for q in pool.queues.values()}
    if len(set(cmd.priorities.values())) != len(cmd.priorities):
        # PR-1 step 1 looks at the whole map, unknown names included
        raise invalid(str(DuplicateTargetPriorities()), field="priorities")
    after = reprioritize(current, {by_name[n]: p for n, p in cmd.priorities.items() if n in by_name})
    moved = {qid: p for qid, p in after.items() if current[qid] != p}
    _refuse_past_int32(pool, moved, "priorities")
    if not moved:
        return Decision(events=[], result=pool, created=False)
    event = WorkQueuesReprioritized(reprioritized=moved, updated=ctx.now)
    return Decision(events=[NewEvent(str(pool.id), event)], result=evolve(pool, event))


def decide_record_polls(cmd: RecordWorkQueuesPolled, pool: WorkPool | None, ctx: DecisionContext) -> Decision:
    """Every polled queue gets `last_polled = now`, paused ones included; a NOT_READY one
    (even a paused one: a Prefect quirk) becomes READY. The pool's status is untouched."""
    if pool is None:
        raise pool_not_found(cmd.work_pool_name)
    ids = [qid for qid in dict.fromkeys(cmd.work_queue_ids) if qid in pool.queues]
    if not ids:
        return Decision(events=[], result=None)
    ready = [qid for qid in ids if pool.queues[qid].status == Status.NOT_READY]
    routine = not cmd.readies_deployments and all(pool.queues[qid].status == Status.READY for qid in ids)
    event = WorkQueuesPolled(queue_ids=ids, ready=ready, polled=ctx.now, routine=routine)
    return Decision(events=[NewEvent(str(pool.id), event)], result=None, after={str(pool.id): evolve(pool, event)})


def decide_mark_work_pool_not_ready(cmd: MarkWorkPoolNotReady, pool: WorkPool | None, ctx: DecisionContext) -> Decision:
    """Only a READY pool, and only when none of its workers is online: never makes a pool
    READY, never touches a PAUSED or NOT_READY one."""
    if pool is None:
        raise pool_not_found(cmd.work_pool_name)
    if pool.status != Status.READY or pool.has_online_worker:
        return Decision(events=[], result=None)
    event = WorkPoolWorkersChanged(status=Change(old=Status.READY, new=Status.NOT_READY))
    return Decision(events=[NewEvent(str(pool.id), event)], result=None)


def _unpolled(queue: WorkQueue, now: datetime) -> bool:
    return queue.last_polled is None or now - queue.last_polled > NOT_READY_AFTER


def decide_mark_work_queues_not_ready(cmd: MarkWorkQueuesNotReady, pool: WorkPool | None,
                                      ctx: DecisionContext) -> Decision:
    """Only READY queues that were polled once, more than 60 seconds ago: never PAUSED,
    NOT_READY or never-polled ones."""
    if pool is None:
        raise pool_not_found(cmd.work_pool_name)
    ids = [qid for qid in dict.fromkeys(cmd.work_queue_ids)
           if (q := pool.queues.get(qid)) is not None and q.status == Status.READY
           and q.last_polled is not None and _unpolled(q, ctx.now)]
    if not ids:
        return Decision(events=[], result=None)
    event = WorkQueuesNotReady(queue_ids=ids, checked=ctx.now,
                               last_polled={qid: pool.queues[qid].last_polled for qid in ids})  # type: ignore[misc]
    return Decision(events=[NewEvent(str(pool.id), event)], result=None)


def decide_mark_deployments_not_ready(cmd: MarkDeploymentsNotReady, pool: WorkPool | None,
                                      ctx: DecisionContext) -> Decision:
    """Nothing while the deployments' queue has been polled within 60 seconds."""
    if pool is None:
        raise pool_not_found(cmd.work_pool_name)
    queue = pool.queues.get(cmd.work_queue_id)
    if queue is None:
        raise queue_id_not_found(cmd.work_queue_id)
    ids = list(dict.fromkeys(cmd.deployment_ids))
    if not ids or not _unpolled(queue, ctx.now):
        return Decision(events=[], result=None)
    event = WorkQueueDeploymentsNotReady(work_queue_id=queue.id, deployment_ids=ids, checked=ctx.now,
                                         last_polled=last_polled_of(ids, cmd.last_polled, ctx.now))
    return Decision(events=[NewEvent(str(pool.id), event)], result=None)


def _dump(value: Any) -> Any:
    if isinstance(value, BaseModel):
        return value.model_dump(mode="json")
    if isinstance(value, datetime | uuid.UUID):
        return value.isoformat() if isinstance(value, datetime) else str(value)
    return value


# ---------------------------------------------------------------------------------------------
# Replies (Prefect's response shapes)


# Every queue's health policy (WQ-13): Prefect has no other yet.
HEALTH_CHECK_POLICY = {"maximum_late_runs": 0, "maximum_seconds_since_last_polled": 60}


def work_queue_health(late_runs_count: int, last_polled: datetime | None, now: datetime) -> dict[str, Any]:
    """WQ-13: a queue is healthy while no run waits in it past its time and a worker asked it
    for work within the last minute; never polled is unhealthy, since nothing would run."""
    stale = (last_polled is None
             or (now - last_polled).total_seconds() > HEALTH_CHECK_POLICY["maximum_seconds_since_last_polled"])
    return {
        "healthy": late_runs_count <= HEALTH_CHECK_POLICY["maximum_late_runs"] and not stale,
        "late_runs_count": late_runs_count,
        "last_polled": json_time(last_polled),
        "health_check_policy": dict(HEALTH_CHECK_POLICY),
    }


def work_pool_reply(pool: WorkPool, active_slots: int | None = None) -> dict[str, Any]:
    """WP-3: `prefect-agent` pools report no status; SL-1: `active_slots` only with a limit.
    `active_slots`: the runs holding a slot of the pool (`slots.PoolSlots.total`), which the
    handler loads; None only for a pool that cannot have any yet (just created)."""
    return {
        "id": str(pool.id),
        "created": json_time(pool.created),
        "updated": json_time(pool.updated),
        "name": pool.name,
        "description": pool.description,
        "type": pool.type,
        "base_job_template": pool.base_job_template,
        "is_paused": pool.is_paused,
        "concurrency_limit": pool.concurrency_limit,
        "status": None if pool.type == LEGACY_POOL_TYPE else (pool.status.value if pool.status else None),
        "default_queue_id": str(pool.default_queue_id),
        "storage_configuration": pool.storage_configuration.model_dump(mode="json"),
        "active_slots": (active_slots or 0) if pool.concurrency_limit is not None else None,
    }


def work_queue_reply(pool: WorkPool, queue: WorkQueue, active_slots: int | None = None) -> dict[str, Any]:
    """SL-2: `active_slots` only with a limit: the queue's runs holding a slot
    (`slots.PoolSlots.of_queue`), which the handler loads; None only for a new queue."""
    return {
        "id": str(queue.id),
        "created": json_time(queue.created),
        "updated": json_time(queue.updated),
        "name": queue.name,
        "description": queue.description,
        "is_paused": queue.is_paused,
        "concurrency_limit": queue.concurrency_limit,
        "priority": queue.priority,
        "work_pool_id": str(pool.id),
        "work_pool_name": pool.name,
        "last_polled": json_time(queue.last_polled),
        "status": queue.status.value,
        "filter": queue.filter.model_dump(mode="json") if queue.filter is not None else None,
        "active_slots": (active_slots or 0) if queue.concurrency_limit is not None else None,
    }
