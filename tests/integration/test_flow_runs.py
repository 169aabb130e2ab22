"""Flow runs through the broker, against real NATS and Postgres: create (Pending by default,
idempotent on (flow, key)), queue placement, set_state through the orchestration rules with
the outcome in the reply, the state history, bookkeeping in the read model, update (job
variables and priority only while scheduled), delete, filters; bad input appends nothing;
racing keyed creates make one run; replay equals live."""

from __future__ import annotations

import asyncio
import json
import uuid
from datetime import UTC, datetime, timedelta

import pytest

from runledger.infra.nats_connection import connect
from tests.integration.broker import assert_live_equals_rebuild


async def a_flow(broker, name: str = "etl") -> str:
    return (await broker.ok_cmd("CreateFlow", name=name))["id"]


async def set_state(broker, run_id: str, state_type: str, **extra):
    state = {"type": state_type, **{k: v for k, v in extra.items() if k != "force"}}
    reply = await broker.cmd("SetFlowRunState", id=run_id, state=state, force=extra.get("force", False))
    assert reply["ok"], reply
    return reply


def without_estimates(run: dict) -> dict:
    return {k: v for k, v in run.items() if not k.startswith("estimated_")}


async def test_fr1_replies_estimate_run_time_and_lateness_as_of_the_reply(broker):
    flow_id = await a_flow(broker)
    due = datetime.now(UTC) - timedelta(minutes=10)
    made = await broker.ok_cmd("CreateFlowRun", flow_id=flow_id,
                               state={"type": "SCHEDULED", "state_details": {"scheduled_time": due.isoformat()}})
    # Not started, expected 10 minutes ago: as late as that, and no run time yet.
    assert made["estimated_run_time"] == 0.0 and 595 <= made["estimated_start_time_delta"] <= 700
    read = await broker.ok_qry("GetFlowRun", id=made["id"])
    assert read["estimated_run_time"] == 0.0 and read["estimated_start_time_delta"] >= made["estimated_start_time_delta"]
    await set_state(broker, made["id"], "RUNNING")
    await asyncio.sleep(0.2)
    running = await broker.ok_qry("GetFlowRun", id=made["id"])
    started_late = (datetime.fromisoformat(running["start_time"]) - due).total_seconds()
    assert running["estimated_start_time_delta"] == pytest.approx(started_late)  # fixed once started
    assert running["total_run_time"] == 0.0 and running["estimated_run_time"] >= 0.2  # counted while RUNNING
    await set_state(broker, made["id"], "COMPLETED")
    [done] = await broker.ok_qry("ListFlowRuns", flow_runs={"id": {"any_": [made["id"]]}})
    assert done["estimated_run_time"] == done["total_run_time"] > 0
    # On time (or not due yet): no lateness.
    on_time = await broker.ok_cmd("CreateFlowRun", flow_id=flow_id, state={"type": "SCHEDULED", "state_details": {
        "scheduled_time": (datetime.now(UTC) + timedelta(minutes=5)).isoformat()}})
    assert on_time["estimated_start_time_delta"] == 0.0


async def test_a_run_is_created_pending_and_walks_to_completed(broker):
    flow_id = await a_flow(broker)
    made = await broker.cmd("CreateFlowRun", flow_id=flow_id, parameters={"x": 1}, tags=["a", "a", "b"])
    assert made["ok"] and made["created"] is True
    run = made["result"]
    assert run["state"]["type"] == "PENDING" and run["state"]["name"] == "Pending"
    assert run["state_type"] == "PENDING" and run["tags"] == ["a", "b"] and run["run_count"] == 0
    assert run["name"] and "-" in run["name"] and run["total_run_time"] == 0.0
    assert run["state"]["state_details"]["flow_run_id"] == run["id"]

    running = await set_state(broker, run["id"], "RUNNING")
    assert running["orchestration"]["status"] == "ACCEPT" and running["result"]["type"] == "RUNNING"
    done = await set_state(broker, run["id"], "COMPLETED", message="all good")
    assert done["orchestration"]["status"] == "ACCEPT"

    read = await broker.ok_qry("GetFlowRun", id=run["id"])
    assert read["state_type"] == "COMPLETED" and read["state_name"] == "Completed"
    assert read["run_count"] == 1 and read["start_time"] is not None and read["end_time"] is not None
    assert read["total_run_time"] > 0 and read["state"]["message"] == "all good"
    history = await broker.ok_qry("ListFlowRunStates", flow_run_id=run["id"])
    assert [s["type"] for s in history] == ["PENDING", "RUNNING", "COMPLETED"]
    stamps = [s["timestamp"] for s in history]
    assert stamps == sorted(stamps) and len(set(stamps)) == 3


