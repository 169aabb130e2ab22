"""Each projection's consumer reads only its own aggregate types (projections/runner.py), and
its position still moves past the events it never receives, without ever passing one of its
own that it has not applied. Against real NATS and Postgres."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Sequence

from nats.js.api import ConsumerConfig
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncConnection

from runledger.commands.messages import Event
from runledger.handlers.service import Service, projectors
from runledger.infra.nats_connection import connect
from runledger.projections import runner as projection_runner
from runledger.projections.flows import FlowsProjector
from runledger.projections.runner import ProjectionRunner, projection_subjects, read_checkpoint
from runledger.projections.work_pools import WorkPoolsProjector

from .broker import Broker, assert_live_equals_rebuild


class PoolsAndFlows:
    """A projector of two aggregate types (it counts what it is given)."""

    name = "pools_and_flows"
    tables = ()
    raw_payloads = False
    handles = frozenset({"WorkPoolCreated", "FlowCreated"})

    async def apply(self, conn: AsyncConnection, events: Sequence[tuple[str, str, Event | dict]]) -> None:
        for aggregate_id, event_type, _ in events:
            await conn.execute(text(
                "INSERT INTO applied_counts (key, n) VALUES (:k, 1) ON CONFLICT (key) DO UPDATE SET n = applied_counts.n + 1"
            ), {"k": f"{event_type}:{aggregate_id}"})


async def _until(check, what: str, timeout: float = 15.0) -> None:
    """Polls `check()` until it is true; fails naming `what` after `timeout` seconds."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not await check():
        assert loop.time() < deadline, f"not within {timeout:g} s: {what}"
        await asyncio.sleep(0.01)


async def test_each_consumer_reads_the_subjects_of_its_aggregate_types(writer, settings):
    svc, broker = writer
    prefix = settings.event_subject_prefix
    js = broker.nc.jetstream()
    # A consumer as an older version made it, reading the whole log: the bind replaces it.
    await js.add_consumer(settings.stream_name, ConsumerConfig(durable_name="projection_flows", filter_subject=f"{prefix}.>"))
    await broker.ok_cmd("CreateWorkPool", name="p1", type="process")
    await broker.ok_cmd("CreateFlow", name="f1")
    runner = ProjectionRunner(broker.nc, settings, svc.engine, [WorkPoolsProjector(), FlowsProjector(), PoolsAndFlows()],
                              use_leases=False)
    await runner.start()
    try:
        async def caught_up() -> bool:
            return all(runner.applied.get(n, 0) >= broker.last_seq for n in ("work_pools", "flows", "pools_and_flows"))

        await _until(caught_up, "every projection reaches the last event")
        configs = {n: (await js.consumer_info(settings.stream_name, f"projection_{n}")).config
                   for n in ("work_pools", "flows", "pools_and_flows")}
    finally:
        await runner.stop()
    assert configs["work_pools"].filter_subject == f"{prefix}.work_pool.>" and not configs["work_pools"].filter_subjects
    assert configs["flows"].filter_subject == f"{prefix}.flow.>" and not configs["flows"].filter_subjects
    # Several types, near the end of the log: its own subjects (the whole log only to catch up).
    own = [f"{prefix}.flow.>", f"{prefix}.work_pool.*.WorkPoolCreated"]
    assert configs["pools_and_flows"].filter_subjects == own
    assert not configs["pools_and_flows"].filter_subject
    # Of a pool's many event types it reads one: that one's subjects only; of a flow's two, one: all.
    assert projection_subjects(PoolsAndFlows(), prefix) == own
    async with svc.engine.connect() as conn:
        counts = dict((await conn.execute(text("SELECT key, n FROM applied_counts"))).all())
    assert sorted(k.split(":")[0] for k in counts) == ["FlowCreated", "WorkPoolCreated"]
    assert set(counts.values()) == {1}


