"""The variables read model: its projector and the queries over it. Rows are `Variable` as
stored in its events, and answers are `Variable.reply()` of a row: the same shape both ways.
Parameter hydration (`workspace_variable`, BEHAVIOUR DP-13) reads a variable by name here."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from sqlalchemy import delete, func, select
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.ext.asyncio import AsyncConnection

from runledger.commands import queries as q
from runledger.commands import variables as va
from runledger.commands.messages import Event

from .filters import where_filter
from .tables import variables


class VariablesProjector:
    name = "variables"
    tables = (variables,)
    raw_payloads = False
    handles = frozenset({va.VariableCreated.event_type, va.VariableUpdated.event_type, va.VariableDeleted.event_type})

    async def apply(self, conn: AsyncConnection, events: Sequence[tuple[str, str, Event | dict]]) -> None:
        for _, _, event in events:
            if isinstance(event, va.VariableCreated | va.VariableUpdated):
                row = event.variable.model_dump()
                stmt = insert(variables).values(**row)
                await conn.execute(stmt.on_conflict_do_update(index_elements=["id"], set_=row))
            elif isinstance(event, va.VariableDeleted):
                await conn.execute(delete(variables).where(variables.c.id == event.variable.id))


def variable_reply(row: Any) -> dict[str, Any]:
    return va.Variable.model_validate(dict(row._mapping)).reply()


def _variable_filter(stmt, f: q.VariableFilter | None):
    stmt = where_filter(stmt, variables, f)
    if f is not None and f.name is not None and f.name.like_:
        stmt = stmt.where(variables.c.name.ilike(f"%{f.name.like_}%"))
    return stmt


async def get_variable(conn: AsyncConnection, query: q.GetVariable) -> dict[str, Any]:
    row = (await conn.execute(select(variables).where(variables.c.id == query.id))).first()
    if row is None:
        raise va.variable_not_found(query.id)
    return variable_reply(row)


async def get_variable_by_name(conn: AsyncConnection, query: q.GetVariableByName) -> dict[str, Any]:
    row = (await conn.execute(select(variables).where(variables.c.name == query.name))).first()
    if row is None:
        raise va.variable_not_found(query.name)
    return variable_reply(row)


async def list_variables(conn: AsyncConnection, query: q.ListVariables) -> list[dict[str, Any]]:
    stmt = _variable_filter(select(variables), query.variables).order_by(variables.c.name, variables.c.id)
    rows = await conn.execute(stmt.limit(query.limit).offset(query.offset))
    return [variable_reply(r) for r in rows]


async def count_variables(conn: AsyncConnection, query: q.CountVariables) -> int:
    stmt = _variable_filter(select(func.count()).select_from(variables), query.variables)
    return (await conn.execute(stmt)).scalar_one()


QUERIES = {
    "GetVariable": (q.GetVariable, get_variable),
    "GetVariableByName": (q.GetVariableByName, get_variable_by_name),
    "ListVariables": (q.ListVariables, list_variables),
    "CountVariables": (q.CountVariables, count_variables),
}
