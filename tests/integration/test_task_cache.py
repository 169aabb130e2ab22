"""Caching of background task runs, against real NATS and Postgres: a run submitted with the
cache key of an unexpired COMPLETED state is given a copy of it (`Cached`) by the service when
a worker takes it, and its function does not run; an expired entry, another key, or a failure
does not count; `refresh_cache` runs it all the same and replaces the cached state.
`@task(cache_policy="inputs")` makes the key from the parameters."""

from __future__ import annotations

import asyncio
import uuid
from datetime import UTC, datetime, timedelta

import pytest

from runledger.client.tasks import (
    Task,
    fetch_task_result,
    submit_task,
    task_result,
    wait_for_task_run,
)
from tests.integration.test_task_queues import running_worker, state_names

pytestmark = pytest.mark.asyncio


async def test_a_run_with_a_cached_key_takes_a_copy_of_its_state_and_does_not_run(client, settings):
    calls: list[int] = []

    async def square(x: int) -> int:
        calls.append(x)
        return x * x

    async with running_worker(settings, {"sq": square}):
        first = await wait_for_task_run(client, (await submit_task(client, "sq", {"x": 3}, cache_key="sq-3")).id,
                                        timeout=10)
        again = await wait_for_task_run(client, (await submit_task(client, "sq", {"x": 3}, cache_key="sq-3")).id,
                                        timeout=10)
        other = await wait_for_task_run(client, (await submit_task(client, "sq", {"x": 4}, cache_key="sq-4")).id,
                                        timeout=10)
    assert calls == [3, 4]  # the second run of key sq-3 did not run
    assert task_result(first) == task_result(again) == 9 and task_result(other) == 16
    assert again.state_name == "Cached" and first.state_name == "Completed"
    assert await state_names(client, again.id) == ["Scheduled", "Cached"]


async def test_refresh_cache_runs_the_task_and_replaces_the_cached_state(client, settings):
    """Prefect's `refresh_cache`: the run does not take the cached state, it runs, and what it
    returns is the key's state from then on; without it the next run takes the new state. It
    holds through a retry too."""
    calls: list[int] = []

    async def count(x: int) -> int:
        calls.append(x)
        if len(calls) == 3:
            raise RuntimeError("the refreshed run fails once, then retries")
        return len(calls)

    async with running_worker(settings, {"count": count}):
        async def run(**options) -> object:
            submitted = await submit_task(client, "count", {"x": 1}, cache_key="c", **options)
            return await wait_for_task_run(client, submitted.id, timeout=15)

        first = await run()
        refreshed = await run(refresh_cache=True)
        cached = await run()
        retried = await run(refresh_cache=True, retries=1, retry_delay=0)
        cached_again = await run()
    assert [task_result(r) for r in (first, refreshed, cached, retried, cached_again)] == [1, 2, 2, 4, 4]
    assert len(calls) == 4 and (refreshed.state_name, cached.state_name) == ("Completed", "Cached")
    assert await state_names(client, retried.id) == ["Scheduled", "Running", "AwaitingRetry", "AwaitingRetry",
                                                     "Retrying", "Completed"]


async def test_task_refresh_cache_option_refreshes_every_run(client, settings):
    calls: list[int] = []

    async def double(x: int) -> int:
        calls.append(x)
        return 2 * x

    doubled = Task(double, key="double", cache_policy="inputs", refresh_cache=True)
    async with running_worker(settings, {"double": double}):
        for _ in range(2):
            future = await doubled.adelay(5, client=client)
            assert await future.aresult(timeout=10) == 10
    assert calls == [5, 5]


