"""Recording polls: a flood of polls of one pool is one command at a time, never a task per
poll, and no polled queue is left out."""

from __future__ import annotations

import asyncio

from runledger.handlers.worker_polls import PollRecorder


async def test_polls_arriving_while_one_is_recorded_are_merged_into_the_next():
    sent: list[dict] = []
    release = asyncio.Event()

    async def send(name: str, body: dict) -> dict:
        sent.append(body)
        await release.wait()
        return {"ok": True}

    recorder = PollRecorder(send)
    recorder.record("a", ["q1"])
    await asyncio.sleep(0)  # the first record is in flight
    for i in range(1000):
        recorder.record("a", [f"q{i % 5}"])
    recorder.record("b", ["x"])
    assert len(recorder._pending) == 2  # one task per pool, not per poll
    release.set()
    await recorder.drain()
    by_pool = [(b["work_pool_name"], b["work_queue_ids"]) for b in sent]
    assert by_pool == [("a", ["q1"]), ("b", ["x"]), ("a", ["q0", "q1", "q2", "q3", "q4"])]
    recorder.record("a", ["q9"])  # and a later poll starts afresh
    await recorder.drain()
    assert sent[-1]["work_queue_ids"] == ["q9"]


async def test_a_failed_record_is_logged_and_the_next_poll_still_records():
    calls = 0

    async def send(name: str, body: dict) -> dict:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise TimeoutError("no reply")
        return {"ok": True}

    recorder = PollRecorder(send)
    recorder.record("a", ["q1"])
    await recorder.drain()
    recorder.record("a", ["q1"])
    await recorder.drain()
    assert calls == 2
