"""Replay equals live; replay as of an earlier point; `verify` and `events` through the CLI."""

from __future__ import annotations

import asyncio
import json

from sqlalchemy import text
from typer.testing import CliRunner

from runledger.handlers.service import projectors
from runledger.infra.database import create_engine, drop_schema
from runledger.projections.replay import compare, replay, snapshot

from .broker import cli_env


async def _history(broker):
    await broker.ok_cmd("CreateWorkPool", name="alpha", type="process", concurrency_limit=3)
    await broker.ok_cmd("CreateWorkQueue", work_pool_name="alpha", name="a", priority=1)
    await broker.ok_cmd("CreateWorkQueue", work_pool_name="alpha", name="b")
    mid = broker.last_seq
    await broker.ok_cmd("SetWorkQueuePriorities", work_pool_name="alpha", priorities={"b": 1})
    await broker.ok_cmd("CreateWorkPool", name="beta", type="k8s", is_paused=True)
    await broker.ok_cmd("UpdateWorkQueue", work_pool_name="alpha", work_queue_name="a", is_paused=True, description="x")
    await broker.ok_cmd("CreateLegacyWorkQueue", name="legacy")
    await broker.ok_cmd("DeleteWorkQueue", work_pool_name="alpha", work_queue_name="a")
    await broker.ok_cmd("DeleteWorkPool", name="beta")
    await broker.ok_qry("CountWorkPools")  # waits for the read model
    await _saved(broker)
    return mid


async def _saved(broker, timeout: float = 5.0) -> None:
    """Until every projection's saved checkpoint covers the last command: one that had
    nothing to apply saves its position a moment after the others."""
    from sqlalchemy import text

    from runledger.infra.database import create_engine

    engine = create_engine(broker.settings, pool_size=1)
    try:
        deadline = asyncio.get_running_loop().time() + timeout
        while True:
            async with engine.connect() as conn:
                rows = (await conn.execute(text("SELECT name, last_seq FROM projection_checkpoints"))).all()
            if len(rows) == len(projectors()) and min(r.last_seq for r in rows) >= broker.last_seq:
                return
            assert asyncio.get_running_loop().time() < deadline, rows
            await asyncio.sleep(0.01)
    finally:
        await engine.dispose()


async def test_a_rebuild_equals_the_live_read_models(broker, service, settings):
    await _history(broker)
    names = [p.name for p in projectors()]
    seq, live = await snapshot(service.engine, names)
    assert seq == broker.last_seq
    result = await replay(settings, service.store, projectors(), f"{settings.namespace}_r")
    assert result.last_seq == seq and result.events > 0
    engine = create_engine(settings, schema=f"{settings.namespace}_r")
    try:
        rebuilt_seq, rebuilt = await snapshot(engine, names)
        assert rebuilt_seq == seq
        assert compare(live, rebuilt) == []
        assert len(live["work_queues"]) == 4  # alpha: default, b; legacy pool: default, legacy
        # and a difference is found when there is one
        async with service.engine.begin() as conn:
            await conn.execute(text("UPDATE work_queues SET priority = 99 WHERE name = 'b'"))
        _, tampered = await snapshot(service.engine, names)
        diffs = compare(tampered, rebuilt)
        assert [(d.table, d.kind) for d in diffs] == [("work_queues", "differs")]
        assert "priority: live=99 rebuilt=1" in diffs[0].detail
    finally:
        await drop_schema(engine, f"{settings.namespace}_r")
        await engine.dispose()


async def test_a_rebuild_as_of_an_earlier_sequence(broker, service, settings):
    mid = await _history(broker)
    result = await replay(settings, service.store, projectors(), f"{settings.namespace}_m", until_seq=mid)
    assert result.last_seq == mid
    engine = create_engine(settings, schema=f"{settings.namespace}_m")
    try:
        async with engine.connect() as conn:
            rows = (await conn.execute(text("SELECT name, priority FROM work_queues ORDER BY priority"))).all()
            pools = (await conn.execute(text("SELECT name FROM work_pools"))).scalars().all()
        assert [tuple(r) for r in rows] == [("a", 1), ("default", 2), ("b", 3)]
        assert pools == ["alpha"]
    finally:
        await drop_schema(engine, f"{settings.namespace}_m")
        await engine.dispose()


async def test_verify_and_events_through_the_cli(broker, service, settings):
    import asyncio

    from runledger.cli.main import _register, app

    _register()
    await _history(broker)
    runner = CliRunner()
    env = cli_env(settings)
    # The CLI runs its own event loop: run it in a thread.
    result = await asyncio.to_thread(runner.invoke, app, ["verify"], env=env)
    assert result.exit_code == 0, result.output
    assert "identical" in result.output

    async with service.engine.begin() as conn:
        await conn.execute(text("UPDATE work_pools SET description = 'tampered' WHERE name = 'alpha'"))
    result = await asyncio.to_thread(runner.invoke, app, ["verify"], env=env)
    assert result.exit_code == 1
    assert "work_pools" in result.output and "description: live='tampered' rebuilt=None" in result.output

    result = await asyncio.to_thread(runner.invoke, app, ["events", "--aggregate", "work_pool", "--type", "WorkPoolCreated"], env=env)
    assert result.exit_code == 0, result.output
    lines = [json.loads(line) for line in result.stdout.splitlines()]
    assert [e["payload"]["pool"]["name"] for e in lines] == ["alpha", "beta", "default-agent-pool"]
    assert all(e["type"] == "WorkPoolCreated" and e["seq"] > 0 for e in lines)


async def test_status_answers_through_the_broker(broker, service, settings):
    import asyncio

    from runledger.cli.main import _register, app

    _register()
    await broker.ok_cmd("CreateWorkPool", name="s1")
    await broker.ok_qry("CountWorkPools")
    result = await asyncio.to_thread(CliRunner().invoke, app, ["status", "--json"], env=cli_env(settings))
    assert result.exit_code == 0, result.output
    info = json.loads(result.stdout)
    assert info["answering"] is True and info["work_pools"] == 1 and info["read_model_seq"] >= broker.last_seq
    env = {**cli_env(settings), "RUNLEDGER_NAMESPACE": "nobodyhere"}
    result = await asyncio.to_thread(CliRunner().invoke, app, ["status"], env=env)
    assert result.exit_code == 6


async def test_verify_compares_each_projection_where_it_is(writer, settings):
    """Projections advance on their own: here work pools are projected and flows not yet.
    `verify` rebuilds each up to its own position, so the live read models are identical."""
    from runledger.cli.main import _register, app
    from runledger.projections.runner import ProjectionRunner
    from runledger.projections.work_pools import WorkPoolsProjector

    _register()
    svc, broker = writer
    await broker.ok_cmd("CreateWorkPool", name="only-pools", type="process")
    await broker.ok_cmd("CreateFlow", name="not-projected-yet")
    await broker.ok_cmd("CreateWorkQueue", work_pool_name="only-pools", name="q")
    runner = ProjectionRunner(broker.nc, settings, svc.engine, [WorkPoolsProjector()])
    await runner.start()
    try:
        for _ in range(500):
            if runner.applied.get("work_pools", 0) >= broker.last_seq:
                break
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.1)  # saved
        result = await asyncio.to_thread(CliRunner().invoke, app, ["verify"], env=cli_env(settings))
    finally:
        await runner.stop()
    assert result.exit_code == 0, result.output
    assert "identical" in result.output
