"""Concurrency slots: the runs that hold a slot of their work pool, their work queue and their
deployment, counted in the log, so that a claim is decided against the counts it changes and
appended with them in one atomic batch. Two claims racing for the last slot cannot both land:
the second one's expected-sequence check on the counts fails, and it decides again.

**Pools and queues.** A run holds a slot of its queue, and so of the queue's pool, while it
is PENDING or RUNNING (the pool API's counting; CANCELLING does not count). Each pool has one
`PoolSlots` aggregate (id `slots-<pool id>`) holding the count per queue. It is kept whether
or not a limit is set, so a limit set later counts the runs already running; and it is an
aggregate apart from the pool's, so editing a pool never conflicts with claims and claims do
not churn the pool's snapshots. Every event carries the counts after it (one read loads it).
Deleting a queue drops its count in the same batch (`queue_deleted`): its runs are then in no
pool, as the read models show them, so they neither count nor are held back. A deleted pool's
counts are simply never read again (its runs find no pool, so their transitions count nothing).

**Deployments.** A deployment's limit is the global limit `deployment:<id>`; a run that
enters PENDING takes one of its slots and records the lease id in its state's details
(`deployment_concurrency_lease_id`); the slot is given back when the run leaves PENDING,
RUNNING and CANCELLING. As in Prefect, only runs that entered PENDING while the limit existed
hold one. A limit removed and set again keeps its id (`deployments.limit_id`) but is a new
limit, as Prefect's (a new row, a new id): each lease names the limit it was taken from
(`new_lease_id`), and a lease of the limit as it was before neither counts in nor gives back
a slot of the new one (`lease_of`).

The rules that refuse a claim are in `orchestration_rules.py`; this module keeps the counts:
`Limits` is what those rules read, and `slot_events` is the bookkeeping that follows from
whatever state is written (like FR-6, it never refuses).
"""

from __future__ import annotations

import hashlib
import uuid
from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, ClassVar

from pydantic import BaseModel, ConfigDict

from . import concurrency_limits as cl
from .decisions import Decision, NewEvent
from .events import register_event
from .messages import Event
from .states import StateType

if TYPE_CHECKING:
    from .flow_runs import FlowRun
    from .work_pools import WorkPool

POOL_SLOTS = "pool_slots"

# The states in which a run holds its queue's and pool's slot, and those in which it holds
# its deployment's (entered through PENDING, given back on leaving all three).
POOL_SLOT_STATES = frozenset({StateType.PENDING, StateType.RUNNING})
DEPLOYMENT_SLOT_STATES = frozenset({StateType.PENDING, StateType.RUNNING, StateType.CANCELLING})

# Prefect's `concurrency_slot_wait_seconds`: when an ENQUEUE run is tried again.
DEPLOYMENT_SLOT_WAIT_SECONDS = 30
# How long a run handed a slot by a release keeps it unclaimed, by default (the service's
# `handed_slot_seconds` setting): then the slot goes back (and to the next waiter), and the run
# waits again (`flow_runs.decide_expire_deployment_slot_lease`). Prefect's own retry delay for
# such a run, so a worker that never polls costs no more than there.
HANDED_SLOT_SECONDS = float(DEPLOYMENT_SLOT_WAIT_SECONDS)
# How long a deployment slot's lease lasts while its run is PENDING, when the deployment names
# no `grace_period_seconds` (Prefect's `initial_deployment_lease_duration`); the service's
# `deployment_slot_lease_seconds` setting changes it.
DEFAULT_DEPLOYMENT_LEASE_SECONDS = 300.0


def slots_id(pool_id: uuid.UUID) -> str:
    """The id of a pool's slot counts: not the pool's own id, since a decision's aggregates
    are told apart by id alone."""
    return f"slots-{pool_id}"


