"""Deployments and flow runs in the client and the `deployment` / `flow-run` verbs, against the
fake service: what each call sends (the bodies are also checked against the service's own
command and query schemas, parsed as the service parses them), how replies are read (the
orchestration outcome beside a state, per-item bulk results, `created`), and the CLI's
output, escaping and exit codes."""

from __future__ import annotations

import json
import re
import uuid
from datetime import UTC, datetime, timedelta

import pytest
from typer.testing import CliRunner

from runledger.cli.main import _register, app
from runledger.client import (
    Deployment,
    DeploymentPage,
    DeploymentSchedule,
    FlowRun,
    FlowRunCreateResult,
    Invalid,
    NotFound,
    OrchestrationResult,
    ProtocolError,
    RunledgerClient,
    State,
)
from runledger.client.runledger_client import BUS_KEY_FIELDS, bus_key_field
from runledger.commands import deployment_runs as sc
from runledger.commands import deployments as dp
from runledger.commands import flow_runs as fr
from runledger.commands import flows as fl
from runledger.commands import queries as q
from runledger.projections.health import GetServiceHealth

from .fake_service import (
    SILENT,
    sample_deployment,
    sample_flow,
    sample_flow_run,
    sample_flow_run_model,
    set_state_reply,
)

_register()

HOSTILE = ["\x1b]0;pwned\x07", "[red]x[/red]", "tab\there\u202eevil"]

# What the service parses each request with: a body the client sends must pass it.
SCHEMAS = {
    "CreateDeployment": dp.CreateDeployment, "UpdateDeployment": dp.UpdateDeployment,
    "DeleteDeployment": dp.DeleteDeployment, "PauseDeployment": dp.PauseDeployment,
    "ResumeDeployment": dp.ResumeDeployment, "CreateDeploymentSchedules": dp.CreateDeploymentSchedules,
    "UpdateDeploymentSchedule": dp.UpdateDeploymentSchedule, "DeleteDeploymentSchedule": dp.DeleteDeploymentSchedule,
    "ScheduleDeploymentRuns": sc.ScheduleDeploymentRuns, "CreateFlowRunFromDeployment": sc.CreateFlowRunFromDeployment,
    "CreateFlowRunsFromDeployment": sc.CreateFlowRunsFromDeployment,
    "CreateFlowRun": fr.CreateFlowRun, "SetFlowRunState": fr.SetFlowRunState, "UpdateFlowRun": fr.UpdateFlowRun,
    "DeleteFlowRun": fr.DeleteFlowRun,
    "GetDeployment": q.GetDeployment, "GetDeploymentByName": q.GetDeploymentByName,
    "ListDeployments": q.ListDeployments, "CountDeployments": q.CountDeployments,
    "PaginateDeployments": q.PaginateDeployments, "ListDeploymentSchedules": q.ListDeploymentSchedules,
    "GetFlowRun": q.GetFlowRun, "ListFlowRuns": q.ListFlowRuns, "CountFlowRuns": q.CountFlowRuns,
    "ListFlowRunStates": q.ListFlowRunStates, "GetServiceHealth": GetServiceHealth,
    "CreateFlow": fl.CreateFlow, "ListFlows": q.ListFlows,
}

FLOW = sample_flow("etl")
LATER = datetime(2030, 1, 1, tzinfo=UTC)


def _assert_valid_requests(fake) -> None:
    ours = [(name, body) for name, body in fake.requests if name in SCHEMAS]
    assert ours
    for name, body in ours:
        SCHEMAS[name].model_validate_json(json.dumps(body), strict=True)  # as the service parses it


@pytest.fixture
async def rl(fake, client_settings):
    async with RunledgerClient(client_settings) as client:
        yield client


@pytest.fixture
def cli(fake, nats_url, namespace, tmp_path):
    env = {"RUNLEDGER_NATS_URL": nats_url, "RUNLEDGER_NAMESPACE": namespace,
           "RUNLEDGER_CONFIG_DIR": str(tmp_path), "RUNLEDGER_REQUEST_TIMEOUT": "2", "COLUMNS": "200"}
    runner = CliRunner()
    fake.ok("GetServiceHealth", {"stream_last_seq": 40, "projections": [], "stalled": []})
    return lambda *args, **extra: runner.invoke(app, list(args), env={**env, **extra})


# ---------------------------------------------------------------------------------------------
# The client: deployments

async def test_create_deployment_is_an_upsert_that_says_whether_it_created(rl, fake):
    raw = sample_deployment("nightly", tags=["a"], parameters={"x": 1},
                            schedules=[{"schedule": {"cron": "0 2 * * *", "timezone": "Europe/Berlin"}, "slug": "s"}])
    fake.ok("CreateDeployment", raw, seq=3, created=True)
    made, created = await rl.create_deployment(
        FLOW["id"], "nightly", tags=["a"], parameters={"x": 1}, work_pool_name="pool", work_queue_name="gpu",
        schedules=[{"schedule": {"cron": "0 2 * * *", "timezone": "Europe/Berlin"}, "slug": "s"}],
        concurrency_limit=2, description=None, paused=False, enforce_parameter_schema=True, idempotency_key="k1")
    assert created is True and isinstance(made, Deployment)
    assert made.model_dump(mode="json") == raw  # the service's JSON, `Z` datetimes included
    (schedule,) = made.schedules
    assert isinstance(schedule, DeploymentSchedule) and schedule.schedule["cron"] == "0 2 * * *"
    assert (made.name, made.tags, made.parameters, made.paused) == ("nightly", ["a"], {"x": 1}, False)
    fake.ok("CreateDeployment", raw, seq=4, created=False)
    assert (await rl.create_deployment(uuid.UUID(FLOW["id"]), "nightly"))[1] is False
    assert fake.bodies("CreateDeployment") == [
        {"name": "nightly", "flow_id": FLOW["id"], "description": None, "paused": False,
         "schedules": [{"schedule": {"cron": "0 2 * * *", "timezone": "Europe/Berlin"}, "slug": "s"}],
         "concurrency_limit": 2, "parameters": {"x": 1}, "enforce_parameter_schema": True, "tags": ["a"],
         "work_pool_name": "pool", "work_queue_name": "gpu", "idempotency_key": "k1"},
        {"name": "nightly", "flow_id": FLOW["id"]}]
    fake.ok("CreateDeployment", raw, seq=5)  # no `created`
    with pytest.raises(ProtocolError, match="does not say whether it created"):
        await rl.create_deployment(FLOW["id"], "nightly")
    _assert_valid_requests(fake)


