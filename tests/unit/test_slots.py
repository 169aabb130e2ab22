"""Slots, pure: the claim rules (a run's queue and pool limits; its deployment's, OR-7) and the
counts that follow from whatever is written (OR-6, OR-13, FR-8), without I/O."""

from __future__ import annotations

import dataclasses
import itertools
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

from runledger.commands import concurrency_limits as cl
from runledger.commands import flow_runs as fr
from runledger.commands import slots as sl
from runledger.commands import work_pools as wp
from runledger.commands.decisions import Outcome
from runledger.commands.messages import DecisionContext
from runledger.commands.states import State, StateCreate, StateDetails, StateType

T = StateType
NOW = datetime(2026, 12, 1, 12, 0, tzinfo=UTC)
EARLIER = NOW - timedelta(hours=1)
_ids = (uuid.UUID(int=i) for i in itertools.count(500_000))


def ctx() -> DecisionContext:
    return DecisionContext.fixed(NOW, _ids)


def a_pool(pool_limit: int | None = None, queue_limit: int | None = None) -> wp.WorkPool:
    d = wp.decide_create_work_pool(wp.CreateWorkPool(name="p", concurrency_limit=pool_limit), wp.WorkPoolNameClaim(),
                                   ctx())
    pool = d.result
    queue = pool.queues[pool.default_queue_id]
    return dataclasses.replace(pool, queues={queue.id: dataclasses.replace(queue, concurrency_limit=queue_limit)})


DEPLOYMENT_ID = uuid.UUID(int=9)


def a_run(pool: wp.WorkPool | None, type_: StateType = T.SCHEDULED, *, deployment: bool = False,
          lease: uuid.UUID | None = None, **fields: Any) -> fr.FlowRun:
    details: dict[str, Any] = {"deployment_concurrency_lease_id": lease}
    if type_ is T.SCHEDULED:
        details["scheduled_time"] = EARLIER
    state = State(id=uuid.uuid4(), type=type_, name=type_.value.title(), timestamp=EARLIER,
                  state_details=StateDetails(**details))
    return fr.FlowRun.model_validate({
        "id": uuid.uuid4(), "created": EARLIER, "updated": EARLIER, "name": "calm-otter", "flow_id": uuid.UUID(int=8),
        "work_queue_id": pool.default_queue_id if pool is not None else None,
        "deployment_id": DEPLOYMENT_ID if deployment else None,
        "state": state, "state_id": state.id, "state_type": state.type, "state_name": state.name, **fields})


def counts(pool: wp.WorkPool, n: int) -> sl.PoolSlots:
    return sl.PoolSlots(pool_id=pool.id, by_queue={pool.default_queue_id: n} if n else {})


def a_limit(limit: int, active: int = 0) -> cl.ConcurrencyLimit:
    return cl.ConcurrencyLimit(id=uuid.UUID(int=77), created=EARLIER, updated=EARLIER,
                               name=f"deployment:{DEPLOYMENT_ID}", limit=limit, active_slots=active)


def set_state(run: fr.FlowRun, type_: StateType, limits: sl.Limits, *, force: bool = False,
              **details: Any) -> Any:
    cmd = fr.SetFlowRunState(id=run.id, state=StateCreate(type=type_, state_details=StateDetails(**details)),
                             force=force)
    return fr.decide_set_state(cmd, run, ctx(), limits)


def events_of(decision: Any, kind: type) -> list[Any]:
    return [e.event for e in decision.events if isinstance(e.event, kind)]


# ---------------------------------------------------------------------------------------------
# Queue and pool limits


def test_a_claim_takes_a_slot_of_its_queue_in_the_same_batch() -> None:
    pool = a_pool(pool_limit=5, queue_limit=2)
    d = set_state(a_run(pool), T.PENDING, sl.Limits(pool=pool, slots=counts(pool, 1)))
    assert d.orchestration.status is Outcome.ACCEPT
    (taken,) = events_of(d, sl.PoolSlotTaken)
    assert taken.slots.of_queue(pool.default_queue_id) == 2 and taken.slots.total == 2
    assert d.result.type is T.PENDING


def test_a_full_queue_refuses_the_claim_writes_no_state_and_records_why_the_run_waits() -> None:
    pool = a_pool(queue_limit=2)
    run = a_run(pool)
    d = set_state(run, T.PENDING, sl.Limits(pool=pool, slots=counts(pool, 2)))
    assert d.orchestration.status is Outcome.REJECT
    assert d.result == run.state  # the current state: nothing written
    assert "concurrency limit (2)" in d.orchestration.reason and "'default'" in d.orchestration.reason
    (waiting,) = events_of(d, fr.FlowRunWaiting)
    assert waiting.run.waiting_reason == d.orchestration.reason
    assert waiting.run.state == run.state
    assert not events_of(d, sl.PoolSlotTaken)
    # Asked again while still full: the same answer, and nothing more in the log.
    again = set_state(waiting.run, T.PENDING, sl.Limits(pool=pool, slots=counts(pool, 2)))
    assert again.orchestration.status is Outcome.REJECT and again.events == []


def test_a_full_pool_refuses_the_claim_whatever_its_queues_allow() -> None:
    pool = a_pool(pool_limit=3)
    d = set_state(a_run(pool), T.RUNNING, sl.Limits(pool=pool, slots=counts(pool, 3)))
    assert d.orchestration.status is Outcome.REJECT
    assert d.orchestration.reason == "Work pool 'p' is at its concurrency limit (3)."


