"""`runledger replay` through the CLI: it writes only into a schema it made (or an empty or new
one), and `--as-of` takes the moment as typed."""

from __future__ import annotations

import asyncio
import time
from datetime import UTC, datetime

from sqlalchemy import text

from runledger.infra.database import create_engine

from .broker import cli_in_thread


async def _pools_in(engine, schema: str) -> list[str]:
    async with engine.connect() as conn:
        rows = await conn.execute(text(f'SELECT name FROM "{schema}".work_pools ORDER BY name'))
        return list(rows.scalars())


async def _drop(engine, *schemas: str) -> None:
    async with engine.begin() as conn:
        for schema in schemas:
            await conn.execute(text(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE'))


async def test_replay_refuses_a_schema_it_did_not_make_and_leaves_it_intact(broker, settings):
    await broker.ok_cmd("CreateWorkPool", name="alpha", type="process")
    cli = cli_in_thread(settings)
    other = f"{settings.namespace}_othersvc"
    engine = create_engine(settings, pool_size=1)
    try:
        async with engine.begin() as conn:
            await conn.execute(text(f'CREATE SCHEMA "{other}"'))
            await conn.execute(text(f'CREATE TABLE "{other}".precious (id int PRIMARY KEY)'))
            await conn.execute(text(f'INSERT INTO "{other}".precious VALUES (42)'))

        result = await cli("replay", "--quiet", "--schema", other)

        assert result.exit_code == 5, result.output
        assert "Error (invalid)" in result.output and "not made by replay" in result.output, result.output
        assert f"--schema {settings.namespace}_replay" in result.output, result.output
        async with engine.connect() as conn:
            kept = (await conn.execute(text(f'SELECT id FROM "{other}".precious'))).scalars().all()
        assert kept == [42]

        result = await cli("replay", "--quiet", "--schema", settings.db_schema)  # the live one
        assert result.exit_code == 5, result.output
        assert "live schema" in result.output

        result = await cli("replay", "--quiet", "--schema", "public")  # the database's own, even empty
        assert result.exit_code == 5 and "not made by replay" in result.output, result.output
    finally:
        await _drop(engine, other)
        await engine.dispose()


async def test_replay_into_the_default_a_fresh_an_empty_and_its_own_schema(broker, settings):
    await broker.ok_cmd("CreateWorkPool", name="alpha", type="process")
    cli = cli_in_thread(settings)
    default, fresh, empty = (f"{settings.namespace}_{s}" for s in ("replay", "fresh", "empty"))
    engine = create_engine(settings, pool_size=1)
    try:
        async with engine.begin() as conn:
            await conn.execute(text(f'CREATE SCHEMA "{empty}"'))
        for args in ((), ("--schema", fresh), ("--schema", empty)):
            result = await cli("replay", "--quiet", *args)
            assert result.exit_code == 0, result.output
        for schema in (default, fresh, empty):
            assert await _pools_in(engine, schema) == ["alpha"]

        # A second replay into each schema replay made rebuilds it from the log.
        await broker.ok_cmd("CreateWorkPool", name="beta", type="process")
        for args in ((), ("--schema", fresh), ("--schema", empty)):
            result = await cli("replay", "--quiet", *args)
            assert result.exit_code == 0, result.output
        for schema in (default, fresh, empty):
            assert await _pools_in(engine, schema) == ["alpha", "beta"]

        # Renamed, it is no longer the schema replay made under that name.
        async with engine.begin() as conn:
            await conn.execute(text(f'ALTER SCHEMA "{fresh}" RENAME TO "{fresh}2"'))
        result = await cli("replay", "--quiet", "--schema", f"{fresh}2")
        assert result.exit_code == 5, result.output
        assert await _pools_in(engine, f"{fresh}2") == ["alpha", "beta"]
    finally:
        await _drop(engine, default, fresh, f"{fresh}2", empty)
        await engine.dispose()


async def test_replay_as_of_a_moment_between_two_writes(broker, settings):
    await broker.ok_cmd("CreateWorkPool", name="before", type="process")
    # The moment: the next whole second after the first write was decided (the CLI reads
    # whole seconds), naive as typed, which the CLI reads as UTC.
    moment = datetime.fromtimestamp(int(time.time()) + 1, UTC)
    while datetime.now(UTC) <= moment:
        await asyncio.sleep(0.05)
    await broker.ok_cmd("CreateWorkPool", name="after", type="process")
    cli = cli_in_thread(settings)
    schema = f"{settings.namespace}_asof"
    engine = create_engine(settings, pool_size=1)
    try:
        result = await cli("replay", "--quiet", "--schema", schema, "--as-of", moment.strftime("%Y-%m-%dT%H:%M:%S"))

        assert result.exit_code == 0, result.output
        pools = await _pools_in(engine, schema)
        assert "before" in pools and "after" not in pools, pools
    finally:
        await _drop(engine, schema)
        await engine.dispose()
