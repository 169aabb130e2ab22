"""The event log in Prefect's event vocabulary (BEHAVIOUR §10): `prefect.work-pool.*` and
`prefect.work-queue.*` events shaped like Prefect's `Event` model, and the lifecycle events of
variables and global concurrency limits (`prefect.variable.*`, `prefect.concurrency-limit.*`).

Pure: no I/O. `to_prefect_events(envelope, state)` turns one stored envelope into the list of
Prefect events Prefect would have emitted for the same fact, in Prefect's order. Some of what
Prefect puts in an event is not in the runledger event itself (a queue event names its pool
and the pool's type; a pool delete names every queue by name; a re-prioritisation reports the
old priority), so the caller passes an `ExportState` that the function keeps up to date: fold
an aggregate's whole history through it, in log order, and print only what you want.

The shapes follow Prefect's `prefect.server.models.events` (`work_pool_created_event`,
`work_pool_updated_event`, `work_pool_status_event`, `work_queue_*_event`) at the commit
BEHAVIOUR.md names. Every exported event gets a deterministic id (a UUIDv5 of the runledger
event id and the position in its list; a run's state event, as in Prefect, its state's id), so
two exports of the same log are identical.

Flow-run state events follow `InstrumentFlowRunStateTransitions` (`flow_run_state_change_event`
and `_flow_run_related_resources_from_orm`): the event is the state's (its id, its timestamp,
`follows` the previous state's event when tight), and relates the run's flow, deployment, queue,
pool and parent task run by name, their tags and the run's creator. Those names come from the
other aggregates' events, so an export of one run or deployment reads them too (`neighbours`).
What the log cannot tell: an object whose history was not folded is related by id only (a
queue with the name the run carries); one seen deleted is left out, as Prefect no longer finds
it; Prefect caches a run's related resources for a while, so it may report an older name than
the export, which uses the names as of each event.

Event types the export does not know (a newer runledger, a newer schema version, an unreadable
payload) produce nothing and are counted in `ExportState.skipped`.
"""

from __future__ import annotations

import uuid
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from pydantic import ValidationError
from pydantic_core import to_jsonable_python

from . import concurrency_limits as cl
from . import tag_concurrency_limits as tcl
from . import task_runs as tr
from . import variables as va
from . import workers as wk
from .deployment_polls import DEPLOYMENT_POLL, DeploymentsPolled, QueuelessDeploymentsNotReady
from .deployments import (
    DEPLOYMENT,
    Deployment,
    DeploymentCreated,
    DeploymentDeleted,
    DeploymentRunsForgotten,
    DeploymentRunsScheduled,
    DeploymentUpdated,
    limit_id,
)
from .events import EVENT_TYPES, EventEnvelope, UnknownEvent
from .flow_runs import (
    FlowRun,
    FlowRunCreated,
    FlowRunDeleted,
    FlowRunDeploymentLeaseExpired,
    FlowRunDeploymentLeaseRenewed,
    FlowRunStateSet,
    FlowRunUpdated,
    FlowRunWaiting,
)
from .flows import FLOW, Flow, FlowCreated, FlowDeleted
from .messages import Event
from .slots import LimitWaitersChanged, PoolQueueSlotsDropped, PoolSlotReleased, PoolSlotTaken
from .states import State, StateType
from .unique_keys import UniqueKeyClaimed, UniqueKeyReleased
from .work_pools import (
    NOT_READY_AFTER,
    Change,
    Status,
    WorkPoolCreated,
    WorkPoolDeleted,
    WorkPoolNameClaimed,
    WorkPoolNameReleased,
    WorkPoolSnapshot,
    WorkPoolUpdated,
    WorkPoolWorkersChanged,
    WorkQueueCreated,
    WorkQueueDeleted,
    WorkQueueDeploymentsNotReady,
    WorkQueuesNotReady,
    WorkQueuesPolled,
    WorkQueuesReprioritized,
    WorkQueueUpdated,
)

# Exported event ids are uuid5(EXPORT_NAMESPACE, "<runledger event id>/<index>").
EXPORT_NAMESPACE = uuid.uuid5(uuid.NAMESPACE_URL, "runledger:export:prefect-events")
# Prefect links a pool status event to the previous one (`follows`) when that one is less than
# ten minutes old (`_get_recent_preceding_work_pool_event_id`).
FOLLOWS_WITHIN = timedelta(minutes=10)
# Prefect's `updated` events list only these fields (is_paused is reported by a status event).
POOL_EVENT_FIELDS = ("description", "base_job_template", "concurrency_limit", "storage_configuration")
QUEUE_EVENT_FIELDS = ("name", "description", "concurrency_limit", "priority")

PrefectEvent = dict[str, Any]


@dataclass
class QueueInfo:
    name: str
    priority: int


@dataclass
class PoolInfo:
    name: str
    type: str
    default_queue_id: str
    result_storage_block_id: str | None
    queues: dict[str, QueueInfo] = field(default_factory=dict)
    # The last status event written by an update (id, occurred): Prefect's
    # `last_status_event_id` / `last_transitioned_status_at`. Creation does not set it.
    last_status_event: tuple[str, datetime] | None = None


