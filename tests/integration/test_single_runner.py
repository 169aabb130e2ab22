"""One active runner per projection: a lease decides who applies, a standby stays quiet and
takes over when the holder stops or dies; and, beneath it, a checkpoint only moves forward,
so two transactions applying the same batch cannot both commit."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time

import pytest
from sqlalchemy import text

from runledger.handlers.registry import projectors
from runledger.handlers.service import Service
from runledger.infra.database import asyncpg_connection
from runledger.infra.leases import Lease
from runledger.infra.nats_connection import connect
from runledger.projections.runner import (
    CheckpointConflict,
    ProjectionRunner,
    RawEvent,
    apply_batch,
    read_checkpoint,
)
from runledger.projections.work_pools import WorkPoolsProjector

from .broker import Broker, assert_live_equals_rebuild
from .test_projection_crashes import CountingProjector


async def _until(predicate, timeout: float = 20.0) -> float:
    started = time.monotonic()
    while not await predicate():
        assert time.monotonic() - started < timeout, "timed out"
        await asyncio.sleep(0.05)
    return time.monotonic() - started


async def _history(broker: Broker, prefix: str) -> int:
    for p in range(2):
        await broker.ok_cmd("CreateWorkPool", name=f"{prefix}{p}", type="process")
        await broker.ok_cmd("CreateWorkQueue", work_pool_name=f"{prefix}{p}", name="q", priority=1)
        await broker.ok_cmd("UpdateWorkPool", name=f"{prefix}{p}", description="d")
    return broker.last_seq


def _caught_up(svc, seq: int, names=("work_pools", "counting")):
    async def check() -> bool:
        async with svc.engine.connect() as conn:
            return all([await read_checkpoint(conn, n) >= seq for n in names])
    return check


async def _counts(svc) -> dict[int, int]:
    async with svc.engine.connect() as conn:
        return dict((await conn.execute(text("SELECT n, count(*) FROM applied_counts GROUP BY n"))).all())


async def test_the_lease_itself(settings):
    nc = await connect(settings)
    try:
        js = nc.jetstream()
        a = await Lease.open(js, settings, "role.test", ttl=1)
        b = await Lease.open(js, settings, "role.test", ttl=1)
        assert await a.acquire() and a.held
        assert not await b.acquire() and b.holder == a.owner
        assert await a.renew()
        await a.release()  # given up: taken at once
        assert await b.acquire()
        # The holder dies without a word: the TTL frees the lease.
        b.revision = None
        # Freed by the TTL (1 s), not never: the server expires keys on its own timer, later
        # under load (it once took over 4 s during a full test run).
        waited = await _until(a.acquire, timeout=15)
        assert waited < 10
        # A holder whose lease another took cannot renew it.
        b.revision = 1
        assert not await b.renew()
    finally:
        await nc.jetstream().delete_key_value(settings.lease_bucket)
        await nc.close()


async def test_a_standby_runner_waits_quietly_and_takes_over(writer, settings, caplog):
    svc, broker = writer
    caplog.set_level(logging.INFO, logger="runledger")
    first = await _history(broker, "a")
    projectors = lambda: [WorkPoolsProjector(), CountingProjector()]  # noqa: E731

    nc_a = await connect(settings)
    a = ProjectionRunner(nc_a, settings, svc.engine, projectors(), lease_ttl=2, batch_size=5)
    b = ProjectionRunner(broker.nc, settings, svc.engine, projectors(), lease_ttl=2, batch_size=5)
    c = ProjectionRunner(broker.nc, settings, svc.engine, projectors(), lease_ttl=2, batch_size=5)
    try:
        await a.start()
        await _until(_caught_up(svc, first))
        js = broker.nc.jetstream()
        created = {n: (await js.consumer_info(settings.stream_name, f"projection_{n}")).created for n in ("work_pools", "counting")}

        caplog.clear()
        await b.start()
        second = await _history(broker, "b")
        await _until(_caught_up(svc, second))
        await asyncio.sleep(2.5)  # a few of the standby's polls and the holder's renewals
        assert all(lease.held for lease in a.leases.values())
        assert not any(lease.held for lease in b.leases.values())
        assert b.applied == {}  # the standby never bound or applied
        for n in ("work_pools", "counting"):  # nor touched the consumer
            assert (await js.consumer_info(settings.stream_name, f"projection_{n}")).created == created[n]
        noisy = [r for r in caplog.records if r.levelno >= logging.WARNING and r.name.startswith("runledger")]
        assert noisy == [], [r.getMessage() for r in noisy]
        standby = [r.getMessage() for r in caplog.records if "standby" in r.getMessage()]
        assert len(standby) == 2, standby  # one line per projection

        # The holder dies (its connection gone, nothing released): after the TTL, b takes over.
        await nc_a.close()
        third = await _history(broker, "c")
        waited = await _until(_caught_up(svc, third), timeout=20)
        assert waited < 12  # the TTL (2 s here), and the server's expiry once took over 4 s more
        assert all(lease.held for lease in b.leases.values())
        assert not any(lease.held for lease in a.leases.values())

        # b stops (gives the lease up): c, a standby, takes over without waiting out a TTL.
        await c.start()
        await asyncio.sleep(0.3)
        await b.stop()
        fourth = await _history(broker, "d")
        waited = await _until(_caught_up(svc, fourth), timeout=15)
        assert waited < 2.5
        assert all(lease.held for lease in c.leases.values())
    finally:
        for r in (a, b, c):
            await r.stop()
    assert await _counts(svc) == {1: 4 * 2 * 3}  # every event applied exactly once
    await assert_live_equals_rebuild(svc, settings, fourth, ran=("work_pools",))


async def test_two_transactions_applying_the_same_first_batch_cannot_both_commit(writer, settings):
    """Both read "no checkpoint" (nothing to lock yet), both apply; the first commits, the
    second finds a checkpoint it did not expect and fails."""
    svc, broker = writer
    last = await _history(broker, "r")
    rows = await svc.store.read_subject(f"{settings.event_subject_prefix}.>")
    batch = [RawEvent(seq, subject, data) for seq, subject, data, _ in rows]
    both_applying = asyncio.Barrier(2)

    class RacingProjector(CountingProjector):
        async def apply(self, conn, events):
            await both_applying.wait()  # both have read the checkpoint before either writes
            await super().apply(conn, events)

    projector = RacingProjector()

    async def one() -> int:
        async with svc.engine.begin() as conn:
            return await apply_batch(conn, projector, batch)

    results = await asyncio.wait_for(asyncio.gather(one(), one(), return_exceptions=True), 20)
    assert sorted(type(r).__name__ for r in results) == ["CheckpointConflict", "int"], results
    assert last in results
    assert await _counts(svc) == {1: 2 * 3}
    async with svc.engine.connect() as conn:
        assert await read_checkpoint(conn, "counting") == last

    # And a write that would not advance an existing checkpoint fails its transaction.
    from datetime import UTC, datetime

    from runledger.projections.runner import advance_checkpoint

    with pytest.raises(CheckpointConflict):
        async with svc.engine.begin() as conn:
            await advance_checkpoint(conn, "counting", last - 1, last, datetime.now(UTC))
    with pytest.raises(CheckpointConflict):
        async with svc.engine.begin() as conn:
            await advance_checkpoint(conn, "counting", last, last, datetime.now(UTC))


class CountingWritesProjector(CountingProjector):
    """The same counts, given as statements (`writes`): applied in one statement with the
    checkpoint, and no row lock taken before."""

    name = "counting"

    def writes(self, events):
        keys = [f"{aggregate_id}:{event.event_type}:{event.model_dump_json()}" for aggregate_id, _, event in events]
        return [("INSERT INTO applied_counts (key, n) SELECT k, 1 FROM unnest($1::text[]) AS k "
                 "ON CONFLICT (key) DO UPDATE SET n = applied_counts.n + 1", (keys,))]

    async def apply(self, conn, events):
        from runledger.projections.bulk_writes import run_writes

        await run_writes(conn, self.writes(events))


async def test_a_batch_in_one_statement_is_applied_once_and_a_second_applier_writes_nothing(writer, settings):
    """`apply_in_one_statement` moves the checkpoint with the batch's writes; another runner
    applying the same batch from the same position (a stale holder) fails whole, its writes
    with it, and so does one that comes back later; and a runner applies through it."""
    from runledger.infra.database import DriverConnections
    from runledger.projections.runner import apply_in_one_statement

    svc, broker = writer
    last = await _history(broker, "o")
    rows = await svc.store.read_subject(f"{settings.event_subject_prefix}.>")
    batch = [RawEvent(seq, subject, data) for seq, subject, data, _ in rows]
    async with svc.engine.begin() as conn:  # the row a runner's bind makes
        await conn.execute(text("INSERT INTO projection_checkpoints (name, last_seq, updated) "
                                "VALUES ('counting', 0, now())"))
    projector = CountingWritesProjector()
    statements = DriverConnections(svc.engine)
    results = await asyncio.wait_for(asyncio.gather(
        apply_in_one_statement(statements, projector, batch, 0),
        apply_in_one_statement(statements, projector, batch, 0), return_exceptions=True), 20)
    assert sorted(type(r).__name__ for r in results) == ["CheckpointConflict", "int"], results
    assert last in results
    assert await _counts(svc) == {1: 2 * 3}
    with pytest.raises(CheckpointConflict):  # later, from a position it still believes in
        await apply_in_one_statement(statements, projector, batch[2:], batch[1].seq)
    await statements.close()
    assert await _counts(svc) == {1: 2 * 3}
    async with svc.engine.connect() as conn:
        assert await read_checkpoint(conn, "counting") == last

    # A runner's batches go this way (its `apply` would stall the projection): everything
    # applied once, the checkpoint at the end.
    class OnlyWrites(CountingWritesProjector):
        async def apply(self, conn, events):
            raise AssertionError("applied one statement at a time")

    more = await _history(broker, "p")
    runner = ProjectionRunner(svc.nc, settings, svc.engine, [OnlyWrites()], batch_size=5)
    await runner.start()
    try:
        await _until(_caught_up(svc, more, names=("counting",)))
    finally:
        await runner.stop()
    assert await _counts(svc) == {1: 2 * 2 * 3}


async def test_a_holder_whose_renewal_fails_stops_its_work_at_once(settings):
    nc = await connect(settings)
    try:
        js = nc.jetstream()
        lease = await Lease.open(js, settings, "role.stolen", ttl=3)
        running, cancelled = asyncio.Event(), asyncio.Event()

        async def work() -> None:
            running.set()
            try:
                await asyncio.Event().wait()
            finally:
                cancelled.set()

        holder = asyncio.create_task(lease.run(work))
        await asyncio.wait_for(running.wait(), 5)
        # Someone else's value lands on the key: the next renewal (expecting our revision) fails.
        await lease.kv.put("role.stolen", b"intruder")
        started = time.monotonic()
        await asyncio.wait_for(cancelled.wait(), 5)
        assert time.monotonic() - started <= lease.renew_interval * 2 + 0.5
        assert not lease.held and not holder.done()  # a standby again, not crashed
        entry = await lease.kv.get("role.stolen")
        assert entry.value == b"intruder"  # and it did not take the lease back from its holder
        holder.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await holder
    finally:
        await nc.jetstream().delete_key_value(settings.lease_bucket)
        await nc.close()


async def test_two_services_with_the_projections_role_share_the_work_one_at_a_time(writer, settings, caplog):
    """`runledger serve --roles projections` twice on the same servers: one projects, the
    other stands by quietly, and takes over when the first stops."""
    svc, broker = writer
    caplog.set_level(logging.INFO, logger="runledger")
    quick = settings.model_copy(update={"lease_ttl_seconds": 2})
    first = Service(quick, roles=frozenset({"projections"}))
    second = Service(quick, roles=frozenset({"projections"}))
    await first.start()
    try:
        await second.start()
        last = await _history(broker, "s")
        await _until(_caught_up(svc, last, names=("work_pools",)))
        await asyncio.sleep(1.5)
        assert first.runner.leases["work_pools"].held and not second.runner.leases["work_pools"].held
        assert second.runner.applied == {}
        noisy = [r for r in caplog.records if r.levelno >= logging.WARNING and r.name.startswith("runledger")]
        assert noisy == [], [r.getMessage() for r in noisy]

        await first.stop()
        more = await _history(broker, "t")
        # Every projection: one with nothing to apply saves its position a moment later.
        every = tuple(p.name for p in projectors())
        await _until(_caught_up(svc, more, names=every), timeout=10)
        assert second.runner.leases["work_pools"].held
    finally:
        await first.stop()
        await second.stop()
    await assert_live_equals_rebuild(svc, settings, more)


async def test_a_lease_bucket_made_without_message_ttls_is_given_them(settings):
    from nats.js.api import StreamConfig

    nc = await connect(settings)
    js = nc.jetstream()
    stream = f"KV_{settings.lease_bucket}"
    try:
        await js.add_stream(StreamConfig(name=stream, subjects=[f"$KV.{settings.lease_bucket}.>"], max_msgs_per_subject=1,
                                         allow_rollup_hdrs=True, deny_delete=True))
        lease = await Lease.open(js, settings, "projection.x", ttl=2)
        assert await lease.acquire()
        assert (await js.stream_info(stream)).config.allow_msg_ttl
    finally:
        await js.delete_stream(stream)
        await nc.close()


async def test_a_process_that_stops_projecting_still_reads_its_writes(writer, settings):
    """Two full services; the one that projected hands over (its runner stops, as when its
    lease is lost): its queries wait on the checkpoints table again, not on its own stale
    position, so read-your-writes through it still works."""
    import json

    svc, broker = writer
    quick = settings.model_copy(update={"lease_ttl_seconds": 2})
    first = Service(quick, roles=frozenset({"queries", "projections"}))
    second = Service(quick, roles=frozenset({"queries", "projections"}))
    await first.start()
    try:
        await second.start()
        seq = await _history(broker, "u")
        await _until(_caught_up(svc, seq, names=("work_pools",)))
        await first.runner.stop()  # the second takes the lease over
        await broker.ok_cmd("CreateWorkPool", name="later", type="process")
        reply = await first.queries.execute("CountWorkPools", json.dumps({"min_seq": broker.last_seq}).encode())
        assert reply["ok"], reply
        assert reply["result"] == 3
        assert second.runner.leases["work_pools"].held
    finally:
        await first.stop()
        await second.stop()


async def test_a_batch_written_through_asyncpg_is_one_transaction(writer, settings):
    """The hot read models write with asyncpg itself, under SQLAlchemy's connection: their
    rows and the checkpoint must commit together. The loser of a race for the first batch,
    and a batch that fails after writing, leave no row behind."""
    svc, broker = writer
    last = await _history(broker, "t")
    rows = await svc.store.read_subject(f"{settings.event_subject_prefix}.>")
    batch = [RawEvent(seq, subject, data) for seq, subject, data, _ in rows]
    both_applying = asyncio.Barrier(2)

    class DriverCountingProjector(CountingProjector):
        name = "driver_counting"
        fail = False

        async def apply(self, conn, events):
            driver = await asyncpg_connection(conn)
            await both_applying.wait()
            for aggregate_id, _, event in events:
                await driver.execute(
                    "INSERT INTO applied_counts (key, n) VALUES ($1, 1) "
                    "ON CONFLICT (key) DO UPDATE SET n = applied_counts.n + 1",
                    f"driver:{aggregate_id}:{event.event_type}:{event.model_dump_json()}")
            if self.fail:
                raise RuntimeError("a row the read model refuses")

    async def driver_counts() -> dict[int, int]:
        async with svc.engine.connect() as conn:
            return dict((await conn.execute(text(
                "SELECT n, count(*) FROM applied_counts WHERE key LIKE 'driver:%' GROUP BY n"))).all())

    failing = DriverCountingProjector()
    failing.fail = True
    both_applying = asyncio.Barrier(1)
    with pytest.raises(RuntimeError):
        async with svc.engine.begin() as conn:
            await apply_batch(conn, failing, batch)
    assert await driver_counts() == {}

    both_applying = asyncio.Barrier(2)
    projector = DriverCountingProjector()

    async def one() -> int:
        async with svc.engine.begin() as conn:
            return await apply_batch(conn, projector, batch)

    results = await asyncio.wait_for(asyncio.gather(one(), one(), return_exceptions=True), 20)
    assert sorted(type(r).__name__ for r in results) == ["CheckpointConflict", "int"], results
    assert await driver_counts() == {1: 2 * 3}  # the loser's rows went with its transaction
    async with svc.engine.connect() as conn:
        assert await read_checkpoint(conn, "driver_counting") == last
