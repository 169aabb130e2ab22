"""The flows read model: its projector and the queries over it. Rows are `Flow` as stored
in `FlowCreated`, and answers are `Flow.reply()` of a row: the same shape both ways."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from sqlalchemy import delete, func, select
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.ext.asyncio import AsyncConnection

from runledger.commands import flows as fl
from runledger.commands import queries as q
from runledger.commands.messages import Event, not_found

from .filters import where_filter
from .tables import flows


class FlowsProjector:
    name = "flows"
    tables = (flows,)
    raw_payloads = False
    handles = frozenset({fl.FlowCreated.event_type, fl.FlowDeleted.event_type})

    async def apply(self, conn: AsyncConnection, events: Sequence[tuple[str, str, Event | dict]]) -> None:
        for _, _, event in events:
            if isinstance(event, fl.FlowCreated):
                row = event.flow.model_dump()
                stmt = insert(flows).values(**row)
                await conn.execute(stmt.on_conflict_do_update(index_elements=["id"], set_=row))
            elif isinstance(event, fl.FlowDeleted):
                await conn.execute(delete(flows).where(flows.c.id == event.flow_id))


def flow_reply(row: Any) -> dict[str, Any]:
    return fl.Flow.model_validate(dict(row._mapping)).reply()


def _flow_filter(stmt, f: q.FlowFilter | None):
    return where_filter(stmt, flows, f)


async def get_flow(conn: AsyncConnection, query: q.GetFlow) -> dict[str, Any]:
    row = (await conn.execute(select(flows).where(flows.c.id == query.id))).first()
    if row is None:
        raise fl.flow_not_found(query.id)
    return flow_reply(row)


async def get_flow_by_name(conn: AsyncConnection, query: q.GetFlowByName) -> dict[str, Any]:
    row = (await conn.execute(select(flows).where(flows.c.name == query.name))).first()
    if row is None:
        raise not_found(f"Flow {query.name!r} not found.")
    return flow_reply(row)


async def list_flows(conn: AsyncConnection, query: q.ListFlows) -> list[dict[str, Any]]:
    stmt = _flow_filter(select(flows), query.flows).order_by(flows.c.name, flows.c.id)
    rows = await conn.execute(stmt.limit(query.limit).offset(query.offset))
    return [flow_reply(r) for r in rows]


async def count_flows(conn: AsyncConnection, query: q.CountFlows) -> int:
    return (await conn.execute(_flow_filter(select(func.count()).select_from(flows), query.flows))).scalar_one()


QUERIES = {
    "GetFlow": (q.GetFlow, get_flow),
    "GetFlowByName": (q.GetFlowByName, get_flow_by_name),
    "ListFlows": (q.ListFlows, list_flows),
    "CountFlows": (q.CountFlows, count_flows),
}
