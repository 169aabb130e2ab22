"""What slots look like from outside (BEHAVIOUR §4): the counts in pool, queue and deployment
replies; a claim refused by a full queue, pool or deployment, with the reason in the run's
read model and in `flow-run inspect`; slots given back when a run finishes or is deleted."""

from __future__ import annotations

import asyncio
import json
from datetime import UTC, datetime, timedelta

from typer.testing import CliRunner

from runledger.cli.main import _register, app
from runledger.client import RunledgerClient
from runledger.handlers.background import Clock, CommandSender
from runledger.handlers.foreman import Foreman
from runledger.handlers.service import Service
from runledger.infra.nats_connection import connect
from tests.integration.broker import assert_live_equals_rebuild, cli_env

_register()


async def _run_in(broker, flow_id: str, queue: str, state: str, **extra) -> dict:
    return await broker.ok_cmd("CreateFlowRun", flow_id=flow_id, work_pool_name="limited", work_queue_name=queue,
                               state={"type": state}, **extra)


async def _set(broker, run_id: str, state: str, force: bool = False) -> dict:
    reply = await broker.cmd("SetFlowRunState", id=run_id, state={"type": state}, force=force)
    assert reply["ok"], reply
    return reply


async def test_counts_in_replies_and_a_refused_claim_says_why(broker, service, settings):
    await broker.ok_cmd("CreateWorkPool", name="limited", type="process", concurrency_limit=3)
    await broker.ok_cmd("CreateWorkQueue", work_pool_name="limited", name="a", concurrency_limit=2)
    await broker.ok_cmd("CreateWorkQueue", work_pool_name="limited", name="b")
    flow_id = (await broker.ok_cmd("CreateFlow", name="counted"))["id"]
    pending = await _run_in(broker, flow_id, "a", "PENDING")  # a create straight into a slot counts
    running = await _run_in(broker, flow_id, "a", "SCHEDULED")
    assert (await _set(broker, running["id"], "PENDING"))["orchestration"]["status"] == "ACCEPT"
    assert (await _set(broker, running["id"], "RUNNING"))["orchestration"]["status"] == "ACCEPT"
    waiting = await _run_in(broker, flow_id, "a", "SCHEDULED")

    refused = await _set(broker, waiting["id"], "PENDING")
    assert refused["orchestration"]["status"] == "REJECT"
    reason = "Work queue 'a' of work pool 'limited' is at its concurrency limit (2)."
    assert refused["orchestration"]["details"]["reason"] == reason
    assert refused["result"]["type"] == "SCHEDULED"  # nothing written: the current state
    read = await broker.ok_qry("GetFlowRun", id=waiting["id"])  # what holds it back now, with the slots counted
    assert read["waiting_reason"] == f"{reason[:-1]}: 2 of 2 slots taken." and read["state_type"] == "SCHEDULED"

    pool = await broker.ok_qry("GetWorkPool", name="limited")
    assert pool["active_slots"] == 2
    queue_a = await broker.ok_qry("GetWorkQueue", work_pool_name="limited", work_queue_name="a")
    assert queue_a["active_slots"] == 2
    queue_b = await broker.ok_qry("GetWorkQueue", work_pool_name="limited", work_queue_name="b")
    assert queue_b["active_slots"] is None  # no limit: no count (SL-2)

    # The pool's limit is shared: queue b has room, the pool has one slot left.
    other = await _run_in(broker, flow_id, "b", "SCHEDULED")
    assert (await _set(broker, other["id"], "PENDING"))["orchestration"]["status"] == "ACCEPT"
    last = await _run_in(broker, flow_id, "b", "SCHEDULED")
    full = await _set(broker, last["id"], "PENDING")
    assert full["orchestration"]["details"]["reason"] == "Work pool 'limited' is at its concurrency limit (3)."

    # CANCELLING gives back the pool API's slot, not the legacy queue API's count.
    assert (await _set(broker, running["id"], "CANCELLING"))["orchestration"]["status"] == "ACCEPT"
    by_id = await broker.ok_qry("GetWorkQueueById", id=queue_a["id"])
    assert by_id["active_slots"] == 2
    assert (await broker.ok_qry("GetWorkPool", name="limited"))["active_slots"] == 2

    # A freed slot: the waiting run's claim goes through and its reason is cleared.
    await broker.ok_cmd("DeleteFlowRun", id=pending["id"])
    assert (await _set(broker, waiting["id"], "PENDING"))["orchestration"]["status"] == "ACCEPT"
    assert (await broker.ok_qry("GetFlowRun", id=waiting["id"]))["waiting_reason"] is None
    await assert_live_equals_rebuild(service, settings)