async def test_update_pause_resume_and_delete_a_deployment(rl, fake):
    raw = sample_deployment("nightly")
    fake.ok("UpdateDeployment", {**raw, "version": "2"}, seq=6)
    updated = await rl.update_deployment(raw["id"], version="2", schedules=[{"slug": "s", "active": False}],
                                         work_pool_name=None, job_variables={"cpu": 2})
    assert updated.version == "2"
    for name in ("PauseDeployment", "ResumeDeployment", "DeleteDeployment"):
        fake.ok(name, None, seq=7)
    assert await rl.pause_deployment(raw["id"], idempotency_key="kp") is None
    assert await rl.resume_deployment(uuid.UUID(raw["id"])) is None
    assert await rl.delete_deployment(raw["id"]) is None
    assert fake.bodies("UpdateDeployment") == [{"id": raw["id"], "version": "2", "schedules": [
        {"slug": "s", "active": False}], "job_variables": {"cpu": 2}, "work_pool_name": None}]
    assert fake.bodies("PauseDeployment") == [{"id": raw["id"], "idempotency_key": "kp"}]
    assert fake.bodies("ResumeDeployment") == fake.bodies("DeleteDeployment") == [{"id": raw["id"]}]
    assert rl.last_seq == 7
    _assert_valid_requests(fake)


async def test_deployments_are_read_by_id_and_by_flow_slash_name(rl, fake):
    raw = {**sample_deployment("nightly"), "future_field": 1}  # unknown fields are kept
    fake.ok("GetDeployment", raw)
    fake.ok("GetDeploymentByName", raw)
    by_id = await rl.read_deployment(raw["id"], min_seq=3)
    assert by_id == await rl.read_deployment_by_name("etl/nightly") and by_id.model_extra == {"future_field": 1}
    await rl.read_deployment_by_name("etl/")  # an empty deployment name is a name
    assert fake.bodies("GetDeployment") == [{"id": raw["id"], "min_seq": 3}]
    assert fake.bodies("GetDeploymentByName") == [{"flow_name": "etl", "deployment_name": "nightly"},
                                                  {"flow_name": "etl", "deployment_name": ""}]
    with pytest.raises(Invalid, match="is not <flow name>/<deployment name>"):
        await rl.read_deployment_by_name("nightly")
    fake.error("GetDeployment", "not_found", "Deployment not found.")
    with pytest.raises(NotFound):
        await rl.read_deployment(uuid.uuid4())
    fake.ok("GetDeployment", {"name": "x"})
    with pytest.raises(ProtocolError, match="not a Deployment"):
        await rl.read_deployment(uuid.uuid4())
    _assert_valid_requests(fake)


async def test_deployments_are_listed_counted_and_paginated_with_their_filters(rl, fake):
    raws = [sample_deployment("a"), sample_deployment("b", flow_name="other")]
    fake.ok("ListDeployments", raws)
    fake.ok("CountDeployments", 2)
    fake.ok("PaginateDeployments", {"results": raws, "count": 5, "limit": 2, "page": 1, "pages": 3})
    queue_id = uuid.uuid4()
    listed = await rl.list_deployments(ids=[raws[0]["id"]], names=["a"], flow_ids=[FLOW["id"]], flow_names=["etl"],
                                       work_pool_names=["pool"], work_queue_names=["q"], work_queue_ids=[queue_id],
                                       tags=["t"], paused=False, limit=2, offset=0)
    assert [d.name for d in listed] == ["a", "b"] and all(isinstance(d, Deployment) for d in listed)
    assert await rl.read_deployments() == listed  # Prefect's name
    assert await rl.count_deployments(flow_names=["etl"], paused=True) == 2
    page = await rl.paginate_deployments(page=1, limit=2, tags=["t"])
    assert isinstance(page, DeploymentPage) and (page.count, page.pages, len(page.results)) == (5, 3, 2)
    assert fake.bodies("ListDeployments") == [
        {"limit": 2, "offset": 0,
         "deployments": {"id": {"any_": [raws[0]["id"]]}, "name": {"any_": ["a"]}, "tags": {"all_": ["t"]},
                         "flow_id": {"any_": [FLOW["id"]]}, "work_queue_id": {"any_": [str(queue_id)]},
                         "paused": False},
         "flow_name": {"any_": ["etl"]}, "work_pool_name": {"any_": ["pool"]}, "work_queue_name": {"any_": ["q"]}},
        {}]
    assert fake.bodies("CountDeployments") == [{"deployments": {"paused": True}, "flow_name": {"any_": ["etl"]}}]
    assert fake.bodies("PaginateDeployments") == [{"page": 1, "limit": 2, "deployments": {"tags": {"all_": ["t"]}}}]
    _assert_valid_requests(fake)


