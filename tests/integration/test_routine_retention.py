"""Routine heartbeats and polls expire from the log (`Settings.routine_retention_seconds`),
against a real NATS server and Postgres: a worker beating every 30 s and polling every 10 s
would otherwise add ~11,500 events a day to the log, for ever. What the state needs stays: a
worker's first beat, a changed interval, a return from OFFLINE, a poll that makes a queue
READY, and always the latest word (the foreman's NOT_READY carries the last poll), so a
rebuild of the read models still equals the live ones."""

from __future__ import annotations

import asyncio
import contextlib
import json
from datetime import datetime, timedelta

from runledger.commands import messages
from runledger.commands import work_pools as wp
from runledger.commands import workers as wk
from runledger.handlers.service import Service
from runledger.infra.nats_connection import connect

from .broker import Broker, assert_live_equals_rebuild, drop_service_schema, foreman_clock


@contextlib.asynccontextmanager
async def _short_retention(settings, monkeypatch, *, polls: bool = True, **changes):
    """A service of its own keeping routine records 1 s (never less than their floor: a
    heartbeat 3 intervals and a margin, a poll the not-ready delay and a margin; the margin made
    1 s here from a minute, and, with `polls`, the not-ready delay 1 s from 60), and a broker."""
    monkeypatch.setattr(messages, "EXPIRY_MARGIN_SECONDS", 1)
    if polls:
        monkeypatch.setattr(wp, "NOT_READY_AFTER", timedelta(seconds=1))
    changed = settings.model_copy(update={"routine_retention_seconds": 1, **changes})
    service = Service(changed)
    await service.start()
    nc = await connect(changed)
    try:
        yield service, Broker(nc, changed), changed
    finally:
        await nc.close()
        await service.stop()
        await drop_service_schema(changed)


async def _types(broker: Broker, worker_id: str) -> list[str]:
    return [e["type"] for e in await broker.aggregate_events(wk.WORKER, worker_id)]


async def test_routine_heartbeats_expire_and_the_worker_is_rebuilt_the_same(settings, monkeypatch):
    # Retention 1 s: a beat every second is kept 4 s (the worker would be offline after 3 s
    # without a newer one, and a margin more, made 1 s here from a minute), the floor the
    # service never goes below.
    async with _short_retention(settings, monkeypatch, polls=False) as (service, broker, changed):
        await broker.ok_cmd("CreateWorkPool", name="p", type="process")
        beats = [await broker.ok_cmd("WorkerHeartbeat", work_pool_name="p", name="w", heartbeat_interval_seconds=1)
                 for _ in range(4)]
        worker_id = beats[0]["id"]
        assert await _types(broker, worker_id) == ["WorkerHeartbeatRecorded"] + ["WorkerHeartbeatRenewed"] * 3
        for _ in range(100):  # the server removes them once their 4 s are up
            if "WorkerHeartbeatRenewed" not in await _types(broker, worker_id):
                break
            await asyncio.sleep(0.1)
        kept = await _types(broker, worker_id)
        # The first beat stays (and the foreman's OFFLINE, if it passed meanwhile).
        assert kept[0] == "WorkerHeartbeatRecorded" and "WorkerHeartbeatRenewed" not in kept
        last = await broker.ok_cmd("WorkerHeartbeat", work_pool_name="p", name="w", heartbeat_interval_seconds=1)
        listed = await broker.ok_qry("ListWorkers", work_pool_name="p")
        assert [(w["name"], w["status"], w["last_heartbeat_time"]) for w in listed] == [
            ("w", "ONLINE", last["last_heartbeat_time"])]
        await assert_live_equals_rebuild(service, changed)