async def test_deployment_slots_in_its_reply_and_cancel_new(broker, service, settings):
    await broker.ok_cmd("CreateWorkPool", name="limited", type="process")
    flow_id = (await broker.ok_cmd("CreateFlow", name="deployed"))["id"]
    deployment = await broker.ok_cmd("CreateDeployment", flow_id=flow_id, name="one", work_pool_name="limited",
                                     concurrency_limit=1, concurrency_options={"collision_strategy": "CANCEL_NEW"})
    first = await broker.ok_cmd("CreateFlowRunFromDeployment", deployment_id=deployment["id"])
    second = await broker.ok_cmd("CreateFlowRunFromDeployment", deployment_id=deployment["id"])
    took = await _set(broker, first["id"], "PENDING")
    lease = took["result"]["state_details"]["deployment_concurrency_lease_id"]
    assert took["orchestration"]["status"] == "ACCEPT" and lease is not None
    read = await broker.ok_qry("GetDeployment", id=deployment["id"])
    assert read["global_concurrency_limit"]["active_slots"] == 1

    cancelled = await _set(broker, second["id"], "PENDING")
    assert cancelled["orchestration"]["status"] == "REJECT"
    assert (cancelled["result"]["type"], cancelled["result"]["message"]) == ("CANCELLED",
                                                                              "Deployment concurrency limit reached.")
    running = await _set(broker, first["id"], "RUNNING")
    assert running["result"]["state_details"]["deployment_concurrency_lease_id"] == lease
    await _set(broker, first["id"], "COMPLETED")
    read = await broker.ok_qry("GetDeployment", id=deployment["id"])
    assert read["global_concurrency_limit"]["active_slots"] == 0
    await assert_live_equals_rebuild(service, settings)


async def test_flow_run_inspect_shows_why_a_run_waits(broker, service, settings):
    await broker.ok_cmd("CreateWorkPool", name="limited", type="process", concurrency_limit=1)
    flow_id = (await broker.ok_cmd("CreateFlow", name="shown"))["id"]
    await _run_in(broker, flow_id, "default", "RUNNING")
    waiting = await _run_in(broker, flow_id, "default", "SCHEDULED", name="held-back")
    env = cli_env(settings)
    runner = CliRunner()

    async def cli(*args: str):
        return await asyncio.to_thread(runner.invoke, app, list(args), env=env)

    claim = await cli("flow-run", "set-state", "held-back", "pending")
    assert claim.exit_code == 8, claim.output
    assert claim.stdout.startswith("REJECT: ") and "Work pool 'limited' is at its concurrency limit (1)." in claim.stdout
    shown = await cli("flow-run", "inspect", "held-back")
    assert shown.exit_code == 0, shown.output
    assert "Waiting: Work pool 'limited' is at its concurrency limit (1): 1 of 1 slot taken." in shown.stdout
    as_json = json.loads((await cli("flow-run", "inspect", waiting["id"], "--json")).stdout)
    assert as_json["waiting_reason"] == "Work pool 'limited' is at its concurrency limit (1): 1 of 1 slot taken."


