"""The run read models write their batches from the events as stored (`raw_writes`: Postgres
reads the rows out of the envelopes) or from the events decoded (`writes`): both must leave
the same rows, whatever the batch holds (a run created, moved, updated, deleted, several
times in one batch or across batches)."""

from __future__ import annotations

from typing import Any

from runledger.infra.database import asyncpg_connection, create_engine, drop_schema, migrate
from runledger.projections.flow_runs import FlowRunsProjector
from runledger.projections.runner import RawEvent, decode_batch, stored_events
from runledger.projections.tables import MIGRATIONS
from runledger.projections.task_runs import TaskRunsProjector

_TABLES = {"flow_runs": ("flow_runs", "flow_run_states"), "task_runs": ("task_runs", "task_run_states")}


async def _history(broker) -> None:
    flow = await broker.ok_cmd("CreateFlow", name="stored-writes")
    runs = [await broker.ok_cmd("CreateFlowRun", flow_id=flow["id"], name=f"r{i}", tags=["t"]) for i in range(4)]
    for run in runs[:3]:
        await broker.ok_cmd("SetFlowRunState", id=run["id"], state={"type": "PENDING"})
    await broker.ok_cmd("SetFlowRunState", id=runs[0]["id"], state={"type": "RUNNING"})
    await broker.ok_cmd("UpdateFlowRun", id=runs[1]["id"], name="renamed", tags=["u"])
    await broker.ok_cmd("DeleteFlowRun", id=runs[2]["id"])
    tasks = [await broker.ok_cmd("CreateTaskRun", task_key="k", dynamic_key=str(i), flow_run_id=runs[0]["id"])
             for i in range(3)]
    await broker.ok_cmd("SetTaskRunState", id=tasks[0]["id"], state={"type": "RUNNING"})
    await broker.ok_cmd("SetTaskRunState", id=tasks[0]["id"], state={"type": "COMPLETED"})
    await broker.ok_cmd("UpdateTaskRun", id=tasks[1]["id"], name="renamed")
    await broker.ok_cmd("DeleteTaskRun", id=tasks[2]["id"])
    # A run held back by its tag records why it waits (`TaskRunWaiting`, its `waiting_reason`).
    await broker.ok_cmd("CreateTagConcurrencyLimit", tag="w", concurrency_limit=1)
    tagged = [await broker.ok_cmd("CreateTaskRun", task_key="k", dynamic_key=f"w{i}", flow_run_id=runs[0]["id"],
                                  tags=["w"]) for i in range(2)]
    for run in tagged:
        await broker.ok_cmd("SetTaskRunState", id=run["id"], state={"type": "RUNNING"})
    await broker.ok_cmd("SetFlowRunState", id=runs[0]["id"], state={"type": "COMPLETED"})


async def _rows_after(engine, projector, writes_in_batches) -> dict[str, list[Any]]:
    """The projector's tables after the writes, emptied first, in a transaction undone after."""
    async with engine.connect() as conn:
        transaction = await conn.begin()
        driver = await asyncpg_connection(conn)
        for table in reversed(_TABLES[projector.name]):
            await driver.execute(f"DELETE FROM {table}")
        for writes in writes_in_batches:
            for sql, args in writes:
                await driver.execute(sql, *args)
        rows = {table: [dict(r) for r in await driver.fetch(f"SELECT * FROM {table} ORDER BY id")]
                for table in _TABLES[projector.name]}
        await transaction.rollback()
    return rows


async def test_writes_from_stored_events_equal_writes_from_decoded_ones(service, broker, settings):
    await _history(broker)
    log = [RawEvent(seq, subject, data) for seq, subject, data, _ in
           await service.store.read_subject(f"{settings.event_subject_prefix}.>")]
    # Tables of their own: the live read model goes on with the same history meanwhile.
    scratch = f"{settings.db_schema}_writes"
    engine = create_engine(settings, schema=scratch, pool_size=1)
    await migrate(engine, scratch, MIGRATIONS)
    try:
        await _compare(engine, log)
    finally:
        await drop_schema(engine, scratch)
        await engine.dispose()


async def _compare(engine, log: list[RawEvent]) -> None:
    for projector in (FlowRunsProjector(), TaskRunsProjector()):
        for size in (len(log), 5, 1):  # the whole history as one batch, and in pieces
            batches = [log[i:i + size] for i in range(0, len(log), size)]
            decoded_writes, stored_writes = [], []
            for batch in batches:
                decoded, skipped = decode_batch(projector, batch, now=None)  # type: ignore[arg-type]
                assert not skipped
                stored = stored_events(projector, batch)
                assert stored is not None
                assert [(a, t) for a, t, _ in stored] == [(a, t) for a, t, _ in decoded]
                in_any_order = projector.writes(decoded) if decoded else []
                from_stored = projector.raw_writes(stored) if stored else []
                if in_any_order is None:  # a flow run's deletion among task runs: applied in order
                    assert from_stored is None
                    in_any_order = from_stored = projector._writes(decoded)[0]
                decoded_writes.append(in_any_order)
                stored_writes.append(from_stored)
            from_decoded = await _rows_after(engine, projector, decoded_writes)
            from_stored = await _rows_after(engine, projector, stored_writes)
            assert from_stored == from_decoded, (projector.name, size)
            runs, states = _TABLES[projector.name]
            assert from_stored[runs] and from_stored[states], "the history writes rows of both tables"