async def test_a_routine_heartbeat_is_stored_with_the_retention_as_its_ttl(broker, settings):
    assert settings.routine_retention_seconds == 86_400  # the default keeps a routine beat a day
    beats = []
    await broker.ok_cmd("CreateWorkPool", name="p", type="process")
    for _ in range(3):
        beats.append(await broker.ok_cmd("WorkerHeartbeat", work_pool_name="p", name="w"))
    js = broker.nc.jetstream()
    subject = f"{settings.event_subject_prefix}.{wk.WORKER}.{beats[0]['id']}.WorkerHeartbeatRenewed"
    stored = await js.get_msg(settings.stream_name, subject=subject, direct=True, seq=1, next=True)
    assert stored.headers is not None and stored.headers.get("Nats-TTL") == "86400"


def _at(stamp: str | None) -> datetime | None:
    return None if stamp is None else datetime.fromisoformat(stamp)


async def _polls(broker: Broker, pool_id: str) -> list[bool]:
    """The pool's polls the log holds, in order: whether each is a routine one."""
    return [e["payload"]["routine"] for e in await broker.aggregate_events(wp.WORK_POOL, pool_id)
            if e["type"] == "WorkQueuesPolled"]


async def test_routine_polls_expire_and_the_foreman_keeps_the_last_poll(settings, monkeypatch):
    # Retention 1 s, a queue not ready 1 s after its last poll and a margin of 1 s: a routine
    # poll is kept 2 s.
    async with _short_retention(settings, monkeypatch, snapshot_every=3) as (service, broker, changed):
        pool = await broker.ok_cmd("CreateWorkPool", name="p", type="process")
        queue_id = pool["default_queue_id"]
        flow_id = (await broker.ok_cmd("CreateFlow", name="etl"))["id"]
        deployment = await broker.ok_cmd("CreateDeployment", name="d", flow_id=flow_id, work_pool_name="p")
        for _ in range(4):
            await broker.ok_cmd("RecordWorkQueuesPolled", work_pool_name="p", work_queue_ids=[queue_id])
        # The first made the queue READY and is kept; the others only moved its last poll.
        assert await _polls(broker, pool["id"]) == [False, True, True, True]
        # A pool polled all day is still snapshotted (one every 3 events here), anchored on its
        # last event that stays in the log, not on a routine poll that will leave it.
        await service.commands.repo.flush_snapshots()
        found = await service.commands.repo.snapshots.get(wp.WORK_POOL, pool["id"])
        assert found is not None
        anchor = await broker.nc.jetstream().get_msg(changed.stream_name, seq=found[1], direct=True)
        assert anchor.subject.endswith(".WorkQueuesPolled") and not json.loads(anchor.data)["payload"]["routine"]
        await broker.catch_up()
        queue = await broker.ok_qry("GetWorkQueue", work_pool_name="p", work_queue_name="default")
        last_polled = datetime.fromisoformat(queue["last_polled"])
        assert queue["status"] == "READY"
        assert _at((await broker.ok_qry("GetDeployment", id=deployment["id"]))["last_polled"]) == last_polled
        async with foreman_clock(service, changed) as at:
            await at(last_polled + timedelta(seconds=5)).run_pass()
        for _ in range(100):  # the server removes the routine polls once their 2 s are up
            if await _polls(broker, pool["id"]) == [False]:
                break
            await asyncio.sleep(0.1)
        assert await _polls(broker, pool["id"]) == [False]
        await broker.catch_up()
        queue = await broker.ok_qry("GetWorkQueue", work_pool_name="p", work_queue_name="default")
        assert (queue["status"], _at(queue["last_polled"])) == ("NOT_READY", last_polled)
        got = await broker.ok_qry("GetDeployment", id=deployment["id"])
        assert (got["status"], _at(got["last_polled"])) == ("NOT_READY", last_polled)
        # The pool's snapshot (one every 3 events here) rests on an event still in the log, not
        # on a routine poll: one that left would make every cold load a full one.
        found = await service.commands.repo.snapshots.get(wp.WORK_POOL, pool["id"])
        assert found is not None and await service.store.holds(found[1], wp.WORK_POOL, pool["id"])
        # A rebuild from what the log still holds gives the same read models.
        await assert_live_equals_rebuild(service, changed)
        # And the pool, loaded cold from its snapshot and the log, says the same.
        fresh = Service(changed, roles=frozenset({"commands"}))
        await fresh.start()
        try:
            loaded = await fresh.commands.repo.load(wp.WORK_POOL, pool["id"])
            q = loaded.state.queues[wp.uuid.UUID(queue_id)]
            assert (q.status, q.last_polled) == (wp.Status.NOT_READY, last_polled)
        finally:
            await fresh.stop()


