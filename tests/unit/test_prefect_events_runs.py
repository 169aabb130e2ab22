"""The Prefect vocabulary of deployments and flow runs, pure: `prefect.deployment.*` with the
changed fields of an update, and `prefect.flow-run.<state name>` for each written state."""

from __future__ import annotations

import itertools
import json
import uuid
from datetime import UTC, datetime

from pydantic_core import to_jsonable_python

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


# ---------------------------------------------------------------------------------------------
# A flow run's state events as Prefect's InstrumentFlowRunStateTransitions emits them


def _wrap(*events_by_aggregate) -> list[EventEnvelope]:
    """Envelopes of (aggregate id, event), read back from JSON as stored."""
    out = []
    for aggregate_id, event in events_by_aggregate:
        envelope = EventEnvelope.wrap(aggregate_id, event, occurred=NOW, event_id=uuid.uuid4())
        out.append(EventEnvelope.model_validate_json(envelope.model_dump_json()))
    return out


def _placed_run_history():
    """A pool `etl` (type process) with queue `q`, a flow `f` (tag `team`), a deployment `d`
    (tag `prod`) on that queue, and a run of it (tag `x`) made by the deployment."""
    from runledger.commands import flows as fl
    from runledger.commands import work_pools as wp
    from runledger.commands.states import CreatedBy

    made_pool = wp.decide_create_work_pool(wp.CreateWorkPool(name="etl", type="process"), wp.WorkPoolNameClaim(), ctx())
    pool = wp.evolve(None, made_pool.events[-1].event)
    made_queue = wp.decide_create_work_queue(wp.CreateWorkQueue(work_pool_name="etl", name="q"), pool, ctx())
    pool = wp.evolve(pool, made_queue.events[-1].event)
    queue = made_queue.events[-1].event.queue
    flow = fl.decide_create_flow(fl.CreateFlow(name="f", tags=["team"]), uk.UniqueKeyClaim(), None, ctx())
    made = dp.decide_create_deployment(dp.CreateDeployment(name="d", flow_id=flow.result.id, tags=["prod"],
                                                           work_pool_name="etl", work_queue_name="q"),
                                       uk.UniqueKeyClaim(), None, True, dp.Placement(pool=pool), ctx())
    d = made.result
    created = fr.decide_create_flow_run(fr.CreateFlowRun(flow_id=flow.result.id, tags=["x", "prod"]), None, None,
                                        True, None, ctx())
    run = created.result.model_copy(update={
        "deployment_id": d.id, "work_queue_id": queue.id, "work_queue_name": "q",
        "created_by": CreatedBy(id=d.id, type="DEPLOYMENT", display_value="d")})
    setup = [(new.aggregate_id, new.event) for decision in (made_pool, made_queue, flow, made) for new in decision.events]
    return pool, queue, flow.result, d, run, setup


def test_a_flow_run_state_event_relates_what_prefect_relates_with_names_tags_and_creator():
    pool, queue, flow, d, run, setup = _placed_run_history()
    running = fr.decide_set_state(fr.SetFlowRunState(id=run.id, state=StateCreate(type="RUNNING")), run, ctx())
    after = running.after[str(run.id)]
    state = pe.ExportState()
    pe.export_log(_wrap(*setup), state)
    events, _ = pe.export_log(_wrap((str(run.id), fr.FlowRunCreated(run=run)),
                                    (str(run.id), fr.FlowRunStateSet(run=after))), state)
    assert [e["event"] for e in events] == ["prefect.flow-run.Pending", "prefect.flow-run.Running"]
    pending, last = events
    assert last["related"] == [
        {"prefect.resource.id": f"prefect.flow.{flow.id}", "prefect.resource.role": "flow",
         "prefect.resource.name": "f"},
        {"prefect.resource.id": f"prefect.deployment.{d.id}", "prefect.resource.role": "deployment",
         "prefect.resource.name": "d"},
        {"prefect.resource.id": f"prefect.work-queue.{queue.id}", "prefect.resource.role": "work-queue",
         "prefect.resource.name": "q"},
        {"prefect.resource.id": f"prefect.work-pool.{pool.id}", "prefect.resource.role": "work-pool",
         "prefect.resource.name": "etl", "prefect.work-pool.type": "process"},
        # the tags of the run, its flow and its deployment, once each, sorted
        *({"prefect.resource.id": f"prefect.tag.{t}", "prefect.resource.role": "tag"} for t in ("prod", "team", "x")),
        {"prefect.resource.id": f"prefect.deployment.{d.id}", "prefect.resource.role": "creator",
         "prefect.resource.name": "d"},
    ]
    # The event is the state's: its id, its time; it follows the previous state's event.
    assert (pending["id"], pending["follows"]) == (str(run.state.id), None)
    assert (last["id"], last["follows"]) == (str(after.state.id), str(run.state.id))
    assert last["occurred"] == to_jsonable_python(after.state.timestamp)
    assert last["resource"]["prefect.state-timestamp"] == after.state.timestamp.isoformat()
    assert last["resource"]["prefect.state-message"] == "" and last["resource"]["prefect.state-name"] == "Running"