async def test_orchestration_outcomes_reach_the_reply(broker):
    flow_id = await a_flow(broker)
    run = await broker.ok_cmd("CreateFlowRun", flow_id=flow_id)
    # OR-5: a second PENDING is aborted, nothing written, the reply carries the current state.
    again = await set_state(broker, run["id"], "PENDING")
    assert again["orchestration"]["status"] == "ABORT"
    assert again["orchestration"]["details"]["reason"] == \
        "This run is in a PENDING state and cannot transition to a PENDING state."
    assert again["result"]["id"] == run["state"]["id"]
    # OR-11: running before the scheduled time waits.
    later = (datetime.now(UTC) + timedelta(minutes=5)).isoformat()
    scheduled = await broker.ok_cmd("CreateFlowRun", flow_id=flow_id,
                                    state={"type": "SCHEDULED", "state_details": {"scheduled_time": later}})
    wait = await set_state(broker, scheduled["id"], "RUNNING")
    assert wait["orchestration"]["status"] == "WAIT"
    assert 290 <= wait["orchestration"]["details"]["delay_seconds"] <= 300
    # OR-12: a failure with retries left becomes AwaitingRetry.
    retrying = await broker.ok_cmd("CreateFlowRun", flow_id=flow_id, empirical_policy={"retries": 1})
    await set_state(broker, retrying["id"], "RUNNING")
    failed = await set_state(broker, retrying["id"], "FAILED", message="boom")
    assert failed["orchestration"]["status"] == "REJECT"
    assert (failed["result"]["type"], failed["result"]["name"]) == ("SCHEDULED", "AwaitingRetry")
    # force writes what the rules would refuse
    forced = await set_state(broker, run["id"], "PENDING", name="Again", force=True)
    assert forced["orchestration"]["status"] == "ACCEPT"


async def test_or12_deprecated_max_retries_still_retries(broker):
    """Prefect's older clients send `max_retries` / `retry_delay_seconds` only."""
    flow_id = await a_flow(broker)
    run = await broker.ok_cmd("CreateFlowRun", flow_id=flow_id,
                              empirical_policy={"max_retries": 1, "retry_delay_seconds": 2})
    assert (run["empirical_policy"]["retries"], run["empirical_policy"]["retry_delay"]) == (1, 2)
    await set_state(broker, run["id"], "RUNNING")
    failed = await set_state(broker, run["id"], "FAILED", message="boom")
    assert (failed["result"]["type"], failed["result"]["name"]) == ("SCHEDULED", "AwaitingRetry")
    # `retries` given wins; so does an update's policy.
    both = await broker.ok_cmd("CreateFlowRun", flow_id=flow_id, empirical_policy={"max_retries": 5, "retries": 2})
    assert both["empirical_policy"]["retries"] == 2
    await broker.ok_cmd("UpdateFlowRun", id=both["id"], empirical_policy={"max_retries": 3})
    assert (await broker.ok_qry("GetFlowRun", id=both["id"]))["empirical_policy"]["retries"] == 3


