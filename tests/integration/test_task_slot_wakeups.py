"""A freed tag slot wakes the task runs waiting for it, against real NATS and Postgres and a real
task worker: a run its tag's limit holds back (WAIT) starts as soon as the run holding the slot
ends, not after the WAIT's delay (10 s for a classic limit, about the limit's average slot
occupancy for a global `tag:<tag>` one), whatever gave the slot back; a waiting run takes none of its worker's run slots; a
worker that stops hands its waiting runs back at once; a run cancelled while it waits is ended
at once. The bounds below are far above what a wake-up takes, and far below the WAIT's delay."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
import uuid

import pytest

from runledger.client.tasks import submit_task, wait_for_task_run
from runledger.commands.tag_concurrency_limits import EVERY_WAITER
from runledger.infra.nats_connection import connect
from runledger.infra.task_queues import TaskPublisher
from tests.integration.test_task_cancel import history, until
from tests.integration.test_task_queues import running_worker

pytestmark = pytest.mark.asyncio

# Far longer than a wake-up takes (a notice, a jitter of at most 20 ms, a command), and shorter
# than the shortest wait a WAIT's delay made (at least 3 s, less the 0.5 s the slot is held).
WAKE_BOUND = 2.0


def timed_tasks(hold_seconds: float = 0.5):
    """`(functions, times)`: `hold` runs `hold_seconds`, `quick` returns at once; `times` maps
    each call's `name` to the monotonic times it started and ended."""
    times: dict[str, dict[str, float]] = {}

    async def hold(name: str) -> str:
        times[name] = {"start": time.monotonic()}
        await asyncio.sleep(hold_seconds)
        times[name]["end"] = time.monotonic()
        return name

    async def quick(name: str) -> str:
        times[name] = {"start": time.monotonic(), "end": time.monotonic()}
        return name

    return {"hold": hold, "quick": quick}, times


@contextlib.asynccontextmanager
async def tag_notices(settings):
    """The tag-freed notices the service publishes while the block runs: (subject, body)."""
    notices: list[tuple[str, dict]] = []
    nc = await connect(settings, name="test-tag-notices")

    async def heard(msg) -> None:
        notices.append((msg.subject, json.loads(msg.data)))

    await nc.subscribe(f"{settings.namespace}.taskrun.tagfreed.*", cb=heard)
    try:
        yield notices
    finally:
        await nc.close()


async def held_back(worker, times: int = 1) -> None:
    """The worker was told to WAIT `times` times for runs' tags, and keeps them."""
    await until(lambda: worker.tag_waits >= times, timeout=5)


@pytest.mark.parametrize("kind", ["classic", "global"])
async def test_a_run_waiting_for_its_tag_starts_as_soon_as_the_slot_is_given_back(client, settings, kind):
    if kind == "classic":
        await client.create_tag_concurrency_limit("db", 1)
    else:
        await client.create_concurrency_limit("tag:db", 1)
    functions, times = timed_tasks(hold_seconds=0.5)
    async with tag_notices(settings) as notices, running_worker(settings, functions, limit=2) as worker:
        first = await submit_task(client, "hold", {"name": "a"}, tags=["db"])
        await until(lambda: "a" in times)
        second = await submit_task(client, "hold", {"name": "b"}, tags=["db"])
        for run in (first, second):
            assert (await wait_for_task_run(client, run.id, timeout=20)).state_type == "COMPLETED"
        assert worker.started == 2 and worker.tag_waits >= 1  # b was held back by the tag
    # a's end announced the slot it gave back (for a global limit, its `ConcurrencyLimitSlotReleased`
    # names the tag: its `GlobalTagSlotReleased` only the limit's id) ...
    assert (f"{settings.namespace}.taskrun.tagfreed.db", {"tag": "db", "freed": 1}) in notices
    # ... and b started after a gave its slot back, at once, not after the WAIT's delay (10 s for
    # a classic limit; for a global one, about its average occupancy, 2 s unless measured).
    assert times["a"]["end"] <= times["b"]["start"] < times["a"]["end"] + WAKE_BOUND, times
    assert await history(client, second.id) == ["SCHEDULED", "RUNNING", "COMPLETED"]


async def test_a_waiting_run_holds_no_run_slot_and_any_release_of_the_tag_wakes_it(client, settings):
    """A worker with one run slot and a run waiting for its tag still runs another key's run;
    the slot given back by the foreman's `ReleaseTagSlotsOfGoneTaskRuns` (its holder is gone)
    wakes the waiting run, and the notice says which tag and how many slots."""
    await client.create_tag_concurrency_limit("db.main", 1)
    await client.reset_tag_concurrency_limit("db.main", [uuid.uuid4()])  # a holder that no longer exists
    functions, times = timed_tasks()
    async with tag_notices(settings) as notices:
        async with running_worker(settings, functions, limit=1) as worker:
            waiting = await submit_task(client, "quick", {"name": "waiting"}, tags=["db.main"])
            await held_back(worker)
            other = await submit_task(client, "quick", {"name": "other"})
            assert (await wait_for_task_run(client, other.id, timeout=5)).state_type == "COMPLETED"
            assert "waiting" not in times

            released_at = time.monotonic()
            released = await client.command("ReleaseTagSlotsOfGoneTaskRuns", {"tag": "db.main"})
            assert len(released.result["released"]) == 1
            assert (await wait_for_task_run(client, waiting.id, timeout=20)).state_type == "COMPLETED"
        assert times["waiting"]["start"] < released_at + WAKE_BOUND, (times, released_at)
        assert (f"{settings.namespace}.taskrun.tagfreed.db~2Emain", {"tag": "db.main", "freed": 1}) in notices


