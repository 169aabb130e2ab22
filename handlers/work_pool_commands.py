"""The work-pool command table: what each command loads before its pure decider runs."""

from __future__ import annotations

import uuid
from collections.abc import Callable
from typing import Any

from pydantic import TypeAdapter

from runledger.commands import work_pools as wp
from runledger.commands.decisions import Decision
from runledger.commands.messages import DecisionContext, Event
from runledger.infra.aggregates import AggregateKind, SnapshotCodec
from runledger.infra.event_store import EventStore
from runledger.infra.log_index import LogIndex

from .command_bus import CommandSpec, Unit

_POOL_STATE = TypeAdapter(wp.WorkPool)
# The pool snapshot: the `WorkPool` dataclass as JSON. Bump the version when its fields change
# (2: `online_workers`).
POOL_SNAPSHOTS = SnapshotCodec(
    version=2,
    dump=lambda pool: _POOL_STATE.dump_python(pool, mode="json"),
    load=_POOL_STATE.validate_python,
)

AGGREGATE_KINDS = [
    AggregateKind(wp.WORK_POOL, lambda: None, wp.evolve, snapshots=POOL_SNAPSHOTS),
    AggregateKind(wp.WORK_POOL_NAME, wp.WorkPoolNameClaim, wp.evolve_name, last_event_only=True),
]

async def _claim(unit: Unit, name: str) -> wp.WorkPoolNameClaim:
    return await unit.load(wp.WORK_POOL_NAME, wp.name_aggregate_id(name))


async def pool_by_name(unit: Unit, name: str) -> wp.WorkPool | None:
    """The pool that holds `name`, or None: its name claim, then the pool (both loaded for
    their expected sequences). Every command that names a pool finds it here."""
    claim = await _claim(unit, name)
    if claim.work_pool_id is None:
        return None
    return await unit.load(wp.WORK_POOL, str(claim.work_pool_id))


async def create_work_pool(unit: Unit, cmd: wp.CreateWorkPool, ctx: DecisionContext) -> Decision:
    return wp.decide_create_work_pool(cmd, await _claim(unit, cmd.name), ctx)


async def update_work_pool(unit: Unit, cmd: wp.UpdateWorkPool, ctx: DecisionContext) -> Decision:
    return wp.decide_update_work_pool(cmd, await pool_by_name(unit, cmd.name), ctx)


async def delete_work_pool(unit: Unit, cmd: wp.DeleteWorkPool, ctx: DecisionContext) -> Decision:
    return wp.decide_delete_work_pool(cmd, await pool_by_name(unit, cmd.name), ctx)


async def create_work_queue(unit: Unit, cmd: wp.CreateWorkQueue, ctx: DecisionContext) -> Decision:
    return wp.decide_create_work_queue(cmd, await pool_by_name(unit, cmd.work_pool_name), ctx)


async def update_work_queue(unit: Unit, cmd: wp.UpdateWorkQueue, ctx: DecisionContext) -> Decision:
    return wp.decide_update_work_queue(cmd, await pool_by_name(unit, cmd.work_pool_name), ctx)


async def delete_work_queue(unit: Unit, cmd: wp.DeleteWorkQueue, ctx: DecisionContext) -> Decision:
    return wp.decide_delete_work_queue(cmd, await pool_by_name(unit, cmd.work_pool_name), ctx)


async def set_work_queue_priorities(unit: Unit, cmd: wp.SetWorkQueuePriorities, ctx: DecisionContext) -> Decision:
    return wp.decide_set_work_queue_priorities(cmd, await pool_by_name(unit, cmd.work_pool_name), ctx)


async def create_legacy_work_queue(unit: Unit, cmd: wp.CreateLegacyWorkQueue, ctx: DecisionContext) -> Decision:
    claim = await _claim(unit, wp.LEGACY_POOL_NAME)
    pool = await unit.load(wp.WORK_POOL, str(claim.work_pool_id)) if claim.work_pool_id else None
    return wp.decide_create_legacy_work_queue(cmd, claim, pool, ctx)


async def record_polls(unit: Unit, cmd: wp.RecordWorkQueuesPolled, ctx: DecisionContext) -> Decision:
    return wp.decide_record_polls(cmd, await pool_by_name(unit, cmd.work_pool_name), ctx)


async def mark_work_pool_not_ready(unit: Unit, cmd: wp.MarkWorkPoolNotReady, ctx: DecisionContext) -> Decision:
    return wp.decide_mark_work_pool_not_ready(cmd, await pool_by_name(unit, cmd.work_pool_name), ctx)


async def mark_work_queues_not_ready(unit: Unit, cmd: wp.MarkWorkQueuesNotReady, ctx: DecisionContext) -> Decision:
    return wp.decide_mark_work_queues_not_ready(cmd, await pool_by_name(unit, cmd.work_pool_name), ctx)


async def mark_deployments_not_ready(unit: Unit, cmd: wp.MarkDeploymentsNotReady, ctx: DecisionContext) -> Decision:
    return wp.decide_mark_deployments_not_ready(cmd, await pool_by_name(unit, cmd.work_pool_name), ctx)