def test_a_claim_after_waiting_clears_the_reason() -> None:
    pool = a_pool(pool_limit=1)
    run = a_run(pool, waiting_reason="Work pool 'p' is at its concurrency limit (1).")
    d = set_state(run, T.PENDING, sl.Limits(pool=pool, slots=counts(pool, 0)))
    assert d.orchestration.status is Outcome.ACCEPT
    (state_set,) = events_of(d, fr.FlowRunStateSet)
    assert state_set.run.waiting_reason is None


def test_runs_without_a_queue_or_limit_are_never_held_back() -> None:
    pool = a_pool()
    d = set_state(a_run(pool), T.PENDING, sl.Limits(pool=pool, slots=counts(pool, 10_000)))
    assert d.orchestration.status is Outcome.ACCEPT
    assert events_of(d, sl.PoolSlotTaken)[0].slots.total == 10_001  # counted all the same
    d = set_state(a_run(None), T.PENDING, sl.NO_LIMITS)
    assert d.orchestration.status is Outcome.ACCEPT and not events_of(d, sl.PoolSlotTaken)


def test_pending_to_running_keeps_the_slot_and_leaving_both_gives_it_back() -> None:
    pool = a_pool(queue_limit=1)
    limits = sl.Limits(pool=pool, slots=counts(pool, 1))
    running = set_state(a_run(pool, T.PENDING), T.RUNNING, limits)
    assert running.orchestration.status is Outcome.ACCEPT
    assert not events_of(running, sl.PoolSlotTaken) and not events_of(running, sl.PoolSlotReleased)
    for end in (T.COMPLETED, T.FAILED, T.CRASHED, T.CANCELLING, T.PAUSED):
        d = set_state(a_run(pool, T.RUNNING), end, limits, force=True)
        (released,) = events_of(d, sl.PoolSlotReleased)
        assert released.slots.total == 0, end


def test_force_still_counts_even_past_a_limit() -> None:
    """An operator's forced state is written; the count stays true, so later claims wait."""
    pool = a_pool(pool_limit=1)
    d = set_state(a_run(pool), T.RUNNING, sl.Limits(pool=pool, slots=counts(pool, 1)), force=True)
    assert d.orchestration.status is Outcome.ACCEPT
    assert events_of(d, sl.PoolSlotTaken)[0].slots.total == 2


def _with_queue(pool: wp.WorkPool, limit: int | None = None) -> tuple[wp.WorkPool, uuid.UUID]:
    d = wp.decide_create_work_queue(wp.CreateWorkQueue(work_pool_name="p", name="q", concurrency_limit=limit), pool,
                                    ctx())
    after = wp.evolve(pool, d.events[0].event)
    assert after is not None
    return after, d.result[1].id


def test_deleting_a_queue_drops_its_count_in_the_same_batch() -> None:
    pool, qid = _with_queue(a_pool(pool_limit=1))
    slots = sl.PoolSlots(pool_id=pool.id, by_queue={qid: 1, pool.default_queue_id: 2})
    d = wp.decide_delete_work_queue(wp.DeleteWorkQueue(work_pool_name="p", work_queue_name="q"), pool, ctx())
    with_counts = sl.with_queue_deleted(d, slots)
    assert [type(e.event) for e in with_counts.events] == [wp.WorkQueueDeleted, sl.PoolQueueSlotsDropped]
    (dropped,) = events_of(with_counts, sl.PoolQueueSlotsDropped)
    assert with_counts.events[1].aggregate_id == sl.slots_id(pool.id)
    assert (dropped.work_queue_id, dropped.dropped, dropped.slots.by_queue) == (qid, 1, {pool.default_queue_id: 2})
    assert sl.evolve(slots, dropped) == dropped.slots
    # Written when it held nothing too: a claim decided before it then fails its sequence check.
    (empty,) = events_of(sl.with_queue_deleted(d, sl.PoolSlots(pool_id=pool.id)), sl.PoolQueueSlotsDropped)
    assert empty.dropped == 0 and empty.slots.by_queue == {}


def test_a_run_of_a_deleted_queue_is_in_no_pool_and_gives_back_nothing_twice() -> None:
    pool, qid = _with_queue(a_pool(pool_limit=1), limit=1)
    running = a_run(pool, T.RUNNING, work_queue_id=qid)
    waiting = a_run(pool, work_queue_id=qid)
    d = wp.decide_delete_work_queue(wp.DeleteWorkQueue(work_pool_name="p", work_queue_name="q"), pool, ctx())
    gone = wp.evolve(pool, d.events[0].event)
    assert gone is not None
    counts_after = events_of(sl.with_queue_deleted(d, counts(pool, 1).changed(qid, 1)), sl.PoolQueueSlotsDropped)[0].slots
    limits = sl.Limits(pool=gone, slots=counts_after)  # the default queue's run fills the pool
    ended = set_state(running, T.COMPLETED, limits)
    assert ended.orchestration.status is Outcome.ACCEPT
    assert not events_of(ended, sl.PoolSlotReleased)  # its count went with the queue
    claimed = set_state(waiting, T.PENDING, limits)  # neither its queue's nor its pool's limit holds it back
    assert claimed.orchestration.status is Outcome.ACCEPT and not events_of(claimed, sl.PoolSlotTaken)
    # A claim decided against the pool as it was before the deletion counted it there after all:
    # its release gives that back, and no more.
    stale = sl.PoolSlots(pool_id=pool.id, by_queue={qid: 1, pool.default_queue_id: 1})
    (released,) = events_of(set_state(running, T.COMPLETED, sl.Limits(pool=gone, slots=stale)), sl.PoolSlotReleased)
    assert released.slots.by_queue == {pool.default_queue_id: 1}


