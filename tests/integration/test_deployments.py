"""Deployments through the broker, against real NATS and Postgres: the (flow, name) upsert
(`created: true|false`, id kept, schedules replaced), queue resolution (a pool's default queue,
a named queue created if missing, a bare queue name in the legacy pool), reads by id and by
name with the queue's current names, filters, counts and pages, updates with schedule
patching by slug, pause and resume, schedule CRUD, delete; a pair is unique under a race
between two service instances; bad input is `invalid` and appends nothing; replay equals live."""

from __future__ import annotations

import asyncio
import json
import uuid
from datetime import UTC, datetime, timedelta

import pytest

from runledger.handlers.background import CommandSender
from runledger.handlers.foreman import Foreman, ForemanPass
from runledger.handlers.service import Service
from runledger.infra.nats_connection import connect
from tests.integration.broker import assert_live_equals_rebuild

TEMPLATE = {
    "job_configuration": {"image": "{{ image }}", "cpu": "{{ cpu }}"},
    "variables": {"type": "object", "required": ["image"],
                  "properties": {"image": {"type": "string", "default": "python:3.12"}, "cpu": {"type": "integer"}}},
}


async def a_flow(broker, name: str = "etl") -> str:
    return (await broker.ok_cmd("CreateFlow", name=name))["id"]


async def test_a_deployment_is_upserted_on_flow_and_name_and_read_back(broker):
    flow_id = await a_flow(broker)
    first = await broker.cmd("CreateDeployment", name="nightly", flow_id=flow_id, description="one",
                             tags=["a", "b", "a"], schedules=[{"schedule": {"interval": 3600}, "slug": "hourly"}])
    assert first["ok"] and first["created"] is True, first
    d = first["result"]
    assert d["name"] == "nightly" and d["flow_id"] == flow_id and d["tags"] == ["a", "b"]
    assert d["paused"] is False and d["status"] == "NOT_READY" and d["enforce_parameter_schema"] is True
    assert d["parameter_openapi_schema"] == {"type": "object", "properties": {}}
    (schedule,) = d["schedules"]
    assert schedule["slug"] == "hourly" and schedule["active"] is True and schedule["deployment_id"] == d["id"]
    assert schedule["schedule"]["interval"] == 3600
    assert await broker.ok_qry("GetDeployment", id=d["id"]) == d
    assert await broker.ok_qry("GetDeploymentByName", flow_name="etl", deployment_name="nightly") == d
    assert await broker.ok_qry("ListDeploymentSchedules", deployment_id=d["id"]) == d["schedules"]

    again = await broker.cmd("CreateDeployment", name="nightly", flow_id=flow_id, paused=True)
    assert again["ok"] and again["created"] is False
    d2 = again["result"]
    assert d2["id"] == d["id"] and d2["paused"] is True and d2["description"] == "one"
    assert d2["schedules"] == []  # an upsert re-creates the schedules it is given: none
    assert await broker.ok_qry("GetDeployment", id=d["id"]) == d2
    assert await broker.ok_qry("CountDeployments") == 1


async def test_unknown_flow_pool_or_deployment_is_not_found(broker):
    missing = await broker.cmd("CreateDeployment", name="x", flow_id=str(uuid.uuid4()))
    assert missing["error"]["code"] == "not_found"
    flow_id = await a_flow(broker)
    no_pool = await broker.cmd("CreateDeployment", name="x", flow_id=flow_id, work_pool_name="nope")
    assert no_pool["error"] == {"code": "not_found", "message": 'Work pool "nope" not found.'}
    for name in ("GetDeployment", "DeleteDeployment", "PauseDeployment", "ResumeDeployment"):
        send = broker.qry if name.startswith("Get") else broker.cmd
        assert (await send(name, id=str(uuid.uuid4())))["error"]["code"] == "not_found", name
    assert (await broker.qry("GetDeploymentByName", flow_name="etl", deployment_name="x"))["error"]["code"] == "not_found"


async def test_queues_are_resolved_and_created_as_prefect_does(broker):
    flow_id = await a_flow(broker)
    await broker.ok_cmd("CreateWorkPool", name="pool", type="process", base_job_template=TEMPLATE)
    default = await broker.ok_cmd("CreateDeployment", name="d1", flow_id=flow_id, work_pool_name="pool")
    assert (default["work_pool_name"], default["work_queue_name"]) == ("pool", "default")
    named = await broker.ok_cmd("CreateDeployment", name="d2", flow_id=flow_id, work_pool_name="pool",
                                work_queue_name="gpu")
    queue = await broker.ok_qry("GetWorkQueue", work_pool_name="pool", work_queue_name="gpu")
    assert named["work_queue_id"] == queue["id"] and queue["priority"] == 2
    legacy = await broker.ok_cmd("CreateDeployment", name="d3", flow_id=flow_id, work_queue_name="old-style")
    assert legacy["work_pool_name"] == "default-agent-pool" and legacy["work_queue_name"] == "old-style"
    assert (await broker.ok_qry("GetLegacyWorkQueue", name="old-style"))["priority"] == 1

    # A renamed queue is read with its new name.
    await broker.ok_cmd("UpdateWorkQueue", work_pool_name="pool", work_queue_name="gpu", name="gpu2")
    assert (await broker.ok_qry("GetDeployment", id=named["id"]))["work_queue_name"] == "gpu2"
    by_queue = await broker.ok_qry("ListDeployments", work_queue_name={"any_": ["gpu2"]})
    assert [d["name"] for d in by_queue] == ["d2"]
    assert await broker.ok_qry("CountDeployments", work_pool_name={"any_": ["pool"]}) == 2


async def test_job_variables_are_checked_against_the_pool(broker):
    flow_id = await a_flow(broker)
    await broker.ok_cmd("CreateWorkPool", name="pool", type="process", base_job_template=TEMPLATE)
    bad = await broker.cmd("CreateDeployment", name="d", flow_id=flow_id, work_pool_name="pool",
                           job_variables={"cpu": "lots"})
    assert bad["error"]["code"] == "invalid" and "Validation failed for field 'cpu'" in bad["error"]["message"]
    made = await broker.ok_cmd("CreateDeployment", name="d", flow_id=flow_id, work_pool_name="pool",
                               job_variables={"cpu": 2})
    conflict = await broker.cmd("UpdateDeployment", id=made["id"], work_pool_name="pool", job_variables={"cpu": "x"})
    assert conflict["error"]["code"] == "conflict"


