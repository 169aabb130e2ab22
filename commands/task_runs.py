"""Task runs: the fine-grained units of work, run by task workers that take them from their
task key's subjects (`commands/task_keys.py`).

`TaskRun` is the one definition of a task run's shape: the aggregate's state, the payload of
its events, the read model's row, both replies and the message a task worker receives. Its
current `state` is part of it; every written state is an event of its own (`TaskRunStateSet`).

A task run is unique on (flow run, task key, dynamic key), a missing flow run counting as a
value: a create of those keys again returns the existing run, its state not applied (TR-1).

Beyond Prefect, whose background tasks wait in one server's memory:
- a run written SCHEDULED with `deferred` is queued on its key's subject once its events are
  stored (`Decision.queue`), so a restart loses nothing;
- a task worker that starts a run names itself and the delivery it took the run from
  (`SetTaskRunState.task_worker_id`, `.delivery`): the run is held by that worker while it
  runs, a second copy of its message cannot start it again, and a worker that stops
  acknowledging it in time (it died) is replaced by the next one JetStream delivers it to.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Mapping
from datetime import datetime, timedelta
from functools import lru_cache
from typing import Annotated, Any, ClassVar, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    StringConstraints,
    field_validator,
    model_validator,
)

from . import tag_concurrency_limits as tcl
from . import task_run_rules
from .bounds import INT32_MAX, RUN_STATE_HEADROOM_BYTES, JsonDocument, StoredText, UtcDatetime
from .decisions import Decision, NewEvent, QueuedTaskRun
from .events import register_event, register_upcaster
from .flow_runs import FlowRun
from .flows import Tags
from .messages import (
    Command,
    DecisionContext,
    Event,
    conflict,
    empty_dict,
    empty_list,
    invalid,
    not_found,
)
from .names import MAX_NAME_LENGTH
from .states import TERMINAL, State, StateCreate, StateType
from .task_keys import check_task_key

TASK_RUN = "task_run"
TASK_CACHE = "task_cache"
# The runs moving now; older ones are loaded again from the log (one direct get) when touched.
CACHED_TASK_RUNS = 50_000
# The id a task run's keys (flow run id or "", task key, dynamic key) make: the run's own id
# when the creator chose none, else the id of a marker naming the run that holds them (TR-1).
_KEYS_NAMESPACE = uuid.UUID("6f1c1a2e-5b8e-4c1e-9a43-7d2f0c9b8e51")

MAX_RETRY_DELAYS = 50
MAX_CACHE_KEY_LENGTH = task_run_rules.MAX_CACHE_KEY_LENGTH
# How many entries one cache key keeps at most (`TaskCache`): only entries that expire later
# than every newer one are kept, so more than a few takes expirations set ever sooner.
MAX_CACHE_ENTRIES_PER_KEY = 16
# How long a submitter may ask to wait for room on a full task key.
MAX_QUEUE_WAIT_SECONDS = 60.0

TaskKey = Annotated[StoredText, StringConstraints(min_length=1, max_length=2_000), AfterValidator(check_task_key)]
DynamicKey = Annotated[StoredText, StringConstraints(max_length=2_000)]
TaskWorkerId = Annotated[StoredText, StringConstraints(min_length=1, max_length=MAX_NAME_LENGTH)]
ShortText = Annotated[StoredText, StringConstraints(max_length=10_000)]
Seconds = Annotated[float, Field(ge=0, le=INT32_MAX, allow_inf_nan=False)]
# A retry count or delay as Prefect's `TaskRunPolicy` takes it: with no lower bound. A negative
# count retries nothing; a negative delay schedules the retry that far in the past, so it is
# due at once (as a delay of 0 would be).
SignedCount = Annotated[int, Field(ge=-INT32_MAX, le=INT32_MAX)]
SignedSeconds = Annotated[float, Field(ge=-INT32_MAX, le=INT32_MAX, allow_inf_nan=False)]


class TaskRunPolicy(BaseModel):
    """Prefect's task `empirical_policy`: how many retries, after how long, with what jitter.
    As in Prefect, counts and delays may be negative (only the number of delays and the jitter
    are checked): a negative count means no retries, a negative delay a retry due at once."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    max_retries: SignedCount = 0  # deprecated in Prefect
    retry_delay_seconds: SignedSeconds = 0  # deprecated in Prefect
    retries: SignedCount | None = None
    retry_delay: SignedSeconds | list[SignedSeconds] | None = None
    retry_jitter_factor: float | None = None

    @field_validator("retry_delay")
    @classmethod
    def _at_most_50_delays(cls, value: Any) -> Any:
        if isinstance(value, list) and len(value) > MAX_RETRY_DELAYS:
            raise ValueError(f"Can not configure more than {MAX_RETRY_DELAYS} retry delays per task.")
        return value

    @field_validator("retry_jitter_factor")
    @classmethod
    def _non_negative_jitter(cls, value: float | None) -> float | None:
        if value is not None and (value < 0 or value != value or value > INT32_MAX):
            raise ValueError("`retry_jitter_factor` must be >= 0.")
        return value