# ---------------------------------------------------------------------------------------------
# Deployment limits (OR-6, OR-7, OR-13)


def deployment_limits(limit: int, active: int, strategy: str = "ENQUEUE") -> sl.Limits:
    return sl.Limits(deployment_limit=a_limit(limit, active), collision_strategy=strategy)


def test_a_free_deployment_slot_is_taken_with_a_lease_on_the_pending_state() -> None:
    d = set_state(a_run(None, deployment=True), T.PENDING, deployment_limits(2, 1))
    assert d.orchestration.status is Outcome.ACCEPT
    lease = d.result.state_details.deployment_concurrency_lease_id
    assert lease is not None
    (taken,) = events_of(d, cl.ConcurrencyLimitSlotTaken)
    assert (taken.lease_id, taken.limit.active_slots) == (lease, 2)


def test_a_full_deployment_enqueues_the_run_30_seconds_later_by_default() -> None:
    d = set_state(a_run(None, deployment=True), T.PENDING, deployment_limits(2, 2))
    assert d.orchestration.status is Outcome.REJECT
    assert d.orchestration.reason == "Deployment concurrency limit reached."
    assert (d.result.type, d.result.name) == (T.SCHEDULED, "AwaitingConcurrencySlot")
    assert d.result.state_details.scheduled_time == NOW + timedelta(seconds=30)
    (state_set,) = events_of(d, fr.FlowRunStateSet)
    assert state_set.run.waiting_reason == "Deployment concurrency limit reached."
    assert not events_of(d, cl.ConcurrencyLimitSlotTaken)


def test_cancel_new_cancels_the_run_when_the_deployment_is_full() -> None:
    d = set_state(a_run(None, deployment=True), T.PENDING, deployment_limits(1, 1, "CANCEL_NEW"))
    assert d.orchestration.status is Outcome.REJECT
    assert (d.result.type, d.result.message) == (T.CANCELLED, "Deployment concurrency limit reached.")
    assert events_of(d, fr.FlowRunStateSet)[0].run.waiting_reason is None


def test_a_zero_limit_or_a_missing_deployment_aborts() -> None:
    d = set_state(a_run(None, deployment=True), T.PENDING, deployment_limits(0, 0))
    assert d.orchestration.status is Outcome.ABORT and "limit is 0" in d.orchestration.reason
    d = set_state(a_run(None, deployment=True), T.PENDING, sl.Limits(deployment_found=False))
    assert d.orchestration.status is Outcome.ABORT and d.orchestration.reason == "Deployment not found."


def test_an_inactive_deployment_limit_holds_nobody_back() -> None:
    limits = sl.Limits(deployment_limit=a_limit(1, 1).model_copy(update={"active": False}))
    d = set_state(a_run(None, deployment=True), T.PENDING, limits)
    assert d.orchestration.status is Outcome.ACCEPT


def test_the_lease_is_carried_to_running_and_given_back_on_leaving() -> None:
    lease = uuid.uuid4()
    limits = deployment_limits(1, 1)
    running = set_state(a_run(None, T.PENDING, deployment=True, lease=lease), T.RUNNING, limits)
    assert running.result.state_details.deployment_concurrency_lease_id == lease
    assert not events_of(running, cl.ConcurrencyLimitSlotTaken) and not events_of(running, cl.ConcurrencyLimitSlotReleased)
    forced = set_state(a_run(None, T.PENDING, deployment=True, lease=lease), T.RUNNING, limits, force=True)
    assert forced.result.state_details.deployment_concurrency_lease_id == lease
    # CANCELLING still holds the deployment's slot (not the pool's); CANCELLED gives it back.
    cancelling = set_state(a_run(None, T.RUNNING, deployment=True, lease=lease), T.CANCELLING, limits)
    assert not events_of(cancelling, cl.ConcurrencyLimitSlotReleased)
    done = set_state(a_run(None, T.CANCELLING, deployment=True, lease=lease), T.CANCELLED, limits)
    (released,) = events_of(done, cl.ConcurrencyLimitSlotReleased)
    assert (released.lease_id, released.limit.active_slots) == (lease, 0)


def test_a_lease_id_sent_by_a_client_is_ignored() -> None:
    made_up = uuid.uuid4()
    d = set_state(a_run(None, deployment=True), T.PENDING, sl.NO_LIMITS, deployment_concurrency_lease_id=made_up)
    assert d.result.state_details.deployment_concurrency_lease_id is None
    assert not events_of(d, cl.ConcurrencyLimitSlotTaken)


def test_pool_full_is_decided_before_the_deployment_slot_is_taken() -> None:
    pool = a_pool(pool_limit=1)
    limits = dataclasses.replace(deployment_limits(5, 0), pool=pool, slots=counts(pool, 1))
    d = set_state(a_run(pool, deployment=True), T.PENDING, limits)
    assert d.orchestration.status is Outcome.REJECT and d.result.type is T.SCHEDULED
    assert not events_of(d, cl.ConcurrencyLimitSlotTaken)


# ---------------------------------------------------------------------------------------------
# Creates and deletes


def test_deleting_a_run_gives_back_what_it_held() -> None:
    pool = a_pool(pool_limit=2)
    run = a_run(pool, T.RUNNING, deployment=True, lease=uuid.uuid4())
    limits = dataclasses.replace(deployment_limits(1, 1), pool=pool, slots=counts(pool, 1))
    d = fr.decide_delete_flow_run(fr.DeleteFlowRun(id=run.id), run, None, ctx(), limits)
    assert events_of(d, sl.PoolSlotReleased)[0].slots.total == 0
    assert events_of(d, cl.ConcurrencyLimitSlotReleased)[0].limit.active_slots == 0


