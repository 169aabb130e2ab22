"""A query filter (`commands/queries.py`) as WHERE clauses: each field of the filter names the
column it matches, `any_` is IN, `all_` is containment (a jsonb list holding every value)."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel
from sqlalchemy import Table

from runledger.commands.queries import AllOf, AnyOf


def where_filter(stmt: Any, table: Table, f: BaseModel | None) -> Any:
    if f is None:
        return stmt
    for name in type(f).model_fields:
        match getattr(f, name):
            case AnyOf(any_=values) if values is not None:
                stmt = stmt.where(table.c[name].in_(values))
            case AllOf(all_=values) if values is not None:
                stmt = stmt.where(table.c[name].contains(values))
    return stmt