async def test_a_worker_that_stops_heart_beating_has_its_runs_crashed_and_their_slots_freed(broker, service,
                                                                                            settings):
    """The claim lasts as long as the claiming worker's heartbeats: a worker that goes silent
    is marked OFFLINE after 3 intervals, and the foreman's same tick crashes its runs, which
    gives their slots back to the runs waiting for them."""
    await broker.ok_cmd("CreateWorkPool", name="limited", type="process", concurrency_limit=1)
    flow_id = (await broker.ok_cmd("CreateFlow", name="abandoned"))["id"]
    for name in ("silent", "alive"):
        await broker.ok_cmd("WorkerHeartbeat", work_pool_name="limited", name=name, heartbeat_interval_seconds=1)
    held = await _run_in(broker, flow_id, "default", "SCHEDULED")
    blocked = await _run_in(broker, flow_id, "default", "SCHEDULED")

    ghost = await broker.cmd("SetFlowRunState", id=held["id"], state={"type": "PENDING"}, worker_name="ghost")
    assert ghost["orchestration"]["status"] == "REJECT"
    assert ghost["orchestration"]["details"]["reason"] == ("Worker 'ghost' is not online in work pool 'limited': "
                                                            "send a heartbeat first.")
    claimed = await broker.cmd("SetFlowRunState", id=held["id"], state={"type": "PENDING"}, worker_name="silent")
    assert claimed["orchestration"]["status"] == "ACCEPT"
    await _set(broker, held["id"], "RUNNING")
    assert (await broker.ok_qry("GetFlowRun", id=held["id"]))["worker_name"] == "silent"
    full = await broker.cmd("SetFlowRunState", id=blocked["id"], state={"type": "PENDING"}, worker_name="alive")
    assert full["orchestration"]["status"] == "REJECT"

    nc = await connect(settings)
    foreman = Foreman(service.engine, CommandSender(nc, settings), interval=0.5)
    stop = asyncio.Event()

    async def keep_alive() -> None:
        while not stop.is_set():
            await broker.ok_cmd("WorkerHeartbeat", work_pool_name="limited", name="alive")
            await asyncio.sleep(0.3)

    loop = asyncio.get_running_loop()
    silent_since = loop.time()
    tasks = [asyncio.create_task(foreman.run()), asyncio.create_task(keep_alive())]
    try:
        while (await broker.ok_qry("GetFlowRun", id=held["id"]))["state_type"] != "CRASHED":
            assert loop.time() - silent_since < 3 * 1 + 0.5 + 5, "the silent worker's run was never crashed"
            await asyncio.sleep(0.1)
    finally:
        stop.set()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await nc.close()

    crashed = await broker.ok_qry("GetFlowRun", id=held["id"])
    assert crashed["state"]["message"] == ("Worker 'silent' of work pool 'limited' stopped sending heartbeats; "
                                           "its run crashed.")
    assert crashed["worker_name"] is None
    workers = {w["name"]: w["status"] for w in await broker.ok_qry("ListWorkers", work_pool_name="limited")}
    assert workers == {"silent": "OFFLINE", "alive": "ONLINE"}
    # Its slot is free: the waiting run's claim goes through.
    now_claimed = await broker.cmd("SetFlowRunState", id=blocked["id"], state={"type": "PENDING"}, worker_name="alive")
    assert now_claimed["orchestration"]["status"] == "ACCEPT"
    # Asked again (a second foreman, a stale read), nothing more happens: the run moved on.
    before = await broker.stream_messages()
    again = await broker.cmd("CrashFlowRunOfLostWorker", id=held["id"], worker_name="silent")
    assert again["ok"] and again["result"]["type"] == "CRASHED"
    alive_run = await broker.cmd("CrashFlowRunOfLostWorker", id=blocked["id"], worker_name="alive")
    assert alive_run["result"]["type"] == "PENDING"  # an ONLINE worker's run is its own
    assert await broker.stream_messages() == before
    await assert_live_equals_rebuild(service, settings)


async def test_cancel_new_cancels_a_run_that_falls_due_while_its_deployment_is_full(broker, service, settings):
    """Held back by something else than its deployment (here its pool's limit), a new run of a
    CANCEL_NEW deployment is cancelled when the clock finds it late and the deployment full."""
    await broker.ok_cmd("CreateWorkPool", name="limited", type="process", concurrency_limit=1)
    flow_id = (await broker.ok_cmd("CreateFlow", name="impatient"))["id"]
    deployment = await broker.ok_cmd("CreateDeployment", flow_id=flow_id, name="one", work_pool_name="limited",
                                     concurrency_limit=1, concurrency_options={"collision_strategy": "CANCEL_NEW"})
    first = await broker.ok_cmd("CreateFlowRunFromDeployment", deployment_id=deployment["id"])
    assert (await _set(broker, first["id"], "PENDING"))["orchestration"]["status"] == "ACCEPT"
    past = (datetime.now(UTC) - timedelta(seconds=30)).isoformat()
    due = await broker.ok_cmd("CreateFlowRunFromDeployment", deployment_id=deployment["id"],
                              state={"type": "SCHEDULED", "state_details": {"scheduled_time": past}})
    await broker.ok_qry("CountFlowRuns")
    nc = await connect(settings)
    try:
        await Clock(service.engine, CommandSender(nc, settings)).mark_late()
    finally:
        await nc.close()
    await broker.catch_up()
    cancelled = await broker.ok_qry("GetFlowRun", id=due["id"])
    assert (cancelled["state_type"], cancelled["state"]["message"]) == ("CANCELLED",
                                                                        "Deployment concurrency limit reached.")


