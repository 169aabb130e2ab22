"""Task runs on task-key subjects, served by task workers, through the broker against real NATS
and Postgres: submit → a worker runs it → its outcome recorded and awaited; retries through the
retry side; the order of keys and sides; a full key; a worker that dies mid-run; copies of a
run that must not run it twice."""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid

import pytest

from runledger.client import NotFound, Unavailable
from runledger.client.tasks import TaskFailed, submit_task, task_result, wait_for_task_run
from runledger.handlers.task_dispatch import task_message
from runledger.handlers.task_worker import TaskWorker
from runledger.infra.nats_connection import connect
from runledger.infra.task_queues import (
    TaskPublisher,
    consumer_name,
    task_stream_name,
    task_subject,
    task_worker_bucket,
)

pytestmark = pytest.mark.asyncio


@contextlib.asynccontextmanager
async def running_worker(settings, functions, **options):
    """A task worker on a connection of its own, serving until the block ends."""
    nc = await connect(settings, name="test-task-worker")
    worker = TaskWorker(nc, settings, functions, **options)
    await worker.start()
    stop = asyncio.Event()
    serving = asyncio.create_task(worker.serve(stop))
    try:
        yield worker
    finally:
        stop.set()
        await asyncio.wait_for(serving, 30)
        await nc.close()


async def state_names(client, run_id, field="name") -> list[str]:
    """The run's state history, once the read model holds every write made so far (the
    worker's, too)."""
    await client.catch_up()
    return [s[field] for s in (await client.query("ListTaskRunStates", {"task_run_id": str(run_id)})).result]


async def test_a_submitted_task_runs_once_and_its_result_is_awaited(client, settings):
    calls: list[dict] = []

    async def add(x: int, y: int) -> int:
        calls.append({"x": x, "y": y})
        return x + y

    async with running_worker(settings, {"math.add": add}):
        run = await submit_task(client, "math.add", {"x": 2, "y": 3})
        assert run.state_type == "SCHEDULED" and run.state.state_details["deferred"] is True
        done = await wait_for_task_run(client, run.id, timeout=10)
    assert task_result(done) == 5
    assert calls == [{"x": 2, "y": 3}]
    assert done.run_count == 1 and done.task_worker_id is None
    assert await state_names(client, run.id, "type") == ["SCHEDULED", "RUNNING", "COMPLETED"]

    # The same through the client's own method, with an option passed on.
    async with running_worker(settings, {"math.add": add}):
        run = await client.submit_task("math.add", {"x": 4, "y": 5}, tags=["via-method"])
        assert run.task_key == "math.add" and run.tags == ["via-method"]
        assert task_result(await wait_for_task_run(client, run.id, timeout=10)) == 9


async def test_a_run_longer_than_the_ack_wait_is_kept_and_not_taken_by_another_worker(client, settings):
    """While a run runs, its worker tells JetStream it still works on it (every third of the
    ack wait): a second worker of the key, idle, is never handed the run, however long it takes
    past the ack wait."""
    quick = settings.model_copy(update={"task_ack_wait_seconds": 1.0})
    calls: list[str] = []

    async def slow(label: str) -> str:
        calls.append(label)
        await asyncio.sleep(3.5)  # three and a half ack waits
        return label

    async with running_worker(quick, {"slow": slow}) as first, running_worker(quick, {"slow": slow}):
        run = await submit_task(client, "slow", {"label": "once"})
        done = await wait_for_task_run(client, run.id, timeout=15)
        consumer = await first.js.consumer_info(task_stream_name(settings, "scheduled"),
                                                consumer_name("slow", "scheduled"))
    assert task_result(done) == "once" and calls == ["once"]
    assert consumer.delivered.consumer_seq == 1  # delivered once, never handed to anyone again
    assert await state_names(client, run.id, "type") == ["SCHEDULED", "RUNNING", "COMPLETED"]


