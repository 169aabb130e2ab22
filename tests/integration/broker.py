"""A bare request helper for tests that speak the broker contract directly (not the client)."""

from __future__ import annotations

import contextlib
import json
import os
from typing import Any

from nats.aio.client import Client as NATS
from nats.js.errors import NotFoundError


class Broker:
    def __init__(self, nc: NATS, settings):
        self.nc = nc
        self.settings = settings
        self.last_seq: int | None = None

    async def raw(self, subject: str, body: bytes) -> dict[str, Any]:
        reply = await self.nc.request(subject, body, timeout=10)
        return json.loads(reply.data)

    async def cmd(self, _name: str, /, **body: Any) -> dict[str, Any]:
        out = await self.raw(self.settings.command_subject(_name), json.dumps(body).encode())
        if out.get("ok") and out.get("seq"):
            self.last_seq = max(self.last_seq or 0, out["seq"])
        return out

    async def qry(self, _name: str, /, **body: Any) -> dict[str, Any]:
        if self.last_seq and "min_seq" not in body:
            body["min_seq"] = self.last_seq
        return await self.raw(self.settings.query_subject(_name), json.dumps(body).encode())

    async def ok_cmd(self, _name: str, /, **body: Any) -> Any:
        out = await self.cmd(_name, **body)
        assert out["ok"], out
        return out["result"]

    async def ok_qry(self, _name: str, /, **body: Any) -> Any:
        out = await self.qry(_name, **body)
        assert out["ok"], out
        return out["result"]

    async def catch_up(self) -> None:
        """Later queries read after everything the log holds now, the service's own writes too
        (a background poll record, the clock's, the foreman's), not only this broker's."""
        self.last_seq = (await self.ok_qry("GetServiceHealth"))["stream_last_seq"]

    async def stream_messages(self) -> int:
        """How many messages the event stream holds (events and idempotency records)."""
        return (await self.nc.jetstream().stream_info(self.settings.stream_name)).state.messages

    async def pool_events(self, pool_id: str) -> list[dict]:
        """Every event envelope of one pool aggregate, in log order (`aggregate_events`)."""
        return await self.aggregate_events("work_pool", pool_id)

    async def aggregate_events(self, aggregate_type: str, aggregate_id: str) -> list[dict]:
        """Every event envelope of one aggregate the log holds, in log order, read with direct
        gets; each is checked to sit on the subject its type names."""
        js = self.nc.jetstream()
        prefix = f"{self.settings.event_subject_prefix}.{aggregate_type}.{aggregate_id}"
        out, seq = [], 1
        while True:
            try:
                msg = await js.get_msg(self.settings.stream_name, seq=seq, subject=f"{prefix}.*", next=True, direct=True)
            except NotFoundError:
                return out
            envelope = json.loads(msg.data)
            assert msg.subject == f"{prefix}.{envelope['type']}"
            out.append(envelope)
            seq = msg.seq + 1


async def drop_service_schema(settings) -> None:
    """Drops the read models' schema a test's own service made (the `service` fixture's
    clean-up, for tests that start services themselves)."""
    from runledger.infra.database import create_engine, drop_schema

    engine = create_engine(settings)
    try:
        await drop_schema(engine, settings.db_schema)
    finally:
        await engine.dispose()


def cli_in_thread(settings):
    """`await cli("flow-run", "ls", ...)`: the `runledger` CLI run in process against the test's
    servers. The CLI runs its own event loop, and the service runs on the test's: a thread for
    the CLI. Each run is a new client, whose reads first catch up with every write acknowledged
(`RunledgerClient.catch_up`); the test's `Broker` does not wait for the CLI's writes."""
    import asyncio

    from typer.testing import CliRunner

    from runledger.cli.main import _register, app

    _register()
    env = cli_env(settings)
    runner = CliRunner()

    async def cli(*args: str):
        return await asyncio.to_thread(runner.invoke, app, list(args), env=env)

    return cli


def cli_env(settings) -> dict[str, str]:
    """The environment that points an in-process `runledger` CLI run at the test's servers."""
    return {
        "RUNLEDGER_NATS_URL": settings.nats_url,
        "RUNLEDGER_DATABASE_URL": settings.database_url.get_secret_value(),
        "RUNLEDGER_NAMESPACE": settings.namespace,
        "RUNLEDGER_CONFIG_DIR": os.environ["RUNLEDGER_CONFIG_DIR"],
    }


async def assert_live_equals_rebuild(service, settings, last_seq: int | None = None,
                                     ran: tuple[str, ...] | None = None) -> int:
    """What `runledger verify` does: the live read models at their checkpoint equal a rebuild of
    the log up to that checkpoint (at `last_seq`, when given), and nothing was skipped.
    Returns the number of rows compared."""
    from sqlalchemy import text

    from runledger.handlers.registry import projectors
    from runledger.infra.database import create_engine, drop_schema
    from runledger.projections.replay import compare, replay, snapshot_each

    # `ran`: the projections the test ran, when not all (their checkpoint is the position).
    names = list(ran) if ran is not None else [p.name for p in projectors()]
    positions, live = await snapshot_each(service.engine, names)
    seq = min((positions.get(n, 0) for n in names), default=0)
    if last_seq is not None:
        assert seq == last_seq
    schema = f"{settings.namespace}_rebuilt"
    engine = create_engine(settings, schema=schema, pool_size=1)
    try:
        # Each projection rebuilt up to where the live one is (they advance on their own).
        until_each = {p.name: positions.get(p.name, 0) for p in projectors()} if ran is None else None
        result = await replay(settings, service.store, projectors(), schema, until_seq=seq, until_each=until_each)
        rebuilt_positions, rebuilt = await snapshot_each(engine, names)
        if until_each is not None:
            assert rebuilt_positions == {n: p for n, p in until_each.items() if p}
        else:
            assert result.last_seq == seq
        differences = compare(live, rebuilt)
        assert differences == [], "\n".join(f"{d.table} {d.key}: {d.kind}: {d.detail}" for d in differences[:20])
    finally:
        await drop_schema(engine, schema)
        await engine.dispose()
    async with service.engine.connect() as conn:
        skipped = (await conn.execute(text("SELECT projection, seq, reason FROM skipped_events"))).all()
    assert skipped == []
    return sum(len(rows) for rows in live.values())


@contextlib.asynccontextmanager
async def foreman_clock(service, settings):
    """`at(moment)`: a foreman whose clock, and the service's decisions, say `moment` (the
    service's own clock is given back after)."""
    from runledger.commands.messages import DecisionContext
    from runledger.handlers.background import CommandSender
    from runledger.handlers.foreman import Foreman
    from runledger.infra.nats_connection import connect

    real_clock = service.commands.clock
    nc = await connect(settings)

    def at(moment) -> Foreman:
        service.commands.clock = lambda: DecisionContext(now=moment)
        return Foreman(service.engine, CommandSender(nc, settings), clock=lambda: moment)

    try:
        yield at
    finally:
        service.commands.clock = real_clock
        await nc.close()