async def test_parameter_schemas_are_enforced(broker):
    flow_id = await a_flow(broker)
    schema = {"type": "object", "properties": {"foo": {"type": "string"}}, "required": ["foo"]}
    bad = await broker.cmd("CreateDeployment", name="d", flow_id=flow_id, parameters={"foo": 1},
                           parameter_openapi_schema=schema, enforce_parameter_schema=True)
    assert bad["error"]["code"] == "invalid"
    assert bad["error"]["message"] == "Validation failed for field 'foo'. Failure reason: 1 is not of type 'string'"
    blork = await broker.cmd("CreateDeployment", name="d", flow_id=flow_id,
                             parameter_openapi_schema={"type": "blork"}, enforce_parameter_schema=True)
    assert blork["error"]["code"] == "invalid"
    made = await broker.ok_cmd("CreateDeployment", name="d", flow_id=flow_id, parameter_openapi_schema=schema)
    update = await broker.cmd("UpdateDeployment", id=made["id"], parameters={"foo": 2})
    assert update["error"]["code"] == "conflict"
    ok = await broker.ok_cmd("UpdateDeployment", id=made["id"], parameters={"foo": "yes"})
    assert ok["parameters"] == {"foo": "yes"}


async def test_updates_patch_schedules_by_slug_pause_resume_and_delete(broker):
    flow_id = await a_flow(broker)
    d = await broker.ok_cmd("CreateDeployment", name="d", flow_id=flow_id, schedules=[
        {"schedule": {"cron": "0 9 * * *", "timezone": "Europe/Berlin"}, "slug": "morning"},
        {"schedule": {"rrule": "FREQ=WEEKLY;BYDAY=MO"}, "slug": "weekly"}])
    morning, weekly = d["schedules"]
    after = await broker.ok_cmd("UpdateDeployment", id=d["id"], version="2", schedules=[
        {"slug": "morning", "active": False}, {"slug": "mondays", "replaces": "weekly"}])
    assert after["version"] == "2"
    assert [(s["id"], s["slug"], s["active"]) for s in after["schedules"]] == [
        (morning["id"], "morning", False), (weekly["id"], "mondays", True)]
    unslugged = await broker.cmd("UpdateDeployment", id=d["id"], schedules=[{"schedule": {"interval": 60}}])
    assert unslugged["error"]["code"] == "invalid"

    await broker.ok_cmd("PauseDeployment", id=d["id"])
    await broker.ok_cmd("PauseDeployment", id=d["id"])  # idempotent
    paused = await broker.ok_qry("GetDeployment", id=d["id"])
    assert paused["paused"] is True and paused["schedules"][1]["active"] is True
    assert [x["name"] for x in await broker.ok_qry("ListDeployments", deployments={"paused": True})] == ["d"]
    await broker.ok_cmd("ResumeDeployment", id=d["id"])
    assert (await broker.ok_qry("GetDeployment", id=d["id"]))["paused"] is False

    created = await broker.ok_cmd("CreateDeploymentSchedules", deployment_id=d["id"],
                                  schedules=[{"schedule": {"interval": 600}, "max_scheduled_runs": 7}])
    assert created[0]["max_scheduled_runs"] == 7
    duplicate = await broker.cmd("CreateDeploymentSchedules", deployment_id=d["id"],
                                 schedules=[{"schedule": {"interval": 600}, "slug": "morning"}])
    assert duplicate["error"] == {"code": "conflict", "message": "Schedule slugs must be unique within a deployment."}
    await broker.ok_cmd("UpdateDeploymentSchedule", deployment_id=d["id"], schedule_id=created[0]["id"], active=False)
    await broker.ok_cmd("DeleteDeploymentSchedule", deployment_id=d["id"], schedule_id=morning["id"])
    left = await broker.ok_qry("ListDeploymentSchedules", deployment_id=d["id"])
    assert [(s["slug"], s["active"]) for s in left] == [(None, False), ("mondays", True)]  # last updated first
    unknown = await broker.cmd("DeleteDeploymentSchedule", deployment_id=d["id"], schedule_id=str(uuid.uuid4()))
    assert unknown["error"] == {"code": "not_found", "message": "Schedule not found."}

    await broker.ok_cmd("DeleteDeployment", id=d["id"])
    assert (await broker.qry("GetDeployment", id=d["id"]))["error"]["code"] == "not_found"
    again = await broker.cmd("CreateDeployment", name="d", flow_id=flow_id)
    assert again["created"] is True and again["result"]["id"] != d["id"]


async def test_deployments_are_filtered_counted_and_paginated(broker):
    etl, other = await a_flow(broker, "etl"), await a_flow(broker, "other")
    for i in range(5):
        await broker.ok_cmd("CreateDeployment", name=f"d{i}", flow_id=etl if i % 2 else other, tags=[f"t{i % 2}"])
    assert [d["name"] for d in await broker.ok_qry("ListDeployments")] == ["d0", "d1", "d2", "d3", "d4"]
    assert [d["name"] for d in await broker.ok_qry("ListDeployments", flow_name={"any_": ["etl"]})] == ["d1", "d3"]
    tagged = await broker.ok_qry("ListDeployments", deployments={"tags": {"all_": ["t0"]}}, limit=2, offset=1)
    assert [d["name"] for d in tagged] == ["d2", "d4"]
    page = await broker.ok_qry("PaginateDeployments", page=2, limit=2)
    assert [d["name"] for d in page["results"]] == ["d2", "d3"]
    assert (page["count"], page["pages"], page["page"], page["limit"]) == (5, 3, 2, 2)
    assert (await broker.ok_qry("PaginateDeployments", page=9, limit=2))["results"] == []
    assert (await broker.ok_qry("PaginateDeployments", limit=0))["pages"] == 0


@pytest.mark.parametrize("body, field", [
    ({"flow_id": "00000000-0000-0000-0000-000000000001"}, "name"),
    ({"name": "a/b", "flow_id": "00000000-0000-0000-0000-000000000001"}, "name"),
    ({"name": "d"}, "flow_id"),
    ({"name": "d", "flow_id": "nope"}, "flow_id"),
    ({"name": "d", "flow_id": "00000000-0000-0000-0000-000000000001", "colour": "x"}, "colour"),
    ({"name": "d", "flow_id": "00000000-0000-0000-0000-000000000001", "concurrency_limit": 0}, "concurrency_limit"),
    ({"name": "d", "flow_id": "00000000-0000-0000-0000-000000000001", "schedules": [{"schedule": {"interval": 0}}]},
     None),
    ({"name": "d", "flow_id": "00000000-0000-0000-0000-000000000001", "schedules": [{"schedule": {"cron": "nope"}}]},
     None),
    ({"name": "d", "flow_id": "00000000-0000-0000-0000-000000000001",
      "schedules": [{"schedule": {"interval": 60}, "max_scheduled_runs": 51}]}, None),
    ({"name": "d", "flow_id": "00000000-0000-0000-0000-000000000001",
      "schedules": [{"schedule": {"cron": "0 9 * * *", "timezone": "Mars/Olympus"}}]}, None),
    ({"name": "d", "flow_id": "00000000-0000-0000-0000-000000000001", "parameters": {"x": "\u0000"}}, "parameters"),
])
async def test_bad_deployment_input_is_invalid_and_appends_nothing(broker, body, field):
    before = await broker.stream_messages()
    reply = await broker.raw(broker.settings.command_subject("CreateDeployment"), json.dumps(body).encode())
    assert reply["ok"] is False and reply["error"]["code"] == "invalid", reply
    if field is not None:
        assert reply["error"]["field"] == field
    assert await broker.stream_messages() == before