async def test_deployment_schedules_are_created_updated_deleted_and_read(rl, fake):
    raw = sample_deployment("nightly", schedules=[{"schedule": {"interval": 600}, "max_scheduled_runs": 7}])
    schedules = raw["schedules"]
    fake.ok("CreateDeploymentSchedules", schedules, seq=2, created=True)
    fake.ok("ListDeploymentSchedules", schedules)
    fake.ok("UpdateDeploymentSchedule", None, seq=3)
    fake.ok("DeleteDeploymentSchedule", None, seq=4)
    made = await rl.create_deployment_schedules(raw["id"], [{"schedule": {"interval": 600}, "max_scheduled_runs": 7}])
    assert [s.model_dump(mode="json") for s in made] == schedules
    assert made[0].schedule == {"interval": 600.0, "anchor_date": "2025-01-02T03:04:05.123456Z", "timezone": "UTC"}
    assert await rl.read_deployment_schedules(raw["id"]) == made
    sid = made[0].id
    assert await rl.update_deployment_schedule(raw["id"], sid, active=False, schedule={"cron": "* * * * *"},
                                               max_scheduled_runs=None, slug="s") is None
    assert await rl.delete_deployment_schedule(raw["id"], sid, idempotency_key="kd") is None
    assert fake.bodies("CreateDeploymentSchedules") == [
        {"deployment_id": raw["id"], "schedules": [{"schedule": {"interval": 600}, "max_scheduled_runs": 7}]}]
    assert fake.bodies("UpdateDeploymentSchedule") == [
        {"deployment_id": raw["id"], "schedule_id": str(sid), "schedule": {"cron": "* * * * *"}, "active": False,
         "max_scheduled_runs": None, "slug": "s"}]
    assert fake.bodies("DeleteDeploymentSchedule") == [
        {"deployment_id": raw["id"], "schedule_id": str(sid), "idempotency_key": "kd"}]
    assert fake.bodies("ListDeploymentSchedules") == [{"deployment_id": raw["id"], "min_seq": 2}]
    _assert_valid_requests(fake)


async def test_schedule_deployment_runs_returns_the_ids_made(rl, fake):
    ids = [str(uuid.uuid4()) for _ in range(3)]
    fake.ok("ScheduleDeploymentRuns", {"flow_run_ids": ids}, seq=9, created=None)
    deployment_id = uuid.uuid4()
    start = datetime(2025, 1, 1, tzinfo=UTC)
    made = await rl.schedule_deployment_runs(deployment_id, start_time=start, end_time=start + timedelta(days=3),
                                             min_time=60.0, min_runs=1, max_runs=10)
    assert made == [uuid.UUID(i) for i in ids]
    assert await rl.schedule_deployment_runs(deployment_id) == made
    assert fake.bodies("ScheduleDeploymentRuns") == [
        {"deployment_id": str(deployment_id), "start_time": "2025-01-01T00:00:00+00:00",
         "end_time": "2025-01-04T00:00:00+00:00", "min_time": 60.0, "min_runs": 1, "max_runs": 10},
        {"deployment_id": str(deployment_id)}]
    fake.ok("ScheduleDeploymentRuns", ids)
    with pytest.raises(ProtocolError, match="flow_run_ids"):
        await rl.schedule_deployment_runs(deployment_id)
    _assert_valid_requests(fake)


async def test_runs_from_a_deployment_one_and_in_bulk(rl, fake):
    deployment = sample_deployment("nightly")
    run = sample_flow_run("first", read=False, state={"type": "SCHEDULED"})
    fake.ok("CreateFlowRunFromDeployment", run, seq=11, created=True)
    made = await rl.create_flow_run_from_deployment(
        deployment["id"], parameters={"x": 2}, state="SCHEDULED", name="first", tags=["t"], work_queue_name="gpu",
        job_variables={"cpu": 1}, enforce_parameter_schema=False, idempotency_key="prefect-key",
        request_idempotency_key="bus-key")
    assert isinstance(made, FlowRun) and made.model_dump(mode="json") == run
    assert made.state is not None and made.state.type == "SCHEDULED"
    assert fake.bodies("CreateFlowRunFromDeployment") == [
        {"deployment_id": deployment["id"], "parameters": {"x": 2}, "state": {"type": "SCHEDULED"},
         "name": "first", "tags": ["t"], "work_queue_name": "gpu", "job_variables": {"cpu": 1},
         "enforce_parameter_schema": False, "idempotency_key": "prefect-key",
         "request_idempotency_key": "bus-key"}]

    items = [{"flow_run_id": run["id"], "status": "CREATED", "error": None},
             {"flow_run_id": None, "status": "FAILED", "error": "Error hydrating flow run parameters: Invalid JSON"}]
    fake.ok("CreateFlowRunsFromDeployment", items, seq=12)
    results = await rl.create_flow_runs_from_deployment(deployment["id"], [{"name": "a"}, {"parameters": {"v": 1}}],
                                                        idempotency_key="kb")
    assert all(isinstance(r, FlowRunCreateResult) for r in results)
    assert [(r.status, r.flow_run_id, r.error) for r in results] == [
        ("CREATED", uuid.UUID(run["id"]), None), ("FAILED", None, items[1]["error"])]
    assert fake.bodies("CreateFlowRunsFromDeployment") == [
        {"deployment_id": deployment["id"], "runs": [{"name": "a"}, {"parameters": {"v": 1}}],
         "idempotency_key": "kb"}]
    _assert_valid_requests(fake)


async def test_automatic_keys_go_in_the_bus_key_field_of_each_command(fake, client_settings):
    run = sample_flow_run("first", read=False)
    fake.ok("CreateFlowRun", run, seq=1, created=True)
    fake.ok("CreateFlowRunFromDeployment", run, seq=2, created=True)
    fake.ok("DeleteFlowRun", None, seq=3)
    async with RunledgerClient(client_settings, idempotency_keys=True) as rl:
        await rl.create_flow_run(FLOW["id"], idempotency_key="domain")
        await rl.create_flow_run_from_deployment(uuid.uuid4())
        await rl.delete_flow_run(run["id"])
    (create,) = fake.bodies("CreateFlowRun")
    assert create["idempotency_key"] == "domain" and uuid.UUID(create["request_idempotency_key"])
    (from_deployment,) = fake.bodies("CreateFlowRunFromDeployment")
    assert "idempotency_key" not in from_deployment and uuid.UUID(from_deployment["request_idempotency_key"])
    (delete,) = fake.bodies("DeleteFlowRun")
    assert uuid.UUID(delete["idempotency_key"]) and "request_idempotency_key" not in delete
    _assert_valid_requests(fake)


def test_the_clients_bus_key_fields_are_the_services():
    from runledger.handlers.registry import command_specs

    specs = command_specs(None)
    assert {name: spec.model.BUS_KEY_FIELD for name, spec in specs.items()
            if spec.model.BUS_KEY_FIELD != "idempotency_key"} == BUS_KEY_FIELDS
    assert all(bus_key_field(name) == spec.model.BUS_KEY_FIELD for name, spec in specs.items())


