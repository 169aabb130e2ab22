"""Workers and what workers and polls decide on the pool, pure: heartbeats (WK-1, WK-2), going
offline (WK-3), pools not ready (WK-4), deletion (WK-6), polls (GS-9, ST-2) and the foreman's
re-checks (ST-2, ST-3). No broker, no database: time and ids come from the context."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta

import pytest

from runledger.commands import messages
from runledger.commands import work_pools as wp
from runledger.commands import workers as wk
from runledger.commands.decisions import Decision
from runledger.commands.messages import DecisionContext, Rejection

NOW = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)


def ctx(at: datetime = NOW) -> DecisionContext:
    return DecisionContext.fixed(at)


def pool(**fields) -> wp.WorkPool:
    made = wp.decide_create_work_pool(wp.CreateWorkPool(name="p", type="process", **fields),
                                      wp.WorkPoolNameClaim(), ctx())
    return made.result


def fold(p: wp.WorkPool, worker: wk.Worker | None, d: Decision) -> tuple[wp.WorkPool, wk.Worker | None]:
    for new in d.events:
        if new.aggregate_type == wp.WORK_POOL:
            p = wp.evolve(p, new.event)
        else:
            worker = wk.evolve(worker, new.event)
    return p, worker


def beat(p, worker, at=NOW, name="w", **fields):
    d = wk.decide_heartbeat(wk.WorkerHeartbeat(work_pool_name="p", name=name, **fields), p, worker, ctx(at))
    return d, *fold(p, worker, d)


def test_a_first_heartbeat_makes_an_online_worker_and_a_ready_pool():
    d, p, w = beat(pool(), None, heartbeat_interval_seconds=10)
    assert w.status is wk.WorkerStatus.ONLINE and w.last_heartbeat_time == NOW and w.heartbeat_interval_seconds == 10
    assert w.id == wk.worker_id(p.id, "w") and d.created is True
    assert p.status is wp.Status.READY and p.online_workers == {"w"} and p.has_online_worker
    pool_event = [e.event for e in d.events if e.aggregate_type == wp.WORK_POOL]
    assert pool_event == [wp.WorkPoolWorkersChanged(online=["w"], status=wp.Change(old="NOT_READY", new="READY"))]


def test_a_steady_heartbeat_writes_the_worker_alone_and_keeps_its_interval():
    _, p, w = beat(pool(), None, heartbeat_interval_seconds=10)
    d, p2, w2 = beat(p, w, NOW + timedelta(seconds=10))
    assert [e.aggregate_type for e in d.events] == [wk.WORKER] and d.created is False
    assert w2.heartbeat_interval_seconds == 10 and w2.created == NOW and w2.last_heartbeat_time > NOW
    assert p2 == p


def test_only_a_beat_that_changes_nothing_but_the_time_may_expire_from_the_log():
    from runledger.commands.events import encode_event

    def kinds(d: Decision) -> list[str]:
        return [e.event.event_type for e in d.events if e.aggregate_type == wk.WORKER]

    first, p, w = beat(pool(), None, heartbeat_interval_seconds=10)
    assert kinds(first) == ["WorkerHeartbeatRecorded"]
    routine, p, w2 = beat(p, w, NOW + timedelta(seconds=10))
    assert kinds(routine) == ["WorkerHeartbeatRenewed"] and w2.last_heartbeat_time == NOW + timedelta(seconds=10)
    # Kept at least until the worker, silent, would have been marked offline, and a margin more.
    renewed = routine.events[0].event
    assert renewed.expires_no_sooner_than() == 30 + messages.EXPIRY_MARGIN_SECONDS
    assert encode_event("w", renewed, occurred=NOW, event_id=uuid.uuid4()).expires_no_sooner_than == 90
    assert first.events[0].event.expires_no_sooner_than() is None
    changed, p, w3 = beat(p, w2, NOW + timedelta(seconds=20), heartbeat_interval_seconds=30)
    assert kinds(changed) == ["WorkerHeartbeatRecorded"] and w3.heartbeat_interval_seconds == 30
    offline = wk.decide_mark_offline(wk.MarkWorkerOffline(work_pool_name="p", name="w"), p, w3,
                                     ctx(NOW + timedelta(seconds=200)))
    p, w4 = fold(p, w3, offline)
    assert w4.status is wk.WorkerStatus.OFFLINE
    back, _, w5 = beat(p, w4, NOW + timedelta(seconds=210))
    assert kinds(back) == ["WorkerHeartbeatRecorded"] and w5.status is wk.WorkerStatus.ONLINE


@pytest.mark.parametrize(("floor", "retention", "ttl"), [
    (None, 86_400, None),  # every event but a routine one is kept for ever
    (40.0, 0, None),  # retention 0: routine beats too
    (40.0, 86_400, 86_400),
    (40.0, 10, 40),  # never before the worker's latest word is sure to be another event
    (40.2, 1, 41)])
def test_how_long_the_log_keeps_an_event(floor, retention, ttl):
    from runledger.infra.event_store import message_ttl

    assert message_ttl(floor, retention) == ttl


def test_a_heartbeat_leaves_a_paused_pool_paused():
    d, p, w = beat(pool(is_paused=True), None)
    assert p.status is wp.Status.PAUSED and w.status is wk.WorkerStatus.ONLINE and p.has_online_worker
    assert d.events[1].event.status is None


def test_unknown_pool():
    with pytest.raises(Rejection) as e:
        wk.decide_heartbeat(wk.WorkerHeartbeat(work_pool_name="nope", name="w"), None, None, ctx())
    assert e.value.code == "not_found"


@pytest.mark.parametrize(("interval", "silent", "offline"), [
    (None, 90, False), (None, 91, True), (0, 91, True), (60, 180, False), (60, 181, True)])
def test_going_offline_after_three_intervals(interval, silent, offline):
    _, p, w = beat(pool(), None, heartbeat_interval_seconds=interval)
    d = wk.decide_mark_offline(wk.MarkWorkerOffline(work_pool_name="p", name="w"), p, w,
                               ctx(NOW + timedelta(seconds=silent)))
    assert bool(d.events) is offline
    if offline:
        p, w = fold(p, w, d)
        assert w.status is wk.WorkerStatus.OFFLINE and p.online_workers == frozenset()
        assert p.status is wp.Status.READY  # the foreman's next step decides the pool
        again = wk.decide_mark_offline(wk.MarkWorkerOffline(work_pool_name="p", name="w"), p, w,
                                       ctx(NOW + timedelta(hours=1)))
        assert again.events == []


def test_a_pool_is_not_ready_only_when_ready_and_without_online_workers():
    mark = wp.MarkWorkPoolNotReady(work_pool_name="p")
    _, p, w = beat(pool(), None)
    assert wp.decide_mark_work_pool_not_ready(mark, p, ctx()).events == []  # a worker is online
    d = wk.decide_mark_offline(wk.MarkWorkerOffline(work_pool_name="p", name="w"), p, w, ctx(NOW + timedelta(hours=1)))
    p, w = fold(p, w, d)
    d = wp.decide_mark_work_pool_not_ready(mark, p, ctx())
    p = wp.evolve(p, d.events[0].event)
    assert p.status is wp.Status.NOT_READY
    assert wp.decide_mark_work_pool_not_ready(mark, p, ctx()).events == []  # never twice
    assert wp.decide_mark_work_pool_not_ready(mark, pool(is_paused=True), ctx()).events == []  # never PAUSED


def test_deleting_a_worker():
    _, p, w = beat(pool(), None)
    with pytest.raises(Rejection) as e:
        wk.decide_delete_worker(wk.DeleteWorker(work_pool_name="p", name="x"), p, None, ctx())
    assert (e.value.code, e.value.message) == ("not_found", "Worker not found.")
    d = wk.decide_delete_worker(wk.DeleteWorker(work_pool_name="p", name="w"), p, w, ctx())
    p, w = fold(p, w, d)
    assert w is None and not p.has_online_worker


def test_a_poll_records_every_queue_and_readies_the_not_ready_ones():
    p = pool()
    made = wp.decide_create_work_queue(wp.CreateWorkQueue(work_pool_name="p", name="paused", is_paused=True), p, ctx())
    p, paused = made.result
    other = uuid.UUID(int=999)
    d = wp.decide_record_polls(wp.RecordWorkQueuesPolled(work_pool_name="p", work_queue_ids=[paused.id, other]), p, ctx())
    event = d.events[0].event
    assert event == wp.WorkQueuesPolled(queue_ids=[paused.id], ready=[paused.id], polled=NOW)
    p = wp.evolve(p, event)
    assert p.queues[paused.id].status is wp.Status.READY and p.queues[paused.id].last_polled == NOW
    later = NOW + timedelta(seconds=5)
    again = wp.decide_record_polls(wp.RecordWorkQueuesPolled(work_pool_name="p", work_queue_ids=[paused.id]), p, ctx(later))
    assert again.events[0].event.ready == []  # READY stays, last_polled moves
    assert p.status is wp.Status.NOT_READY  # a poll never touches the pool's status


def test_a_poll_is_routine_only_when_every_queue_it_names_was_ready():
    """A routine poll moves nothing but `last_polled`, so it may expire from the log; one that
    makes a queue READY, or names a PAUSED or NOT_READY one, is kept."""
    p = pool()
    q = p.default_queue_id
    p, paused = wp.decide_create_work_queue(wp.CreateWorkQueue(work_pool_name="p", name="paused", is_paused=True),
                                            p, ctx()).result

    def poll(*ids):
        return wp.decide_record_polls(wp.RecordWorkQueuesPolled(work_pool_name="p", work_queue_ids=list(ids)),
                                      p, ctx()).events[0].event

    first = poll(q)
    assert (first.routine, first.expires_no_sooner_than()) == (False, None)
    p = wp.evolve(p, first)
    second = poll(q)
    assert second.routine and second.expires_no_sooner_than() == 60 + messages.EXPIRY_MARGIN_SECONDS
    assert not poll(q, paused.id).routine  # a paused queue's last poll has no foreman to keep it


def test_the_foreman_rechecks_queues_and_deployments_against_the_log():
    p = pool()
    q = p.default_queue_id
    p = wp.evolve(p, wp.WorkQueuesPolled(queue_ids=[q], ready=[q], polled=NOW))
    queues = wp.MarkWorkQueuesNotReady(work_pool_name="p", work_queue_ids=[q])
    later = NOW + timedelta(hours=1)  # told by a client: never later than the decision's now
    deployments = wp.MarkDeploymentsNotReady(work_pool_name="p", work_queue_id=q, deployment_ids=[uuid.UUID(int=5)],
                                             last_polled={uuid.UUID(int=5): NOW, uuid.UUID(int=6): later})
    at_60 = ctx(NOW + timedelta(seconds=60))
    assert wp.decide_mark_work_queues_not_ready(queues, p, at_60).events == []  # not older than 60 s
    assert wp.decide_mark_deployments_not_ready(deployments, p, at_60).events == []
    at_61 = ctx(NOW + timedelta(seconds=61))
    d = wp.decide_mark_work_queues_not_ready(queues, p, at_61)
    # Each queue's last poll goes with it: the routine polls that said it may leave the log.
    assert d.events[0].event == wp.WorkQueuesNotReady(queue_ids=[q], checked=at_61.now, last_polled={q: NOW})
    marked = wp.decide_mark_deployments_not_ready(deployments, p, at_61).events[0].event
    assert (marked.deployment_ids, marked.last_polled) == ([uuid.UUID(int=5)], {uuid.UUID(int=5): NOW})
    assert wp.last_polled_of([uuid.UUID(int=6)], {uuid.UUID(int=6): later}, at_61.now) == {uuid.UUID(int=6): at_61.now}
    p = wp.evolve(p, d.events[0].event)
    assert p.queues[q].status is wp.Status.NOT_READY
    assert wp.decide_mark_work_queues_not_ready(queues, p, at_61).events == []
    assert wp.decide_mark_work_queues_not_ready(queues, pool(), at_61).events == []  # never polled: untouched
