"""The flow-run create decider, pure: the idempotency key a schedule gave its run holds that
run within its flow (no claim is written for it), and a new run's labels start from its flow's
or its deployment's, with the system ones, as Prefect's."""

from __future__ import annotations

import itertools
import uuid
from datetime import UTC, datetime, timedelta, timezone

import pytest

from runledger.commands import deployment_runs as sc
from runledger.commands import deployments as dp
from runledger.commands import flow_runs as fr
from runledger.commands.messages import DecisionContext
from runledger.commands.schedules import scheduled_idempotency_key, scheduled_run_id
from runledger.commands.unique_keys import UniqueKeyClaim

NOW = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)
FLOW_ID = uuid.UUID(int=5)
_IDS = itertools.count(1000)


def ctx() -> DecisionContext:
    return DecisionContext.fixed(NOW, (uuid.UUID(int=next(_IDS)) for _ in itertools.count()))


@pytest.mark.parametrize(("date", "zone"), [
    (NOW, None),
    (NOW + timedelta(microseconds=123456), "America/New_York"),
    (datetime(2026, 10, 25, 1, 30, tzinfo=UTC), "Europe/Berlin"),  # the hour that repeats there
    (datetime(2026, 3, 1, 9, 0, tzinfo=timezone(timedelta(hours=5, minutes=30))), "Asia/Kolkata"),
])
def test_a_scheduled_key_names_the_id_of_the_run_its_schedule_made(date, zone):
    deployment_id, schedule_id = uuid.uuid4(), uuid.uuid4()
    key = scheduled_idempotency_key(deployment_id, schedule_id, date, zone)
    assert fr.scheduled_run_of_key(key) == scheduled_run_id(deployment_id, schedule_id, date)


@pytest.mark.parametrize("key", [
    "k1", "scheduled", "scheduled x y 2026-03-01 12:00:00+00:00",
    f"scheduled {uuid.UUID(int=1)} {uuid.UUID(int=2)} yesterday",
    f"scheduled {uuid.UUID(int=1)} {uuid.UUID(int=2)} 2026-03-01 12:00:00",  # no zone: not a schedule's
    f"Scheduled {uuid.UUID(int=1)} {uuid.UUID(int=2)} 2026-03-01 12:00:00+00:00",
])
def test_any_other_key_names_no_scheduled_run(key):
    assert fr.scheduled_run_of_key(key) is None


def _deployment(**fields) -> dp.Deployment:
    return dp.Deployment.model_validate({"id": uuid.UUID(int=20), "created": NOW, "updated": NOW, "name": "d",
                                         "flow_id": FLOW_ID, **fields})


def _scheduled_run() -> fr.FlowRun:
    deployment = _deployment(schedules=[{"id": uuid.UUID(int=21), "created": NOW, "updated": NOW,
                                         "deployment_id": uuid.UUID(int=20), "schedule": {"interval": 3600}}])
    schedule = deployment.schedules[0]
    planned = sc.PlannedRun(scheduled_run_id(deployment.id, schedule.id, NOW), schedule, NOW)
    return sc.scheduled_run(deployment, planned, ctx())


def test_a_scheduled_run_holds_its_key_within_its_flow_only():
    run = _scheduled_run()
    assert run.idempotency_key is not None and fr.scheduled_run_of_key(run.idempotency_key) == run.id
    free = UniqueKeyClaim()
    held = fr.claim_of_scheduled_run(free, run, FLOW_ID, run.idempotency_key)
    assert held == UniqueKeyClaim(run.id)
    assert fr.claim_of_scheduled_run(free, run, uuid.UUID(int=6), run.idempotency_key) is free
    assert fr.claim_of_scheduled_run(free, None, FLOW_ID, run.idempotency_key) is free
    other_spelling = run.idempotency_key.replace("+00:00", "Z")
    assert fr.claim_of_scheduled_run(free, run, FLOW_ID, other_spelling) is free
    written = UniqueKeyClaim(uuid.UUID(int=7))
    assert fr.claim_of_scheduled_run(written, run, FLOW_ID, run.idempotency_key) is written

    again = fr.decide_create_flow_run(fr.CreateFlowRun(flow_id=FLOW_ID, idempotency_key=run.idempotency_key),
                                      held, run, True, None, ctx(), {})
    assert again.created is False and again.result is run and again.events == []


def test_a_new_run_lays_its_own_labels_over_its_flows_and_the_system_ones():
    inherited = fr.inherited_labels(FLOW_ID, {"team": "a", "tier": "1"}, None)
    assert inherited == {"team": "a", "tier": "1", "prefect.flow.id": str(FLOW_ID)}
    made = fr.decide_create_flow_run(fr.CreateFlowRun(flow_id=FLOW_ID, labels={"tier": "2", "prefect.flow.id": "x"}),
                                     None, None, True, None, ctx(), inherited)
    assert made.result.labels == {"team": "a", "tier": "2", "prefect.flow.id": "x"}
    assert made.events[-1].event.run.labels == made.result.labels


def test_a_run_naming_a_deployment_starts_from_the_deployments_labels():
    deployment = _deployment(labels={"dep": "x", "prefect.flow.id": str(FLOW_ID)})
    inherited = fr.inherited_labels(uuid.UUID(int=99), {"team": "a"}, deployment)
    assert inherited == {**deployment.labels, "prefect.flow.id": str(FLOW_ID),
                         "prefect.deployment.id": str(deployment.id)}
    assert "team" not in inherited