def test_a_run_created_pending_in_a_pool_is_counted() -> None:
    pool = a_pool(pool_limit=1)
    cmd = fr.CreateFlowRun(flow_id=uuid.UUID(int=8), work_pool_name="p")
    d = fr.decide_create_flow_run(cmd, None, None, True, pool, ctx())
    d = sl.with_initial_slots(d, counts(pool, 0))
    (taken,) = events_of(d, sl.PoolSlotTaken)
    assert taken.flow_run_id == d.result.id and taken.slots.total == 1
    scheduled = fr.CreateFlowRun(flow_id=uuid.UUID(int=8), work_pool_name="p", state=StateCreate(type=T.SCHEDULED))
    d = sl.with_initial_slots(fr.decide_create_flow_run(scheduled, None, None, True, pool, ctx()), counts(pool, 0))
    assert not events_of(d, sl.PoolSlotTaken)


# ---------------------------------------------------------------------------------------------
# Waiters: a release wakes the first run waiting for the deployment's slot


def waiting_limits(limit: cl.ConcurrencyLimit, waiting: list[fr.FlowRun | None], ids: list[uuid.UUID]) -> sl.Limits:
    waiters = sl.LimitWaiters(limit_id=limit.id, run_ids=ids)
    return sl.Limits(deployment_limit=limit, waiters=waiters, first_waiters=dict(zip(ids, waiting, strict=True)))


def awaiting(**fields: Any) -> fr.FlowRun:
    run = a_run(None, deployment=True, **fields)
    state = run.state.model_copy(update={"name": "AwaitingConcurrencySlot",
                                         "state_details": StateDetails(scheduled_time=NOW + timedelta(seconds=20))})
    return run.model_copy(update={"state": state, "state_name": state.name})


def test_an_enqueued_run_joins_the_waiters() -> None:
    limit = a_limit(1, 1)
    run = a_run(None, deployment=True)
    d = set_state(run, T.PENDING, waiting_limits(limit, [], []))
    (changed,) = events_of(d, sl.LimitWaitersChanged)
    assert changed.added == run.id and changed.waiters.run_ids == [run.id]


def test_a_release_wakes_the_first_waiter_still_waiting_and_drops_those_that_moved_on() -> None:
    limit = a_limit(1, 1)
    moved_on = a_run(None, T.RUNNING, deployment=True)
    first, second = awaiting(), awaiting()
    ids = [uuid.uuid4(), moved_on.id, first.id, second.id]  # a deleted run, one that moved on, two waiting
    limits = waiting_limits(limit, [None, moved_on, first], ids[:3])
    limits = dataclasses.replace(limits, waiters=sl.LimitWaiters(limit_id=limit.id, run_ids=ids))
    d = set_state(a_run(None, T.RUNNING, deployment=True, lease=uuid.uuid4()), T.COMPLETED, limits)
    (changed,) = events_of(d, sl.LimitWaitersChanged)
    assert changed.woken == first.id and changed.dropped == ids[:2] and changed.waiters.run_ids == [second.id]
    woke = [e.run for e in events_of(d, fr.FlowRunStateSet) if e.run.id == first.id]
    assert woke and woke[0].state.name == "AwaitingConcurrencySlot"
    assert woke[0].state.state_details.scheduled_time == NOW  # due now, not in 20 s
    assert events_of(d, cl.ConcurrencyLimitSlotReleased)


def test_a_waiter_that_takes_a_slot_leaves_the_waiters() -> None:
    limit = a_limit(2, 1)
    run = awaiting()
    d = set_state(run, T.PENDING, waiting_limits(limit, [run], [run.id]), scheduled_time=NOW)
    assert d.orchestration.status is Outcome.ACCEPT
    (changed,) = events_of(d, sl.LimitWaitersChanged)
    assert changed.waiters.run_ids == [] and changed.woken is None


def _release_to_a_waiter(pool: wp.WorkPool, pool_count: int, limit: cl.ConcurrencyLimit) -> tuple[Any, fr.FlowRun]:
    """A run of `pool` holding its queue's slot and the deployment's completes; one run waits."""
    waiter = awaiting(waiting_reason="Deployment concurrency limit reached.").model_copy(
        update={"work_queue_id": pool.default_queue_id})
    holder = a_run(pool, T.RUNNING, deployment=True, lease=uuid.uuid4())
    limits = dataclasses.replace(waiting_limits(limit, [waiter], [waiter.id]), pool=pool,
                                 slots=counts(pool, pool_count))
    d = set_state(holder, T.COMPLETED, limits)
    (woken,) = [e.run for e in events_of(d, fr.FlowRunStateSet) if e.run.id == waiter.id]
    return d, woken


def test_a_release_hands_the_slots_it_frees_to_the_waiter_it_wakes() -> None:
    pool = a_pool(pool_limit=1)
    d, woken = _release_to_a_waiter(pool, 1, a_limit(1, 1))
    # The deployment's slot: released by the holder, taken by the waiter under a new lease.
    released, taken = events_of(d, cl.ConcurrencyLimitSlotReleased), events_of(d, cl.ConcurrencyLimitSlotTaken)
    assert [e.limit.active_slots for e in [*released, *taken]] == [0, 1]
    assert taken[0].flow_run_id == woken.id
    assert taken[0].lease_id == woken.state.state_details.deployment_concurrency_lease_id is not None
    # The pool's slot: the same.
    assert [e.slots.total for e in events_of(d, sl.PoolSlotReleased)] == [0]
    assert [(e.flow_run_id, e.slots.total) for e in events_of(d, sl.PoolSlotTaken)] == [(woken.id, 1)]
    assert woken.state_type is T.SCHEDULED and woken.pool_slot_reserved
    assert woken.waiting_reason is None  # it no longer waits for the slot
    assert sl.holds_pool_slot(woken) and sl.deployment_lease(woken) is not None and sl.holds_handed_slots(woken)


