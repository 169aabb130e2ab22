"""A deployment slot's lease renewed by the process running its flow run, pure: the renewal,
the slot given back once a renewed lease runs out (in PENDING, RUNNING or CANCELLING), and
a lease never renewed kept as before (Prefect issue #17415)."""

from __future__ import annotations

import dataclasses
import uuid
from datetime import timedelta
from typing import Any

import pytest

from runledger.commands import concurrency_limits as cl
from runledger.commands import flow_runs as fr
from runledger.commands import slots as sl
from runledger.commands.messages import DecisionContext, ErrorCode, Rejection
from runledger.commands.states import StateType
from tests.unit.test_slots import (
    NOW,
    _ids,
    a_limit,
    a_run,
    awaiting,
    deployment_limits,
    events_of,
    set_state,
    waiting_limits,
)

T = StateType


def at(moment: Any) -> DecisionContext:
    return DecisionContext.fixed(moment, _ids)


def renew(run: fr.FlowRun, seconds: float = 60, lease: uuid.UUID | None = None, moment: Any = NOW) -> Any:
    cmd = fr.RenewDeploymentSlotLease(id=run.id, lease_id=lease, lease_seconds=seconds)
    return fr.decide_renew_deployment_slot_lease(cmd, run, at(moment))


def expire(run: fr.FlowRun, limits: sl.Limits, moment: Any) -> Any:
    cmd = fr.ExpireDeploymentSlotLease(id=run.id, lease_id=run.state.state_details.deployment_concurrency_lease_id)
    return fr.decide_expire_deployment_slot_lease(cmd, run, at(moment), limits)


def renewed(run: fr.FlowRun, seconds: float = 60, moment: Any = NOW) -> fr.FlowRun:
    (event,) = events_of(renew(run, seconds, moment=moment), fr.FlowRunDeploymentLeaseRenewed)
    return event.run


def test_a_renewal_moves_the_leases_end_and_only_the_first_is_kept_in_the_log() -> None:
    lease = uuid.uuid4()
    run = a_run(None, T.RUNNING, deployment=True, lease=lease)
    d = renew(run, 90)
    (first,) = events_of(d, fr.FlowRunDeploymentLeaseRenewed)
    assert first.run.deployment_lease_expiration == NOW + timedelta(seconds=90)
    assert first.lease_id == lease and first.run.state == run.state and first.run.updated == run.updated
    assert not first.routine and first.expires_no_sooner_than() is None  # it makes the lease run out at all
    again = renew(first.run, 90, moment=NOW + timedelta(seconds=60))
    (second,) = events_of(again, fr.FlowRunDeploymentLeaseRenewed)
    assert second.run.deployment_lease_expiration == NOW + timedelta(seconds=150)
    # Routine: it may leave the log, but not before the lease it renewed would have run out.
    assert second.routine and second.expires_no_sooner_than() >= 90
    # By its id too.
    assert events_of(renew(run, lease=lease), fr.FlowRunDeploymentLeaseRenewed)


@pytest.mark.parametrize("case", ["no lease", "another lease", "ended", "expired", "waiting"])
def test_a_lease_the_run_does_not_hold_is_not_found_and_nothing_is_written(case: str) -> None:
    lease = uuid.uuid4()
    run = a_run(None, T.RUNNING, deployment=True, lease=lease)
    asked = None
    if case == "no lease":
        run = a_run(None, T.RUNNING, deployment=True)
    elif case == "another lease":
        asked = uuid.uuid4()
    elif case == "ended":
        run = set_state(run, T.COMPLETED, deployment_limits(1, 1)).after[str(run.id)]
    elif case == "expired":
        limits = deployment_limits(1, 1)
        run = events_of(expire(renewed(run), limits, NOW + timedelta(seconds=61)),
                        fr.FlowRunDeploymentLeaseExpired)[0].run
    elif case == "waiting":
        run = awaiting()
    with pytest.raises(Rejection) as refused:
        renew(run, lease=asked)
    assert refused.value.code is ErrorCode.NOT_FOUND
    assert refused.value.message == "Lease not found - it may have expired or been revoked"


