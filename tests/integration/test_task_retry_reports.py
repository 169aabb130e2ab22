"""A task worker's reports around a retry, through the broker against real NATS and Postgres:
a FAILED report sent again after its reply was lost still retries the run; a run cancelled
before its worker queued its retry stays cancelled; a retry whose queuing never got through
is run from its message's redelivery."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from typing import Any

import pytest

from runledger.client.tasks import submit_task, task_result, wait_for_task_run
from runledger.handlers import task_worker as task_worker_module
from runledger.handlers.task_reports import ReportBatcher
from runledger.infra.task_queues import SIDES, consumer_name, task_stream_name

from .test_task_queues import running_worker, state_names

pytestmark = pytest.mark.asyncio

Request = Callable[[str, bytes], Awaitable[dict[str, Any]]]


def proposals(body: bytes) -> list[dict[str, Any]]:
    """The `SetTaskRunState` bodies a request carries (one, or a bulk's items)."""
    decoded = json.loads(body)
    return decoded["states"] if "states" in decoded else [decoded]


def is_outcome(p: dict[str, Any], state_type: str) -> bool:
    return p["state"]["type"] == state_type


def is_retry_queuing(p: dict[str, Any]) -> bool:
    return p["state"]["type"] == "SCHEDULED" and p["state"].get("name") == "AwaitingRetry"


def flaky_once(calls: list[str]) -> Callable[[], Awaitable[str]]:
    async def flaky() -> str:
        calls.append("called")
        if len(calls) == 1:
            raise RuntimeError("the first attempt fails")
        return "ok"
    return flaky


async def settled(worker, settings, key: str) -> None:
    """Until no message of `key` waits or is held unacknowledged, on either side."""
    while True:
        infos = [await worker.js.consumer_info(task_stream_name(settings, side), consumer_name(key, side))
                 for side in SIDES]
        if all(i.num_pending == 0 and i.num_ack_pending == 0 for i in infos):
            return
        await asyncio.sleep(0.1)


async def test_a_failure_report_sent_again_after_its_reply_was_lost_still_retries_the_run(client, settings):
    calls: list[str] = []
    replies: list[dict[str, Any]] = []

    async with running_worker(settings, {"flaky": flaky_once(calls)}) as worker:
        forward: Request = worker._command
        lost = False

        async def lossy(name: str, body: bytes) -> dict[str, Any]:
            nonlocal lost
            reply = await forward(name, body)
            if any(is_outcome(p, "FAILED") for p in proposals(body)):
                replies.append(reply)
                if not lost:  # the service decided it, but its answer never came back
                    lost = True
                    raise TimeoutError
            return reply

        worker.reports = ReportBatcher(lossy)
        run = await submit_task(client, "flaky", retries=1, retry_delay=0)
        done = await wait_for_task_run(client, run.id, timeout=20)
    assert task_result(done) == "ok" and calls == ["called", "called"]
    # The report sent again is refused (the run is no longer the worker's), nothing written
    # again, with the state the first one wrote: the retry is queued all the same.
    assert [r["orchestration"]["status"] for r in replies] == ["REJECT", "REJECT"]
    assert replies[0]["result"]["name"] == replies[1]["result"]["name"] == "AwaitingRetry"
    assert replies[0]["result"]["id"] == replies[1]["result"]["id"]
    assert await state_names(client, run.id, "type") == ["SCHEDULED", "RUNNING", "SCHEDULED", "SCHEDULED",
                                                         "RUNNING", "COMPLETED"]


async def test_a_run_cancelled_before_its_retry_was_queued_stays_cancelled_and_never_runs_again(client, settings):
    calls: list[str] = []

    async with running_worker(settings, {"flaky": flaky_once(calls)}) as worker:
        forward: Request = worker._command
        run_id: list[str] = []

        async def cancel_first(name: str, body: bytes) -> dict[str, Any]:
            if any(is_retry_queuing(p) for p in proposals(body)) and not run_id:
                # The user cancels it between its failure (answered AwaitingRetry) and its retry.
                run_id.append(proposals(body)[0]["id"])
                cancelled = await client.cancel_task_run(run_id[0])
                assert cancelled.state.type == "CANCELLED"
            return await forward(name, body)

        worker.reports = ReportBatcher(cancel_first)
        run = await submit_task(client, "flaky", retries=1, retry_delay=0)
        done = await wait_for_task_run(client, run.id, timeout=20)
        await settled(worker, settings, "flaky")
    assert done.state_type == "CANCELLED" and calls == ["called"]
    assert await state_names(client, run.id, "type") == ["SCHEDULED", "RUNNING", "SCHEDULED", "CANCELLED"]
    assert (await client.read_task_run(run.id)).state_type == "CANCELLED"


async def test_a_retry_whose_queuing_never_got_through_runs_from_its_messages_redelivery(
        client, settings, monkeypatch):
    monkeypatch.setattr(task_worker_module, "REPORT_PATIENCE_SECONDS", 0.3)
    quick = settings.model_copy(update={"task_ack_wait_seconds": 1.0})
    calls: list[str] = []

    async with running_worker(quick, {"flaky": flaky_once(calls)}) as worker:
        forward: Request = worker._command

        async def no_retry_queuing(name: str, body: bytes) -> dict[str, Any]:
            if any(is_retry_queuing(p) for p in proposals(body)):
                raise TimeoutError  # the service or the broker is away for as long as the worker tries
            return await forward(name, body)

        worker.reports = ReportBatcher(no_retry_queuing)
        run = await submit_task(client, "flaky", retries=1, retry_delay=0)
        done = await wait_for_task_run(client, run.id, timeout=30)
    assert task_result(done) == "ok" and calls == ["called", "called"]
    assert await state_names(client, run.id) == ["Scheduled", "Running", "AwaitingRetry", "Retrying", "Completed"]