async def test_a_deployment_polled_only_by_routine_polls_is_rebuilt_the_same_wherever_its_queue_went(
        settings, monkeypatch):
    """A deployment's last poll may come from a routine poll (its queue and itself READY
    already), and its queue may be gone or changed by the time the foreman marks it NOT_READY:
    the foreman's event carries that last poll, so a rebuild after the polls left the log
    still equals the live read model."""
    async with _short_retention(settings, monkeypatch) as (service, broker, changed):
        pool = await broker.ok_cmd("CreateWorkPool", name="p", type="process")
        queue_ids = {name: (await broker.ok_cmd("CreateWorkQueue", work_pool_name="p", name=name))["id"]
                     for name in ("gone", "left", "other")}
        flow_id = (await broker.ok_cmd("CreateFlow", name="etl"))["id"]
        poll = {"work_pool_name": "p", "work_queue_ids": [queue_ids["gone"], queue_ids["left"]]}
        await broker.ok_cmd("RecordWorkQueuesPolled", **poll)  # kept: the queues become READY
        deployments = {name: await broker.ok_cmd("CreateDeployment", name=name, flow_id=flow_id, work_pool_name="p",
                                                 work_queue_name=name) for name in ("gone", "left")}
        # Kept: it makes the deployments READY (the service saw them not READY when it answered).
        await broker.ok_cmd("RecordWorkQueuesPolled", **poll, readies_deployments=True)
        await broker.ok_cmd("RecordWorkQueuesPolled", **poll)  # routine: the deployments' last poll
        assert await _polls(broker, pool["id"]) == [False, False, True]
        await broker.ok_cmd("DeleteWorkQueue", work_pool_name="p", work_queue_name="gone")
        await broker.ok_cmd("UpdateDeployment", id=deployments["left"]["id"], work_queue_name="other")
        await broker.catch_up()
        polled = {n: _at((await broker.ok_qry("GetDeployment", id=d["id"]))["last_polled"]) for n, d in deployments.items()}
        assert None not in polled.values()
        async with foreman_clock(service, changed) as at:
            await at(max(polled.values()) + timedelta(seconds=5)).run_pass()
        for _ in range(100):  # the routine poll leaves the log once its 2 s are up
            if await _polls(broker, pool["id"]) == [False, False]:
                break
            await asyncio.sleep(0.1)
        assert await _polls(broker, pool["id"]) == [False, False]
        await broker.catch_up()
        for name, d in deployments.items():
            got = await broker.ok_qry("GetDeployment", id=d["id"])
            assert (got["status"], _at(got["last_polled"])) == ("NOT_READY", polled[name])
        await assert_live_equals_rebuild(service, changed)