class PoolSlots(BaseModel):
    """How many runs of each queue of one pool hold a slot (queues at 0 are left out)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    pool_id: uuid.UUID
    by_queue: dict[uuid.UUID, int] = {}

    @property
    def total(self) -> int:
        return sum(self.by_queue.values())

    def of_queue(self, queue_id: uuid.UUID) -> int:
        return self.by_queue.get(queue_id, 0)

    def changed(self, queue_id: uuid.UUID, delta: int) -> PoolSlots:
        counts = dict(self.by_queue)
        counts[queue_id] = max(0, counts.get(queue_id, 0) + delta)
        if not counts[queue_id]:
            del counts[queue_id]
        return self.model_copy(update={"by_queue": counts})


class _SlotEvent(Event):
    aggregate_type: ClassVar[str] = POOL_SLOTS
    flow_run_id: uuid.UUID
    work_queue_id: uuid.UUID
    slots: PoolSlots  # the counts after this event


@register_event
class PoolSlotTaken(_SlotEvent):
    """A run of this pool entered PENDING or RUNNING."""

    event_type: ClassVar[str] = "PoolSlotTaken"


@register_event
class PoolSlotReleased(_SlotEvent):
    """A run of this pool left PENDING and RUNNING (or was deleted in them)."""

    event_type: ClassVar[str] = "PoolSlotReleased"


@register_event
class PoolQueueSlotsDropped(Event):
    """A queue of this pool was deleted, in the same atomic batch as its `WorkQueueDeleted`:
    its runs leave the pool (the read models clear their queue), so what they held stops
    counting at once, as in Prefect, where such runs count for nothing. Written even when the
    queue held nothing, so that a claim decided against the pool as it was before the deletion
    fails its expected-sequence check on these counts and is decided again."""

    aggregate_type: ClassVar[str] = POOL_SLOTS
    event_type: ClassVar[str] = "PoolQueueSlotsDropped"
    work_queue_id: uuid.UUID
    dropped: int  # how many runs of the queue were counted
    slots: PoolSlots  # the counts after this event


def evolve(state: PoolSlots | None, event: Event) -> PoolSlots | None:
    if isinstance(event, _SlotEvent | PoolQueueSlotsDropped):
        return event.slots
    return state


def queue_deleted(slots: PoolSlots, queue_id: uuid.UUID) -> NewEvent:
    """The counts without the deleted queue's entry. Its runs keep their queue id in their own
    events; `slot_events` then counts them in no pool, so none of them gives a slot back twice."""
    counts = {qid: n for qid, n in slots.by_queue.items() if qid != queue_id}
    return NewEvent(slots_id(slots.pool_id), PoolQueueSlotsDropped(
        work_queue_id=queue_id, dropped=slots.of_queue(queue_id), slots=slots.model_copy(update={"by_queue": counts})))


def with_queue_deleted(decision: Decision, slots: PoolSlots) -> Decision:
    """A queue's deletion (`work_pools.decide_delete_work_queue*`) drops its count from its
    pool's `slots` in the same atomic batch (the pool's deciders cannot import this module)."""
    from .work_pools import WorkQueueDeleted

    extra = [queue_deleted(slots, new.event.queue_id) for new in decision.events
             if isinstance(new.event, WorkQueueDeleted)]
    if not extra:
        return decision
    return replace(decision, events=[*decision.events, *extra])


# ---------------------------------------------------------------------------------------------
# A deployment limit's waiters

LIMIT_WAITERS = "limit_waiters"
# Runs beyond this many waiters still get their turn, by the retry delay instead of a wake.
MAX_WAITERS = 1_000
# How many waiters at the head a release looks at (skipping those that moved on) to wake one.
WAKE_LOOKAHEAD = 3


def waiters_id(limit_id: uuid.UUID) -> str:
    return f"waiters-{limit_id}"


class LimitWaiters(BaseModel):
    """The runs waiting for a slot of one limit (`AwaitingConcurrencySlot`), first come first.

    Prefect tries such a run again after a fixed delay (30 s), so a slot freed meanwhile sits
    idle; here the release that frees it wakes the first waiter, in the same batch."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    limit_id: uuid.UUID
    run_ids: list[uuid.UUID] = []


