"""Bulk writes for projections that read payload dicts (`raw_payloads`)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from functools import cache
from typing import Any

from pydantic import BaseModel
from pydantic_core import to_json
from sqlalchemy.ext.asyncio import AsyncConnection

from runledger.infra.database import asyncpg_connection


def model_defaults(model: type[BaseModel]) -> dict[str, Any]:
    """Each optional field's default as JSON, as the model fills it in: what a row written
    from an event stored before the field existed gets for it."""
    defaults = {name: field.get_default(call_default_factory=True) for name, field in model.model_fields.items()
                if not field.is_required()}
    return model.model_construct(**defaults).model_dump(mode="json", include=set(defaults))


def json_param(rows: Any) -> str:
    """Rows (payload dicts, as read from the log) as one JSON text for a `$1::jsonb` parameter.
    Made by pydantic-core: 2.7 times as fast as `json.dumps` on task runs' rows, which was 5 %
    of the service's CPU at task-run rates."""
    return to_json(rows).decode()


@cache
def populate_sql(table: Any, conflict: str, kept_null: tuple[str, ...] = ()) -> str:
    """Insert (or replace) a batch of rows given as one JSON array of objects named like the
    columns: Postgres turns each object into a row (`jsonb_populate_recordset`), so Python
    neither validates nor converts a field (timestamps, ids, intervals, JSON columns).
    `kept_null`: columns a replaced row keeps once they are null (`_on_conflict`)."""
    columns = _quoted_columns(table)
    return (f"INSERT INTO {table.name} ({', '.join(columns)}) "
            f"SELECT {', '.join(columns)} FROM jsonb_populate_recordset(NULL::{table.name}, $1::jsonb) "
            f"{_on_conflict(table, columns, conflict, kept_null)}")


def _quoted_columns(table: Any) -> list[str]:
    return [f'"{c.name}"' for c in table.columns]  # quoted: a limit's column `limit` is a keyword


def _on_conflict(table: Any, columns: list[str], conflict: str, kept_null: tuple[str, ...] = ()) -> str:
    """`nothing`: a row already there stays; `update`: it is replaced, but a column of
    `kept_null` that the row holds null stays null (a value the read model cleared, which the
    events written before that do not know: a deleted queue's runs, WP-9)."""
    if conflict == "nothing":
        return "ON CONFLICT (id) DO NOTHING"
    kept = {f'"{name}"' for name in kept_null}

    def value(c: str) -> str:
        return f"CASE WHEN {table.name}.{c} IS NULL THEN NULL ELSE EXCLUDED.{c} END" if c in kept else f"EXCLUDED.{c}"

    return "ON CONFLICT (id) DO UPDATE SET " + ", ".join(f"{c} = {value(c)}" for c in columns if c != '"id"')


Write = tuple[str, tuple[Any, ...]]
"""One statement of a batch and its arguments ($1, $2, … in order)."""


def last_rows_writes(table: Any, last: Mapping[str, dict[str, Any] | None]) -> list[Write]:
    """Each row's last value in a batch, by id: None deletes the row, a dict (named like the
    columns) replaces it. The two statements touch different rows (a row is either gone or
    kept), so they may run as one (`Projector.writes`)."""
    gone = [row_id for row_id, row in last.items() if row is None]
    rows = [row for row in last.values() if row is not None]
    writes: list[Write] = []
    if gone:
        writes.append((f"DELETE FROM {table.name} WHERE id = ANY($1::uuid[])", (gone,)))
    if rows:
        writes.append((populate_sql(table, "update"), (json_param(rows),)))
    return writes


def runs_with_states_writes(runs: Any, states_table: Any, run_column: str, defaults: Mapping[str, Any],
                            last: Mapping[str, dict[str, Any] | None],
                            states: Mapping[str, dict[str, Any]], kept_null: tuple[str, ...] = ()) -> list[Write]:
    """A run read model's batch (flow runs, task runs): each run's last value (None: deleted,
    its states with it; a dict: its row, `defaults` filling the fields an older event lacks)
    and the states written (rows of `states_table`, whose `run_column` names their run). The
    caller leaves out the states of runs the batch deletes, so the statements touch disjoint
    rows and may run as one (`Projector.writes`)."""
    writes = _runs_gone_writes(runs, states_table, run_column, [run_id for run_id, run in last.items() if run is None])
    if states:
        writes.append((populate_sql(states_table, "nothing"), (json_param(list(states.values())),)))
    rows = [{**defaults, **run} for run in last.values() if run is not None]
    if rows:
        writes.append((populate_sql(runs, "update", kept_null), (json_param(rows),)))
    return writes


def _runs_gone_writes(runs: Any, states_table: Any, run_column: str, gone: list[str]) -> list[Write]:
    """The runs a batch deletes, with their states."""
    if not gone:
        return []
    return [(f"DELETE FROM {states_table.name} WHERE {run_column} = ANY($1::uuid[])", (gone,)),
            (f"DELETE FROM {runs.name} WHERE id = ANY($1::uuid[])", (gone,))]


