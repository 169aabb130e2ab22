"""What a task worker records as a run's outcome, against real NATS and Postgres: a result that
fits alone but not beside large arguments is stored apart; a result's nesting is refused by the
worker exactly where the service would refuse it; an outcome that cannot be recorded at all is
never acknowledged as if it had been."""

from __future__ import annotations

import asyncio
import logging

import pytest

from runledger.client import Invalid
from runledger.client.tasks import (
    TaskFuture,
    fetch_task_result,
    submit_task,
    task_result,
    wait_for_task_run,
)
from runledger.handlers import task_worker
from runledger.infra.task_queues import consumer_name, task_stream_name

from .test_task_queues import running_worker, state_names

pytestmark = pytest.mark.asyncio


def nested(levels: int) -> object:
    value: object = 1
    for _ in range(levels):
        value = [value]
    return value


def depth(value: object) -> int:
    levels = 0
    while isinstance(value, list):
        value, levels = value[0], levels + 1
    return levels


async def test_a_small_result_beside_large_arguments_is_stored_apart_and_the_run_completes(client, settings):
    """250,000 bytes of result fit under the inline threshold, but not in one event beside the
    run's 900,000 bytes of arguments: stored apart, as a larger result would be."""
    result = "r" * 250_000

    async def echo(blob: str) -> str:
        assert len(blob) == 900_000
        return result

    async with running_worker(settings, {"outcomes.big_args": echo}):
        run = await submit_task(client, "outcomes.big_args", {"blob": "a" * 900_000})
        done = await wait_for_task_run(client, run.id, timeout=30)
    assert done.state_type == "COMPLETED", done.state.message
    assert done.state.data["type"] == "reference"
    assert await fetch_task_result(client, done) == result
    # A small result beside small arguments still travels in its state.
    async with running_worker(settings, {"outcomes.small": echo_small}):
        small = await wait_for_task_run(client, (await submit_task(client, "outcomes.small", {"n": 3})).id, timeout=10)
    assert small.state.data == {"type": "json", "value": "rrr"}


async def echo_small(n: int) -> str:
    return "r" * n


async def test_a_result_nests_62_levels_and_no_more_and_an_argument_63(client, settings):
    async def make(levels: int) -> object:
        return nested(levels)

    async def measure(value: object) -> int:
        return depth(value)

    async with running_worker(settings, {"outcomes.nest": make, "outcomes.measure": measure}):
        fits = await submit_task(client, "outcomes.nest", {"levels": 62})
        deeper = await submit_task(client, "outcomes.nest", {"levels": 63}, retries=2)
        deepest = await submit_task(client, "outcomes.nest", {"levels": 64})
        argument = await submit_task(client, "outcomes.measure", {"value": nested(63)})
        fits, deeper, deepest, argument = [await wait_for_task_run(client, r.id, timeout=10)
                                           for r in (fits, deeper, deepest, argument)]
    assert depth(task_result(fits)) == 62
    for refused, levels in ((deeper, 63), (deepest, 64)):
        # Refused by the worker, in its own words, and not retried: the service is never asked.
        assert refused.state_type == "FAILED" and refused.run_count == 1
        assert refused.state.message == (f"the task's result cannot be recorded: it nests {levels} levels deep, "
                                         "more than the 62 a result may")
    assert task_result(argument) == 63
    with pytest.raises(Invalid, match="must not nest deeper than 64 levels"):
        await submit_task(client, "outcomes.measure", {"value": nested(64)})