async def test_racing_upserts_of_one_pair_on_two_instances_make_one_deployment(broker, settings, service):
    flow_id = await a_flow(broker)
    other = Service(settings, roles=frozenset({"commands"}))
    await other.start()
    nc = await connect(settings)
    try:
        body = json.dumps({"name": "contested", "flow_id": flow_id}).encode()
        replies = await asyncio.gather(*(
            nc.request(settings.command_subject("CreateDeployment"), body, timeout=20) for _ in range(30)))
    finally:
        await nc.close()
        await other.stop()
    bodies = [json.loads(r.data) for r in replies]
    assert all(b["ok"] for b in bodies), [b for b in bodies if not b["ok"]][:2]
    assert sum(b["created"] for b in bodies) == 1
    assert len({b["result"]["id"] for b in bodies}) == 1
    broker.last_seq = max(b["seq"] for b in bodies)
    assert await broker.ok_qry("CountDeployments") == 1


async def test_replay_of_deployments_equals_live(broker, service, settings):
    flow_id = await a_flow(broker)
    await broker.ok_cmd("CreateWorkPool", name="pool", type="process")
    for i in range(4):
        d = await broker.ok_cmd("CreateDeployment", name=f"d{i}", flow_id=flow_id, work_pool_name="pool",
                                work_queue_name=f"q{i % 2}", schedules=[{"schedule": {"interval": 60 * (i + 1)}}])
        await broker.ok_cmd("UpdateDeployment", id=d["id"], description=f"v{i}")
    await broker.ok_cmd("DeleteDeployment", id=d["id"])
    await broker.ok_qry("CountDeployments")
    assert await assert_live_equals_rebuild(service, settings) >= 4


async def test_schedule_makes_runs_once_each_with_prefects_shape(broker):
    flow_id = await a_flow(broker)
    d = await broker.ok_cmd("CreateDeployment", name="daily", flow_id=flow_id, tags=["t"], version="7",
                            parameters={"a": 1, "b": 1}, schedules=[
                                {"schedule": {"interval": 86400, "anchor_date": "2020-01-01T00:00:00Z"},
                                 "parameters": {"b": 2}}])
    first = await broker.ok_cmd("ScheduleDeploymentRuns", deployment_id=d["id"])
    assert len(first["flow_run_ids"]) == 3  # SC-4: defaults give D+1, D+2, D+3
    assert (await broker.ok_cmd("ScheduleDeploymentRuns", deployment_id=d["id"]))["flow_run_ids"] == []  # SC-3
    runs = await broker.ok_qry("ListFlowRuns", flow_runs={"deployment_id": {"any_": [d["id"]]}},
                               sort="EXPECTED_START_TIME_ASC")
    assert [r["id"] for r in runs] == first["flow_run_ids"]
    today = datetime.now(UTC).replace(hour=0, minute=0, second=0, microsecond=0)
    assert [datetime.fromisoformat(r["expected_start_time"]) for r in runs] == [today + timedelta(days=k)
                                                                                for k in (1, 2, 3)]
    (schedule,) = d["schedules"]
    run = runs[0]
    assert run["state"]["type"] == "SCHEDULED" and run["state"]["message"] == "Flow run scheduled"
    assert run["tags"] == ["auto-scheduled", "t"] and run["auto_scheduled"] is True
    assert run["parameters"] == {"a": 1, "b": 2} and run["deployment_version"] == "7"
    assert run["labels"]["prefect.deployment.id"] == d["id"] and run["labels"]["prefect.flow.id"] == flow_id
    assert run["created_by"] == {"id": schedule["id"], "type": "SCHEDULE", "display_value": "IntervalSchedule"}
    assert run["idempotency_key"].startswith(f"scheduled {d['id']} {schedule['id']} ")
    assert run["next_scheduled_start_time"] == run["expected_start_time"]
    # A backfill (SC-4): start = now - 20 days, end = now, min_runs 100 -> D-19 .. D.
    now = datetime.now(UTC)
    backfill = await broker.ok_cmd("ScheduleDeploymentRuns", deployment_id=d["id"],
                                   start_time=(now - timedelta(days=20)).isoformat(),
                                   end_time=now.isoformat(), min_runs=100)
    assert len(backfill["flow_run_ids"]) == 20
    unknown = await broker.ok_cmd("ScheduleDeploymentRuns", deployment_id=str(uuid.uuid4()))
    assert unknown["flow_run_ids"] == []


async def test_scheduling_again_after_the_service_forgot_the_runs_skips_each_existing_date(broker, service):
    """The scheduler presumes a date its deployment's index does not hold is new, without
    reading the log: a run the service no longer remembers (one that ran early, one deleted)
    is found by the append's check and the command decided again on the log, as before: the
    run that ran is kept, the deleted date is scheduled again, nothing else is written."""
    flow_id = await a_flow(broker)
    d = await broker.ok_cmd("CreateDeployment", name="hourly", flow_id=flow_id,
                            schedules=[{"schedule": {"interval": 3600}}])
    first = (await broker.ok_cmd("ScheduleDeploymentRuns", deployment_id=d["id"], min_runs=3, max_runs=3))[
        "flow_run_ids"]
    ran, deleted, kept = first
    for state in ("PENDING", "RUNNING", "COMPLETED"):
        assert (await broker.cmd("SetFlowRunState", id=ran, state={"type": state}))["ok"]
    await broker.ok_cmd("DeleteFlowRun", id=deleted)
    for run_id in first:
        service.commands.repo.forget("flow_run", run_id)
    again = await broker.ok_cmd("ScheduleDeploymentRuns", deployment_id=d["id"], min_runs=3, max_runs=3)
    assert again["flow_run_ids"] == [deleted]
    runs = await broker.ok_qry("ListFlowRuns", flow_runs={"deployment_id": {"any_": [d["id"]]}},
                               sort="EXPECTED_START_TIME_ASC")
    assert [(r["id"], r["state_type"]) for r in runs] == [(ran, "COMPLETED"), (deleted, "SCHEDULED"),
                                                          (kept, "SCHEDULED")]


