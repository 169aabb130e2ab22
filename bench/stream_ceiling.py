"""How many appends one event stream takes on this machine, through runledger's own append
path (`EventStore.append`: one message with the aggregate-wide expected-sequence check, or an
atomic batch, alone or group-committed), with many appends in flight over many aggregates. This is the ceiling that
says when to partition the log over several streams (docs/operations.md, "Scaling").

Then what one append costs, one at a time: an atomic batch of 1 to 48 messages, its time and
nats-server's CPU, and how many fsyncs a second the disk under the store takes in one file
(with `sync_interval: always`, a stream fsyncs every message it stores, one after the other,
those of an atomic batch included).

    python bench/stream_ceiling.py [--seconds 8] [--in-flight 256] [--aggregates 2000]
"""

from __future__ import annotations

import argparse
import asyncio
import uuid
from datetime import UTC, datetime

from harness import bench_settings, cpu_by_kind, fsyncs_per_second, now, report, servers

from runledger.commands import work_pools as wp
from runledger.commands.events import encode_event
from runledger.infra.event_store import EventStore
from runledger.infra.jetstream_setup import ensure_event_stream
from runledger.infra.nats_connection import connect


def _event() -> wp.WorkQueuesReprioritized:
    """A small, valid work-pool event (the ceiling is about the log, not the payload)."""
    return wp.WorkQueuesReprioritized(reprioritized={}, updated=datetime.now(UTC))


async def measure(store: EventStore, seconds: float, in_flight: int, aggregates: int, batch: int,
                  grouped: bool = True) -> float:
    """Appends per second (messages per second for batches), each aggregate appended to by one
    writer at a time with the right expected sequence, as the command bus does."""
    last_seq = dict.fromkeys(range(aggregates), 0)
    ids = [uuid.uuid4() for _ in range(aggregates)]
    stop_at = now() + seconds
    appended = 0
    queue: asyncio.Queue[int] = asyncio.Queue()
    for a in range(aggregates):
        queue.put_nowait(a)

    async def writer() -> None:
        nonlocal appended
        while now() < stop_at:
            a = await queue.get()
            if batch == 1:
                events = [encode_event(str(ids[a]), _event(), occurred=datetime.now(UTC), event_id=uuid.uuid4())]
                expected = {(wp.WORK_POOL, str(ids[a])): last_seq[a]}
            else:
                # A multi-aggregate decision: this aggregate and `batch - 1` others' first events.
                others = [uuid.uuid4() for _ in range(batch - 1)]
                events = [encode_event(str(x), _event(), occurred=datetime.now(UTC), event_id=uuid.uuid4())
                          for x in [ids[a], *others]]
                expected = {(wp.WORK_POOL, str(ids[a])): last_seq[a], **{(wp.WORK_POOL, str(x)): 0 for x in others}}
            messages = store.build_messages(events, expected)
            seq = await (store.append(messages) if grouped else store.append_alone(messages))
            last_seq[a] = seq - (len(events) - 1) if batch > 1 else seq
            appended += len(events)
            queue.put_nowait(a)

    started = now()
    await asyncio.gather(*(writer() for _ in range(in_flight)))
    return appended / (now() - started)


async def one_at_a_time(store: EventStore, size: int, count: int) -> tuple[float, float]:
    """Appends of `size` messages (an atomic batch from 2 on, each message its own aggregate's),
    each awaited before the next: (ms per append, nats-server's CPU ms per append)."""
    cpu0, started = cpu_by_kind()["nats-server"], now()
    for _ in range(count):
        ids = [uuid.uuid4() for _ in range(size)]
        events = [encode_event(str(x), _event(), occurred=datetime.now(UTC), event_id=uuid.uuid4()) for x in ids]
        await store.append_alone(store.build_messages(events, {(wp.WORK_POOL, str(x)): 0 for x in ids}))
    return (now() - started) / count * 1000, (cpu_by_kind()["nats-server"] - cpu0) / count * 1000


async def run(args) -> list[tuple[str, str, str]]:
    with servers() as urls:
        settings = bench_settings(urls)
        nc = await connect(settings)
        try:
            await ensure_event_stream(nc.jetstream(), settings)
            store = EventStore(nc, settings)
            single = await measure(store, args.seconds, args.in_flight, args.aggregates, 1)
            awaited = await measure(store, args.seconds / 2, 1, args.aggregates, 1)
            alone = await measure(store, args.seconds, args.in_flight, args.aggregates, 2, grouped=False)
            batches = await measure(store, args.seconds, args.in_flight, args.aggregates, 2)
            costs = [(size, *await one_at_a_time(store, size, 300 if size < 12 else 100)) for size in (1, 2, 3, 12, 48)]
        finally:
            await nc.close()
        disk = fsyncs_per_second(urls["store_dir"]) if urls.get("store_dir") else None
    return [
        (f"single-message appends with the expected-sequence check, {args.in_flight} in flight over "
         f"{args.aggregates:,} aggregates", f"{single:,.0f} appends/s", ""),
        ("single-message appends, one at a time (each ack awaited)", f"{awaited:,.0f} appends/s", ""),
        (f"two-aggregate decisions (atomic batches of 2), {args.in_flight} in flight, each batch alone",
         f"{alone / 2:,.0f} batches/s", ""),
        ("the same through the group commit (`EventStore.append`)", f"{batches / 2:,.0f} decisions/s "
         f"({batches:,.0f} messages/s)", ""),
        *[(f"one append of {size} message{'s' if size > 1 else ''}" + (" (an atomic batch)" if size > 1 else "")
           + ", one at a time: time, nats-server's CPU", f"{ms:.2f} ms, {cpu:.2f} ms", "") for size, ms, cpu in costs],
        *([("the disk under the store: fsyncs a second in one file (300-byte appends)", f"{disk:,.0f}/s", "")]
          if disk is not None else []),
    ]


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--seconds", type=float, default=8)
    p.add_argument("--in-flight", type=int, default=256)
    p.add_argument("--aggregates", type=int, default=2000)
    args = p.parse_args()
    report("One stream's append ceiling (bench/stream_ceiling.py)", asyncio.run(run(args)))


if __name__ == "__main__":
    main()