async def test_an_expired_entry_or_a_failure_is_not_used(client, settings):
    calls: list[int] = []

    async def flaky(x: int) -> int:
        calls.append(x)
        if len(calls) == 1:
            raise RuntimeError("first call fails")
        return x

    past = datetime.now(UTC) - timedelta(seconds=1)
    async with running_worker(settings, {"flaky": flaky}):
        failed = await wait_for_task_run(client, (await submit_task(client, "flaky", {"x": 1}, cache_key="f")).id,
                                         timeout=10)
        assert failed.state_type == "FAILED"
        expired = await submit_task(client, "flaky", {"x": 1}, cache_key="f", cache_expiration=past)
        assert task_result(await wait_for_task_run(client, expired.id, timeout=10)) == 1  # a failure is not cached
        ran_again = await wait_for_task_run(client, (await submit_task(client, "flaky", {"x": 1}, cache_key="f")).id,
                                            timeout=10)
    assert calls == [1, 1, 1]  # the entry recorded by `expired` had expired when it was written
    assert ran_again.state_name == "Completed"


async def test_an_older_entry_that_never_expires_answers_once_a_newer_one_has_expired(client):
    """Prefect looks up the newest entry not expired, not merely the newest."""
    key = f"cache-{uuid.uuid4()}"
    never, _ = await client.create_task_run("cache", "never")
    assert (await client.set_task_run_state(never.id, {"type": "COMPLETED", "data": {"type": "unpersisted"},
                                                       "state_details": {"cache_key": key}})).accepted
    short, _ = await client.create_task_run("cache", "short")
    soon = datetime.now(UTC) + timedelta(seconds=1)
    assert (await client.set_task_run_state(short.id, {"type": "COMPLETED", "state_details": {
        "cache_key": key, "cache_expiration": soon.isoformat()}})).accepted
    await asyncio.sleep(max(0.0, (soon - datetime.now(UTC)).total_seconds()) + 0.1)
    third, _ = await client.create_task_run("cache", "third")
    result = await client.set_task_run_state(third.id, {"type": "RUNNING", "state_details": {"cache_key": key}})
    assert result.status == "REJECT" and result.state.name == "Cached"
    assert result.state.data == {"type": "unpersisted"}  # the older entry's


async def test_task_cache_policy_inputs_caches_by_parameters(client, settings):
    calls: list[dict] = []

    async def add(a: int, b: int) -> int:
        calls.append({"a": a, "b": b})
        return a + b

    cached_add = Task(add, key="add.cached", cache_policy="inputs", cache_expiration=timedelta(hours=1))
    assert cached_add.cache_key({"a": 1, "b": 2}) == cached_add.cache_key({"b": 2, "a": 1})
    assert cached_add.cache_key({"a": 1, "b": 2}) != cached_add.cache_key({"a": 2, "b": 1})
    assert Task(add, key="add.plain").cache_key({"a": 1, "b": 2}) is None
    with pytest.raises(ValueError, match="one policy is 'inputs'"):
        Task(add, cache_policy="source")

    async with running_worker(settings, {"add.cached": add}):
        futures = [await cached_add.adelay(1, 2, client=client)]
        await futures[0].aresult(timeout=10)
        futures += [await cached_add.adelay(b=2, a=1, client=client), await cached_add.adelay(2, 1, client=client)]
        results = [await f.aresult(timeout=10) for f in futures]
    assert results == [3, 3, 3]
    assert calls == [{"a": 1, "b": 2}, {"a": 2, "b": 1}]
    run = await client.read_task_run(futures[1].task_run_id)
    assert run.state_name == "Cached" and run.cache_expiration is not None


async def test_a_cached_copy_of_a_large_result_reads_back_whole(client, settings):
    """A result over 256 KiB is stored apart by the run that computed it: its cached copy
    carries the same reference, and reads it back from that run's chunks."""
    calls: list[int] = []

    async def big(n: int) -> str:
        calls.append(n)
        return "x" * n

    async with running_worker(settings, {"big": big}):
        first = await submit_task(client, "big", {"n": 400_000}, cache_key="big-400k")
        await wait_for_task_run(client, first.id, timeout=10)
        copy = await submit_task(client, "big", {"n": 400_000}, cache_key="big-400k")
        copied = await wait_for_task_run(client, copy.id, timeout=10)
    assert calls == [400_000] and copied.state_name == "Cached"
    assert copied.state.data["type"] == "reference" and copied.state.data["task_run_id"] == str(first.id)
    assert await fetch_task_result(client, copied) == "x" * 400_000
