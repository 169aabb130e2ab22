"""Cancelling task runs, against real NATS and Postgres: a run cancelled while it runs is stopped
on its worker (an async function sees CancelledError, a plain function's outcome is dropped),
ends CANCELLED, frees its worker's slot and is not delivered again; a run cancelled before it
starts never runs; its waiter is told it was cancelled."""

from __future__ import annotations

import asyncio
import inspect
import logging
import threading
import time

import pytest

from runledger.client import RunledgerClient
from runledger.client.tasks import (
    TaskCancelled,
    TaskFailed,
    TaskFuture,
    submit_task,
    wait_for_task_run,
)
from runledger.handlers.task_worker import TaskWorker
from runledger.infra.nats_connection import connect
from runledger.infra.task_queues import TaskPublisher, consumer_name, task_stream_name
from tests.integration import test_task_queues as queue_tests
from tests.integration.test_roles import roles  # noqa: F401 (a fixture)

pytestmark = pytest.mark.asyncio

# The workers here take a run back from a silent worker after 1 s: a message left
# unacknowledged would come back within the tests' waits.
ACK_WAIT = 1.0


def running_worker(settings, functions, **options):
    """`test_task_queues.running_worker`, with the short acknowledgement wait above."""
    return queue_tests.running_worker(settings.model_copy(update={"task_ack_wait_seconds": ACK_WAIT}), functions,
                                      **options)


def blocking_task():
    """A task that runs until it is cancelled: `(function, started, stopped)`, `started` set
    once it runs, `stopped` holding True once it saw its cancel. Its parameters are ignored."""
    started = asyncio.Event()
    stopped: list[bool] = []

    async def blocking(**_: object) -> None:
        started.set()
        try:
            await asyncio.sleep(120)
        except asyncio.CancelledError:
            stopped.append(True)
            raise

    return blocking, started, stopped


async def history(client, run_id) -> list[str]:
    """The run's state types, oldest first, once the read model holds every write made so far."""
    await client.catch_up()
    return [s["type"] for s in (await client.query("ListTaskRunStates", {"task_run_id": str(run_id)})).result]


async def until(check, timeout: float = 10.0) -> None:
    """Waits until `check()` (a function or a coroutine function) is true."""
    deadline = time.monotonic() + timeout
    while not (await result if inspect.isawaitable(result := check()) else result):
        assert time.monotonic() < deadline, "not within the time allowed"
        await asyncio.sleep(0.05)


async def nothing_redelivered(client, settings, key: str) -> None:
    """The key's runs were acknowledged: none waits on its scheduled side, and none was ever
    delivered again (checked after more than the ack wait)."""
    publisher = TaskPublisher(client._nc.jetstream(), settings)

    async def empty() -> bool:
        return await publisher.count(key, "scheduled") == 0

    await until(empty, timeout=ACK_WAIT / 2)  # acknowledged at once, not dropped after a redelivery
    await asyncio.sleep(ACK_WAIT * 2.5)
    info = await client._nc.jetstream().consumer_info(task_stream_name(settings, "scheduled"),
                                                      consumer_name(key, "scheduled"))
    assert info.num_redelivered == 0 and info.num_ack_pending == 0
    assert await publisher.count(key, "scheduled") == 0


async def test_an_async_task_cancelled_while_it_runs_is_stopped_and_the_worker_takes_its_next_run(client, settings):
    started = asyncio.Event()
    seen: list[str] = []
    cancelled_at: list[float] = []

    async def job(label: str, seconds: float) -> str:
        seen.append(f"{label} started")
        started.set()
        try:
            await asyncio.sleep(seconds)
        except asyncio.CancelledError:
            seen.append(f"{label} cancelled")
            cancelled_at.append(time.monotonic())
            raise
        seen.append(f"{label} finished")
        return label

    async with running_worker(settings, {"job": job}, limit=1, worker_id="w1") as worker:
        long = await submit_task(client, "job", {"label": "long", "seconds": 120})
        await asyncio.wait_for(started.wait(), 10)
        nxt = await submit_task(client, "job", {"label": "next", "seconds": 0})  # waits for the one slot
        await asyncio.sleep(0.3)
        assert "next started" not in seen
        asked = time.monotonic()
        result = await client.cancel_task_run(long.id)
        assert result.status == "ACCEPT" and result.state.type == "CANCELLING"
        # Within a bounded time the coroutine sees CancelledError and the run ends CANCELLED...
        done = await wait_for_task_run(client, long.id, timeout=5)
        assert cancelled_at and cancelled_at[0] - asked < 2.0
        assert done.state_type == "CANCELLED" and done.task_worker_id is None
        # ...and the slot is free at once: the next run is taken.
        assert (await wait_for_task_run(client, nxt.id, timeout=5)).state_type == "COMPLETED"
        await nothing_redelivered(client, settings, "job")
        assert worker.started == 2 and worker.cancelled == 1 and worker.finished == 1
    assert seen == ["long started", "long cancelled", "next started", "next finished"]
    assert await history(client, long.id) == ["SCHEDULED", "RUNNING", "CANCELLING", "CANCELLED"]
    assert done.run_count == 1
    assert "w1" in (done.state.message or "")
    # The waiter is told it was cancelled; TaskCancelled is a TaskFailed.
    with pytest.raises(TaskCancelled, match=f"Task run {long.id} was cancelled"):
        await TaskFuture(long.id, client).aresult(timeout=5)
    with pytest.raises(TaskFailed):
        await TaskFuture(long.id, client).aresult(timeout=5)


