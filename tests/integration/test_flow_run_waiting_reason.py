"""Why a run waits when no worker ever tried to claim it (Prefect #12035): the pool poll leaves
out runs of paused or full pools, queues and deployments, and `GetFlowRun` (the client's
`read_flow_run`, `flow-run inspect`) says which, computed at read time; nothing is written."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta

from typer.testing import CliRunner

from runledger.cli.main import _register, app
from runledger.client import RunledgerClient
from tests.integration.broker import assert_live_equals_rebuild, cli_env

_register()


def _scheduled(at: datetime) -> dict:
    return {"type": "SCHEDULED", "state_details": {"scheduled_time": at.isoformat()}}


async def _reason(broker, run_id: str) -> str | None:
    return (await broker.ok_qry("GetFlowRun", id=run_id))["waiting_reason"]


async def test_a_full_pool_says_why_its_late_run_waits(broker, service, settings):
    """The auditor's case: a pool of limit 1 holding a RUNNING run, a run due 5 minutes ago."""
    await broker.ok_cmd("CreateWorkPool", name="limited", type="process", concurrency_limit=1)
    flow_id = (await broker.ok_cmd("CreateFlow", name="held"))["id"]
    await broker.ok_cmd("CreateFlowRun", flow_id=flow_id, work_pool_name="limited", state={"type": "RUNNING"})
    due = datetime.now(UTC) - timedelta(minutes=5)
    waiting = await broker.ok_cmd("CreateFlowRun", flow_id=flow_id, work_pool_name="limited", name="held-back",
                                  state=_scheduled(due))
    assert await broker.ok_qry("GetScheduledFlowRuns", work_pool_name="limited") == []
    late = await broker.cmd("MarkFlowRunLate", id=waiting["id"])  # or the clock got there first
    assert late["ok"], late
    await broker.catch_up()

    reason = "Work pool 'limited' is at its concurrency limit (1): 1 of 1 slot taken."
    read = await broker.ok_qry("GetFlowRun", id=waiting["id"])
    assert (read["state_type"], read["state_name"], read["waiting_reason"]) == ("SCHEDULED", "Late", reason)
    # Only the read of one run computes it; the read model keeps what the log says.
    (listed,) = await broker.ok_qry("ListFlowRuns", flow_runs={"id": {"any_": [waiting["id"]]}})
    assert listed["waiting_reason"] is None

    async with RunledgerClient(settings) as rl:
        assert (await rl.read_flow_run(waiting["id"])).waiting_reason == reason
    runner = CliRunner()
    for name in ("held-back", waiting["id"]):
        shown = await asyncio.to_thread(runner.invoke, app, ["flow-run", "inspect", name], env=cli_env(settings))
        assert shown.exit_code == 0, shown.output
        assert f"Waiting: {reason}" in shown.stdout
    await assert_live_equals_rebuild(service, settings)


async def test_a_full_deployment_says_why_its_run_waits(broker, service, settings):
    await broker.ok_cmd("CreateWorkPool", name="open", type="process")
    flow_id = (await broker.ok_cmd("CreateFlow", name="deployed"))["id"]
    deployment = await broker.ok_cmd("CreateDeployment", flow_id=flow_id, name="one", work_pool_name="open",
                                     concurrency_limit=1, concurrency_options={"collision_strategy": "ENQUEUE"})
    first = await broker.ok_cmd("CreateFlowRunFromDeployment", deployment_id=deployment["id"])
    second = await broker.ok_cmd("CreateFlowRunFromDeployment", deployment_id=deployment["id"])
    queue_id = first["work_queue_id"]
    await broker.ok_cmd("RecordWorkQueuesPolled", work_pool_name="open", work_queue_ids=[queue_id])
    taken = await broker.cmd("SetFlowRunState", id=first["id"], state={"type": "PENDING"})
    assert taken["orchestration"]["status"] == "ACCEPT", taken

    polled = await broker.ok_qry("GetScheduledFlowRuns", work_pool_name="open")
    assert [p["flow_run"]["id"] for p in polled] == []
    assert await _reason(broker, second["id"]) == ("Deployment concurrency limit reached. (1 of 1 slot taken; "
                                                   "collision strategy ENQUEUE: the run waits for a slot.)")
    # Its slot freed, nothing holds it back: a worker polling now is offered it.
    await broker.ok_cmd("RecordWorkQueuesPolled", work_pool_name="open", work_queue_ids=[queue_id])
    await broker.cmd("SetFlowRunState", id=first["id"], state={"type": "CANCELLED"}, force=True)
    assert await _reason(broker, second["id"]) is None
    await assert_live_equals_rebuild(service, settings)


