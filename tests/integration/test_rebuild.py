"""`runledger rebuild`: one live read model rebuilt from the log and swapped in while the
service runs and commands keep coming; nothing it applies before or after the swap is lost."""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from datetime import UTC, datetime

import pytest
from sqlalchemy import text
from typer.testing import CliRunner

from runledger.handlers.service import projectors
from runledger.infra.database import create_engine, drop_schema
from runledger.projections.rebuild import rebuild_live
from runledger.projections.replay import compare, replay, snapshot_each

from .broker import cli_env


def _failed_swaps(monkeypatch) -> list[BaseException]:
    """The swap's tries that failed, as they fail (the swap wrapped)."""
    from runledger.projections import rebuild

    failed: list[BaseException] = []
    swap = rebuild._swap

    async def counted(*args, **kwargs):
        try:
            return await swap(*args, **kwargs)
        except Exception as e:
            failed.append(e)
            raise

    monkeypatch.setattr(rebuild, "_swap", counted)
    return failed


async def _until(condition, seconds: float = 30.0) -> None:
    for _ in range(int(seconds / 0.02)):
        if condition():
            return
        await asyncio.sleep(0.02)
    raise AssertionError("waited in vain")


def _projector(name: str):
    return next(p for p in projectors() if p.name == name)


async def _equal_to_a_rebuild(broker, service, settings, names: list[str]) -> dict:
    """The live read models of `names`, once caught up, equal a replay of the log."""
    await broker.catch_up()
    for _ in range(500):  # every projection's position saved past the last command
        positions, live = await snapshot_each(service.engine, names)
        if min(positions.get(n, 0) for n in names) >= broker.last_seq:
            break
        await asyncio.sleep(0.01)
    schema = f"{settings.namespace}_check"
    await replay(settings, service.store, [_projector(n) for n in names], schema, until_each=positions)
    engine = create_engine(settings, schema=schema)
    try:
        _, rebuilt = await snapshot_each(engine, names)
        mine = {t.name for n in names for t in _projector(n).tables}
        assert compare({t: v for t, v in live.items() if t in mine}, {t: v for t, v in rebuilt.items() if t in mine}) == []
    finally:
        await drop_schema(engine, schema)
        await engine.dispose()
    return live


async def _keep_writing(broker, made: list[str], stop: asyncio.Event) -> None:
    """Commands to the rebuilt read model's projection, one after the other, until told."""
    i = 0
    while not stop.is_set():
        await broker.ok_cmd("CreateWorkQueue", work_pool_name="alpha", name=f"q{i}", priority=1 + i % 5)
        made.append(f"q{i}")
        i += 1


async def test_a_damaged_read_model_is_rebuilt_while_commands_flow(broker, service, settings):
    await broker.ok_cmd("CreateWorkPool", name="alpha", type="process", concurrency_limit=3)
    await broker.ok_cmd("CreateWorkPool", name="beta", type="process")
    await broker.ok_cmd("CreateWorkQueue", work_pool_name="beta", name="b", priority=2)
    await broker.catch_up()
    # Damaged: a row changed, a row gone; and what a missed event type left in skipped_events.
    async with service.engine.begin() as conn:
        await conn.execute(text("UPDATE work_queues SET priority = 99 WHERE name = 'b'"))
        await conn.execute(text("DELETE FROM work_pools WHERE name = 'beta'"))
        await conn.execute(text(
            "INSERT INTO skipped_events (projection, seq, subject, reason, recorded) VALUES "
            "('work_pools', 1, 'x', 'written while an older version ran projection work_pools', :now)"),
            {"now": datetime.now(UTC)})
    made: list[str] = []
    stop = asyncio.Event()
    writer = asyncio.create_task(_keep_writing(broker, made, stop))
    try:
        while len(made) < 5:
            await asyncio.sleep(0.01)
        result = await rebuild_live(settings, service.store, _projector("work_pools"))
        written_during = len(made)
        while len(made) < written_during + 5:  # and the live projection goes on after the swap
            await asyncio.sleep(0.01)
    finally:
        stop.set()
        await writer
    assert result.tables == ("work_pools", "work_queues") and result.last_seq > 0
    live = await _equal_to_a_rebuild(broker, service, settings, ["work_pools"])
    queues = {row["name"]: row for row in live["work_queues"].values()}
    assert queues["b"]["priority"] == 2
    assert {row["name"] for row in live["work_pools"].values()} >= {"alpha", "beta"}
    assert set(made) <= set(queues)  # every queue made before, during and after the swap
    async with service.engine.connect() as conn:
        skipped = (await conn.execute(text("SELECT count(*) FROM skipped_events WHERE projection = 'work_pools'"))).scalar()
        side = (await conn.execute(text("SELECT count(*) FROM pg_namespace WHERE nspname = :s"),
                                   {"s": f"{settings.namespace}_rebuild_work_pools"})).scalar()
    assert skipped == 0 and side == 0
    # The queries answer from the swapped tables.
    got = await broker.ok_qry("GetWorkQueue", work_pool_name="beta", work_queue_name="b")
    assert got["priority"] == 2