async def test_fr7_only_the_clocks_late_marking_cancels_behind_a_full_cancel_new_deployment(broker):
    flow_id = await a_flow(broker)
    deployment = await broker.ok_cmd("CreateDeployment", flow_id=flow_id, name="one", concurrency_limit=1,
                                     concurrency_options={"collision_strategy": "CANCEL_NEW"})
    holder = await broker.ok_cmd("CreateFlowRunFromDeployment", deployment_id=deployment["id"])
    assert (await set_state(broker, holder["id"], "PENDING"))["orchestration"]["status"] == "ACCEPT"
    mine = await broker.ok_cmd("CreateFlowRunFromDeployment", deployment_id=deployment["id"])
    past = (datetime.now(UTC) - timedelta(seconds=30)).isoformat()  # late by the clock's measure
    clocks = await broker.ok_cmd("CreateFlowRunFromDeployment", deployment_id=deployment["id"],
                                 state={"type": "SCHEDULED", "state_details": {"scheduled_time": past}})
    own = await set_state(broker, mine["id"], "SCHEDULED", name="Late")  # a client's own: the core rules
    assert (own["orchestration"]["status"], own["result"]["name"]) == ("ACCEPT", "Late")
    marked = await broker.cmd("MarkFlowRunLate", id=clocks["id"])
    assert marked["orchestration"]["status"] == "REJECT"
    assert marked["orchestration"]["details"]["reason"] == \
        "Deployment concurrency limit is full and uses the CANCEL_NEW strategy."
    assert (marked["result"]["type"], marked["result"]["message"]) == ("CANCELLED",
                                                                       "Deployment concurrency limit reached.")
    again = await broker.cmd("MarkFlowRunLate", id=mine["id"])  # late already: nothing written
    assert again["orchestration"]["status"] == "REJECT" and again["result"]["name"] == "Late"


async def test_fr6_a_subflow_state_is_copied_onto_its_parent_task_run(broker, service, settings):
    flow_id = await a_flow(broker)
    parent = await broker.ok_cmd("CreateFlowRun", flow_id=flow_id)
    await set_state(broker, parent["id"], "RUNNING")
    task = await broker.ok_cmd("CreateTaskRun", flow_run_id=parent["id"], task_key="child", dynamic_key="0")
    child = await broker.ok_cmd("CreateFlowRun", flow_id=flow_id, parent_task_run_id=task["id"])
    read = await broker.ok_qry("GetTaskRun", id=task["id"])
    assert (read["state_type"], read["state"]["state_details"]["child_flow_run_id"]) == ("PENDING", child["id"])
    running = await set_state(broker, child["id"], "RUNNING")
    read = await broker.ok_qry("GetTaskRun", id=task["id"])
    assert read["state_type"] == "RUNNING"
    copied = read["state"]
    assert copied["state_details"]["child_flow_run_id"] == child["id"]
    assert copied["state_details"]["task_run_id"] == task["id"]
    assert copied["state_details"]["flow_run_id"] == parent["id"]
    assert copied["id"] != running["result"]["id"]  # a copy: a state of its own
    await set_state(broker, child["id"], "COMPLETED", data={"type": "unpersisted"}, message="done")
    read = await broker.ok_qry("GetTaskRun", id=task["id"])
    assert (read["state_type"], read["state"]["message"]) == ("COMPLETED", "done")
    # A refused proposal writes nothing on either.
    refused = await set_state(broker, child["id"], "PAUSED")
    assert refused["orchestration"]["status"] == "ABORT"
    assert (await broker.ok_qry("GetTaskRun", id=task["id"]))["state"]["id"] == read["state"]["id"]
    # A subflow needs its parent task run (Prefect's foreign key).
    missing = str(uuid.uuid4())
    orphan = await broker.cmd("CreateFlowRun", flow_id=flow_id, parent_task_run_id=missing)
    assert orphan["error"] == {"code": "not_found", "message": f"Task run {missing} not found."}
    await assert_live_equals_rebuild(service, settings)


async def test_fr6_a_subflow_run_from_a_deployment_stands_for_its_parent_task_run_from_its_first_state(broker):
    """Prefect's `run_deployment` inside a task makes the subflow from a deployment."""
    flow_id = await a_flow(broker)
    parent = await broker.ok_cmd("CreateFlowRun", flow_id=flow_id)
    await set_state(broker, parent["id"], "RUNNING")
    task = await broker.ok_cmd("CreateTaskRun", flow_run_id=parent["id"], task_key="run_deployment", dynamic_key="0")
    deployment = await broker.ok_cmd("CreateDeployment", name="child", flow_id=flow_id)
    child = await broker.ok_cmd("CreateFlowRunFromDeployment", deployment_id=deployment["id"],
                                parent_task_run_id=task["id"])
    assert {"estimated_run_time", "estimated_start_time_delta"} <= set(child)
    read = await broker.ok_qry("GetTaskRun", id=task["id"])
    assert (read["state_type"], read["state"]["state_details"]["child_flow_run_id"]) == ("SCHEDULED", child["id"])
    missing = str(uuid.uuid4())
    orphan = await broker.cmd("CreateFlowRunFromDeployment", deployment_id=deployment["id"],
                              parent_task_run_id=missing)
    assert orphan["error"] == {"code": "not_found", "message": f"Task run {missing} not found."}


