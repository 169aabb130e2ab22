"""The broker dies (SIGKILL) and comes back on the same store: the running service reconnects
by itself, every event appended before the crash is still there, commands work again, the
projection catches up, and the read model equals a rebuild from the log."""

from __future__ import annotations

import asyncio
import contextlib

import pytest

from runledger.handlers.service import Service
from runledger.infra.embedded import RestartableNats
from runledger.infra.nats_connection import connect

from .broker import Broker, assert_live_equals_rebuild, drop_service_schema

pytestmark = [pytest.mark.timeout(120), pytest.mark.alone]


async def _until_ok(broker: Broker, name: str, /, seconds: float = 30, **body) -> dict:
    """Send a command until the restarted broker lets it through (with one idempotency key, so
    a try whose reply was lost is not applied twice)."""
    deadline = asyncio.get_running_loop().time() + seconds
    while True:
        try:
            out = await broker.cmd(name, **body)
            if out["ok"]:
                return out
            assert out["error"]["code"] == "unavailable", out
        except Exception:  # the test's own connection is reconnecting too
            pass
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"{name} did not succeed within {seconds} s of the broker's restart")
        await asyncio.sleep(0.2)


async def test_the_service_survives_a_broker_crash_and_loses_nothing(settings, tmp_path):
    nats = RestartableNats(tmp_path / "nats")
    nats.start()
    settings = settings.model_copy(update={"nats_url": nats.url})
    service = Service(settings)
    nc = None
    try:
        await service.start()
        nc = await connect(settings)
        broker = Broker(nc, settings)
        await broker.ok_cmd("CreateWorkPool", name="steady", type="process")
        for i in range(20):
            await broker.ok_cmd("CreateWorkQueue", work_pool_name="steady", name=f"before-{i}")
        events_before = await broker.stream_messages()

        nats.kill()
        await asyncio.sleep(0.5)
        nats.start()

        await _until_ok(broker, "CreateWorkQueue", work_pool_name="steady", name="after-0", idempotency_key="after-0")
        for i in range(1, 10):
            await broker.ok_cmd("CreateWorkQueue", work_pool_name="steady", name=f"after-{i}")
        # The log kept everything from before the crash (file storage, acknowledged appends).
        assert await broker.stream_messages() >= events_before + 10
        queues = await broker.ok_qry("ListWorkQueues", work_pool_name="steady")
        names = {q["name"] for q in queues}
        assert names == {"default"} | {f"before-{i}" for i in range(20)} | {f"after-{i}" for i in range(10)}
        assert sorted(q["priority"] for q in queues) == list(range(1, 32))

        # The projection resumed where it was: the read model equals a rebuild of the log.
        await assert_live_equals_rebuild(service, settings)
    finally:
        if nc is not None:
            with contextlib.suppress(Exception):
                await nc.close()
        await service.stop()
        await drop_service_schema(settings)
        nats.kill()
