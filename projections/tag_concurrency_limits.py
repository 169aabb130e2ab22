"""The task tag concurrency limits read model: its projector and the queries over it. Rows are
`TagConcurrencyLimit` as its events carry it, and answers are `TagConcurrencyLimit.reply()` of
a row: the same shape both ways."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, cast

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncConnection

from runledger.commands import queries as q
from runledger.commands import tag_concurrency_limits as tcl
from runledger.commands.messages import Event

from .bulk_writes import Write, last_rows_writes, run_writes
from .tables import tag_concurrency_limits

_DELETED = tcl.TagConcurrencyLimitDeleted.event_type


class TagConcurrencyLimitsProjector:
    """Reads payload dicts (`raw_payloads`): every event carries the whole limit, so the batch's
    last one per limit is its row (a limit changes at every slot taken and given back)."""

    name = "tag_concurrency_limits"
    tables = (tag_concurrency_limits,)
    raw_payloads = True
    handles = frozenset({tcl.TagConcurrencyLimitCreated.event_type, tcl.TagConcurrencyLimitUpdated.event_type,
                         tcl.TagConcurrencyLimitReset.event_type, tcl.TagConcurrencyLimitSlotTaken.event_type,
                         tcl.TagConcurrencyLimitSlotReleased.event_type, _DELETED})

    async def apply(self, conn: AsyncConnection, events: Sequence[tuple[str, str, Event | dict]]) -> None:
        await run_writes(conn, self.writes(events))

    def writes(self, events: Sequence[tuple[str, str, Event | dict]]) -> list[Write]:
        last: dict[str, dict[str, Any] | None] = {}
        for _, event_type, payload in cast(Sequence[tuple[str, str, dict[str, Any]]], events):
            limit = payload["limit"]
            last[limit["id"]] = None if event_type == _DELETED else limit
        return last_rows_writes(tag_concurrency_limits, last)


def limit_reply(row: Any) -> dict[str, Any]:
    return tcl.TagConcurrencyLimit.model_validate(dict(row._mapping)).reply()


async def get_tag_concurrency_limit(conn: AsyncConnection, query: q.GetTagConcurrencyLimit) -> dict[str, Any]:
    stmt = select(tag_concurrency_limits).where(tag_concurrency_limits.c.tag == query.tag)
    row = (await conn.execute(stmt)).first()
    if row is None:
        raise tcl.limit_not_found()
    return limit_reply(row)


async def list_tag_concurrency_limits(conn: AsyncConnection, query: q.ListTagConcurrencyLimits) -> list[dict[str, Any]]:
    stmt = select(tag_concurrency_limits).order_by(tag_concurrency_limits.c.tag, tag_concurrency_limits.c.id)
    rows = await conn.execute(stmt.limit(query.limit).offset(query.offset))
    return [limit_reply(r) for r in rows]


QUERIES = {
    "GetTagConcurrencyLimit": (q.GetTagConcurrencyLimit, get_tag_concurrency_limit),
    "ListTagConcurrencyLimits": (q.ListTagConcurrencyLimits, list_tag_concurrency_limits),
}