async def test_a_query_after_only_other_read_models_events_answers_at_once(service, settings):
    """300 flow commands (flows and their name claims), none of them a work pool's event: a
    pool query with the last one's `min_seq` must not wait for a pool event that never comes.
    The wait is bounded at 1 s here, so a projection that moved past them only by chance
    answers `unavailable` and fails the test."""
    svc = service
    svc.queries.wait_timeout = 1.0
    nc = await connect(settings)
    try:
        broker = Broker(nc, settings)
        await broker.ok_cmd("CreateWorkPool", name="lonely", type="process")
        await broker.ok_qry("CountWorkPools")
        for i in range(300):
            await broker.ok_cmd("CreateFlow", name=f"flow-{i}")
        last = broker.last_seq
        assert await broker.ok_qry("CountWorkPools", min_seq=last) == 1
        assert await broker.ok_qry("CountFlows", min_seq=last) == 300
        # A flow query after a pool command, and the health query.
        await broker.ok_cmd("UpdateWorkPool", name="lonely", description="again")
        assert await broker.ok_qry("CountFlows", min_seq=broker.last_seq) == 300
        health = await broker.ok_qry("GetServiceHealth", min_seq=broker.last_seq)
        assert {p["name"] for p in health["projections"]} >= {"work_pools", "flows"}
    finally:
        await nc.close()


async def test_a_query_process_without_projections_sees_idle_ones_advance(writer, settings):
    """The query role in a process of its own reads the positions from the checkpoints
    table: a projection with nothing to apply must save its probed position there too."""
    svc, broker = writer
    queries = Service(settings.model_copy(update={"query_wait_timeout": 1.0}), roles=frozenset({"queries"}))
    await queries.start()
    runner = ProjectionRunner(broker.nc, settings, svc.engine, projectors())  # a query waits for them all
    await runner.start()
    try:
        await broker.ok_cmd("CreateFlow", name="first")
        for i in range(100):
            await broker.ok_cmd("CreateWorkPool", name=f"pool-{i}", type="process")
        assert await broker.ok_qry("CountFlows", min_seq=broker.last_seq) == 1
        for i in range(100):
            await broker.ok_cmd("CreateFlow", name=f"flow-{i}")
        assert await broker.ok_qry("CountWorkPools", min_seq=broker.last_seq) == 100
        health = await broker.ok_qry("GetServiceHealth", min_seq=broker.last_seq)
        assert {p["name"]: p["checkpoint"] >= broker.last_seq for p in health["projections"]} == {
            p.name: True for p in projectors()}
    finally:
        await runner.stop()
        await queries.stop()


class SlowFlows(FlowsProjector):
    """Flows, applied slowly: its own events stay unapplied for a while, in flight or in the
    log, while the pools projection runs ahead of it (the case a wrong probe would get wrong)."""

    async def apply(self, conn, events):
        await asyncio.sleep(0.03)
        await super().apply(conn, events)


class SlowPools(WorkPoolsProjector):
    async def apply(self, conn, events):
        await asyncio.sleep(0.03)
        await super().apply(conn, events)