def test_a_state_long_after_the_previous_one_follows_nothing_and_what_is_gone_is_not_related():
    from runledger.commands import work_pools as wp

    pool, queue, flow, d, run, setup = _placed_run_history()
    later = DecisionContext.fixed(datetime(2026, 3, 1, 12, 6, tzinfo=UTC),
                                  (uuid.UUID(int=next(_IDS)) for _ in itertools.count()))
    running = fr.decide_set_state(fr.SetFlowRunState(id=run.id, state=StateCreate(type="RUNNING")), run, later)
    gone_queue = wp.decide_delete_work_queue(wp.DeleteWorkQueue(work_pool_name="etl", work_queue_name="q"), pool, ctx())
    gone_deployment = dp.decide_delete_deployment(dp.DeleteDeployment(id=d.id), d, None, ctx())
    state = pe.ExportState()
    pe.export_log(_wrap(*setup, (str(run.id), fr.FlowRunCreated(run=run)),
                        *((new.aggregate_id, new.event) for new in gone_queue.events + gone_deployment.events)), state)
    [event], _ = pe.export_log(_wrap((str(run.id), fr.FlowRunStateSet(run=running.after[str(run.id)]))), state)
    assert event["follows"] is None  # six minutes after the Pending state
    # The deleted deployment and queue (and so the pool) are left out, as Prefect no longer
    # finds them; the creator is the run's own record.
    assert [(r["prefect.resource.role"], r["prefect.resource.id"].split(".")[-1]) for r in event["related"]] == [
        ("flow", str(flow.id)), ("tag", "prod"), ("tag", "team"), ("tag", "x"), ("creator", str(d.id))]


def test_without_the_history_a_run_relates_what_it_names_by_id():
    _, queue, flow, d, run, _ = _placed_run_history()
    [event], _ = pe.export_log(_wrap((str(run.id), fr.FlowRunCreated(run=run))))
    assert event["related"][:3] == [
        {"prefect.resource.id": f"prefect.flow.{flow.id}", "prefect.resource.role": "flow"},
        {"prefect.resource.id": f"prefect.deployment.{d.id}", "prefect.resource.role": "deployment"},
        {"prefect.resource.id": f"prefect.work-queue.{queue.id}", "prefect.resource.role": "work-queue",
         "prefect.resource.name": "q"},
    ]


def test_the_neighbours_of_a_run_and_of_a_deployment():
    from runledger.commands.deployment_polls import DEPLOYMENT_POLL

    _, queue, flow, d, run, setup = _placed_run_history()
    of_run = pe.neighbours(_wrap((str(run.id), fr.FlowRunCreated(run=run))))
    assert of_run.aggregates == {("flow", str(flow.id)), ("deployment", str(d.id))}
    assert of_run.queue_ids == {str(queue.id)} and of_run.aggregate_types == set()
    of_deployment = pe.neighbours(_wrap(*[(i, e) for i, e in setup if isinstance(e, dp.DeploymentCreated)]))
    assert of_deployment.aggregates == {("flow", str(flow.id))}
    assert of_deployment.queue_ids == {str(queue.id)} and of_deployment.aggregate_types == {DEPLOYMENT_POLL}


def test_the_deployment_events_relate_its_flow_queue_and_pool_by_name():
    pool, queue, flow, d, _, setup = _placed_run_history()
    events, _ = pe.export_log(_wrap(*setup))
    [created] = [e for e in events if e["event"] == "prefect.deployment.created"]
    assert created["related"] == [
        {"prefect.resource.id": f"prefect.flow.{flow.id}", "prefect.resource.name": "f",
         "prefect.resource.role": "flow"},
        {"prefect.resource.id": f"prefect.work-queue.{queue.id}", "prefect.resource.name": "q",
         "prefect.resource.role": "work-queue"},
        {"prefect.resource.id": f"prefect.work-pool.{pool.id}", "prefect.resource.name": "etl",
         "prefect.work-pool.type": "process", "prefect.resource.role": "work-pool"},
    ]
