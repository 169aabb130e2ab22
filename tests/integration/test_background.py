"""The scheduler, the clock and the foreman against real NATS and Postgres: the scheduler
schedules every deployment that is not paused and has an active schedule, and two schedulers
(or a restart) write each run once; the clock marks Late the runs still Scheduled 15 s after
their start; the foreman turns deployments without a queue NOT_READY too (ST-3)."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import uuid
from datetime import UTC, datetime, timedelta

from typer.testing import CliRunner

from runledger.commands.deployment_polls import DEPLOYMENT_POLL, poll_id
from runledger.handlers.background import Clock, CommandSender, Scheduler
from runledger.infra.nats_connection import connect
from tests.integration.broker import assert_live_equals_rebuild, cli_env, foreman_clock


async def _deployment(broker, name: str, flow_id: str, **fields) -> dict:
    return await broker.ok_cmd("CreateDeployment", name=name, flow_id=flow_id, **fields)


async def test_the_scheduler_schedules_active_deployments_once_whatever_runs_it(broker, service, settings):
    flow_id = (await broker.ok_cmd("CreateFlow", name="etl"))["id"]
    hourly = [{"schedule": {"interval": 3600}}]
    active = await _deployment(broker, "active", flow_id, schedules=hourly)
    await _deployment(broker, "paused", flow_id, schedules=hourly, paused=True)
    await _deployment(broker, "inactive", flow_id, schedules=[{**hourly[0], "active": False}])
    await _deployment(broker, "none", flow_id)
    await broker.ok_qry("CountDeployments")  # the read model has them
    nc = await connect(settings)
    try:
        send = CommandSender(nc, settings)
        first, second = Scheduler(service.engine, send), Scheduler(service.engine, send)
        assert await first.schedulable() == [active["id"]]
        made = await asyncio.gather(first.schedule([active["id"]]), second.schedule([active["id"]]))
        assert sum(made) == 3  # two schedulers at once: each date once (SC-1 defaults: 3 runs)
        assert await Scheduler(service.engine, send).schedule([active["id"]]) == 0  # a restart: none
        # The schedulers' commands were not the broker's: wait for everything the log holds.
        await broker.catch_up()
        runs = await broker.ok_qry("ListFlowRuns", flow_runs={"deployment_id": {"any_": [active["id"]]}})
        assert len(runs) == 3 and len({r["expected_start_time"] for r in runs}) == 3
        # A full pass asks only deployments short of runs: three ahead, the last 2 h ahead, is enough.
        assert await first.schedulable() == []
        # One fewer (deleted): short again, and the pass makes it again.
        latest = max(runs, key=lambda r: r["expected_start_time"])
        await broker.ok_cmd("DeleteFlowRun", id=latest["id"])
        await broker.catch_up()
        assert await first.schedulable() == [active["id"]]
        assert await first.schedule(await first.schedulable()) == 1
    finally:
        await nc.close()


async def test_the_clock_marks_late_runs_only(broker, service, settings):
    flow_id = (await broker.ok_cmd("CreateFlow", name="etl"))["id"]
    now = datetime.now(UTC)

    async def scheduled(at: datetime, name: str | None = None) -> str:
        state = {"type": "SCHEDULED", "state_details": {"scheduled_time": at.isoformat()}}
        if name:
            state["name"] = name
        return (await broker.ok_cmd("CreateFlowRun", flow_id=flow_id, state=state))["id"]

    late = await scheduled(now - timedelta(seconds=30))
    just_due = await scheduled(now - timedelta(seconds=5))
    retrying = await scheduled(now - timedelta(minutes=5), name="AwaitingRetry")
    await broker.ok_qry("CountFlowRuns")
    nc = await connect(settings)
    try:
        clock = Clock(service.engine, CommandSender(nc, settings))
        assert await clock.mark_late() == 1
        await broker.catch_up()
        await broker.ok_qry("CountFlowRuns")
        assert await clock.mark_late() == 0  # already Late: nothing more
    finally:
        await nc.close()
    await broker.catch_up()  # the clock's writes too
    marked = await broker.ok_qry("GetFlowRun", id=late)
    assert (marked["state_type"], marked["state_name"]) == ("SCHEDULED", "Late")
    assert marked["state"]["state_details"]["scheduled_time"] == marked["next_scheduled_start_time"]
    assert (await broker.ok_qry("GetFlowRun", id=just_due))["state_name"] == "Scheduled"
    assert (await broker.ok_qry("GetFlowRun", id=retrying))["state_name"] == "AwaitingRetry"


async def test_the_foreman_turns_a_ready_deployment_without_a_queue_not_ready(broker, service, settings):
    """A runner's poll makes a deployment without a queue READY; 60 s after it, the foreman
    (outer-joined to the queues, as Prefect's) makes it NOT_READY, and only then. A deployment
    whose queue is gone counts as one without."""
    await broker.ok_cmd("CreateWorkPool", name="p", type="process")
    flow_id = (await broker.ok_cmd("CreateFlow", name="etl"))["id"]
    runner = await _deployment(broker, "runner", flow_id)
    pooled = await _deployment(broker, "pooled", flow_id, work_pool_name="p", work_queue_name="q")
    ids = [runner["id"], pooled["id"]]
    await broker.ok_qry("GetScheduledFlowRunsForDeployments", deployment_ids=ids)
    await broker.ok_cmd("DeleteWorkQueue", work_pool_name="p", work_queue_name="q")

    async def statuses() -> list[tuple[str, str | None]]:
        await broker.catch_up()
        return [(d["status"], d["last_polled"]) for d in [await broker.ok_qry("GetDeployment", id=i) for i in ids]]

    for _ in range(100):  # the poll is recorded in the background
        ready = await statuses()
        if all(status == "READY" for status, _ in ready):
            break
        await asyncio.sleep(0.05)
    assert [status for status, _ in ready] == ["READY", "READY"], ready
    polled = datetime.fromisoformat(ready[0][1])
    async with foreman_clock(service, settings) as at:
        await at(polled + timedelta(seconds=30)).deployments_not_ready()
        assert [status for status, _ in await statuses()] == ["READY", "READY"]
        assert await at(polled + timedelta(seconds=61)).deployments_not_ready() == 2
        assert [status for status, _ in await statuses()] == ["NOT_READY", "NOT_READY"]


async def test_the_foreman_marks_a_deployment_naming_a_deleted_queue_not_ready_once(broker, service, settings,
                                                                                     monkeypatch):
    """An update decided while its queue was alive and written just after the queue's deletion
    leaves the row naming the deleted queue (the two touch different aggregates). The foreman
    counts it queueless, as its decider does on the log; the read model then drops the queue
    with the status, so the next pass finds nothing to send (it had sent the same command, and
    written a kept event, every 15 s for ever)."""
    await broker.ok_cmd("CreateWorkPool", name="p", type="process")
    flow_id = (await broker.ok_cmd("CreateFlow", name="etl"))["id"]
    d = await _deployment(broker, "pooled", flow_id, work_pool_name="p", work_queue_name="q")
    await broker.ok_qry("GetScheduledFlowRunsForDeployments", deployment_ids=[d["id"]])

    async def deployment() -> dict:
        await broker.catch_up()
        return await broker.ok_qry("GetDeployment", id=d["id"])

    for _ in range(100):  # the poll is recorded in the background
        if (await deployment())["status"] == "READY":
            break
        await asyncio.sleep(0.05)
    polled = datetime.fromisoformat((await deployment())["last_polled"])
    # The race, in order: the update is decided, the queue is deleted, the update is written.
    spec = service.commands.specs["UpdateDeployment"]

    async def decided_before_the_queue_went(unit, cmd, ctx):
        decision = await spec.handle(unit, cmd, ctx)
        deleted = await service.commands.execute("DeleteWorkQueue", json.dumps(
            {"work_pool_name": "p", "work_queue_name": "q"}).encode())
        assert deleted["ok"], deleted
        return decision

    monkeypatch.setitem(service.commands.specs, "UpdateDeployment",
                        dataclasses.replace(spec, handle=decided_before_the_queue_went))
    await broker.ok_cmd("UpdateDeployment", id=d["id"], description="changed")
    monkeypatch.setitem(service.commands.specs, "UpdateDeployment", spec)
    stale = await deployment()
    assert (stale["status"], stale["work_queue_id"]) == ("READY", d["work_queue_id"])
    async with foreman_clock(service, settings) as at:
        assert await at(polled + timedelta(seconds=61)).deployments_not_ready() == 1
        marked = await deployment()
        assert (marked["status"], marked["work_queue_id"], marked["work_pool_name"], marked["work_queue_name"]) == (
            "NOT_READY", None, None, "q")
        second = at(polled + timedelta(seconds=76))
        assert (await second.run_pass()).deployments_checked == 0
    events = await broker.aggregate_events(DEPLOYMENT_POLL, poll_id([uuid.UUID(d["id"])]))
    assert [e["type"] for e in events].count("QueuelessDeploymentsNotReady") == 1
    await assert_live_equals_rebuild(service, settings)
    # The export in Prefect's vocabulary says what the read model did: not ready, no queue.
    from runledger.cli.main import _register, app

    _register()
    result = await asyncio.to_thread(CliRunner().invoke, app, ["events", "--vocabulary", "prefect"],
                                     env=cli_env(settings))
    assert result.exit_code == 0, result.output
    not_ready = [e for line in result.stdout.splitlines() if (e := json.loads(line))["event"] == "prefect.deployment.not-ready"
                 and e["resource"]["prefect.resource.id"] == f"prefect.deployment.{d['id']}"]
    assert len(not_ready) == 1
    assert [r["prefect.resource.role"] for r in not_ready[0]["related"]] == ["flow"]


async def test_two_services_run_one_scheduler_and_runs_appear_on_their_own(broker, settings):
    from runledger.handlers.service import ALL_ROLES, BACKGROUND_ROLES, Service

    flow_id = (await broker.ok_cmd("CreateFlow", name="etl"))["id"]
    d = await _deployment(broker, "every-minute", flow_id, schedules=[{"schedule": {"interval": 60}}])
    services = [Service(settings, roles=BACKGROUND_ROLES | frozenset({"queries"})) for _ in range(2)]
    for svc in services:
        await svc.start()
    try:
        for _ in range(100):  # the scheduler's first pass comes at once (bounded wait, 10 s)
            runs = await broker.ok_qry("ListFlowRuns", flow_runs={"deployment_id": {"any_": [d["id"]]}})
            if len(runs) >= 60:
                break
            await asyncio.sleep(0.1)
        await broker.catch_up()  # the 61 runs are one append, but the read model may show part of it
        runs = await broker.ok_qry("ListFlowRuns", flow_runs={"deployment_id": {"any_": [d["id"]]}})
        # SC-1 defaults for a one-minute interval: runs until both 3 runs and 1 h ahead are reached.
        assert len(runs) == 61, len(runs)
        holders = [t for svc in services for t in svc.background if t.get_name() == "runledger-scheduler"]
        assert len(holders) == 2  # both wait for the lease; one holds it
    finally:
        for svc in services:
            await svc.stop()
    assert ALL_ROLES.isdisjoint(BACKGROUND_ROLES)