async def test_concurrency_status_views_show_who_holds_the_slots(broker, service, settings):
    await broker.ok_cmd("CreateWorkPool", name="limited", type="process", concurrency_limit=10)
    await broker.ok_cmd("CreateWorkQueue", work_pool_name="limited", name="a", concurrency_limit=5, priority=1)
    await broker.ok_cmd("CreateWorkQueue", work_pool_name="limited", name="b", priority=2)
    await broker.ok_cmd("UpdateWorkQueue", work_pool_name="limited", work_queue_name="b", is_paused=True)
    flow_id = (await broker.ok_cmd("CreateFlow", name="viewed"))["id"]
    in_a = [await _run_in(broker, flow_id, "a", "PENDING") for _ in range(3)]
    running = await _run_in(broker, flow_id, "b", "RUNNING")
    cancelling = await _run_in(broker, flow_id, "a", "RUNNING")
    await _set(broker, cancelling["id"], "CANCELLING")
    await _run_in(broker, flow_id, "a", "SCHEDULED")  # holds nothing

    status = await broker.ok_qry("GetWorkPoolConcurrencyStatus", work_pool_name="limited", flow_run_limit=2)
    assert (status["active_slots"], status["concurrency_limit"]) == (4, 10)  # paused queue b's run counts
    by_name = {q["queue_name"]: q for q in status["queues"]}
    assert [q["queue_name"] for q in status["queues"]] == ["a", "b", "default"]
    assert (by_name["a"]["active_slots"], by_name["a"]["flow_run_count"], len(by_name["a"]["flow_runs"])) == (3, 3, 2)
    assert [r["id"] for r in by_name["a"]["flow_runs"]] == sorted(r["id"] for r in in_a)[:2]  # the first by id
    assert [r["id"] for r in by_name["b"]["flow_runs"]] == [running["id"]]
    summary = by_name["b"]["flow_runs"][0]
    assert summary["state_type"] == "RUNNING" and summary["time_in_current_state"] >= 0
    paged = await broker.ok_qry("GetWorkPoolConcurrencyStatus", work_pool_name="limited", page=2, limit=2)
    assert [q["queue_name"] for q in paged["queues"]] == ["default"] and paged["pages"] == 2
    assert paged["active_slots"] == 4  # the whole pool's, not the page's

    queue_a = await broker.ok_qry("GetWorkQueue", work_pool_name="limited", work_queue_name="a")
    legacy = await broker.ok_qry("GetWorkQueueConcurrencyStatus", id=queue_a["id"], limit=2)
    assert legacy["active_slots"] == 4 and legacy["count"] == 4  # CANCELLING counts here
    assert len(legacy["flow_runs"]) == 2 and legacy["pages"] == 2
    ids = sorted([*(r["id"] for r in in_a), cancelling["id"]])
    assert [r["id"] for r in legacy["flow_runs"]] == ids[:2]
    missing = await broker.qry("GetWorkPoolConcurrencyStatus", work_pool_name="nope")
    assert missing["error"]["code"] == "not_found"
    missing = await broker.qry("GetWorkQueueConcurrencyStatus", id="00000000-0000-0000-0000-000000000000")
    assert missing["error"]["code"] == "not_found"
    async with RunledgerClient(settings) as rl:
        await rl.catch_up()
        pool_status = await rl.read_work_pool_concurrency_status("limited", flow_run_limit=1)
        assert pool_status.active_slots == 4 and pool_status.queues[0].flow_runs[0].state_type == "PENDING"
        queue_status = await rl.read_work_queue_concurrency_status(queue_a["id"])
        assert queue_status.active_slots == 4 and len(queue_status.flow_runs) == 4
        run = await rl.read_flow_run(cancelling["id"])
        assert run.worker_name is None and run.state.type == "CANCELLING"


async def test_a_pool_concurrency_status_shows_each_queues_runs_by_id(broker):
    """As Prefect's `get_work_pool_slot_holders`: by id, whatever the runs' start times."""
    await broker.ok_cmd("CreateWorkPool", name="limited", type="process", concurrency_limit=10)
    await broker.ok_cmd("CreateWorkQueue", work_pool_name="limited", name="q")
    flow_id = (await broker.ok_cmd("CreateFlow", name="etl"))["id"]
    ids = [(await _run_in(broker, flow_id, "q", "PENDING"))["id"] for _ in range(5)]
    while True:  # a run with a start time, and an id after a PENDING one's (ids are random)
        ids.append((await _run_in(broker, flow_id, "q", "RUNNING"))["id"])
        if ids[-1] > min(ids[:5]):
            break
    status = await broker.ok_qry("GetWorkPoolConcurrencyStatus", work_pool_name="limited", flow_run_limit=len(ids))
    q = [x for x in status["queues"] if x["queue_name"] == "q"][0]
    assert [r["id"] for r in q["flow_runs"]] == sorted(ids)
    cut = await broker.ok_qry("GetWorkPoolConcurrencyStatus", work_pool_name="limited", flow_run_limit=2)
    assert [r["id"] for r in [x for x in cut["queues"] if x["queue_name"] == "q"][0]["flow_runs"]] == sorted(ids)[:2]