def _pool_reply(result: wp.WorkPool) -> dict[str, Any]:
    return wp.work_pool_reply(result)


def _queue_reply(result: tuple[wp.WorkPool, wp.WorkQueue]) -> dict[str, Any]:
    pool, queue = result
    return wp.work_queue_reply(pool, queue)


def _queues_reply(pool: wp.WorkPool) -> list[dict[str, Any]]:
    return [wp.work_queue_reply(pool, q) for q in pool.queues_by_priority()]


def _nothing(_: Any) -> None:
    return None


def queue_index(store: EventStore) -> LogIndex:
    """Queue id -> pool id, from the log: a pool's creation makes its default queue, and
    `WorkQueueCreated` the others, inside the pool's own events (a queue never moves)."""

    def queues_of(event: Event) -> list[str]:
        if isinstance(event, wp.WorkPoolCreated):
            return [str(event.default_queue.id)]
        if isinstance(event, wp.WorkQueueCreated):
            return [str(event.queue.id)]
        return []

    return LogIndex(store, wp.WORK_POOL, ["WorkPoolCreated", "WorkQueueCreated"], queues_of)


def _by_name(attr: str) -> Callable[[Any], list[tuple[str, str]]]:
    """Commands addressed by pool name lock that name: one at a time per pool."""
    return lambda cmd: [(wp.WORK_POOL_NAME, getattr(cmd, attr))]


def _by_queue_id(cmd: Any) -> list[tuple[str, str]]:
    return [(wp.WORK_QUEUE, str(cmd.id))]


def command_specs(queues: LogIndex | None) -> dict[str, CommandSpec]:
    """`queues`: where commands addressed by queue id find the queue's pool (None only where
    nothing is executed, e.g. for the contract's schemas)."""

    async def pool_of_queue(unit: Unit, queue_id: uuid.UUID) -> wp.WorkPool | None:
        assert queues is not None
        pool_id = await queues.lookup(str(queue_id))
        return await unit.load(wp.WORK_POOL, pool_id) if pool_id else None

    async def update_by_id(unit: Unit, cmd: wp.UpdateWorkQueueById, ctx: DecisionContext) -> Decision:
        return wp.decide_update_work_queue_by_id(cmd, await pool_of_queue(unit, cmd.id), ctx)

    async def delete_by_id(unit: Unit, cmd: wp.DeleteWorkQueueById, ctx: DecisionContext) -> Decision:
        return wp.decide_delete_work_queue_by_id(cmd, await pool_of_queue(unit, cmd.id), ctx)

    legacy = lambda cmd: [(wp.WORK_POOL_NAME, wp.LEGACY_POOL_NAME)]  # noqa: E731
    return {
        "CreateWorkPool": CommandSpec(wp.CreateWorkPool, create_work_pool, _pool_reply, _by_name("name")),
        "UpdateWorkPool": CommandSpec(wp.UpdateWorkPool, update_work_pool, _pool_reply, _by_name("name")),
        "DeleteWorkPool": CommandSpec(wp.DeleteWorkPool, delete_work_pool, _nothing, _by_name("name")),
        "CreateWorkQueue": CommandSpec(wp.CreateWorkQueue, create_work_queue, _queue_reply, _by_name("work_pool_name")),
        "UpdateWorkQueue": CommandSpec(wp.UpdateWorkQueue, update_work_queue, _queue_reply, _by_name("work_pool_name")),
        "DeleteWorkQueue": CommandSpec(wp.DeleteWorkQueue, delete_work_queue, _nothing, _by_name("work_pool_name")),
        "SetWorkQueuePriorities": CommandSpec(wp.SetWorkQueuePriorities, set_work_queue_priorities, _queues_reply,
                                              _by_name("work_pool_name")),
        "CreateLegacyWorkQueue": CommandSpec(wp.CreateLegacyWorkQueue, create_legacy_work_queue, _queue_reply, legacy),
        "UpdateWorkQueueById": CommandSpec(wp.UpdateWorkQueueById, update_by_id, _queue_reply, _by_queue_id),
        "DeleteWorkQueueById": CommandSpec(wp.DeleteWorkQueueById, delete_by_id, _nothing, _by_queue_id),
        "RecordWorkQueuesPolled": CommandSpec(wp.RecordWorkQueuesPolled, record_polls, _nothing,
                                              _by_name("work_pool_name")),
        "MarkWorkPoolNotReady": CommandSpec(wp.MarkWorkPoolNotReady, mark_work_pool_not_ready, _nothing,
                                            _by_name("work_pool_name")),
        "MarkWorkQueuesNotReady": CommandSpec(wp.MarkWorkQueuesNotReady, mark_work_queues_not_ready, _nothing,
                                              _by_name("work_pool_name")),
        "MarkDeploymentsNotReady": CommandSpec(wp.MarkDeploymentsNotReady, mark_deployments_not_ready, _nothing,
                                               _by_name("work_pool_name")),
    }