async def test_a_poll_that_makes_a_deployment_ready_is_kept_though_its_queue_was_ready(settings, monkeypatch):
    """A deployment made on a queue a worker polls already: the next poll makes it READY. That
    is a change the log must keep (a rebuild as of any moment, the Prefect events' `ready` and
    later `not-ready`), not a routine poll that leaves the log: the service, answering the
    poll, sees the deployment not READY and says so in the record."""
    async with _short_retention(settings, monkeypatch) as (service, broker, changed):
        pool = await broker.ok_cmd("CreateWorkPool", name="p", type="process")

        async def worker_poll() -> None:
            await broker.catch_up()
            await broker.ok_qry("GetScheduledFlowRuns", work_pool_name="p")
            await service.polls.drain()

        await worker_poll()  # the queue becomes READY: kept
        flow_id = (await broker.ok_cmd("CreateFlow", name="etl"))["id"]
        deployment = await broker.ok_cmd("CreateDeployment", name="d", flow_id=flow_id, work_pool_name="p")
        await worker_poll()  # the deployment becomes READY: kept
        await worker_poll()  # nothing changes: routine
        assert await _polls(broker, pool["id"]) == [False, False, True]
        await broker.catch_up()
        got = await broker.ok_qry("GetDeployment", id=deployment["id"])
        assert got["status"] == "READY"
        async with foreman_clock(service, changed) as at:  # the worker stopped polling (a minute ago:
            # the Prefect events read the not-ready delay as it is, not as this test made it)
            await at(_at(got["last_polled"]) + timedelta(seconds=65)).run_pass()
        for _ in range(100):  # the routine poll leaves the log once its 2 s are up
            if await _polls(broker, pool["id"]) == [False, False]:
                break
            await asyncio.sleep(0.1)
        assert await _polls(broker, pool["id"]) == [False, False]
        result = await broker.ok_qry("ReadEvents", vocabulary="prefect")
        names = [e["event"] for e in result["events"] if e["resource"]["prefect.resource.id"].endswith(deployment["id"])]
        assert names == ["prefect.deployment.created", "prefect.deployment.ready", "prefect.deployment.not-ready"]
        await assert_live_equals_rebuild(service, changed)


async def test_a_runners_routine_polls_expire_and_a_rebuild_keeps_its_deployments_last_poll(settings, monkeypatch):
    """A runner polls its deployments every 10 s or so: one event each, which stayed in the
    log for ever. The poll that makes them READY is kept; the later ones (the service saw them
    all READY already when it answered) leave it, and the foreman's not-ready event carries the
    last poll, so a rebuild still equals the live read models, and the Prefect events still
    say ready, then not-ready."""
    from runledger.commands import deployment_polls as dpp

    async with _short_retention(settings, monkeypatch) as (service, broker, changed):
        flow_id = (await broker.ok_cmd("CreateFlow", name="etl"))["id"]
        deployment = await broker.ok_cmd("CreateDeployment", name="served", flow_id=flow_id)  # no pool: a runner's
        poll_id = dpp.poll_id([deployment["id"]])

        async def runner_poll() -> None:
            await broker.catch_up()
            await broker.ok_qry("GetScheduledFlowRunsForDeployments", deployment_ids=[deployment["id"]])
            await service.polls.drain()

        async def polls() -> list[bool]:
            return [e["payload"]["routine"] for e in await broker.aggregate_events(dpp.DEPLOYMENT_POLL, poll_id)
                    if e["type"] == "DeploymentsPolled"]

        for _ in range(3):
            await runner_poll()
        assert await polls() == [False, True, True]  # the first made it READY
        await broker.catch_up()
        got = await broker.ok_qry("GetDeployment", id=deployment["id"])
        assert got["status"] == "READY"
        last_polled = _at(got["last_polled"])
        async with foreman_clock(service, changed) as at:  # the runner stopped a minute ago
            await at(last_polled + timedelta(seconds=65)).run_pass()
        for _ in range(100):  # the routine polls leave the log once their 2 s are up
            if await polls() == [False]:
                break
            await asyncio.sleep(0.1)
        assert await polls() == [False]
        await broker.catch_up()
        got = await broker.ok_qry("GetDeployment", id=deployment["id"])
        assert (got["status"], _at(got["last_polled"])) == ("NOT_READY", last_polled)
        result = await broker.ok_qry("ReadEvents", vocabulary="prefect", resource_id=f"prefect.deployment.{deployment['id']}")
        assert [e["event"] for e in result["events"]] == ["prefect.deployment.created", "prefect.deployment.ready",
                                                         "prefect.deployment.not-ready"]
        await assert_live_equals_rebuild(service, changed)
