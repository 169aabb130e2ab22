"""Many task runs in one request (`CreateTaskRuns`, `submit_tasks`, `Task.map`), through the
broker against real NATS and Postgres: each run as if submitted alone, one short reply each,
safe to send again; an invalid body creates nothing; a full key refuses only the runs that do
not fit; mapped task functions run and their results come back."""

from __future__ import annotations

import asyncio
import json

import pytest

from runledger.client import Invalid
from runledger.client.tasks import (
    SubmissionRefused,
    submit_tasks,
    task,
    task_result,
    unmapped,
    wait_for_task_run,
)
from runledger.infra.nats_connection import connect

from .test_task_queues import running_worker, state_names

pytestmark = pytest.mark.asyncio


def body(key: str, dynamic_key: str, **parameters) -> dict:
    return {"task_key": key, "dynamic_key": dynamic_key, "parameters": parameters,
            "state": {"type": "SCHEDULED", "state_details": {"deferred": True}}}


async def log_end(client) -> int:
    return (await client._nc.jetstream().stream_info(client.settings.stream_name)).state.last_seq


async def test_a_bulk_creates_each_run_as_if_alone_and_is_safe_to_send_again(client, settings):
    items = [body("bulk.a", f"d{i}", i=i) for i in range(5)]
    first = await client.command("CreateTaskRuns", {"task_runs": items})
    assert [r["ok"] for r in first.result] == [True] * 5
    assert [r["created"] for r in first.result] == [True] * 5
    assert [r["result"]["dynamic_key"] for r in first.result] == [f"d{i}" for i in range(5)]
    assert {r["result"]["state_type"] for r in first.result} == {"SCHEDULED"}
    assert set(first.result[0]["result"]) == {"id", "task_key", "dynamic_key", "flow_run_id", "state_type", "state_name"}
    assert first.seq is not None and first.seq == await log_end(client)
    # Read your writes: the reply's seq covers every run.
    ids = [r["result"]["id"] for r in first.result]
    listed = (await client.query("ListTaskRuns", {"task_runs": {"task_key": {"any_": ["bulk.a"]}}}, min_seq=first.seq)).result
    assert sorted(r["id"] for r in listed) == sorted(ids)
    # Sent again (a lost reply): the same runs, not created, nothing appended.
    end = await log_end(client)
    again = await client.command("CreateTaskRuns", {"task_runs": items})
    assert [r["result"]["id"] for r in again.result] == ids and [r["created"] for r in again.result] == [False] * 5
    assert await log_end(client) == end
    # Two items with the same keys in one bulk: one run.
    twice = await client.command("CreateTaskRuns", {"task_runs": [body("bulk.b", "same"), body("bulk.b", "same")]})
    assert twice.result[0]["result"]["id"] == twice.result[1]["result"]["id"]
    assert sorted(r["created"] for r in twice.result) == [False, True]


async def test_an_invalid_bulk_creates_nothing(client, settings):
    nc = await connect(settings)
    try:
        end = await log_end(client)
        cases = {
            "an invalid item": {"task_runs": [body("ok.key", "a"), {"task_key": "x"}]},
            "no items": {"task_runs": []},
            "too many": {"task_runs": [body("k", f"d{i}") for i in range(1001)]},
            "a key of its own": {"task_runs": [body("k", "a")], "idempotency_key": "k1"},
        }
        for what, request in cases.items():
            reply = json.loads((await nc.request(settings.command_subject("CreateTaskRuns"), json.dumps(request).encode(),
                                                 timeout=10)).data)
            assert reply["ok"] is False and reply["error"]["code"] == "invalid", (what, reply)
        assert "task_runs.1.dynamic_key" in json.dumps(
            json.loads((await nc.request(settings.command_subject("CreateTaskRuns"),
                                         json.dumps(cases["an invalid item"]).encode(), timeout=10)).data))
        assert await log_end(client) == end
    finally:
        await nc.close()
    with pytest.raises(Invalid, match="takes no idempotency_key"):
        await client.command("CreateTaskRuns", {"task_runs": [body("k", "a")], "idempotency_key": "k1"})


async def test_a_full_key_refuses_only_the_runs_that_do_not_fit(service_with):
    async with service_with(task_queue_size=3) as (small, rl):
        with pytest.raises(SubmissionRefused) as refused:
            await submit_tasks(rl, "small.bulk", [{"i": i} for i in range(5)])
        ids, errors = refused.value.task_run_ids, refused.value.errors
        assert len(ids) == 5 and sum(i is not None for i in ids) == 3
        assert sorted(errors) == [n for n, i in enumerate(ids) if i is None]
        assert all(e.code == "unavailable" and "is full" in e.message for e in errors.values())
        assert refused.value.code == "unavailable"
        # The three queued run; the two refused are cancelled, never run.
        seen: list[int] = []

        async def take(i: int) -> int:
            seen.append(i)
            return i

        async with running_worker(small, {"small.bulk": take}):
            done = [await wait_for_task_run(rl, i, timeout=10) for i in ids if i is not None]
        assert sorted(task_result(d) for d in done) == sorted(seen) and len(seen) == 3
        cancelled = (await rl.query("ListTaskRuns", {"task_runs": {"task_key": {"any_": ["small.bulk"]},
                                                                   "state_type": {"any_": ["CANCELLED"]}}})).result
        assert len(cancelled) == 2


@task(key="bulk.scale")
async def scale(x: int, factor: int, labels: list[str]) -> list:
    return [x * factor, labels]


async def test_map_queues_a_run_per_element_and_their_results_come_back(client, settings):
    async with running_worker(settings, {"bulk.scale": scale.fn}):
        futures = await scale.amap([1, 2, 3], 10, unmapped(["a", "b"]), client=client)
        results = [await f.aresult(timeout=10) for f in futures]
        more = await scale.amap(x=(4, 5), factor=[2, 3], labels=unmapped([]), client=client)
        more_results = [await f.aresult(timeout=10) for f in more]
    assert results == [[10, ["a", "b"]], [20, ["a", "b"]], [30, ["a", "b"]]]
    assert more_results == [[8, []], [15, []]]
    assert await state_names(client, futures[0].task_run_id, "type") == ["SCHEDULED", "RUNNING", "COMPLETED"]
    with pytest.raises(ValueError, match="differ in length"):
        await scale.amap([1, 2], [1, 2, 3], unmapped([]), client=client)
    with pytest.raises(ValueError, match="task workers only"):
        await scale.amap([1], 1, unmapped([]), client=client, deferred=False)


async def test_map_from_plain_code_runs_on_the_bridge(client, settings):
    """`.map()` and `.result()` from plain (non-async) code, as the README shows: on the
    module's own event loop thread, with the settings given to `use_settings`."""
    from runledger.client import tasks as task_module

    task_module.use_settings(settings)
    try:
        async with running_worker(settings, {"bulk.scale": scale.fn}):
            results = await asyncio.to_thread(
                lambda: [f.result(timeout=10) for f in scale.map([1, 2], factor=3, labels=unmapped(["x"]))])
        assert results == [[3, ["x"]], [6, ["x"]]]
    finally:
        bridge, task_module._Bridge._instance = task_module._Bridge._instance, None
        task_module.use_settings(None)
        if bridge is not None:
            bridge.run(bridge.client.close())
            bridge.loop.call_soon_threadsafe(bridge.loop.stop)