async def test_two_instances_scheduling_one_deployment_write_each_run_once(broker, settings, service):
    flow_id = await a_flow(broker)
    d = await broker.ok_cmd("CreateDeployment", name="hourly", flow_id=flow_id,
                            schedules=[{"schedule": {"interval": 3600}}])
    other = Service(settings, roles=frozenset({"commands"}))
    await other.start()
    nc = await connect(settings)
    try:
        body = json.dumps({"deployment_id": d["id"], "min_runs": 50, "max_runs": 50}).encode()
        replies = await asyncio.gather(*(nc.request(settings.command_subject("ScheduleDeploymentRuns"), body,
                                                    timeout=20) for _ in range(10)))
    finally:
        await nc.close()
        await other.stop()
    bodies = [json.loads(r.data) for r in replies]
    assert all(b["ok"] for b in bodies), bodies[:2]
    created = [i for b in bodies for i in b["result"]["flow_run_ids"]]
    assert len(created) == 50 and len(set(created)) == 50  # every date once, none twice
    broker.last_seq = max(b["seq"] for b in bodies if b["seq"] is not None)
    assert await broker.ok_qry("CountFlowRuns", flow_runs={"deployment_id": {"any_": [d["id"]]}}) == 50


async def test_a_run_from_a_deployment_merges_hydrates_and_enforces_parameters(broker):
    flow_id = await a_flow(broker)
    await broker.ok_cmd("CreateVariable", name="region", value={"zone": "eu-1"})
    schema = {"type": "object", "properties": {"x": {"type": "string"}, "nested": {"type": "object"},
                                               "where": {"type": "object"}, "n": {"type": "integer"}},
              "required": ["x"]}
    d = await broker.ok_cmd("CreateDeployment", name="d", flow_id=flow_id, tags=["dep"], labels={"team": "a"},
                            parameters={"x": "default", "nested": {"a": 1, "b": 2}},
                            parameter_openapi_schema=schema)
    made = await broker.cmd("CreateFlowRunFromDeployment", deployment_id=d["id"], tags=["run", "dep"],
                            labels={"mine": 1}, parameters={
                                "nested": {"a": 9},
                                "where": {"__prefect_kind": "workspace_variable", "variable_name": "region"},
                                "n": {"__prefect_kind": "json", "value": "3"}})
    assert made["ok"] and made["created"] is True, made
    run = made["result"]
    assert run["parameters"] == {"x": "default", "nested": {"a": 9}, "where": {"zone": "eu-1"}, "n": 3}  # DP-12
    assert sorted(run["tags"]) == ["dep", "run"] and run["deployment_id"] == d["id"]
    assert run["labels"] == {"team": "a", "prefect.flow.id": flow_id, "prefect.deployment.id": d["id"],
                             "mine": 1}
    assert run["state"]["type"] == "SCHEDULED"

    missing = await broker.cmd("CreateFlowRunFromDeployment", deployment_id=d["id"], parameters={
        "where": {"__prefect_kind": "workspace_variable", "variable_name": "nope"}})
    assert missing["error"]["code"] == "invalid"
    assert missing["error"]["message"] == "Error hydrating flow run parameters: Variable 'nope' not found in workspace."
    wrong = await broker.cmd("CreateFlowRunFromDeployment", deployment_id=d["id"], parameters={"x": 1})
    assert wrong["error"]["code"] == "conflict"
    assert wrong["error"]["message"] == \
        "Error creating flow run: Validation failed for field 'x'. Failure reason: 1 is not of type 'string'"
    unchecked = await broker.cmd("CreateFlowRunFromDeployment", deployment_id=d["id"], parameters={"x": 1},
                                 enforce_parameter_schema=False)
    assert unchecked["ok"]
    unknown = await broker.cmd("CreateFlowRunFromDeployment", deployment_id=str(uuid.uuid4()))
    assert unknown["error"]["code"] == "not_found"


async def test_a_run_from_a_deployment_uses_or_creates_a_queue_of_its_pool_and_is_idempotent(broker):
    flow_id = await a_flow(broker)
    await broker.ok_cmd("CreateWorkPool", name="pool", type="process", base_job_template=TEMPLATE)
    d = await broker.ok_cmd("CreateDeployment", name="d", flow_id=flow_id, work_pool_name="pool")
    run = await broker.ok_cmd("CreateFlowRunFromDeployment", deployment_id=d["id"], work_queue_name="urgent")
    queue = await broker.ok_qry("GetWorkQueue", work_pool_name="pool", work_queue_name="urgent")
    assert run["work_queue_id"] == queue["id"]
    assert (await broker.ok_qry("GetDeployment", id=d["id"]))["work_queue_name"] == "default"  # unchanged
    bad_jv = await broker.cmd("CreateFlowRunFromDeployment", deployment_id=d["id"], job_variables={"cpu": "x"})
    assert bad_jv["error"]["code"] == "invalid"
    first = await broker.cmd("CreateFlowRunFromDeployment", deployment_id=d["id"], idempotency_key="once")
    second = await broker.cmd("CreateFlowRunFromDeployment", deployment_id=d["id"], idempotency_key="once")
    assert (first["created"], second["created"]) == (True, False)
    assert second["result"]["id"] == first["result"]["id"]
    poolless = await broker.ok_cmd("CreateDeployment", name="p", flow_id=flow_id)
    refused = await broker.cmd("CreateFlowRunFromDeployment", deployment_id=poolless["id"], work_queue_name="q")
    assert refused["error"]["code"] == "invalid"


async def test_bulk_runs_from_a_deployment_report_each_item(broker):
    flow_id = await a_flow(broker)
    d = await broker.ok_cmd("CreateDeployment", name="d", flow_id=flow_id)
    results = await broker.ok_cmd("CreateFlowRunsFromDeployment", deployment_id=d["id"], runs=[
        {"name": "a"}, {"parameters": {"v": {"__prefect_kind": "json", "value": "{bad"}}}, {"name": "c"}])
    assert [r["status"] for r in results] == ["CREATED", "FAILED", "CREATED"]
    assert results[1]["error"].startswith("Error hydrating flow run parameters: Invalid JSON")
    runs = await broker.ok_qry("ListFlowRuns", flow_runs={"deployment_id": {"any_": [d["id"]]}}, sort="NAME_ASC")
    assert [r["name"] for r in runs] == ["a", "c"]
    assert {r["id"] for r in runs} == {results[0]["flow_run_id"], results[2]["flow_run_id"]}
    too_many = await broker.cmd("CreateFlowRunsFromDeployment", deployment_id=d["id"], runs=[{}] * 101)
    assert too_many["error"]["code"] == "invalid"
    unknown = await broker.cmd("CreateFlowRunsFromDeployment", deployment_id=str(uuid.uuid4()), runs=[])
    assert unknown["error"]["code"] == "not_found"


async def _scheduled(broker, deployment_id: str) -> list[dict]:
    return await broker.ok_qry("ListFlowRuns", flow_runs={"deployment_id": {"any_": [deployment_id]},
                                                          "state_type": {"any_": ["SCHEDULED"]}},
                               sort="EXPECTED_START_TIME_ASC")


