"""Bulk writes for projections that read payload dicts (`raw_payloads`)."""

from __future__ import annotations

from typing import Any


def populate_sql(table: Any, conflict: str) -> str:
    """Insert (or replace) a batch of rows given as one JSON array of objects named like the
    columns: Postgres turns each object into a row (`jsonb_populate_recordset`), so Python
    neither validates nor converts a field (timestamps, ids, intervals, JSON columns)."""
    columns = [f'"{c.name}"' for c in table.columns]  # quoted: a limit's column `limit` is a keyword
    on_conflict = ("DO NOTHING" if conflict == "nothing" else
                   "DO UPDATE SET " + ", ".join(f"{c} = EXCLUDED.{c}" for c in columns if c != '"id"'))
    return (f"INSERT INTO {table.name} ({', '.join(columns)}) "
            f"SELECT {', '.join(columns)} FROM jsonb_populate_recordset(NULL::{table.name}, $1::jsonb) "
            f"ON CONFLICT (id) {on_conflict}")
