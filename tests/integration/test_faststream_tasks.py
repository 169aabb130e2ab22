"""Task keys served from FastStream apps (`runledger[faststream]`), against real NATS and
Postgres: the app's broker connection carries runledger's task worker, with its guarantees,
proven by the fault tests the native worker passes: a broker restart and a kill -9 while task
runs flow (each runs once), and an app whose process dies mid-run (its run moves to another)."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import time
import uuid

import pytest
from faststream import FastStream
from faststream.nats import NatsBroker

from runledger.client import RunledgerClient
from runledger.client.tasks import submit_task, task_result, wait_for_task_run
from runledger.handlers.faststream_tasks import RunledgerTasks
from runledger.handlers.service import Service
from runledger.infra.embedded import RestartableNats
from runledger.infra.event_store import EventStore

from .broker import drop_service_schema
from .task_flow import submit_until_ok, wait_all_finished

pytestmark = pytest.mark.timeout(240)


def an_app(settings, functions: dict, **options) -> tuple[FastStream, RunledgerTasks]:
    broker = NatsBroker(settings.nats_url, inbox_prefix=settings.inbox_prefix, max_reconnect_attempts=-1,
                        logger=None)
    app = FastStream(broker, logger=None)
    tasks = RunledgerTasks(broker, settings=settings, **options)
    for key, fn in functions.items():
        tasks.task(key)(fn)
    tasks.attach(app)
    return app, tasks


async def test_a_faststream_app_serves_task_keys_beside_its_own_subscribers(service, settings):
    heard: list[str] = []

    async def greet(name: str) -> str:
        return f"hello {name}"

    app, tasks = an_app(settings, {"greet": greet})

    @app.broker.subscriber(f"{settings.namespace}.app.events")
    async def on_event(body: str) -> None:  # the app's own work goes on beside
        heard.append(body)

    await app.start()
    try:
        async with RunledgerClient(settings) as client:
            run = await submit_task(client, "greet", {"name": "ann"})
            assert task_result(await wait_for_task_run(client, run.id, timeout=10)) == "hello ann"
            await app.broker.publish("ping", f"{settings.namespace}.app.events")
            for _ in range(50):
                if heard:
                    break
                await asyncio.sleep(0.05)
            assert heard == ["ping"]
            assert [w.task_keys for w in await client.read_task_workers()] == [["greet"]]
    finally:
        await app.stop()
    assert tasks.worker is not None and tasks.worker.finished == 1


async def test_faststream_apps_lose_nothing_and_run_nothing_twice_through_a_broker_kill(settings, tmp_path):
    nats = RestartableNats(tmp_path / "nats")
    nats.start()
    settings = settings.model_copy(update={"nats_url": nats.url})
    service = Service(settings, roles=frozenset({"commands", "queries", "projections", "task_recovery"}))
    seen: collections.Counter[int] = collections.Counter()

    async def work(i: int) -> int:
        seen[i] += 1
        await asyncio.sleep(0.02)
        return i

    apps = []
    try:
        await service.start()
        for n in range(3):
            app, _ = an_app(settings, {"work": work}, limit=8, worker_id=f"fs{n}")
            await app.start()
            apps.append(app)
        client = await RunledgerClient(settings).connect()
        ids: list[uuid.UUID] = []

        async def submitter() -> None:
            for i in range(1000):
                ids.append(await submit_until_ok(client, i))

        submitting = asyncio.create_task(submitter())
        await asyncio.sleep(1.5)
        nats.kill()  # -9, and back on its store
        await asyncio.sleep(1.0)
        nats.start()
        await asyncio.wait_for(submitting, 120)
        await wait_all_finished(client, ids, 120)
        assert sorted(seen) == list(range(1000))
        assert not {i: n for i, n in seen.items() if n != 1}
        store = EventStore(client._nc, settings)
        for run_id in ids[::10]:
            events = await store.read_aggregate("task_run", str(run_id))
            types = [e.envelope.payload["run"]["state"]["type"] for e in events if "run" in e.envelope.payload]
            assert types.count("RUNNING") == 1 and types.count("COMPLETED") == 1, types
        await client.close()
    finally:
        for app in apps:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(app.stop(), 30)
        await service.stop()
        await drop_service_schema(settings)
        nats.kill()


async def test_an_app_that_dies_mid_run_loses_it_to_another_app(service, settings):
    service.connected_at -= 60  # a service up for a while (right after a connect, takeovers wait)
    started = asyncio.Event()
    runs: list[str] = []

    async def slow(label: str) -> str:
        runs.append(label)
        started.set()
        await asyncio.sleep(60)
        return label

    async def quick(label: str) -> str:
        runs.append(f"{label}-again")
        return label

    doomed, doomed_tasks = an_app(settings, {"job": slow}, worker_id="doomed")
    await doomed.start()
    async with RunledgerClient(settings) as client:
        run = await submit_task(client, "job", {"label": "x"})
        await asyncio.wait_for(started.wait(), 10)
        # Dies: its connection gone, nothing finished nor handed back.
        assert doomed_tasks._serving is not None and doomed_tasks.worker is not None
        doomed_tasks._serving.cancel()
        for task in list(doomed_tasks.worker._running):
            task.cancel()
        await doomed.broker.connection.close()
        died = time.monotonic()
        heir, _ = an_app(settings, {"job": quick}, worker_id="heir")
        await heir.start()
        try:
            done = await wait_for_task_run(client, run.id, timeout=15)
        finally:
            await heir.stop()
    assert task_result(done) == "x" and runs == ["x", "x-again"]
    assert time.monotonic() - died < 6.0