@dataclass
class ExportState:
    """What the export remembers between events: pools by id, and what it skipped."""

    pools: dict[str, PoolInfo] = field(default_factory=dict)
    # Deployments by id as last seen: an `updated` event reports each changed field from/to.
    deployments: dict[str, Deployment] = field(default_factory=dict)
    # Flows by id, for the payload of their `deleted` event.
    flows: dict[str, Flow] = field(default_factory=dict)
    # Each flow run's current state, for the `initial_state` of its next state event.
    run_states: dict[str, State | None] = field(default_factory=dict)
    # Every queue seen created -> its pool's id, kept after the queue is deleted: a queue known
    # here but gone from its pool was deleted, and Prefect relates a run to it no more.
    queue_pools: dict[str, str] = field(default_factory=dict)
    # The flows and deployments seen deleted (`prefect.<kind>.<id>`): Prefect no longer finds
    # them, so later run events do not relate them.
    deleted: set[str] = field(default_factory=set)
    # Task runs by id: (name, tags), for the subflow runs whose parent they are.
    task_runs: dict[str, tuple[str, list[str]]] = field(default_factory=dict)
    # The READY deployments (by id) and when they were last polled: a poll reports only those
    # that were NOT_READY, the foreman only those it finds still READY.
    ready_deployments: dict[str, datetime] = field(default_factory=dict)
    skipped: Counter[str] = field(default_factory=Counter)

    def warning(self) -> str | None:
        """One line naming the skipped event types, or None when nothing was skipped."""
        if not self.skipped:
            return None
        total = sum(self.skipped.values())
        kinds = ", ".join(f"{kind} ({n})" for kind, n in sorted(self.skipped.items()))
        return f"warning: the Prefect export skipped {total} event(s) it cannot map: {kinds}"


def to_prefect_events(envelope: EventEnvelope, state: ExportState) -> list[PrefectEvent]:
    """The Prefect events for one runledger event, in the order Prefect emits them.
    Updates `state`; an event it cannot read or map yields `[]` and is counted as skipped."""
    try:
        event = envelope.decode()
    except (UnknownEvent, ValidationError) as e:
        state.skipped[_skip_label(envelope, e)] += 1
        return []
    handler = _HANDLERS.get(type(event))
    if handler is None:
        state.skipped[envelope.type] += 1
        return []
    out = _Out(envelope)
    handler(out, event, envelope.aggregate_id, state)
    return out.events


def export_log(envelopes: Iterable[EventEnvelope], state: ExportState | None = None
               ) -> tuple[list[PrefectEvent], ExportState]:
    """Every Prefect event of a log (in log order), and the state after it."""
    state = state if state is not None else ExportState()
    events: list[PrefectEvent] = []
    for envelope in envelopes:
        events.extend(to_prefect_events(envelope, state))
    return events, state


# The events of a pool that name it and its queues (what a run's events relate), without the
# polls and status changes that make up most of a busy pool's history.
POOL_NAMING_EVENTS = frozenset({"WorkPoolCreated", "WorkPoolUpdated", "WorkPoolDeleted", "WorkQueueCreated",
                                "WorkQueueUpdated", "WorkQueueDeleted", "WorkQueuesReprioritized"})


@dataclass
class Neighbours:
    """The other aggregates the export of one aggregate reads with it: those whose events name
    what its events refer to (a run's flow, deployment, queue and pool, parent task run; a
    deployment's flow, queue and pool), and those that write events about it (a deployment's
    READY / NOT_READY are decided by the polls of its queue's pool and by runners' polls)."""

    aggregates: set[tuple[str, str]] = field(default_factory=set)
    # Queues whose pools' aggregates are read too (the caller looks each pool up).
    queue_ids: set[str] = field(default_factory=set)
    # Aggregate types read whole: a runner's poll lives in an aggregate of the set of
    # deployments it polled, which no deployment's events name.
    aggregate_types: set[str] = field(default_factory=set)


def neighbours(envelopes: Iterable[EventEnvelope]) -> Neighbours:
    """What `Neighbours` the export of the aggregate whose history is `envelopes` needs."""
    found = Neighbours()
    for envelope in envelopes:
        try:
            event = envelope.decode()
        except (UnknownEvent, ValidationError):
            continue
        run = getattr(event, "run", None)
        if isinstance(run, FlowRun):
            found.aggregates.add((FLOW, str(run.flow_id)))
            if run.deployment_id is not None:
                found.aggregates.add((DEPLOYMENT, str(run.deployment_id)))
            if run.work_queue_id is not None:
                found.queue_ids.add(str(run.work_queue_id))
            if run.parent_task_run_id is not None:
                found.aggregates.add((tr.TASK_RUN, str(run.parent_task_run_id)))
        elif isinstance(event, DeploymentCreated | DeploymentUpdated):
            found.aggregates.add((FLOW, str(event.deployment.flow_id)))
            if event.deployment.work_queue_id is not None:
                found.queue_ids.add(str(event.deployment.work_queue_id))
            found.aggregate_types.add(DEPLOYMENT_POLL)
    return found


def _skip_label(envelope: EventEnvelope, error: Exception) -> str:
    if isinstance(error, ValidationError):
        return f"{envelope.type} (unreadable payload)"
    if envelope.type in EVENT_TYPES:
        return f"{envelope.type} v{envelope.schema_version}"
    return envelope.type


# ---------------------------------------------------------------------------------------------
# Building events


class _Out:
    """The Prefect events of one runledger event, with their deterministic ids."""

    def __init__(self, envelope: EventEnvelope):
        self.source_id = envelope.id
        self.when = envelope.occurred
        self.occurred = to_jsonable_python(envelope.occurred)
        self.events: list[PrefectEvent] = []

    def emit(self, name: str, resource: dict[str, str], related: list[dict[str, str]] | None = None,
             payload: dict[str, Any] | None = None, follows: str | None = None, *,
             event_id: str | None = None, occurred: datetime | None = None) -> str:
        """Append one event; `event_id` and `occurred` replace the derived id and the runledger
        event's time (a run's state event takes its state's, as Prefect's does)."""
        event_id = event_id or str(uuid.uuid5(EXPORT_NAMESPACE, f"{self.source_id}/{len(self.events)}"))
        self.events.append({
            "occurred": self.occurred if occurred is None else to_jsonable_python(occurred),
            "event": name,
            "resource": resource,
            "related": related or [],
            "payload": payload or {},
            "id": event_id,
            "follows": follows,
        })
        return event_id


