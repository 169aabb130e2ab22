"""A query filter (`commands/queries.py`) as WHERE clauses: each field of the filter names the
column it matches, `any_` is IN, `all_` is containment (a jsonb list holding every value); a
time range is applied by `where_time_range`, field by field."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel
from sqlalchemy import Table

from runledger.commands.queries import AllOf, AnyOf, TimeRange


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


def where_time_range(stmt: Any, column: Any, r: TimeRange | None) -> Any:
    if r is None:
        return stmt
    if r.after_ is not None:
        stmt = stmt.where(column >= r.after_)
    if r.before_ is not None:
        stmt = stmt.where(column <= r.before_)
    if r.is_null_ is not None:
        stmt = stmt.where(column.is_(None) if r.is_null_ else column.is_not(None))
    return stmt