async def test_a_sync_function_runs_off_the_event_loop_and_a_failure_is_recorded(client, settings):
    def boom(name: str) -> None:
        time.sleep(0.05)
        raise ValueError(f"no {name}")

    async with running_worker(settings, {"boom": boom}):
        run = await submit_task(client, "boom", {"name": "cheese"})
        done = await wait_for_task_run(client, run.id, timeout=10)
    assert done.state_type == "FAILED"
    assert done.state.message == "ValueError: no cheese"
    assert done.state.data["exception_type"] == "ValueError"
    with pytest.raises(TaskFailed, match="no cheese"):
        task_result(done)


async def test_retries_go_through_the_retry_side_and_end_completed(client, settings):
    attempts: list[float] = []

    async def flaky() -> str:
        attempts.append(time.monotonic())
        if len(attempts) < 3:
            raise RuntimeError("not yet")
        return "ok"

    async with running_worker(settings, {"flaky": flaky}):
        run = await submit_task(client, "flaky", retries=3, retry_delay=[0, 1])
        done = await wait_for_task_run(client, run.id, timeout=20)
    assert task_result(done) == "ok"
    assert done.run_count == 3 and done.state_name == "Completed"
    assert await state_names(client, run.id) == ["Scheduled", "Running", "AwaitingRetry", "AwaitingRetry", "Retrying", "AwaitingRetry",
                     "AwaitingRetry", "Retrying", "Completed"]
    assert attempts[2] - attempts[1] >= 0.9  # the second delay of the list: 1 s


async def test_retries_first_within_a_key_and_keys_in_the_order_given(client, settings):
    """With one slot and runs already waiting: key `a` before key `b`, and within `a` its retry
    side before its scheduled side."""
    order: list[str] = []

    async def record(label: str) -> None:
        order.append(label)

    publisher = TaskPublisher(client._nc.jetstream(), settings)
    for label in ("b1", "b2"):
        await submit_task(client, "b", {"label": label})
    for label in ("a1", "a2"):
        await submit_task(client, "a", {"label": label})
    # A run on `a`'s retry side, queued after the others.
    retry = await submit_task(client, "a", {"label": "a-retry"})
    await publisher.publish("a", "retry", str(retry.id), "retry-copy", task_message_of(retry))
    async with running_worker(settings, {"a": record, "b": record}, keys=["a", "b"], limit=1):
        for _ in range(200):
            if len(order) >= 5:
                break
            await asyncio.sleep(0.05)
    assert order[0] == "a-retry"
    assert set(order[1:3]) == {"a1", "a2"} and order[3:] == ["b1", "b2"]


def task_message_of(client_run) -> bytes:
    return client_run.model_dump_json().encode()


async def test_a_full_key_refuses_the_submitter_and_keeps_what_is_queued(service_with):
    async with service_with(task_queue_size=3) as (small, rl):
        queued = [await submit_task(rl, "small", {"i": i}) for i in range(3)]
        with pytest.raises(Unavailable, match="Task key 'small' is full: 3 runs already wait"):
            await submit_task(rl, "small", {"i": 3})
        # A refused submit's reply says no sequence to wait for: catch up with the log.
        refused = (await rl.query("ListTaskRuns", {"task_runs": {"task_key": {"any_": ["small"]}, "state_type": {"any_": ["CANCELLED"]}}},
                                  min_seq=await rl.catch_up())).result
        assert len(refused) == 1 and "not queued" in refused[0]["state"]["message"]
        # Sent again, as a client does after a lost reply, it is refused again: by the same
        # dynamic key (the run it made comes back cancelled) ...
        with pytest.raises(Unavailable, match="was cancelled and will not run: Task key 'small' is full"):
            await submit_task(rl, "small", {"i": 3}, dynamic_key=refused[0]["dynamic_key"])
        # ... and by the same idempotency key of the bus (its first reply, recorded).
        body = {"task_key": "small", "dynamic_key": "resent", "parameters": {},
                "state": {"type": "SCHEDULED", "state_details": {"deferred": True}},
                "idempotency_key": "submission-1"}
        for attempt in range(2):
            with pytest.raises(Unavailable, match="Task key 'small' is full") as refusal:
                await rl.command("CreateTaskRun", body)
            assert refusal.value.message.endswith("submit it again later, or wait longer for room."), attempt
        log_end = (await rl._nc.jetstream().stream_info(small.stream_name)).state.last_seq
        refused = (await rl.query("ListTaskRuns", {"task_runs": {"task_key": {"any_": ["small"]}, "state_type": {"any_": ["CANCELLED"]}}},
                                  min_seq=log_end)).result
        assert len(refused) == 2  # the resent ones made nothing new
        # Waiting for room: a worker frees it meanwhile.
        seen: list[int] = []

        async def take(i: int) -> int:
            seen.append(i)
            return i

        async with running_worker(small, {"small": take}):
            late = await submit_task(rl, "small", {"i": 4}, queue_wait_seconds=10)
            done = [await wait_for_task_run(rl, r.id, timeout=10) for r in [*queued, late]]
        assert [task_result(d) for d in done] == [0, 1, 2, 4]
        assert sorted(seen) == [0, 1, 2, 4]