async def test_a_timed_out_run_creation_is_retried_with_its_bus_key(fake, client_settings):
    run = sample_flow_run("first", read=False)
    seen: list[dict] = []

    def answer(body):
        seen.append(body)
        return SILENT if len(seen) == 1 else {"ok": True, "result": run, "seq": 3, "created": True}

    fake.replies["CreateFlowRun"] = answer
    settings = client_settings.model_copy(update={"request_timeout": 0.3})
    async with RunledgerClient(settings, retries=2, idempotency_keys=True) as rl:
        assert (await rl.create_flow_run(FLOW["id"], idempotency_key="domain")).id == uuid.UUID(run["id"])
    keys = [b["request_idempotency_key"] for b in seen]
    assert len(keys) == 2 and keys[0] == keys[1] and all(b["idempotency_key"] == "domain" for b in seen)


# ---------------------------------------------------------------------------------------------
# The client: flow runs

async def test_create_update_delete_and_read_a_flow_run(rl, fake):
    run = sample_flow_run("first", read=False, parameters={"x": 1}, tags=["t"])
    fake.ok("CreateFlowRun", run, seq=4, created=True)
    made = await rl.create_flow_run(FLOW["id"], name="first", parameters={"x": 1}, tags=["t"], state={"type": "PENDING"},
                                    work_pool_name="pool", work_queue_name="q", priority=-1,
                                    empirical_policy={"retries": 2}, request_idempotency_key="r1")
    assert made.model_dump(mode="json") == run
    assert (made.state_type, made.run_count, made.total_run_time, made.waiting_reason) == ("PENDING", 0, 0.0, None)
    assert isinstance(made.state, State) and made.state.name == "Pending"
    fake.ok("UpdateFlowRun", None, seq=5)
    fake.ok("DeleteFlowRun", None, seq=6)
    assert await rl.update_flow_run(made.id, name="renamed", tags=[], priority=3, job_variables=None) is None
    assert await rl.delete_flow_run(made.id, idempotency_key="kd") is None
    assert fake.bodies("CreateFlowRun") == [
        {"flow_id": FLOW["id"], "name": "first", "state": {"type": "PENDING"}, "parameters": {"x": 1},
         "tags": ["t"], "empirical_policy": {"retries": 2}, "work_pool_name": "pool", "work_queue_name": "q",
         "priority": -1, "request_idempotency_key": "r1"}]
    assert fake.bodies("UpdateFlowRun") == [{"id": run["id"], "name": "renamed", "tags": [], "job_variables": None,
                                             "priority": 3}]
    assert fake.bodies("DeleteFlowRun") == [{"id": run["id"], "idempotency_key": "kd"}]

    read = {**sample_flow_run("first"), "work_pool_name": "pool"}
    read["waiting_reason"] = "the pool's concurrency limit is full"
    fake.ok("GetFlowRun", read)
    got = await rl.read_flow_run(made.id)
    assert got.model_dump(mode="json") == read and got.waiting_reason.startswith("the pool's")
    assert got.model_extra == {"work_pool_id": None, "work_pool_name": "pool"}
    assert fake.bodies("GetFlowRun") == [{"id": run["id"], "min_seq": 6}]
    _assert_valid_requests(fake)


@pytest.mark.parametrize(("first", "proposed", "force", "status"), [
    ({"type": "SCHEDULED"}, "RUNNING", False, "ACCEPT"),
    (None, {"type": "PENDING"}, False, "ABORT"),
    ({"type": "SCHEDULED", "state_details": {"scheduled_time": LATER.isoformat()}}, {"type": "RUNNING"}, False,
     "WAIT"),
    (None, {"type": "PENDING", "name": "Again"}, True, "ACCEPT"),
])
async def test_set_flow_run_state_returns_the_orchestration_result(rl, fake, first, proposed, force, status):
    model = sample_flow_run_model("r", **({"state": first} if first else {}))
    envelope = set_state_reply(model, {"type": proposed} if isinstance(proposed, str) else proposed, force)
    fake.replies["SetFlowRunState"] = envelope
    result = await rl.set_flow_run_state(model.id, proposed, force=force, idempotency_key="ks")
    assert isinstance(result, OrchestrationResult) and result.status == status
    assert result.accepted is (status == "ACCEPT")
    assert result.state is not None and result.state.model_dump(mode="json") == envelope["result"]
    assert result.details.model_dump(exclude_none=True) == envelope["orchestration"]["details"]
    if status == "ABORT":
        assert result.details.reason == "This run is in a PENDING state and cannot transition to a PENDING state."
    if status == "WAIT":
        assert result.details.delay_seconds > 0
    sent = {"id": str(model.id), "state": {"type": proposed} if isinstance(proposed, str) else proposed,
            "idempotency_key": "ks"}
    assert fake.bodies("SetFlowRunState") == [{**sent, "force": True} if force else sent]
    _assert_valid_requests(fake)


async def test_a_set_state_reply_without_an_outcome_is_a_protocol_error(rl, fake):
    fake.ok("SetFlowRunState", None, seq=1)
    with pytest.raises(ProtocolError, match="no orchestration outcome"):
        await rl.set_flow_run_state(uuid.uuid4(), "RUNNING")


