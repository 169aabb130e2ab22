"""The Postgres engine and versioned schema migrations.

Every table lives in the namespace's own schema (`search_path` is set per connection), so
several deployments or test runs share one database without meeting.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from .settings import Settings


@dataclass(frozen=True)
class Migration:
    version: int
    description: str
    statements: Sequence[str]


def create_engine(settings: Settings, schema: str | None = None, pool_size: int | None = None) -> AsyncEngine:
    schema = schema or settings.db_schema
    return create_async_engine(
        settings.database_url.get_secret_value(),
        pool_size=pool_size or settings.database_pool_size,
        max_overflow=2,
        pool_pre_ping=False,
        connect_args={"server_settings": {"search_path": schema, "application_name": "runledger"}},
    )


async def migrate(engine: AsyncEngine, schema: str, migrations: Sequence[Migration]) -> int:
    """Apply the migrations this schema has not seen, under an advisory lock; returns the version."""
    async with engine.begin() as conn:
        await conn.execute(text("SELECT pg_advisory_xact_lock(hashtext(:s))"), {"s": f"runledger-migrate:{schema}"})
        await conn.execute(text(f'CREATE SCHEMA IF NOT EXISTS "{schema}"'))
        await conn.execute(text(f'SET LOCAL search_path TO "{schema}"'))
        await conn.execute(text(
            "CREATE TABLE IF NOT EXISTS schema_migrations (version int PRIMARY KEY, description text NOT NULL, "
            "applied timestamptz NOT NULL DEFAULT now())"
        ))
        done = {r[0] for r in await conn.execute(text("SELECT version FROM schema_migrations"))}
        for m in sorted(migrations, key=lambda m: m.version):
            if m.version in done:
                continue
            for statement in m.statements:
                await conn.execute(text(statement))
            await conn.execute(text("INSERT INTO schema_migrations (version, description) VALUES (:v, :d)"), {"v": m.version, "d": m.description})
        return max((m.version for m in migrations), default=0)


async def drop_schema(engine: AsyncEngine, schema: str) -> None:
    async with engine.begin() as conn:
        await conn.execute(text(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE'))