def _kebab(status: Status) -> str:
    return status.value.lower().replace("_", "-")


def _pool_labels(pool_id: str, pool: PoolInfo | None, name: str | None = None) -> dict[str, str]:
    """id, name and type of a pool, as far as they are known."""
    labels = {"prefect.resource.id": f"prefect.work-pool.{pool_id}"}
    name = pool.name if pool is not None else name
    if name is not None:
        labels["prefect.resource.name"] = name
    if pool is not None:
        labels["prefect.work-pool.type"] = pool.type
    return labels


def _pool_resource(pool_id: str, pool: PoolInfo | None, name: str | None = None) -> dict[str, str]:
    """Prefect's `_work_pool_resource` (created, updated, deleted)."""
    return {**_pool_labels(pool_id, pool, name), "prefect.resource.role": "work-pool"}


def _pool_related(pool: PoolInfo | None) -> list[dict[str, str]]:
    """Prefect's `_work_pool_related_resources`: the default queue and the result storage block."""
    if pool is None:
        return []
    related = [{"prefect.resource.id": f"prefect.work-queue.{pool.default_queue_id}",
                "prefect.resource.role": "default-queue"}]
    if pool.result_storage_block_id:
        related.append({"prefect.resource.id": f"prefect.block-document.{pool.result_storage_block_id}",
                        "prefect.resource.role": "result-storage"})
    return related


def _queue_resource(queue_id: str, name: str | None) -> dict[str, str]:
    resource = {"prefect.resource.id": f"prefect.work-queue.{queue_id}"}
    if name is not None:
        resource["prefect.resource.name"] = name
    resource["prefect.resource.role"] = "work-queue"
    return resource


def _queue_related(pool_id: str, pool: PoolInfo | None) -> list[dict[str, str]]:
    """A queue event's related pool: only when the pool's name is known (as in Prefect)."""
    if pool is None:
        return []
    return [{**_pool_labels(pool_id, pool), "prefect.resource.role": "work-pool"}]


def _updates(changes: dict[str, Change], fields: tuple[str, ...]) -> dict[str, Any] | None:
    """Prefect's `updated` payload, or None when none of `fields` changed."""
    updates = {f: {"from": c.old, "to": c.new} for f, c in changes.items() if f in fields}
    if not updates:
        return None
    return {"updated_fields": list(updates), "updates": updates}


def _pool_info(snapshot: WorkPoolSnapshot, queues: dict[str, QueueInfo]) -> PoolInfo:
    block = snapshot.storage_configuration.default_result_storage_block_id
    return PoolInfo(name=snapshot.name, type=snapshot.type, default_queue_id=str(snapshot.default_queue_id),
                    result_storage_block_id=str(block) if block else None, queues=queues)


def _reprioritize(pool: PoolInfo | None, moved: dict[uuid.UUID, int]) -> None:
    if pool is None:
        return
    for qid, priority in moved.items():
        queue = pool.queues.get(str(qid))
        if queue is not None:
            queue.priority = priority


# ---------------------------------------------------------------------------------------------
# One handler per runledger event type


def _pool_created(out: _Out, e: WorkPoolCreated, pool_id: str, state: ExportState) -> None:
    q = e.default_queue
    pool = _pool_info(e.pool, {str(q.id): QueueInfo(q.name, q.priority)})
    state.pools[pool_id] = pool
    state.queue_pools[str(q.id)] = pool_id
    # Prefect's create_work_pool creates the default queue first (its `created` event names
    # the pool), then emits the pool's `created`; the API route then emits the initial status.
    out.emit("prefect.work-queue.created", _queue_resource(str(q.id), q.name), _queue_related(pool_id, pool))
    out.emit("prefect.work-pool.created", _pool_resource(pool_id, pool), _pool_related(pool))
    if e.pool.status is not None:  # never for `prefect-agent` pools (WP-3)
        out.emit(f"prefect.work-pool.{_kebab(e.pool.status)}", _pool_labels(pool_id, pool))


def _pool_updated(out: _Out, e: WorkPoolUpdated, pool_id: str, state: ExportState) -> None:
    before = state.pools.get(pool_id)
    pool = _pool_info(e.pool, before.queues if before else {})
    pool.last_status_event = before.last_status_event if before else None
    state.pools[pool_id] = pool
    payload = _updates(e.changes, POOL_EVENT_FIELDS)
    if payload is not None:  # Prefect's work_pool_updated_event has no related resources
        out.emit("prefect.work-pool.updated", _pool_resource(pool_id, pool), payload=payload)
    # Every status write (WP-8), a repeated pause included, is a status event.
    if e.status is not None and e.status.new is not None:
        _pool_status(out, pool_id, pool, Status(e.status.new))


def _pool_status(out: _Out, pool_id: str, pool: PoolInfo | None, status: Status) -> None:
    """`prefect.work-pool.<status>`, following the pool's previous status event when recent."""
    follows = None
    if pool is not None and pool.last_status_event is not None:
        previous_id, previous_at = pool.last_status_event
        if out.when - previous_at < FOLLOWS_WITHIN:
            follows = previous_id
    event_id = out.emit(f"prefect.work-pool.{_kebab(status)}", _pool_labels(pool_id, pool), follows=follows)
    if pool is not None:
        pool.last_status_event = (event_id, out.when)


