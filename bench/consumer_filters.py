"""What a projection's consumer filter costs nats-server 2.15: one consumer with several filter
subjects (a projection of several aggregate types, bound to its own subjects) against one that
reads the whole log, (1) catching up on a backlog where its events are many and each has a
subject of its own (a task run is a subject), (2) at the tail, where its events are rare among
others. The reason `ProjectionRunner.consumer_filter` reads the whole log only to catch up.
(3) What `runledger replay` reads from a log of task runs through `iter_log`: every read
model's aggregate types in one consumer (what it read before), or the whole log (what it reads now).

    python bench/consumer_filters.py [--backlog 60000]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import shutil
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import nats
from harness import cpu_seconds, report
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy, StreamConfig

from runledger.handlers.registry import projectors
from runledger.infra.embedded import EmbeddedNats
from runledger.infra.event_store import EventStore
from runledger.infra.jetstream_setup import ensure_event_stream
from runledger.infra.settings import Settings
from runledger.projections.replay import iter_log
from runledger.projections.runner import aggregate_types


@contextlib.contextmanager
def server() -> Iterator[EmbeddedNats]:
    """A JetStream nats-server of its own (no authentication, default sync), on a fresh store."""
    store = Path(tempfile.mkdtemp(prefix="rlcf-"))
    nats_server = EmbeddedNats(store / "nats").start()
    try:
        yield nats_server
    finally:
        nats_server.stop()
        shutil.rmtree(store, ignore_errors=True)


def config(kind: str, **more) -> ConsumerConfig:
    filters = {"own": {"filter_subjects": ["e.deployment.>", "e.task_run.>"]}, "whole": {"filter_subject": "e.>"}}[kind]
    return ConsumerConfig(durable_name=kind, ack_policy=AckPolicy.ALL, mem_storage=True, **filters, **more)


async def publish(js, nc, subjects) -> None:
    for i, subject in enumerate(subjects):
        await js.publish_async(subject, b"x" * 300)
        if i % 2000 == 0:
            await nc.flush()
    await nc.flush()


async def drain(sub, count: int) -> None:
    got = 0
    while got < count:
        try:
            msgs = await sub.fetch(1000, timeout=5)
        except nats.errors.TimeoutError:
            continue
        got += len(msgs)
        await msgs[-1].ack()


async def catch_up(kind: str, backlog: int) -> float:
    """Events/s delivered through a backlog of task-run events (3 per run, each run its own
    subject), one in 20 a pool's."""
    with server() as embedded:
        nc = await nats.connect(embedded.url)
        js = nc.jetstream()
        await js.add_stream(StreamConfig(name="E", subjects=["e.>"]))
        await publish(js, nc, (f"e.work_pool.{i % 50}.X" if i % 20 == 0 else f"e.task_run.{i // 3}.S"
                               for i in range(backlog)))
        mine = sum(1 for i in range(backlog) if i % 20) if kind == "own" else backlog
        await js.add_consumer("E", config(kind))
        sub = await js.pull_subscribe_bind(kind, stream="E")
        t0 = time.perf_counter()
        await drain(sub, mine)
        rate = mine / (time.perf_counter() - t0)
        await nc.close()
        return rate


async def tail(kind: str, events: int = 30_000) -> tuple[float, int]:
    """nats-server's CPU while `events` task-run events are appended at ~3,000/s, one in 500 a
    deployment's, with the consumer at the end of the log; and the events it delivered."""
    with server() as embedded:
        nc = await nats.connect(embedded.url)
        js = nc.jetstream()
        await js.add_stream(StreamConfig(name="E", subjects=["e.>"]))
        await publish(js, nc, (f"e.task_run.{i // 3}.S" for i in range(30_000)))
        last = (await js.stream_info("E")).state.last_seq
        await js.add_consumer("E", config(kind, deliver_policy=DeliverPolicy.BY_START_SEQUENCE, opt_start_seq=last + 1))
        sub = await js.pull_subscribe_bind(kind, stream="E")
        delivered = events if kind == "whole" else events // 500
        consumer = asyncio.create_task(drain(sub, delivered))
        c0 = cpu_seconds(embedded.process.pid)
        for i in range(events):
            await js.publish_async(f"e.deployment.{i % 7}.D" if i % 500 == 0 else f"e.task_run.{100_000 + i // 3}.S", b"x" * 300)
            if i % 100 == 0:
                await nc.flush()
                await asyncio.sleep(0.03)
        await consumer
        used = cpu_seconds(embedded.process.pid) - c0
        await nc.close()
        return used, delivered


async def replay_read(backlog: int) -> dict[str, float]:
    """Events/s `iter_log` reads from a log of `backlog` task-run events (3 per run), filtered
    to every projection's subjects, and the whole log."""
    with server() as embedded:
        settings = Settings(nats_url=embedded.url, namespace="bench")
        nc = await nats.connect(embedded.url)
        await ensure_event_stream(nc.jetstream(), settings)
        store = EventStore(nc, settings)
        prefix = settings.event_subject_prefix
        await publish(store.js, nc, (f"{prefix}.task_run.{uuid.UUID(int=i // 3)}.TaskRunStateSet" for i in range(backlog)))
        # What it read before: each read model's aggregate types, all in one consumer.
        subjects = sorted({f"{prefix}.{t}.>" for p in projectors() for t in aggregate_types(p)})
        rates = {}
        for name, read in (("every read model's aggregate types", subjects), ("the whole log", f"{prefix}.>")):
            t0, n = time.perf_counter(), 0
            async for batch in iter_log(store, read):
                n += len(batch)
            rates[name] = n / (time.perf_counter() - t0)
        await nc.close()
        return rates


async def run(args) -> list[tuple]:
    rows = []
    for kind, what in (("own", "its own two subjects"), ("whole", "the whole log")):
        rate = await catch_up(kind, args.backlog)
        rows.append((f"catch-up through {args.backlog:,} events, 95 % its own, reading {what}", f"{rate:,.0f} events/s", ""))
    for kind, what in (("own", "its own two subjects"), ("whole", "the whole log")):
        used, delivered = await tail(kind)
        rows.append((f"at the tail, 30,000 task-run events (1 in 500 its own), reading {what}",
                     f"nats-server CPU {used:.2f} s, {delivered:,} delivered", ""))
    for name, rate in (await replay_read(args.backlog)).items():
        rows.append((f"`runledger replay`'s read of {args.backlog:,} task-run events, filtered to {name}",
                     f"{rate:,.0f} events/s", ""))
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--backlog", type=int, default=60_000)
    args = p.parse_args()
    report("Consumer filters (bench/consumer_filters.py)", asyncio.run(run(args)))


if __name__ == "__main__":
    main()
