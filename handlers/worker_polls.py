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
    """Sends `RecordWorkQueuesPolled` commands without making anyone wait for them."""

    def __init__(self, send: Send):
        self.send = send
        self._pending: set[asyncio.Task] = set()

    def record(self, work_pool_name: str, queue_ids: list[Any]) -> None:
        if not queue_ids:
            return
        task = asyncio.create_task(self._record(work_pool_name, [str(i) for i in queue_ids]))
        self._pending.add(task)
        task.add_done_callback(self._pending.discard)

    async def _record(self, work_pool_name: str, queue_ids: list[str]) -> None:
        try:
            reply = await self.send("RecordWorkQueuesPolled", {"work_pool_name": work_pool_name,
                                                               "work_queue_ids": queue_ids})
            if not reply.get("ok"):
                log.warning("recording a poll of %s failed: %s", work_pool_name, reply.get("error"))
        except asyncio.CancelledError:
            raise
        except Exception as e:
            log.warning("recording a poll of %s failed: %s: %s", work_pool_name, type(e).__name__, e)

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