async def test_a_worker_that_dies_mid_run_loses_it_to_another_soon_after_the_ack_wait(client, service, settings):
    service.connected_at -= 60  # a service up for a while (just after a connect, takeovers wait)
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

    nc = await connect(settings, name="doomed-worker")
    doomed = TaskWorker(nc, settings, {"job": slow}, worker_id="doomed")
    await doomed.start()
    stop = asyncio.Event()
    serving = asyncio.create_task(doomed.serve(stop))
    run = await submit_task(client, "job", {"label": "x"})
    await asyncio.wait_for(started.wait(), 10)
    # Dies: its connection gone, its tasks never finish nor hand anything back.
    serving.cancel()
    for task in list(doomed._running):
        task.cancel()
    await nc.close()
    died = time.monotonic()
    async with running_worker(settings, {"job": quick}, worker_id="heir"):
        done = await wait_for_task_run(client, run.id, timeout=15)
        taken_over_after = time.monotonic() - died
    assert task_result(done) == "x"
    assert runs == ["x", "x-again"]
    assert taken_over_after < 8.0  # about the ack wait (3 s); bench/tasks.py measures it
    assert await state_names(client, run.id) == ["Scheduled", "Running", "Rerunning", "Completed"]


async def test_a_second_copy_of_a_queued_run_does_not_run_it_twice(client, settings):
    runs: list[int] = []

    async def once(i: int) -> int:
        runs.append(i)
        await asyncio.sleep(0.2)
        return i

    run = await submit_task(client, "once", {"i": 7})
    publisher = TaskPublisher(client._nc.jetstream(), settings)
    # Copies with other message ids (what a recovered publish after the dedup window makes).
    for n in range(3):
        await publisher.publish("once", "scheduled", str(run.id), f"copy-{n}", task_message_of(run))
    async with running_worker(settings, {"once": once}, limit=4):
        done = await wait_for_task_run(client, run.id, timeout=10)
        for _ in range(50):  # the copies are delivered and dropped meanwhile
            left = await publisher.count("once", "scheduled")
            if left == 0:
                break
            await asyncio.sleep(0.1)
    assert task_result(done) == 7
    assert runs == [7]
    assert left == 0


async def test_task_message_is_the_run_as_written():
    import json
    from datetime import UTC, datetime

    from runledger.commands.task_runs import TaskRun

    run = TaskRun(id=uuid.uuid4(), created=datetime.now(UTC), updated=datetime.now(UTC), name="n", task_key="k",
                  dynamic_key="d", parameters={"a": 1})
    assert TaskRun.model_validate_json(task_message(run)) == run
    # A task worker older than `waiting_reason` reads it (it refuses fields it does not know).
    assert "waiting_reason" not in json.loads(task_message(run))
    waiting = run.model_copy(update={"waiting_reason": "Concurrency limit for the db tag has been reached"})
    assert TaskRun.model_validate_json(task_message(waiting)) == waiting


async def test_subjects_carry_the_encoded_key(settings):
    assert task_subject(settings, "my.task key*>", "retry") == f"{settings.namespace}.task.my~2Etask~20key~2A~3E.retry"