async def test_paused_pools_and_queues_unpolled_queues_and_runs_not_due(broker, service, settings):
    await broker.ok_cmd("CreateWorkPool", name="quiet", type="process")
    flow_id = (await broker.ok_cmd("CreateFlow", name="waits"))["id"]
    run = await broker.ok_cmd("CreateFlowRun", flow_id=flow_id, work_pool_name="quiet",
                              state=_scheduled(datetime.now(UTC) - timedelta(minutes=1)))
    assert await _reason(broker, run["id"]) == ("No worker has polled work queue 'default' of work pool 'quiet' "
                                                "in the last 60 seconds (never polled).")
    await broker.ok_cmd("RecordWorkQueuesPolled", work_pool_name="quiet", work_queue_ids=[run["work_queue_id"]])
    assert await _reason(broker, run["id"]) is None

    later = datetime.now(UTC) + timedelta(hours=1)
    not_due = await broker.ok_cmd("CreateFlowRun", flow_id=flow_id, work_pool_name="quiet", state=_scheduled(later))
    assert await _reason(broker, not_due["id"]) == f"Not due yet: scheduled for {later.isoformat()}."

    await broker.ok_cmd("UpdateWorkQueue", work_pool_name="quiet", work_queue_name="default", is_paused=True)
    assert await _reason(broker, run["id"]) == "Work queue 'default' of work pool 'quiet' is paused."
    await broker.ok_cmd("UpdateWorkPool", name="quiet", is_paused=True)
    assert await _reason(broker, run["id"]) == "Work pool 'quiet' is paused."
    assert await broker.ok_qry("GetScheduledFlowRuns", work_pool_name="quiet") == []

    # A claim refused by its limits records its reason (the list shows it); a read says what holds
    # the run back now, in the poll's words.
    await broker.ok_cmd("UpdateWorkPool", name="quiet", is_paused=False, concurrency_limit=0)
    await broker.ok_cmd("UpdateWorkQueue", work_pool_name="quiet", work_queue_name="default", is_paused=False)
    refused = await broker.cmd("SetFlowRunState", id=run["id"], state={"type": "PENDING"})
    assert refused["orchestration"]["status"] == "REJECT", refused
    await broker.catch_up()
    (listed,) = await broker.ok_qry("ListFlowRuns", flow_runs={"id": {"any_": [run["id"]]}})
    assert listed["waiting_reason"] == "Work pool 'quiet' is at its concurrency limit (0)."
    assert await _reason(broker, run["id"]) == "Work pool 'quiet' is at its concurrency limit (0): 0 of 0 slots taken."
    await assert_live_equals_rebuild(service, settings)


async def test_a_reason_a_refused_claim_recorded_gives_way_to_what_holds_the_run_back_now(broker, service, settings):
    """The second auditor's case: a claim refused by a pool's limit of 1 recorded that reason;
    the limit raised and the pool paused since, the run is said to wait for the pause, not for a
    limit it no longer has; with nothing holding it back, the old reason is said to be past."""
    await broker.ok_cmd("CreateWorkPool", name="lim1", type="process", concurrency_limit=1)
    flow_id = (await broker.ok_cmd("CreateFlow", name="raced"))["id"]
    holder = await broker.ok_cmd("CreateFlowRun", flow_id=flow_id, work_pool_name="lim1", state=_scheduled(datetime.now(UTC)))
    refused = await broker.ok_cmd("CreateFlowRun", flow_id=flow_id, work_pool_name="lim1",
                                  state=_scheduled(datetime.now(UTC)))
    queue_id = refused["work_queue_id"]
    assert (await broker.cmd("SetFlowRunState", id=holder["id"], state={"type": "PENDING"}))["orchestration"]["status"] == "ACCEPT"
    claim = await broker.cmd("SetFlowRunState", id=refused["id"], state={"type": "PENDING"})
    assert claim["orchestration"]["status"] == "REJECT", claim
    recorded = "Work pool 'lim1' is at its concurrency limit (1)."
    await broker.catch_up()
    (listed,) = await broker.ok_qry("ListFlowRuns", flow_runs={"id": {"any_": [refused["id"]]}})
    assert listed["waiting_reason"] == recorded  # what the refusal wrote

    await broker.ok_cmd("UpdateWorkPool", name="lim1", concurrency_limit=5, is_paused=True)
    await broker.catch_up()
    assert await _reason(broker, refused["id"]) == "Work pool 'lim1' is paused."
    await broker.ok_cmd("UpdateWorkPool", name="lim1", is_paused=False)
    await broker.ok_cmd("RecordWorkQueuesPolled", work_pool_name="lim1", work_queue_ids=[queue_id])
    await broker.catch_up()
    assert await _reason(broker, refused["id"]) == (
        "Work pool 'lim1' is at its concurrency limit (1) (said when its last claim was refused; nothing holds it "
        "back now: a worker's next poll may offer it).")
    await assert_live_equals_rebuild(service, settings)


async def test_a_run_of_a_deleted_pool_says_no_poll_will_offer_it(broker, service, settings):
    """The second auditor's case: a pool deleted with a scheduled run in its queue; the run
    stays, and a read says why no worker will get it."""
    await broker.ok_cmd("CreateWorkPool", name="doomed", type="process")
    flow_id = (await broker.ok_cmd("CreateFlow", name="stranded"))["id"]
    run = await broker.ok_cmd("CreateFlowRun", flow_id=flow_id, work_pool_name="doomed",
                              state=_scheduled(datetime.now(UTC)))
    await broker.ok_cmd("DeleteWorkPool", name="doomed")
    await broker.catch_up()
    assert await _reason(broker, run["id"]) == (
        "Its work queue 'default' no longer exists (it, or its work pool, was deleted): no worker's poll will offer "
        "this run; cancel or delete it, or make its runs anew in a queue that exists.")
