"""The read side's health, as the query `GetServiceHealth` answers it (and `runledger status`
shows it): each projection's checkpoint, how far the log goes, the projections stopped at an
event they cannot apply (projections/runner.py writes those to `projection_failures`), and on
a NATS cluster how the log is copied."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from functools import partial
from typing import Any

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncConnection

from runledger.commands.bounds import json_time
from runledger.commands.queries import Query

from .runner import read_failures
from .tables import projection_checkpoints


class GetServiceHealth(Query):
    """The read side's health: every projection's checkpoint, the event log's last stream
    sequence, the projections stalled at an event they cannot apply, and the log's copies
    (`replication`: None on one server)."""


_iso = json_time  # the replies' one way of writing a time


# The log's last sequence and its copies (EventStore.log_status).
LogStatus = Callable[[], Awaitable[tuple[int, dict[str, Any] | None]]]


async def service_health(conn: AsyncConnection, query: GetServiceHealth, *, projections: Sequence[str],
                         log_status: LogStatus | None = None,
                         lease_holder: Callable[[str], Awaitable[str | None]] | None = None) -> dict[str, Any]:
    rows = await conn.execute(select(projection_checkpoints.c.name, projection_checkpoints.c.last_seq))
    checkpoints = {r.name: r.last_seq for r in rows}
    failures = {f["projection"]: f for f in await read_failures(conn)}
    last, copies = await log_status() if log_status is not None else (None, None)
    stalled = [
        {"projection": f["projection"], "seq": f["seq"], "subject": f["subject"], "event_type": f["event_type"],
         "error": f["error"], "attempts": f["attempts"], "first_seen": _iso(f["first_seen"]),
         "last_seen": _iso(f["last_seen"])}
        for f in failures.values()
    ]
    out = []
    for name in sorted(set(projections) | set(failures)):
        checkpoint = checkpoints.get(name, 0)
        entry = {"name": name, "checkpoint": checkpoint,
                 "behind": max(0, last - checkpoint) if last is not None else None,
                 "stalled": name in failures}
        if lease_holder is not None:  # the process applying it (host:pid:tag), None: nobody
            entry["lease_holder"] = await lease_holder(f"projection.{name}")
        out.append(entry)
    return {"stream_last_seq": last, "projections": out, "stalled": stalled, "replication": copies}


def health_queries(projections: Sequence[str], log_status: LogStatus | None = None,
                   lease_holder: Callable[[str], Awaitable[str | None]] | None = None) -> dict:
    """The query registry entry (name -> (model, function)) for a service."""
    fn = partial(service_health, projections=list(projections), log_status=log_status, lease_holder=lease_holder)
    return {"GetServiceHealth": (GetServiceHealth, fn)}