class SharedArgument(str):
    """An argument that several writes of one batch pass (the same object): sent once, as one
    parameter, so that Postgres parses it once (`apply_in_one_statement`)."""

    __slots__ = ()


def envelope_rows_sql(table: Any, conflict: str, row: str, *, base: str = "NULL", where: str = "",
                      columns: tuple[tuple[str, str], ...] = (), kept_null: tuple[str, ...] = ()) -> str:
    """Like `populate_sql`, from events as stored: `$1` is a JSON array of event envelopes,
    `$2` the positions (from 1) of those to write; `row` picks one row's object out of an
    envelope `e.v` (e.g. `e.v->'payload'->'run'`), `base` is the record whose values fill
    the columns the object lacks, and `columns` gives some columns from an expression of their
    own (name, SQL) instead. Neither merges JSON per row: that had made Postgres's part cost
    more than the service saved."""
    return _envelope_rows_sql(table, conflict, row, base, where, columns, kept_null)


@cache
def _envelope_rows_sql(table: Any, conflict: str, row: str, base: str, where: str,
                       columns: tuple[tuple[str, str], ...], kept_null: tuple[str, ...]) -> str:
    given = dict(columns)
    quoted = _quoted_columns(table)
    values = [given.get(c.name, f'r.{q}') for c, q in zip(table.columns, quoted, strict=True)]
    return (f"INSERT INTO {table.name} ({', '.join(quoted)}) "
            f"SELECT {', '.join(values)} "
            f"FROM jsonb_array_elements($1::jsonb) WITH ORDINALITY AS e(v, n), "
            f"jsonb_populate_record({base}, {row}) AS r "
            f"WHERE e.n = ANY($2::int[]){' AND ' + where if where else ''} "
            f"{_on_conflict(table, quoted, conflict, kept_null)}")


def envelopes_param(envelopes: Sequence[bytes]) -> SharedArgument:
    """Events as stored, as one JSON array for a `$1::jsonb` parameter: their bytes joined,
    nothing parsed or encoded."""
    return SharedArgument((b"[" + b",".join(envelopes) + b"]").decode())


StoredEvent = tuple[str, str, bytes]
"""(aggregate id, event type, the envelope's JSON as stored): what `raw_writes` reads."""


def runs_with_states_envelope_writes(runs: Any, states_table: Any, run_column: str, defaults_json: str,
                                     events: Sequence[StoredEvent], run_events: frozenset[str],
                                     state_events: frozenset[str], deleted_event: str,
                                     kept_null: tuple[str, ...] = ()) -> list[Write]:
    """The writes of `runs_with_states_writes` for the same batch, with Postgres reading each
    run's row (`payload.run`) and its state out of the events as stored, sent once for both
    tables: the service neither parses an event nor encodes a row, which was about a ninth of
    its CPU while it scheduled runs. Every event of `run_events` carries its whole run, whose
    id is the event's aggregate id; `deleted_event` deletes the run it names so.
    `defaults_json`: the defaults as one JSON object (`json_param`)."""
    envelopes: list[bytes] = []
    last: dict[str, int | None] = {}  # a run's last envelope (its position from 1), None: deleted
    states: list[tuple[str, int]] = []
    for run_id, event_type, data in events:
        if event_type in run_events:
            envelopes.append(data)
            last[run_id] = len(envelopes)
            if event_type in state_events:
                states.append((run_id, len(envelopes)))
        elif event_type == deleted_event:
            last[run_id] = None
            states = [s for s in states if s[0] != run_id]
    writes = _runs_gone_writes(runs, states_table, run_column, [run_id for run_id, at in last.items() if at is None])
    if not envelopes:
        return writes
    shared = envelopes_param(envelopes)
    run = "e.v->'payload'->'run'"
    if states:
        writes.append((envelope_rows_sql(
            states_table, "nothing", f"{run}->'state'", base=f"NULL::{states_table.name}",
            where=f"jsonb_typeof({run}->'state') = 'object'",
            columns=((run_column, f"({run}->>'id')::uuid"),)), (shared, [at for _, at in states])))
    rows = [at for at in last.values() if at is not None]
    if rows:
        writes.append((envelope_rows_sql(runs, "update", run,
                                         base=f"(SELECT jsonb_populate_record(NULL::{runs.name}, $3::jsonb))",
                                         kept_null=kept_null),
                       (shared, rows, defaults_json)))
    return writes


async def run_writes(conn: AsyncConnection, writes: Sequence[Write]) -> None:
    """Run a batch's statements one after the other, in `conn`'s transaction."""
    driver = await asyncpg_connection(conn)
    for sql, args in writes:
        await driver.execute(sql, *args)