async def test_a_run_stored_but_never_published_is_queued_by_the_recovery_sweep(client, service, settings):
    from runledger.handlers.task_dispatch import TaskRecovery

    publish = service.commands.after_append
    service.commands.after_append = None  # the service dies between the append and the publish
    try:
        lost = await submit_task(client, "lost", {"n": 1})
    finally:
        service.commands.after_append = publish
    publisher = TaskPublisher(client._nc.jetstream(), settings)
    assert await publisher.count("lost", "scheduled") == 0
    await client.read_task_run(lost.id, min_seq=await client.catch_up())  # the read model holds it: the sweep reads there
    sweep = TaskRecovery(service.engine, publisher, older_than=0)
    assert await sweep.sweep() == 1
    assert await sweep.sweep() == 0  # on its subject now: nothing more to do
    assert await publisher.count("lost", "scheduled") == 1

    async def found(n: int) -> int:
        return n

    async with running_worker(settings, {"lost": found}):
        assert task_result(await wait_for_task_run(client, lost.id, timeout=10)) == 1
    assert await sweep.sweep() == 0


async def test_task_workers_are_listed_while_they_serve_with_their_keys(client, settings):
    async def noop() -> None:
        return None

    async with running_worker(settings, {"k1": noop, "k2": noop}, worker_id="lister-a"):
        async with running_worker(settings, {"k3": noop}, worker_id="lister-b"):
            for _ in range(50):
                workers = await client.read_task_workers()
                if len(workers) == 2:
                    break
                await asyncio.sleep(0.1)
            assert [(w.identifier, w.task_keys) for w in workers] == [("lister-a", ["k1", "k2"]),
                                                                       ("lister-b", ["k3"])]
            assert [w.identifier for w in await client.read_task_workers(["k3", "nope"])] == ["lister-b"]
            assert await client.read_task_workers(["nope"]) == []
        # A worker that stops says so: it is gone at once, not when its entry expires.
        assert [w.identifier for w in await client.read_task_workers()] == ["lister-a"]
        assert [w.identifier for w in await client.read_task_workers([])] == ["lister-a"]  # no filter: every one


async def test_an_entry_that_is_no_heartbeat_leaves_the_other_workers_listed(client, settings):
    """Any task worker may write the bucket of heartbeats: what is not one (not JSON, a field
    missing or of the wrong type, a time that is no time) is left out of the list, never the
    whole answer; the times answered are written as every other reply writes them."""
    async def noop() -> None:
        return None

    nc = await connect(settings)
    try:
        js = nc.jetstream()
        bucket = task_worker_bucket(settings)
        for n, body in enumerate([b"not json", b'{"identifier": "x"}', b'{"identifier": 5, "task_keys": [], '
                                  b'"timestamp": "2026-01-01T00:00:00Z"}',
                                  b'{"identifier": "y", "task_keys": ["k"], "timestamp": "yesterday"}']):
            await js.publish(f"$KV.{bucket}.junk{n}", body)
        async with running_worker(settings, {"k1": noop}, worker_id="honest"):
            for _ in range(50):
                workers = await client.read_task_workers()
                if workers:
                    break
                await asyncio.sleep(0.1)
            assert [(w.identifier, w.task_keys) for w in workers] == [("honest", ["k1"])]
            raw = await client.query("ListTaskWorkers", {})
            assert raw.result[0]["timestamp"].endswith("Z")
    finally:
        await nc.close()


async def test_connections_sharing_an_id_are_one_worker_with_the_union_of_their_keys(client, settings):
    async def noop() -> None:
        return None

    async with running_worker(settings, {"same.a": noop}, worker_id="same"):
        async with running_worker(settings, {"same.b": noop}, worker_id="same"):
            for _ in range(100):  # each connection's first heartbeat
                workers = await client.read_task_workers()
                if [sorted(w.task_keys) for w in workers] == [["same.a", "same.b"]]:
                    break
                await asyncio.sleep(0.1)
            assert [(w.identifier, sorted(w.task_keys)) for w in workers] == [("same", ["same.a", "same.b"])]
            assert [w.identifier for w in await client.read_task_workers(["same.a"])] == ["same"]
            assert [w.identifier for w in await client.read_task_workers(["same.b"])] == ["same"]
        # One connection stops: the worker stays, with the other's keys.
        assert [(w.identifier, w.task_keys) for w in await client.read_task_workers()] == [("same", ["same.a"])]