async def test_changes_delete_the_runs_their_schedules_made_as_prefect_does(broker):
    flow_id = await a_flow(broker)
    d = await broker.ok_cmd("CreateDeployment", name="d", flow_id=flow_id,
                            schedules=[{"schedule": {"interval": 3600}, "slug": "hourly"}])
    made = (await broker.ok_cmd("ScheduleDeploymentRuns", deployment_id=d["id"], min_runs=5))["flow_run_ids"]
    assert len(made) == 5
    manual = await broker.ok_cmd("CreateFlowRunFromDeployment", deployment_id=d["id"])
    started = made[0]
    await broker.ok_cmd("SetFlowRunState", id=started, state={"type": "PENDING"})
    # An update, even an empty one, deletes the future auto-scheduled runs (DP-7); the one
    # that left SCHEDULED and the manual one stay.
    await broker.ok_cmd("UpdateDeployment", id=d["id"])
    left = {r["id"] for r in await broker.ok_qry("ListFlowRuns", flow_runs={"deployment_id": {"any_": [d["id"]]}})}
    assert left == {started, manual["id"]}
    # Scheduled again: new runs (the same dates make the same run ids, re-created).
    again = (await broker.ok_cmd("ScheduleDeploymentRuns", deployment_id=d["id"], min_runs=5))["flow_run_ids"]
    assert len(again) >= 4
    # A backfill in the past, then a pause: every auto-scheduled run that never ran goes, past ones too (DP-9).
    now = datetime.now(UTC)
    past = (await broker.ok_cmd("ScheduleDeploymentRuns", deployment_id=d["id"], start_time=(now - timedelta(hours=3, minutes=30)).isoformat(),
                                end_time=(now - timedelta(minutes=1)).isoformat()))["flow_run_ids"]
    assert len(past) == 3
    await broker.ok_cmd("PauseDeployment", id=d["id"])
    remaining = await _scheduled(broker, d["id"])
    assert [r["id"] for r in remaining] == [manual["id"]]  # manually created scheduled runs stay
    assert (await broker.ok_qry("GetFlowRun", id=started))["state_type"] == "PENDING"
    # Resuming makes no runs.
    await broker.ok_cmd("ResumeDeployment", id=d["id"])
    assert [r["id"] for r in await _scheduled(broker, d["id"])] == [manual["id"]]


async def test_a_schedules_delete_removes_its_runs_and_an_upsert_the_future_ones(broker):
    flow_id = await a_flow(broker)
    d = await broker.ok_cmd("CreateDeployment", name="d", flow_id=flow_id, schedules=[
        {"schedule": {"interval": 3600}, "slug": "a"}, {"schedule": {"interval": 7200}, "slug": "b"}])
    a, b = d["schedules"]
    await broker.ok_cmd("ScheduleDeploymentRuns", deployment_id=d["id"])
    by_schedule = {}
    for r in await _scheduled(broker, d["id"]):
        by_schedule.setdefault(r["created_by"]["id"], []).append(r["id"])
    assert set(by_schedule) == {a["id"], b["id"]}
    # Deleting one schedule deletes every auto-scheduled run of the deployment, as Prefect does
    # (SC-7); the scheduler makes the other schedule's again.
    await broker.ok_cmd("DeleteDeploymentSchedule", deployment_id=d["id"], schedule_id=a["id"])
    assert await _scheduled(broker, d["id"]) == []
    await broker.ok_cmd("ScheduleDeploymentRuns", deployment_id=d["id"])
    assert {r["created_by"]["id"] for r in await _scheduled(broker, d["id"])} == {b["id"]}
    await broker.ok_cmd("CreateDeployment", name="d", flow_id=flow_id)  # the upsert: DP-2(a)
    assert await _scheduled(broker, d["id"]) == []
    await broker.ok_cmd("DeleteDeployment", id=d["id"])


async def test_sc7_deleting_a_schedule_deletes_every_auto_scheduled_run_of_the_deployment(broker):
    d = await broker.ok_cmd("CreateDeployment", name="d", flow_id=await a_flow(broker), schedules=[
        {"schedule": {"interval": 3600}, "slug": "a"}, {"schedule": {"interval": 7200}, "slug": "b"}])
    await broker.ok_cmd("ScheduleDeploymentRuns", deployment_id=d["id"])
    manual = await broker.ok_cmd("CreateFlowRunFromDeployment", deployment_id=d["id"])
    await broker.ok_cmd("DeleteDeploymentSchedule", deployment_id=d["id"], schedule_id=d["schedules"][0]["id"])
    assert [r["id"] for r in await _scheduled(broker, d["id"])] == [manual["id"]]  # manual runs stay


async def _foreman_pass(broker, service, settings) -> ForemanPass:
    """One pass of the foreman once the read models hold everything written so far; later
    queries wait for what it wrote."""
    await broker.ok_qry("CountFlowRuns")
    nc = await connect(settings)
    try:
        done = await Foreman(service.engine, CommandSender(nc, settings)).run_pass()
    finally:
        await nc.close()
    broker.last_seq = (await broker.nc.jetstream().stream_info(settings.stream_name)).state.last_seq
    return done


