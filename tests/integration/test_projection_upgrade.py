"""A rolling upgrade that teaches a projection a new event type: a newer command process may
write events of that type while an older process still runs the projection, whose consumer
never receives them. Once the projection runs the newer version, it finds those events below
its checkpoint and says so (the log, `skipped_events`); by default it then rebuilds its read
model beside the live one and swaps it in, and with that off `runledger rebuild` fills the
gap; it goes on applying what comes next meanwhile. Against real NATS and Postgres,
the older version played by the flow-runs projection without the lease renewals."""

from __future__ import annotations

import asyncio
import logging

from sqlalchemy import text

from runledger.client import RunledgerClient
from runledger.handlers.service import Service, projectors
from runledger.projections.flow_runs import FlowRunsProjector
from runledger.projections.rebuild import rebuild_live

from .broker import drop_service_schema

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


async def _skipped(service: Service) -> list[tuple[str, str]]:
    async with service.engine.connect() as conn:
        return [(r.projection, r.reason) for r in await conn.execute(text("SELECT projection, reason FROM skipped_events"))]


async def _started(settings) -> tuple[Service, RunledgerClient]:
    service = Service(settings)
    await service.start()
    rl = await RunledgerClient(settings).connect()
    await rl.catch_up()
    await rl.count_flow_runs()  # its projections bound and caught up
    return service, rl


async def _until(condition, seconds: float = 30.0) -> None:
    for _ in range(int(seconds / 0.02)):
        if await condition():
            return
        await asyncio.sleep(0.02)
    raise AssertionError(f"{condition.__name__}: waited in vain")


async def _older_wrote_a_renewal(settings, monkeypatch) -> str:
    """An older version's service (its flow-runs projection without the renewals) while a
    renewal is written: returns the run's id."""
    monkeypatch.setattr(FlowRunsProjector, "handles", OLD_HANDLES)
    older, rl = await _started(settings)
    try:
        run_id = await _renewed_run(rl)
        await rl.catch_up()
        assert (await rl.read_flow_run(run_id)).deployment_lease_expiration is None  # never received
        assert await _skipped(older) == []
    finally:
        await rl.close()
        await older.stop()
    monkeypatch.undo()  # the newer version
    return run_id


async def test_a_projection_that_went_past_events_it_now_handles_rebuilds_itself(settings, monkeypatch, caplog):
    caplog.set_level(logging.WARNING, logger="runledger")
    try:
        run_id = await _older_wrote_a_renewal(settings, monkeypatch)
        newer, rl = await _started(settings)
        try:
            async def renewal_read() -> bool:
                return (await rl.read_flow_run(run_id)).deployment_lease_expiration is not None

            async def miss_cleared() -> bool:
                return await _skipped(newer) == []

            async def said() -> bool:  # once its side schema is dropped, just after the swap
                return any("rebuilt from the log" in r.getMessage() for r in caplog.records)

            for rebuilt in (renewal_read, miss_cleared, said):  # rebuilt in the background, swapped in
                await _until(rebuilt)
            # What comes next is applied, into the rebuilt tables.
            renewal = await rl.renew_deployment_slot_lease(run_id, lease_seconds=900)
            assert (await rl.read_flow_run(run_id)).deployment_lease_expiration == renewal.expiration
        finally:
            await rl.close()
            await newer.stop()
    finally:
        await drop_service_schema(settings)


async def test_a_projection_that_learns_an_event_type_says_it_went_past_some(settings, monkeypatch, caplog):
    settings = settings.model_copy(update={"rebuild_missed_event_types": False})
    caplog.set_level(logging.ERROR, logger="runledger")
    try:
        run_id = await _older_wrote_a_renewal(settings, monkeypatch)
        newer, rl = await _started(settings)
        try:
            [(projection, reason)] = await _skipped(newer)
            assert projection == "flow_runs" and "never received FlowRunDeploymentLeaseRenewed" in reason
            assert "runledger rebuild flow_runs" in reason
            assert sum("now handles FlowRunDeploymentLeaseRenewed" in r.getMessage() for r in caplog.records) == 1
            # Rebuilt as the line says, while the service runs: the missed renewal is in.
            await rebuild_live(settings, newer.store, next(p for p in projectors() if p.name == "flow_runs"))
            assert (await rl.read_flow_run(run_id)).deployment_lease_expiration is not None
            assert await _skipped(newer) == []
            # What comes next is applied.
            renewal = await rl.renew_deployment_slot_lease(run_id, lease_seconds=600)
            assert (await rl.read_flow_run(run_id)).deployment_lease_expiration == renewal.expiration
        finally:
            await rl.close()
            await newer.stop()

        # Bound again by the same version: said once only.
        again, rl = await _started(settings)
        await rl.close()
        await again.stop()
        assert sum("now handles FlowRunDeploymentLeaseRenewed" in r.getMessage() for r in caplog.records) == 1
    finally:
        await drop_service_schema(settings)
