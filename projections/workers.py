"""The workers read model: one row per worker, as its last event carries it; the queries over
it (`ListWorkers`, `GetWorker`). A pool's deletion takes its workers with it."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from sqlalchemy import bindparam, delete, select
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.ext.asyncio import AsyncConnection

from runledger.commands import queries as q
from runledger.commands import work_pools as wp
from runledger.commands import workers as wk
from runledger.commands.messages import Event

from .tables import work_pools, workers

_UPSERT = insert(workers).on_conflict_do_update(
    index_elements=["id"], set_={c.name: insert(workers).excluded[c.name] for c in workers.columns if c.name != "id"})


class WorkersProjector:
    name = "workers"
    tables = (workers,)
    raw_payloads = False
    # Worker events only: one aggregate type, so its consumer reads one subject filter (a
    # consumer of several is much slower, projections/runner.py). A deleted pool's workers stay
    # in the table unread: every read finds workers by their pool's current id.
    handles = frozenset({wk.WorkerHeartbeatRecorded.event_type, wk.WorkerHeartbeatRenewed.event_type,
                         wk.WorkerWentOffline.event_type,
                         wk.WorkerDeleted.event_type})

    async def apply(self, conn: AsyncConnection, events: Sequence[tuple[str, str, Event | dict]]) -> None:
        # Each worker's last event in the batch decides its row (heartbeats come in floods).
        last: dict[Any, wk.Worker | None] = {}
        for _, _, event in events:
            if isinstance(event, wk.WorkerHeartbeatRecorded | wk.WorkerHeartbeatRenewed | wk.WorkerWentOffline):
                last[event.worker.id] = event.worker
            elif isinstance(event, wk.WorkerDeleted):
                last[event.worker_id] = None
        gone = [i for i, w in last.items() if w is None]
        if gone:
            await conn.execute(delete(workers).where(workers.c.id.in_(gone)))
        rows = [w.model_dump() for w in last.values() if w is not None]
        if rows:
            await conn.execute(_UPSERT, rows)


_POOL_ID = select(work_pools.c.id).where(work_pools.c.name == bindparam("name"))


async def _pool_id(conn: AsyncConnection, name: str) -> Any:
    pool_id = (await conn.execute(_POOL_ID, {"name": name})).scalar_one_or_none()
    if pool_id is None:
        raise wp.pool_not_found(name)
    return pool_id


def worker_reply(row: Any) -> dict[str, Any]:
    return wk.Worker.model_validate(dict(row._mapping)).reply()


async def list_workers(conn: AsyncConnection, query: q.ListWorkers) -> list[dict[str, Any]]:
    stmt = select(workers).where(workers.c.work_pool_id == await _pool_id(conn, query.work_pool_name))
    f = query.workers
    if f is not None and f.status is not None and f.status.any_ is not None:
        stmt = stmt.where(workers.c.status.in_([s.value for s in f.status.any_]))
    if f is not None and f.last_heartbeat_time is not None:
        if f.last_heartbeat_time.before_ is not None:
            stmt = stmt.where(workers.c.last_heartbeat_time <= f.last_heartbeat_time.before_)
        if f.last_heartbeat_time.after_ is not None:
            stmt = stmt.where(workers.c.last_heartbeat_time >= f.last_heartbeat_time.after_)
    stmt = stmt.order_by(workers.c.last_heartbeat_time.desc(), workers.c.id).limit(query.limit).offset(query.offset)
    return [worker_reply(r) for r in await conn.execute(stmt)]


async def get_worker(conn: AsyncConnection, query: q.GetWorker) -> dict[str, Any]:
    pool_id = await _pool_id(conn, query.work_pool_name)
    row = (await conn.execute(select(workers).where(workers.c.id == wk.worker_id(pool_id, query.name)))).first()
    if row is None:
        raise wk.worker_not_found()
    return worker_reply(row)


QUERIES = {
    "ListWorkers": (q.ListWorkers, list_workers),
    "GetWorker": (q.GetWorker, get_worker),
}