async def test_flow_runs_are_listed_counted_and_their_states_read(rl, fake):
    runs = [sample_flow_run("a"), sample_flow_run("b")]
    fake.ok("ListFlowRuns", runs)
    fake.ok("CountFlowRuns", 2)
    ids = [uuid.UUID(r["id"]) for r in runs]
    after = datetime(2025, 1, 1, tzinfo=UTC)
    listed = await rl.list_flow_runs(
        ids=ids, names=["a", "b"], flow_ids=[FLOW["id"]], deployment_ids=[ids[0]], work_pool_names=["pool"],
        work_queue_names=["q"], state_types=["SCHEDULED", "PENDING"], state_names=["Late"], tags=["t"],
        idempotency_keys=["k"], expected_start_time_after=after, flow_run_filter={"start_time": {"is_null_": True}},
        sort="EXPECTED_START_TIME_DESC", limit=5, offset=0)
    assert [r.name for r in listed] == ["a", "b"] and all(isinstance(r, FlowRun) for r in listed)
    assert await rl.read_flow_runs() == listed  # Prefect's name
    assert await rl.count_flow_runs(state_types=["RUNNING"], expected_start_time_before=after) == 2
    assert fake.bodies("ListFlowRuns") == [
        {"sort": "EXPECTED_START_TIME_DESC", "limit": 5, "offset": 0,
         "flow_runs": {"start_time": {"is_null_": True}, "id": {"any_": [str(i) for i in ids]},
                       "name": {"any_": ["a", "b"]}, "flow_id": {"any_": [FLOW["id"]]},
                       "deployment_id": {"any_": [str(ids[0])]}, "work_queue_name": {"any_": ["q"]},
                       "state_type": {"any_": ["SCHEDULED", "PENDING"]}, "state_name": {"any_": ["Late"]},
                       "idempotency_key": {"any_": ["k"]}, "tags": {"all_": ["t"]},
                       "expected_start_time": {"after_": "2025-01-01T00:00:00+00:00"}},
         "work_pool_name": {"any_": ["pool"]}},
        {}]
    assert fake.bodies("CountFlowRuns") == [
        {"flow_runs": {"state_type": {"any_": ["RUNNING"]},
                       "expected_start_time": {"before_": "2025-01-01T00:00:00+00:00"}}}]

    model = sample_flow_run_model("a")
    states = [model.state.reply(), set_state_reply(model, {"type": "RUNNING"})["result"]]
    fake.ok("ListFlowRunStates", states)
    history = await rl.read_flow_run_states(model.id)
    assert [s.type for s in history] == ["PENDING", "RUNNING"] and all(isinstance(s, State) for s in history)
    assert [s.model_dump(mode="json") for s in history] == states
    _assert_valid_requests(fake)


async def test_catch_up_makes_the_next_reads_wait_for_the_streams_last_write(rl, fake):
    fake.ok("GetServiceHealth", {"stream_last_seq": 42, "projections": [], "stalled": []})
    fake.ok("CountFlowRuns", 0)
    assert await rl.catch_up() == 42
    await rl.count_flow_runs()
    assert fake.bodies("GetServiceHealth") == [{}]
    assert fake.bodies("CountFlowRuns") == [{"min_seq": 42}]
    fake.ok("GetServiceHealth", {"stream_last_seq": None})
    assert await rl.catch_up() is None and rl.last_seq == 42
    _assert_valid_requests(fake)


# ---------------------------------------------------------------------------------------------
# The CLI: deployments

def test_deployment_create_ensures_the_flow_and_upserts(cli, fake):
    raw = sample_deployment("nightly", tags=["x"], schedules=[{"schedule": {"cron": "0 2 * * *"}}])
    fake.error("GetDeploymentByName", "not_found", "Deployment not found")  # read first: the schedules it had
    fake.ok("CreateFlow", FLOW, seq=1, created=True)
    fake.ok("CreateDeployment", raw, seq=2, created=True)
    made = cli("deployment", "create", "--flow", "etl", "--name", "nightly", "--pool", "pool", "--queue", "gpu",
               "--cron", "0 2 * * *", "--timezone", "Europe/Berlin", "--param", "n=3", "--param", "who=world",
               "--param", 'cfg={"a": [1]}', "--tag", "x", "--limit", "2", "--idempotency-key", "k-1")
    assert made.exit_code == 0, made.output
    assert made.stdout.startswith("Created deployment 'etl/nightly'.\n") and raw["id"] in made.stdout
    assert fake.sent("CreateFlow") == [{"name": "etl"}] and fake.keys("CreateFlow") == ["k-1:flow"]
    assert fake.sent("CreateDeployment") == [
        {"name": "nightly", "flow_id": FLOW["id"], "schedules": [{"schedule": {"cron": "0 2 * * *",
                                                                               "timezone": "Europe/Berlin"}}],
         "concurrency_limit": 2, "parameters": {"n": 3, "who": "world", "cfg": {"a": [1]}}, "tags": ["x"],
         "work_pool_name": "pool", "work_queue_name": "gpu"}]
    assert fake.keys("CreateDeployment") == ["k-1"]

    fake.ok("CreateDeployment", raw, seq=3, created=False)
    again = cli("deployment", "create", "-f", "etl", "-n", "nightly", "--interval", "3600", "--json")
    assert again.exit_code == 0 and json.loads(again.stdout) == raw
    cli("deployment", "create", "-f", "etl", "-n", "nightly", "--rrule", "FREQ=DAILY", "--paused", "-d", "doc")
    assert [b.get("schedules") for b in fake.sent("CreateDeployment")[1:]] == [
        [{"schedule": {"interval": 3600.0}}], [{"schedule": {"rrule": "FREQ=DAILY"}}]]
    assert fake.sent("CreateDeployment")[2]["paused"] is True
    assert cli("deployment", "create", "-f", "etl", "-n", "nightly").stdout.startswith(
        "Updated deployment 'etl/nightly'.")
    _assert_valid_requests(fake)


@pytest.mark.parametrize("args", [
    ["deployment", "create", "-f", "etl", "-n", "d", "--cron", "* * * * *", "--interval", "60"],
    ["deployment", "create", "-f", "etl", "-n", "d", "--timezone", "UTC"],
    ["deployment", "create", "-f", "etl", "-n", "d", "--param", "novalue"],
    ["deployment", "create", "-n", "d"],
    ["deployment", "inspect", "nightly"],
    ["deployment", "run", "nightly"],
    ["deployment", "schedule", "etl/nightly", "--start", "yesterday"],
    ["flow-run", "set-state", "r", "WALKING"],
    ["flow-run", "ls", "--state-type", "done"],
    ["flow-run", "ls", "--deployment", "nightly"],
])
def test_usage_errors_exit_2_and_send_nothing(cli, fake, args):
    result = cli(*args)
    assert result.exit_code == 2, result.output
    assert [n for n, _ in fake.requests if n != "GetServiceHealth"] == []