class TaskRun(BaseModel):
    """A task run, as stored, projected, answered and queued (Prefect's field names; durations
    in seconds)."""

    model_config = ConfigDict(extra="forbid", frozen=True, ser_json_timedelta="float")

    id: uuid.UUID
    created: UtcDatetime
    updated: UtcDatetime
    name: str
    flow_run_id: uuid.UUID | None = None
    task_key: str
    dynamic_key: str
    cache_key: str | None = None
    cache_expiration: UtcDatetime | None = None
    task_version: str | None = None
    empirical_policy: TaskRunPolicy = TaskRunPolicy()
    tags: list[str] = empty_list()
    labels: dict[str, Any] = empty_dict()
    task_inputs: dict[str, Any] = empty_dict()
    state_id: uuid.UUID | None = None
    state_type: StateType | None = None
    state_name: str | None = None
    run_count: int = 0
    flow_run_run_count: int = 0
    expected_start_time: UtcDatetime | None = None
    next_scheduled_start_time: UtcDatetime | None = None
    start_time: UtcDatetime | None = None
    end_time: UtcDatetime | None = None
    total_run_time: timedelta = Field(default=timedelta(0))
    state: State | None = None
    # Beyond Prefect: a background task's parameters, kept in the log with it (Prefect keeps
    # them in result storage under `task_parameters_id`), so a queued run can always be sent again.
    parameters: dict[str, Any] = empty_dict()
    # Beyond Prefect: the state that last queued the run on its key's subject, and the task
    # worker that holds it while it runs.
    queued_state_id: uuid.UUID | None = None
    task_worker_id: str | None = None
    # Beyond Prefect: the message (`<stream>:<sequence>`) the running run was started from.
    task_message: str | None = None
    # Beyond Prefect: why the run waits, when its tags' concurrency limits hold it back (the
    # reason its last refused start was given). Cleared by the next state written.
    waiting_reason: str | None = None


# ---------------------------------------------------------------------------------------------
# Events


class _TaskRunEvent(Event):
    aggregate_type: ClassVar[str] = TASK_RUN


# The events that carry the whole run are at v2 since the run gained `waiting_reason`: a reader
# of v1 refuses them cleanly as newer, where it would fail on the unknown field (events forbid
# extra fields). A v1 payload reads as it is: the run did not wait.
_RUN_SHAPE_VERSION = 2


@register_event
class TaskRunCreated(_TaskRunEvent):
    """A new task run, with its first state (`run.state`) if it has one."""

    event_type: ClassVar[str] = "TaskRunCreated"
    schema_version: ClassVar[int] = _RUN_SHAPE_VERSION
    run: TaskRun

    def append_headroom(self) -> int:
        return RUN_STATE_HEADROOM_BYTES  # every later state carries the whole run again


@register_event
class TaskRunStateSet(_TaskRunEvent):
    """A state was written (`run.state`, with the bookkeeping it caused)."""

    event_type: ClassVar[str] = "TaskRunStateSet"
    schema_version: ClassVar[int] = _RUN_SHAPE_VERSION
    run: TaskRun


