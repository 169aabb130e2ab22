"""A projection that meets an event Postgres cannot store stops at that event, applies all
before it, reports it (the runner, `projection_failures`, `runledger status`, `verify`), keeps
trying slowly and resumes once the projector is fixed; `runledger replay` names the event.

The poison event (a WorkPoolCreated whose name holds U+0000) is appended raw to the stream:
the command side refuses such a name, but a log may already hold one."""

from __future__ import annotations

import asyncio
import copy
import json
import logging
import uuid

import pytest
from sqlalchemy import text
from typer.testing import CliRunner

from runledger.handlers.service import Service
from runledger.infra.nats_connection import connect
from runledger.projections.runner import ProjectionRunner, read_checkpoint
from runledger.projections.work_pools import WorkPoolsProjector

from .broker import Broker, cli_env


class FixableProjector(WorkPoolsProjector):
    """The work pools projector; once `fixed`, it drops NULs from names (a projector fix)."""

    fixed = False

    async def apply(self, conn, events):
        if self.fixed:
            events = [(a, t, _without_nul(copy.deepcopy(e))) for a, t, e in events]
        await super().apply(conn, events)


def _without_nul(value):
    if isinstance(value, str):
        return value.replace("\x00", "")
    if isinstance(value, dict):
        return {k: _without_nul(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_without_nul(v) for v in value]
    return value


@pytest.fixture
async def writer(settings):
    """A service that takes commands and answers queries but projects nothing."""
    svc = Service(settings, roles=frozenset({"commands", "queries"}))
    await svc.start()
    nc = await connect(settings)
    try:
        yield svc, Broker(nc, settings)
    finally:
        await nc.close()
        await svc.stop()
        from tests.conftest import cleanup_namespace

        await cleanup_namespace(settings)


async def append_poison(broker: Broker, settings) -> int:
    """A copy of a real WorkPoolCreated, for a new pool named "bad\\x00name", appended raw."""
    template = await broker.ok_cmd("CreateWorkPool", name="template", type="process")
    envelope = (await broker.pool_events(template["id"]))[0]
    assert envelope["type"] == "WorkPoolCreated"
    pool_id = str(uuid.uuid4())
    envelope = copy.deepcopy(envelope)
    envelope["id"] = str(uuid.uuid4())
    envelope["aggregate_id"] = pool_id
    envelope["payload"]["pool"]["id"] = pool_id
    envelope["payload"]["pool"]["name"] = "bad\x00name"
    envelope["payload"]["default_queue"]["id"] = str(uuid.uuid4())
    subject = f"{settings.event_subject_prefix}.work_pool.{pool_id}.WorkPoolCreated"
    ack = await broker.nc.jetstream().publish(subject, json.dumps(envelope).encode())
    return ack.seq


async def _until(predicate, timeout: float = 20.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not await predicate():
        assert loop.time() < deadline, "timed out"
        await asyncio.sleep(0.05)


async def _pool_names(svc) -> list[str]:
    async with svc.engine.connect() as conn:
        return list((await conn.execute(text("SELECT name FROM work_pools ORDER BY name"))).scalars())


async def _failures(svc) -> list:
    async with svc.engine.connect() as conn:
        return (await conn.execute(text("SELECT projection, seq, event_type, error, attempts FROM projection_failures"))).all()


async def _stalled_history(broker, settings) -> tuple[int, int]:
    await broker.ok_cmd("CreateWorkPool", name="before")
    poison = await append_poison(broker, settings)
    await broker.ok_cmd("CreateWorkPool", name="after")
    await broker.ok_cmd("UpdateWorkPool", name="after", description="later")
    return poison, broker.last_seq


async def test_a_projection_stops_at_the_event_it_cannot_apply_and_resumes_once_fixed(writer, settings, caplog):
    svc, broker = writer
    poison, last = await _stalled_history(broker, settings)
    projector = FixableProjector()
    runner = ProjectionRunner(broker.nc, settings, svc.engine, [projector], stall_retry_seconds=0.3)
    caplog.set_level(logging.INFO, logger="runledger")
    await runner.start()
    try:
        async def stalled():
            return "work_pools" in runner.failures and bool(await _failures(svc))
        await _until(stalled)
        failure = runner.failures["work_pools"]
        assert (failure.seq, failure.event_type) == (poison, "WorkPoolCreated")
        assert "CharacterNotInRepertoire" in failure.error or "UntranslatableCharacter" in failure.error, failure.error
        # Everything before the event is applied (one batch held them all), nothing after it.
        async with svc.engine.connect() as conn:
            assert await read_checkpoint(conn, "work_pools") == poison - 1
        assert await _pool_names(svc) == ["before", "template"]

        # It keeps trying, slowly, and stays reported; one error line, not one per attempt.
        await asyncio.sleep(1.0)
        [(name, seq, event_type, error, attempts)] = await _failures(svc)
        assert (name, seq, event_type) == ("work_pools", poison, "WorkPoolCreated") and attempts >= 2
        assert not any(t.done() for t in runner._tasks)
        errors = [r for r in caplog.records if r.levelno >= logging.ERROR and r.name.startswith("runledger")]
        assert len(errors) == 1 and f"stream sequence {poison}" in errors[0].getMessage()

        projector.fixed = True  # a fixed projector resumes by itself
        async def caught_up():
            async with svc.engine.connect() as conn:
                return await read_checkpoint(conn, "work_pools") == last
        await _until(caught_up)
        await _until(lambda: asyncio.sleep(0, "work_pools" not in runner.failures))
        assert await _pool_names(svc) == ["after", "badname", "before", "template"]
        assert await _failures(svc) == []
    finally:
        await runner.stop()


async def test_status_verify_and_replay_report_a_stalled_projection(writer, settings):
    from runledger.cli.main import _register, app

    _register()
    svc, broker = writer
    poison, _ = await _stalled_history(broker, settings)
    runner = ProjectionRunner(broker.nc, settings, svc.engine, [WorkPoolsProjector()], stall_retry_seconds=0.3)
    await runner.start()
    try:
        await _until(lambda: asyncio.sleep(0, "work_pools" in runner.failures))
        await _until(lambda: _failures(svc))
        env = cli_env(settings)
        cli = CliRunner()

        result = await asyncio.to_thread(cli.invoke, app, ["status", "--json"], env=env)
        assert result.exit_code == 7, result.output
        info = json.loads(result.stdout)
        [stalled] = info["stalled"]
        assert (stalled["projection"], stalled["seq"], stalled["event_type"]) == ("work_pools", poison, "WorkPoolCreated")
        assert info["stream_last_seq"] == broker.last_seq
        assert info["replication"] is None  # one server: no copies to report
        by_name = {p["name"]: p for p in info["projections"]}
        assert by_name["work_pools"] == {"name": "work_pools", "checkpoint": poison - 1,
                                         "behind": broker.last_seq - poison + 1, "stalled": True,
                                         "lease_holder": runner.leases["work_pools"].owner}
        assert by_name["flows"]["stalled"] is False  # not run here: behind, but not stopped

        result = await asyncio.to_thread(cli.invoke, app, ["status"], env=env)
        assert result.exit_code == 7
        assert f"projection work_pools is stopped at stream sequence {poison} (WorkPoolCreated)" in result.stderr
        assert f"projection work_pools: at {poison - 1}" in result.stdout
        assert f"(stalled); applied by {runner.leases['work_pools'].owner}" in result.stdout

        result = await asyncio.to_thread(cli.invoke, app, ["verify"], env=env)
        assert result.exit_code == 7, result.output
        assert f"stream sequence {poison} (WorkPoolCreated)" in result.output

        result = await asyncio.to_thread(cli.invoke, app, ["replay", "--quiet"], env=env)
        assert result.exit_code == 7, result.output
        assert result.exception is None or isinstance(result.exception, SystemExit)
        lines = [line for line in result.output.splitlines() if line.strip()]
        assert len(lines) == 1 and "Traceback" not in result.output, result.output
        assert f"replay stopped at stream sequence {poison} (WorkPoolCreated) in projection work_pools" in lines[0]
        assert "CharacterNotInRepertoire" in lines[0] or "UntranslatableCharacter" in lines[0]
    finally:
        await runner.stop()
        from runledger.infra.database import create_engine, drop_schema

        engine = create_engine(settings, schema=f"{settings.namespace}_replay")
        await drop_schema(engine, f"{settings.namespace}_replay")
        await engine.dispose()


async def test_an_event_written_by_a_newer_version_holds_the_projection_until_it_reads_that_version(
        writer, settings, monkeypatch):
    """A rolling upgrade: a newer command process writes `WorkPoolUpdated` at a version this
    projector does not know yet. Skipped, the update would be missing from the read model for
    good; the projection waits there instead, reported, and applies it (and what follows) once
    it runs the version that reads it."""
    from runledger.commands import events as ev
    from runledger.commands.work_pools import WorkPoolUpdated

    svc, broker = writer
    pool = await broker.ok_cmd("CreateWorkPool", name="rolling")
    await broker.ok_cmd("UpdateWorkPool", name="rolling", description="v-current")
    update = [e for e in await broker.pool_events(pool["id"]) if e["type"] == "WorkPoolUpdated"][-1]
    newer = copy.deepcopy(update)
    newer["id"] = str(uuid.uuid4())
    newer["schema_version"] = WorkPoolUpdated.schema_version + 1
    newer["payload"]["pool"]["description"] = "written-by-newer"
    subject = f"{settings.event_subject_prefix}.work_pool.{pool['id']}.WorkPoolUpdated"
    newer_seq = (await broker.nc.jetstream().publish(subject, json.dumps(newer).encode())).seq
    await broker.ok_cmd("CreateWorkPool", name="later")
    last = broker.last_seq

    async def description() -> str:
        async with svc.engine.connect() as conn:
            return (await conn.execute(text("SELECT description FROM work_pools WHERE name = 'rolling'"))).scalar_one()

    old = ProjectionRunner(broker.nc, settings, svc.engine, [WorkPoolsProjector()], stall_retry_seconds=0.3)
    await old.start()
    try:
        await _until(lambda: asyncio.sleep(0, "work_pools" in old.failures))
        failure = old.failures["work_pools"]
        assert (failure.seq, failure.event_type) == (newer_seq, "WorkPoolUpdated")
        assert "newer than this reader" in failure.error
        async with svc.engine.connect() as conn:
            assert await read_checkpoint(conn, "work_pools") == newer_seq - 1
            skipped = (await conn.execute(text("SELECT seq FROM skipped_events"))).all()
        assert skipped == [] and await description() == "v-current"
    finally:
        await old.stop()

    # The upgraded process reads the new version (here: the same shape, one version up).
    monkeypatch.setattr(WorkPoolUpdated, "schema_version", WorkPoolUpdated.schema_version + 1)
    monkeypatch.setitem(ev.UPCASTERS, ("WorkPoolUpdated", WorkPoolUpdated.schema_version - 1), lambda p: p)
    upgraded = ProjectionRunner(broker.nc, settings, svc.engine, [WorkPoolsProjector()], stall_retry_seconds=0.3)
    await upgraded.start()
    try:
        async def caught_up():
            async with svc.engine.connect() as conn:
                return await read_checkpoint(conn, "work_pools") == last
        await _until(caught_up)
        assert await description() == "written-by-newer"
        assert await _pool_names(svc) == ["later", "rolling"]
        assert await _failures(svc) == []
    finally:
        await upgraded.stop()


async def test_a_stalled_projection_does_not_hold_the_reads(broker, service, settings, caplog):
    """Reads wait for the read models to reach the reader's writes (`min_seq`); one stalled
    before that point can never get there. The reads answer anyway, from the stalled read
    model as it stands, and say so (`stalled`), instead of failing, every one of them, for as
    long as the stall lasts (the CLI included, which catches up with the log first)."""
    from runledger.client import RunledgerClient

    await broker.ok_cmd("CreateWorkPool", name="before")
    poison = await append_poison(broker, settings)
    await broker.ok_cmd("CreateWorkPool", name="after")
    await broker.ok_cmd("CreateFlow", name="f")
    await _until(lambda: _failures(service))

    reply = await broker.qry("GetFlowByName", name="f")  # min_seq: the last write, past the stall
    assert reply["ok"] and reply["result"]["name"] == "f"
    assert reply["stalled"] == [{"projection": "work_pools", "seq": poison, "event_type": "WorkPoolCreated"}]
    reply = await broker.qry("GetWorkPool", name="after")  # its read model stops before it
    assert not reply["ok"] and reply["error"]["code"] == "not_found" and reply["stalled"][0]["seq"] == poison
    assert f"read model work_pools is stalled at stream sequence {poison}" in reply["error"]["message"]
    reply = await broker.qry("GetWorkPool", name="before", min_seq=poison - 1)  # reached: nothing to say
    assert reply["ok"] and "stalled" not in reply

    caplog.set_level(logging.WARNING, logger="runledger.client")
    async with RunledgerClient(settings) as rl:
        await rl.create_variable("v", 1)
        assert (await rl.read_flow_by_name("f")).name == "f"
        assert [v.name for v in await rl.list_variables()] == ["v"]
    warned = [r.getMessage() for r in caplog.records if "is stalled" in r.getMessage()]
    assert len(warned) == 1 and f"read model work_pools is stalled at stream sequence {poison}" in warned[0]


async def test_a_read_after_a_write_waits_for_a_read_model_that_is_only_behind(settings):
    """Nothing stalled, the read model behind (no projection runs here): the read waits for
    the write and, past the wait, is refused; it never answers without the write."""
    from tests.conftest import cleanup_namespace

    settings = settings.model_copy(update={"query_wait_timeout": 1.0})
    svc = Service(settings, roles=frozenset({"commands", "queries"}))
    await svc.start()
    nc = await connect(settings)
    try:
        broker = Broker(nc, settings)
        await broker.ok_cmd("CreateFlow", name="mine")
        reply = await broker.qry("GetFlowByName", name="mine")
        assert not reply["ok"] and reply["error"]["code"] == "unavailable", reply
        assert "did not reach stream sequence" in reply["error"]["message"]
    finally:
        await nc.close()
        await svc.stop()
        await cleanup_namespace(settings)