def test_deployment_ls_shows_flow_slash_name_and_schedules(cli, fake):
    raws = [{**sample_deployment("nightly", schedules=[{"schedule": {"cron": "0 2 * * *", "timezone": "Europe/Berlin"}},
                                                       {"schedule": {"interval": 3600}, "active": False}]),
             "work_pool_name": "pool", "work_queue_name": "default", "paused": True},
            sample_deployment("adhoc", flow_name="gone")]
    fake.ok("ListDeployments", raws)
    fake.ok("ListFlows", [FLOW])
    result = cli("deployment", "ls", "--flow", "etl", "--pool", "pool", "-t", "x", "--limit", "5")
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert re.match(r"Name +Pool +Queue +Schedules +Paused +ID$", lines[0])
    assert re.split(r"  +", lines[1]) == ["etl/nightly", "pool", "default",
                                          "cron 0 2 * * * (Europe/Berlin); every 3600s [inactive]", "yes",
                                          raws[0]["id"]]
    assert lines[2].split() == [f"{raws[1]['flow_id']}/adhoc", "-", "-", "-", "no", raws[1]["id"]]
    assert fake.sent("ListDeployments") == [{"limit": 5, "offset": 0, "deployments": {"tags": {"all_": ["x"]}},
                                             "flow_name": {"any_": ["etl"]}, "work_pool_name": {"any_": ["pool"]},
                                             "min_seq": 40}]
    assert fake.sent("ListFlows") == [{"limit": 2, "flows": {"id": {"any_": [raws[0]["flow_id"], raws[1]["flow_id"]]}},
                                       "min_seq": 40}]
    assert json.loads(cli("deployment", "ls", "-o", "json").stdout) == raws
    fake.ok("ListDeployments", [])
    empty = cli("deployment", "ls")
    assert empty.exit_code == 0 and empty.stdout == "No deployments found.\n"
    _assert_valid_requests(fake)


def test_deployment_inspect_by_name_or_id(cli, fake):
    raw = sample_deployment("nightly")
    fake.ok("GetDeploymentByName", raw)
    fake.ok("GetDeployment", raw)
    by_name = cli("deployment", "inspect", "etl/nightly")
    assert by_name.exit_code == 0, by_name.output
    assert any(line.split() == ["name", "nightly"] for line in by_name.stdout.splitlines())
    assert json.loads(cli("deployment", "inspect", raw["id"], "--json").stdout) == raw
    assert fake.sent("GetDeploymentByName") == [{"flow_name": "etl", "deployment_name": "nightly", "min_seq": 40}]
    assert fake.sent("GetDeployment") == [{"id": raw["id"], "min_seq": 40}]
    fake.error("GetDeploymentByName", "not_found", "Deployment not found.")
    missing = cli("deployment", "inspect", "etl/nope")
    assert missing.exit_code == 3 and missing.stderr == "Error (not_found): Deployment 'etl/nope' not found.\n"
    _assert_valid_requests(fake)


def test_deployment_run_prints_the_runs_id_and_state(cli, fake):
    raw = sample_deployment("nightly")
    run = sample_flow_run("first", read=False, state={"type": "SCHEDULED"})
    fake.ok("GetDeploymentByName", raw)
    fake.ok("GetDeployment", raw)
    fake.ok("CreateFlowRunFromDeployment", run, seq=50, created=True)
    made = cli("deployment", "run", "etl/nightly", "--param", "x=1", "--queue", "gpu", "--tag", "t", "--name",
               "first", "--idempotency-key", "k-run")
    assert made.exit_code == 0, made.output
    assert made.stdout == (f"Created flow run 'first' of deployment 'etl/nightly'.\nID: {run['id']}\n"
                           "State: SCHEDULED\n")
    assert fake.sent("CreateFlowRunFromDeployment") == [
        {"deployment_id": raw["id"], "parameters": {"x": 1}, "work_queue_name": "gpu", "tags": ["t"],
         "name": "first", "request_idempotency_key": "k-run"}]
    assert json.loads(cli("deployment", "run", raw["id"], "-o", "json").stdout) == run
    fake.error("CreateFlowRunFromDeployment", "conflict", "Error creating flow run: Validation failed")
    refused = cli("deployment", "run", "etl/nightly")
    assert refused.exit_code == 4 and refused.stderr.startswith("Error (conflict): Error creating flow run")
    _assert_valid_requests(fake)


def test_deployment_pause_resume_and_delete(cli, fake):
    raw = sample_deployment("nightly")
    fake.ok("GetDeploymentByName", raw)
    fake.ok("GetDeployment", {**raw, "paused": True})
    for name in ("PauseDeployment", "ResumeDeployment", "DeleteDeployment"):
        fake.ok(name, None, seq=60)
    paused = cli("deployment", "pause", "etl/nightly")
    assert paused.exit_code == 0 and paused.stdout.startswith("Paused deployment 'etl/nightly'.\n")
    assert json.loads(cli("deployment", "resume", "etl/nightly", "--json").stdout)["paused"] is True
    assert fake.sent("PauseDeployment") == fake.sent("ResumeDeployment") == [{"id": raw["id"]}]
    assert fake.sent("GetDeployment")[0] == {"id": raw["id"], "min_seq": 60}  # read after its own write
    deleted = cli("deployment", "delete", "etl/nightly")
    assert deleted.exit_code == 0 and deleted.stdout == "Deleted deployment 'etl/nightly'.\n"
    assert cli("deployment", "delete", raw["id"], "--json").stdout == "null\n"
    assert fake.sent("DeleteDeployment") == [{"id": raw["id"]}] * 2
    fake.error("GetDeploymentByName", "not_found", "Deployment not found.")
    gone = cli("deployment", "delete", "etl/nightly")
    assert gone.exit_code == 3 and gone.stderr == "Error (not_found): Deployment 'etl/nightly' not found.\n"
    fake.error("GetServiceHealth", "unavailable", "the service is restarting")
    assert cli("deployment", "pause", "etl/nightly").exit_code == 6
    _assert_valid_requests(fake)


