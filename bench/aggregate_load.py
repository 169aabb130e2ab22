"""Loading a pool with a long history into an empty aggregate cache (after a restart): the whole
history, and from its snapshot plus the events after it.

    python bench/aggregate_load.py [--events 10000 50000] [--snapshot-every 1000]
"""

from __future__ import annotations

import argparse
import asyncio
import uuid
from datetime import UTC, datetime

from harness import bench_settings, now, publish_history, report, servers

from runledger.commands import work_pools as wp
from runledger.commands.events import EventEnvelope
from runledger.commands.messages import DecisionContext
from runledger.handlers.registry import AGGREGATE_KINDS
from runledger.infra.aggregates import AggregateRepository
from runledger.infra.event_store import EventStore
from runledger.infra.jetstream_setup import ensure_event_stream
from runledger.infra.nats_connection import connect
from runledger.infra.snapshots import SnapshotStore, ensure_snapshot_bucket


def pool_history(events: int) -> tuple[str, wp.WorkPool, list[EventEnvelope]]:
    """A pool of 20 queues whose queues are then updated (a poll's `last_polled`, say)."""
    ctx = DecisionContext(now=datetime.now(UTC))
    out: list[EventEnvelope] = []

    def add(decision) -> None:
        out.extend(EventEnvelope.wrap(e.aggregate_id, e.event, occurred=ctx.now, event_id=uuid.uuid4())
                   for e in decision.events)

    made = wp.decide_create_work_pool(wp.CreateWorkPool(name=f"big-{uuid.uuid4().hex[:6]}", type="process"),
                                      wp.WorkPoolNameClaim(), ctx)
    add(made)
    pool = made.result
    for q in range(20):
        d = wp.decide_create_work_queue(wp.CreateWorkQueue(work_pool_name=pool.name, name=f"q{q}"), pool, ctx)
        add(d)
        pool = d.result[0]
    for i in range(events - 21):
        cmd = wp.UpdateWorkQueue(work_pool_name=pool.name, work_queue_name=f"q{i % 20}", last_polled=datetime.now(UTC))
        d = wp.decide_update_work_queue(cmd, pool, ctx)
        add(d)
        pool = d.result[0]
    return str(pool.id), pool, out


async def run(args) -> list[tuple[str, str, str]]:
    rows = []
    with servers() as urls:
        settings = bench_settings(urls)
        nc = await connect(settings)
        try:
            js = nc.jetstream()
            await ensure_event_stream(js, settings)
            await ensure_snapshot_bucket(js, settings)
            store = EventStore(nc, settings)
            snapshots = SnapshotStore(js, settings)
            for n in args.events:
                pool_id, expected, history = pool_history(n)
                await publish_history(store, history)
                t = now()
                full = await AggregateRepository(store, AGGREGATE_KINDS).load(wp.WORK_POOL, pool_id)
                full_ms = (now() - t) * 1000
                # A service that loaded it once wrote a snapshot at its last event (in service the
                # tail after a snapshot is shorter than --snapshot-every events).
                writer = AggregateRepository(store, AGGREGATE_KINDS, snapshots=snapshots, snapshot_every=args.snapshot_every)
                await writer.load(wp.WORK_POOL, pool_id)
                await writer.flush_snapshots()
                t = now()
                fast = await AggregateRepository(store, AGGREGATE_KINDS, snapshots=snapshots,
                                                 snapshot_every=args.snapshot_every).load(wp.WORK_POOL, pool_id)
                snap_ms = (now() - t) * 1000
                assert full.state == fast.state == expected
                rows.append((f"cold load of a pool with {n:,} events: whole history / from its snapshot",
                             f"{full_ms:,.0f} ms / {snap_ms:,.1f} ms", ""))
        finally:
            await nc.close()
    return rows


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--events", type=int, nargs="+", default=[10_000, 50_000])
    p.add_argument("--snapshot-every", type=int, default=1000)
    args = p.parse_args()
    report("Aggregate load after a restart (bench/aggregate_load.py)", asyncio.run(run(args)))


if __name__ == "__main__":
    main()
