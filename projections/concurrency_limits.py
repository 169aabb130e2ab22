"""The global concurrency limits read model: its projector and the queries over it. Rows are
`ConcurrencyLimit` as stored in its events, and answers are `ConcurrencyLimit.reply()` of a
row: the same shape both ways."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, cast

from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncConnection

from runledger.commands import concurrency_limits as cl
from runledger.commands import queries as q
from runledger.commands.messages import Event

from .bulk_writes import Write, last_rows_writes, run_writes
from .tables import concurrency_limits

_LIMIT_EVENTS = frozenset({cl.ConcurrencyLimitCreated.event_type, cl.ConcurrencyLimitUpdated.event_type,
                           cl.ConcurrencyLimitSlotTaken.event_type, cl.ConcurrencyLimitSlotReleased.event_type})


class ConcurrencyLimitsProjector:
    """Reads payload dicts (`raw_payloads`): every event carries the whole limit, so the batch's
    last one per limit is its row (a deployment's limit changes at every claim and release)."""

    name = "concurrency_limits"
    tables = (concurrency_limits,)
    raw_payloads = True
    handles = frozenset({*_LIMIT_EVENTS, cl.ConcurrencyLimitDeleted.event_type})

    async def apply(self, conn: AsyncConnection, events: Sequence[tuple[str, str, Event | dict]]) -> None:
        await run_writes(conn, self.writes(events))

    def writes(self, events: Sequence[tuple[str, str, Event | dict]]) -> list[Write]:
        last: dict[str, dict[str, Any] | None] = {}
        for _, event_type, payload in cast(Sequence[tuple[str, str, dict[str, Any]]], events):
            limit = payload["limit"]
            last[limit["id"]] = limit if event_type in _LIMIT_EVENTS else None
        return last_rows_writes(concurrency_limits, last)


def limit_reply(row: Any) -> dict[str, Any]:
    return cl.ConcurrencyLimit.model_validate(dict(row._mapping)).reply()


async def get_concurrency_limit(conn: AsyncConnection, query: q.GetConcurrencyLimit) -> dict[str, Any]:
    row = (await conn.execute(select(concurrency_limits).where(concurrency_limits.c.id == query.id))).first()
    if row is None:
        raise cl.limit_not_found(query.id)
    return limit_reply(row)


async def get_concurrency_limit_by_name(conn: AsyncConnection, query: q.GetConcurrencyLimitByName) -> dict[str, Any]:
    row = (await conn.execute(select(concurrency_limits).where(concurrency_limits.c.name == query.name))).first()
    if row is None:
        raise cl.limit_not_found(query.name)
    return limit_reply(row)


async def list_concurrency_limits(conn: AsyncConnection, query: q.ListConcurrencyLimits) -> list[dict[str, Any]]:
    stmt = select(concurrency_limits).order_by(concurrency_limits.c.name, concurrency_limits.c.id)
    rows = await conn.execute(stmt.limit(query.limit).offset(query.offset))
    return [limit_reply(r) for r in rows]


async def count_concurrency_limits(conn: AsyncConnection, query: q.CountConcurrencyLimits) -> int:
    return (await conn.execute(select(func.count()).select_from(concurrency_limits))).scalar_one()


QUERIES = {
    "GetConcurrencyLimit": (q.GetConcurrencyLimit, get_concurrency_limit),
    "GetConcurrencyLimitByName": (q.GetConcurrencyLimitByName, get_concurrency_limit_by_name),
    "ListConcurrencyLimits": (q.ListConcurrencyLimits, list_concurrency_limits),
    "CountConcurrencyLimits": (q.CountConcurrencyLimits, count_concurrency_limits),
}
