"""Polls with their side effect: a worker's poll is answered from the read models, and then
recorded as a poll of the queues it read (`RecordWorkQueuesPolled`, one command and one event
per poll, whatever the number of queues, runs or deployments); a runner's poll of deployments
likewise, as a poll of those deployments (`RecordDeploymentsPolled`, whose command table is
here: commands/deployment_polls.py). The answer never waits for the record: the command is
sent in the background, and a failure to record is logged (the next poll records it again).

The query table (handlers/registry.py) holds the plain queries, for the broker contract; the
service serves these in their place.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

from sqlalchemy.ext.asyncio import AsyncConnection

from runledger.commands import deployment_polls as dpp
from runledger.commands import deployments as dp
from runledger.commands import queries as q
from runledger.commands.decisions import Decision
from runledger.commands.messages import DecisionContext
from runledger.infra.aggregates import AggregateKind
from runledger.projections import deployments as deployments_read_model
from runledger.projections import scheduled_runs

from .command_bus import AggregateKey, CommandSpec, Unit
from .work_pool_commands import pool_by_name

log = logging.getLogger("runledger.polls")

Send = Callable[[str, dict[str, Any]], Awaitable[dict[str, Any]]]


class PollRecorder:
    """Sends the poll records (`RecordWorkQueuesPolled`, `RecordDeploymentsPolled`) without
    making anyone wait for them. At most one record per pool (per set of deployments) is in
    flight: polls of it that arrive meanwhile are merged into the next one (their queues, at
    its time), so a flood of polls costs one command per pool at a time, never a task per
    poll."""

    def __init__(self, send: Send):
        self.send = send
        self._pending: set[asyncio.Task] = set()
        # (command, pool name or deployment set) -> ids polled since its record began
        self._waiting: dict[tuple[str, str], set[str]] = {}
        # Pools (and sets of deployments) one of whose polls since then found a deployment to
        # make READY.
        self._readying: set[tuple[str, str]] = set()

    def record(self, work_pool_name: str, queue_ids: list[Any], readies_deployments: bool = False) -> None:
        key = ("RecordWorkQueuesPolled", work_pool_name)
        if readies_deployments and queue_ids:
            self._readying.add(key)
        self._enqueue(key, queue_ids)

    def record_deployments(self, deployment_ids: list[Any], all_ready: bool = False) -> None:
        ids = sorted({str(i) for i in deployment_ids})
        key = ("RecordDeploymentsPolled", ",".join(ids))
        if not all_ready and ids:
            self._readying.add(key)
        self._enqueue(key, ids)

    def _enqueue(self, key: tuple[str, str], ids: list[Any]) -> None:
        if not ids:
            return
        queued = self._waiting.get(key)
        self._waiting[key] = (queued or set()) | {str(i) for i in ids}
        if queued is None:  # nothing in flight for this key: start one
            task = asyncio.create_task(self._record(key))
            self._pending.add(task)
            task.add_done_callback(self._pending.discard)

    async def _record(self, key: tuple[str, str]) -> None:
        command, name = key
        try:
            while ids := self._waiting.get(key):
                self._waiting[key] = set()
                body: dict[str, Any] = ({"work_pool_name": name, "work_queue_ids": sorted(ids)}
                                        if command == "RecordWorkQueuesPolled" else {"deployment_ids": sorted(ids)})
                readies = key in self._readying
                self._readying.discard(key)
                if command == "RecordWorkQueuesPolled":
                    if readies:
                        body["readies_deployments"] = True
                elif not readies:
                    body["all_ready"] = True
                try:
                    reply = await self.send(command, body)
                    if not reply.get("ok"):
                        log.warning("recording a poll of %s failed: %s", name, reply.get("error"))
                except asyncio.CancelledError:
                    raise
                except Exception as e:
                    log.warning("recording a poll of %s failed: %s: %s", name, type(e).__name__, e)
        finally:
            self._waiting.pop(key, None)

    async def drain(self, timeout: float = 5.0) -> None:
        """Wait (bounded) for the records sent so far: at shutdown, and in tests."""
        if self._pending:
            await asyncio.wait(set(self._pending), timeout=timeout)


def poll_queries(recorder: PollRecorder) -> dict[str, tuple[Any, Any]]:
    async def get_scheduled_flow_runs(conn: AsyncConnection, query: q.GetScheduledFlowRuns) -> list[dict[str, Any]]:
        answer = await scheduled_runs.poll(conn, query)
        recorder.record(answer.work_pool_name, answer.polled_queue_ids,
                        await deployments_read_model.any_not_ready_on(conn, answer.polled_queue_ids))
        return answer.items

    async def get_legacy_queue_runs(conn: AsyncConnection, query: q.GetLegacyQueueRuns) -> list[dict[str, Any]]:
        answer = await scheduled_runs.legacy_poll(conn, query)
        if answer.work_pool_name is not None:
            recorder.record(answer.work_pool_name, [answer.queue_id],
                            await deployments_read_model.any_not_ready_on(conn, [answer.queue_id]))
        return answer.runs

    async def get_scheduled_flow_runs_for_deployments(conn: AsyncConnection,
                                                      query: q.GetScheduledFlowRunsForDeployments
                                                      ) -> list[dict[str, Any]]:
        runs = await deployments_read_model.get_scheduled_flow_runs_for_deployments(conn, query)
        recorder.record_deployments(query.deployment_ids,
                                    await deployments_read_model.all_ready(conn, query.deployment_ids))
        return runs

    return {
        "GetScheduledFlowRuns": (q.GetScheduledFlowRuns, get_scheduled_flow_runs),
        "GetLegacyQueueRuns": (q.GetLegacyQueueRuns, get_legacy_queue_runs),
        "GetScheduledFlowRunsForDeployments": (q.GetScheduledFlowRunsForDeployments,
                                               get_scheduled_flow_runs_for_deployments),
    }


# ---------------------------------------------------------------------------------------------
# The commands that record a runner's poll, and the foreman's NOT_READY of deployments without a
# queue: both load the deployments they name (without a queue deleted since).

AGGREGATE_KINDS = [AggregateKind(dpp.DEPLOYMENT_POLL, lambda: None, dpp.evolve, last_event_only=True)]


async def _deployments(unit: Unit, ids: list[uuid.UUID]) -> dict[uuid.UUID, dp.Deployment | None]:
    unique = list(dict.fromkeys(ids))
    return dict(zip(unique, await asyncio.gather(*(unit.load(dp.DEPLOYMENT, str(i)) for i in unique)), strict=True))


async def record_deployment_polls(unit: Unit, cmd: dpp.RecordDeploymentsPolled, ctx: DecisionContext) -> Decision:
    await unit.load(dpp.DEPLOYMENT_POLL, dpp.poll_id(cmd.deployment_ids))  # for its expected sequence
    return dpp.decide_record_polls(cmd, await _deployments(unit, cmd.deployment_ids), ctx)


async def mark_queueless_not_ready(unit: Unit, cmd: dpp.MarkQueuelessDeploymentsNotReady,
                                   ctx: DecisionContext) -> Decision:
    await unit.load(dpp.DEPLOYMENT_POLL, dpp.poll_id(cmd.deployment_ids))  # for its expected sequence
    found = await _deployments(unit, cmd.deployment_ids)
    for i, deployment in found.items():  # a queue deleted since is none (WP-9)
        if deployment is not None and deployment.work_queue_id is not None:
            pool = await pool_by_name(unit, deployment.work_pool_name) if deployment.work_pool_name else None
            found[i] = dp.without_deleted_queue(deployment, pool)
    return dpp.decide_mark_queueless_not_ready(cmd, found, ctx)


def _by_poll(cmd: dpp.RecordDeploymentsPolled | dpp.MarkQueuelessDeploymentsNotReady) -> list[AggregateKey]:
    return [(dpp.DEPLOYMENT_POLL, dpp.poll_id(cmd.deployment_ids))]


def _nothing(_: Any) -> None:
    return None


COMMANDS = {
    "RecordDeploymentsPolled": CommandSpec(dpp.RecordDeploymentsPolled, record_deployment_polls, _nothing, _by_poll),
    "MarkQueuelessDeploymentsNotReady": CommandSpec(dpp.MarkQueuelessDeploymentsNotReady, mark_queueless_not_ready,
                                                    _nothing, _by_poll),
}