def _workers_changed(out: _Out, e: WorkPoolWorkersChanged, pool_id: str, state: ExportState) -> None:
    """A heartbeat's `prefect.work-pool.ready`, the foreman's `not-ready`; Prefect's server
    emits no event of its own for a worker."""
    if e.status is not None and e.status.new is not None:
        _pool_status(out, pool_id, state.pools.get(pool_id), Status(e.status.new))


def _queue_status(out: _Out, pool_id: str, state: ExportState, queue_ids: list[uuid.UUID], status: Status) -> None:
    pool = state.pools.get(pool_id)
    for qid in queue_ids:
        queue = pool.queues.get(str(qid)) if pool else None
        out.emit(f"prefect.work-queue.{_kebab(status)}", _queue_resource(str(qid), queue.name if queue else None),
                 _queue_related(pool_id, pool))


def _queues_polled(out: _Out, e: WorkQueuesPolled, pool_id: str, state: ExportState) -> None:
    """`prefect.work-queue.ready` for each queue that was NOT_READY, then
    `prefect.deployment.ready` for each deployment on a polled queue that was NOT_READY (a
    routine poll readies none, as in the read model)."""
    _queue_status(out, pool_id, state, e.ready, Status.READY)
    polled = {str(q) for q in e.queue_ids}
    for deployment_id, d in state.deployments.items():
        if d.work_queue_id is None or str(d.work_queue_id) not in polled:
            continue
        if e.routine and deployment_id not in state.ready_deployments:
            continue
        if deployment_id not in state.ready_deployments:
            out.emit("prefect.deployment.ready", _deployment_resource(d), _deployment_related(d, state))
        state.ready_deployments[deployment_id] = e.polled


def _deployments_polled(out: _Out, e: DeploymentsPolled, aggregate_id: str, state: ExportState) -> None:
    """A runner's poll: `prefect.deployment.ready` for each deployment it names that was
    NOT_READY (a routine poll readies none, as in the read model)."""
    for d in (state.deployments.get(str(i)) for i in e.deployment_ids):
        if d is None or (e.routine and str(d.id) not in state.ready_deployments):
            continue
        if str(d.id) not in state.ready_deployments:
            out.emit("prefect.deployment.ready", _deployment_resource(d), _deployment_related(d, state))
        state.ready_deployments[str(d.id)] = e.polled


def _queueless_not_ready(out: _Out, e: QueuelessDeploymentsNotReady, aggregate_id: str, state: ExportState) -> None:
    """`prefect.deployment.not-ready` for those still READY, without a queue (or naming one the
    decider found deleted, which they drop: not one set by an update decided after the check),
    and not polled within 60 seconds (what the read model applies)."""
    for deployment_id in map(str, e.deployment_ids):
        d = state.deployments.get(deployment_id)
        last = state.ready_deployments.get(deployment_id)
        if (d is None or last is None or (d.work_queue_id is not None and d.updated > e.checked)
                or last >= e.checked - NOT_READY_AFTER):
            continue
        del state.ready_deployments[deployment_id]
        if d.work_queue_id is not None:
            d = state.deployments[deployment_id] = d.model_copy(update={"work_queue_id": None, "work_pool_name": None})
        out.emit("prefect.deployment.not-ready", _deployment_resource(d), _deployment_related(d, state))


def _queues_not_ready(out: _Out, e: WorkQueuesNotReady, pool_id: str, state: ExportState) -> None:
    _queue_status(out, pool_id, state, e.queue_ids, Status.NOT_READY)


def _deployments_not_ready(out: _Out, e: WorkQueueDeploymentsNotReady, pool_id: str, state: ExportState) -> None:
    """`prefect.deployment.not-ready` for those still READY, on that queue, and not polled
    within 60 seconds (what the read model applies)."""
    for deployment_id in map(str, e.deployment_ids):
        d = state.deployments.get(deployment_id)
        last = state.ready_deployments.get(deployment_id)
        if d is None or last is None or d.work_queue_id != e.work_queue_id or last >= e.checked - NOT_READY_AFTER:
            continue
        del state.ready_deployments[deployment_id]
        out.emit("prefect.deployment.not-ready", _deployment_resource(d), _deployment_related(d, state))


def _queues_gone(state: ExportState, queue_ids: list[uuid.UUID]) -> None:
    """WP-9: the deployments on deleted queues have no queue from then on (their later events
    say so too: deployments.without_deleted_queue)."""
    for deployment_id, d in state.deployments.items():
        if d.work_queue_id is not None and d.work_queue_id in queue_ids:
            state.deployments[deployment_id] = d.model_copy(update={"work_queue_id": None, "work_pool_name": None})


def _pool_deleted(out: _Out, e: WorkPoolDeleted, pool_id: str, state: ExportState) -> None:
    # The payload names the queues by id only (in priority order); their names, the pool's
    # type and default queue come from the history.
    _queues_gone(state, e.queue_ids)
    pool = state.pools.pop(pool_id, None)
    for qid in e.queue_ids:
        queue = pool.queues.get(str(qid)) if pool else None
        out.emit("prefect.work-queue.deleted", _queue_resource(str(qid), queue.name if queue else None),
                 _queue_related(pool_id, pool))
    out.emit("prefect.work-pool.deleted", _pool_resource(pool_id, pool, e.name), _pool_related(pool))


def _queue_created(out: _Out, e: WorkQueueCreated, pool_id: str, state: ExportState) -> None:
    state.queue_pools[str(e.queue.id)] = pool_id
    pool = state.pools.get(pool_id)
    if pool is not None:
        pool.queues[str(e.queue.id)] = QueueInfo(e.queue.name, e.queue.priority)
        _reprioritize(pool, e.reprioritized)  # Prefect emits nothing for queues PR-1 moved
    out.emit("prefect.work-queue.created", _queue_resource(str(e.queue.id), e.queue.name),
             _queue_related(pool_id, pool))