@register_event
class LimitWaitersChanged(Event):
    """A run began to wait for a slot (`added`), or a release woke the first waiter (`woken`)
    and let go of runs at the head that had moved on (`dropped`)."""

    aggregate_type: ClassVar[str] = LIMIT_WAITERS
    event_type: ClassVar[str] = "LimitWaitersChanged"
    waiters: LimitWaiters  # after
    added: uuid.UUID | None = None
    woken: uuid.UUID | None = None
    dropped: list[uuid.UUID] = []


def evolve_waiters(state: LimitWaiters | None, event: Event) -> LimitWaiters | None:
    return event.waiters if isinstance(event, LimitWaitersChanged) else state


# ---------------------------------------------------------------------------------------------
# What the slot rules read


@dataclass(frozen=True)
class Limits:
    """The limits one run's transition may touch, as the caller loaded them.

    `pool`/`slots`: the pool of the run's queue and its counts (None: the run has no queue, or
    its pool is gone). `deployment_limit`: the run's deployment's global limit (None: no limit),
    with what to do when it is full (`collision_strategy`, Prefect's default ENQUEUE) and how
    long a slot's lease lasts while its run is PENDING (`lease_seconds`: the deployment's
    `grace_period_seconds`, else the service's default; a RUNNING run keeps its slot until it
    leaves RUNNING, which a claim naming a worker bounds: that worker going offline crashes
    the run); `handed_slot_seconds`: how long a waiter keeps the slots a
    release handed it (`hand_over`). `deployment_found`: False when the run names
    a deployment that no longer exists. `waiters`: the deployment limit's waiters, and
    `first_waiters` the first `WAKE_LOOKAHEAD` of them as loaded (None: gone), for a release
    to wake the next one."""

    pool: WorkPool | None = None
    slots: PoolSlots | None = None
    deployment_limit: cl.ConcurrencyLimit | None = None
    collision_strategy: str = "ENQUEUE"
    lease_seconds: float = DEFAULT_DEPLOYMENT_LEASE_SECONDS
    handed_slot_seconds: float = HANDED_SLOT_SECONDS
    deployment_found: bool = True
    waiters: LimitWaiters | None = None
    first_waiters: dict[uuid.UUID, FlowRun | None] = field(default_factory=dict)

    def pool_or_queue_full(self, run: FlowRun) -> str | None:
        """Why the run cannot take a slot of its queue or pool now (None: it can). A run whose
        queue was deleted is in no pool any more (the read models clear its queue; Prefect
        nulls it): no limit holds it back, and it takes no slot (`slot_events`)."""
        if self.pool is None or self.slots is None or run.work_queue_id is None:
            return None
        queue = self.pool.queues.get(run.work_queue_id)
        if queue is None:
            return None
        if queue.concurrency_limit is not None:
            if self.slots.of_queue(queue.id) >= queue.concurrency_limit:
                return (f"Work queue {queue.name!r} of work pool {self.pool.name!r} is at its concurrency limit "
                        f"({queue.concurrency_limit}).")
        if self.pool.concurrency_limit is not None and self.slots.total >= self.pool.concurrency_limit:
            return f"Work pool {self.pool.name!r} is at its concurrency limit ({self.pool.concurrency_limit})."
        return None

    @property
    def deployment_limit_applies(self) -> bool:
        return self.deployment_limit is not None and self.deployment_limit.active


NO_LIMITS = Limits()


# ---------------------------------------------------------------------------------------------
# Bookkeeping: the slot events that follow from a written state


def holds_pool_slot(run: FlowRun | None) -> bool:
    """PENDING or RUNNING, or SCHEDULED with the slot a release handed it (`hand_over`)."""
    return (run is not None and run.work_queue_id is not None
            and (run.state_type in POOL_SLOT_STATES or (run.state_type is StateType.SCHEDULED and run.pool_slot_reserved)))


