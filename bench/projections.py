"""Projection figures: catch-up on a backlog, and the lag from command reply to read model.

    python bench/projections.py [--backlog 100000] [--rate 500] [--seconds 10]
"""

from __future__ import annotations

import argparse
import asyncio
import json

from harness import (
    bench_settings,
    now,
    percentile,
    publish_history,
    report,
    servers,
    service_process,
    synthetic_history,
)
from sqlalchemy import text

from runledger.handlers.registry import projectors
from runledger.infra.database import create_engine, migrate
from runledger.infra.event_store import EventStore
from runledger.infra.jetstream_setup import ensure_event_stream
from runledger.infra.nats_connection import connect
from runledger.projections.runner import ProjectionRunner
from runledger.projections.tables import MIGRATIONS


async def catch_up(urls, n: int) -> tuple[float, int]:
    settings = bench_settings(urls)
    nc = await connect(settings)
    await ensure_event_stream(nc.jetstream(), settings)
    store = EventStore(nc, settings)
    await publish_history(store, synthetic_history(n))
    last = await store.last_sequence()
    engine = create_engine(settings)
    await migrate(engine, settings.db_schema, MIGRATIONS)
    done = asyncio.Event()
    caught_up: set[str] = set()
    running = projectors()

    def applied(name: str, seq: int) -> None:
        """Caught up when every projection has applied the whole backlog (not the first)."""
        if seq >= last:
            caught_up.add(name)
            if len(caught_up) == len(running):
                done.set()

    runner = ProjectionRunner(nc, settings, engine, running, batch_size=settings.projection_batch_size,
                              on_applied=applied)
    t0 = now()
    await runner.start()
    await done.wait()
    elapsed = now() - t0
    await runner.stop()
    async with engine.connect() as conn:
        rows = (await conn.execute(text("SELECT count(*) FROM work_queues"))).scalar_one()
    await engine.dispose()
    await nc.close()
    return n / elapsed, rows


async def lag(urls, rate: float, seconds: float) -> tuple[list[float], list[float]]:
    """(lags until the work pools read model covers a command, lags until every projection's
    checkpoint does), in ms. The commands are queue creates: the work pools projection applies
    them; the others only move past them."""
    settings = bench_settings(urls)
    with service_process(settings):
        nc = await connect(bench_settings(urls, role="client"))
        engine = create_engine(settings, pool_size=1)

        async def cmd(name, body):
            reply = await nc.request(settings.command_subject(name), json.dumps(body).encode(), timeout=10)
            return json.loads(reply.data)

        for p in range(10):
            await cmd("CreateWorkPool", {"name": f"lag-{p}", "type": "process"})
        replied: list[tuple[int, float]] = []
        lags: list[float] = []
        lags_all: list[float] = []
        stop = asyncio.Event()
        names = [p.name for p in projectors()]

        async def watch() -> None:
            """Polls the checkpoints every millisecond; a command is visible once its read
            model's checkpoint covers it, and in every read model once the lowest one does."""
            pending = pending_all = 0
            async with engine.connect() as conn:
                while not stop.is_set() or pending_all < len(replied):
                    rows = dict((await conn.execute(text("SELECT name, last_seq FROM projection_checkpoints"))).all())
                    own = rows.get("work_pools", 0)
                    low = min(rows.get(n, 0) for n in names)
                    t = now()
                    while pending < len(replied) and replied[pending][0] <= own:
                        lags.append((t - replied[pending][1]) * 1000)
                        pending += 1
                    while pending_all < len(replied) and replied[pending_all][0] <= low:
                        lags_all.append((t - replied[pending_all][1]) * 1000)
                        pending_all += 1
                    await conn.commit()
                    await asyncio.sleep(0.001)

        refused: list[dict] = []

        async def one(i: int) -> None:
            out = await cmd("CreateWorkQueue", {"work_pool_name": f"lag-{i % 10}", "name": f"q{i}"})
            if not out["ok"]:  # e.g. lost its races on the pool too often: no lag to measure
                refused.append(out["error"])
                return
            replied.append((out["seq"], now()))

        watcher = asyncio.create_task(watch())
        tasks = []
        start = now()
        for i in range(int(rate * seconds)):
            await asyncio.sleep(max(0.0, start + i / rate - now()))
            tasks.append(asyncio.create_task(one(i)))
        await asyncio.gather(*tasks)
        replied.sort()
        stop.set()
        await watcher
        await engine.dispose()
        await nc.close()
    if refused:
        print(f"{len(refused)} of {len(tasks)} commands refused, first: {refused[0]}")
    return lags, lags_all


async def run(args):
    # Servers of their own each: the broker's permissions cover one namespace.
    with servers() as urls:
        rate, rows = await catch_up(urls, args.backlog)
    with servers() as urls:
        lags = await lag(urls, args.rate, args.seconds)
    return rate, rows, *lags


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--backlog", type=int, default=100_000)
    p.add_argument("--rate", type=float, default=500)
    p.add_argument("--seconds", type=float, default=10)
    args = p.parse_args()
    rate, rows, lags, lags_all = asyncio.run(run(args))
    report("Projections (bench/projections.py)", [
        (f"catch-up on a backlog of {args.backlog:,} events", f"{rate:,.0f} events/s ({rows:,} queue rows)", ">= 20,000 events/s"),
        (f"lag from command reply to read model at {args.rate:g} commands/s, p50", f"{percentile(lags, 50):.1f} ms", ""),
        (f"lag from command reply to read model at {args.rate:g} commands/s, p99", f"{percentile(lags, 99):.1f} ms", "<= 50 ms"),
        ("the same until every projection's checkpoint covers it, p50", f"{percentile(lags_all, 50):.1f} ms", ""),
        ("the same until every projection's checkpoint covers it, p99", f"{percentile(lags_all, 99):.1f} ms", ""),
    ])


if __name__ == "__main__":
    main()