async def test_a_run_read_model_written_in_one_statement_is_rebuilt_under_load(broker, service, settings):
    """The flow runs' projection writes each batch as one statement with its checkpoint (no
    row lock first): the swap must still lose nothing committed around it."""
    flow = await broker.ok_cmd("CreateFlow", name="f")
    runs: list[str] = []
    stop = asyncio.Event()

    async def create_runs() -> None:
        while not stop.is_set():
            runs.append((await broker.ok_cmd("CreateFlowRun", flow_id=flow["id"], name=f"r{len(runs)}"))["id"])

    writers = [asyncio.create_task(create_runs()) for _ in range(4)]
    try:
        while len(runs) < 20:
            await asyncio.sleep(0.01)
        async with service.engine.begin() as conn:
            await conn.execute(text("DELETE FROM flow_run_states"))
        result = await rebuild_live(settings, service.store, _projector("flow_runs"))
        during = len(runs)
        while len(runs) < during + 20:
            await asyncio.sleep(0.01)
    finally:
        stop.set()
        for w in writers:
            with contextlib.suppress(Exception):
                await w
    assert result.tables == ("flow_runs", "flow_run_states")
    live = await _equal_to_a_rebuild(broker, service, settings, ["flow_runs"])
    assert set(runs) <= {str(k) for k in live["flow_runs"]}
    states = {str(row["flow_run_id"]) for row in live["flow_run_states"].values()}
    assert set(runs) <= states  # the deleted states are back, and the new runs' are there
    async with service.engine.connect() as conn:  # and the live projection never stalled on the swap
        assert (await conn.execute(text("SELECT count(*) FROM projection_failures"))).scalar() == 0
    got = await broker.ok_qry("GetFlowRun", id=runs[0])
    assert got["id"] == runs[0] and got["state"]["name"]


async def test_rebuild_through_the_cli(broker, service, settings):
    from runledger.cli.main import _register, app

    _register()
    await broker.ok_cmd("CreateFlow", name="cli-flow")
    await broker.catch_up()
    async with service.engine.begin() as conn:
        await conn.execute(text("DELETE FROM flows"))
    env = cli_env(settings)
    result = await asyncio.to_thread(CliRunner().invoke, app, ["rebuild", "flows", "-q"], env=env)
    assert result.exit_code == 0, result.output
    assert "rebuilt flows (flows)" in result.output and "swapped in" in result.output
    assert (await broker.ok_qry("GetFlowByName", name="cli-flow"))["name"] == "cli-flow"
    result = await asyncio.to_thread(CliRunner().invoke, app, ["rebuild", "flow_run"], env=env)
    assert result.exit_code == 5 and "no projection named flow_run" in result.output
    result = await asyncio.to_thread(CliRunner().invoke, app, ["rebuild"], env=env)
    assert result.exit_code == 5 and "--all" in result.output
    result = await asyncio.to_thread(CliRunner().invoke, app, ["rebuild", "--list"], env=env)
    assert result.exit_code == 0 and "flow_runs: flow_runs, flow_run_states" in result.output


