"""Runs created near the broker's max payload, against real NATS and Postgres.

Every later state of a run is an event that carries the whole run again, so a run created
within a few bytes of the max payload could never change state (not even be cancelled). What
creates a run (and a deployment, whose parameters its runs carry) must leave
`RUN_STATE_HEADROOM_BYTES` of the max payload free: closer, the command is `invalid` and
nothing is appended; under it, the run walks to its end. And the Python client sends text as
UTF-8 (not six-byte escapes), and a request too large to send is its `Invalid`, not an
outcome-unknown `Unavailable`."""

from __future__ import annotations

import pytest

from runledger.client import Invalid, RunledgerClient
from runledger.commands.bounds import (
    RUN_FROM_DEPLOYMENT_BYTES,
    RUN_STATE_HEADROOM_BYTES,
    UPDATE_SLACK_BYTES,
)

# What a deployment's creation leaves (its runs are larger than it), and an update of it.
DEPLOYMENT_HEADROOM = RUN_STATE_HEADROOM_BYTES + RUN_FROM_DEPLOYMENT_BYTES

# How far from a bound the tests aim: more than NATS headers (~250 bytes), the run's generated
# name and times vary by, far less than the headroom.
MARGIN = 4_000


async def stored_size(broker, aggregate_type: str, aggregate_id: str, event_type: str) -> int:
    """The body size of an aggregate's first event of that type, as the log holds it."""
    js = broker.nc.jetstream()
    subject = f"{broker.settings.event_subject_prefix}.{aggregate_type}.{aggregate_id}.{event_type}"
    msg = await js.get_msg(broker.settings.stream_name, seq=1, subject=subject, next=True, direct=True)
    return len(msg.data)


async def refused(broker, _name: str, _field: str, /, _headroom: int = RUN_STATE_HEADROOM_BYTES, **body) -> dict:
    """`invalid`, naming `_field` and the headroom, with nothing appended."""
    before = await broker.stream_messages()
    reply = await broker.cmd(_name, **body)
    assert reply["ok"] is False, str(reply)[:300]
    error = reply["error"]
    assert (error["code"], error.get("field")) == ("invalid", _field), error
    assert f"{_headroom:,} bytes" in error["message"] and "later states" in error["message"], error
    assert f"{broker.nc.max_payload:,} bytes" in error["message"], error
    assert await broker.stream_messages() == before
    return reply


def blob(size: int) -> str:
    assert size > 0
    return "x" * size


# ---------------------------------------------------------------------------------------------
# Task runs


async def test_a_task_run_too_close_to_the_max_payload_is_refused_and_one_under_the_headroom_can_end(broker):
    limit = broker.nc.max_payload
    probe = await broker.ok_cmd("CreateTaskRun", task_key="probe", dynamic_key="0", parameters={"p": ""})
    overhead = await stored_size(broker, "task_run", probe["id"], "TaskRunCreated")

    # Under the max payload (created before, then stuck for ever), but inside the headroom.
    await refused(broker, "CreateTaskRun", "parameters", task_key="big", dynamic_key="0",
                  parameters={"p": blob(limit - overhead - MARGIN)})
    await refused(broker, "CreateTaskRun", "parameters", task_key="big", dynamic_key="1",
                  parameters={"p": blob(limit - RUN_STATE_HEADROOM_BYTES - overhead + MARGIN)})

    # Just under the headroom: created, and every later state fits.
    fill = blob(limit - RUN_STATE_HEADROOM_BYTES - overhead - MARGIN)
    made = await broker.ok_cmd("CreateTaskRun", task_key="big", dynamic_key="2", parameters={"p": fill})
    assert await stored_size(broker, "task_run", made["id"], "TaskRunCreated") > limit - RUN_STATE_HEADROOM_BYTES - 2 * MARGIN
    running = await broker.cmd("SetTaskRunState", id=made["id"], state={"type": "RUNNING"})
    assert running["ok"] and running["orchestration"]["status"] == "ACCEPT", str(running)[:300]
    done = await broker.cmd("SetTaskRunState", id=made["id"], state={"type": "COMPLETED", "data": {"answer": 42},
                                                                      "message": "done"})
    assert done["ok"] and done["orchestration"]["status"] == "ACCEPT", str(done)[:300]
    other = await broker.ok_cmd("CreateTaskRun", task_key="big", dynamic_key="3", parameters={"p": fill})
    cancelled = await broker.cmd("SetTaskRunState", id=other["id"], state={"type": "CANCELLED"})
    assert cancelled["ok"] and cancelled["orchestration"]["status"] == "ACCEPT", str(cancelled)[:300]

    read = await broker.ok_qry("GetTaskRun", id=made["id"])
    assert read["state_type"] == "COMPLETED" and read["parameters"] == {"p": fill}
    assert (await broker.ok_qry("GetTaskRun", id=other["id"]))["state_type"] == "CANCELLED"


