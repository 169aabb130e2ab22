"""Why a scheduled run waits when no claim was refused (`run_waits.why_waiting`), pure: each
reason, their order, the runs the poll offers whatever a limit, and the claim's words."""

from __future__ import annotations

import dataclasses
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from runledger.commands import concurrency_limits as cl
from runledger.commands import flow_runs as fr
from runledger.commands import orchestration_rules
from runledger.commands import slots as sl
from runledger.commands import work_pools as wp
from runledger.commands.decisions import Outcome
from runledger.commands.messages import DecisionContext
from runledger.commands.run_waits import DeploymentLimitFacts, QueueFacts, queue_gone, why_waiting
from runledger.commands.states import State, StateCreate, StateDetails, StateType

NOW = datetime(2026, 12, 1, 12, 0, tzinfo=UTC)
DUE = NOW - timedelta(minutes=5)

# A queue and pool nothing holds back: unpaused, unlimited, polled just now.
FREE = QueueFacts(pool_name="p", pool_paused=False, pool_limit=None, pool_slots_taken=0, queue_name="default",
                  queue_paused=False, queue_limit=None, queue_slots_taken=0, last_polled=NOW - timedelta(seconds=5))
ROOMY = DeploymentLimitFacts(limit=2, slots_taken=1, active=True, collision_strategy="ENQUEUE")
FULL_DEPLOYMENT = DeploymentLimitFacts(limit=1, slots_taken=1, active=True, collision_strategy="ENQUEUE")


def a_run(type_: StateType = StateType.SCHEDULED, name: str = "Late", *, due: datetime = DUE,
          lease: uuid.UUID | None = None, **fields: Any) -> fr.FlowRun:
    state = State(id=uuid.uuid4(), type=type_, name=name, timestamp=DUE,
                  state_details=StateDetails(scheduled_time=due, deployment_concurrency_lease_id=lease))
    return fr.FlowRun.model_validate({
        "id": uuid.uuid4(), "created": DUE, "updated": DUE, "name": "calm-otter", "flow_id": uuid.UUID(int=8),
        "work_queue_id": uuid.UUID(int=3), "deployment_id": uuid.UUID(int=9), "next_scheduled_start_time": due,
        "state": state, "state_id": state.id, "state_type": state.type, "state_name": state.name, **fields})


def facts(**changes: Any) -> QueueFacts:
    return dataclasses.replace(FREE, **changes)


def test_nothing_holds_back_a_due_run_of_a_polled_queue_with_room() -> None:
    assert why_waiting(a_run(), FREE, ROOMY, NOW) is None
    assert why_waiting(a_run(), FREE, None, NOW) is None  # no deployment limit


def test_a_run_in_no_queue_is_not_the_pool_polls_to_offer() -> None:
    """A runner's poll serves it (it consults no limit), or nothing does."""
    run = a_run(work_queue_id=None, due=NOW + timedelta(hours=1))
    assert why_waiting(run, None, FULL_DEPLOYMENT, NOW) is None
    assert why_waiting(run, facts(pool_paused=True), FULL_DEPLOYMENT, NOW) is None
    assert why_waiting(a_run(), None, FULL_DEPLOYMENT, NOW) is None  # its queue gone from the read model


@pytest.mark.parametrize("queue, deployment_limit, run, reason", [
    (facts(pool_paused=True), ROOMY, a_run(), "Work pool 'p' is paused."),
    (facts(queue_paused=True), ROOMY, a_run(), "Work queue 'default' of work pool 'p' is paused."),
    (facts(pool_limit=1, pool_slots_taken=1), ROOMY, a_run(),
     "Work pool 'p' is at its concurrency limit (1): 1 of 1 slot taken."),
    (facts(queue_limit=2, queue_slots_taken=3), ROOMY, a_run(),
     "Work queue 'default' of work pool 'p' is at its concurrency limit (2): 3 of 2 slots taken."),
    (FREE, FULL_DEPLOYMENT, a_run(),
     "Deployment concurrency limit reached. (1 of 1 slot taken; collision strategy ENQUEUE: the run waits for "
     "a slot.)"),
    (FREE, ROOMY, a_run(name="Scheduled", due=NOW + timedelta(hours=1)),
     f"Not due yet: scheduled for {(NOW + timedelta(hours=1)).isoformat()}."),
    (facts(last_polled=NOW - timedelta(seconds=61)), ROOMY, a_run(),
     f"No worker has polled work queue 'default' of work pool 'p' in the last 60 seconds "
     f"(last polled {(NOW - timedelta(seconds=61)).isoformat()})."),
    (facts(last_polled=None), None, a_run(name="AwaitingConcurrencySlot"),
     "No worker has polled work queue 'default' of work pool 'p' in the last 60 seconds (never polled)."),
])
def test_each_reason(queue: QueueFacts, deployment_limit: DeploymentLimitFacts | None, run: fr.FlowRun,
                     reason: str) -> None:
    assert why_waiting(run, queue, deployment_limit, NOW) == reason


