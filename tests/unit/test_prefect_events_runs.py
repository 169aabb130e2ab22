"""The Prefect vocabulary of deployments and flow runs, pure: `prefect.deployment.*` with the
changed fields of an update, and `prefect.flow-run.<state name>` for each written state."""

from __future__ import annotations

import itertools
import json
import uuid
from datetime import UTC, datetime

from runledger.commands import deployments as dp
from runledger.commands import flow_runs as fr
from runledger.commands import prefect_events as pe
from runledger.commands import unique_keys as uk
from runledger.commands.events import EventEnvelope
from runledger.commands.messages import DecisionContext
from runledger.commands.states import StateCreate

NOW = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)
_IDS = itertools.count(1)


def ctx() -> DecisionContext:
    return DecisionContext.fixed(NOW, (uuid.UUID(int=next(_IDS)) for _ in itertools.count()))


def export(decisions, state: pe.ExportState) -> list[dict]:
    out = []
    for decision in decisions:
        for new in decision.events:
            envelope = EventEnvelope.wrap(new.aggregate_id, new.event, occurred=NOW, event_id=uuid.uuid4())
            read_back = EventEnvelope.model_validate_json(envelope.model_dump_json())
            out += pe.to_prefect_events(read_back, state)
    assert not state.skipped
    return out


def test_a_deployment_is_created_updated_with_its_changed_fields_and_deleted():
    state = pe.ExportState()
    made = dp.decide_create_deployment(dp.CreateDeployment(name="d", flow_id=uuid.UUID(int=5), version="1"),
                                       uk.UniqueKeyClaim(), None, True, dp.Placement(), ctx())
    d = made.result
    updated = dp.decide_update_deployment(dp.UpdateDeployment(id=d.id, version="2", job_variables={"a": 1}), d,
                                          dp.Placement(), ctx())
    paused = dp.decide_update_deployment(dp.UpdateDeployment(id=d.id, paused=True), updated.result,
                                         dp.Placement(), ctx())
    deleted = dp.decide_delete_deployment(dp.DeleteDeployment(id=d.id), paused.after[str(d.id)], None, ctx())
    events = export([made, updated, paused, deleted], state)
    assert [e["event"] for e in events] == ["prefect.deployment.created", "prefect.deployment.updated",
                                            "prefect.deployment.updated", "prefect.deployment.deleted"]
    assert events[0]["resource"] == {"prefect.resource.id": f"prefect.deployment.{d.id}", "prefect.resource.name": "d"}
    assert events[1]["payload"]["updated_fields"] == ["infra_overrides", "version"]
    assert events[1]["payload"]["updates"]["version"] == {"from": "1", "to": "2"}
    assert events[2]["payload"]["updates"] == {"paused": {"from": False, "to": True}}


def test_pause_and_resume_write_the_flag_without_an_event_as_in_prefect():
    state = pe.ExportState()
    made = dp.decide_create_deployment(dp.CreateDeployment(name="d", flow_id=uuid.UUID(int=5)),
                                       uk.UniqueKeyClaim(), None, True, dp.Placement(), ctx())
    paused = dp.decide_set_paused(made.result.id, True, made.result, ctx())
    resumed = dp.decide_set_paused(made.result.id, False, paused.after[str(made.result.id)], ctx())
    assert [e["event"] for e in export([made, paused, resumed], state)] == ["prefect.deployment.created"]


def test_a_deployment_limit_is_reported_by_its_id_and_only_when_it_appears_or_goes():
    state = pe.ExportState()
    made = dp.decide_create_deployment(dp.CreateDeployment(name="d", flow_id=uuid.UUID(int=5), concurrency_limit=1),
                                       uk.UniqueKeyClaim(), None, True, dp.Placement(), ctx())
    d = made.result
    raised = dp.decide_update_deployment(dp.UpdateDeployment(id=d.id, concurrency_limit=2), d, dp.Placement(), ctx())
    cleared = dp.decide_update_deployment(dp.UpdateDeployment(id=d.id, concurrency_limit=None),
                                          raised.after[str(d.id)], dp.Placement(), ctx())
    events = export([made, raised, cleared], state)
    assert [e["event"] for e in events] == ["prefect.deployment.created", "prefect.deployment.updated"]
    assert events[1]["payload"]["updates"] == {
        "concurrency_limit_id": {"from": str(dp.limit_id(d.id)), "to": None}}


def test_each_written_flow_run_state_is_an_event_named_by_the_state():
    state = pe.ExportState()
    created = fr.decide_create_flow_run(fr.CreateFlowRun(flow_id=uuid.UUID(int=5), tags=["x"]), None, None, True,
                                        None, ctx())
    run = created.result
    running = fr.decide_set_state(fr.SetFlowRunState(id=run.id, state=StateCreate(type="RUNNING")), run, ctx())
    refused = fr.decide_set_state(fr.SetFlowRunState(id=run.id, state=StateCreate(type="PENDING")),
                                  running.after[str(run.id)], ctx())
    assert refused.events == []  # nothing written, nothing exported
    events = export([created, running], state)
    assert [e["event"] for e in events] == ["prefect.flow-run.Pending", "prefect.flow-run.Running"]
    last = events[-1]
    assert last["resource"]["prefect.state-type"] == "RUNNING" and last["resource"]["prefect.run-count"] == "1"
    assert last["payload"]["intended"] == {"from": "PENDING", "to": "RUNNING"}
    assert {"prefect.resource.id": "prefect.tag.x", "prefect.resource.role": "tag"} in last["related"]
    json.dumps(events)  # what the CLI prints


def test_a_flow_is_created_and_deleted_with_its_name_tags_and_labels():
    from runledger.commands import flows as fl
    state = pe.ExportState()
    made = fl.decide_create_flow(fl.CreateFlow(name="etl", tags=["nightly"], labels={"team": "data"}),
                                 uk.UniqueKeyClaim(), None, ctx())
    flow = made.result
    gone = fl.decide_delete_flow(fl.DeleteFlow(id=flow.id), flow, uk.UniqueKeyClaim(owner_id=flow.id), ctx())
    events = export([made, gone], state)
    assert [e["event"] for e in events] == ["prefect.flow.created", "prefect.flow.deleted"]
    assert events[0]["resource"] == {"prefect.resource.id": f"prefect.flow.{flow.id}", "prefect.resource.name": "etl"}
    assert events[1]["payload"] == {"name": "etl", "tags": ["nightly"], "labels": {"team": "data"}}
