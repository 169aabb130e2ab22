"""The query `ListTaskWorkers`: the task workers serving now, from the bucket their heartbeats
keep (infra/task_queues.py), not from a read model: presence is not history, so it is not in
the event log."""

from __future__ import annotations

import json
from collections.abc import Callable
from functools import partial
from typing import Any

from nats.js import JetStreamContext
from nats.js.errors import NoKeysError

from runledger.commands.queries import ListTaskWorkers
from runledger.infra.settings import Settings
from runledger.infra.task_queues import task_worker_bucket


async def list_task_workers(_conn: Any, query: ListTaskWorkers, *, js: JetStreamContext,
                            settings: Settings) -> list[dict[str, Any]]:
    """`{identifier, task_keys, timestamp}` of each worker, by identifier; those serving any of
    `query.task_keys` when given."""
    kv = await js.key_value(task_worker_bucket(settings))
    try:
        keys = await kv.keys()
    except NoKeysError:
        return []
    wanted = set(query.task_keys) if query.task_keys is not None else None
    workers = []
    for key in keys:
        entry = await kv.get(key)
        if not entry.value:
            continue
        worker = json.loads(entry.value)
        if wanted is None or wanted & set(worker.get("task_keys", [])):
            workers.append(worker)
    return sorted(workers, key=lambda w: w["identifier"])


def task_worker_queries(js: JetStreamContext, settings: Settings) -> dict[str, tuple[type[ListTaskWorkers],
                                                                                    Callable[..., Any]]]:
    return {"ListTaskWorkers": (ListTaskWorkers, partial(list_task_workers, js=js, settings=settings))}