async def test_a_bulk_of_task_runs_refuses_only_its_oversized_item(broker):
    """Each item of `CreateTaskRuns` is decided alone: the one inside the headroom gets its own
    error, the others are created."""
    limit = broker.nc.max_payload
    probe = await broker.ok_cmd("CreateTaskRun", task_key="probe", dynamic_key="0", parameters={"p": ""})
    overhead = await stored_size(broker, "task_run", probe["id"], "TaskRunCreated")
    big = {"task_key": "bulk", "dynamic_key": "big",
           "parameters": {"p": blob(limit - RUN_STATE_HEADROOM_BYTES - overhead + MARGIN)}}
    before = await broker.stream_messages()
    reply = await broker.cmd("CreateTaskRuns", task_runs=[
        {"task_key": "bulk", "dynamic_key": "0"}, big, {"task_key": "bulk", "dynamic_key": "1"}])
    assert reply["ok"], str(reply)[:300]
    first, second, third = reply["result"]
    assert first["ok"] and third["ok"] and first["created"] and third["created"]
    assert second["ok"] is False and second["error"]["code"] == "invalid"
    assert second["error"]["field"] == "parameters" and f"{RUN_STATE_HEADROOM_BYTES:,} bytes" in second["error"]["message"]
    assert await broker.stream_messages() == before + 2
    assert await broker.ok_qry("CountTaskRuns", task_runs={"task_key": {"any_": ["bulk"]}}) == 2


# ---------------------------------------------------------------------------------------------
# Flow runs: parameters stop at 512 KiB (Prefect's `SizedParameters`), but `context`, `labels`
# and `job_variables` take the rest of the request, so a flow run gets as close as a task run.


async def a_flow(broker, name: str = "etl") -> str:
    return (await broker.ok_cmd("CreateFlow", name=name))["id"]


async def test_a_flow_run_too_close_to_the_max_payload_is_refused_and_one_under_the_headroom_can_end(broker):
    limit = broker.nc.max_payload
    flow_id = await a_flow(broker)
    parameters = {"p": blob(400_000)}
    probe = await broker.ok_cmd("CreateFlowRun", flow_id=flow_id, parameters=parameters, context={"c": ""})
    overhead = await stored_size(broker, "flow_run", probe["id"], "FlowRunCreated")

    await refused(broker, "CreateFlowRun", "context", flow_id=flow_id, parameters=parameters,
                  context={"c": blob(limit - overhead - MARGIN)})
    fill = {"c": blob(limit - RUN_STATE_HEADROOM_BYTES - overhead - MARGIN)}
    made = await broker.ok_cmd("CreateFlowRun", flow_id=flow_id, parameters=parameters, context=fill)
    for state in ("RUNNING", "COMPLETED"):
        reply = await broker.cmd("SetFlowRunState", id=made["id"], state={"type": state, "data": {"answer": 42}})
        assert reply["ok"] and reply["orchestration"]["status"] == "ACCEPT", str(reply)[:300]
    other = await broker.ok_cmd("CreateFlowRun", flow_id=flow_id, parameters=parameters, context=fill)
    # An update cannot bring a run much closer than its creation could (parameters still under
    # 512 KiB); one that keeps its size, or shrinks it, always can.
    await refused(broker, "UpdateFlowRun", "parameters", id=other["id"], _headroom=RUN_STATE_HEADROOM_BYTES - UPDATE_SLACK_BYTES,
                  parameters={"p": blob(400_000 + RUN_STATE_HEADROOM_BYTES)})
    assert (await broker.cmd("UpdateFlowRun", id=other["id"], tags=["kept-its-size"]))["ok"]
    assert (await broker.cmd("UpdateFlowRun", id=other["id"], tags=[]))["ok"]
    cancelled = await broker.cmd("SetFlowRunState", id=other["id"], state={"type": "CANCELLED"})
    assert cancelled["ok"] and cancelled["orchestration"]["status"] == "ACCEPT", str(cancelled)[:300]
    assert (await broker.ok_qry("GetFlowRun", id=made["id"]))["state_type"] == "COMPLETED"
    assert (await broker.ok_qry("GetFlowRun", id=other["id"]))["state_type"] == "CANCELLED"


# ---------------------------------------------------------------------------------------------
# Deployments: their runs carry their parameters (at most 512 KiB, as a run's), labels and tags.