def _queue_updated(out: _Out, e: WorkQueueUpdated, pool_id: str, state: ExportState) -> None:
    pool = state.pools.get(pool_id)
    if pool is not None:
        pool.queues[str(e.queue.id)] = QueueInfo(e.queue.name, e.queue.priority)
        _reprioritize(pool, e.reprioritized)  # Prefect emits nothing for queues PR-1 moved
    resource = _queue_resource(str(e.queue.id), e.queue.name)
    payload = _updates(e.changes, QUEUE_EVENT_FIELDS)
    if payload is not None:
        out.emit("prefect.work-queue.updated", resource, _queue_related(pool_id, pool), payload)
    if e.status is not None and e.status.new is not None:  # set only on a real change (WQ-8)
        out.emit(f"prefect.work-queue.{_kebab(Status(e.status.new))}", dict(resource), _queue_related(pool_id, pool))


def _queue_deleted(out: _Out, e: WorkQueueDeleted, pool_id: str, state: ExportState) -> None:
    _queues_gone(state, [e.queue_id])
    pool = state.pools.get(pool_id)
    if pool is not None:
        pool.queues.pop(str(e.queue_id), None)
        _reprioritize(pool, e.reprioritized)
    out.emit("prefect.work-queue.deleted", _queue_resource(str(e.queue_id), e.name), _queue_related(pool_id, pool))


def _queues_reprioritized(out: _Out, e: WorkQueuesReprioritized, pool_id: str, state: ExportState) -> None:
    # No Prefect route moves several queues at once: each moved queue is reported as the
    # priority update Prefect reports for one queue.
    pool = state.pools.get(pool_id)
    for qid, priority in e.reprioritized.items():
        queue = pool.queues.get(str(qid)) if pool else None
        old = queue.priority if queue else None
        if old == priority:
            continue
        payload = {"updated_fields": ["priority"], "updates": {"priority": {"from": old, "to": priority}}}
        out.emit("prefect.work-queue.updated", _queue_resource(str(qid), queue.name if queue else None),
                 _queue_related(pool_id, pool), payload)
    _reprioritize(pool, e.reprioritized)


def _variable_event(out: _Out, e: va.VariableCreated | va.VariableUpdated | va.VariableDeleted, aggregate_id: str,
                    state: ExportState) -> None:
    """Prefect's lifecycle `prefect.variable.created|updated|deleted`: the variable as
    resource, its name, value and tags as payload."""
    action = {va.VariableCreated: "created", va.VariableUpdated: "updated", va.VariableDeleted: "deleted"}[type(e)]
    v = e.variable
    out.emit(f"prefect.variable.{action}", {"prefect.resource.id": f"prefect.variable.{v.id}",
                                             "prefect.resource.name": v.name},
             payload={"name": v.name, "value": v.value, "tags": v.tags})


def _flow_event(out: _Out, e: FlowCreated | FlowDeleted, aggregate_id: str, state: ExportState) -> None:
    """Prefect's lifecycle `prefect.flow.created|deleted`: the flow as resource, its name,
    tags and labels as payload."""
    if isinstance(e, FlowCreated):
        state.flows[aggregate_id] = e.flow
        action, flow_id, name, tags, labels = "created", e.flow.id, e.flow.name, e.flow.tags, e.flow.labels
    else:
        gone = state.flows.pop(aggregate_id, None)
        state.deleted.add(f"prefect.flow.{e.flow_id}")
        action, flow_id, name = "deleted", e.flow_id, e.name
        tags, labels = (gone.tags, gone.labels) if gone is not None else ([], {})
    out.emit(f"prefect.flow.{action}", {"prefect.resource.id": f"prefect.flow.{flow_id}",
                                         "prefect.resource.name": name},
             payload={"name": name, "tags": list(tags), "labels": to_jsonable_python(labels)})


def _concurrency_limit_event(out: _Out, e: cl.ConcurrencyLimitCreated | cl.ConcurrencyLimitUpdated
                             | cl.ConcurrencyLimitDeleted, aggregate_id: str, state: ExportState) -> None:
    """Prefect's lifecycle `prefect.concurrency-limit.created|updated|deleted` of a global
    (v2) limit: name, limit, active and slot decay as payload. A deployment's own limit
    (`deployment:<id>`) is none: Prefect writes it with the deployment, without an event."""
    action = {cl.ConcurrencyLimitCreated: "created", cl.ConcurrencyLimitUpdated: "updated",
              cl.ConcurrencyLimitDeleted: "deleted"}[type(e)]
    lim = e.limit
    if _a_deployments_own(lim):
        return
    out.emit(f"prefect.concurrency-limit.{action}",
             {"prefect.resource.id": f"prefect.concurrency-limit.{lim.id}", "prefect.resource.name": lim.name},
             payload={"name": lim.name, "limit": lim.limit, "active": lim.active,
                      "slot_decay_per_second": lim.slot_decay_per_second})


def _a_deployments_own(lim: cl.ConcurrencyLimit) -> bool:
    """The limit a deployment's `concurrency_limit` makes, told by its id, which is derived
    from the deployment's (a limit a user named `deployment:...` has another id)."""
    owner = lim.name.removeprefix("deployment:")
    try:
        return owner != lim.name and lim.id == limit_id(uuid.UUID(owner))
    except ValueError:
        return False