async def test_a_tag_filter_queue_counts_the_runs_its_filter_matches(broker):
    """Through the legacy queue API, a deprecated tag-based queue's `active_slots` are the
    PENDING and RUNNING runs its filter matches, wherever they are queued, not its own runs."""
    await broker.ok_cmd("CreateWorkPool", name="limited", type="process")
    await broker.ok_cmd("CreateWorkQueue", work_pool_name="limited", name="q")
    flow_id = (await broker.ok_cmd("CreateFlow", name="etl"))["id"]
    d1 = (await broker.ok_cmd("CreateDeployment", name="d1", flow_id=flow_id, work_pool_name="limited"))["id"]
    tagged = await broker.ok_cmd("CreateLegacyWorkQueue", name="tagged", concurrency_limit=10,
                                 filter={"tags": ["gpu"], "deployment_ids": [d1]})
    await _run_in(broker, flow_id, "q", "RUNNING", tags=["gpu"], deployment_id=d1)
    await _run_in(broker, flow_id, "q", "PENDING", tags=["gpu", "x"], deployment_id=d1)
    await _run_in(broker, flow_id, "q", "CANCELLING", tags=["gpu"], deployment_id=d1)  # not counted here
    await _run_in(broker, flow_id, "q", "RUNNING", tags=["cpu"], deployment_id=d1)  # lacks the tag
    await broker.ok_cmd("CreateFlowRun", flow_id=flow_id, work_pool_name="default-agent-pool",
                        work_queue_name="tagged", state={"type": "CANCELLING"})  # its own, but matches nothing

    async def counts() -> set[int]:
        by_id = await broker.ok_qry("GetWorkQueueById", id=tagged["id"])
        by_name = await broker.ok_qry("GetLegacyWorkQueue", name="tagged")
        listed = [w for w in await broker.ok_qry("ListAllWorkQueues") if w["id"] == tagged["id"]][0]
        return {by_id["active_slots"], by_name["active_slots"], listed["active_slots"]}

    assert await counts() == {2}
    await broker.ok_cmd("UpdateWorkQueueById", id=tagged["id"], filter=None)  # by its own runs again
    assert await counts() == {1}


async def test_runs_of_a_full_deployment_do_not_take_the_place_of_runs_that_can_start(broker, service, settings):
    """Prefect #19403: a worker's poll is filled with runs whose deployment is at its limit,
    each then sent to wait, and every other run of the queue waits behind them. Here the poll
    leaves them out while the deployment is full (ENQUEUE); CANCEL_NEW runs are offered, so
    that their claim cancels them."""
    await broker.ok_cmd("CreateWorkPool", name="shared", type="process")
    flow_id = (await broker.ok_cmd("CreateFlow", name="mixed"))["id"]
    full = await broker.ok_cmd("CreateDeployment", flow_id=flow_id, name="one-at-a-time", work_pool_name="shared",
                               concurrency_limit=1)
    free = await broker.ok_cmd("CreateDeployment", flow_id=flow_id, name="free", work_pool_name="shared")
    now = datetime.now(UTC)

    async def scheduled(deployment: dict, minutes_ago: int) -> str:
        at = (now - timedelta(minutes=minutes_ago)).isoformat()
        return (await broker.ok_cmd("CreateFlowRunFromDeployment", deployment_id=deployment["id"],
                                    state={"type": "SCHEDULED", "state_details": {"scheduled_time": at}}))["id"]

    holder = await scheduled(full, 60)
    blocked = [await scheduled(full, 50 - i) for i in range(3)]  # earlier than the free ones
    startable = [await scheduled(free, 10 - i) for i in range(2)]

    async def poll() -> list[str]:
        return [item["flow_run"]["id"] for item in
                await broker.ok_qry("GetScheduledFlowRuns", work_pool_name="shared", limit=3)]

    assert await poll() == [holder, *blocked[:2]]  # not full yet: time order, as Prefect
    assert (await _set(broker, holder, "PENDING"))["orchestration"]["status"] == "ACCEPT"
    assert await poll() == startable  # full: its runs stand aside
    await _set(broker, holder, "COMPLETED")
    assert await poll() == blocked  # a free slot: they are offered again
    await broker.ok_cmd("UpdateDeployment", id=full["id"], concurrency_options={"collision_strategy": "CANCEL_NEW"})
    assert (await _set(broker, blocked[0], "PENDING"))["orchestration"]["status"] == "ACCEPT"
    assert await poll() == blocked[1:] + startable[:1]  # CANCEL_NEW: offered, to be cancelled


