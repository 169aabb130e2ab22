"""A projection applies each event exactly once in effect, whatever point it dies at.

The commands run in a service without the projection role; the projection runs in runners
the test builds and kills: after the fetch but before the commit, and after the commit but
before the ack. A counting projector records how often each event is applied."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

import pytest
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncConnection

from runledger.commands.messages import Event
from runledger.handlers.service import Service
from runledger.projections.runner import ProjectionRunner, read_checkpoint
from runledger.projections.work_pools import WorkPoolsProjector

from .broker import Broker


class CountingProjector:
    """Counts applications per event id: any count above one is a double application."""

    name = "counting"
    tables = ()
    handles = frozenset({"WorkPoolCreated", "WorkQueueCreated", "WorkQueueUpdated", "WorkPoolUpdated"})

    async def apply(self, conn: AsyncConnection, events: Sequence[tuple[str, str, Event]]) -> None:
        for aggregate_id, _, event in events:
            key = f"{aggregate_id}:{event.event_type}:{event.model_dump_json()}"
            await conn.execute(text(
                "INSERT INTO applied_counts (key, n) VALUES (:k, 1) ON CONFLICT (key) DO UPDATE SET n = applied_counts.n + 1"
            ), {"k": key})


async def _make_history(broker: Broker) -> int:
    for p in range(4):
        await broker.ok_cmd("CreateWorkPool", name=f"pool{p}", type="process")
        for q in range(3):
            await broker.ok_cmd("CreateWorkQueue", work_pool_name=f"pool{p}", name=f"q{q}", priority=1)
        await broker.ok_cmd("UpdateWorkPool", name=f"pool{p}", is_paused=True, description="paused")
    return broker.last_seq


async def _run_until(runner: ProjectionRunner, svc: Service, seq: int) -> None:
    await runner.start()
    for _ in range(500):
        async with svc.engine.connect() as conn:
            if all([await read_checkpoint(conn, p.name) >= seq for p in runner.projectors]):
                break
        await asyncio.sleep(0.02)
    await runner.stop()


async def _wait_crashed(runner: ProjectionRunner) -> None:
    done, _ = await asyncio.wait(runner._tasks, timeout=20)
    assert len(done) == len(runner._tasks), "the runner was expected to crash"
    for t in done:
        assert "Simulated" in type(t.exception()).__name__
    runner._tasks.clear()


async def _rows(svc: Service):
    async with svc.engine.connect() as conn:
        pools = (await conn.execute(text("SELECT name, is_paused, description, status FROM work_pools ORDER BY name"))).all()
        queues = (await conn.execute(text(
            "SELECT p.name, q.name, q.priority FROM work_queues q JOIN work_pools p ON p.id = q.work_pool_id ORDER BY 1, 3"
        ))).all()
        counts = (await conn.execute(text("SELECT n, count(*) FROM applied_counts GROUP BY n"))).all()
    return pools, queues, dict(counts)


@pytest.mark.parametrize("crash_point", ["crash_after_fetch", "crash_after_commit"])
async def test_a_killed_projection_resumes_exactly_once(writer, settings, crash_point):
    svc, broker = writer
    last = await _make_history(broker)
    projectors = [WorkPoolsProjector(), CountingProjector()]

    dying = ProjectionRunner(broker.nc, settings, svc.engine, projectors, batch_size=7, **{crash_point: True})
    await dying.start()
    await _wait_crashed(dying)
    async with svc.engine.connect() as conn:
        checkpoint = await read_checkpoint(conn, "counting")
    info = await broker.nc.jetstream().consumer_info(settings.stream_name, "projection_counting")
    if crash_point == "crash_after_fetch":
        assert checkpoint == 0  # killed before its commit: nothing applied
    else:
        # killed after its commit: the batch is applied but was never acknowledged
        assert 0 < checkpoint < last
        assert info.num_ack_pending > 0 and info.ack_floor.stream_seq < checkpoint

    await _run_until(ProjectionRunner(broker.nc, settings, svc.engine, projectors, batch_size=7), svc, last)

    pools, queues, counts = await _rows(svc)
    assert counts == {1: 4 * (1 + 3 + 1)}  # every event applied once, none twice
    assert [(p.name, p.is_paused, p.description, p.status) for p in pools] == [
        (f"pool{i}", True, "paused", "PAUSED") for i in range(4)
    ]
    # q0, q1, q2 each created with priority 1 pushed the others down (WQ-3).
    assert [(pn, qn, pr) for pn, qn, pr in queues if pn == "pool0"] == [
        ("pool0", "q2", 1), ("pool0", "q1", 2), ("pool0", "q0", 3), ("pool0", "default", 4)
    ]


async def test_a_redelivered_batch_is_skipped_by_the_checkpoint(writer, settings):
    """What the broker offers again after an unacknowledged commit changes nothing."""
    from runledger.projections.runner import RawEvent, apply_batch

    svc, broker = writer
    last = await _make_history(broker)
    rows = await svc.store.read_subject(f"{settings.event_subject_prefix}.>")
    batch = [RawEvent(seq, subject, data) for seq, subject, data, _ in rows]
    projector = CountingProjector()
    for _ in range(2):
        async with svc.engine.begin() as conn:
            assert await apply_batch(conn, projector, batch) == last
    # A batch that straddles the checkpoint applies only what lies above it.
    async with svc.engine.begin() as conn:
        await conn.execute(text("UPDATE projection_checkpoints SET last_seq = :s WHERE name = 'counting'"), {"s": last - 1})
        await conn.execute(text("DELETE FROM applied_counts WHERE n = 1 AND key LIKE '%WorkPoolUpdated%paused%' AND key LIKE :k"), {"k": "%pool3%"})
        await apply_batch(conn, projector, batch)
    _, _, counts = await _rows(svc)
    assert counts == {1: 4 * (1 + 3 + 1)}