def test_the_broadest_reason_comes_first() -> None:
    """Each reason in turn, with every later one also true: the earlier one is given (a full
    queue before a full pool, as the claim checks them)."""
    not_due = a_run(due=NOW + timedelta(hours=1))
    everything = facts(pool_paused=True, queue_paused=True, pool_limit=1, pool_slots_taken=1, queue_limit=1,
                       queue_slots_taken=1, last_polled=None)
    steps = [("Work pool 'p' is paused.", {"pool_paused": False}),
             ("Work queue 'default' of work pool 'p' is paused.", {"queue_paused": False}),
             ("Work queue 'default' of work pool 'p' is at its concurrency limit", {"queue_limit": None}),
             ("Work pool 'p' is at its concurrency limit", {"pool_limit": None})]
    for expected, lifted in steps:
        assert why_waiting(not_due, everything, FULL_DEPLOYMENT, NOW).startswith(expected)  # type: ignore[union-attr]
        everything = dataclasses.replace(everything, **lifted)
    assert why_waiting(not_due, everything, FULL_DEPLOYMENT, NOW).startswith("Deployment concurrency limit")  # type: ignore[union-attr]
    assert why_waiting(not_due, everything, None, NOW).startswith("Not due yet")  # type: ignore[union-attr]
    assert why_waiting(a_run(), everything, None, NOW).startswith("No worker has polled")  # type: ignore[union-attr]


def test_a_limit_that_has_room_or_none_holds_nothing_back() -> None:
    assert why_waiting(a_run(), facts(pool_limit=2, pool_slots_taken=1, queue_limit=2, queue_slots_taken=1),
                       dataclasses.replace(FULL_DEPLOYMENT, active=False), NOW) is None


def test_runs_the_poll_offers_whatever_a_limit_are_not_said_to_wait_for_it() -> None:
    full_pool = facts(pool_limit=1, pool_slots_taken=1, queue_limit=1, queue_slots_taken=1)
    assert why_waiting(a_run(pool_slot_reserved=True), full_pool, None, NOW) is None  # handed its slot
    assert why_waiting(a_run(lease=uuid.uuid4()), FREE, FULL_DEPLOYMENT, NOW) is None  # handed its deployment slot
    # A CANCEL_NEW deployment's runs are offered, so that their claim cancels them.
    assert why_waiting(a_run(), FREE, dataclasses.replace(FULL_DEPLOYMENT, collision_strategy="CANCEL_NEW"),
                       NOW) is None
    # A handed run of a paused pool is still left out of the poll.
    assert why_waiting(a_run(pool_slot_reserved=True), facts(pool_paused=True), None, NOW) == "Work pool 'p' is paused."


@pytest.mark.parametrize("type_", [t for t in StateType if t is not StateType.SCHEDULED])
def test_only_scheduled_runs_wait_for_a_worker(type_: StateType) -> None:
    assert why_waiting(a_run(type_, type_.value.title()), facts(pool_paused=True), FULL_DEPLOYMENT, NOW) is None


def test_a_run_retried_in_its_own_process_waits_for_no_worker() -> None:
    run = a_run(name="AwaitingRetry", empirical_policy=fr.FlowRunPolicy(retry_type="in_process"))
    assert why_waiting(run, facts(pool_paused=True), FULL_DEPLOYMENT, NOW) is None


def test_the_words_are_the_claims() -> None:
    """A refused claim's stored reason and the computed one read alike (one vocabulary)."""
    ctx = DecisionContext.fixed(NOW, iter(uuid.UUID(int=i) for i in range(600_000, 600_100)))
    pool = wp.decide_create_work_pool(wp.CreateWorkPool(name="p", concurrency_limit=1), wp.WorkPoolNameClaim(),
                                      ctx).result
    queue = pool.queues[pool.default_queue_id]
    run = a_run(work_queue_id=queue.id)
    claim = fr.SetFlowRunState(id=run.id, state=StateCreate(type=StateType.PENDING))
    # The pool full (its queue unlimited), then the queue full (the claim looks at it first).
    for queue_limit, pool_limit in [(None, 1), (1, None)]:
        pool = dataclasses.replace(pool, queues={queue.id: dataclasses.replace(queue, concurrency_limit=queue_limit)})
        slots = sl.PoolSlots(pool_id=pool.id, by_queue={queue.id: 1})
        refused = fr.decide_set_state(claim, run, ctx, sl.Limits(pool=pool, slots=slots)).orchestration
        computed = why_waiting(run, facts(pool_limit=pool_limit, pool_slots_taken=1, queue_limit=queue_limit,
                                          queue_slots_taken=1), None, NOW)
        assert refused.status is Outcome.REJECT and refused.reason is not None and computed is not None
        assert computed.startswith(refused.reason.removesuffix("."))
    limit = cl.ConcurrencyLimit(id=uuid.UUID(int=77), created=DUE, updated=DUE, name="deployment:x", limit=1,
                                active_slots=1)
    refused = fr.decide_set_state(claim, a_run(), ctx, sl.Limits(deployment_limit=limit)).orchestration
    assert refused.reason == orchestration_rules.DEPLOYMENT_LIMIT_REACHED
    assert why_waiting(a_run(), FREE, FULL_DEPLOYMENT, NOW).startswith(refused.reason)  # type: ignore[union-attr]


def test_a_run_whose_queue_is_gone_is_said_to_wait_for_ever():
    """A pool deleted with its runs' queue: no poll offers them again."""
    assert queue_gone(a_run(work_queue_name="nightly")) == (
        "Its work queue 'nightly' no longer exists (it, or its work pool, was deleted): no worker's poll will offer "
        "this run; cancel or delete it, or make its runs anew in a queue that exists.")
    assert "Its work queue no longer exists" in (queue_gone(a_run()) or "")
    assert queue_gone(a_run(StateType.RUNNING, "Running")) is None  # not waiting