async def test_a_position_never_passes_an_unapplied_event_of_its_own(writer, settings):
    """Flow and pool commands interleaved while both projections run (slowly, in small
    batches). Every position a projection reports in memory, and every checkpoint saved, is
    checked against its read model as it was at that moment: it must hold every flow (pool)
    created at or below that position."""
    svc, broker = writer
    reports: list[tuple[str, int, set[str]]] = []  # (projection, reported position, ids in its table then)
    saved: list[tuple[dict[str, int], set[str], set[str]]] = []  # (checkpoints, flow ids, pool ids) in one snapshot
    checks: list[asyncio.Task] = []
    tables = {"flows": "flows", "work_pools": "work_pools"}

    async def ids(conn, table: str) -> set[str]:
        return {str(r[0]) for r in await conn.execute(text(f"SELECT id FROM {table}"))}

    async def read_at_report(name: str, seq: int) -> None:
        async with svc.engine.connect() as conn:
            reports.append((name, seq, await ids(conn, tables[name])))

    def applied(name: str, seq: int) -> None:
        # At once: a position reported before its events were committed finds them missing
        # (the projectors take 30 ms per batch, this read a few).
        checks.append(asyncio.get_running_loop().create_task(read_at_report(name, seq)))

    stop = asyncio.Event()

    async def snapshots() -> None:
        while not stop.is_set():
            async with svc.engine.connect() as conn:
                await conn.execute(text("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ"))
                rows = await conn.execute(text("SELECT name, last_seq FROM projection_checkpoints"))
                checkpoints = {r.name: r.last_seq for r in rows}
                saved.append((checkpoints, await ids(conn, "flows"), await ids(conn, "work_pools")))
                await conn.rollback()
            await asyncio.sleep(0.005)

    runner = ProjectionRunner(broker.nc, settings, svc.engine, [SlowFlows(), SlowPools()], on_applied=applied,
                              batch_size=3, use_leases=False)
    await runner.start()
    snapshotting = asyncio.create_task(snapshots())
    created: dict[str, tuple[str, int]] = {}  # id -> (projection, seq of its create)
    try:
        async def flows() -> None:
            for i in range(60):
                out = await broker.cmd("CreateFlow", name=f"f{i}")
                assert out["ok"], out
                created[out["result"]["id"]] = ("flows", out["seq"])

        async def pools() -> None:
            for i in range(60):
                out = await broker.cmd("CreateWorkPool", name=f"p{i}", type="process")
                assert out["ok"], out
                created[out["result"]["id"]] = ("work_pools", out["seq"])
                if i % 3 == 0:  # a stretch of pool events alone
                    for j in range(3):
                        await broker.ok_cmd("UpdateWorkPool", name=f"p{i}", description=f"d{j}")

        await asyncio.gather(flows(), pools())

        async def saved_up_to_the_end() -> bool:
            async with svc.engine.connect() as conn:
                return all([await read_checkpoint(conn, n) >= broker.last_seq for n in ("flows", "work_pools")])

        await _until(saved_up_to_the_end, "both checkpoints reach the last event")
    finally:
        stop.set()
        await snapshotting
        await runner.stop()
        await asyncio.gather(*checks)

    # The pools' creates are found by the create's seq: a pool's create is its command's last event.
    assert len(created) == 120
    assert len(reports) > 20 and len(saved) > 10
    assert {n for n, _, _ in reports} == {"flows", "work_pools"}
    for name, seq, present in reports:
        missing = sorted(s for i, (n, s) in created.items() if n == name and s <= seq and i not in present)
        assert not missing, f"{name} reported position {seq} before applying its events at {missing}"
    for checkpoints, flow_ids, pool_ids in saved:
        for name, present in (("flows", flow_ids), ("work_pools", pool_ids)):
            seq = checkpoints.get(name, 0)
            missing = sorted(s for i, (n, s) in created.items() if n == name and s <= seq and i not in present)
            assert not missing, f"{name}'s checkpoint {seq} was saved before its events at {missing}"
    await assert_live_equals_rebuild(svc, settings, ran=("flows", "work_pools"))


async def test_a_new_namespace_projection_reaches_the_end_of_a_log_without_its_events(writer, settings):
    """A projection started on a log with none of its events takes the log's end as its
    position without any batch: nothing to apply is not a reason to stay at 0."""
    svc, broker = writer
    for i in range(20):
        await broker.ok_cmd("CreateWorkPool", name=f"only-{i}", type="process")
    runner = ProjectionRunner(broker.nc, settings, svc.engine, [FlowsProjector()], use_leases=False)
    await runner.start()
    try:
        async def saved() -> bool:
            async with svc.engine.connect() as conn:
                return await read_checkpoint(conn, "flows") >= broker.last_seq

        await _until(saved, "the flows checkpoint reaches the log's end")
    finally:
        await runner.stop()
    async with svc.engine.connect() as conn:
        assert (await conn.execute(text("SELECT count(*) FROM flows"))).scalar_one() == 0
        assert await read_checkpoint(conn, "flows") == broker.last_seq


class SlowPoolsAndFlows(PoolsAndFlows):
    """Two aggregate types, applied slowly in small batches: it falls behind while commands flow."""

    async def apply(self, conn, events):
        await asyncio.sleep(0.05)
        await super().apply(conn, events)


