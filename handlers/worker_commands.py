"""The worker command table: what each command loads before its pure decider runs.

A worker command locks its worker alone (by pool and name), not its pool: heartbeats of a
pool's workers run side by side, and the rare one that changes the pool meets the pool's
other commands through the pool's expected sequence."""

from __future__ import annotations

from typing import Any

from runledger.commands import work_pools as wp
from runledger.commands import workers as wk
from runledger.commands.decisions import Decision
from runledger.commands.messages import DecisionContext
from runledger.infra.aggregates import AggregateKind

from .command_bus import AggregateKey, CommandSpec, Unit

# Every worker event but its deletion carries the whole worker: its last event is its state.
AGGREGATE_KINDS = [AggregateKind(wk.WORKER, lambda: None, wk.evolve, last_event_only=True)]


async def _pool_and_worker(unit: Unit, pool_name: str, name: str) -> tuple[wp.WorkPool | None, wk.Worker | None]:
    claim = await unit.load(wp.WORK_POOL_NAME, wp.name_aggregate_id(pool_name))
    if claim.work_pool_id is None:
        return None, None
    pool = await unit.load(wp.WORK_POOL, str(claim.work_pool_id))
    if pool is None:
        return None, None
    return pool, await unit.load(wk.WORKER, str(wk.worker_id(pool.id, name)))


async def worker_heartbeat(unit: Unit, cmd: wk.WorkerHeartbeat, ctx: DecisionContext) -> Decision:
    return wk.decide_heartbeat(cmd, *await _pool_and_worker(unit, cmd.work_pool_name, cmd.name), ctx)


async def mark_worker_offline(unit: Unit, cmd: wk.MarkWorkerOffline, ctx: DecisionContext) -> Decision:
    return wk.decide_mark_offline(cmd, *await _pool_and_worker(unit, cmd.work_pool_name, cmd.name), ctx)


async def delete_worker(unit: Unit, cmd: wk.DeleteWorker, ctx: DecisionContext) -> Decision:
    return wk.decide_delete_worker(cmd, *await _pool_and_worker(unit, cmd.work_pool_name, cmd.name), ctx)


def _by_worker(cmd: Any) -> list[AggregateKey]:
    return [(wk.WORKER, f"{cmd.work_pool_name}\0{cmd.name}")]


def _worker_reply(worker: wk.Worker | None) -> dict[str, Any] | None:
    return worker.reply() if worker is not None else None


COMMANDS = {
    "WorkerHeartbeat": CommandSpec(wk.WorkerHeartbeat, worker_heartbeat, _worker_reply, _by_worker),
    "MarkWorkerOffline": CommandSpec(wk.MarkWorkerOffline, mark_worker_offline, _worker_reply, _by_worker),
    "DeleteWorker": CommandSpec(wk.DeleteWorker, delete_worker, _worker_reply, _by_worker),
}