async def test_a_stopping_worker_hands_its_waiting_runs_back_at_once(client, settings):
    """Its waiting run's message is handed back, not left to the acknowledgement wait (long
    here): the next worker gets it at once and starts it as soon as the tag's slot is freed."""
    long_ack = settings.model_copy(update={"task_ack_wait_seconds": 60.0})
    await client.create_tag_concurrency_limit("db", 1)
    await client.reset_tag_concurrency_limit("db", [uuid.uuid4()])
    functions, times = timed_tasks()
    async with running_worker(long_ack, functions, limit=2) as first:
        waiting = await submit_task(client, "quick", {"name": "waiting"}, tags=["db"])
        await held_back(first)
    async with running_worker(long_ack, functions, limit=2) as second:
        released_at = time.monotonic()
        await client.command("ReleaseTagSlotsOfGoneTaskRuns", {"tag": "db"})
        assert (await wait_for_task_run(client, waiting.id, timeout=30)).state_type == "COMPLETED"
        assert second.started == 1
    assert times["waiting"]["start"] < released_at + WAKE_BOUND, (times, released_at)


async def test_a_run_cancelled_while_it_waits_for_its_tag_is_ended_at_once(client, settings):
    """Its message is not kept for the rest of the WAIT's delay: the worker hears the cancel,
    proposes the run again, is told it is cancelled, and acknowledges it; it never runs."""
    await client.create_tag_concurrency_limit("db", 1)
    await client.reset_tag_concurrency_limit("db", [uuid.uuid4()])
    functions, times = timed_tasks()
    publisher = TaskPublisher(client._nc.jetstream(), settings)
    async with running_worker(settings, functions, limit=2) as worker:
        waiting = await submit_task(client, "quick", {"name": "waiting"}, tags=["db"])
        await held_back(worker)
        cancelled_at = time.monotonic()
        assert (await client.set_task_run_state(waiting.id, "CANCELLING")).status == "ACCEPT"

        async def settled() -> bool:
            return await publisher.count("quick", "scheduled") == 0
        await until(settled, timeout=WAKE_BOUND)
        assert time.monotonic() < cancelled_at + WAKE_BOUND
        assert (await wait_for_task_run(client, waiting.id, timeout=5)).state_type == "CANCELLED"
    assert "waiting" not in times


@pytest.mark.parametrize("change", ["raise", "reset", "delete"])
async def test_a_run_waiting_for_its_tag_starts_as_soon_as_an_operator_makes_room(client, settings, change):
    """Raising the tag's limit, resetting its slots or deleting it is announced like a slot given
    back: the waiting run starts at once, not after the WAIT's 10 s."""
    await client.create_tag_concurrency_limit("db", 1)
    await client.reset_tag_concurrency_limit("db", [uuid.uuid4()])  # held by a run that never ends
    functions, times = timed_tasks()
    async with tag_notices(settings) as notices, running_worker(settings, functions, limit=2) as worker:
        waiting = await submit_task(client, "quick", {"name": "waiting"}, tags=["db"])
        await held_back(worker)
        changed_at = time.monotonic()
        if change == "raise":
            await client.create_tag_concurrency_limit("db", 3)
        elif change == "reset":
            await client.reset_tag_concurrency_limit("db")
        else:
            await client.delete_tag_concurrency_limit("db")
        assert (await wait_for_task_run(client, waiting.id, timeout=20)).state_type == "COMPLETED"
    assert times["waiting"]["start"] < changed_at + WAKE_BOUND, (times, changed_at)
    freed = {"raise": 2, "reset": 1, "delete": EVERY_WAITER}[change]
    assert (f"{settings.namespace}.taskrun.tagfreed.db", {"tag": "db", "freed": freed}) in notices


async def test_a_global_tag_limit_raised_made_inactive_or_deleted_is_announced(client, settings):
    """What the runs waiting for a `tag:<tag>` limit hear (their worker's wake-up is the one above)."""
    limit = await client.create_concurrency_limit("tag:db", 1, active_slots=1)
    subject = f"{settings.namespace}.taskrun.tagfreed.db"
    async with tag_notices(settings) as notices:
        await client.update_concurrency_limit(limit.id, slot_decay_per_second=0.5)  # still full: no room
        await client.update_concurrency_limit(limit.id, limit=2)
        await until(lambda: len(notices) == 1)
        await client.update_concurrency_limit(limit.id, active=False)
        await until(lambda: len(notices) == 2)
        await client.delete_concurrency_limit(limit.id)
        await until(lambda: len(notices) == 3)
    assert notices == [(subject, {"tag": "db", "freed": 1}), (subject, {"tag": "db", "freed": EVERY_WAITER}),
                       (subject, {"tag": "db", "freed": EVERY_WAITER})]