async def test_a_release_hands_the_slots_it_frees_to_the_run_it_wakes(broker, service, settings):
    """Beyond Prefect, where a freed slot waits for the next retry of whichever run gets there
    first (#23183, #15618): the release wakes the first run waiting for the deployment's slot
    and hands it the deployment's, queue's and pool's slots it freed. No other run takes them
    meanwhile, the poll offers that run first, and its claim writes its own state alone."""
    await broker.ok_cmd("CreateWorkPool", name="limited", type="process", concurrency_limit=2)
    flow_id = (await broker.ok_cmd("CreateFlow", name="handed"))["id"]
    deployment = await broker.ok_cmd("CreateDeployment", flow_id=flow_id, name="one", work_pool_name="limited",
                                     concurrency_limit=1)
    holder, waiter = [(await broker.ok_cmd("CreateFlowRunFromDeployment", deployment_id=deployment["id"]))["id"]
                      for _ in range(2)]
    an_hour_ago = (datetime.now(UTC) - timedelta(hours=1)).isoformat()
    other = (await broker.ok_cmd("CreateFlowRun", flow_id=flow_id, work_pool_name="limited", state={
        "type": "SCHEDULED", "state_details": {"scheduled_time": an_hour_ago}}))["id"]  # due before both
    assert (await _set(broker, holder, "PENDING"))["orchestration"]["status"] == "ACCEPT"
    assert (await _set(broker, waiter, "PENDING"))["result"]["name"] == "AwaitingConcurrencySlot"
    filler = await _run_in(broker, flow_id, "default", "PENDING")  # the pool's other slot

    await _set(broker, holder, "COMPLETED")
    woken = await broker.ok_qry("GetFlowRun", id=waiter)
    assert woken["state_name"] == "AwaitingConcurrencySlot" and woken["pool_slot_reserved"] is True
    lease = woken["state"]["state_details"]["deployment_concurrency_lease_id"]
    assert lease is not None
    deployment_read = await broker.ok_qry("GetDeployment", id=deployment["id"])
    assert deployment_read["global_concurrency_limit"]["active_slots"] == 1
    shown = await asyncio.to_thread(CliRunner().invoke, app, ["flow-run", "inspect", waiter], env=cli_env(settings))
    assert shown.exit_code == 0 and "a release handed this run the slots it freed" in shown.stdout, shown.output

    # The run due an hour earlier is not offered and cannot take the pool's only slot.
    polled = await broker.ok_qry("GetScheduledFlowRuns", work_pool_name="limited", limit=10)
    assert [item["flow_run"]["id"] for item in polled] == [waiter]
    refused = await _set(broker, other, "PENDING")
    assert refused["orchestration"]["details"]["reason"] == "Work pool 'limited' is at its concurrency limit (2)."

    before = await broker.stream_messages()
    claimed = await _set(broker, waiter, "PENDING")
    assert claimed["orchestration"]["status"] == "ACCEPT"
    assert claimed["result"]["state_details"]["deployment_concurrency_lease_id"] == lease
    assert await broker.stream_messages() == before + 1  # its own state, nothing else
    claimed_read = await broker.ok_qry("GetFlowRun", id=waiter)
    assert claimed_read["state_type"] == "PENDING" and claimed_read["pool_slot_reserved"] is False
    assert (await broker.ok_qry("GetWorkPool", name="limited"))["active_slots"] == 2
    assert (await broker.ok_qry("GetScheduledFlowRuns", work_pool_name="limited", limit=10)) == []
    # The filler ends: the run due an hour ago is offered and takes the freed slot.
    await _set(broker, filler["id"], "COMPLETED")
    polled = await broker.ok_qry("GetScheduledFlowRuns", work_pool_name="limited", limit=10)
    assert [item["flow_run"]["id"] for item in polled] == [other]
    assert (await _set(broker, other, "PENDING"))["orchestration"]["status"] == "ACCEPT"
    await assert_live_equals_rebuild(service, settings)


