"""A rolling upgrade that teaches a projection a new event type: a newer command process may
write events of that type while an older process still runs the projection, whose consumer
never receives them. Once the projection runs the newer version, it finds those events below
its checkpoint and rebuilds from the log, in a new generation of its checkpoint, so that a
process that ran it before and has not noticed it lost its lease cannot move the checkpoint
forward again past the rebuild. Against real NATS and Postgres, the older version played by
the flow-runs projection without the lease renewals."""

from __future__ import annotations

import asyncio
import logging
from datetime import UTC, datetime

import pytest

from runledger.client import RunledgerClient
from runledger.handlers.service import Service
from runledger.projections import runner as runner_module
from runledger.projections.flow_runs import FlowRunsProjector
from runledger.projections.runner import (
    CheckpointConflict,
    RawEvent,
    apply_batch,
    apply_in_one_statement,
)

from .broker import assert_live_equals_rebuild, drop_service_schema

OLD_HANDLES = FlowRunsProjector.handles - {"FlowRunDeploymentLeaseRenewed"}


async def _renewed_run(rl: RunledgerClient) -> str:
    await rl.create_work_pool("p", type="process")
    flow = await rl.create_flow("upgrade")
    deployment, _ = await rl.create_deployment(flow.id, "d", work_pool_name="p", concurrency_limit=1)
    run = await rl.create_flow_run_from_deployment(deployment.id)
    await rl.set_flow_run_state(run.id, "PENDING")
    await rl.set_flow_run_state(run.id, "RUNNING")
    await rl.renew_deployment_slot_lease(run.id, lease_seconds=600)
    await rl.create_flow("after")  # a later event, so the projection's checkpoint passes the renewal
    return str(run.id)


async def _started(settings) -> tuple[Service, RunledgerClient]:
    """A service whose flow-runs projection is bound (and caught up), and a client of it."""
    service = Service(settings)
    await service.start()
    for _ in range(100):
        if "flow_runs" in service.runner.applied:
            break
        await asyncio.sleep(0.05)
    rl = await RunledgerClient(settings).connect()
    await rl.catch_up()
    await rl.count_flow_runs()
    return service, rl


async def _checkpoint(service: Service) -> tuple[int, int]:
    async with service.engine.connect() as conn:
        row = (await conn.exec_driver_sql(
            "SELECT last_seq, generation FROM projection_checkpoints WHERE name = 'flow_runs'")).one()
    return row.last_seq, row.generation


async def test_a_projection_that_learns_an_event_type_rebuilds_and_fences_off_its_older_writers(
        settings, monkeypatch, caplog):
    caplog.set_level(logging.WARNING, logger="runledger")
    try:
        monkeypatch.setattr(FlowRunsProjector, "handles", OLD_HANDLES)  # the older version
        older, rl = await _started(settings)
        try:
            run_id = await _renewed_run(rl)
            await rl.catch_up()
            assert (await rl.read_flow_run(run_id)).deployment_lease_expiration is None  # never received
            before, old_generation = await _checkpoint(older)
        finally:
            await rl.close()
            await older.stop()

        monkeypatch.undo()  # the newer version
        newer, rl = await _started(settings)
        try:
            assert sum("now handles FlowRunDeploymentLeaseRenewed" in r.getMessage() for r in caplog.records) == 1
            run = await rl.read_flow_run(run_id)
            assert run.deployment_lease_expiration is not None and run.state_type == "RUNNING"
            assert await rl.count_flow_runs() == 1
            after, generation = await _checkpoint(newer)
            assert generation == old_generation + 1 and after >= before
            await assert_live_equals_rebuild(newer, settings)

            # The older process's writes, had it not noticed it lost the lease, change nothing:
            # its saver of idle positions, a batch in one statement, a batch in a transaction.
            seq, subject, data, _ = (await newer.store.read_subject(
                f"{settings.event_subject_prefix}.flow_run.{run_id}.*", 1))[-1]
            stale = RawEvent(seq=after + 1000, subject=subject, data=data)  # a run's event, as stored
            async with (await newer.runner.statements.pool()).acquire() as driver:
                await driver.execute(runner_module._MOVE_CHECKPOINTS_FORWARD_SQL, ["flow_runs"], [after + 1000],
                                     datetime.now(UTC), [old_generation])
            assert await _checkpoint(newer) == (after, generation)
            projector = FlowRunsProjector()
            with pytest.raises(CheckpointConflict):
                await apply_in_one_statement(newer.runner.statements, projector, [stale], after,
                                             generation=old_generation)
            with pytest.raises(CheckpointConflict):
                async with newer.engine.begin() as conn:
                    await apply_batch(conn, projector, [stale], generation=old_generation)
            assert await _checkpoint(newer) == (after, generation)
        finally:
            await rl.close()
            await newer.stop()

        # Bound again by the same version: nothing is rebuilt.
        again, rl = await _started(settings)
        await rl.close()
        await again.stop()
        assert sum("rebuilding it from the log" in r.getMessage() for r in caplog.records) == 1
    finally:
        await drop_service_schema(settings)