async def test_a_waiter_is_not_woken_by_cancelling_only_by_the_end(client, settings):
    started = asyncio.Event()

    async def stubborn() -> str:
        started.set()
        await asyncio.sleep(120)
        return "never"

    async with running_worker(settings, {"stubborn": stubborn}):
        run = await submit_task(client, "stubborn")
        await asyncio.wait_for(started.wait(), 10)
        waiting = asyncio.create_task(wait_for_task_run(client, run.id, timeout=10))
        await asyncio.sleep(0.3)
        await client.cancel_task_run(run.id)
        done = await waiting
    assert done.state_type == "CANCELLED"


async def test_a_plain_function_cancelled_while_it_runs_has_its_outcome_dropped(client, settings, caplog):
    started, release, returned = threading.Event(), threading.Event(), threading.Event()
    caplog.set_level(logging.INFO, logger="runledger.task_worker")

    def blocking() -> str:
        started.set()
        release.wait(30)
        returned.set()
        return "too late"

    try:
        async with running_worker(settings, {"blocking": blocking}, limit=1) as worker:
            run = await submit_task(client, "blocking")
            await asyncio.to_thread(started.wait, 10)
            await client.cancel_task_run(run.id)
            done = await wait_for_task_run(client, run.id, timeout=5)
            assert done.state_type == "CANCELLED" and not returned.is_set()  # its thread still runs
            # The log says what happens: not "stopped", but its thread running on.
            said = [r.getMessage() for r in caplog.records if str(run.id) in r.getMessage()]
            assert any("its thread runs on" in line for line in said), said
            assert not any("stopped" in line for line in said), said
            # Its slot is free: the worker takes another run meanwhile.
            release_next = await submit_task(client, "blocking")
            assert worker.cancelled == 1
            release.set()  # both threads return now; the first one's value goes nowhere
            assert (await wait_for_task_run(client, release_next.id, timeout=10)).state_type == "COMPLETED"
            await asyncio.to_thread(returned.wait, 10)
            await asyncio.sleep(0.5)
            assert worker.finished == 1
    finally:
        release.set()
    assert await history(client, run.id) == ["SCHEDULED", "RUNNING", "CANCELLING", "CANCELLED"]


async def test_a_run_set_cancelled_outright_while_it_runs_is_stopped_and_acknowledged(client, settings):
    job, started, stopped = blocking_task()
    async with running_worker(settings, {"job": job}) as worker:
        run = await submit_task(client, "job")
        await asyncio.wait_for(started.wait(), 10)
        result = await client.set_task_run_state(run.id, {"type": "CANCELLED", "message": "not needed"})
        assert result.status == "ACCEPT"
        await until(lambda: stopped, timeout=3)
        await nothing_redelivered(client, settings, "job")
        assert worker.started == 1 and worker.cancelled == 1
    assert await history(client, run.id) == ["SCHEDULED", "RUNNING", "CANCELLED"]
    with pytest.raises(TaskCancelled, match="was cancelled: not needed"):
        await TaskFuture(run.id, client).aresult(timeout=5)


