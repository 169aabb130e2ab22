"""Aggregate snapshots: a pool with a long history loads from its last snapshot and the events
after it, into exactly the state a full fold of its history gives; a snapshot of another
version, or one that cannot be read, is ignored (a full load), never an error."""

from __future__ import annotations

import json

import pytest

from runledger.commands import work_pools as wp
from runledger.handlers.service import Service
from runledger.handlers.work_pool_commands import AGGREGATE_KINDS, POOL_SNAPSHOTS
from runledger.infra.aggregates import AggregateRepository
from runledger.infra.nats_connection import connect
from runledger.infra.snapshots import SnapshotStore
from tests.conftest import cleanup_namespace

from .broker import Broker

EVERY = 50


@pytest.fixture
async def snapshotting(settings):
    settings = settings.model_copy(update={"snapshot_every": EVERY})
    service = Service(settings)
    await service.start()
    nc = await connect(settings)
    try:
        yield service, Broker(nc, settings), settings
    finally:
        await nc.close()
        await service.stop()
        await cleanup_namespace(settings)


def reads(store, monkeypatch) -> list[int]:
    """The `after_seq` of every aggregate read: where a load started in the log."""
    starts: list[int] = []
    real = store.read_aggregate

    async def spy(aggregate_type, aggregate_id, after_seq=0):
        starts.append(after_seq)
        return await real(aggregate_type, aggregate_id, after_seq=after_seq)

    monkeypatch.setattr(store, "read_aggregate", spy)
    return starts


async def _long_history(broker: Broker) -> str:
    pool = await broker.ok_cmd("CreateWorkPool", name="busy", type="process")
    for i in range(10):
        await broker.ok_cmd("CreateWorkQueue", work_pool_name="busy", name=f"q{i}", priority=1)
    for i in range(120):
        await broker.ok_cmd("UpdateWorkQueue", work_pool_name="busy", work_queue_name=f"q{i % 10}",
                            description=f"change {i}", concurrency_limit=i % 4)
    return pool["id"]


async def test_a_long_history_loads_from_its_snapshot_into_the_full_fold(snapshotting, monkeypatch):
    service, broker, settings = snapshotting
    pool_id = await _long_history(broker)  # 131 pool events: snapshots after 50 and 100
    await service.commands.repo.flush_snapshots()
    live = service.commands.repo.cached(wp.WORK_POOL, pool_id)

    snapshots = SnapshotStore(service.nc.jetstream(), settings)
    version, snap_seq, _ = await snapshots.get(wp.WORK_POOL, pool_id)
    history = await service.store.read_aggregate(wp.WORK_POOL, pool_id)
    assert version == POOL_SNAPSHOTS.version
    assert snap_seq == history[99].seq  # the 100th event: two snapshots were written

    starts = reads(service.store, monkeypatch)
    fresh = AggregateRepository(service.store, AGGREGATE_KINDS, snapshots=snapshots, snapshot_every=EVERY)
    from_snapshot = await fresh.load(wp.WORK_POOL, pool_id)
    assert starts == [snap_seq]  # only the tail after the snapshot was read
    full = await AggregateRepository(service.store, AGGREGATE_KINDS).load(wp.WORK_POOL, pool_id)
    assert from_snapshot.state == full.state == live.state
    assert from_snapshot.seq == full.seq == live.seq == history[-1].seq

    # And a command decided on the snapshot-loaded state is right: the names are all there.
    service.commands.repo.forget(wp.WORK_POOL, pool_id)
    out = await broker.cmd("CreateWorkQueue", work_pool_name="busy", name="q3")
    assert out["error"]["code"] == "conflict"


@pytest.mark.parametrize("bad", ["another version", "unreadable state", "not JSON", "another log", "a shorter log"])
async def test_a_snapshot_of_another_version_or_unreadable_is_ignored(snapshotting, monkeypatch, bad):
    service, broker, settings = snapshotting
    pool_id = await _long_history(broker)
    await service.commands.repo.flush_snapshots()
    kv = await service.nc.jetstream().key_value(settings.snapshot_bucket)
    key = SnapshotStore.key(wp.WORK_POOL, pool_id)
    good = json.loads((await kv.get(key)).value)
    body = {
        # A good state under another version number: used, it would skip the whole history.
        "another version": json.dumps({**good, "v": POOL_SNAPSHOTS.version + 1}),
        "unreadable state": json.dumps({**good, "state": {"name": "not a pool"}}),
        "not JSON": "not json at all",
        # Snapshots of a log since deleted and started again: their sequence holds another
        # aggregate's event (here the pool's name claim), or nothing yet.
        "another log": json.dumps({**good, "seq": (await service.store.read_aggregate(wp.WORK_POOL, pool_id))[0].seq - 1}),
        "a shorter log": json.dumps({**good, "seq": good["seq"] + 100_000}),
    }[bad]
    await kv.put(key, body.encode())

    starts = reads(service.store, monkeypatch)
    fresh = AggregateRepository(service.store, AGGREGATE_KINDS, snapshots=SnapshotStore(service.nc.jetstream(), settings),
                                snapshot_every=EVERY)
    loaded = await fresh.load(wp.WORK_POOL, pool_id)
    assert starts == [0]  # a full load from the start of the log
    assert loaded.state == service.commands.repo.cached(wp.WORK_POOL, pool_id).state