def test_deployment_schedule_makes_runs_and_lists_them(cli, fake):
    raw = sample_deployment("nightly", schedules=[{"schedule": {"interval": 3600}}])
    runs = [sample_flow_run(f"r{i}", state={"type": "SCHEDULED"}) for i in range(2)]
    fake.ok("GetDeploymentByName", raw)
    fake.ok("ScheduleDeploymentRuns", {"flow_run_ids": [r["id"] for r in runs]}, seq=70)
    fake.ok("ListFlowRuns", runs)
    made = cli("deployment", "schedule", "etl/nightly", "--start", "2025-01-01T00:00:00Z", "--end", "2025-01-02",
               "--min-runs", "1", "--max-runs", "24")
    assert made.exit_code == 0, made.output
    lines = made.stdout.splitlines()
    assert lines[0] == "Scheduled 2 runs of deployment 'etl/nightly'."
    assert re.match(r"Name +State +Expected Start +ID$", lines[1])
    assert lines[2].split() == ["r0", "SCHEDULED", runs[0]["expected_start_time"][:19] + "+00:00", runs[0]["id"]]
    assert fake.sent("ScheduleDeploymentRuns") == [
        {"deployment_id": raw["id"], "start_time": "2025-01-01T00:00:00+00:00", "end_time": "2025-01-02T00:00:00",
         "min_runs": 1, "max_runs": 24}]
    assert fake.sent("ListFlowRuns") == [{"sort": "EXPECTED_START_TIME_ASC", "limit": 2, "flow_runs": {
        "id": {"any_": [r["id"] for r in runs]}}, "min_seq": 70}]
    as_json = cli("deployment", "schedule", "etl/nightly", "--json")
    assert json.loads(as_json.stdout) == {"flow_run_ids": [r["id"] for r in runs]}
    fake.ok("ScheduleDeploymentRuns", {"flow_run_ids": []}, seq=None)
    assert cli("deployment", "schedule", "etl/nightly").stdout == "Scheduled 0 runs of deployment 'etl/nightly'.\n"
    _assert_valid_requests(fake)


# ---------------------------------------------------------------------------------------------
# The CLI: flow runs

def test_flow_run_ls_filters_by_flow_deployment_and_state(cli, fake):
    late = sample_flow_run_model("late-one", state={"type": "SCHEDULED", "name": "Late"})
    runs = [late.model_dump(mode="json") | {"work_pool_id": None, "work_pool_name": None},
            sample_flow_run("other", flow_name="gone")]
    deployment = sample_deployment("nightly")
    fake.ok("ListFlows", [FLOW])
    fake.ok("ListDeployments", [deployment])
    fake.ok("ListFlowRuns", runs)
    result = cli("flow-run", "ls", "--flow", "etl", "--deployment", "etl/nightly", "--state-type", "scheduled",
                 "--state-type", "PENDING", "--state", "late", "--state", "Mine", "--limit", "3")
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert re.match(r"Name +Flow +State +Expected Start +ID$", lines[0])
    assert lines[1].split()[:4] == ["late-one", "etl", "SCHEDULED", "(Late)"]
    assert lines[2].split()[:3] == ["other", runs[1]["flow_id"], "PENDING"]
    list_bodies = fake.sent("ListFlowRuns")
    assert list_bodies == [  # one more than --limit: are there more?
        {"sort": "EXPECTED_START_TIME_DESC", "limit": 4, "offset": 0, "min_seq": 40, "flow_runs": {
        "flow_id": {"any_": [FLOW["id"]]}, "deployment_id": {"any_": [deployment["id"]]},
        "state_type": {"any_": ["SCHEDULED", "PENDING"]}, "state_name": {"any_": ["Late", "Mine"]}}}]
    assert fake.sent("ListDeployments")[0] == {"deployments": {"name": {"any_": ["nightly"]}},
                                               "flow_name": {"any_": ["etl"]}, "min_seq": 40}
    assert json.loads(cli("flow-run", "ls", "--json").stdout) == runs
    assert fake.sent("ListFlowRuns")[-1] == {"sort": "EXPECTED_START_TIME_DESC", "limit": 101, "offset": 0,
                                             "min_seq": 40}
    fake.ok("ListFlows", [])
    before = len(fake.sent("ListFlowRuns"))
    none = cli("flow-run", "ls", "--flow", "nope")
    assert none.exit_code == 0 and none.stdout == "No flow runs found.\n"
    assert len(fake.sent("ListFlowRuns")) == before  # an unknown flow matches nothing: nothing asked
    _assert_valid_requests(fake)


def test_flow_run_inspect_shows_the_run_why_it_waits_and_its_history(cli, fake):
    model = sample_flow_run_model("first", state={"type": "SCHEDULED"})
    raw = model.model_dump(mode="json") | {"work_pool_id": None, "work_pool_name": None,
                                           "waiting_reason": "work pool 'pool' is at its concurrency limit (2)"}
    states = [model.state.reply(), set_state_reply(model, {"type": "PENDING", "message": "go"})["result"]]
    fake.ok("ListFlowRuns", [raw])
    fake.ok("GetFlowRun", raw)
    fake.ok("ListFlowRunStates", states)
    shown = cli("flow-run", "inspect", "first")
    assert shown.exit_code == 0, shown.output
    lines = shown.stdout.splitlines()
    assert any(line.split() == ["name", "first"] for line in lines)
    assert "Waiting: work pool 'pool' is at its concurrency limit (2)" in lines
    history = lines[lines.index("Waiting: work pool 'pool' is at its concurrency limit (2)") + 1:]
    assert re.match(r"Type +Name +Timestamp +Message$", history[0])
    assert history[1].split()[:2] == ["SCHEDULED", "Scheduled"] and history[2].split()[-1] == "go"
    assert fake.sent("ListFlowRuns") == [{"limit": 2, "flow_runs": {"name": {"any_": ["first"]}}, "min_seq": 40}]
    as_json = json.loads(cli("flow-run", "inspect", raw["id"], "-o", "json").stdout)
    assert as_json == {**raw, "state_history": states}
    # Both read the one run (by name: after the list, which carries only the recorded reason).
    assert fake.sent("GetFlowRun") == [{"id": raw["id"], "min_seq": 40}] * 2
    fake.ok("GetFlowRun", {**raw, "waiting_reason": None})
    assert "Waiting" not in cli("flow-run", "inspect", raw["id"]).stdout

    fake.ok("ListFlowRuns", [raw, raw])
    twice = cli("flow-run", "inspect", "first")
    assert twice.exit_code == 4 and "Several flow runs are named 'first'" in twice.stderr
    fake.ok("ListFlowRuns", [])
    assert cli("flow-run", "inspect", "nope").exit_code == 3
    fake.error("GetFlowRun", "not_found", "Flow run not found")
    missing = cli("flow-run", "inspect", str(uuid.UUID(int=5)))
    assert missing.exit_code == 3
    assert missing.stderr == f"Error (not_found): Flow run '{uuid.UUID(int=5)}' not found.\n"
    _assert_valid_requests(fake)