# Prefect's deployment `updated` event reports these fields (`job_variables` under its
# column's name, `infra_overrides`; the limit by its id).
DEPLOYMENT_EVENT_FIELDS = ("description", "tags", "parameters", "parameter_openapi_schema",
                           "enforce_parameter_schema", "entrypoint", "path", "pull_steps", "work_queue_id",
                           "job_variables", "paused", "labels", "version", "concurrency_limit",
                           "concurrency_options")
_PREFECT_FIELD_NAMES = {"job_variables": "infra_overrides", "concurrency_limit": "concurrency_limit_id"}


def _prefect_value(d: Deployment, field: str) -> Any:
    """A field's value as Prefect's event reports it. Prefect edits a deployment's limit in
    place, so its `concurrency_limit_id` changes only when a limit is added or removed; the
    limit's value is not a deployment field there."""
    if field == "concurrency_limit":
        return str(limit_id(d.id)) if d.concurrency_limit is not None else None
    return to_jsonable_python(getattr(d, field))


def _deployment_resource(d: Deployment) -> dict[str, str]:
    return {"prefect.resource.id": f"prefect.deployment.{d.id}", "prefect.resource.name": d.name}


def _queue_and_pool(queue_id: uuid.UUID, state: ExportState) -> tuple[dict[str, str], dict[str, str]] | None:
    """A queue's and its pool's related entries (ids, names, the pool's type) when the export
    knows the queue; None when it saw the queue deleted, or never saw it (the caller decides)."""
    pool_id = state.queue_pools.get(str(queue_id))
    pool = state.pools.get(pool_id) if pool_id is not None else None
    queue = pool.queues.get(str(queue_id)) if pool is not None else None
    if pool_id is None or pool is None or queue is None:
        return None
    return ({"prefect.resource.id": f"prefect.work-queue.{queue_id}", "prefect.resource.name": queue.name,
             "prefect.resource.role": "work-queue"},
            {"prefect.resource.id": f"prefect.work-pool.{pool_id}", "prefect.resource.name": pool.name,
             "prefect.work-pool.type": pool.type, "prefect.resource.role": "work-pool"})


def _flow_entry(flow_id: uuid.UUID, state: ExportState) -> dict[str, str] | None:
    """A related flow with its name; without it when the export never saw the flow (its
    history was not read); None once deleted (Prefect finds it no more)."""
    if f"prefect.flow.{flow_id}" in state.deleted:
        return None
    entry = {"prefect.resource.id": f"prefect.flow.{flow_id}"}
    flow = state.flows.get(str(flow_id))
    if flow is not None:
        entry["prefect.resource.name"] = flow.name
    entry["prefect.resource.role"] = "flow"
    return entry


def _deployment_related(d: Deployment, state: ExportState) -> list[dict[str, str]]:
    """Prefect's `_deployment_related_resources`: the flow, the queue, its pool, the storage
    and infrastructure blocks, the deployment's own concurrency limit."""
    related = [entry] if (entry := _flow_entry(d.flow_id, state)) is not None else []
    if d.work_queue_id is not None:
        known = _queue_and_pool(d.work_queue_id, state)
        if known is not None:
            related += known
        elif str(d.work_queue_id) not in state.queue_pools:  # never seen: the name it carries
            related.append({"prefect.resource.id": f"prefect.work-queue.{d.work_queue_id}",
                            "prefect.resource.name": d.work_queue_name or "", "prefect.resource.role": "work-queue"})
    if d.storage_document_id is not None:
        related.append({"prefect.resource.id": f"prefect.block-document.{d.storage_document_id}",
                        "prefect.resource.role": "storage"})
    if d.infrastructure_document_id is not None:
        related.append({"prefect.resource.id": f"prefect.block-document.{d.infrastructure_document_id}",
                        "prefect.resource.role": "infrastructure"})
    if d.concurrency_limit is not None:
        related.append({"prefect.resource.id": f"prefect.concurrency-limit.{limit_id(d.id)}",
                        "prefect.resource.role": "concurrency-limit"})
    return related


def _deployment_event(out: _Out, e: DeploymentCreated | DeploymentUpdated | DeploymentDeleted, aggregate_id: str,
                      state: ExportState) -> None:
    """`prefect.deployment.created|updated|deleted`; an update lists the changed fields among
    Prefect's with their old and new values, and an update that changed none of them is not
    an event in Prefect."""
    if isinstance(e, DeploymentDeleted):
        gone = state.deployments.pop(aggregate_id, None)
        state.deleted.add(f"prefect.deployment.{e.deployment_id}")
        resource = _deployment_resource(gone) if gone is not None else {
            "prefect.resource.id": f"prefect.deployment.{e.deployment_id}", "prefect.resource.name": e.name}
        out.emit("prefect.deployment.deleted", resource, _deployment_related(gone, state) if gone else [])
        return
    before = state.deployments.get(aggregate_id)
    after = e.deployment
    state.deployments[aggregate_id] = after
    if isinstance(e, DeploymentCreated) or before is None:
        out.emit("prefect.deployment.created", _deployment_resource(after), _deployment_related(after, state))
        return
    if isinstance(e, DeploymentUpdated) and e.by_pause_or_resume:
        return  # Prefect's pause and resume routes write the flag without an event
    updates = {
        _PREFECT_FIELD_NAMES.get(f, f): {"from": old, "to": new}
        for f in DEPLOYMENT_EVENT_FIELDS
        if (old := _prefect_value(before, f)) != (new := _prefect_value(after, f))
    }
    if updates:
        out.emit("prefect.deployment.updated", _deployment_resource(after), _deployment_related(after, state),
                 payload={"updated_fields": list(updates), "updates": updates})


# Prefect truncates state messages in its events to this many characters (keeping both ends),
# and links a run's state event to the previous one (`follows`) when their times are closer
# than TIGHT_TIMING (`_timing_is_tight`).
TRUNCATE_STATE_MESSAGES_AT = 100_000
TIGHT_TIMING = timedelta(minutes=5)