async def test_dp8_delete_deployment_deletes_manual_scheduled_runs_too(broker, service, settings):
    flow_id = await a_flow(broker)
    d = await broker.ok_cmd("CreateDeployment", name="d", flow_id=flow_id,
                            schedules=[{"schedule": {"interval": 3600}, "slug": "hourly"}])
    auto = (await broker.ok_cmd("ScheduleDeploymentRuns", deployment_id=d["id"], min_runs=3))["flow_run_ids"]
    manual = await broker.ok_cmd("CreateFlowRunFromDeployment", deployment_id=d["id"], idempotency_key="once")
    bulk = await broker.ok_cmd("CreateFlowRunsFromDeployment", deployment_id=d["id"], runs=[{}, {}])
    named = await broker.ok_cmd("CreateFlowRun", flow_id=flow_id, deployment_id=d["id"],
                                state={"type": "SCHEDULED"})  # a plain create naming the deployment
    started = await broker.ok_cmd("CreateFlowRunFromDeployment", deployment_id=d["id"])
    await broker.ok_cmd("SetFlowRunState", id=started["id"], state={"type": "PENDING"})
    waiting = await broker.ok_cmd("CreateFlowRunFromDeployment", deployment_id=d["id"],
                                  state={"type": "SCHEDULED", "name": "AwaitingConcurrencySlot"})
    other = await broker.ok_cmd("CreateDeployment", name="other", flow_id=flow_id)
    kept_elsewhere = await broker.ok_cmd("CreateFlowRunFromDeployment", deployment_id=other["id"])
    orphan = await broker.ok_cmd("CreateFlowRun", flow_id=flow_id, deployment_id=str(uuid.uuid4()),
                                 state={"type": "SCHEDULED"})  # names a deployment that never was

    async def gone(run_id: str) -> bool:
        return (await broker.qry("GetFlowRun", id=run_id)).get("error", {}).get("code") == "not_found"

    await broker.ok_cmd("DeleteDeployment", id=d["id"])
    # The runs its schedules made go with it, at once.
    assert all([await gone(r) for r in auto])
    # The runs made on demand go at the foreman's next pass.
    on_demand = [manual["id"], *(r["flow_run_id"] for r in bulk), named["id"]]
    assert not any([await gone(r) for r in on_demand])
    assert (await _foreman_pass(broker, service, settings)).runs_of_deleted_deployments == len(on_demand)
    for run_id in on_demand:
        assert await gone(run_id), run_id
    # Its idempotency key went with it, as a DeleteFlowRun frees it.
    again = await broker.cmd("CreateFlowRun", flow_id=flow_id, idempotency_key="once")
    assert again["created"] is True, again
    # Runs that left SCHEDULED, or wait for a slot, stay with their deployment_id; so do the
    # runs of a deployment that exists, and of one the log never held.
    for kept in (started, waiting):
        assert (await broker.ok_qry("GetFlowRun", id=kept["id"]))["deployment_id"] == d["id"]
    for kept in (kept_elsewhere, orphan):
        assert (await broker.ok_qry("GetFlowRun", id=kept["id"]))["state_type"] == "SCHEDULED"
    # A second pass (or a second foreman) finds nothing left to do.
    assert (await _foreman_pass(broker, service, settings)).runs_of_deleted_deployments == 0
    assert (await broker.ok_qry("GetFlowRun", id=waiting["id"]))["state_name"] == "AwaitingConcurrencySlot"