async def test_a_stopping_worker_finishes_what_it_can_and_hands_back_the_rest(client, service, settings):
    service.connected_at -= 60  # a service up for a while (right after a connect, takeovers wait)
    started: list[str] = []

    async def job(label: str, seconds: float) -> str:
        started.append(label)
        await asyncio.sleep(seconds)
        return label

    # A long ack wait: a run not handed back would come back only after it.
    patient = settings.model_copy(update={"task_ack_wait_seconds": 30.0})
    async with running_worker(patient, {"job": job}, worker_id="leaving", grace_seconds=3.0) as leaving:
        short = await submit_task(client, "job", {"label": "short", "seconds": 0.3})
        long = await submit_task(client, "job", {"label": "long", "seconds": 30})
        for _ in range(100):
            if len(started) == 2:
                break
            await asyncio.sleep(0.05)
        assert sorted(started) == ["long", "short"]
    # Stopped (SIGTERM's path): the short run finished within the grace period...
    assert leaving.finished == 1
    assert (await wait_for_task_run(client, short.id, timeout=5)).state_type == "COMPLETED"
    # ...the long one was handed back at once, and another worker runs it.

    async def quick(label: str, seconds: float) -> str:
        started.append(f"{label}-again")
        return label

    t0 = time.monotonic()
    async with running_worker(patient, {"job": quick}, worker_id="staying"):
        done = await wait_for_task_run(client, long.id, timeout=20)
    assert task_result(done) == "long" and time.monotonic() - t0 < 10  # at once, not after the ack wait
    assert started.count("long-again") == 1


async def test_a_run_that_can_never_start_ends_failed_saying_why(client, settings):
    await client.create_tag_concurrency_limit("blocked", 0)
    ran: list[int] = []

    async def never(i: int) -> int:
        ran.append(i)
        return i

    async with running_worker(settings, {"never": never}):
        run = await submit_task(client, "never", {"i": 1}, tags=["blocked"])
        done = await wait_for_task_run(client, run.id, timeout=10)
    assert ran == [] and done.state_type == "FAILED"
    assert "cannot start" in done.state.message and "is 0 and will deadlock" in done.state.message


async def test_a_key_may_have_a_bound_of_its_own_above_or_below_the_default(service_with):
    async with service_with(task_queue_size=3, task_queue_sizes={"small": 1, "big": 5}) as (sized, rl):
        for key, bound in (("small", 1), ("plain", 3), ("big", 5)):
            for i in range(bound):
                await submit_task(rl, key, {"i": i})
            with pytest.raises(Unavailable, match=f"Task key '{key}' is full: {bound} runs already wait"):
                await submit_task(rl, key, {"i": bound})
        publisher = TaskPublisher(rl._nc.jetstream(), sized)
        assert [await publisher.count(k, "scheduled") for k in ("small", "plain", "big")] == [1, 3, 5]


async def test_a_large_result_is_stored_apart_and_read_back_whole(client, settings):
    from runledger.client.tasks import fetch_task_result
    from runledger.handlers.task_worker import MAX_RESULT_BYTES

    big = {"rows": [f"row {i} " + "x" * 90 for i in range(30_000)]}  # ~3 MB as JSON: 6 chunks

    async def report() -> dict:
        return big

    async with running_worker(settings, {"report": report}):
        run = await submit_task(client, "report")
        done = await wait_for_task_run(client, run.id, timeout=20)
    reference = done.state.data
    assert done.state_type == "COMPLETED" and reference["type"] == "reference"
    assert reference["size"] > MAX_RESULT_BYTES and reference["chunks"] >= 6
    assert await fetch_task_result(client, done) == big
    # Without the reference's attempt, the read model's reference is used.
    await client.catch_up()
    first = (await client.query("GetTaskRunResult", {"id": str(run.id)})).result
    assert (first["chunks"], first["size"], first["sha256"]) == (
        reference["chunks"], reference["size"], reference["sha256"])
    with pytest.raises(NotFound):
        await client.query("GetTaskRunResult", {"id": str(run.id), "attempt": str(uuid.uuid4())}, min_seq=0)
    with pytest.raises(NotFound):  # a small result is in its state
        small = await submit_task(client, "nothing-stored")
        await client.query("GetTaskRunResult", {"id": str(small.id)})


