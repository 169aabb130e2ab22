"""Postgres dies (SIGKILL of the postmaster) under a running service: commands go on (the log,
not the database, is the source of truth), queries answer `unavailable` instead of hanging,
and once Postgres is back the projection catches up by itself and the read model equals a
rebuild from the log."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import tempfile
import time
from pathlib import Path

import pytest

from runledger.handlers.service import Service
from runledger.infra.embedded import EmbeddedPostgres
from runledger.infra.nats_connection import connect

from .broker import Broker, assert_live_equals_rebuild

pytestmark = pytest.mark.timeout(180)


def _kill_postmaster(data_dir: Path) -> None:
    pid = int((data_dir / "postmaster.pid").read_text().splitlines()[0])
    os.kill(pid, signal.SIGKILL)
    for _ in range(200):  # not our child: wait until it is gone
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.05)
    raise AssertionError(f"postmaster {pid} survived SIGKILL")


async def _until(predicate, seconds: float, what: str):
    deadline = asyncio.get_running_loop().time() + seconds
    while True:
        result = await predicate()
        if result:
            return result
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"{what} did not happen within {seconds} s")
        await asyncio.sleep(0.2)


async def test_commands_go_on_while_postgres_is_down_and_the_read_model_catches_up(settings, caplog):
    # Short path: Postgres keeps its socket in the data directory. Not under tmp_path (0700
    # parents): as root, Postgres runs as a system user that must get through.
    base = Path(tempfile.mkdtemp(prefix="rldb-"))
    base.chmod(0o711)
    data_dir = base / "pg"
    postgres = EmbeddedPostgres(data_dir).start()
    settings = type(settings)(**{**settings.model_dump(), "database_url": postgres.url})
    service = Service(settings)
    nc = None
    try:
        await service.start()
        nc = await connect(settings)
        broker = Broker(nc, settings)
        await broker.ok_cmd("CreateWorkPool", name="steady", type="process")
        for i in range(10):
            await broker.ok_cmd("CreateWorkQueue", work_pool_name="steady", name=f"before-{i}")
        assert len(await broker.ok_qry("ListWorkQueues", work_pool_name="steady")) == 11

        _kill_postmaster(data_dir)

        # Writes need only the broker: they go on.
        for i in range(10):
            await broker.ok_cmd("CreateWorkQueue", work_pool_name="steady", name=f"during-{i}")
        # Reads need Postgres: a clear `unavailable`, not a hang.
        down = await broker.raw(settings.query_subject("ListWorkQueues"), b'{"work_pool_name": "steady"}')
        assert down["ok"] is False and down["error"]["code"] == "unavailable", down

        postgres.stop()  # forget the dead postmaster (already reaped), then start it again
        postgres = EmbeddedPostgres(data_dir).start()

        async def caught_up():
            out = await broker.qry("ListWorkQueues", work_pool_name="steady")
            return out if out["ok"] and len(out["result"]) == 21 else None

        listed = (await _until(caught_up, 60, "the projection catching up after Postgres came back"))["result"]
        # An outage, not an event the read model cannot take: no projection stopped at one
        # (it did, for 30 s, while asyncpg's "connection is closed" was not known as an outage).
        stalls = [r.getMessage() for r in caplog.records if "is stopped at stream sequence" in r.getMessage()]
        assert not stalls and not service.runner.stalled, stalls
        assert {q["name"] for q in listed} == ({"default"} | {f"before-{i}" for i in range(10)}
                                               | {f"during-{i}" for i in range(10)})

        await assert_live_equals_rebuild(service, settings)
    finally:
        if nc is not None:
            with contextlib.suppress(Exception):
                await nc.jetstream().delete_stream(settings.stream_name)
            with contextlib.suppress(Exception):
                await nc.jetstream().delete_key_value(settings.snapshot_bucket)
            with contextlib.suppress(Exception):
                await nc.close()
        await service.stop()
        postgres.stop()
        shutil.rmtree(base, ignore_errors=True)