def test_the_claim_of_a_run_handed_its_slots_writes_its_own_state_only() -> None:
    """One event, so one append instead of an atomic batch over the pool's counts and the
    deployment's limit: what makes a freed slot's hand-over fast."""
    pool = a_pool(pool_limit=1)
    d, woken = _release_to_a_waiter(pool, 1, a_limit(1, 1))
    after = sl.limits_after(sl.Limits(pool=pool, slots=counts(pool, 1), deployment_limit=a_limit(1, 1)), d.events)
    limits = dataclasses.replace(after, waiters=sl.LimitWaiters(limit_id=after.deployment_limit.id))
    assert after.slots.total == 1 and after.deployment_limit.active_slots == 1  # held for the woken run
    claim = set_state(woken, T.PENDING, limits)
    assert claim.orchestration.status is Outcome.ACCEPT
    assert [type(e.event) for e in claim.events] == [fr.FlowRunStateSet]
    claimed = claim.events[0].event.run
    assert claimed.state_type is T.PENDING and not claimed.pool_slot_reserved
    assert (claimed.state.state_details.deployment_concurrency_lease_id
            == woken.state.state_details.deployment_concurrency_lease_id)
    # Another run of the pool finds both full meanwhile.
    other = set_state(a_run(pool, deployment=True), T.PENDING, limits)
    assert other.orchestration.status is Outcome.REJECT
    # The handed run cancelled instead: it gives both back.
    cancelled = set_state(woken, T.CANCELLED, limits)
    assert events_of(cancelled, sl.PoolSlotReleased) and events_of(cancelled, cl.ConcurrencyLimitSlotReleased)


def test_a_waiter_is_handed_no_pool_slot_its_queue_has_no_room_for_nor_one_of_another_pool() -> None:
    pool = a_pool(pool_limit=1)
    # The pool stays full after the release (another run holds its only slot, the holder's
    # count was off): only the deployment's slot is handed over.
    d, woken = _release_to_a_waiter(pool, 2, a_limit(1, 1))
    assert not woken.pool_slot_reserved and sl.deployment_lease(woken) is not None
    assert not events_of(d, sl.PoolSlotTaken)
    # A waiter in a queue of another pool: the same.
    elsewhere = awaiting().model_copy(update={"work_queue_id": uuid.uuid4()})
    limits = dataclasses.replace(waiting_limits(a_limit(1, 1), [elsewhere], [elsewhere.id]), pool=pool,
                                 slots=counts(pool, 1))
    d = set_state(a_run(pool, T.RUNNING, deployment=True, lease=uuid.uuid4()), T.COMPLETED, limits)
    (woken,) = [e.run for e in events_of(d, fr.FlowRunStateSet) if e.run.id == elsewhere.id]
    assert not woken.pool_slot_reserved and sl.deployment_lease(woken) is not None


def test_a_limit_still_full_after_the_release_hands_nothing_over() -> None:
    d, woken = _release_to_a_waiter(a_pool(), 0, a_limit(1, 2))  # lowered below its active slots
    assert sl.deployment_lease(woken) is None and not woken.pool_slot_reserved
    assert not events_of(d, cl.ConcurrencyLimitSlotTaken)


def test_slots_handed_over_and_never_claimed_go_back_and_to_the_next_waiter() -> None:
    pool = a_pool(pool_limit=1)
    _, woken = _release_to_a_waiter(pool, 1, a_limit(1, 1))
    lease = woken.state.state_details.deployment_concurrency_lease_id
    nxt = awaiting().model_copy(update={"work_queue_id": pool.default_queue_id})
    limits = dataclasses.replace(waiting_limits(a_limit(1, 1), [nxt], [nxt.id]), pool=pool, slots=counts(pool, 1))
    cmd = fr.ExpireDeploymentSlotLease(id=woken.id, lease_id=lease)
    # Within `HANDED_SLOT_SECONDS` of the hand-over (at NOW): kept.
    soon = DecisionContext.fixed(NOW + timedelta(seconds=sl.HANDED_SLOT_SECONDS - 1), _ids)
    assert fr.decide_expire_deployment_slot_lease(cmd, woken, soon, limits).events == []
    later = DecisionContext.fixed(NOW + timedelta(seconds=sl.HANDED_SLOT_SECONDS), _ids)
    d = fr.decide_expire_deployment_slot_lease(cmd, woken, later, limits)
    runs = {e.run.id: e.run for e in events_of(d, fr.FlowRunStateSet)}
    again = runs[woken.id]
    assert again.state.name == "AwaitingConcurrencySlot" and not sl.holds_handed_slots(again)
    assert not again.pool_slot_reserved and "went unclaimed" in again.state.message
    assert sl.holds_handed_slots(runs[nxt.id]) and runs[nxt.id].pool_slot_reserved  # the next one's turn
    (changed,) = events_of(d, sl.LimitWaitersChanged)
    assert changed.woken == nxt.id and changed.waiters.run_ids == [woken.id]  # back in line
    # Another lease, or sent again: nothing.
    assert fr.decide_expire_deployment_slot_lease(cmd.model_copy(update={"lease_id": uuid.uuid4()}), woken, later,
                                                  limits).events == []
    assert fr.decide_expire_deployment_slot_lease(cmd, again, later, limits).events == []
    # The deployment was deleted meanwhile: the pool's slot still goes back.
    gone = sl.Limits(pool=pool, slots=counts(pool, 1), deployment_found=False)
    d = fr.decide_expire_deployment_slot_lease(cmd, woken, later, gone)
    assert [e.slots.total for e in events_of(d, sl.PoolSlotReleased)] == [0]
    # ... and its claim is told the deployment is gone, not let through on the handed lease.
    assert set_state(woken, T.PENDING, gone).orchestration.status is Outcome.ABORT


