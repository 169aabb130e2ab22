"""Idempotency keys: a repeat appends nothing and returns the first reply, also after
JetStream's de-duplication window, also when the repeats race."""

from __future__ import annotations

import asyncio

import pytest


@pytest.fixture
def settings(settings):
    # A one-second de-duplication window, so the test outlives it.
    return settings.model_copy(update={"event_duplicate_window_seconds": 1.0})


async def test_a_repeat_returns_the_first_reply_and_appends_nothing(broker, service):
    first = await broker.cmd("CreateWorkPool", name="idem", type="process", idempotency_key="key-1")
    assert first["ok"] and first["created"] is True
    count = await broker.stream_messages()
    await asyncio.sleep(1.5)  # past the stream's duplicate window
    again = await broker.cmd("CreateWorkPool", name="idem", type="process", idempotency_key="key-1")
    assert again["ok"] and again.get("repeat") is True
    assert again["result"] == first["result"] and again["seq"] == first["seq"]
    assert await broker.stream_messages() == count
    # Without the key, the same command is a conflict: the key is what made it a repeat.
    plain = await broker.cmd("CreateWorkPool", name="idem", type="process")
    assert plain["error"]["code"] == "conflict"
    # The same key on a different command is refused and appends nothing.
    other = await broker.cmd("CreateWorkPool", name="other", idempotency_key="key-1")
    assert (other["ok"], other["error"]["code"]) == (False, "conflict")
    assert await broker.stream_messages() == count


async def test_racing_repeats_have_one_effect(broker, service):
    await broker.ok_cmd("CreateWorkPool", name="p", type="process")
    before = await broker.stream_messages()
    replies = await asyncio.gather(*(
        broker.cmd("CreateWorkQueue", work_pool_name="p", name="q", idempotency_key="make-q") for _ in range(10)
    ))
    assert all(r["ok"] for r in replies), replies
    assert len({r["result"]["id"] for r in replies}) == 1
    assert sum(1 for r in replies if not r.get("repeat")) == 1
    assert await broker.stream_messages() == before + 2  # one idempotency record, one event
    queues = await broker.ok_qry("ListWorkQueues", work_pool_name="p", min_seq=max(r["seq"] for r in replies))
    assert [q["name"] for q in queues].count("q") == 1


async def test_a_rejected_command_records_nothing(broker, service):
    before = await broker.stream_messages()
    r = await broker.cmd("UpdateWorkPool", name="missing", description="x", idempotency_key="k")
    assert r["error"]["code"] == "not_found"
    assert await broker.stream_messages() == before