async def test_fr6_each_bulk_subflow_from_a_deployment_stands_for_its_parent_task_run(broker):
    """`CreateFlowRunsFromDeployment` copies as the single form does, item by item: an unknown
    parent fails its item alone, and a second subflow of one parent writes on top of the first."""
    flow_id = await a_flow(broker)
    parent = await broker.ok_cmd("CreateFlowRun", flow_id=flow_id)
    await set_state(broker, parent["id"], "RUNNING")
    task = await broker.ok_cmd("CreateTaskRun", flow_run_id=parent["id"], task_key="run_deployment", dynamic_key="0")
    deployment = await broker.ok_cmd("CreateDeployment", name="children", flow_id=flow_id)
    missing = str(uuid.uuid4())
    items = await broker.ok_cmd("CreateFlowRunsFromDeployment", deployment_id=deployment["id"], runs=[
        {"parent_task_run_id": task["id"]}, {"parent_task_run_id": missing}, {},
        {"parent_task_run_id": task["id"], "state": {"type": "PENDING"}}])
    assert [(i["status"], i["error"]) for i in items] == [
        ("CREATED", None), ("FAILED", f"Task run {missing} not found."), ("CREATED", None), ("CREATED", None)]
    first, last = items[0]["flow_run_id"], items[3]["flow_run_id"]
    history = await broker.ok_qry("ListTaskRunStates", task_run_id=task["id"])
    assert [(s["type"], s["state_details"]["child_flow_run_id"]) for s in history] == [
        ("PENDING", None), ("SCHEDULED", first), ("PENDING", last)]
    read = await broker.ok_qry("GetTaskRun", id=task["id"])
    assert (read["state_type"], read["state"]["state_details"]["child_flow_run_id"]) == ("PENDING", last)
    # Its later states are copied too, as any subflow's.
    await set_state(broker, last, "RUNNING")
    assert (await broker.ok_qry("GetTaskRun", id=task["id"]))["state_type"] == "RUNNING"


async def test_fr6_a_subflow_state_with_a_cache_key_is_copied_but_not_cached(broker):
    """The copy onto the parent task run is forced: Prefect's minimal policy, which has no cache
    insertion, decides it. A key in use stays as it was (the copy once failed to append, its
    cache entry expecting the key to be new), and an unused key gets no entry."""
    flow_id = await a_flow(broker)
    parent = await broker.ok_cmd("CreateFlowRun", flow_id=flow_id)
    await set_state(broker, parent["id"], "RUNNING")
    key, unused = f"k-{uuid.uuid4()}", f"unused-{uuid.uuid4()}"
    other = await broker.ok_cmd("CreateTaskRun", flow_run_id=parent["id"], task_key="t", dynamic_key="x")
    assert (await broker.cmd("SetTaskRunState", id=other["id"], state={"type": "RUNNING"}))["ok"]
    assert (await broker.cmd("SetTaskRunState", id=other["id"], state={
        "type": "COMPLETED", "message": "other's", "state_details": {"cache_key": key}}))["ok"]
    for n, cache_key in enumerate([key, unused]):
        task = await broker.ok_cmd("CreateTaskRun", flow_run_id=parent["id"], task_key="child", dynamic_key=str(n))
        child = await broker.ok_cmd("CreateFlowRun", flow_id=flow_id, parent_task_run_id=task["id"])
        await set_state(broker, child["id"], "RUNNING")
        done = await broker.cmd("SetFlowRunState", id=child["id"], state={
            "type": "COMPLETED", "message": "the subflow's", "state_details": {"cache_key": cache_key}})
        assert done["ok"], done
        read = await broker.ok_qry("GetTaskRun", id=task["id"])
        assert (read["state_type"], read["state"]["message"]) == ("COMPLETED", "the subflow's")
    # The key in use still answers with `other`'s state; the unused one answers nothing.
    probe = await broker.ok_cmd("CreateTaskRun", flow_run_id=parent["id"], task_key="probe", dynamic_key="0")
    cached = await broker.cmd("SetTaskRunState", id=probe["id"], state={
        "type": "RUNNING", "state_details": {"cache_key": key}})
    assert cached["orchestration"]["status"] == "REJECT", cached
    assert (cached["result"]["name"], cached["result"]["message"]) == ("Cached", "other's")
    fresh = await broker.ok_cmd("CreateTaskRun", flow_run_id=parent["id"], task_key="probe", dynamic_key="1")
    runs = await broker.cmd("SetTaskRunState", id=fresh["id"], state={
        "type": "RUNNING", "state_details": {"cache_key": unused}})
    assert (runs["orchestration"]["status"], runs["result"]["type"]) == ("ACCEPT", "RUNNING"), runs