@register_event
class TaskRunUpdated(_TaskRunEvent):
    event_type: ClassVar[str] = "TaskRunUpdated"
    schema_version: ClassVar[int] = _RUN_SHAPE_VERSION
    run: TaskRun
    changed: list[str]


@register_upcaster("TaskRunCreated", 1)
@register_upcaster("TaskRunStateSet", 1)
@register_upcaster("TaskRunUpdated", 1)
def _task_run_v1(payload: dict[str, Any]) -> dict[str, Any]:
    """v2 only added the run's `waiting_reason`, whose default (None: not waiting) is what a v1
    run meant, so a v1 payload is read as it is."""
    return payload


@register_event
class TaskRunWaiting(_TaskRunEvent):
    """A start was refused because a tag's concurrency limit is full (or 0), and nothing else was
    written: the run's `waiting_reason` says which tag (recorded when it changes, not at every
    refused start, which a task worker proposes again after each wait)."""

    event_type: ClassVar[str] = "TaskRunWaiting"
    run: TaskRun


@register_event
class TaskRunDeleted(_TaskRunEvent):
    event_type: ClassVar[str] = "TaskRunDeleted"
    task_run_id: uuid.UUID
    task_key: str


class TaskRunKeys(BaseModel):
    """Which run holds a set of keys, when its creator chose its id (a run created without one
    takes the id its keys make, and is its own marker)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    task_run_id: uuid.UUID
    flow_run_id: uuid.UUID | None = None
    task_key: str
    dynamic_key: str


@register_event
class TaskRunKeysTaken(_TaskRunEvent):
    """Written under the id the keys make, beside the run's creation under its own id."""

    event_type: ClassVar[str] = "TaskRunKeysTaken"
    keys: TaskRunKeys


@register_event
class TaskRunKeysReleased(_TaskRunEvent):
    """The run holding the keys was deleted: they are free again."""

    event_type: ClassVar[str] = "TaskRunKeysReleased"
    task_run_id: uuid.UUID


