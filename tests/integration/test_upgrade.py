"""Upgrading a database made by an earlier release, against real NATS and Postgres: what a
release adds to a projection reaches the history that projection had already passed.

The release before migration 17 gave neither the flow runs' nor the deployments' projection
the deletions of pools and queues. Bound again with the new filters, a projection starts
after its checkpoint, so the deletions below it would never be read: the live rows would keep
the deleted queue's id where a rebuild clears it (`runledger verify` fails). Migration 17 has
both rebuild from the log, which also fills the deleted deployments' tombstones."""

from __future__ import annotations

from sqlalchemy import text

from runledger.handlers.service import Service
from runledger.infra.nats_connection import connect
from runledger.projections import deployments as dpr
from runledger.projections import flow_runs as frr
from tests.conftest import cleanup_namespace
from tests.integration.broker import Broker, assert_live_equals_rebuild

QUEUES_GONE = frozenset({"WorkPoolDeleted", "WorkQueueDeleted"})
# What the deployments' projection did not read before this release.
NEW_FOR_DEPLOYMENTS = QUEUES_GONE | {"DeploymentsPolled", "QueuelessDeploymentsNotReady"}


async def _as_before_migration_17(service: Service) -> None:
    """The schema as the earlier release left it: migration 17 not applied, its table absent
    (a service of this release made them; the earlier one knew neither)."""
    async with service.batch_engine.begin() as conn:
        await conn.execute(text("DELETE FROM schema_migrations WHERE version = 17"))
        await conn.execute(text("DROP TABLE deleted_deployments"))


async def test_an_upgrade_rebuilds_runs_and_deployments_so_deleted_queues_are_cleared(settings, monkeypatch):
    new_runs, new_deployments = frr.FlowRunsProjector.handles, dpr.DeploymentsProjector.handles
    monkeypatch.setattr(frr.FlowRunsProjector, "handles", new_runs - QUEUES_GONE)
    monkeypatch.setattr(dpr.DeploymentsProjector, "handles", new_deployments - NEW_FOR_DEPLOYMENTS)
    old = Service(settings)
    await old.start()
    try:
        nc = await connect(settings)
        try:
            b = Broker(nc, settings)
            await b.ok_cmd("CreateWorkPool", name="p", type="process")
            flow_id = (await b.ok_cmd("CreateFlow", name="etl"))["id"]
            d = await b.ok_cmd("CreateDeployment", name="d", flow_id=flow_id, work_pool_name="p", work_queue_name="q")
            run = await b.ok_cmd("CreateFlowRunFromDeployment", deployment_id=d["id"])
            gone = await b.ok_cmd("CreateDeployment", name="gone", flow_id=flow_id)
            await b.ok_cmd("DeleteDeployment", id=gone["id"])
            await b.ok_cmd("DeleteWorkQueue", work_pool_name="p", work_queue_name="q")
            # The earlier release's read models: the deleted queue kept.
            assert (await b.ok_qry("GetFlowRun", id=run["id"]))["work_queue_id"] == d["work_queue_id"]
            assert (await b.ok_qry("GetDeployment", id=d["id"]))["work_queue_id"] == d["work_queue_id"]
        finally:
            await nc.close()
        await _as_before_migration_17(old)
    finally:
        await old.stop()
    monkeypatch.setattr(frr.FlowRunsProjector, "handles", new_runs)
    monkeypatch.setattr(dpr.DeploymentsProjector, "handles", new_deployments)
    new = Service(settings)
    await new.start()
    try:
        nc = await connect(settings)
        try:
            b = Broker(nc, settings)
            await b.catch_up()
            assert (await b.ok_qry("GetFlowRun", id=run["id"]))["work_queue_id"] is None
            upgraded = await b.ok_qry("GetDeployment", id=d["id"])
            assert (upgraded["work_queue_id"], upgraded["work_pool_name"], upgraded["work_queue_name"]) == (None, None, "q")
            assert (await b.qry("GetDeployment", id=gone["id"]))["error"]["code"] == "not_found"
        finally:
            await nc.close()
        async with new.engine.connect() as conn:
            tombstones = (await conn.execute(text("SELECT id::text FROM deleted_deployments"))).scalars().all()
        assert tombstones == [gone["id"]]  # the rebuild found the deletion in the log
        await assert_live_equals_rebuild(new, settings)
    finally:
        await new.stop()
        await cleanup_namespace(settings)