def test_a_missing_run_is_not_found() -> None:
    with pytest.raises(Rejection) as refused:
        fr.decide_renew_deployment_slot_lease(fr.RenewDeploymentSlotLease(id=uuid.uuid4()), None, at(NOW))
    assert refused.value.code is ErrorCode.NOT_FOUND and "Flow run" in refused.value.message


def test_a_renewed_lease_that_runs_out_while_running_gives_the_slot_to_the_next_waiter() -> None:
    limit = a_limit(1, 1)
    waiter = awaiting()
    run = renewed(a_run(None, T.RUNNING, deployment=True, lease=uuid.uuid4()), 60)
    limits = waiting_limits(limit, [waiter], [waiter.id])
    assert expire(run, limits, NOW + timedelta(seconds=59)).events == []  # time left
    d = expire(run, limits, NOW + timedelta(seconds=60))
    (expired,) = events_of(d, fr.FlowRunDeploymentLeaseExpired)
    assert expired.run.state == run.state and expired.run.state_type is T.RUNNING  # it runs on, without the slot
    assert expired.run.deployment_lease_expired and expired.run.deployment_lease_expiration is None
    (released,) = events_of(d, cl.ConcurrencyLimitSlotReleased)
    assert released.limit.active_slots == 0
    (woken,) = [e.run for e in events_of(d, fr.FlowRunStateSet)]
    assert woken.id == waiter.id
    # Its end gives nothing back a second time.
    done = set_state(expired.run, T.COMPLETED, deployment_limits(1, 0))
    assert not events_of(done, cl.ConcurrencyLimitSlotReleased)


def test_a_lease_never_renewed_is_kept_while_running_and_a_renewed_one_only_until_it_runs_out() -> None:
    running = a_run(None, T.RUNNING, deployment=True, lease=uuid.uuid4())  # RUNNING for an hour
    limits = dataclasses.replace(deployment_limits(1, 1), lease_seconds=60)
    assert expire(running, limits, NOW + timedelta(days=1)).events == []
    # A PENDING run renewed: the renewal's end counts, not its PENDING state's age.
    pending = a_run(None, T.PENDING, deployment=True, lease=uuid.uuid4())  # PENDING for an hour
    kept = renewed(pending, 600)
    assert expire(kept, limits, NOW + timedelta(seconds=599)).events == []
    assert events_of(expire(kept, limits, NOW + timedelta(seconds=600)), fr.FlowRunDeploymentLeaseExpired)


def test_the_renewed_end_is_carried_while_the_run_holds_that_lease() -> None:
    run = renewed(a_run(None, T.PENDING, deployment=True, lease=uuid.uuid4()), 120)
    started = set_state(run, T.RUNNING, deployment_limits(1, 1)).after[str(run.id)]
    assert started.deployment_lease_expiration == NOW + timedelta(seconds=120)
    cancelling = set_state(started, T.CANCELLING, deployment_limits(1, 1)).after[str(run.id)]
    assert cancelling.deployment_lease_expiration == NOW + timedelta(seconds=120)
    done = set_state(cancelling, T.CANCELLED, deployment_limits(1, 1)).after[str(run.id)]
    assert done.deployment_lease_expiration is None


def test_the_lease_duration_is_bounded() -> None:
    for bad in (0, -1, 86_401, float("inf")):
        with pytest.raises(ValueError):
            fr.RenewDeploymentSlotLease(id=uuid.uuid4(), lease_seconds=bad)


def test_a_renewed_lease_runs_out_even_when_its_limit_is_gone() -> None:
    """Its last renewal leaves the log after a while: the run's state must not rest on it."""
    run = renewed(a_run(None, T.RUNNING, deployment=True, lease=uuid.uuid4()), 60)
    d = expire(run, sl.Limits(lease_seconds=60), NOW + timedelta(seconds=60))
    (expired,) = events_of(d, fr.FlowRunDeploymentLeaseExpired)
    assert expired.run.deployment_lease_expiration is None and [type(e.event) for e in d.events] == [
        fr.FlowRunDeploymentLeaseExpired]  # nothing to give back
    # Never renewed, nothing to do without a limit, as before.
    plain = a_run(None, T.PENDING, deployment=True, lease=uuid.uuid4())
    assert expire(plain, sl.Limits(lease_seconds=60), NOW + timedelta(days=1)).events == []