@pytest.mark.parametrize(("first", "args", "status", "code", "words"), [
    ({"type": "SCHEDULED"}, ["running"], "ACCEPT", 0, "ACCEPT: flow run 'r' is RUNNING."),
    (None, ["PENDING"], "ABORT", 8, "ABORT: flow run 'r' is PENDING.\nReason: This run is in a PENDING state and "
                                    "cannot transition to a PENDING state."),
    ({"type": "SCHEDULED", "state_details": {"scheduled_time": LATER.isoformat()}}, ["RUNNING"], "WAIT", 8,
     "WAIT: flow run 'r' is SCHEDULED. Propose it again in "),
    (None, ["PENDING", "--name", "Again", "--message", "m", "--force"], "ACCEPT", 0,
     "ACCEPT: flow run 'r' is PENDING (Again)."),
])
def test_flow_run_set_state_prints_the_outcome_and_exits_by_it(cli, fake, first, args, status, code, words):
    model = sample_flow_run_model("r", **({"state": first} if first else {}))
    raw = model.model_dump(mode="json")
    proposed = {"type": args[0].upper(), **({"name": "Again", "message": "m"} if "--force" in args else {})}
    fake.ok("ListFlowRuns", [raw])
    fake.ok("GetFlowRun", raw)
    fake.replies["SetFlowRunState"] = set_state_reply(model, proposed, "--force" in args)
    result = cli("flow-run", "set-state", "r", *args)
    assert result.exit_code == code, result.output
    assert result.stdout.startswith(words)
    sent = {"id": raw["id"], "state": proposed}
    assert fake.sent("SetFlowRunState") == [{**sent, "force": True} if "--force" in args else sent]
    as_json = cli("flow-run", "set-state", raw["id"], *args, "--json")
    assert as_json.exit_code == code
    out = json.loads(as_json.stdout)
    assert out["status"] == status and out["state"] == fake.replies["SetFlowRunState"]["result"]
    _assert_valid_requests(fake)


def test_flow_run_cancel_proposes_cancelling(cli, fake):
    running = sample_flow_run_model("r", state={"type": "RUNNING"})
    fake.ok("GetFlowRun", running.model_dump(mode="json"))
    fake.replies["SetFlowRunState"] = set_state_reply(running, {"type": "CANCELLING"})
    result = cli("flow-run", "cancel", str(running.id))
    assert result.exit_code == 0, result.output
    assert result.stdout == "ACCEPT: flow run " + repr(str(running.id)) + " is CANCELLING.\n"
    assert fake.sent("SetFlowRunState") == [{"id": str(running.id), "state": {"type": "CANCELLING"}}]
    done = sample_flow_run_model("r", state={"type": "COMPLETED"})
    fake.replies["SetFlowRunState"] = set_state_reply(done, {"type": "CANCELLING"})
    ended = cli("flow-run", "cancel", str(running.id))
    assert ended.exit_code == 8 and ended.stdout.startswith("ABORT: ")
    fake.error("SetFlowRunState", "not_found", "Flow run not found")
    assert cli("flow-run", "cancel", str(running.id)).exit_code == 3
    _assert_valid_requests(fake)


def test_run_and_deployment_text_from_the_store_is_shown_not_obeyed(cli, fake):
    deployments = [{**sample_deployment(f"d{i}"), "name": text, "work_pool_name": text,
                    "schedules": [{**sample_deployment("s", schedules=[{"schedule": {"cron": "* * * * *"}}])[
                        "schedules"][0], "schedule": {"cron": text}}]} for i, text in enumerate(HOSTILE)]
    runs = [{**sample_flow_run(f"r{i}"), "name": text, "state_name": text, "waiting_reason": text}
            for i, text in enumerate(HOSTILE)]
    states = [{**sample_flow_run_model("r").state.reply(), "name": text, "message": text} for text in HOSTILE]
    fake.ok("ListDeployments", deployments)
    fake.ok("ListFlows", [{**FLOW, "name": HOSTILE[0]}])
    fake.ok("GetDeploymentByName", deployments[0])
    fake.ok("ListFlowRuns", runs)
    fake.ok("GetFlowRun", runs[0])
    fake.ok("ListFlowRunStates", states)
    for args in (["deployment", "ls"], ["deployment", "inspect", "a/b"], ["flow-run", "ls"],
                 ["flow-run", "inspect", runs[0]["id"]]):
        result = cli(*args)
        assert result.exit_code == 0, (args, result.output)
        assert "\x1b]" not in result.stdout and "\u202e" not in result.stdout and "\x07" not in result.stdout
        assert "\\x1b]0;pwned\\x07" in result.stdout
    assert "[red]x[/red]" in cli("flow-run", "ls").stdout


def test_an_unreachable_service_is_exit_6_for_every_verb(nats_url, tmp_path):
    env = {"RUNLEDGER_NATS_URL": nats_url, "RUNLEDGER_NAMESPACE": f"n{uuid.uuid4().hex[:8]}",
           "RUNLEDGER_CONFIG_DIR": str(tmp_path), "RUNLEDGER_REQUEST_TIMEOUT": "1"}
    runner = CliRunner()
    for args in (["deployment", "ls"], ["deployment", "run", "etl/nightly"], ["flow-run", "cancel", "r"],
                 ["deployment", "create", "-f", "etl", "-n", "d"]):
        result = runner.invoke(app, args, env=env)
        assert result.exit_code == 6, (args, result.output)
        assert "no runledger service answers" in result.stderr