def _truncated(value: str | None, length: int = TRUNCATE_STATE_MESSAGES_AT) -> str:
    """Prefect's `truncated_to`: "" for none; a longer text keeps its two ends around a count."""
    if not value:
        return ""
    if len(value) <= length:
        return value
    half = length // 2
    proposed = f"{value[:half]}...{len(value) - 2 * half} additional characters...{value[-half:]}"
    return proposed if len(proposed) < len(value) else value


def _state_payload(s: State | None) -> dict[str, str] | None:
    """Prefect's `state_payload`."""
    if s is None:
        return None
    payload = {"type": s.type.value}
    if s.name:
        payload["name"] = s.name
    if s.message:
        payload["message"] = _truncated(s.message)
    if s.type is StateType.PAUSED:
        payload["pause_reschedule"] = str(s.state_details.pause_reschedule).lower()
    return payload


def _tags(tags: Iterable[str]) -> list[dict[str, str]]:
    return [{"prefect.resource.id": f"prefect.tag.{tag}", "prefect.resource.role": "tag"} for tag in sorted(tags)]


def _emit_run_state(out: _Out, kind: str, run: Any, aggregate_id: str, state: ExportState,
                    related: list[dict[str, str]], labels: dict[str, str] | None = None, **payload: Any) -> None:
    """`prefect.<kind>.<state name>` for a written state of a flow or task run, the run and its
    state as resource. As in Prefect, the event is the state's: its id is the state's id, it
    occurred at the state's timestamp, and it `follows` the previous state's event when the
    two are less than five minutes apart. The state before it is remembered per run
    (`initial_state`); an event that writes no new state (the same state id) is no transition."""
    initial = state.run_states.get(aggregate_id)
    state.run_states[aggregate_id] = run.state
    s = run.state
    if s is None or (initial is not None and initial.id == s.id):
        return
    tight = initial is not None and -TIGHT_TIMING < s.timestamp - initial.timestamp < TIGHT_TIMING
    out.emit(f"prefect.{kind}.{s.name}", {
        "prefect.resource.id": f"prefect.{kind}.{run.id}", "prefect.resource.name": run.name,
        "prefect.run-count": str(run.run_count), "prefect.state-message": _truncated(s.message),
        "prefect.state-name": s.name or "", "prefect.state-timestamp": s.timestamp.isoformat(),
        "prefect.state-type": s.type.value, **(labels or {}),
    }, related, payload={
        "intended": {"from": initial.type.value if initial else None, "to": s.type.value},
        "initial_state": _state_payload(initial), "validated_state": _state_payload(s), **payload,
    }, follows=str(initial.id) if tight and initial is not None else None, event_id=str(s.id), occurred=s.timestamp)


def _flow_run_related(run: Any, state: ExportState) -> list[dict[str, str]]:
    """Prefect's `_flow_run_related_resources_from_orm`: the flow, deployment, queue, pool and
    parent task run with their names (the pool with its type), then a tag for each tag of the
    run, its flow, its deployment and its parent task run (sorted), then its creator when a
    deployment or an automation made it. What Prefect would no longer find (a flow, deployment
    or queue seen deleted) is left out, as there; what the export never saw (its history was
    not read) is given by id, with the name the run itself carries where it has one."""
    related: list[dict[str, str]] = []
    tags = set(run.tags)
    if (flow_entry := _flow_entry(run.flow_id, state)) is not None:
        related.append(flow_entry)
        if (flow := state.flows.get(str(run.flow_id))) is not None:
            tags |= set(flow.tags)
    if run.deployment_id is not None and f"prefect.deployment.{run.deployment_id}" not in state.deleted:
        entry = {"prefect.resource.id": f"prefect.deployment.{run.deployment_id}", "prefect.resource.role": "deployment"}
        if (d := state.deployments.get(str(run.deployment_id))) is not None:
            entry["prefect.resource.name"] = d.name
            tags |= set(d.tags)
        related.append(entry)
    if run.work_queue_id is not None:
        known = _queue_and_pool(run.work_queue_id, state)
        if known is not None:
            queue, pool = known
            related += [{k: queue[k] for k in ("prefect.resource.id", "prefect.resource.role", "prefect.resource.name")},
                        {k: pool[k] for k in ("prefect.resource.id", "prefect.resource.role", "prefect.resource.name",
                                              "prefect.work-pool.type")}]
        elif str(run.work_queue_id) not in state.queue_pools:
            related.append({"prefect.resource.id": f"prefect.work-queue.{run.work_queue_id}",
                            "prefect.resource.role": "work-queue", "prefect.resource.name": run.work_queue_name or ""})
    if run.parent_task_run_id is not None:
        entry = {"prefect.resource.id": f"prefect.task-run.{run.parent_task_run_id}", "prefect.resource.role": "task-run"}
        if (parent := state.task_runs.get(str(run.parent_task_run_id))) is not None:
            entry["prefect.resource.name"] = parent[0]
            tags |= set(parent[1])
        related.append(entry)
    related += _tags(tags)
    creator = run.created_by
    if creator is not None and creator.id is not None and creator.type in ("DEPLOYMENT", "AUTOMATION"):
        entry = {"prefect.resource.id": f"prefect.{creator.type.lower()}.{creator.id}", "prefect.resource.role": "creator"}
        if creator.display_value:
            entry["prefect.resource.name"] = creator.display_value
        related.append(entry)
    return related


