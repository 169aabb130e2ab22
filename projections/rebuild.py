"""Rebuilding one live read model from the log while the service runs (`runledger rebuild`).

A read model that lacks events (a rolling upgrade done in the wrong order: an older process ran
its projection while a newer one wrote a type it did not know) or holds damaged rows is rebuilt
beside the live one and swapped in, without stopping anything:

1. the projection is replayed into a schema of its own (`<namespace>_rebuild_<projection>`) up
   to the live projection's checkpoint, then chases that checkpoint as the live one moves on;
2. once it is close, one transaction on the live schema takes the live checkpoint's row lock
   (every batch a runner commits takes it, or moves the checkpoint from below its first event,
   so no batch commits meanwhile) and its tables' exclusive locks (no query reads them
   half-swapped); the rebuild applies the last few events up to that checkpoint; the live
   tables are dropped and the rebuilt ones moved into the live schema, under the same names,
   with their indexes; the projection's `skipped_events` up to the checkpoint are replaced by
   the rebuild's. The checkpoint itself does not move.

It is refused before anything live is touched when another runledger version runs it (the
live schema's migrations, the event types the live projection handles), when the tables belong
to another database role or carry grants on single columns, or while another rebuild of the
projection runs. Grants on whole tables (a dashboard's read-only role) are given to the rebuilt
tables in the swap's transaction, as the live ones had them.

Why not rebuild in place, moving the checkpoint back: the checkpoint writes are forward-only,
which is what makes a process that lost its lease without noticing harmless; a checkpoint moved
back would let such a process move it forward again past the events the rebuild had not yet
reached. Here the checkpoint never goes back: whatever commits after the swap starts from it,
into the rebuilt tables, as it would have into the old ones."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

from sqlalchemy import select, text
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from runledger.infra.database import create_engine
from runledger.infra.event_store import EventStore
from runledger.infra.settings import Settings

from .replay import _apply_chunk, _mark_positions, iter_log, replay
from .runner import Projector, _causes, projection_subjects, read_checkpoint
from .tables import MIGRATIONS, projection_checkpoints

log = logging.getLogger("runledger.rebuild")

# The rebuild chases the live checkpoint without locks until it is this close behind, then
# takes the locks and applies the rest with the live read model standing still.
CLOSE_ENOUGH = 200
# How long the swap waits for its locks (a long query holds the tables) before it lets go and
# tries again, so that the live projection is never held for longer.
LOCK_WAIT_SECONDS = 2.0
SWAP_TRIES = 20
# How long the swap's transaction may sit idle (its tail read from the log) before Postgres
# ends it: a rebuild process that freezes mid-swap lets go of the live tables.
IDLE_LIMIT_SECONDS = 30.0


class RebuildFailed(Exception):
    """The rebuild was refused before touching anything live (`kind` "conflict": another
    rebuild of the same projection is running; "invalid": the live schema is at another
    migration than this version's), or its swap could not take its locks, try after try
    ("unavailable")."""

    def __init__(self, kind: str, message: str):
        super().__init__(message)
        self.kind = kind


@dataclass
class RebuildResult:
    projection: str
    events: int  # events the rebuild applied, the chase's included
    last_seq: int  # the live checkpoint at the swap: the rebuilt read model reflects the log up to it
    tables: tuple[str, ...]
    seconds: float
    swap_tries: int


def side_schema(settings: Settings, projector: Projector) -> str:
    """Where a projection is rebuilt before the swap."""
    return f"{settings.namespace}_rebuild_{projector.name}"


async def _live_checkpoint(engine: AsyncEngine, name: str) -> int:
    async with engine.connect() as conn:
        return await read_checkpoint(conn, name)


async def _chase(store: EventStore, side: AsyncEngine, projector: Projector, subjects: list[str],
                 position: int, target: int) -> int:
    """Applies the projection's events in (position, target] to the rebuild and sets its
    checkpoint to `target`; returns how many events it applied."""
    applied = 0
    if target <= position:
        return 0
    async for batch in iter_log(store, subjects, start_seq=position + 1, until_seq=target):
        await _apply_chunk(side, [projector], batch)
        applied += len(batch)
    await _mark_positions(side, {projector.name: target})
    return applied


async def rebuild_live(settings: Settings, store: EventStore, projector: Projector, *,
                       on_progress: Callable[[int, int], None] | None = None) -> RebuildResult:
    """Rebuild `projector`'s live read model from the log and swap it in (module docstring)."""
    started = time.perf_counter()
    side_name = side_schema(settings, projector)
    live = create_engine(settings, pool_size=3)
    side = create_engine(settings, schema=side_name, pool_size=2)
    subjects = projection_subjects(projector, settings.event_subject_prefix)
    tables = tuple(t.name for t in projector.tables)
    try:
        async with live.connect() as guard:  # held to the end: one rebuild of a projection at a time
            key = {"k": f"runledger-rebuild:{side_name}"}
            if not (await guard.execute(text("SELECT pg_try_advisory_lock(hashtext(:k))"), key)).scalar():
                raise RebuildFailed("conflict", f"another rebuild of {projector.name} is running (schema {side_name})")
            await guard.commit()
            try:
                return await _rebuild(settings, store, projector, live, side, subjects, tables, started, on_progress)
            finally:
                await guard.execute(text("SELECT pg_advisory_unlock(hashtext(:k))"), key)
                await guard.commit()
    finally:
        await side.dispose()
        await live.dispose()


async def _same_version(conn: AsyncConnection, projector: Projector, live_schema: str) -> None:
    """Refuses (`invalid`) a rebuild by another runledger version than the live projection's:
    tables of another migration's shape would break the service (and undo a migration that
    its `schema_migrations` says is done), and a projector that handles fewer event types
    would leave their effects out of the swapped-in tables, for ever, since the live
    projection goes on past them. Both are read from the live schema: its migrations, and the
    event types the live projection recorded when it last started (`projection_checkpoints`)."""
    ours = max(m.version for m in MIGRATIONS)
    theirs = (await conn.execute(text("SELECT coalesce(max(version), 0) FROM schema_migrations"))).scalar() or 0
    if theirs != ours:
        raise RebuildFailed("invalid", f"the live schema {live_schema} is at migration {theirs}, this runledger's at {ours}: "
                            "rebuild with the version the service runs")
    handles = (await conn.execute(select(projection_checkpoints.c.handles)
                                  .where(projection_checkpoints.c.name == projector.name))).scalar()
    if handles is None:
        raise RebuildFailed("invalid", f"projection {projector.name} has not run on this version yet (it records the "
                            "event types it handles when it starts): start the service first")
    if sorted(handles) != sorted(projector.handles):
        raise RebuildFailed("invalid", f"the live projection {projector.name} handles other event types than this "
                            "runledger's: rebuild with the version the service runs")


async def _owned_here(conn: AsyncConnection, projector: Projector, live_schema: str) -> list[str]:
    """Refuses (`invalid`) tables owned by another database role, or with grants on single
    columns: the rebuilt ones would belong to this role, and the service or a reader would be
    denied. Returns the GRANT statements that give the rebuilt tables the live ones' grants
    on whole tables (each grantee's privileges, with their grant option), to run after the swap."""
    tables = [t.name for t in projector.tables]
    rows = (await conn.execute(text(
        "SELECT c.relname, pg_get_userbyid(c.relowner) AS owner, "
        "EXISTS (SELECT 1 FROM pg_attribute a WHERE a.attrelid = c.oid AND a.attacl IS NOT NULL) AS column_grants "
        "FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
        "WHERE n.nspname = :s AND c.relname = ANY(:t)"),
        {"s": live_schema, "t": tables})).all()
    me = (await conn.execute(text("SELECT current_user"))).scalar()
    for row in rows:
        if row.owner != me:
            raise RebuildFailed("invalid", f"table {live_schema}.{row.relname} belongs to role {row.owner}: "
                                f"run the rebuild as {row.owner}")
        if row.column_grants:
            raise RebuildFailed("invalid", f"table {live_schema}.{row.relname} carries grants on single columns, "
                                "which the rebuild does not copy: grant on the whole table, or revoke them first")
    grants = (await conn.execute(text(
        "SELECT format('GRANT %s ON %I.%I TO %s%s', a.privilege_type, n.nspname, c.relname, "
        "CASE WHEN a.grantee = 0 THEN 'PUBLIC' ELSE quote_ident(pg_get_userbyid(a.grantee)) END, "
        "CASE WHEN a.is_grantable THEN ' WITH GRANT OPTION' ELSE '' END) "
        "FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace, aclexplode(c.relacl) a "
        "WHERE n.nspname = :s AND c.relname = ANY(:t) AND a.grantee <> c.relowner "
        "ORDER BY c.relname, a.grantee, a.privilege_type"),
        {"s": live_schema, "t": tables})).scalars().all()
    return list(grants)


def _lock_trouble(error: BaseException) -> str | None:
    """lock_not_available (a query, a batch or a bind held a table or the checkpoint's row
    past the wait) or deadlock_detected (a batch took a table before the checkpoint's row),
    however the driver wrapped it."""
    for cause in _causes(error):
        code = getattr(cause, "sqlstate", None)
        if code in ("55P03", "40P01"):
            return str(code)
    return None


async def _rebuild(settings: Settings, store: EventStore, projector: Projector, live: AsyncEngine, side: AsyncEngine,
                   subjects: list[str], tables: tuple[str, ...], started: float,
                   on_progress: Callable[[int, int], None] | None) -> RebuildResult:
    live_schema, side_name = settings.db_schema, side_schema(settings, projector)
    async with live.connect() as conn:  # refused early; checked again in the swap
        await _same_version(conn, projector, live_schema)
        await _owned_here(conn, projector, live_schema)
    first = await _live_checkpoint(live, projector.name)
    result = await replay(settings, store, [projector], side_name, until_each={projector.name: first},
                          on_progress=on_progress)
    events, position = result.events, first
    for attempt in range(1, SWAP_TRIES + 1):
        while (now := await _live_checkpoint(live, projector.name)) - position > CLOSE_ENOUGH:
            events += await _chase(store, side, projector, subjects, position, now)
            position = now
        try:
            swapped_at, tail = await _swap(live, side, store, projector, subjects, position, live_schema, side_name)
        except Exception as e:
            code = _lock_trouble(e)
            if code is None:
                raise
            log.info("rebuild of %s: the swap could not take its locks (%s), trying again", projector.name, code)
            await asyncio.sleep(min(0.05 * attempt, 1.0))
            continue
        events += tail
        await _drop_side(live, side_name)
        return RebuildResult(projector.name, events, swapped_at, tables, time.perf_counter() - started, attempt)
    raise RebuildFailed("unavailable", f"the swap of {projector.name} could not take its locks in {SWAP_TRIES} tries "
                        f"(a query or transaction holds its tables); the rebuild is left in schema {side_name}")


async def _drop_side(live: AsyncEngine, side_name: str) -> None:
    """The side schema's tables and functions, then the schema, without CASCADE: a moved table that came to
    depend on something left in it (a type, a function) keeps it, and the schema stays."""
    try:
        async with live.begin() as conn:
            names = (await conn.execute(text("SELECT tablename FROM pg_tables WHERE schemaname = :s"),
                                        {"s": side_name})).scalars().all()
            for name in names:
                await conn.execute(text(f'DROP TABLE "{side_name}"."{name}"'))
            functions = (await conn.execute(text("SELECT oid::regprocedure::text FROM pg_proc WHERE pronamespace = "
                                                 "CAST(:s AS regnamespace)"), {"s": f'"{side_name}"'})).scalars().all()
            for function in functions:  # e.g. projection_checkpoint_moved, which the migrations make
                await conn.execute(text(f"DROP FUNCTION {function}"))
            await conn.execute(text(f'DROP SCHEMA "{side_name}"'))
    except DBAPIError as e:
        log.warning("rebuild: schema %s left in place (%s); drop it once nothing depends on it", side_name, e)


async def _swap(live: AsyncEngine, side: AsyncEngine, store: EventStore, projector: Projector, subjects: list[str],
                position: int, live_schema: str, side_name: str) -> tuple[int, int]:
    """One transaction: the live checkpoint locked, the rebuild brought up to it, the tables
    swapped. Returns (the checkpoint, events applied to bring the rebuild up to it)."""
    quoted = ", ".join(f'"{live_schema}"."{t.name}"' for t in projector.tables)
    async with live.begin() as conn:
        await conn.execute(text(f"SET LOCAL lock_timeout = '{int(LOCK_WAIT_SECONDS * 1000)}ms'"))
        # A rebuild that stops answering (a frozen process) lets go of its locks.
        await conn.execute(text(f"SET LOCAL idle_in_transaction_session_timeout = '{int(IDLE_LIMIT_SECONDS * 1000)}ms'"))
        # No migration while the tables are swapped (the lock `migrate` takes, taken first as
        # it does), and none since the rebuild began.
        await conn.execute(text("SELECT pg_advisory_xact_lock(hashtext(:s))"), {"s": f"runledger-migrate:{live_schema}"})
        await _same_version(conn, projector, live_schema)
        # The same order as a runner's batch: the checkpoint's row first, then the tables.
        checkpoint = await read_checkpoint(conn, projector.name, lock=True)
        await conn.execute(text(f"LOCK TABLE {quoted} IN ACCESS EXCLUSIVE MODE"))
        grants = await _owned_here(conn, projector, live_schema)
        tail = await _chase(store, side, projector, subjects, position, checkpoint)
        async with side.connect() as side_conn:
            rebuilt_at = await read_checkpoint(side_conn, projector.name)
        if rebuilt_at != checkpoint:  # cannot happen: the chase sets it; never swap a read model elsewhere
            raise RuntimeError(f"rebuild of {projector.name} reached {rebuilt_at}, the live checkpoint is {checkpoint}")
        for table in projector.tables:
            await conn.execute(text(f'DROP TABLE "{live_schema}"."{table.name}"'))
            await conn.execute(text(f'ALTER TABLE "{side_name}"."{table.name}" SET SCHEMA "{live_schema}"'))
        for grant in grants:  # made by `format` with quoted names, from the live tables' own grants
            await conn.execute(text(grant))
        # What the live projection recorded as passed over (a missed type among them) is
        # replaced by what the rebuild passed over, up to the same point.
        await conn.execute(text(f'DELETE FROM "{live_schema}".skipped_events WHERE projection = :p AND seq <= :s'),
                           {"p": projector.name, "s": checkpoint})
        await conn.execute(text(f'INSERT INTO "{live_schema}".skipped_events SELECT * FROM "{side_name}".skipped_events '
                                "WHERE projection = :p AND seq <= :s ON CONFLICT DO NOTHING"),
                           {"p": projector.name, "s": checkpoint})
    return checkpoint, tail