async def test_deleting_a_queue_frees_the_pool_slots_its_runs_held_at_once(broker, service, settings):
    """As in Prefect, where deleting a queue clears its runs' queue and such runs count for
    nothing: the claim side agrees with the pool's count and the poll at once, and the deleted
    queue's runs, ending or claimed later, neither give back nor take a slot of the pool."""
    await broker.ok_cmd("CreateWorkPool", name="limited", type="process", concurrency_limit=1)
    await broker.ok_cmd("CreateWorkQueue", work_pool_name="limited", name="q", concurrency_limit=1)
    flow_id = (await broker.ok_cmd("CreateFlow", name="requeued"))["id"]
    held = await _run_in(broker, flow_id, "q", "SCHEDULED")
    assert (await _set(broker, held["id"], "PENDING"))["orchestration"]["status"] == "ACCEPT"
    assert (await _set(broker, held["id"], "RUNNING"))["orchestration"]["status"] == "ACCEPT"
    orphan = await _run_in(broker, flow_id, "q", "SCHEDULED")
    waiting = await _run_in(broker, flow_id, "default", "SCHEDULED")
    full = "Work pool 'limited' is at its concurrency limit (1)."
    assert (await _set(broker, waiting["id"], "PENDING"))["orchestration"]["details"]["reason"] == full

    await broker.ok_cmd("DeleteWorkQueue", work_pool_name="limited", work_queue_name="q")
    assert (await broker.ok_qry("GetWorkPool", name="limited"))["active_slots"] == 0
    polled = await broker.ok_qry("GetScheduledFlowRuns", work_pool_name="limited", limit=10)
    assert [item["flow_run"]["id"] for item in polled] == [waiting["id"]]
    claimed = await _set(broker, waiting["id"], "PENDING")
    assert claimed["orchestration"]["status"] == "ACCEPT", claimed
    assert (await broker.ok_qry("GetFlowRun", id=waiting["id"]))["waiting_reason"] is None

    # The deleted queue's runs are in no pool: the one that held a slot gives nothing back (the
    # pool stays full), and the other's claim is held back by no limit and counts nothing.
    await _set(broker, held["id"], "COMPLETED")
    late = await _run_in(broker, flow_id, "default", "SCHEDULED")
    assert (await _set(broker, late["id"], "PENDING"))["orchestration"]["details"]["reason"] == full
    assert (await _set(broker, orphan["id"], "PENDING"))["orchestration"]["status"] == "ACCEPT"
    assert (await broker.ok_qry("GetWorkPool", name="limited"))["active_slots"] == 1
    await _set(broker, waiting["id"], "COMPLETED")
    assert (await _set(broker, late["id"], "PENDING"))["orchestration"]["status"] == "ACCEPT"
    await assert_live_equals_rebuild(service, settings)


async def test_update_replies_count_the_runs_holding_slots(broker):
    """An update's reply shows the same `active_slots` as a read of the pool or queue. By id,
    too, the reply counts PENDING and RUNNING runs (the log's counts), as `GetWorkQueue` does;
    `GetWorkQueueById` also counts CANCELLING ones."""
    await broker.ok_cmd("CreateWorkPool", name="limited", type="process", concurrency_limit=3)
    queue = await broker.ok_cmd("CreateWorkQueue", work_pool_name="limited", name="a", concurrency_limit=3)
    flow_id = (await broker.ok_cmd("CreateFlow", name="counted"))["id"]
    await _run_in(broker, flow_id, "a", "PENDING")
    await _run_in(broker, flow_id, "a", "RUNNING")
    cancelling = await _run_in(broker, flow_id, "a", "RUNNING")
    await _set(broker, cancelling["id"], "CANCELLING")

    pool = await broker.ok_cmd("UpdateWorkPool", name="limited", concurrency_limit=5)
    assert pool["active_slots"] == 2 == (await broker.ok_qry("GetWorkPool", name="limited"))["active_slots"]
    unchanged = await broker.ok_cmd("UpdateWorkPool", name="limited", concurrency_limit=5)
    assert unchanged["active_slots"] == 2
    assert (await broker.ok_cmd("UpdateWorkPool", name="limited", concurrency_limit=None))["active_slots"] is None
    by_name = await broker.ok_cmd("UpdateWorkQueue", work_pool_name="limited", work_queue_name="a", concurrency_limit=4)
    read = await broker.ok_qry("GetWorkQueue", work_pool_name="limited", work_queue_name="a")
    assert by_name["active_slots"] == 2 == read["active_slots"]
    by_id = await broker.ok_cmd("UpdateWorkQueueById", id=queue["id"], description="counted")
    assert by_id["active_slots"] == 2
    assert (await broker.ok_qry("GetWorkQueueById", id=queue["id"]))["active_slots"] == 3  # CANCELLING too
    moved = await broker.ok_cmd("SetWorkQueuePriorities", work_pool_name="limited", priorities={"a": 2})
    assert {q["name"]: q["active_slots"] for q in moved} == {"a": 2, "default": None}


