"""A task worker whose event loop an async task blocks, against real NATS and Postgres: its
runs' messages are kept alive from a thread of its own, so a run is not handed to another
worker while the loop is blocked; a loop stuck for good stops being kept alive."""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest

from runledger.client.tasks import submit_task, task_result, wait_for_task_run
from runledger.handlers.task_worker import TaskWorker, _Pulse
from runledger.infra.nats_connection import connect
from runledger.infra.task_queues import consumer_name, task_stream_name

from .test_task_queues import running_worker, state_names

pytestmark = pytest.mark.asyncio


@contextlib.asynccontextmanager
async def worker_in_a_thread(settings, functions: dict, **options: Any) -> AsyncIterator[None]:
    """A task worker on an event loop and a connection of its own, in a thread: another
    process, as far as the test's loop is concerned (a task blocking one loop does not block
    the other)."""
    ready: asyncio.Future[None] = asyncio.get_running_loop().create_future()
    test_loop = asyncio.get_running_loop()
    handles: dict[str, Any] = {}

    async def serve() -> None:
        nc = await connect(settings, name="thread-worker")
        try:
            worker = TaskWorker(nc, settings, functions, **options)
            await worker.start()
            stop = asyncio.Event()
            handles.update(loop=asyncio.get_running_loop(), stop=stop)
            test_loop.call_soon_threadsafe(ready.set_result, None)
            await worker.serve(stop)
        finally:
            await nc.close()

    def main() -> None:
        try:
            asyncio.run(serve())
        except BaseException as e:
            failure = e

            def fail() -> None:
                if not ready.done():
                    ready.set_exception(failure)
            test_loop.call_soon_threadsafe(fail)

    thread = threading.Thread(target=main, name="thread-worker")
    thread.start()
    try:
        await asyncio.wait_for(ready, 30)
        yield
    finally:
        if "loop" in handles:
            handles["loop"].call_soon_threadsafe(handles["stop"].set)
        await asyncio.to_thread(thread.join, 30)


async def test_an_async_task_that_blocks_its_loop_past_the_ack_wait_runs_once(service, client, settings):
    """The task blocks its worker's loop for two ack waits (then goes on a little, so that a
    second worker that took it over would have the time to run it too). The second worker,
    on a loop of its own, is never handed the run."""
    service.connected_at -= 60  # a service up for a while (right after a connect, takeovers wait)
    quick = settings.model_copy(update={"task_ack_wait_seconds": 1.0})
    calls: list[str] = []

    async def blocking(label: str) -> str:
        calls.append(label)
        time.sleep(2 * quick.task_ack_wait_seconds)  # noqa: ASYNC251 - the point of the test
        await asyncio.sleep(quick.task_ack_wait_seconds)
        return label

    async with (running_worker(quick, {"blocking": blocking}, limit=1, worker_id="w-main") as worker,
                worker_in_a_thread(quick, {"blocking": blocking}, limit=1, worker_id="w-thread")):
        run = await submit_task(client, "blocking", {"label": "once"})
        done = await wait_for_task_run(client, run.id, timeout=30)
        consumer = await worker.js.consumer_info(task_stream_name(settings, "scheduled"),
                                                 consumer_name("blocking", "scheduled"))
    assert task_result(done) == "once" and calls == ["once"]
    assert consumer.delivered.consumer_seq == 1  # delivered once, never handed to anyone again
    assert await state_names(client, run.id, "type") == ["SCHEDULED", "RUNNING", "COMPLETED"]
    # Stopping a worker stops its keep-alive thread.
    assert not [t for t in threading.enumerate() if t.name.startswith(("w-main", "w-thread"))]


async def test_the_keep_alive_thread_stops_keeping_messages_of_a_loop_stuck_for_good(service, settings):
    """Its acknowledgements (`+WPI` to a message's reply subject) go out while the worker's
    loop stamps, stop once it has not for longer than the bound, and resume with it."""
    nc = await connect(settings)
    heard: list[bytes] = []
    subject = f"{settings.namespace}.test.pulse"

    async def on_ack(msg: Any) -> None:
        heard.append(msg.data)

    await nc.subscribe(subject, cb=on_ack)
    await nc.flush()
    pulse = _Pulse(settings, "pulse-test", every=0.05, stuck_after=1.0)
    await pulse.start()
    try:
        pulse.hold(subject)

        async def until(condition) -> None:
            while not condition():
                if stamping:
                    pulse.stamp()
                await asyncio.sleep(0.05)

        stamping = True
        await until(lambda: len(heard) >= 3)
        assert set(heard) == {b"+WPI"}
        stamping = False  # stuck: no more stamps
        await until(lambda: pulse._stuck)
        await nc.flush()
        await asyncio.sleep(0.3)  # whatever was on its way has arrived
        silent_from, beats = len(heard), pulse.beats
        await asyncio.sleep(0.5)  # ten rounds of acknowledgements, had it been alive
        assert len(heard) == silent_from and pulse.beats == beats
        stamping = True  # alive again
        await until(lambda: len(heard) > silent_from)
        pulse.release(subject)
        await asyncio.sleep(0.3)
        released_at = len(heard)
        await asyncio.sleep(0.5)
        assert len(heard) == released_at
    finally:
        await pulse.stop()
        await nc.close()
    assert not pulse.running
