"""Routine heartbeats expire from the log (`Settings.heartbeat_retention_seconds`), against a
real NATS server and Postgres: a worker beating every 30 s would otherwise add ~2,900 events
a day to the log, for ever. What a worker's state needs stays: its first beat, a changed
interval, a return from OFFLINE, and always its latest word, so a rebuild of the read models
still equals the live ones."""

from __future__ import annotations

import asyncio

from runledger.commands import workers as wk
from runledger.handlers.service import Service
from runledger.infra.nats_connection import connect

from .broker import Broker, assert_live_equals_rebuild, drop_service_schema


async def _types(broker: Broker, worker_id: str) -> list[str]:
    return [e["type"] for e in await broker.aggregate_events(wk.WORKER, worker_id)]


async def test_routine_heartbeats_expire_and_the_worker_is_rebuilt_the_same(settings, monkeypatch):
    # Retention 1 s: a beat every second is kept 4 s (the worker would be offline after 3 s
    # without a newer one, and a margin more, made 1 s here from a minute), the floor the
    # service never goes below.
    monkeypatch.setattr(wk, "EXPIRY_MARGIN_SECONDS", 1)
    changed = settings.model_copy(update={"heartbeat_retention_seconds": 1})
    service = Service(changed)
    await service.start()
    nc = await connect(changed)
    try:
        broker = Broker(nc, changed)
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
    finally:
        await nc.close()
        await service.stop()
        await drop_service_schema(changed)


async def test_a_routine_heartbeat_is_stored_with_the_retention_as_its_ttl(broker, settings):
    assert settings.heartbeat_retention_seconds == 86_400  # the default keeps a routine beat a day
    beats = []
    await broker.ok_cmd("CreateWorkPool", name="p", type="process")
    for _ in range(3):
        beats.append(await broker.ok_cmd("WorkerHeartbeat", work_pool_name="p", name="w"))
    js = broker.nc.jetstream()
    subject = f"{settings.event_subject_prefix}.{wk.WORKER}.{beats[0]['id']}.WorkerHeartbeatRenewed"
    stored = await js.get_msg(settings.stream_name, subject=subject, direct=True, seq=1, next=True)
    assert stored.headers is not None and stored.headers.get("Nats-TTL") == "86400"