async def test_unknown_flow_pool_queue_or_run(broker):
    assert (await broker.cmd("CreateFlowRun", flow_id=str(uuid.uuid4())))["error"]["code"] == "not_found"
    flow_id = await a_flow(broker)
    no_pool = await broker.cmd("CreateFlowRun", flow_id=flow_id, work_pool_name="nope")
    assert no_pool["error"] == {"code": "not_found", "message": 'Work pool "nope" not found.'}
    await broker.ok_cmd("CreateWorkPool", name="pool", type="process")
    no_queue = await broker.cmd("CreateFlowRun", flow_id=flow_id, work_pool_name="pool", work_queue_name="gpu")
    assert no_queue["error"]["code"] == "not_found"  # FR-2: not created
    assert (await broker.qry("GetWorkQueue", work_pool_name="pool", work_queue_name="gpu"))["error"]["code"] == "not_found"
    unknown = str(uuid.uuid4())
    assert (await broker.cmd("SetFlowRunState", id=unknown, state={"type": "RUNNING"}))["error"]["code"] == "not_found"
    assert (await broker.cmd("DeleteFlowRun", id=unknown))["error"]["code"] == "not_found"
    assert (await broker.qry("GetFlowRun", id=unknown))["error"]["code"] == "not_found"
    assert await broker.ok_qry("ListFlowRunStates", flow_run_id=unknown) == []  # a filter, as Prefect's


async def test_a_pool_means_its_default_queue_and_reads_name_the_pool(broker):
    flow_id = await a_flow(broker)
    pool = await broker.ok_cmd("CreateWorkPool", name="pool", type="process")
    run = await broker.ok_cmd("CreateFlowRun", flow_id=flow_id, work_pool_name="pool")
    assert run["work_queue_id"] == pool["default_queue_id"] and run["work_queue_name"] == "default"
    read = await broker.ok_qry("GetFlowRun", id=run["id"])
    assert read["work_pool_name"] == "pool" and read["work_pool_id"] == pool["id"]
    assert [r["id"] for r in await broker.ok_qry("ListFlowRuns", work_pool_name={"any_": ["pool"]})] == [run["id"]]


async def test_an_idempotency_key_returns_the_existing_run_within_its_flow(broker):
    etl, other = await a_flow(broker, "etl"), await a_flow(broker, "other")
    first = await broker.cmd("CreateFlowRun", flow_id=etl, idempotency_key="k1")
    second = await broker.cmd("CreateFlowRun", flow_id=etl, idempotency_key="k1",
                              state={"type": "RUNNING"}, parameters={"changed": True})
    assert second["created"] is False  # unchanged, state not applied (its estimates are as of each reply)
    assert without_estimates(second["result"]) == without_estimates(first["result"])
    elsewhere = await broker.cmd("CreateFlowRun", flow_id=other, idempotency_key="k1")
    assert elsewhere["created"] is True and elsewhere["result"]["id"] != first["result"]["id"]
    # The bus's own key is a different field and works as for every command.
    once = await broker.cmd("CreateFlowRun", flow_id=etl, request_idempotency_key="r1")
    repeat = await broker.cmd("CreateFlowRun", flow_id=etl, request_idempotency_key="r1")
    assert repeat.get("repeat") is True and repeat["result"]["id"] == once["result"]["id"]
    # Deleting the run frees its key.
    await broker.ok_cmd("DeleteFlowRun", id=first["result"]["id"])
    fresh = await broker.cmd("CreateFlowRun", flow_id=etl, idempotency_key="k1")
    assert fresh["created"] is True and fresh["result"]["id"] != first["result"]["id"]


