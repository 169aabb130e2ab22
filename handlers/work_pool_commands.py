"""The work-pool command table: what each command loads before its pure decider runs."""

from __future__ import annotations

import uuid
from collections.abc import Callable
from dataclasses import replace
from typing import Any

from pydantic import TypeAdapter

from runledger.commands import slots as sl
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


async def slot_counts(unit: Unit, pool: wp.WorkPool) -> sl.PoolSlots:
    """A pool's slot counts for a reply, as this instance last saw them (the claims' own view;
    the read model, which `GetWorkPool` answers from, may lag it a little). Not locked: an
    update writes nothing to them, so it neither waits for claims nor makes them wait."""
    return await unit.load(sl.POOL_SLOTS, sl.slots_id(pool.id)) or sl.PoolSlots(pool_id=pool.id)


async def _with_counts(unit: Unit, decision: Decision, pool: wp.WorkPool, limited: bool) -> Decision:
    """The decision, its result paired with the pool's counts for the reply (None when nothing
    in the reply has a limit, so nothing shows a count: no read)."""
    return replace(decision, result=(decision.result, await slot_counts(unit, pool) if limited else None))


async def create_work_pool(unit: Unit, cmd: wp.CreateWorkPool, ctx: DecisionContext) -> Decision:
    return wp.decide_create_work_pool(cmd, await _claim(unit, cmd.name), ctx)


async def update_work_pool(unit: Unit, cmd: wp.UpdateWorkPool, ctx: DecisionContext) -> Decision:
    decision = wp.decide_update_work_pool(cmd, await pool_by_name(unit, cmd.name), ctx)
    pool = decision.result
    return await _with_counts(unit, decision, pool, pool.concurrency_limit is not None)


async def _dropping_counts(unit: Unit, decision: Decision, pool: wp.WorkPool | None) -> Decision:
    """A queue's deletion drops its count from its pool's slot counts, in the same batch
    (`slots.with_queue_deleted`). The counts are locked as a claim locks them, so that claims
    of this instance decide after the deletion, against the counts it leaves."""
    if pool is None or not decision.events:
        return decision
    await unit.lock([(sl.POOL_SLOTS, sl.slots_id(pool.id))])
    slots = await unit.load(sl.POOL_SLOTS, sl.slots_id(pool.id)) or sl.PoolSlots(pool_id=pool.id)
    return sl.with_queue_deleted(decision, slots)


async def _update_queue(unit: Unit, decision: Decision) -> Decision:
    pool, queue = decision.result
    return await _with_counts(unit, decision, pool, queue.concurrency_limit is not None)


async def delete_work_pool(unit: Unit, cmd: wp.DeleteWorkPool, ctx: DecisionContext) -> Decision:
    return wp.decide_delete_work_pool(cmd, await pool_by_name(unit, cmd.name), ctx)


async def create_work_queue(unit: Unit, cmd: wp.CreateWorkQueue, ctx: DecisionContext) -> Decision:
    return wp.decide_create_work_queue(cmd, await pool_by_name(unit, cmd.work_pool_name), ctx)


async def update_work_queue(unit: Unit, cmd: wp.UpdateWorkQueue, ctx: DecisionContext) -> Decision:
    return await _update_queue(unit, wp.decide_update_work_queue(cmd, await pool_by_name(unit, cmd.work_pool_name), ctx))


async def delete_work_queue(unit: Unit, cmd: wp.DeleteWorkQueue, ctx: DecisionContext) -> Decision:
    pool = await pool_by_name(unit, cmd.work_pool_name)
    return await _dropping_counts(unit, wp.decide_delete_work_queue(cmd, pool, ctx), pool)


async def set_work_queue_priorities(unit: Unit, cmd: wp.SetWorkQueuePriorities, ctx: DecisionContext) -> Decision:
    decision = wp.decide_set_work_queue_priorities(cmd, await pool_by_name(unit, cmd.work_pool_name), ctx)
    pool = decision.result
    return await _with_counts(unit, decision, pool, any(q.concurrency_limit is not None for q in pool.queues.values()))


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
    """A new pool: no run holds a slot of it yet."""
    return wp.work_pool_reply(result)


def _queue_reply(result: tuple[wp.WorkPool, wp.WorkQueue]) -> dict[str, Any]:
    """A new queue: no run holds a slot of it yet."""
    pool, queue = result
    return wp.work_queue_reply(pool, queue)


def _counted_pool_reply(result: tuple[wp.WorkPool, sl.PoolSlots | None]) -> dict[str, Any]:
    pool, slots = result
    return wp.work_pool_reply(pool, slots.total if slots is not None else None)


def _counted_queue_reply(result: tuple[tuple[wp.WorkPool, wp.WorkQueue], sl.PoolSlots | None]) -> dict[str, Any]:
    """The queue's PENDING and RUNNING runs, as `GetWorkQueue` counts them: by id too, where
    `GetWorkQueueById` also counts CANCELLING runs (and a tag-based queue's filter matches),
    which the log's counts do not know."""
    (pool, queue), slots = result
    return wp.work_queue_reply(pool, queue, slots.of_queue(queue.id) if slots is not None else None)


def _queues_reply(result: tuple[wp.WorkPool, sl.PoolSlots | None]) -> list[dict[str, Any]]:
    pool, slots = result
    return [wp.work_queue_reply(pool, q, slots.of_queue(q.id) if slots is not None else None)
            for q in pool.queues_by_priority()]


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
        return await _update_queue(unit, wp.decide_update_work_queue_by_id(cmd, await pool_of_queue(unit, cmd.id), ctx))

    async def delete_by_id(unit: Unit, cmd: wp.DeleteWorkQueueById, ctx: DecisionContext) -> Decision:
        pool = await pool_of_queue(unit, cmd.id)
        return await _dropping_counts(unit, wp.decide_delete_work_queue_by_id(cmd, pool, ctx), pool)

    legacy = lambda cmd: [(wp.WORK_POOL_NAME, wp.LEGACY_POOL_NAME)]  # noqa: E731
    return {
        "CreateWorkPool": CommandSpec(wp.CreateWorkPool, create_work_pool, _pool_reply, _by_name("name")),
        "UpdateWorkPool": CommandSpec(wp.UpdateWorkPool, update_work_pool, _counted_pool_reply, _by_name("name")),
        "DeleteWorkPool": CommandSpec(wp.DeleteWorkPool, delete_work_pool, _nothing, _by_name("name")),
        "CreateWorkQueue": CommandSpec(wp.CreateWorkQueue, create_work_queue, _queue_reply, _by_name("work_pool_name")),
        "UpdateWorkQueue": CommandSpec(wp.UpdateWorkQueue, update_work_queue, _counted_queue_reply, _by_name("work_pool_name")),
        "DeleteWorkQueue": CommandSpec(wp.DeleteWorkQueue, delete_work_queue, _nothing, _by_name("work_pool_name")),
        "SetWorkQueuePriorities": CommandSpec(wp.SetWorkQueuePriorities, set_work_queue_priorities, _queues_reply,
                                              _by_name("work_pool_name")),
        "CreateLegacyWorkQueue": CommandSpec(wp.CreateLegacyWorkQueue, create_legacy_work_queue, _queue_reply, legacy),
        "UpdateWorkQueueById": CommandSpec(wp.UpdateWorkQueueById, update_by_id, _counted_queue_reply, _by_queue_id),
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
