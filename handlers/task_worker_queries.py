"""Task-worker queries answered beside the read models: `ListTaskWorkers`, the workers serving
now, from the bucket their heartbeats keep (presence is not history, so it is not in the log);
`GetTaskRunResult`, a chunk of a large result from the result store (infra/task_queues.py)."""

from __future__ import annotations

import base64
import logging
from collections.abc import Callable
from functools import partial
from typing import Annotated, Any

from nats.js import JetStreamContext
from nats.js.errors import NotFoundError
from pydantic import BaseModel, Field, StringConstraints, TypeAdapter
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncConnection

from runledger.commands.bounds import StoredText, UtcDatetime, json_time
from runledger.commands.messages import not_found
from runledger.commands.queries import GetTaskRunResult, ListTaskWorkers
from runledger.infra.broker_auth import bound_task_worker_name
from runledger.infra.settings import Settings
from runledger.infra.task_queues import read_result_chunk, task_worker_bucket
from runledger.projections.tables import task_runs

log = logging.getLogger("runledger.task_workers")


class _Heartbeat(BaseModel):
    """A task worker's entry in the bucket, as `put_task_worker` writes it."""

    identifier: Annotated[StoredText, StringConstraints(min_length=1, max_length=2_000)]
    task_keys: Annotated[list[Annotated[StoredText, StringConstraints(max_length=2_000)]], Field(max_length=10_000)]
    timestamp: UtcDatetime


_ENTRY = TypeAdapter(_Heartbeat)


async def list_task_workers(_conn: Any, query: ListTaskWorkers, *, js: JetStreamContext,
                            settings: Settings) -> list[dict[str, Any]]:
    """`{identifier, task_keys, timestamp}` of each worker, by identifier; those serving any of
    `query.task_keys` when some are given (none, or an empty list: every worker). The
    connections sharing an identifier are one worker, as in Prefect: the union of their keys,
    at the newest of their heartbeats."""
    workers: dict[str, dict[str, Any]] = {}
    for key, value in await _live_entries(js, task_worker_bucket(settings)):
        try:
            entry = _ENTRY.validate_json(value)
        except ValueError:
            # Any task worker may write the bucket: an entry that is not a heartbeat (a bug, an
            # older or a hostile writer) is left out, never the whole answer.
            log.warning("ListTaskWorkers: an entry of the task-worker bucket that is no heartbeat left out: %s", key)
            continue
        worker: dict[str, Any] = {"identifier": entry.identifier, "task_keys": entry.task_keys,
                                  "timestamp": entry.timestamp}
        task_keys = list(entry.task_keys)
        bound = bound_task_worker_name(key.split(".", 1)[0])
        if bound is not None:  # written by a task worker bound to keys: only its keys count
            allowed = set(settings.task_worker_keys.get(bound, []))
            task_keys = [k for k in task_keys if k in allowed]
            if not task_keys:
                continue
        known = workers.get(worker["identifier"])
        if known is None:
            workers[worker["identifier"]] = {**worker, "task_keys": task_keys}
            continue
        known["task_keys"] = list(dict.fromkeys([*known["task_keys"], *task_keys]))
        known["timestamp"] = max(known["timestamp"], worker["timestamp"])
    wanted = set(query.task_keys or ())
    return sorted(({**w, "timestamp": json_time(w["timestamp"])} for w in workers.values()
                   if not wanted or wanted & set(w["task_keys"])), key=lambda w: w["identifier"])



async def _live_entries(js: JetStreamContext, bucket: str) -> list[tuple[str, bytes]]:
    """(key, value) of each live entry of a bucket, by key. Read from the bucket's stream: one
    request for its subjects, then each subject's last message (a deleted key's is a marker
    with no value; an entry that expires meanwhile is simply missing). Listed before through
    nats-py's `keys()` watcher and a `get` per key, a worker that served went missing once
    under load, in the full test suite; this has no watcher to end early and no `get` to race."""
    stream, prefix = f"KV_{bucket}", f"$KV.{bucket}."
    try:
        subjects = (await js.stream_info(stream, subjects_filter=f"{prefix}>")).state.subjects or {}
    except NotFoundError:
        return []
    entries = []
    for subject in sorted(subjects):
        try:
            msg = await js.get_last_msg(stream, subject)
        except NotFoundError:
            continue
        if msg.data and (msg.headers or {}).get("KV-Operation") not in ("DEL", "PURGE"):
            entries.append((subject.removeprefix(prefix), msg.data))
    return entries


async def get_task_run_result(conn: AsyncConnection, query: GetTaskRunResult, *, js: JetStreamContext,
                              settings: Settings) -> dict[str, Any]:
    """`{chunk, data}` (data: base64), with `chunks`, `size` and `sha256` when the reference was
    looked up in the read model."""
    if query.attempt is not None:
        try:
            chunk = await read_result_chunk(js, settings, str(query.id), str(query.attempt), query.chunk)
        except NotFoundError:
            raise not_found("No such chunk of a stored task result") from None
        return {"chunk": query.chunk, "data": base64.b64encode(chunk).decode()}
    row = (await conn.execute(select(task_runs.c.state).where(task_runs.c.id == query.id))).first()
    if row is None:
        raise not_found("Task run not found")
    data = (row.state or {}).get("data")
    if not isinstance(data, dict) or data.get("type") != "reference":
        raise not_found("Task run has no stored result (a small result is in its state's data)")
    if query.chunk >= int(data["chunks"]):
        raise not_found(f"The result has {data['chunks']} chunks")
    chunk = await read_result_chunk(js, settings, str(query.id), str(data["attempt"]), query.chunk)
    return {"chunk": query.chunk, "chunks": data["chunks"], "size": data["size"], "sha256": data["sha256"],
            "data": base64.b64encode(chunk).decode()}


def task_worker_queries(js: JetStreamContext, settings: Settings) -> dict[str, tuple[Any, Callable[..., Any]]]:
    return {"ListTaskWorkers": (ListTaskWorkers, partial(list_task_workers, js=js, settings=settings)),
            "GetTaskRunResult": (GetTaskRunResult, partial(get_task_run_result, js=js, settings=settings))}