class TaskCacheEntry(BaseModel):
    """A COMPLETED state recorded under its cache key (a lookup takes the newest one unexpired)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    cache_key: str
    state: State

    @property
    def expiration(self) -> datetime | None:
        return self.state.state_details.cache_expiration

    def expired(self, now: datetime) -> bool:
        return self.expiration is not None and self.expiration <= now


class TaskCache(BaseModel):
    """What one cache key holds (the cache aggregate's state, folded from its entries): the
    entries that may still answer a lookup, newest first. A lookup takes the newest one not
    expired, as Prefect's does; an entry is dropped once it has expired, or once a newer one
    expires no sooner (that one answers whenever it could), so at most one never-expiring
    entry is kept, last."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    cache_key: str
    entries: tuple[TaskCacheEntry, ...] = ()

    def newest_unexpired(self, now: datetime) -> TaskCacheEntry | None:
        return next((e for e in self.entries if not e.expired(now)), None)

    def recorded(self, entry: TaskCacheEntry) -> TaskCache:
        """With `entry` as the newest; expiry is judged at its state's time, so that a replay
        folds to the same entries."""
        kept = [entry]
        for older in self.entries:
            newest_kept = kept[-1].expiration
            if newest_kept is None or len(kept) >= MAX_CACHE_ENTRIES_PER_KEY:
                break
            if older.expired(entry.state.timestamp):
                continue
            if older.expiration is None or older.expiration > newest_kept:
                kept.append(older)
        return TaskCache(cache_key=entry.cache_key, entries=tuple(kept))


@register_event
class TaskCacheEntryRecorded(Event):
    aggregate_type: ClassVar[str] = TASK_CACHE
    event_type: ClassVar[str] = "TaskCacheEntryRecorded"
    # v2 added `kept`: a reader of v1 refuses it cleanly as newer, where it would fail on the
    # unknown field (events forbid extra fields).
    schema_version: ClassVar[int] = 2
    entry: TaskCacheEntry
    # The older entries the key keeps beside this one (`TaskCache.recorded`), so that a key
    # loads from its last event however often it was written. Empty in events written before.
    kept: tuple[TaskCacheEntry, ...] = ()


@register_upcaster("TaskCacheEntryRecorded", 1)
def _task_cache_entry_recorded_v1(payload: dict[str, Any]) -> dict[str, Any]:
    """v2 only added `kept`, whose default (none: the key holds this entry alone) is what a
    v1 event meant, so a v1 payload is read as it is. One written at v1 with `kept` already
    (before the version was raised) keeps its entries."""
    return payload


# ---------------------------------------------------------------------------------------------
# Commands

RunName = Annotated[StoredText, StringConstraints(max_length=MAX_NAME_LENGTH)]
CacheKey = Annotated[StoredText, StringConstraints(max_length=MAX_CACHE_KEY_LENGTH)]


class CreateTaskRun(Command):
    """A new task run, or the existing one with the same (flow run, task key, dynamic key)
    (`created: false`, its state unchanged). A SCHEDULED state with `deferred` queues the run
    on its key's subject for a task worker. `queue_wait_seconds` (beyond Prefect): how long to
    wait for room when the key's queue is full, before the run is cancelled and the submitter
    told; 0 = not at all."""

    id: uuid.UUID | None = None
    name: RunName | None = None
    flow_run_id: uuid.UUID | None = None
    task_key: TaskKey
    dynamic_key: DynamicKey
    cache_key: CacheKey | None = None
    cache_expiration: UtcDatetime | None = None
    task_version: ShortText | None = None
    empirical_policy: TaskRunPolicy = TaskRunPolicy()
    tags: Tags = empty_list()
    labels: JsonDocument = empty_dict()
    task_inputs: JsonDocument = empty_dict()
    parameters: JsonDocument = empty_dict()
    state: StateCreate | None = None
    queue_wait_seconds: Annotated[float, Field(ge=0, le=MAX_QUEUE_WAIT_SECONDS, allow_inf_nan=False)] = 0


MAX_TASK_RUNS_PER_COMMAND = 1_000


class CreateTaskRuns(Command):
    """Many task runs in one request (`Task.map`): each item is a `CreateTaskRun`, decided as
    if sent alone (side by side), so an item that fails (its key full) does not undo the
    others. The reply's result lists one short reply per item, in the order given: the run's
    id, keys and state, or the item's error. A body with an invalid item is refused whole,
    nothing created. Sending it again is safe through each run's own keys (flow run, task
    key, dynamic key), so the bulk takes no `idempotency_key` of its own."""

    task_runs: Annotated[list[CreateTaskRun], Field(min_length=1, max_length=MAX_TASK_RUNS_PER_COMMAND)]
    BUS_KEY_FIELD: ClassVar[str | None] = None

    @model_validator(mode="after")
    def _no_bus_key(self) -> CreateTaskRuns:
        if self.idempotency_key is not None:
            raise ValueError("CreateTaskRuns takes no idempotency_key: each run's (flow_run_id, task_key, "
                             "dynamic_key) makes sending it again safe")
        return self


class TaskDelivery(BaseModel):
    """Which message a task worker took a run from: the state that queued it, the message itself
    (`<stream>:<sequence>`) and JetStream's delivery count (above 1: that message was delivered
    before and not acknowledged in time)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    state_id: uuid.UUID
    message: Annotated[StoredText, StringConstraints(max_length=200)] | None = None
    attempt: Annotated[int, Field(ge=1, le=INT32_MAX)] = 1


class SetTaskRunState(Command):
    """Propose a state; the task orchestration rules decide what is written. A task
    worker names itself (`task_worker_id`) and, when it starts a run, the delivery it took it
    from (`delivery`)."""

    id: uuid.UUID
    state: StateCreate
    force: bool = False
    task_worker_id: TaskWorkerId | None = None
    delivery: TaskDelivery | None = None
    queue_wait_seconds: Annotated[float, Field(ge=0, le=MAX_QUEUE_WAIT_SECONDS, allow_inf_nan=False)] = 0


MAX_STATES_PER_COMMAND = 100


class SetTaskRunStates(Command):
    """Many `SetTaskRunState` in one request: what a task worker sends when several of its runs
    start or end at the same moment (one request instead of one per run). Each item is decided
    as if sent alone, side by side, with its own `idempotency_key` if it has one; the reply
    lists one reply per item, in order. A body with an invalid item is refused whole, nothing
    written: the worker then sends each alone, so that each hears its own answer."""

    states: Annotated[list[SetTaskRunState], Field(min_length=1, max_length=MAX_STATES_PER_COMMAND)]
    BUS_KEY_FIELD: ClassVar[str | None] = None

    @model_validator(mode="after")
    def _no_bus_key(self) -> SetTaskRunStates:
        if self.idempotency_key is not None:
            raise ValueError("SetTaskRunStates takes no idempotency_key: give each item its own")
        return self


class UpdateTaskRun(Command):
    """Prefect's task-run update: the name."""

    id: uuid.UUID
    name: RunName | None = None


class DeleteTaskRun(Command):
    id: uuid.UUID


class DeleteFinishedTaskRun(Command):
    """The vacuum's (`RUNLEDGER_FLOW_RUN_RETENTION_SECONDS`): a background task run (no flow
    run) that ended before `ended_before` and is still in a final state is deleted as
    `DeleteTaskRun` deletes it. Nothing happens when the run is gone, belongs to a flow run,
    has moved on from its final state (rerun), or ended later."""

    id: uuid.UUID
    ended_before: UtcDatetime


# ---------------------------------------------------------------------------------------------
# Evolve and decide


def evolve(run: TaskRun | TaskRunKeys | None, event: Event) -> TaskRun | TaskRunKeys | None:
    match event:
        case TaskRunCreated(run=r) | TaskRunStateSet(run=r) | TaskRunUpdated(run=r) | TaskRunWaiting(run=r):
            return r
        case TaskRunKeysTaken(keys=k):
            return k
        case TaskRunDeleted() | TaskRunKeysReleased():
            return None
    return run


def evolve_cache(cache: TaskCache | None, event: Event) -> TaskCache | None:
    """A key's entries are those its last event names (loaded from that event alone)."""
    if not isinstance(event, TaskCacheEntryRecorded):
        return cache
    return TaskCache(cache_key=event.entry.cache_key, entries=(event.entry, *event.kept))


def task_run_not_found() -> Exception:
    return not_found("Task run not found")


def still_there(run: TaskRun | None, flow_run_exists: bool) -> TaskRun | None:
    """A task run of a flow run that was deleted went with it (as Prefect deletes a flow run's
    task runs): no command finds it any more, and its read model drops it."""
    if run is not None and run.flow_run_id is not None and not flow_run_exists:
        return None
    return run


@lru_cache(maxsize=4096)  # a create asks three times (its locks, its handler, its decider)
def keys_id(flow_run_id: uuid.UUID | None, task_key: str, dynamic_key: str) -> uuid.UUID:
    """The id a run's (flow run, task key, dynamic key) make: a create of those keys writes
    under it, with an expected-sequence check, so two creates of one set of keys cannot both
    succeed; a create without an id of its own is a single event there."""
    return uuid.uuid5(_KEYS_NAMESPACE, json.dumps([str(flow_run_id) if flow_run_id is not None else "", task_key,
                                                   dynamic_key], ensure_ascii=False))


def cache_id(cache_key: str) -> str:
    return task_run_rules.cache_id(cache_key)


def _keys(run: TaskRun | CreateTaskRun) -> tuple[uuid.UUID | None, str, str]:
    return run.flow_run_id, run.task_key, run.dynamic_key


def decide_create_task_run(cmd: CreateTaskRun, at_keys: TaskRun | TaskRunKeys | None, holder: TaskRun | None,
                           same_id: TaskRun | None, flow_run: FlowRun | None, ctx: DecisionContext,
                           facts: task_run_rules.TaskFacts = task_run_rules.NO_FACTS,
                           keys_used_before: bool = False) -> Decision:
    """TR-1, TR-2. `at_keys`: what is under the id the keys make (the run, a marker naming
    it, or nothing); `holder`: the run a marker names; `same_id`: the run already under the id
    the client chose, if any; `flow_run`: the run's flow run, when it names one;
    `keys_used_before`: a deleted run held these keys (a new run then gets a fresh id, so no
    id ever names two runs). A new run takes no tag slot, even created RUNNING: its first
    state is forced, as Prefect's."""
    if cmd.flow_run_id is not None and flow_run is None:
        raise not_found(f"Flow run {cmd.flow_run_id} not found.")
    existing = at_keys if isinstance(at_keys, TaskRun) else holder
    if at_keys is not None:
        if existing is None:  # a marker and its run are written together; never apart
            raise RuntimeError(f"task run keys are held by {at_keys}, which does not exist")
        # Whatever id was asked for: the keys name the run (Prefect inserts nothing and reads it).
        return Decision(events=[], result=existing, created=False)
    if same_id is not None:
        raise conflict(f"Task run {same_id.id} exists with other keys (flow run, task key, dynamic key).")
    at = keys_id(cmd.flow_run_id, cmd.task_key, cmd.dynamic_key)
    run_id = cmd.id or (ctx.new_id() if keys_used_before else at)
    labels: dict[str, Any] = {}
    if flow_run is not None:
        labels = {**flow_run.labels, "prefect.flow-run.id": str(flow_run.id), "prefect.flow.id": str(flow_run.flow_id)}
    run = TaskRun.model_validate({
        "id": run_id, "created": ctx.now, "updated": ctx.now,
        "name": cmd.name or f"{cmd.task_key}-{run_id.hex[:3]}",
        "flow_run_id": cmd.flow_run_id, "task_key": cmd.task_key, "dynamic_key": cmd.dynamic_key,
        "cache_key": cmd.cache_key, "cache_expiration": cmd.cache_expiration, "task_version": cmd.task_version,
        "empirical_policy": cmd.empirical_policy, "tags": list(dict.fromkeys(cmd.tags)),
        "labels": {**labels, **cmd.labels}, "task_inputs": cmd.task_inputs, "parameters": cmd.parameters,
    })
    marker = ([NewEvent(str(at), TaskRunKeysTaken(keys=TaskRunKeys(
        task_run_id=run.id, flow_run_id=cmd.flow_run_id, task_key=cmd.task_key, dynamic_key=cmd.dynamic_key)))]
        if run.id != at else [])
    transition = task_run_rules.set_task_run_state(run, cmd.state or StateCreate(type=StateType.PENDING),
                                                   force=True, ctx=ctx, facts=facts)
    after = transition.run
    if transition.state is None:  # refused outright by a rule: created without a state
        after = run
    events = [*marker, NewEvent(str(run.id), TaskRunCreated(run=after)), *cache_events(transition, facts.cached)]
    return Decision(events=events, result=after, created=True, after={str(run.id): after},
                    queue=_queued(run, transition, cmd.queue_wait_seconds))


def decide_set_task_run_state(cmd: SetTaskRunState, run: TaskRun | None, ctx: DecisionContext,
                              facts: task_run_rules.TaskFacts = task_run_rules.NO_FACTS) -> Decision:
    """TR-3: the result is the state written, or the current one when nothing is written. The
    state written clears the run's `waiting_reason` (`task_run_rules._book`)."""
    if run is None:
        raise task_run_not_found()
    facts = facts.with_claim(cmd.task_worker_id, cmd.delivery)
    transition = task_run_rules.set_task_run_state(run, cmd.state, force=cmd.force, ctx=ctx, facts=facts)
    if transition.state is None:
        return _refused(run, transition, ctx)
    after: TaskRun = transition.run
    events = [NewEvent(str(run.id), TaskRunStateSet(run=after)), *cache_events(transition, facts.cached),
              *tag_slot_events(run, transition, facts.tag_limits, facts.global_tag_limits)]
    return Decision(events=events, result=after.state, created=True, after={str(run.id): after},
                    orchestration=transition.orchestration,
                    queue=_queued(run, transition, cmd.queue_wait_seconds))


def _refused(run: TaskRun, transition: task_run_rules.TaskTransition, ctx: DecisionContext) -> Decision:
    """Nothing written. A start its tags' limits refused records why the run waits, when the
    reason is new: a task worker proposes the run again after every wait, and the same reason
    each time must not add an event each time. Any other refusal writes nothing at all."""
    waiting = transition.orchestration.reason if transition.waiting_for_a_tag_slot else None
    if waiting is None or waiting == run.waiting_reason:
        return Decision(events=[], result=run.state, orchestration=transition.orchestration)
    after = run.model_copy(update={"waiting_reason": waiting, "updated": ctx.now})
    return Decision(events=[NewEvent(str(run.id), TaskRunWaiting(run=after))], result=run.state,
                    after={str(run.id): after}, orchestration=transition.orchestration)


def records_waiting_only(decision: Decision) -> bool:
    """Whether a decision writes nothing but why its run waits (`TaskRunWaiting`)."""
    return bool(decision.events) and all(isinstance(e.event, TaskRunWaiting) for e in decision.events)


def cache_events(transition: task_run_rules.TaskTransition,
                 cached: TaskCache | None = None) -> list[NewEvent]:
    """OR-14: a COMPLETED state written with a cache key becomes an entry of that key, beside
    the entries of `cached` (the key's, as loaded) that may still answer; a copy handed out
    from the cache (`Cached`) is not recorded again, nor is a key too long to be cached
    (written, but refused by `cache_insertion`), nor a state written by a policy without
    `cache_insertion` (a forced, non-deferred one: Prefect's minimal policy caches nothing, and
    its handler has not loaded the key, so an entry here would also fail the append)."""
    state = transition.state
    if (not transition.records_cache or state is None or state.type is not StateType.COMPLETED
            or state.name == "Cached"):
        return []
    key = state.state_details.cache_key
    if key is None or len(key) > MAX_CACHE_KEY_LENGTH:
        return []
    return [NewEvent(cache_id(key), cache_entry_recorded(TaskCacheEntry(cache_key=key, state=state), cached))]


def cache_entry_recorded(entry: TaskCacheEntry, cached: TaskCache | None) -> TaskCacheEntryRecorded:
    """`entry` recorded under its key, with the entries of `cached` it keeps beside it."""
    before = cached if cached is not None and cached.cache_key == entry.cache_key else TaskCache(cache_key=entry.cache_key)
    return TaskCacheEntryRecorded(entry=entry, kept=before.recorded(entry).entries[1:])


def tag_slot_events(run: TaskRun, transition: task_run_rules.TaskTransition,
                    limits: Mapping[str, tcl.TagConcurrencyLimit],
                    global_limits: Mapping[str, tcl.GlobalTagLimit] | None = None) -> list[NewEvent]:
    """SL-8: a run let into RUNNING by the tag-slot rule takes a slot of each of its limited
    tags (OR-17): of the tag's active global `tag:<tag>` limit when it has one, else of its
    classic limit; any written state but RUNNING and CANCELLING gives back every slot it
    holds, of either kind, forced or not (OR-18). `limits`, `global_limits`: those of the
    run's tags, as `TaskFacts.tag_limits` and `.global_tag_limits`."""
    state = transition.state
    if state is None:
        return []
    global_limits = global_limits or {}
    if transition.takes_tag_slots:
        governing = task_run_rules.governing_global_limits(run.tags, global_limits)
        fresh = [tag for tag in dict.fromkeys(run.tags)
                 if not task_run_rules.holds_tag_slot(run.id, tag, limits, global_limits)]  # one slot per tag
        taken = [e for tag in fresh if tag in governing for e in tcl.global_slot_taken(governing[tag], run.id)]
        made = [tcl.slot_taken(limits[tag], run.id) for tag in fresh if tag in limits and tag not in governing]
        return [*taken, *(e for e in made if e is not None)]
    if state.type not in tcl.SLOT_STATES:
        return released_tag_slots(run.id, limits, global_limits)
    return []


def released_tag_slots(task_run_id: uuid.UUID, limits: Mapping[str, tcl.TagConcurrencyLimit],
                       global_limits: Mapping[str, tcl.GlobalTagLimit]) -> list[NewEvent]:
    """Every tag slot the run holds given back, classic and global (active or not)."""
    made = [tcl.slot_released(limit, task_run_id) for limit in limits.values()]
    return [*(e for e in made if e is not None),
            *(e for limit in global_limits.values() for e in tcl.global_slot_released(limit, task_run_id))]


def _queued(before: TaskRun, transition: task_run_rules.TaskTransition,
            wait_seconds: float) -> list[QueuedTaskRun]:
    """TQ-4: a transition intended for SCHEDULED and written deferred queues the run as written:
    on its key's retry side when the state is `AwaitingRetry`, else on its scheduled side."""
    state = transition.state
    if not transition.enqueue or state is None:
        return []
    side: Literal["retry", "scheduled"] = "retry" if state.name == "AwaitingRetry" else "scheduled"
    return [QueuedTaskRun(task_key=before.task_key, side=side, run=transition.run, wait_seconds=wait_seconds)]


def decide_update_task_run(cmd: UpdateTaskRun, run: TaskRun | None, ctx: DecisionContext) -> Decision:
    if run is None:
        raise task_run_not_found()
    if "name" not in cmd.explicitly_set() or cmd.name is None or cmd.name == run.name:
        if "name" in cmd.explicitly_set() and cmd.name is None:
            raise invalid("name cannot be null", field="name")
        return Decision(events=[], result=None)
    after = run.model_copy(update={"name": cmd.name, "updated": ctx.now})
    return Decision(events=[NewEvent(str(run.id), TaskRunUpdated(run=after, changed=["name"]))], result=None,
                    after={str(run.id): after})


def decide_delete_finished_task_run(cmd: DeleteFinishedTaskRun, run: TaskRun | None,
                                    tag_limits: Mapping[str, tcl.TagConcurrencyLimit] | None = None,
                                    global_tag_limits: Mapping[str, tcl.GlobalTagLimit] | None = None) -> Decision:
    """The vacuum finds its candidates in the read model, which may lag: the run's end is
    checked again on the log. `created` says whether it was deleted."""
    if (run is None or run.flow_run_id is not None or run.state_type not in TERMINAL or run.end_time is None
            or run.end_time >= cmd.ended_before):
        return Decision(events=[], result=None, created=False)
    deleted = decide_delete_task_run(DeleteTaskRun(id=run.id), run, tag_limits, global_tag_limits)
    return Decision(events=deleted.events, result=None, created=True)


def decide_delete_task_run(cmd: DeleteTaskRun, run: TaskRun | None,
                           tag_limits: Mapping[str, tcl.TagConcurrencyLimit] | None = None,
                           global_tag_limits: Mapping[str, tcl.GlobalTagLimit] | None = None) -> Decision:
    """The run's keys are free again at once, and so are the tag slots it holds (`tag_limits`,
    `global_tag_limits`: its tags' limits; beyond Prefect, which leaves a deleted run in
    them). A copy of it still queued is dropped by the worker that takes it (the run is gone)."""
    if run is None:
        raise task_run_not_found()
    at = keys_id(*_keys(run))
    releases = [NewEvent(str(at), TaskRunKeysReleased(task_run_id=run.id))] if at != run.id else []
    return Decision(events=[*releases, NewEvent(str(run.id), TaskRunDeleted(task_run_id=run.id,
                                                                             task_key=run.task_key)),
                            *released_tag_slots(run.id, tag_limits or {}, global_tag_limits or {})])


def reply(run: TaskRun) -> dict[str, Any]:
    return run.model_dump(mode="json")
