"""A deployment without its deleted queue (WP-9) and the runner poll's deciders (DP-17, ST-3),
without I/O."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime

from runledger.commands import deployment_polls as dpp
from runledger.commands import deployments as dp
from runledger.commands import work_pools as wp
from runledger.commands.messages import DecisionContext

NOW = datetime(2026, 1, 1, tzinfo=UTC)


def _pool() -> wp.WorkPool:
    ctx = DecisionContext.fixed(NOW)
    made = wp.decide_create_work_pool(wp.CreateWorkPool(name="p", type="process"), wp.WorkPoolNameClaim(), ctx)
    return made.result


def _deployment(queue_id: uuid.UUID | None, pool_name: str | None = "p") -> dp.Deployment:
    return dp.Deployment(id=uuid.uuid4(), created=NOW, updated=NOW, name="d", flow_id=uuid.uuid4(),
                         work_queue_id=queue_id, work_queue_name="q" if queue_id else None,
                         work_pool_name=pool_name if queue_id else None)


def test_a_deployment_keeps_a_queue_its_pool_still_holds():
    pool = _pool()
    d = _deployment(pool.default_queue_id)
    assert dp.without_deleted_queue(d, pool) is d
    assert dp.without_deleted_queue(_deployment(None), None).work_queue_id is None


def test_a_deleted_queue_or_pool_leaves_the_deployment_without_a_queue_but_with_its_name():
    pool = _pool()
    gone = _deployment(uuid.uuid4())  # not a queue of the pool (any more)
    for now in (pool, None):  # the pool holds no such queue, or the pool is gone
        after = dp.without_deleted_queue(gone, now)
        assert (after.work_queue_id, after.work_pool_name, after.work_queue_name) == (None, None, "q")
        assert after.updated == gone.updated


def test_a_poll_records_the_deployments_that_exist_once_each():
    known, unknown = _deployment(None), uuid.uuid4()
    cmd = dpp.RecordDeploymentsPolled(deployment_ids=[known.id, unknown, known.id])
    decision = dpp.decide_record_polls(cmd, {known.id: known, unknown: None}, DecisionContext.fixed(NOW))
    [new] = decision.events
    assert new.aggregate_id == dpp.poll_id([unknown, known.id])  # the set, whatever its order
    assert new.event == dpp.DeploymentsPolled(deployment_ids=[known.id], polled=NOW)
    nothing = dpp.RecordDeploymentsPolled(deployment_ids=[unknown])
    assert dpp.decide_record_polls(nothing, {unknown: None}, DecisionContext.fixed(NOW)).events == []


def test_a_poll_of_deployments_all_ready_is_routine_and_leaves_the_log_only_after_the_not_ready_delay():
    known = _deployment(None)
    for all_ready in (False, True):
        cmd = dpp.RecordDeploymentsPolled(deployment_ids=[known.id], all_ready=all_ready)
        [new] = dpp.decide_record_polls(cmd, {known.id: known}, DecisionContext.fixed(NOW)).events
        assert new.event.routine is all_ready
        floor = new.event.expires_no_sooner_than()
        # Kept for ever when it makes one READY; else not before the deployments would be NOT_READY.
        assert floor is None if not all_ready else floor > wp.NOT_READY_AFTER.total_seconds()


def test_only_deployments_without_a_queue_are_marked_not_ready_by_id():
    queueless, queued = _deployment(None), _deployment(uuid.uuid4())
    cmd = dpp.MarkQueuelessDeploymentsNotReady(deployment_ids=[queued.id, queueless.id])
    decision = dpp.decide_mark_queueless_not_ready(cmd, {queued.id: queued, queueless.id: queueless},
                                                   DecisionContext.fixed(NOW))
    assert [e.event for e in decision.events] == [
        dpp.QueuelessDeploymentsNotReady(deployment_ids=[queueless.id], checked=NOW)]