async def test_a_rebuild_is_refused_before_touching_anything_live(broker, service, settings):
    """Another rebuild of the same projection running, or a live schema at another migration
    than this version's (its tables would not be the shape the service expects)."""
    from runledger.projections.rebuild import RebuildFailed, side_schema

    await broker.ok_cmd("CreateFlow", name="kept")
    await broker.catch_up()
    flows = _projector("flows")
    async with service.engine.connect() as holder:
        await holder.execute(text("SELECT pg_advisory_lock(hashtext(:k))"),
                             {"k": f"runledger-rebuild:{side_schema(settings, flows)}"})
        with pytest.raises(RebuildFailed) as refused:
            await rebuild_live(settings, service.store, flows)
        assert refused.value.kind == "conflict" and "another rebuild of flows is running" in str(refused.value)
        await holder.execute(text("SELECT pg_advisory_unlock_all()"))

    async def refused_while(change: str, undo: str) -> str:
        """The refusal (invalid) of a rebuild while the live schema has `change`."""
        async with service.engine.begin() as conn:
            await conn.execute(text(change))
        try:
            with pytest.raises(RebuildFailed) as refused:
                await rebuild_live(settings, service.store, flows)
            assert refused.value.kind == "invalid"
            return str(refused.value)
        finally:
            async with service.engine.begin() as conn:
                await conn.execute(text(undo))

    assert "at migration 9999" in await refused_while(
        "INSERT INTO schema_migrations (version, description) VALUES (9999, 'newer')",
        "DELETE FROM schema_migrations WHERE version = 9999")
    # Grants on single columns would be lost to the rebuilt tables (grants on whole tables are copied).
    assert "grants on single columns" in await refused_while("GRANT SELECT (name) ON flows TO PUBLIC",
                                                             "REVOKE SELECT (name) ON flows FROM PUBLIC")
    assert (await broker.ok_qry("GetFlowByName", name="kept"))["name"] == "kept"
    await rebuild_live(settings, service.store, flows)  # the grant taken back: nothing stands in the way


async def test_a_rebuilt_table_keeps_the_grants_of_the_live_one(broker, service, settings):
    """A reader's role (a dashboard's) granted a whole table keeps its access across the swap,
    grant option included; PUBLIC's grant too."""
    reader = f"rl_reader_{uuid.uuid4().hex[:8]}"
    async with service.engine.begin() as conn:
        await conn.execute(text(f'CREATE ROLE "{reader}"'))
    try:
        async with service.engine.begin() as conn:
            await conn.execute(text(f'GRANT USAGE ON SCHEMA "{settings.db_schema}" TO "{reader}"'))
            await conn.execute(text(f'GRANT SELECT, INSERT ON flows TO "{reader}" WITH GRANT OPTION'))
            await conn.execute(text("GRANT SELECT ON flows TO PUBLIC"))
        await broker.ok_cmd("CreateFlow", name="granted")
        await broker.catch_up()
        async with service.engine.connect() as conn:
            before = (await conn.execute(text("SELECT oid FROM pg_class WHERE oid = 'flows'::regclass"))).scalar()
        await rebuild_live(settings, service.store, _projector("flows"))
        async with service.engine.connect() as conn:
            after = (await conn.execute(text("SELECT oid FROM pg_class WHERE oid = 'flows'::regclass"))).scalar()
            assert after != before  # swapped: another table under the same name
            granted = (await conn.execute(text(
                "SELECT has_table_privilege(:r, 'flows', 'SELECT WITH GRANT OPTION'), "
                "has_table_privilege(:r, 'flows', 'INSERT WITH GRANT OPTION'), "
                "has_table_privilege(:r, 'flows', 'DELETE'), "
                "EXISTS (SELECT 1 FROM aclexplode((SELECT relacl FROM pg_class WHERE oid = 'flows'::regclass)) a "
                "        WHERE a.grantee = 0 AND a.privilege_type = 'SELECT')"), {"r": reader})).one()
            assert tuple(granted) == (True, True, False, True)
            await conn.execute(text(f'SET LOCAL ROLE "{reader}"'))  # in the transaction begun above
            assert "granted" in (await conn.execute(text("SELECT name FROM flows"))).scalars().all()
            await conn.rollback()
        assert (await broker.ok_qry("GetFlowByName", name="granted"))["name"] == "granted"
    finally:
        async with service.engine.begin() as conn:
            await conn.execute(text("REVOKE ALL ON flows FROM PUBLIC"))
            await conn.execute(text(f'REVOKE ALL ON flows FROM "{reader}" CASCADE'))
            await conn.execute(text(f'REVOKE ALL ON SCHEMA "{settings.db_schema}" FROM "{reader}"'))
            await conn.execute(text(f'DROP ROLE "{reader}"'))