async def test_a_scheduled_runs_key_holds_its_run_within_its_flow(broker):
    """A schedule writes no claim for its runs' keys: a create with such a key still finds the
    scheduled run, whichever way the run is asked for, and makes no second run of that key."""
    flow_id, other = await a_flow(broker, "etl"), await a_flow(broker, "other")
    deployment = await broker.ok_cmd("CreateDeployment", name="d", flow_id=flow_id,
                                     schedules=[{"schedule": {"interval": 3600, "timezone": "Europe/Berlin"}}])
    ids = (await broker.ok_cmd("ScheduleDeploymentRuns", deployment_id=deployment["id"], max_runs=2))["flow_run_ids"]
    scheduled = await broker.ok_qry("GetFlowRun", id=ids[0])
    key = scheduled["idempotency_key"]
    assert key.startswith(f"scheduled {deployment['id']} ")
    ad_hoc = await broker.cmd("CreateFlowRun", flow_id=flow_id, idempotency_key=key, state={"type": "RUNNING"})
    assert ad_hoc["created"] is False and ad_hoc["result"]["id"] == scheduled["id"]
    assert ad_hoc["result"]["state_type"] == "SCHEDULED"  # unchanged, its state not applied
    from_deployment = await broker.cmd("CreateFlowRunFromDeployment", deployment_id=deployment["id"],
                                       idempotency_key=key)
    assert from_deployment["created"] is False and from_deployment["result"]["id"] == scheduled["id"]
    bulk = await broker.ok_cmd("CreateFlowRunsFromDeployment", deployment_id=deployment["id"],
                               runs=[{"idempotency_key": key}])
    assert bulk == [{"flow_run_id": scheduled["id"], "status": "CREATED", "error": None}]
    with_key = await broker.ok_qry("ListFlowRuns", flow_runs={"idempotency_key": {"any_": [key]}})
    assert [r["id"] for r in with_key] == [scheduled["id"]]
    # The key is unique within its flow only; and a deleted scheduled run holds it no more.
    elsewhere = await broker.cmd("CreateFlowRun", flow_id=other, idempotency_key=key)
    assert elsewhere["created"] is True
    await broker.ok_cmd("DeleteFlowRun", id=scheduled["id"])
    fresh = await broker.cmd("CreateFlowRun", flow_id=flow_id, idempotency_key=key)
    assert fresh["created"] is True and fresh["result"]["id"] != scheduled["id"]


async def test_a_created_run_gets_its_flows_or_deployments_labels_and_the_system_ones(broker):
    """As Prefect: the flow's labels (or, for a run naming a deployment, the deployment's), then
    `prefect.flow.id` (and `prefect.deployment.id`), then the request's own, which win."""
    flow_id = (await broker.ok_cmd("CreateFlow", name="etl", labels={"team": "a", "tier": "1"}))["id"]
    run = await broker.ok_cmd("CreateFlowRun", flow_id=flow_id, labels={"mine": 1, "tier": "2"})
    assert run["labels"] == {"team": "a", "tier": "2", "prefect.flow.id": flow_id, "mine": 1}
    deployment = await broker.ok_cmd("CreateDeployment", flow_id=flow_id, name="d", labels={"dep": "x"})
    of_deployment = await broker.ok_cmd("CreateFlowRun", flow_id=flow_id, deployment_id=deployment["id"],
                                        labels={"prefect.flow.id": "mine"})
    assert of_deployment["labels"] == {**deployment["labels"], "prefect.flow.id": "mine",
                                       "prefect.deployment.id": deployment["id"]}
    assert "team" in deployment["labels"] and "dep" in deployment["labels"]
    unknown = await broker.ok_cmd("CreateFlowRun", flow_id=flow_id, deployment_id=str(uuid.uuid4()))
    assert unknown["labels"] == {"team": "a", "tier": "1", "prefect.flow.id": flow_id}
    read = await broker.ok_qry("GetFlowRun", id=run["id"])
    assert read["labels"] == run["labels"]