# ---------------------------------------------------------------------------------------------
# Claims held by a worker


def test_a_worker_that_names_itself_must_be_online_in_the_runs_pool() -> None:
    pool = dataclasses.replace(a_pool(), online_workers=frozenset({"w1"}))
    limits = sl.Limits(pool=pool, slots=counts(pool, 0))
    run = a_run(pool)
    cmd = fr.SetFlowRunState(id=run.id, state=StateCreate(type=T.PENDING), worker_name="w2")
    refused = fr.decide_set_state(cmd, run, ctx(), limits)
    assert refused.orchestration.status is Outcome.REJECT and refused.events == []
    cmd = fr.SetFlowRunState(id=run.id, state=StateCreate(type=T.PENDING), worker_name="w1")
    claimed = fr.decide_set_state(cmd, run, ctx(), limits)
    assert claimed.orchestration.status is Outcome.ACCEPT
    (state_set,) = events_of(claimed, fr.FlowRunStateSet)
    assert state_set.run.worker_name == "w1"
    # Kept while it runs, dropped when it ends.
    running = fr.decide_set_state(fr.SetFlowRunState(id=run.id, state=StateCreate(type=T.RUNNING)), state_set.run,
                                  ctx(), limits)
    assert events_of(running, fr.FlowRunStateSet)[0].run.worker_name == "w1"


def test_a_lost_workers_run_is_crashed_once_and_gives_its_slots_back() -> None:
    pool = a_pool(pool_limit=1)
    run = a_run(pool, T.RUNNING, deployment=True, lease=uuid.uuid4(), worker_name="w1")
    limits = dataclasses.replace(deployment_limits(1, 1), pool=pool, slots=counts(pool, 1))
    cmd = fr.CrashFlowRunOfLostWorker(id=run.id, worker_name="w1")
    d = fr.decide_crash_run_of_lost_worker(cmd, run, False, "p", ctx(), limits)
    assert d.result.type is T.CRASHED and "'w1'" in d.result.message
    assert events_of(d, sl.PoolSlotReleased) and events_of(d, cl.ConcurrencyLimitSlotReleased)
    assert events_of(d, fr.FlowRunStateSet)[0].run.worker_name is None
    # Back online, another worker's run, or a run that moved on: nothing.
    assert fr.decide_crash_run_of_lost_worker(cmd, run, True, "p", ctx(), limits).events == []
    other = fr.CrashFlowRunOfLostWorker(id=run.id, worker_name="w2")
    assert fr.decide_crash_run_of_lost_worker(other, run, False, "p", ctx(), limits).events == []
    done = events_of(d, fr.FlowRunStateSet)[0].run
    assert fr.decide_crash_run_of_lost_worker(cmd, done, False, "p", ctx(), limits).events == []


def test_a_cancel_new_run_the_clock_finds_late_behind_a_full_deployment_is_cancelled() -> None:
    run = a_run(None, deployment=True, next_scheduled_start_time=EARLIER)
    cmd = fr.MarkFlowRunLate(id=run.id)
    full = fr.decide_mark_late(cmd, run, ctx(), deployment_limits(1, 1, "CANCEL_NEW"))
    assert full.orchestration.status is Outcome.REJECT
    assert (full.result.type, full.result.message) == (T.CANCELLED, "Deployment concurrency limit reached.")
    for limits in (deployment_limits(2, 1, "CANCEL_NEW"), deployment_limits(1, 1, "ENQUEUE"), sl.NO_LIMITS):
        d = fr.decide_mark_late(cmd, run, ctx(), limits)
        assert d.orchestration.status is Outcome.ACCEPT and d.result.name == "Late"
    # A client's own `Late` goes through the core rules (Prefect's), whatever the deployment.
    late = fr.SetFlowRunState(id=run.id, state=StateCreate(type=T.SCHEDULED, name="Late",
                                                           state_details=StateDetails(scheduled_time=EARLIER)))
    own = fr.decide_set_state(late, run, ctx(), deployment_limits(1, 1, "CANCEL_NEW"))
    assert own.orchestration.status is Outcome.ACCEPT and own.result.name == "Late"


# ---------------------------------------------------------------------------------------------
# A deployment slot's lease while its run is PENDING (Prefect's lease reaper, and OR-6)


def expire(run: fr.FlowRun, limits: sl.Limits, lease: uuid.UUID | None = None) -> Any:
    cmd = fr.ExpireDeploymentSlotLease(id=run.id, lease_id=lease or run.state.state_details.deployment_concurrency_lease_id)
    return fr.decide_expire_deployment_slot_lease(cmd, run, ctx(), limits)