def _flow_run_state_event(out: _Out, e: FlowRunCreated | FlowRunStateSet, aggregate_id: str,
                          state: ExportState) -> None:
    """`prefect.flow-run.<state name>` for each written state (Prefect's
    `InstrumentFlowRunStateTransitions`)."""
    _emit_run_state(out, "flow-run", e.run, aggregate_id, state, _flow_run_related(e.run, state))


def _task_run_state_event(out: _Out, e: tr.TaskRunCreated | tr.TaskRunStateSet, aggregate_id: str,
                          state: ExportState) -> None:
    """`prefect.task-run.<state name>` for each written state (Prefect's task engine emits
    them, `"prefect.orchestration": "client"`); its flow run and tags as related resources."""
    run = e.run
    state.task_runs[aggregate_id] = (run.name, list(run.tags))
    related = ([{"prefect.resource.id": f"prefect.flow-run.{run.flow_run_id}", "prefect.resource.role": "flow-run"}]
               if run.flow_run_id is not None else [])
    _emit_run_state(out, "task-run", run, aggregate_id, state, [*related, *_tags(run.tags)],
                    {"prefect.orchestration": "client"}, task_run={"task_key": run.task_key, "dynamic_key": run.dynamic_key})


def _run_gone(out: _Out, e: Any, aggregate_id: str, state: ExportState) -> None:
    """Prefect emits no event when a flow or task run is updated or deleted; the state each
    run's next event starts from (and a task run's name and tags) is kept up to date."""
    if isinstance(e, FlowRunDeleted | tr.TaskRunDeleted):
        state.run_states.pop(aggregate_id, None)
        state.task_runs.pop(aggregate_id, None)
        return
    state.run_states[aggregate_id] = e.run.state
    if isinstance(e.run, tr.TaskRun):
        state.task_runs[aggregate_id] = (e.run.name, list(e.run.tags))


def _nothing(out: _Out, e: Event, aggregate_id: str, state: ExportState) -> None:
    """Unique-key claims keep names unique; a deployment's index of scheduled runs and the
    slot counts of pools and limits are runledger's bookkeeping: nothing to export. Prefect's server emits nothing for a worker's
    heartbeat, its going offline or its deletion. (Flows and task tag limits: not exported yet.)"""


_HANDLERS: dict[type[Event], Callable[[_Out, Any, str, ExportState], None]] = {
    WorkPoolCreated: _pool_created,
    WorkPoolUpdated: _pool_updated,
    WorkPoolDeleted: _pool_deleted,
    WorkQueueCreated: _queue_created,
    WorkQueueUpdated: _queue_updated,
    WorkQueueDeleted: _queue_deleted,
    WorkQueuesReprioritized: _queues_reprioritized,
    WorkPoolNameClaimed: _nothing,
    WorkPoolNameReleased: _nothing,
    UniqueKeyClaimed: _nothing,
    UniqueKeyReleased: _nothing,
    FlowCreated: _flow_event,
    FlowDeleted: _flow_event,
    DeploymentCreated: _deployment_event,
    DeploymentUpdated: _deployment_event,
    DeploymentDeleted: _deployment_event,
    DeploymentRunsScheduled: _nothing,
    DeploymentRunsForgotten: _nothing,
    FlowRunCreated: _flow_run_state_event,
    FlowRunStateSet: _flow_run_state_event,
    FlowRunUpdated: _run_gone,
    FlowRunWaiting: _run_gone,
    FlowRunDeploymentLeaseExpired: _run_gone,
    FlowRunDeploymentLeaseRenewed: _run_gone,
    FlowRunDeleted: _run_gone,
    tr.TaskRunCreated: _task_run_state_event,
    tr.TaskRunStateSet: _task_run_state_event,
    tr.TaskRunUpdated: _run_gone,
    tr.TaskRunWaiting: _run_gone,
    tr.TaskRunDeleted: _run_gone,
    tr.TaskCacheEntryRecorded: _nothing,
    tr.TaskRunKeysTaken: _nothing,
    tr.TaskRunKeysReleased: _nothing,
    va.VariableCreated: _variable_event,
    va.VariableUpdated: _variable_event,
    va.VariableDeleted: _variable_event,
    cl.ConcurrencyLimitCreated: _concurrency_limit_event,
    cl.ConcurrencyLimitUpdated: _concurrency_limit_event,
    cl.ConcurrencyLimitDeleted: _concurrency_limit_event,
    cl.ConcurrencyLimitSlotTaken: _nothing,
    cl.ConcurrencyLimitSlotReleased: _nothing,
    tcl.TagConcurrencyLimitCreated: _nothing,
    tcl.TagConcurrencyLimitUpdated: _nothing,
    tcl.TagConcurrencyLimitReset: _nothing,
    tcl.TagConcurrencyLimitDeleted: _nothing,
    tcl.TagConcurrencyLimitSlotTaken: _nothing,
    tcl.TagConcurrencyLimitSlotReleased: _nothing,
    tcl.GlobalTagSlotTaken: _nothing,
    tcl.GlobalTagSlotReleased: _nothing,
    PoolSlotTaken: _nothing,
    LimitWaitersChanged: _nothing,
    PoolSlotReleased: _nothing,
    PoolQueueSlotsDropped: _nothing,
    WorkPoolWorkersChanged: _workers_changed,
    WorkQueuesPolled: _queues_polled,
    WorkQueuesNotReady: _queues_not_ready,
    WorkQueueDeploymentsNotReady: _deployments_not_ready,
    DeploymentsPolled: _deployments_polled,
    QueuelessDeploymentsNotReady: _queueless_not_ready,
    wk.WorkerHeartbeatRecorded: _nothing,
    wk.WorkerHeartbeatRenewed: _nothing,
    wk.WorkerWentOffline: _nothing,
    wk.WorkerDeleted: _nothing,
}
