"""A rolling upgrade that teaches a projection a new event type: a newer command process may
write events of that type while an older process still runs the projection, whose consumer
never receives them; once the projection runs the newer version, it finds those events below
its checkpoint and rebuilds from the log, so they are applied after all. Against real NATS
and Postgres, the older version played by the flow-runs projection without the lease
renewals."""

from __future__ import annotations

import asyncio
import logging

from runledger.client import RunledgerClient
from runledger.handlers.service import Service
from runledger.projections.flow_runs import FlowRunsProjector

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


async def test_a_projection_that_learns_an_event_type_applies_those_it_went_past(settings, monkeypatch, caplog):
    caplog.set_level(logging.WARNING, logger="runledger")
    try:
        monkeypatch.setattr(FlowRunsProjector, "handles", OLD_HANDLES)  # the older version
        older = Service(settings)
        await older.start()
        try:
            async with RunledgerClient(settings) as rl:
                run_id = await _renewed_run(rl)
                await rl.catch_up()
                assert (await rl.read_flow_run(run_id)).deployment_lease_expiration is None  # never received
        finally:
            await older.stop()

        monkeypatch.undo()  # the newer version
        newer = Service(settings)
        await newer.start()
        try:
            # Its runner bound the projection (and rebuilt it): from then on its queries wait
            # for it. (A query answered before, from the checkpoint an older process left, may
            # read the rebuild half done: docs/operations.md, "Upgrading".)
            for _ in range(100):
                if "flow_runs" in newer.runner.applied:
                    break
                await asyncio.sleep(0.05)
            async with RunledgerClient(settings) as rl:
                await rl.catch_up()
                run = await rl.read_flow_run(run_id)
                assert any("now handles FlowRunDeploymentLeaseRenewed" in r.getMessage() for r in caplog.records)
                assert run.deployment_lease_expiration is not None and run.state_type == "RUNNING"
                assert (await rl.count_flow_runs()) == 1
            await assert_live_equals_rebuild(newer, settings)
        finally:
            await newer.stop()

        # Bound again with the same types: nothing is rebuilt.
        caplog.clear()
        again = Service(settings)
        await again.start()
        async with RunledgerClient(settings) as rl:
            await rl.catch_up()
            await rl.count_flow_runs()  # bound and caught up
        await again.stop()
        assert not any("rebuilding it from the log" in r.getMessage() for r in caplog.records)
    finally:
        await drop_service_schema(settings)