async def test_a_projection_of_several_types_reads_the_whole_log_only_while_it_catches_up(writer, settings, monkeypatch):
    """Bound far behind the log's end, a projection of two aggregate types reads the whole log;
    caught up, it binds to its own subjects; fallen far behind again, to the whole log, and back.
    Through every change of filter each of its events is applied once, none passed over."""
    monkeypatch.setattr(projection_runner, "WIDE_BACKLOG", 10)
    monkeypatch.setattr(projection_runner, "NARROW_PENDING", 0)
    svc, broker = writer
    prefix = settings.event_subject_prefix
    js = broker.nc.jetstream()
    own = [f"{prefix}.flow.>", f"{prefix}.work_pool.*.WorkPoolCreated"]
    expected: set[str] = set()
    for i in range(30):  # a flow and its name claim, a pool and its name claim: 120 events
        expected.add(f"FlowCreated:{(await broker.ok_cmd('CreateFlow', name=f'f{i}'))['id']}")
        expected.add(f"WorkPoolCreated:{(await broker.ok_cmd('CreateWorkPool', name=f'p{i}', type='process'))['id']}")
    filters: list[str] = []  # what the consumer was bound to, in order
    applied_then: list[int] = []  # how far the runner had applied when each was last seen

    async def seen_filter() -> None:
        config = (await js.consumer_info(settings.stream_name, "projection_pools_and_flows")).config
        now = "own" if config.filter_subjects == own else "whole" if config.filter_subject == f"{prefix}.>" else "?"
        applied = runner.applied.get("pools_and_flows", 0)
        if not filters or filters[-1] != now:
            filters.append(now)
            applied_then.append(applied)
        else:
            applied_then[-1] = applied

    runner = ProjectionRunner(broker.nc, settings, svc.engine, [SlowPoolsAndFlows()], batch_size=5, use_leases=False)
    stop = asyncio.Event()

    async def watch() -> None:
        while not stop.is_set():
            with contextlib.suppress(Exception):  # deleted and created again in between
                await seen_filter()
            await asyncio.sleep(0.005)

    await runner.start()
    watching = asyncio.create_task(watch())
    try:
        async def counted(n: int) -> bool:
            async with svc.engine.connect() as conn:
                return (await conn.execute(text("SELECT count(*) FROM applied_counts"))).scalar_one() >= n

        await _until(lambda: counted(60), "the first 60 events of its own applied")
        await _until(lambda: _true(filters and filters[-1] == "own"), "bound to its own subjects once caught up")
        # Fallen behind on its own subjects: 40 more of its events at once, while it applies 5
        # per 50 ms (sent side by side: one after the other, a slow machine's commands let it
        # keep up).
        made = await asyncio.gather(*(broker.ok_cmd("CreateFlow", name=f"g{i}") for i in range(20)),
                                    *(broker.ok_cmd("CreateWorkPool", name=f"q{i}", type="process") for i in range(20)))
        expected.update(f"FlowCreated:{m['id']}" for m in made[:20])
        expected.update(f"WorkPoolCreated:{m['id']}" for m in made[20:])
        await _until(lambda: counted(100), "every event of its own applied")
        await _until(lambda: _true(runner.applied.get("pools_and_flows", 0) >= broker.last_seq), "caught up")
        await _until(lambda: _true(filters[-1] == "own"), "bound to its own subjects again")
    finally:
        stop.set()
        await watching
        await runner.stop()
    # A bind makes the consumer on its own subjects, reads its pending count, and at once makes
    # it again on the whole log when far behind: nothing is read in between.
    first_whole = filters.index("whole")
    assert all(n == 0 for n in applied_then[:first_whole]) and "own" in filters[first_whole:], \
        (filters, applied_then)
    assert any(a == "own" and b == "whole" for a, b in zip(filters, filters[1:], strict=False)), filters
    async with svc.engine.connect() as conn:
        counts = dict((await conn.execute(text("SELECT key, n FROM applied_counts"))).all())
    assert set(counts) == expected and set(counts.values()) == {1}


async def _true(value) -> bool:
    return bool(value)