async def test_a_run_cancelled_before_it_starts_is_never_started(client, settings):
    ran: list[int] = []

    async def job(i: int) -> int:
        ran.append(i)
        return i

    waiting = await submit_task(client, "job", {"i": 1})
    result = await client.cancel_task_run(waiting.id)
    assert result.status == "ACCEPT" and result.state.type == "CANCELLED"
    # Set CANCELLING while it waits (a cancel that read it running a moment before): the worker
    # that gets its message ends it CANCELLED, without running it.
    other = await submit_task(client, "job", {"i": 2})
    assert (await client.set_task_run_state(other.id, "CANCELLING")).status == "ACCEPT"
    async with running_worker(settings, {"job": job}) as worker:
        done = await wait_for_task_run(client, other.id, timeout=10)
        publisher = TaskPublisher(client._nc.jetstream(), settings)

        async def dropped() -> bool:
            return await publisher.count("job", "scheduled") == 0

        await until(dropped)
        assert worker.started == 0
    assert ran == []
    assert done.state_type == "CANCELLED" and done.state.message == "Cancelled before it started."
    assert await history(client, waiting.id) == ["SCHEDULED", "CANCELLED"]
    assert await history(client, other.id) == ["SCHEDULED", "CANCELLING", "CANCELLED"]
    with pytest.raises(TaskCancelled, match=f"Task run {waiting.id} was cancelled."):
        await TaskFuture(waiting.id, client).aresult(timeout=5)


async def test_a_finished_run_is_not_cancelled(client, settings):
    async def job() -> str:
        return "done"

    async with running_worker(settings, {"job": job}):
        run = await submit_task(client, "job")
        await wait_for_task_run(client, run.id, timeout=10)
    result = await client.cancel_task_run(run.id)
    assert result.status == "ABORT" and result.state.type == "COMPLETED"


async def test_a_run_whose_worker_died_during_the_cancel_is_cancelled_by_the_next_worker(client, service, settings):
    """The worker dies; the cancel comes while nobody runs the run (no worker hears it): the
    next worker its message is delivered to ends it CANCELLED, and runs nothing."""
    service.connected_at -= 60  # a service up for a while (just after a connect, takeovers wait)
    started = asyncio.Event()
    ran: list[str] = []

    async def slow() -> None:
        ran.append("doomed")
        started.set()
        await asyncio.sleep(60)

    async def heir() -> None:
        ran.append("heir")

    doomed_settings = settings.model_copy(update={"task_ack_wait_seconds": ACK_WAIT})
    nc = await connect(doomed_settings, name="doomed-worker")
    doomed = TaskWorker(nc, doomed_settings, {"dies": slow}, worker_id="doomed")
    await doomed.start()
    serving = asyncio.create_task(doomed.serve(asyncio.Event()))
    run = await submit_task(client, "dies", {})
    await asyncio.wait_for(started.wait(), 10)
    serving.cancel()  # dies: its connection gone, nothing reported or handed back
    for task in list(doomed._running):
        task.cancel()
    await nc.close()
    result = await client.cancel_task_run(run.id)
    assert result.status == "ACCEPT" and result.state.type == "CANCELLING"
    async with running_worker(settings, {"dies": heir}, worker_id="heir"):
        ended = await wait_for_task_run(client, run.id, timeout=15)
    assert ended.state_type == "CANCELLED" and "'doomed' stopped" in ended.state.message
    assert ran == ["doomed"]
    assert await history(client, run.id) == ["SCHEDULED", "RUNNING", "CANCELLING", "CANCELLED"]
    await nothing_redelivered(client, settings, "dies")


async def test_a_task_worker_hears_the_cancel_with_its_own_credentials(roles):  # noqa: F811
    """With the broker roles in force: the task worker hears its run's CANCELLING through its
    account's import of the notices, and stops and reports it, refused nothing."""
    worker_settings = roles.settings("task_worker").model_copy(update={"task_ack_wait_seconds": ACK_WAIT})
    nc = await connect(worker_settings, name="task-worker", wait_for_server=False)
    roles.connections.append(nc)
    job, started, stopped = blocking_task()
    worker = TaskWorker(nc, worker_settings, {"job": job})
    await worker.start()
    stop = asyncio.Event()
    serving = asyncio.create_task(worker.serve(stop))
    try:
        async with RunledgerClient(roles.settings("client")) as rl:
            run = await submit_task(rl, "job")
            await asyncio.wait_for(started.wait(), 10)
            assert (await rl.cancel_task_run(run.id)).state.type == "CANCELLING"
            done = await wait_for_task_run(rl, run.id, timeout=5)
            assert await history(rl, run.id) == ["SCHEDULED", "RUNNING", "CANCELLING", "CANCELLED"]
    finally:
        stop.set()
        await asyncio.wait_for(serving, 10)
    assert done.state_type == "CANCELLED" and stopped == [True]
    assert not roles.violations("task_worker")