async def test_an_outcome_that_cannot_be_recorded_is_not_acknowledged_but_tried_again_later(
        client, settings, monkeypatch, caplog):
    """The service refuses the outcome and then the short FAILED that says so (here: the first
    two such reports are answered `invalid`, as a run too large for any state would be). The
    run is still RUNNING: its message is not acknowledged but handed back with a delay, an error
    names the run, and the next delivery runs it again and records its outcome."""
    monkeypatch.setattr(task_worker, "UNRECORDED_RETRY_SECONDS", 1.0)
    calls: list[float] = []
    sent: list[dict] = []

    async def job() -> str:
        calls.append(asyncio.get_running_loop().time())
        return "done"

    async with running_worker(settings, {"outcomes.refused": job}) as worker:
        report = worker.reports.report

        async def refusing(body: dict) -> dict:
            if body["state"]["type"] in ("COMPLETED", "FAILED") and len(sent) < 2:
                sent.append(body)
                return {"ok": False, "error": {"code": "invalid", "message": "x" * 50_000}}
            return await report(body)

        worker.reports.report = refusing  # type: ignore[method-assign]
        with caplog.at_level(logging.ERROR, logger="runledger.task_worker"):
            run = await submit_task(client, "outcomes.refused")
            for _ in range(100):
                if len(sent) == 2:
                    break
                await asyncio.sleep(0.05)
            await asyncio.sleep(0.3)
            # Nothing recorded, nothing acknowledged, not counted as finished.
            assert await state_names(client, run.id, "type") == ["SCHEDULED", "RUNNING"]
            info = await client._nc.jetstream().consumer_info(task_stream_name(settings, "scheduled"),
                                                              consumer_name("outcomes.refused", "scheduled"))
            assert info.num_ack_pending + info.num_pending == 1
            assert worker.finished == 0
            done = await wait_for_task_run(client, run.id, timeout=10)
    assert task_result(done) == "done" and len(calls) == 2
    assert calls[1] - calls[0] >= 0.9  # handed back with its delay, not at once
    assert await state_names(client, run.id, "type") == ["SCHEDULED", "RUNNING", "COMPLETED"]
    # The fallback is as small as it can be: a short message, no data.
    fallback = sent[1]["state"]
    assert fallback["type"] == "FAILED" and "data" not in fallback and len(fallback["message"]) <= 1_000
    errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert any(str(run.id) in e and "could not be recorded" in e for e in errors), errors


async def test_an_outcome_the_service_lost_its_races_for_is_sent_again_not_run_again(client, settings):
    """`conflict` on a report (the service lost its races for the run too many times in a row and
    appended nothing) is transient: the report is sent again and the function is not run twice."""
    calls: list[int] = []
    sent: list[dict] = []

    async def job() -> str:
        calls.append(1)
        return "once"

    async with running_worker(settings, {"outcomes.raced": job}) as worker:
        report = worker.reports.report

        async def racing(body: dict) -> dict:
            if body["state"]["type"] == "COMPLETED" and not sent:
                sent.append(body)
                return {"ok": False, "error": {"code": "conflict", "message": "SetTaskRunState lost 11 races in a "
                                                                             "row for the same object; try again"}}
            return await report(body)

        worker.reports.report = racing  # type: ignore[method-assign]
        run = await submit_task(client, "outcomes.raced")
        done = await wait_for_task_run(client, run.id, timeout=10)  # not after the 60 s of a run handed back
    assert task_result(done) == "once" and len(calls) == 1 and len(sent) == 1
    assert await state_names(client, run.id, "type") == ["SCHEDULED", "RUNNING", "COMPLETED"]


async def test_a_start_refused_as_invalid_is_tried_again_after_a_delay_not_every_second(
        client, settings, monkeypatch, caplog):
    monkeypatch.setattr(task_worker, "UNRECORDED_RETRY_SECONDS", 2.0)
    starts: list[float] = []

    async def job() -> str:
        return "done"

    async with running_worker(settings, {"outcomes.unstartable": job}) as worker:
        report = worker.reports.report

        async def refusing(body: dict) -> dict:
            if body["state"]["type"] == "RUNNING":
                starts.append(asyncio.get_running_loop().time())
                if len(starts) == 1:
                    return {"ok": False, "error": {"code": "invalid", "message": "too large for any state"}}
            return await report(body)

        worker.reports.report = refusing  # type: ignore[method-assign]
        with caplog.at_level(logging.ERROR, logger="runledger.task_worker"):
            run = await submit_task(client, "outcomes.unstartable")
            done = await wait_for_task_run(client, run.id, timeout=10)
    assert task_result(done) == "done" and len(starts) == 2
    assert starts[1] - starts[0] >= 1.9
    assert any(str(run.id) in r.getMessage() and "cannot start" in r.getMessage() for r in caplog.records)


async def test_a_wait_that_runs_out_names_the_run_and_how_long_it_waited(client, settings):
    run = await submit_task(client, "outcomes.nobody_serves")
    future = TaskFuture(run.id, client)
    assert future.id == run.id
    with pytest.raises(TimeoutError, match=rf"task run {run.id} did not finish within 0.5 s; it may still run"):
        await future.aresult(timeout=0.5)