async def test_the_swap_waits_out_a_long_reader_and_tries_again(broker, service, settings, monkeypatch):
    """A transaction that holds the tables makes the swap let go of its locks (the live
    projection is not held meanwhile) and try again once the reader is done."""
    from runledger.projections import rebuild

    monkeypatch.setattr(rebuild, "LOCK_WAIT_SECONDS", 0.2)
    await broker.ok_cmd("CreateFlow", name="read-long")
    await broker.catch_up()
    async with service.engine.connect() as reader:
        await reader.execute(text("SELECT count(*) FROM flows"))  # holds the table until its transaction ends
        failed = _failed_swaps(monkeypatch)
        swap = asyncio.create_task(rebuild_live(settings, service.store, _projector("flows")))
        await _until(lambda: failed)
        # Meanwhile the live projection and the queries go on: the swap lets go between tries.
        await broker.ok_cmd("CreateFlow", name="while-waiting")
        assert (await broker.ok_qry("GetFlowByName", name="while-waiting"))["name"] == "while-waiting"
        assert not swap.done()
        await reader.rollback()
    result = await swap
    assert result.swap_tries > 1
    assert {(await broker.ok_qry("GetFlowByName", name=n))["name"] for n in ("read-long", "while-waiting")} == {
        "read-long", "while-waiting"}


async def test_a_rebuild_by_another_version_is_refused(broker, service, settings, monkeypatch):
    """A projector that handles fewer event types than the live one (an older runledger), or a
    migration that lands while the rebuild replays: either would leave the swapped-in tables
    short of what the service wrote or expects, so nothing is swapped."""
    import copy

    from runledger.projections import rebuild
    from runledger.projections.rebuild import RebuildFailed

    await broker.ok_cmd("CreateWorkPool", name="v", type="process")
    await broker.ok_cmd("UpdateWorkQueue", work_pool_name="v", work_queue_name="default", description="changed")
    await broker.catch_up()
    older = copy.copy(_projector("work_pools"))
    older.handles = older.handles - {"WorkQueueUpdated"}
    with pytest.raises(RebuildFailed) as refused:
        await rebuild_live(settings, service.store, older)
    assert refused.value.kind == "invalid" and "handles other event types" in str(refused.value)

    replayed = rebuild.replay

    async def replay_then_migrate(*args, **kwargs):
        result = await replayed(*args, **kwargs)
        async with service.engine.begin() as conn:  # a newer service migrates meanwhile
            await conn.execute(text("INSERT INTO schema_migrations (version, description) VALUES (9998, 'newer')"))
        return result

    monkeypatch.setattr(rebuild, "replay", replay_then_migrate)
    try:
        with pytest.raises(RebuildFailed) as refused:
            await rebuild_live(settings, service.store, _projector("work_pools"))
        assert refused.value.kind == "invalid" and "at migration 9998" in str(refused.value)
    finally:
        async with service.engine.begin() as conn:
            await conn.execute(text("DELETE FROM schema_migrations WHERE version = 9998"))
    got = await broker.ok_qry("GetWorkQueue", work_pool_name="v", work_queue_name="default")
    assert got["description"] == "changed"


async def test_the_swap_waits_out_a_held_checkpoint_row(broker, service, settings, monkeypatch):
    """The checkpoint's row held past the wait (a long batch, a bind) is tried again, not a crash."""
    from runledger.projections import rebuild

    monkeypatch.setattr(rebuild, "LOCK_WAIT_SECONDS", 0.2)
    await broker.ok_cmd("CreateFlow", name="row-held")
    await broker.catch_up()
    async with service.engine.connect() as holder:
        await holder.execute(text("SELECT 1 FROM projection_checkpoints WHERE name = 'flows' FOR UPDATE"))
        failed = _failed_swaps(monkeypatch)
        swap = asyncio.create_task(rebuild_live(settings, service.store, _projector("flows")))
        await _until(lambda: failed)
        assert not swap.done()
        await holder.rollback()
    result = await swap
    assert result.swap_tries > 1
    assert (await broker.ok_qry("GetFlowByName", name="row-held"))["name"] == "row-held"