async def test_a_run_given_a_start_time_starts_no_earlier(client, settings):
    from datetime import UTC, datetime, timedelta

    from runledger.client.tasks import Task

    started: dict[str, datetime] = {}

    async def when(label: str) -> str:
        started[label] = datetime.now(UTC)
        return label

    later = Task(when, key="later")
    with pytest.raises(ValueError, match="time zone"):
        await later.adelay_until(datetime.now() + timedelta(seconds=1), "naive", client=client)  # noqa: DTZ005
    async with running_worker(settings, {"later": when}):
        at = datetime.now(UTC) + timedelta(seconds=1.5)
        future = await later.adelay_until(at, "first", client=client)
        now = await submit_task(client, "later", {"label": "now"})
        assert task_result(await wait_for_task_run(client, now.id, timeout=10)) == "now"
        assert await future.aresult(timeout=10) == "first"
    assert started["first"] >= at > started["now"]  # held back; the run submitted after it was not
    run = await client.read_task_run(future.task_run_id, min_seq=await client.catch_up())
    assert run.state_name == "Completed"
    states = await client.read_task_run_states(future.task_run_id)
    assert states[0].state_details["scheduled_time"] is not None


async def test_a_message_of_a_run_not_stored_yet_is_asked_for_again_then_dropped(client, settings, monkeypatch):
    """The service publishes a run while its create is being stored; a worker whose start
    meets `not_found` (another service instance may not see the create yet) gets the message
    again a moment later instead of dropping it, and drops it once it is older than the grace
    (a run whose create never landed). Its function never runs."""
    from datetime import UTC, datetime

    from runledger.commands.task_runs import TaskRun
    from runledger.handlers import task_worker

    monkeypatch.setattr(task_worker, "NOT_FOUND_GRACE_SECONDS", 3.0)
    calls: list[int] = []

    async def never(n: int) -> int:
        calls.append(n)
        return n

    now = datetime.now(UTC)
    ghost = TaskRun(id=uuid.uuid4(), created=now, updated=now, name="ghost", task_key="ghost", dynamic_key="g",
                    parameters={"n": 1})
    publisher = TaskPublisher(client._nc.jetstream(), settings)
    await publisher.publish("ghost", "scheduled", str(ghost.id), "s1", task_message(ghost))
    async with running_worker(settings, {"ghost": never}):
        await asyncio.sleep(0.8)
        kept = await publisher.count("ghost", "scheduled")  # asked for again, not dropped
        for _ in range(60):
            if await publisher.count("ghost", "scheduled") == 0:
                break
            await asyncio.sleep(0.1)
        left = await publisher.count("ghost", "scheduled")
    assert kept == 1 and left == 0
    assert calls == []


async def test_a_worker_that_keeps_up_takes_each_run_with_one_pull(client, settings):
    """A worker whose key empties as fast as runs come does not ask for a run it was just told
    is not there: each run costs it one pull (a waiting one), not a probe that hears "none"
    and then the waiting pull (two requests and two answers per run through the broker)."""
    async def job(i: int) -> int:
        return i

    async with running_worker(settings, {"pulls.k": job}, poll_seconds=5.0) as worker:
        first = await submit_task(client, "pulls.k", {"i": -1})
        await wait_for_task_run(client, first.id, timeout=10)
        await asyncio.sleep(0.2)  # its next pulls are out, waiting
        before = worker.pulls
        for i in range(20):
            run = await submit_task(client, "pulls.k", {"i": i})
            assert task_result(await wait_for_task_run(client, run.id, timeout=10)) == i
        await asyncio.sleep(0.2)
        pulls = worker.pulls - before
    assert pulls <= 24, pulls  # one per run, give or take the retry side's; it was ~40