async def test_a_run_claimed_without_a_worker_holds_its_slots_until_an_operator_ends_it(broker, service, settings):
    """What the docs promise for a claim that names no worker: nothing ties it to a heartbeat,
    so a RUNNING run whose process died keeps its pool's, queue's and deployment's slots (no
    lease of a RUNNING run expires) until a final state is set, as operations.md tells the
    operator to do with the CLI."""
    await broker.ok_cmd("CreateWorkPool", name="limited", type="process", concurrency_limit=1)
    flow_id = (await broker.ok_cmd("CreateFlow", name="unnamed"))["id"]
    deployment = await broker.ok_cmd("CreateDeployment", flow_id=flow_id, name="one", work_pool_name="limited",
                                     concurrency_limit=1)
    held, waiting = [(await broker.ok_cmd("CreateFlowRunFromDeployment", deployment_id=deployment["id"],
                                          name=name))["id"] for name in ("lost-run", "next-run")]
    assert (await _set(broker, held, "PENDING"))["orchestration"]["status"] == "ACCEPT"
    assert (await _set(broker, held, "RUNNING"))["orchestration"]["status"] == "ACCEPT"
    assert (await broker.ok_qry("GetFlowRun", id=held))["worker_name"] is None
    assert (await _set(broker, waiting, "PENDING"))["orchestration"]["status"] == "REJECT"

    ended = await asyncio.to_thread(CliRunner().invoke, app, ["flow-run", "set-state", "lost-run", "CRASHED",
                                                              "-m", "its process died"], env=cli_env(settings))
    assert ended.exit_code == 0, ended.output
    await broker.catch_up()  # the CLI's write, which the broker's own reads do not wait for
    assert (await broker.ok_qry("GetWorkPool", name="limited"))["active_slots"] == 0
    read = await broker.ok_qry("GetDeployment", id=deployment["id"])
    assert read["global_concurrency_limit"]["active_slots"] == 0
    claimed = await broker.cmd("SetFlowRunState", id=waiting, state={"type": "PENDING"})
    assert claimed["orchestration"]["status"] == "ACCEPT", claimed


async def test_a_queue_made_after_an_instance_cached_its_pool_still_counts_there(broker, service, settings):
    """A run's queue missing from the pool an instance cached is either deleted (the run is in
    no pool) or newer than that cache: the instance reads the pool from the log to tell, so a
    claim there counts the run against the pool's limit as any other."""
    await broker.ok_cmd("CreateWorkPool", name="limited", type="process", concurrency_limit=1)
    flow_id = (await broker.ok_cmd("CreateFlow", name="two-instances"))["id"]
    other = Service(settings, roles=frozenset({"commands"}))
    await other.start()

    async def claim(run_id: str, state: str = "PENDING") -> str:
        body = json.dumps({"id": run_id, "state": {"type": state}}).encode()
        reply = await other.commands.execute("SetFlowRunState", body)
        assert reply["ok"], reply
        return reply["orchestration"]["status"]

    try:
        first = await _run_in(broker, flow_id, "default", "SCHEDULED")
        assert await claim(first["id"]) == "ACCEPT"  # the other instance caches the pool now
        assert await claim(first["id"], "COMPLETED") == "ACCEPT"
        # Sent to the first instance alone (the broker would balance them over both).
        async def on_first(command: str, **body: object) -> dict:
            reply = await service.commands.execute(command, json.dumps(body).encode())
            assert reply["ok"], reply
            return reply["result"]

        await on_first("CreateWorkQueue", work_pool_name="limited", name="newer")
        in_newer, blocked = [await on_first("CreateFlowRun", flow_id=flow_id, work_pool_name="limited",
                                            work_queue_name=queue, state={"type": "SCHEDULED"})
                             for queue in ("newer", "default")]
        assert await claim(in_newer["id"]) == "ACCEPT"
        assert await claim(blocked["id"]) == "REJECT"
    finally:
        await other.stop()
    await broker.catch_up()  # the instances' writes, which the broker's own reads do not wait for
    assert (await broker.ok_qry("GetWorkPool", name="limited"))["active_slots"] == 1