async def test_runs_of_a_deployment_that_never_was_do_not_hide_those_of_a_deleted_one(broker, service, settings):
    """A plain create may name any deployment id, and the decider keeps the runs of one the log
    never held: the sweep asks only for deployments with a tombstone, so 510 such runs (more
    than a pass takes) neither fill every pass with useless commands nor hide the run of a
    deployment actually deleted."""
    flow_id = await a_flow(broker)
    never = str(uuid.UUID(int=1))  # first in the index's order, as in the log's
    scheduled = {"type": "SCHEDULED"}
    for _ in range(510 // 85):
        made = await asyncio.gather(*(broker.cmd("CreateFlowRun", flow_id=flow_id, deployment_id=never, state=scheduled)
                                      for _i in range(85)))
        assert all(m["ok"] for m in made), [m for m in made if not m["ok"]][:2]
    d = await broker.ok_cmd("CreateDeployment", name="d", flow_id=flow_id)
    run = await broker.ok_cmd("CreateFlowRunFromDeployment", deployment_id=d["id"])
    await broker.ok_cmd("DeleteDeployment", id=d["id"])
    await broker.ok_qry("CountFlowRuns")
    sent: list[str] = []
    nc = await connect(settings)
    try:
        sender = CommandSender(nc, settings)

        async def counted(name: str, body: dict) -> dict:
            sent.append(name)
            return await sender(name, body)

        done = await Foreman(service.engine, counted).run_pass()
    finally:
        await nc.close()
    assert done.runs_of_deleted_deployments == 1
    assert sent.count("DeleteRunOfDeletedDeployment") == 1, len(sent)
    broker.last_seq = (await broker.nc.jetstream().stream_info(settings.stream_name)).state.last_seq
    assert (await broker.qry("GetFlowRun", id=run["id"]))["error"]["code"] == "not_found"
    everything = {"flow_runs": {"deployment_id": {"any_": [never]}}}
    assert await broker.ok_qry("CountFlowRuns", **everything) == 510
    await assert_live_equals_rebuild(service, settings)


async def test_runs_made_at_once_from_one_deployment_all_go_at_the_foremans_pass(broker, service, settings):
    d = await broker.ok_cmd("CreateDeployment", name="d", flow_id=await a_flow(broker))
    made = await asyncio.gather(*(broker.cmd("CreateFlowRunFromDeployment", deployment_id=d["id"])
                                  for _ in range(50)),
                                *(broker.cmd("CreateFlowRunsFromDeployment", deployment_id=d["id"],
                                             runs=[{} for _ in range(50)]) for _ in range(2)))
    assert all(m["ok"] for m in made), [m for m in made if not m["ok"]][:2]
    everything = {"flow_runs": {"deployment_id": {"any_": [d["id"]]}}}
    assert await broker.ok_qry("CountFlowRuns", **everything) == 150
    await broker.ok_cmd("DeleteDeployment", id=d["id"])
    assert (await _foreman_pass(broker, service, settings)).runs_of_deleted_deployments == 150
    assert await broker.ok_qry("CountFlowRuns", **everything) == 0


async def test_dp6_a_runs_parameters_are_size_checked(broker):
    d = await broker.ok_cmd("CreateDeployment", name="d", flow_id=await a_flow(broker))
    big = await broker.cmd("CreateFlowRunFromDeployment", deployment_id=d["id"], parameters={"s": "é" * 100_000})
    assert big["error"]["code"] == "invalid" and "600008 bytes" in big["error"]["message"], big
    bulk = await broker.cmd("CreateFlowRunsFromDeployment", deployment_id=d["id"],
                            runs=[{}, {"parameters": {"s": "a" * 600_000}}])
    assert bulk["error"]["code"] == "invalid", bulk
    assert await broker.ok_qry("CountFlowRuns", flow_runs={"deployment_id": {"any_": [d["id"]]}}) == 0


NULLABLE_TEMPLATE = {
    "job_configuration": {"image": "{{ image }}", "cpu": "{{ cpu }}"},
    "variables": {"type": "object", "properties": {"image": {"type": "string", "default": "python:3.12"},
                                                   "cpu": {"type": "integer"}}},
}


async def test_dp14_dp7_null_for_an_optional_parameter_is_accepted(broker):
    d = await broker.ok_cmd("CreateDeployment", name="d", flow_id=await a_flow(broker),
                            parameter_openapi_schema={"type": "object", "properties": {"x": {"type": "string"}}})
    assert (r := await broker.cmd("CreateFlowRunFromDeployment", deployment_id=d["id"], parameters={"x": None}))["ok"], r
    assert (u := await broker.cmd("UpdateDeployment", id=d["id"], parameters={"x": None}))["ok"], u


async def test_dp4_dp15_null_job_variable_is_accepted(broker):
    flow_id = await a_flow(broker)
    await broker.ok_cmd("CreateWorkPool", name="pool", type="process", base_job_template=NULLABLE_TEMPLATE)
    made = await broker.cmd("CreateDeployment", name="d", flow_id=flow_id, work_pool_name="pool",
                            job_variables={"image": None})
    assert made["ok"], made
    d = await broker.ok_cmd("CreateDeployment", name="d2", flow_id=flow_id, work_pool_name="pool")
    assert (r := await broker.cmd("CreateFlowRunFromDeployment", deployment_id=d["id"], job_variables={"cpu": None}))["ok"], r


async def test_dp1_an_upsert_that_gives_labels_keeps_the_system_label(broker):
    flow_id = await a_flow(broker)
    d = await broker.ok_cmd("CreateDeployment", name="d", flow_id=flow_id, labels={"a": 1})
    assert d["labels"] == {"prefect.flow.id": flow_id, "a": 1}
    again = await broker.ok_cmd("CreateDeployment", name="d", flow_id=flow_id, labels={"b": 2})
    assert again["labels"] == {"prefect.flow.id": flow_id, "b": 2}
    assert (await broker.ok_qry("GetDeployment", id=d["id"]))["labels"] == again["labels"]


async def test_dp7_a_replace_list_drops_items_without_a_schedule(broker):
    d = await broker.ok_cmd("CreateDeployment", name="d", flow_id=await a_flow(broker))
    after = await broker.ok_cmd("UpdateDeployment", id=d["id"],
                                schedules=[{"active": False}, {"schedule": {"interval": 60}}])
    assert [s["schedule"]["interval"] for s in after["schedules"]] == [60.0]


async def test_wq12_default_is_the_legacy_default_queue_even_when_renamed(broker):
    await broker.ok_cmd("CreateLegacyWorkQueue", name="x")
    pool = await broker.ok_qry("GetWorkPool", name="default-agent-pool")
    await broker.ok_cmd("UpdateWorkQueue", work_pool_name="default-agent-pool", work_queue_name="default",
                        name="renamed")
    flow_id = await a_flow(broker)
    d = await broker.ok_cmd("CreateDeployment", name="dep", flow_id=flow_id, work_queue_name="default")
    assert d["work_queue_id"] == pool["default_queue_id"]
    queues = await broker.ok_qry("ListWorkQueues", work_pool_name="default-agent-pool")
    assert [(q["name"], q["priority"]) for q in queues] == [("renamed", 1), ("x", 2)]


async def test_dp16_a_queue_named_for_a_run_needs_a_deployment_in_a_pool(broker):
    d = await broker.ok_cmd("CreateDeployment", name="p", flow_id=await a_flow(broker))
    refused = await broker.cmd("CreateFlowRunFromDeployment", deployment_id=d["id"], work_queue_name="q")
    assert refused["error"] == {"code": "invalid", "field": "work_queue_name", "message": (
        f"Cannot create a flow run in work queue 'q' because deployment {d['id']} is not associated with a "
        "work pool.")}
    (item,) = await broker.ok_cmd("CreateFlowRunsFromDeployment", deployment_id=d["id"],
                                  runs=[{"work_queue_name": "q"}])
    assert item["status"] == "FAILED" and "is not associated with a work pool" in item["error"]
    assert await broker.ok_qry("CountFlowRuns", flow_runs={"deployment_id": {"any_": [d["id"]]}}) == 0


async def test_a_scheduled_runs_job_variables_are_checked_like_a_new_runs(broker):
    flow_id = await a_flow(broker)
    await broker.ok_cmd("CreateWorkPool", name="pool", type="process", base_job_template=TEMPLATE)
    d = await broker.ok_cmd("CreateDeployment", name="d", flow_id=flow_id, work_pool_name="pool")
    run = await broker.ok_cmd("CreateFlowRunFromDeployment", deployment_id=d["id"])
    bad = await broker.cmd("UpdateFlowRun", id=run["id"], job_variables={"cpu": "many"})
    assert bad["error"]["code"] == "invalid" and "Validation failed for field 'cpu'" in bad["error"]["message"]
    await broker.ok_cmd("UpdateFlowRun", id=run["id"], job_variables={"cpu": 4})
    assert (await broker.ok_qry("GetFlowRun", id=run["id"]))["job_variables"] == {"cpu": 4}


async def test_an_update_hydrates_the_parameters_it_is_given(broker):
    flow_id = await a_flow(broker)
    await broker.ok_cmd("CreateVariable", name="bucket", value="s3://data")
    d = await broker.ok_cmd("CreateDeployment", name="d", flow_id=flow_id)
    updated = await broker.ok_cmd("UpdateDeployment", id=d["id"], parameters={
        "where": {"__prefect_kind": "workspace_variable", "variable_name": "bucket"}})
    assert updated["parameters"] == {"where": "s3://data"}
    missing = await broker.cmd("UpdateDeployment", id=d["id"], parameters={
        "where": {"__prefect_kind": "workspace_variable", "variable_name": "nope"}})
    assert missing["error"] == {"code": "invalid", "field": "parameters",
                                "message": "Error hydrating deployment parameters: Variable 'nope' not found in workspace."}


async def test_a_deployments_limit_is_the_global_limit_named_after_it(broker):
    flow_id = await a_flow(broker)
    d = await broker.ok_cmd("CreateDeployment", name="d", flow_id=flow_id, concurrency_limit=3)
    name = f"deployment:{d['id']}"
    limit = await broker.ok_qry("GetConcurrencyLimitByName", name=name)
    assert (limit["limit"], limit["active"], limit["active_slots"]) == (3, True, 0)
    assert d["global_concurrency_limit"]["id"] == limit["id"] and d["concurrency_limit"] is None
    await broker.ok_cmd("UpdateDeployment", id=d["id"], description="not the limit")  # kept
    assert (await broker.ok_qry("GetConcurrencyLimitByName", name=name))["limit"] == 3
    await broker.ok_cmd("CreateDeployment", name="d", flow_id=flow_id, concurrency_limit=5)  # the upsert changes it
    assert (await broker.ok_qry("GetConcurrencyLimitByName", name=name))["limit"] == 5
    await broker.ok_cmd("UpdateDeployment", id=d["id"], concurrency_limit=None)  # an explicit null removes it
    assert (await broker.qry("GetConcurrencyLimitByName", name=name))["error"]["code"] == "not_found"
    assert (await broker.ok_qry("GetDeployment", id=d["id"]))["global_concurrency_limit"] is None
    await broker.ok_cmd("UpdateDeployment", id=d["id"], concurrency_limit=2)
    await broker.ok_cmd("DeleteDeployment", id=d["id"])  # goes with the deployment
    assert (await broker.qry("GetConcurrencyLimitByName", name=name))["error"]["code"] == "not_found"


async def _runs_of(broker, deployment_id: str) -> list[dict]:
    await broker.catch_up()
    return await broker.ok_qry("ListFlowRuns", flow_runs={"deployment_id": {"any_": [deployment_id]}},
                               sort="EXPECTED_START_TIME_ASC")


async def _on(instance, command: str, **body) -> dict:
    reply = await instance.commands.execute(command, json.dumps(body).encode())
    assert reply["ok"], reply
    return reply


@pytest.mark.parametrize("cached_by", ["PauseDeployment", "CreateFlowRunFromDeployment"])
async def test_a_redeploy_on_one_instance_is_followed_by_the_scheduler_on_another(broker, service,
                                                                                 second_instance, cached_by):
    """A second instance holds the deployment as it was (it handled a command on it), the first
    redeploys it (unpaused, new parameters, a new schedule id, no run to delete): the
    scheduler's command on the second instance, then on the first, makes each date once, from
    the redeployed deployment. Either way the second instance cached it: with its index (a
    pause), or alone (a run made on demand, which must not touch the index)."""
    flow_id = await a_flow(broker)
    cron = [{"schedule": {"cron": "0 * * * *"}}]
    d = await broker.ok_cmd("CreateDeployment", name="d", flow_id=flow_id, paused=True, schedules=cron,
                            parameters={"v": 1})
    if cached_by == "PauseDeployment":
        await _on(second_instance, "PauseDeployment", id=d["id"])  # a no-op: nothing written
    else:
        made = await _on(second_instance, "CreateFlowRunFromDeployment", deployment_id=d["id"])
        await broker.ok_cmd("DeleteFlowRun", id=made["result"]["id"])
    redeployed = await _on(service, "CreateDeployment", name="d", flow_id=flow_id, paused=False, schedules=cron,
                           parameters={"v": 2})
    assert redeployed["created"] is False
    new_schedule = redeployed["result"]["schedules"][0]["id"]
    stale = await _on(second_instance, "ScheduleDeploymentRuns", deployment_id=d["id"])
    fresh = await _on(service, "ScheduleDeploymentRuns", deployment_id=d["id"])
    broker.last_seq = max(r["seq"] for r in (stale, fresh) if r["seq"] is not None)
    runs = await _runs_of(broker, d["id"])
    dates = [r["expected_start_time"] for r in runs]
    assert len(runs) == 3 and len(set(dates)) == 3, [(r["expected_start_time"], r["created_by"]) for r in runs]
    assert all(r["created_by"]["id"] == new_schedule and r["parameters"] == {"v": 2} for r in runs)


async def test_a_backfill_of_more_dates_than_one_command_makes_goes_on_where_it_stopped(broker):
    """One command makes at most 500 runs: an identical second command makes the rest, the
    dates that already have a run being skipped before the 500 are counted."""
    flow_id = await a_flow(broker)
    d = await broker.ok_cmd("CreateDeployment", name="m", flow_id=flow_id,
                            schedules=[{"schedule": {"interval": 60, "anchor_date": "2020-01-01T00:00:00Z"}}])
    end = datetime.now(UTC).replace(second=0, microsecond=0) - timedelta(seconds=30)
    body = dict(deployment_id=d["id"], start_time=(end - timedelta(minutes=800)).isoformat(),
                end_time=end.isoformat(), min_runs=1000, max_runs=1000)
    first = (await broker.ok_cmd("ScheduleDeploymentRuns", **body))["flow_run_ids"]
    second = (await broker.ok_cmd("ScheduleDeploymentRuns", **body))["flow_run_ids"]
    third = (await broker.ok_cmd("ScheduleDeploymentRuns", **body))["flow_run_ids"]
    assert (len(first), len(second), third) == (500, 300, [])
    assert len(set(first) | set(second)) == 800


async def test_nulls_in_a_schedule_update_change_nothing(broker):
    """Prefect's schedule PATCH applies the non-null fields only: by id, and by slug in an
    update of the deployment."""
    flow_id = await a_flow(broker)
    d = await broker.ok_cmd("CreateDeployment", name="p", flow_id=flow_id, schedules=[])
    (s,) = await broker.ok_cmd("CreateDeploymentSchedules", deployment_id=d["id"], schedules=[
        {"schedule": {"interval": 600}, "slug": "s1", "max_scheduled_runs": 5, "parameters": {"a": 1}}])
    await broker.ok_cmd("UpdateDeploymentSchedule", deployment_id=d["id"], schedule_id=s["id"], slug=None,
                        max_scheduled_runs=None, parameters=None, active=None, schedule=None)
    await broker.ok_cmd("UpdateDeployment", id=d["id"], schedules=[{"slug": "s1", "max_scheduled_runs": None,
                                                                    "parameters": None}])
    (after,) = await broker.ok_qry("ListDeploymentSchedules", deployment_id=d["id"])
    assert (after["id"], after["slug"], after["max_scheduled_runs"], after["parameters"]) == (s["id"], "s1", 5,
                                                                                           {"a": 1})


async def test_a_schedule_added_by_slug_drops_max_scheduled_runs_and_schedules_read_last_updated_first(broker):
    """A schedule an update adds by slug is made as Prefect makes it (without
    `max_scheduled_runs`); a deployment's schedules, and its schedules read alone, come last
    updated first."""
    flow_id = await a_flow(broker)
    d = await broker.ok_cmd("CreateDeployment", name="s", flow_id=flow_id,
                            schedules=[{"schedule": {"interval": 600}, "slug": "a"}])
    await broker.ok_cmd("CreateDeploymentSchedules", deployment_id=d["id"],
                        schedules=[{"schedule": {"interval": 700}, "slug": "b"}])
    assert [x["slug"] for x in await broker.ok_qry("ListDeploymentSchedules", deployment_id=d["id"])] == ["b", "a"]
    after = await broker.ok_cmd("UpdateDeployment", id=d["id"], schedules=[
        {"slug": "a", "active": False}, {"slug": "b"},
        {"slug": "c", "schedule": {"interval": 900}, "max_scheduled_runs": 7}])
    # `a`, `b` and `c` are updated (or made) together, in the request's order
    assert [(x["slug"], x["max_scheduled_runs"]) for x in after["schedules"]] == [("a", None), ("b", None),
                                                                                  ("c", None)]
    a = after["schedules"][0]["id"]
    await broker.ok_cmd("UpdateDeploymentSchedule", deployment_id=d["id"], schedule_id=a, active=True)
    read = await broker.ok_qry("GetDeployment", id=d["id"])
    assert [x["slug"] for x in read["schedules"]] == ["a", "b", "c"]
    await broker.ok_cmd("UpdateDeploymentSchedule", deployment_id=d["id"], schedule_id=after["schedules"][2]["id"],
                        active=False)
    read = await broker.ok_qry("GetDeployment", id=d["id"])
    assert [x["slug"] for x in read["schedules"]] == ["c", "a", "b"]
    listed = await broker.ok_qry("ListDeploymentSchedules", deployment_id=d["id"])
    assert [x["slug"] for x in listed] == ["c", "a", "b"]