def test_a_run_pending_past_its_lease_gives_the_slot_back_and_wakes_the_next_waiter() -> None:
    limit = a_limit(1, 1)
    waiter = awaiting()
    run = a_run(None, T.PENDING, deployment=True, lease=uuid.uuid4())  # pending for an hour
    limits = dataclasses.replace(waiting_limits(limit, [waiter], [waiter.id]), lease_seconds=600)
    d = expire(run, limits)
    (expired,) = events_of(d, fr.FlowRunDeploymentLeaseExpired)
    assert expired.run.deployment_lease_expired and expired.run.state == run.state  # still PENDING
    assert expired.lease_id == run.state.state_details.deployment_concurrency_lease_id
    (released,) = events_of(d, cl.ConcurrencyLimitSlotReleased)
    assert released.limit.active_slots == 0 and released.lease_id == expired.lease_id
    (woken,) = [e.run for e in events_of(d, fr.FlowRunStateSet)]
    assert woken.id == waiter.id and woken.state.state_details.scheduled_time == NOW
    assert d.created is True
    # Once expired, or for another lease: nothing more.
    assert expire(expired.run, limits, expired.lease_id).events == []
    assert expire(run, limits, uuid.uuid4()).events == []


def test_a_lease_with_time_left_or_a_run_that_moved_on_is_left_alone() -> None:
    lease = uuid.uuid4()
    pending = a_run(None, T.PENDING, deployment=True, lease=lease)  # its PENDING state is an hour old
    assert expire(pending, dataclasses.replace(deployment_limits(1, 1), lease_seconds=3_601)).events == []
    assert expire(pending, dataclasses.replace(deployment_limits(1, 1), lease_seconds=3_599)).events != []
    running = a_run(None, T.RUNNING, deployment=True, lease=lease)  # its worker's heartbeats keep it
    assert expire(running, dataclasses.replace(deployment_limits(1, 1), lease_seconds=60)).events == []
    # The deployment has no limit (any more): nothing to give back.
    assert expire(pending, sl.Limits(lease_seconds=60)).events == []


def test_a_run_whose_lease_expired_takes_a_slot_again_at_running_or_is_cancelled() -> None:
    run = a_run(None, T.PENDING, deployment=True, lease=uuid.uuid4())
    expired = events_of(expire(run, dataclasses.replace(deployment_limits(1, 1), lease_seconds=60)),
                        fr.FlowRunDeploymentLeaseExpired)[0].run
    # A slot is free: it takes it, under a new lease, and the flag is cleared.
    free = set_state(expired, T.RUNNING, deployment_limits(1, 0))
    assert free.orchestration.status is Outcome.ACCEPT and free.result.type is T.RUNNING
    (taken,) = events_of(free, cl.ConcurrencyLimitSlotTaken)
    new_lease = free.result.state_details.deployment_concurrency_lease_id
    assert new_lease not in (None, run.state.state_details.deployment_concurrency_lease_id)
    assert taken.lease_id == new_lease and taken.limit.active_slots == 1
    assert not events_of(free, fr.FlowRunStateSet)[0].run.deployment_lease_expired
    # None is free: cancelled, its infrastructure cannot wait; no slot released twice.
    full = set_state(expired, T.RUNNING, deployment_limits(1, 1))
    assert full.orchestration.status is Outcome.REJECT
    assert full.orchestration.reason == "Deployment concurrency limit reached after lease expiry."
    assert full.result.type is T.CANCELLED and "slot lost during provisioning" in full.result.message
    assert not events_of(full, cl.ConcurrencyLimitSlotReleased) and not events_of(full, cl.ConcurrencyLimitSlotTaken)
    # Forced on, it holds nothing it did not take: no old lease carried.
    forced = set_state(expired, T.RUNNING, deployment_limits(1, 1), force=True)
    assert forced.result.state_details.deployment_concurrency_lease_id is None
    assert not events_of(forced, cl.ConcurrencyLimitSlotReleased) and not events_of(forced, cl.ConcurrencyLimitSlotTaken)


def _pending_sub_state(run: fr.FlowRun, name: str, limits: sl.Limits) -> Any:
    cmd = fr.SetFlowRunState(id=run.id, state=StateCreate(type=T.PENDING, name=name))
    return fr.decide_set_state(cmd, run, ctx(), limits)


def test_a_run_whose_lease_expired_takes_no_slot_through_its_pending_sub_states() -> None:
    """The expired lease is not carried into `InfrastructurePending` (the slot went to another
    run): the run holds none, and OR-6 still decides at its RUNNING."""
    run = a_run(None, T.PENDING, deployment=True, lease=uuid.uuid4())
    expired = events_of(expire(run, dataclasses.replace(deployment_limits(1, 1), lease_seconds=60)),
                        fr.FlowRunDeploymentLeaseExpired)[0].run
    full = deployment_limits(1, 1)  # another run took the slot given back
    for name in ("Submitting", "InfrastructurePending"):
        d = _pending_sub_state(expired, name, full)
        assert d.orchestration.status is Outcome.ACCEPT and d.result.name == name
        assert d.result.state_details.deployment_concurrency_lease_id is None
        assert not events_of(d, cl.ConcurrencyLimitSlotTaken) and not events_of(d, cl.ConcurrencyLimitSlotReleased)
        expired = events_of(d, fr.FlowRunStateSet)[0].run
        assert expired.deployment_lease_expired and sl.deployment_lease(expired) is None
    cancelled = set_state(expired, T.RUNNING, full)
    assert cancelled.orchestration.status is Outcome.REJECT and cancelled.result.type is T.CANCELLED
    assert not events_of(cancelled, cl.ConcurrencyLimitSlotTaken)
    started = set_state(expired, T.RUNNING, deployment_limits(1, 0))
    assert started.orchestration.status is Outcome.ACCEPT
    assert [e.limit.active_slots for e in events_of(started, cl.ConcurrencyLimitSlotTaken)] == [1]
    # A run that still holds its lease keeps it through its sub-states, as before.
    holding = a_run(None, T.PENDING, deployment=True, lease=uuid.uuid4())
    kept = _pending_sub_state(holding, "InfrastructurePending", full)
    assert (kept.result.state_details.deployment_concurrency_lease_id
            == holding.state.state_details.deployment_concurrency_lease_id)
    assert not events_of(kept, cl.ConcurrencyLimitSlotTaken)