async def test_thirty_racing_keyed_creates_make_one_run(broker, settings):
    flow_id = await a_flow(broker)
    nc = await connect(settings)
    try:
        body = json.dumps({"flow_id": flow_id, "idempotency_key": "contested"}).encode()
        replies = await asyncio.gather(*(nc.request(settings.command_subject("CreateFlowRun"), body, timeout=20)
                                         for _ in range(30)))
    finally:
        await nc.close()
    bodies = [json.loads(r.data) for r in replies]
    assert all(b["ok"] for b in bodies)
    assert sum(b["created"] for b in bodies) == 1 and len({b["result"]["id"] for b in bodies}) == 1
    broker.last_seq = max(b["seq"] for b in bodies)
    assert await broker.ok_qry("CountFlowRuns") == 1


async def test_updates_change_what_they_name_with_job_variables_and_priority_only_while_scheduled(broker):
    flow_id = await a_flow(broker)
    run = await broker.ok_cmd("CreateFlowRun", flow_id=flow_id)
    await broker.ok_cmd("UpdateFlowRun", id=run["id"], name="renamed", tags=["x"])
    read = await broker.ok_qry("GetFlowRun", id=run["id"])
    assert (read["name"], read["tags"], read["parameters"]) == ("renamed", ["x"], {})
    jv = await broker.cmd("UpdateFlowRun", id=run["id"], job_variables={"a": 1})
    assert jv["error"] == {"code": "invalid", "message": "Job variables for a flow run in state PENDING cannot be updated",
                           "field": "job_variables"}
    prio = await broker.cmd("UpdateFlowRun", id=run["id"], priority=5)
    assert prio["error"]["code"] == "invalid"
    waiting = await broker.ok_cmd("CreateFlowRun", flow_id=flow_id, state={"type": "SCHEDULED"})
    await broker.ok_cmd("UpdateFlowRun", id=waiting["id"], priority=-3)
    assert (await broker.ok_qry("GetFlowRun", id=waiting["id"]))["priority"] == -3


async def test_fr8_explicit_null_job_variables_clears_them_unchecked_and_no_name_gets_a_fresh_one(broker):
    """As Prefect's PATCH: only new job variables are checked; a null or empty name is a new slug."""
    flow_id = await a_flow(broker)
    run = await broker.ok_cmd("CreateFlowRun", flow_id=flow_id, name="named", job_variables={"a": 1})
    await set_state(broker, run["id"], "RUNNING")
    reply = await broker.cmd("UpdateFlowRun", id=run["id"], job_variables=None)
    assert reply["ok"], reply
    assert (await broker.ok_qry("GetFlowRun", id=run["id"]))["job_variables"] == {}
    for no_name in (None, ""):
        await broker.ok_cmd("UpdateFlowRun", id=run["id"], name=no_name)
        renamed = (await broker.ok_qry("GetFlowRun", id=run["id"]))["name"]
        assert renamed not in ("named", "") and "-" in renamed


async def test_flow_runs_are_filtered_sorted_and_counted(broker):
    etl, other = await a_flow(broker, "etl"), await a_flow(broker, "other")
    ids = []
    for i in range(4):
        state = {"type": "SCHEDULED"} if i % 2 else None
        made = await broker.ok_cmd("CreateFlowRun", flow_id=etl if i < 3 else other, name=f"r{i}", tags=[f"t{i % 2}"],
                                   **({"state": state} if state else {}))
        ids.append(made["id"])
    assert await broker.ok_qry("CountFlowRuns") == 4
    assert await broker.ok_qry("CountFlowRuns", flow_runs={"flow_id": {"any_": [etl]}}) == 3
    scheduled = await broker.ok_qry("ListFlowRuns", flow_runs={"state_type": {"any_": ["SCHEDULED"]}}, sort="NAME_ASC")
    assert [r["name"] for r in scheduled] == ["r1", "r3"]
    assert [r["name"] for r in await broker.ok_qry("ListFlowRuns", flow_runs={"tags": {"all_": ["t0"]}},
                                                       sort="NAME_ASC")] == ["r0", "r2"]
    newest_first = await broker.ok_qry("ListFlowRuns")
    assert [r["id"] for r in newest_first] == sorted(ids, reverse=True)
    soon = await broker.ok_qry("CountFlowRuns", flow_runs={"expected_start_time": {
        "before_": (datetime.now(UTC) + timedelta(minutes=1)).isoformat()}})
    assert soon == 4