def deployment_lease(run: FlowRun | None) -> uuid.UUID | None:
    """The lease of the deployment slot the run holds, if it holds one (not once it expired):
    in PENDING, RUNNING and CANCELLING, or SCHEDULED when a release handed it the slot (a
    SCHEDULED state carries a lease id only then: `hand_over`)."""
    if run is None or run.state is None or run.deployment_lease_expired:
        return None
    if run.state_type not in DEPLOYMENT_SLOT_STATES and run.state_type is not StateType.SCHEDULED:
        return None
    return run.state.state_details.deployment_concurrency_lease_id


_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_LEASE_VERSION = 8  # RFC 9562's version for a layout of one's own
_LIMIT_BITS = 48  # the lease's first bits: which limit it was taken from
_RANDOM_BITS = 128 - _LIMIT_BITS


def _limit_digest(limit: cl.ConcurrencyLimit) -> int:
    """The limit's identity across its removal and re-creation: its id (which a deployment's
    limit keeps) and when it was created (which it does not)."""
    created = (limit.created - _EPOCH) // timedelta(microseconds=1)
    digest = hashlib.sha256(limit.id.bytes + created.to_bytes(16, "big", signed=True)).digest()
    return int.from_bytes(digest[:_LIMIT_BITS // 8], "big")


def new_lease_id(limit: cl.ConcurrencyLimit, random_id: uuid.UUID) -> uuid.UUID:
    """A lease of a slot of `limit` as it is now: the limit's digest, then `random_id`'s bits
    (a version-8 UUID). A run carries nothing else from its take to its release, so the lease
    itself says which limit it holds a slot of."""
    value = (_limit_digest(limit) << _RANDOM_BITS) | (random_id.int & ((1 << _RANDOM_BITS) - 1))
    value = (value & ~(0xF << 76)) | (_LEASE_VERSION << 76)
    value = (value & ~(0x3 << 62)) | (0x2 << 62)  # RFC 4122 variant
    return uuid.UUID(int=value)


def lease_of(limit: cl.ConcurrencyLimit, lease: uuid.UUID) -> bool:
    """Whether `lease` holds a slot of `limit` as it is now, rather than of the limit of the
    same id that was removed before this one was set. A lease taken before leases named their
    limit (a random UUID) is taken to be of it, as every lease was then."""
    if lease.version != _LEASE_VERSION:
        return True
    return lease.int >> _RANDOM_BITS == _limit_digest(limit)


def holds_handed_slots(run: FlowRun | None) -> bool:
    """A SCHEDULED run that a release handed its deployment's slot (and perhaps its pool's)."""
    return run is not None and run.state_type is StateType.SCHEDULED and deployment_lease(run) is not None


def hand_over(woken: FlowRun, limits: Limits, random_id: uuid.UUID) -> FlowRun:
    """The waiter a release woke, holding the slots the release freed, so that its claim
    writes its own state and nothing else: one append, not an atomic batch over the limits'
    aggregates (which costs several times as much on the server). `limits`: as the release
    left them. The deployment's slot is handed over when the limit has room; the queue's and
    pool's when the run's queue is in the pool `limits` holds the counts of and both have
    room. A run that does not claim it within `limits.handed_slot_seconds` gives it back.
    `random_id`: what makes the lease (`new_lease_id`) unique."""
    limit = limits.deployment_limit
    if woken.state is None or limit is None or not limits.deployment_limit_applies or limit.active_slots >= limit.limit:
        return woken
    lease = new_lease_id(limit, random_id)
    details = woken.state.state_details.model_copy(update={"deployment_concurrency_lease_id": lease})
    in_pool = (limits.pool is not None and limits.slots is not None and woken.work_queue_id is not None
               and woken.work_queue_id in limits.pool.queues and limits.pool_or_queue_full(woken) is None)
    # It no longer waits for the slot: the reason its refused claim stored goes.
    return woken.model_copy(update={"state": woken.state.model_copy(update={"state_details": details}),
                                    "pool_slot_reserved": in_pool, "waiting_reason": None})


def limits_after(limits: Limits, events: Iterable[NewEvent]) -> Limits:
    """The limits as `events` (slot bookkeeping) leave them: the counts and the deployment
    limit each event carries after it."""
    slots, limit = limits.slots, limits.deployment_limit
    for new in events:
        if isinstance(new.event, _SlotEvent):
            slots = new.event.slots
        elif isinstance(new.event, cl.ConcurrencyLimitSlotReleased | cl.ConcurrencyLimitSlotTaken):
            limit = new.event.limit
    return replace(limits, slots=slots, deployment_limit=limit)


def slot_events(before: FlowRun | None, after: FlowRun | None, limits: Limits) -> list[NewEvent]:
    """The counts that change when the run goes from `before` to `after` (None: it does not
    exist on that side: created, or deleted). A lease of a limit removed before the run's
    deployment's was set again is of no slot of it (`lease_of`): nothing to take or give back."""
    events: list[NewEvent] = []
    slots = limits.slots
    if slots is not None:
        held = before is not None and holds_pool_slot(before) and _still_counted(before, limits, slots)
        holds = after is not None and holds_pool_slot(after) and _in_pool(after, limits)
        if holds != held:
            run = after if holds else before
            assert run is not None and run.work_queue_id is not None
            counts = slots.changed(run.work_queue_id, 1 if holds else -1)
            kind = PoolSlotTaken if holds else PoolSlotReleased
            events.append(NewEvent(slots_id(slots.pool_id),
                                   kind(flow_run_id=run.id, work_queue_id=run.work_queue_id, slots=counts)))
    limit = limits.deployment_limit
    old_lease, new_lease = deployment_lease(before), deployment_lease(after)
    if limit is not None and old_lease != new_lease:
        run_id = (after or before).id  # type: ignore[union-attr]
        if old_lease is not None and lease_of(limit, old_lease):
            limit = limit.model_copy(update={"active_slots": max(0, limit.active_slots - 1)})
            events.append(NewEvent(str(limit.id), cl.ConcurrencyLimitSlotReleased(
                limit=limit, flow_run_id=run_id, lease_id=old_lease)))
        if new_lease is not None and lease_of(limit, new_lease):
            limit = limit.model_copy(update={"active_slots": limit.active_slots + 1})
            events.append(NewEvent(str(limit.id), cl.ConcurrencyLimitSlotTaken(
                limit=limit, flow_run_id=run_id, lease_id=new_lease)))
    return events


def _in_pool(run: FlowRun, limits: Limits) -> bool:
    """Whether the run's queue is one of the pool's (`limits.pool` None: the caller passed
    the counts of the pool the run is created in, whose queue it found there)."""
    return limits.pool is None or run.work_queue_id in limits.pool.queues


def _still_counted(run: FlowRun, limits: Limits, slots: PoolSlots) -> bool:
    """Whether a run that held a slot still has it counted. Not once its queue is deleted: the
    deletion dropped its queue's count (`queue_deleted`), so its release gives nothing back.
    Unless a claim decided against the pool as it was before the deletion counted it there
    after all: what is still counted for that queue is given back then, never more."""
    assert run.work_queue_id is not None
    return _in_pool(run, limits) or slots.of_queue(run.work_queue_id) > 0


def with_initial_slots(decision: Decision, slots: PoolSlots | None) -> Decision:
    """A create whose runs start PENDING or RUNNING (FR-2: with `force` semantics, so no
    limit refuses them) counts them in their pool's slots, in the same batch."""
    if slots is None:
        return decision
    from .flow_runs import FlowRunCreated

    extra: list[NewEvent] = []
    limits = Limits(slots=slots)
    for new in decision.events:
        if isinstance(new.event, FlowRunCreated) and holds_pool_slot(new.event.run):
            made = slot_events(None, new.event.run, limits)
            extra += made
            limits = Limits(slots=_counts_after(made, slots))
    if not extra:
        return decision
    return Decision(events=[*decision.events, *extra], result=decision.result, created=decision.created,
                    after=decision.after, orchestration=decision.orchestration, queue=decision.queue)


def _counts_after(events: Iterable[NewEvent], slots: PoolSlots) -> PoolSlots:
    for new in events:
        if isinstance(new.event, _SlotEvent):
            slots = new.event.slots
    return slots