async def test_a_deployment_leaves_the_headroom_its_runs_need(broker):
    limit = broker.nc.max_payload
    flow_id = await a_flow(broker)
    probe = await broker.ok_cmd("CreateDeployment", name="probe", flow_id=flow_id, labels={"l": ""})
    overhead = await stored_size(broker, "deployment", probe["id"], "DeploymentCreated")

    await refused(broker, "CreateDeployment", "labels", name="big", flow_id=flow_id, _headroom=DEPLOYMENT_HEADROOM,
                  labels={"l": blob(limit - overhead - MARGIN)})
    # Within the runs' allowance: a deployment whose runs would not fit is refused too.
    await refused(broker, "CreateDeployment", "labels", name="big", flow_id=flow_id, _headroom=DEPLOYMENT_HEADROOM,
                  labels={"l": blob(limit - RUN_STATE_HEADROOM_BYTES - overhead - 1_000)})
    # An upsert of an existing deployment, and an update, are held to it too.
    await refused(broker, "CreateDeployment", "labels", name="probe", flow_id=flow_id,
                  _headroom=DEPLOYMENT_HEADROOM - UPDATE_SLACK_BYTES, labels={"l": blob(limit - overhead - MARGIN)})
    await refused(broker, "UpdateDeployment", "labels", id=probe["id"], labels={"l": blob(limit - overhead - MARGIN)},
                  _headroom=DEPLOYMENT_HEADROOM - UPDATE_SLACK_BYTES)

    # As close as a deployment may be made: its runs are made (by hand and by its schedule)
    # and walk to their end; it can be paused, resumed and have its schedule switched off.
    made = await broker.ok_cmd("CreateDeployment", name="big", flow_id=flow_id,
                               labels={"l": blob(limit - DEPLOYMENT_HEADROOM - overhead - 1_500)},  # its schedule takes some
                               schedules=[{"schedule": {"interval": 3600}}])
    run = await broker.ok_cmd("CreateFlowRunFromDeployment", deployment_id=made["id"])
    for state in ("PENDING", "RUNNING", "COMPLETED"):
        reply = await broker.cmd("SetFlowRunState", id=run["id"], state={"type": state})
        assert reply["ok"] and reply["orchestration"]["status"] == "ACCEPT", str(reply)[:300]
    scheduled = await broker.ok_cmd("ScheduleDeploymentRuns", deployment_id=made["id"], min_runs=3, max_runs=3)
    assert len(scheduled["flow_run_ids"]) == 3, scheduled
    for command in ("PauseDeployment", "ResumeDeployment"):
        assert (await broker.cmd(command, id=made["id"]))["ok"], command
    schedule_id = (await broker.ok_qry("GetDeployment", id=made["id"]))["schedules"][0]["id"]
    off = await broker.cmd("UpdateDeploymentSchedule", deployment_id=made["id"], schedule_id=schedule_id, active=False)
    assert off["ok"], str(off)[:300]


async def test_a_bulk_of_runs_from_a_deployment_with_an_oversized_item_appends_nothing(broker):
    """`CreateFlowRunsFromDeployment` decides its items together and appends their runs in one
    batch: an item whose run would be inside the headroom refuses the whole bulk (`invalid`,
    nothing appended), as an item over the max payload did before. (An error of its own per item
    would need the decider, commands/deployment_runs.py, to know the max payload.)"""
    limit = broker.nc.max_payload
    flow_id = await a_flow(broker)
    deployment = await broker.ok_cmd("CreateDeployment", name="d", flow_id=flow_id)
    await refused(broker, "CreateFlowRunsFromDeployment", "runs", deployment_id=deployment["id"], runs=[
        {}, {"context": {"c": blob(limit - RUN_STATE_HEADROOM_BYTES)}}, {}])
    reply = await broker.ok_cmd("CreateFlowRunsFromDeployment", deployment_id=deployment["id"], runs=[{}, {}])
    assert [item["status"] for item in reply] == ["CREATED", "CREATED"]


# ---------------------------------------------------------------------------------------------
# The Python client: UTF-8 on the wire, and a request too large to send is `Invalid`.


async def test_the_client_sends_non_ascii_text_as_utf8(service, settings, broker):
    """450,000 "é" are 900,000 bytes in UTF-8 (2.7 MB as `\\u00e9` escapes, past the max
    payload): sent, recorded and read back as they were."""
    text = "é" * 450_000
    async with RunledgerClient(settings) as rl:
        run, created = await rl.create_task_run("utf8", "0", parameters={"text": text})
        assert created is True
        read = await rl.read_task_run(run.id)
    assert read.parameters == {"text": text}
    assert await stored_size(broker, "task_run", str(run.id), "TaskRunCreated") < 1_000_000


async def test_a_request_too_large_to_send_is_invalid_and_sends_nothing(service, settings, broker):
    before = await broker.stream_messages()
    async with RunledgerClient(settings, retries=2, idempotency_keys=True) as rl:
        with pytest.raises(Invalid) as info:
            await rl.create_task_run("too-big", "0", parameters={"p": blob(1_100_000)})
    error = info.value
    assert type(error) is Invalid and error.field == "parameters"
    assert error.message.startswith("CreateTaskRun is too large to send:"), error.message
    assert f"{broker.nc.max_payload:,} bytes" in error.message and "1,1" in error.message
    assert await broker.stream_messages() == before
    # Nothing reached the service: no run under that key.
    assert await broker.ok_qry("CountTaskRuns", task_runs={"task_key": {"any_": ["too-big"]}}) == 0

