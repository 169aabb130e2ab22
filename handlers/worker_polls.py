"""Polls with their side effect: a worker's poll is answered from the read models, and then
recorded as a poll of the queues it read (`RecordWorkQueuesPolled`, one command and one event
per poll, whatever the number of queues, runs or deployments). The answer never waits for
the record: the command is sent in the background, and a failure to record is logged (the
worker's next poll records it again).

The query table (handlers/registry.py) holds the plain queries, for the broker contract; the
service serves these in their place.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from sqlalchemy.ext.asyncio import AsyncConnection

from runledger.commands import queries as q
from runledger.projections import scheduled_runs

log = logging.getLogger("runledger.polls")

Send = Callable[[str, dict[str, Any]], Awaitable[dict[str, Any]]]


class PollRecorder:
    """Sends `RecordWorkQueuesPolled` commands without making anyone wait for them. At most one
    record per pool is in flight: polls of a pool that arrive meanwhile are merged into the
    next one (their queues, at its time), so a flood of polls costs one command per pool at a
    time, never a task per poll."""

    def __init__(self, send: Send):
        self.send = send
        self._pending: set[asyncio.Task] = set()
        self._waiting: dict[str, set[str]] = {}  # pool name -> queues polled since its record began

    def record(self, work_pool_name: str, queue_ids: list[Any]) -> None:
        if not queue_ids:
            return
        queued = self._waiting.get(work_pool_name)
        self._waiting[work_pool_name] = (queued or set()) | {str(i) for i in queue_ids}
        if queued is None:  # nothing in flight for this pool: start one
            task = asyncio.create_task(self._record(work_pool_name))
            self._pending.add(task)
            task.add_done_callback(self._pending.discard)

    async def _record(self, work_pool_name: str) -> None:
        try:
            while queue_ids := self._waiting.get(work_pool_name):
                self._waiting[work_pool_name] = set()
                try:
                    reply = await self.send("RecordWorkQueuesPolled", {"work_pool_name": work_pool_name,
                                                                       "work_queue_ids": sorted(queue_ids)})
                    if not reply.get("ok"):
                        log.warning("recording a poll of %s failed: %s", work_pool_name, reply.get("error"))
                except asyncio.CancelledError:
                    raise
                except Exception as e:
                    log.warning("recording a poll of %s failed: %s: %s", work_pool_name, type(e).__name__, e)
        finally:
            self._waiting.pop(work_pool_name, None)

    async def drain(self, timeout: float = 5.0) -> None:
        """Wait (bounded) for the records sent so far: at shutdown, and in tests."""
        if self._pending:
            await asyncio.wait(set(self._pending), timeout=timeout)


def poll_queries(recorder: PollRecorder) -> dict[str, tuple[Any, Any]]:
    async def get_scheduled_flow_runs(conn: AsyncConnection, query: q.GetScheduledFlowRuns) -> list[dict[str, Any]]:
        answer = await scheduled_runs.poll(conn, query)
        recorder.record(answer.work_pool_name, answer.polled_queue_ids)
        return answer.items

    async def get_legacy_queue_runs(conn: AsyncConnection, query: q.GetLegacyQueueRuns) -> list[dict[str, Any]]:
        answer = await scheduled_runs.legacy_poll(conn, query)
        if answer.work_pool_name is not None:
            recorder.record(answer.work_pool_name, [answer.queue_id])
        return answer.runs

    return {
        "GetScheduledFlowRuns": (q.GetScheduledFlowRuns, get_scheduled_flow_runs),
        "GetLegacyQueueRuns": (q.GetLegacyQueueRuns, get_legacy_queue_runs),
    }