async def test_flow_runs_sort_by_start_or_due_time_name_and_end_time_as_prefect(broker):
    """START_TIME_*: by when a run started or, not started yet, is due (Prefect's
    coalesce(start_time, expected_start_time)); NAME_DESC; END_TIME_DESC, unfinished runs last."""
    flow_id = await a_flow(broker)
    now = datetime.now(UTC)

    def due(days: int) -> dict:
        return {"type": "SCHEDULED", "state_details": {"scheduled_time": (now + timedelta(days=days)).isoformat()}}

    names = {}
    for name, state in (("b-due-tomorrow", due(1)), ("c-due-yesterday", due(-1)), ("a-running", due(-2)),
                        ("d-done-first", None), ("e-done-last", None)):
        names[name] = (await broker.ok_cmd("CreateFlowRun", flow_id=flow_id, name=name,
                                           **({"state": state} if state else {})))["id"]
    await set_state(broker, names["a-running"], "RUNNING", force=True)  # due two days ago, started now
    for name in ("d-done-first", "e-done-last"):
        await set_state(broker, names[name], "RUNNING")
        await set_state(broker, names[name], "COMPLETED")

    async def order(sort: str) -> list[str]:
        return [r["name"] for r in await broker.ok_qry("ListFlowRuns", sort=sort)]

    by_start = ["b-due-tomorrow", "e-done-last", "d-done-first", "a-running", "c-due-yesterday"]
    assert await order("START_TIME_DESC") == by_start
    assert await order("START_TIME_ASC") == by_start[::-1]
    assert await order("NAME_DESC") == sorted(names, reverse=True)
    by_end = await order("END_TIME_DESC")
    assert by_end[:2] == ["e-done-last", "d-done-first"]
    assert by_end[2:] == sorted(by_end[2:], key=lambda n: names[n])  # no end time: last, by id


@pytest.mark.parametrize("name, body, field", [
    ("CreateFlowRun", {}, "flow_id"),
    ("CreateFlowRun", {"flow_id": "00000000-0000-0000-0000-000000000001", "state": {"type": "WALKING"}}, "state.type"),
    ("CreateFlowRun", {"flow_id": "00000000-0000-0000-0000-000000000001", "name": "x\u0000"}, "name"),
    ("CreateFlowRun", {"flow_id": "00000000-0000-0000-0000-000000000001", "empirical_policy": {"retries": -1}},
     "empirical_policy.retries"),
    ("CreateFlowRun", {"flow_id": "00000000-0000-0000-0000-000000000001", "colour": 1}, "colour"),
    ("SetFlowRunState", {"id": "00000000-0000-0000-0000-000000000001"}, "state"),
    ("SetFlowRunState", {"id": "00000000-0000-0000-0000-000000000001", "state": {"type": "RUNNING", "x": 1}},
     "state.x"),
    ("UpdateFlowRun", {"id": "00000000-0000-0000-0000-000000000001", "priority": 2**31}, "priority"),
    # Keys too are stored (jsonb): a NUL in one would stop the projection.
    ("SetFlowRunState", {"id": "00000000-0000-0000-0000-000000000001", "state": {
        "type": "PAUSED", "state_details": {"run_input_keyset": {"k\u0000": "v"}}}},
     "state.state_details.run_input_keyset.k\x00.[key]"),
])
async def test_bad_flow_run_input_is_invalid_and_appends_nothing(broker, name, body, field):
    before = await broker.stream_messages()
    reply = await broker.raw(broker.settings.command_subject(name), json.dumps(body).encode())
    assert reply["ok"] is False and reply["error"]["code"] == "invalid", reply
    assert reply["error"]["field"] == field
    assert await broker.stream_messages() == before


async def test_replay_of_flow_runs_equals_live(broker, service, settings):
    flow_id = await a_flow(broker)
    for i in range(4):
        run = await broker.ok_cmd("CreateFlowRun", flow_id=flow_id, name=f"r{i}")
        await set_state(broker, run["id"], "RUNNING")
        if i % 2:
            await set_state(broker, run["id"], "COMPLETED")
    await broker.ok_cmd("DeleteFlowRun", id=run["id"])
    await broker.ok_qry("CountFlowRuns")
    assert await assert_live_equals_rebuild(service, settings) >= 4
