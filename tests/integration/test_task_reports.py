"""Many task-run states in one request (`SetTaskRunStates`, what a busy task worker sends),
through the broker against real NATS and Postgres: each item decided and answered as if sent
alone, in order; an invalid body writes nothing; a worker with many runs at once sends their
reports together and still runs each once."""

from __future__ import annotations

import json
import uuid

import pytest

from runledger.client import Invalid
from runledger.client.tasks import submit_tasks, task_result, wait_for_task_run
from runledger.infra.nats_connection import connect

from .test_bulk_task_submissions import log_end
from .test_task_queues import running_worker, state_names

pytestmark = pytest.mark.asyncio


def proposal(run_id, state_type: str, **state) -> dict:
    return {"id": str(run_id), "state": {"type": state_type, **state}, "task_worker_id": "w-bulk"}


async def test_each_state_of_a_bulk_is_decided_and_answered_as_if_alone(client, settings):
    first, second, third = await submit_tasks(client, "reports.k", [{"i": 1}, {"i": 2}, {"i": 3}])
    unknown = uuid.uuid4()
    started = await client.command("SetTaskRunStates", {"states": [
        proposal(first, "RUNNING"), proposal(second, "RUNNING"), proposal(unknown, "RUNNING")]})
    assert [item["ok"] for item in started.result] == [True, True, False]
    assert [item["orchestration"]["status"] for item in started.result[:2]] == ["ACCEPT", "ACCEPT"]
    assert [item["result"]["type"] for item in started.result[:2]] == ["RUNNING", "RUNNING"]
    assert started.result[2]["error"]["code"] == "not_found"
    assert started.seq == await log_end(client)

    # Outcomes, and beside them a start the rules refuse (of a run that has just ended): each
    # its own answer, in order.
    value = {"answer": "x" * 1000}
    ended = await client.command("SetTaskRunStates", {"states": [
        proposal(first, "COMPLETED", data={"type": "json", "value": value}),
        proposal(second, "FAILED", message="boom"),
        proposal(second, "RUNNING")]})
    assert [item["result"]["type"] for item in ended.result] == ["COMPLETED", "FAILED", "FAILED"]
    assert [item["orchestration"]["status"] for item in ended.result] == ["ACCEPT", "ACCEPT", "REJECT"]
    # A state's result is not sent back in a bulk's reply (a hundred could not fit one) ...
    assert "data" not in ended.result[0]["result"]
    # ... but it is stored, as if reported alone.
    done = await wait_for_task_run(client, first, timeout=10)
    assert task_result(done) == value
    assert await state_names(client, first, "type") == ["SCHEDULED", "RUNNING", "COMPLETED"]
    assert await state_names(client, second, "type") == ["SCHEDULED", "RUNNING", "FAILED"]
    assert await state_names(client, third, "type") == ["SCHEDULED"]


async def test_an_invalid_bulk_of_states_writes_nothing(client, settings):
    [run] = await submit_tasks(client, "reports.bad", [{}])
    nc = await connect(settings)
    try:
        end = await log_end(client)
        cases = {
            "an invalid item": {"states": [proposal(run, "RUNNING"), proposal(run, "NOT_A_STATE")]},
            "no items": {"states": []},
            "too many": {"states": [proposal(run, "RUNNING")] * 101},
            "a key of its own": {"states": [proposal(run, "RUNNING")], "idempotency_key": "k1"},
            "not a list": {"states": proposal(run, "RUNNING")},
        }
        for what, request in cases.items():
            reply = json.loads((await nc.request(settings.command_subject("SetTaskRunStates"),
                                                 json.dumps(request).encode(), timeout=10)).data)
            assert reply["ok"] is False and reply["error"]["code"] == "invalid", (what, reply)
            if what == "an invalid item":
                assert reply["error"]["field"].startswith("states.1.state.type"), reply
        assert await log_end(client) == end
    finally:
        await nc.close()
    with pytest.raises(Invalid, match="takes no idempotency_key"):
        await client.command("SetTaskRunStates", {"states": [proposal(run, "RUNNING")], "idempotency_key": "k1"})
    assert await state_names(client, run, "type") == ["SCHEDULED"]


async def test_a_busy_worker_reports_its_runs_together_and_runs_each_once(client, settings):
    calls: list[int] = []

    async def record(i: int) -> int:
        calls.append(i)
        return i * 10

    ids = await submit_tasks(client, "reports.busy", [{"i": i} for i in range(60)])
    async with running_worker(settings, {"reports.busy": record}, limit=16) as worker:
        done = [await wait_for_task_run(client, run_id, timeout=30) for run_id in ids]
    assert sorted(calls) == list(range(60))
    assert [task_result(d) for d in done] == [i * 10 for i in range(60)]
    # Sixty runs taken as fast as the broker hands them over, sixteen at a time, make reports
    # at the same moment: some went together.
    assert worker.reports.bulks >= 1
    assert {tuple(await state_names(client, run_id, "type")) for run_id in ids[:5]} == {
        ("SCHEDULED", "RUNNING", "COMPLETED")}
