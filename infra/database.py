"""The Postgres engine and versioned schema migrations.

Every table lives in the namespace's own schema (`search_path` is set per connection), so
several deployments or test runs share one database without meeting.
"""

from __future__ import annotations

import asyncio
import weakref
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from sqlalchemy import text
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, create_async_engine

from .settings import Settings

CONNECT_TIMEOUT_SECONDS = 10


class DatabaseUnavailable(RuntimeError):
    """Postgres cannot be reached or refuses us; the message is safe to print (no secrets)."""


@dataclass(frozen=True)
class Migration:
    version: int
    description: str
    statements: Sequence[str]


def create_engine(settings: Settings, schema: str | None = None, pool_size: int | None = None,
                  statement_timeout: float | None = -1.0) -> AsyncEngine:
    """The engine, with every statement bounded (`statement_timeout`, default
    `settings.statement_timeout_seconds`; None: unbounded, for long offline work such as a
    replay): Postgres cancels a statement past it, and since a stalled server (SIGSTOP, a hung
    host) enforces nothing, asyncpg gives up a second later on its own (`command_timeout`), and
    waiting for a pooled connection is bounded too (`pool_timeout`)."""
    schema = schema or settings.db_schema
    if statement_timeout is not None and statement_timeout < 0:
        statement_timeout = settings.statement_timeout_seconds
    server_settings = {"search_path": schema, "application_name": "runledger"}
    connect_args: dict = {"server_settings": server_settings, "timeout": CONNECT_TIMEOUT_SECONDS}
    pool_timeout = 30.0
    if statement_timeout is not None:
        server_settings["statement_timeout"] = str(max(1, int(statement_timeout * 1000)))
        connect_args["command_timeout"] = statement_timeout + 1.0
        pool_timeout = statement_timeout
    engine = create_async_engine(
        settings.database_url.get_secret_value(),
        pool_size=pool_size or settings.database_pool_size,
        max_overflow=2,
        pool_pre_ping=False,
        pool_timeout=pool_timeout,
        connect_args=connect_args,
    )
    _connect_args[engine.sync_engine] = connect_args
    return engine


# What each engine made here passes asyncpg beyond its URL: `DriverConnections` connects alike.
_connect_args: weakref.WeakKeyDictionary[Any, dict] = weakref.WeakKeyDictionary()


async def _keep_session(_connection: Any) -> None:
    """Nothing to undo when a connection goes back: nobody changes its session (asyncpg still
    rolls back a transaction left open)."""


class DriverConnections:
    """asyncpg's own pool beside an engine, connected as the engine connects (its URL, schema
    and timeouts), for statements sent straight to the driver on a hot path: the projections'
    one-statement batches and saved positions. Taking a connection from the engine's pool and
    giving it back cost ~105 µs a batch (SQLAlchemy's connection, a greenlet, its events), from
    this pool ~27 – 30 µs (`bench/run_writes.py` prints both; docs/benchmarks.md, session 16).
    Connects on first use; a connection found closed is replaced."""

    def __init__(self, engine: AsyncEngine, size: int = 2):
        self.engine = engine
        self.size = size
        self._pool: Any = None
        self._opening = asyncio.Lock()

    async def pool(self) -> Any:
        """The pool, opened on first use: `async with (await conns.pool()).acquire() as driver`."""
        if self._pool is not None:
            return self._pool
        import asyncpg

        async with self._opening:
            if self._pool is None:
                sync_engine = self.engine.sync_engine
                _, params = sync_engine.dialect.create_connect_args(sync_engine.url)
                params.update(_connect_args.get(sync_engine, {}))
                self._pool = await asyncpg.create_pool(min_size=0, max_size=self.size, max_queries=2**62,
                                                       reset=_keep_session, **params)
            return self._pool

    async def close(self, timeout: float = 5.0) -> None:
        """Closes the connections, or drops them past `timeout` (a stalled server must not
        hold up a shutdown)."""
        pool, self._pool = self._pool, None
        if pool is None:
            return
        try:
            await asyncio.wait_for(pool.close(), timeout)
        except (TimeoutError, OSError):
            pool.terminate()


async def check_database(engine: AsyncEngine, settings: Settings) -> None:
    """One round trip, so that a wrong address, password or database name is one clear line
    naming the (redacted) URL instead of a traceback from deep inside a migration."""
    try:
        async with asyncio.timeout(CONNECT_TIMEOUT_SECONDS + 5):
            async with engine.connect() as conn:
                await conn.execute(text("SELECT 1"))
    except (OSError, TimeoutError, DBAPIError) as e:
        cause = getattr(e, "orig", None) or e
        text_of_cause = str(cause).strip()
        reason = getattr(cause, "strerror", None) or (text_of_cause.splitlines()[0] if text_of_cause else "")
        password = urlsplit(settings.database_url.get_secret_value()).password
        if password:
            reason = reason.replace(password, "***")
        raise DatabaseUnavailable(
            f"cannot use Postgres at {settings.safe_database_url()}: {type(cause).__name__}{': ' + reason if reason else ''}"
        ) from None


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


async def asyncpg_connection(conn: AsyncConnection) -> Any:
    """asyncpg's own connection under `conn`, for statements SQLAlchemy would only slow down
    (bulk writes from payload dicts, checkpoints), inside `conn`'s transaction when it has
    one. SQLAlchemy's asyncpg adapter sends BEGIN lazily, with its first statement: without
    this, statements sent to the driver before any SQLAlchemy statement ran in autocommit,
    so a batch that failed half-way, or lost a race for its checkpoint, kept the rows it had
    written (and a row lock taken `FOR UPDATE` was let go at once)."""
    pooled = await conn.get_raw_connection()
    adapter: Any = pooled.dbapi_connection
    if conn.in_transaction() and adapter._transaction is None:
        await adapter._start_transaction()  # the BEGIN SQLAlchemy commits or rolls back
    return pooled.driver_connection