# ---------------------------------------------------------------------------------------------
# A deployment's limit removed and set again: a new limit, which old leases are not of


def _taken_under(limit: cl.ConcurrencyLimit) -> fr.FlowRun:
    """A run that took a slot of `limit` (as it was then) and is RUNNING with it."""
    d = set_state(a_run(None, deployment=True), T.PENDING, sl.Limits(deployment_limit=limit))
    pending = events_of(d, fr.FlowRunStateSet)[0].run
    assert sl.deployment_lease(pending) is not None
    return events_of(set_state(pending, T.RUNNING, sl.Limits(deployment_limit=limit)), fr.FlowRunStateSet)[0].run


def test_a_lease_of_a_removed_limit_gives_back_nothing_of_the_limit_set_again() -> None:
    old = a_limit(1, 0)
    again = old.model_copy(update={"created": NOW, "updated": NOW, "active_slots": 1})  # same id, a new limit
    holder = _taken_under(old)
    current = _taken_under(again.model_copy(update={"active_slots": 0}))
    waiter = awaiting()
    limits = waiting_limits(again, [waiter], [waiter.id])
    done = set_state(holder, T.COMPLETED, limits)
    assert done.orchestration.status is Outcome.ACCEPT
    assert not events_of(done, cl.ConcurrencyLimitSlotReleased) and not events_of(done, cl.ConcurrencyLimitSlotTaken)
    assert [e.run.id for e in events_of(done, fr.FlowRunStateSet)] == [holder.id]  # nobody woken
    # A run of the limit as it is now gives its slot back, and wakes the waiter.
    freed = set_state(current, T.COMPLETED, limits)
    assert [e.limit.active_slots for e in events_of(freed, cl.ConcurrencyLimitSlotReleased)] == [0]
    assert waiter.id in [e.run.id for e in events_of(freed, fr.FlowRunStateSet)]
    # A lease minted before leases named their limit (a random one) still gives its slot back.
    legacy = set_state(a_run(None, T.RUNNING, deployment=True, lease=uuid.uuid4()), T.COMPLETED, limits)
    assert [e.limit.active_slots for e in events_of(legacy, cl.ConcurrencyLimitSlotReleased)] == [0]


def test_a_waiter_handed_a_slot_of_a_removed_limit_claims_one_of_the_limit_set_again() -> None:
    old = a_limit(1, 1)
    pool = a_pool()
    _, woken = _release_to_a_waiter(pool, 0, old)
    handed = woken.state.state_details.deployment_concurrency_lease_id
    again = old.model_copy(update={"created": NOW, "updated": NOW, "active_slots": 1})
    refused = set_state(woken, T.PENDING, sl.Limits(deployment_limit=again))
    assert refused.orchestration.status is Outcome.REJECT and refused.result.name == "AwaitingConcurrencySlot"
    assert not events_of(refused, cl.ConcurrencyLimitSlotReleased) and not events_of(refused, cl.ConcurrencyLimitSlotTaken)
    claimed = set_state(woken, T.PENDING, sl.Limits(deployment_limit=again.model_copy(update={"active_slots": 0})))
    assert claimed.orchestration.status is Outcome.ACCEPT
    lease = claimed.result.state_details.deployment_concurrency_lease_id
    assert lease not in (None, handed)
    assert [(e.lease_id, e.limit.active_slots) for e in events_of(claimed, cl.ConcurrencyLimitSlotTaken)] == [(lease, 1)]
    assert not events_of(claimed, cl.ConcurrencyLimitSlotReleased)


# ---------------------------------------------------------------------------------------------
# The clock marks late only runs still `Scheduled` 15 s past their time (FR-7)


def test_the_clock_marks_late_only_a_run_still_scheduled_15_seconds_past_its_time() -> None:
    def scheduled(at: datetime, name: str = "Scheduled") -> fr.FlowRun:
        run = a_run(None, deployment=True)
        state = run.state.model_copy(update={"name": name, "state_details": StateDetails(scheduled_time=at)})
        return run.model_copy(update={"state": state, "state_name": name, "next_scheduled_start_time": at})

    due = NOW - timedelta(seconds=15)
    marked = fr.decide_mark_late(fr.MarkFlowRunLate(id=uuid.uuid4()), scheduled(due), ctx(), sl.NO_LIMITS)
    assert marked.orchestration.status is Outcome.ACCEPT and marked.result.name == "Late"
    assert marked.result.state_details.scheduled_time == due
    not_late = [scheduled(NOW - timedelta(seconds=14)), scheduled(NOW + timedelta(minutes=5)),
                scheduled(EARLIER, "AwaitingRetry"), scheduled(EARLIER, "AwaitingConcurrencySlot"),
                scheduled(EARLIER, "Late")]
    for run in not_late:
        for limits in (sl.NO_LIMITS, deployment_limits(1, 1, "CANCEL_NEW")):
            d = fr.decide_mark_late(fr.MarkFlowRunLate(id=run.id), run, ctx(), limits)
            assert d.events == [] and d.result == run.state, (run.state_name, run.next_scheduled_start_time)
            assert d.orchestration.status is Outcome.REJECT
