"""The work-pool decider's rules (BEHAVIOUR §1, §2), pure: no broker, no database."""

from __future__ import annotations

import itertools
import uuid
from datetime import UTC, datetime, timedelta

import pytest
from pydantic import ValidationError

from runledger.commands import work_pools as wp
from runledger.commands.events import EventEnvelope
from runledger.commands.messages import DecisionContext, Rejection
from runledger.commands.names import decode_token, encode_token

NOW = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)


_IDS = (uuid.UUID(int=i) for i in itertools.count(1))


def ctx(now: datetime = NOW) -> DecisionContext:
    """Deterministic time and ids; ids never repeat across decisions."""
    return DecisionContext.fixed(now, _IDS)


def fold(state, decision, aggregate=wp.WORK_POOL):
    for e in decision.events:
        if e.aggregate_type == aggregate:
            state = wp.evolve(state, e.event)
    return state


def new_pool(name="p", **kw) -> wp.WorkPool:
    d = wp.decide_create_work_pool(wp.CreateWorkPool(name=name, **kw), wp.WorkPoolNameClaim(), ctx())
    return fold(None, d)


def rejected(fn, *args) -> Rejection:
    with pytest.raises(Rejection) as info:
        fn(*args)
    return info.value


def test_wp1_wp2_create_makes_the_default_queue_and_claims_the_name():
    d = wp.decide_create_work_pool(wp.CreateWorkPool(name="p", type="process"), wp.WorkPoolNameClaim(), ctx())
    claim, created = d.events
    assert claim.aggregate_type == wp.WORK_POOL_NAME and claim.event.name == "p"
    pool = fold(None, d)
    assert pool == d.result
    assert pool.status == wp.Status.NOT_READY
    (q,) = pool.queues.values()
    assert (q.name, q.description, q.priority, q.is_paused, q.concurrency_limit) == (
        "default", "The work pool's default queue.", 1, False, None)
    assert pool.default_queue_id == q.id
    assert new_pool(type="process", is_paused=True).status == wp.Status.PAUSED


def test_wp3_prefect_agent_pools_report_no_status():
    pool = new_pool()  # the default type is prefect-agent
    assert pool.type == "prefect-agent" and wp.work_pool_reply(pool)["status"] is None
    d = wp.decide_update_work_pool(wp.UpdateWorkPool(name="p", is_paused=True), pool, ctx())
    assert d.events[0].event.status is None


def test_wp4_wp5_conflicts_and_reserved_names():
    taken = wp.WorkPoolNameClaim(new_pool().id)
    assert rejected(wp.decide_create_work_pool, wp.CreateWorkPool(name="p"), taken, ctx()).code == "conflict"
    for name in ("Prefect", "prefect-pool", "PrefectPool", "prefect pool"):
        assert rejected(wp.decide_create_work_pool, wp.CreateWorkPool(name=name), wp.WorkPoolNameClaim(), ctx()).code == "forbidden"
    reserved = fold(None, wp.decide_create_work_pool(wp.CreateWorkPool(name="prefect-x", type="process"), wp.WorkPoolNameClaim(), ctx(), internal=True))
    assert rejected(wp.decide_update_work_pool, wp.UpdateWorkPool(name="prefect-x", description="d"), reserved, ctx()).code == "forbidden"
    ok = wp.decide_update_work_pool(wp.UpdateWorkPool(name="prefect-x", is_paused=True, concurrency_limit=2), reserved, ctx())
    assert ok.result.concurrency_limit == 2 and ok.result.status == wp.Status.PAUSED
    assert rejected(wp.decide_delete_work_pool, wp.DeleteWorkPool(name="prefect-x"), reserved, ctx()).code == "forbidden"


def test_wp6_base_job_template():
    good = {"job_configuration": {"image": "{{ image }}", "cmd": ["{{ command }}"]},
            "variables": {"properties": {"image": {}, "command": {}}}}
    assert new_pool(base_job_template=good).base_job_template == good
    bad = {"job_configuration": {"image": "{{ image }} {{ tag }}"}, "variables": {"properties": {"image": {}}}}
    r = rejected(wp.decide_create_work_pool, wp.CreateWorkPool(name="x", base_job_template=bad), wp.WorkPoolNameClaim(), ctx())
    assert (r.code, r.field) == ("invalid", "base_job_template") and "tag" in r.message
    r = rejected(wp.decide_create_work_pool, wp.CreateWorkPool(name="x", base_job_template={"variables": {}}), wp.WorkPoolNameClaim(), ctx())
    assert r.code == "invalid"


def test_wp8_partial_updates_and_status_writes():
    pool = new_pool(type="process", description="d", concurrency_limit=3)
    d = wp.decide_update_work_pool(wp.UpdateWorkPool(name="p", concurrency_limit=0), pool, ctx())
    assert (d.result.concurrency_limit, d.result.description) == (0, "d")
    assert d.events[0].event.changes["concurrency_limit"].model_dump() == {"old": 3, "new": 0}
    paused = fold(pool, wp.decide_update_work_pool(wp.UpdateWorkPool(name="p", is_paused=True), pool, ctx()))
    again = wp.decide_update_work_pool(wp.UpdateWorkPool(name="p", is_paused=True), paused, ctx())
    assert again.events[0].event.status.model_dump() == {"old": "PAUSED", "new": "PAUSED"}  # written again
    resumed = wp.decide_update_work_pool(wp.UpdateWorkPool(name="p", is_paused=False), paused, ctx())
    assert resumed.result.status == wp.Status.NOT_READY  # no online worker
    assert wp.decide_update_work_pool(wp.UpdateWorkPool(name="p", description="d"), pool, ctx()).events == []
    with pytest.raises(ValidationError):
        wp.UpdateWorkPool.model_validate_json('{"name": "p", "concurrency_limit": -5}', strict=True)
    assert rejected(wp.decide_update_work_pool, wp.UpdateWorkPool(name="nope"), None, ctx()).message == 'Work pool "nope" not found.'


def test_wp9_delete_releases_the_name_and_lists_the_queues():
    pool = new_pool()
    pool = fold(pool, wp.decide_create_work_queue(wp.CreateWorkQueue(work_pool_name="p", name="a"), pool, ctx()))
    d = wp.decide_delete_work_pool(wp.DeleteWorkPool(name="p"), pool, ctx())
    release, deleted = d.events
    assert isinstance(release.event, wp.WorkPoolNameReleased)
    assert set(deleted.event.queue_ids) == set(pool.queues)
    assert fold(pool, d) is None
    assert wp.evolve_name(wp.WorkPoolNameClaim(pool.id), release.event) == wp.WorkPoolNameClaim(None)


def test_wq1_to_wq4_queue_creates():
    pool = new_pool()
    d = wp.decide_create_work_queue(wp.CreateWorkQueue(work_pool_name="p", name="A", priority=1, is_paused=True), pool, ctx())
    pool = fold(pool, d)
    prios = {q.name: q.priority for q in pool.queues.values()}
    assert prios == {"A": 1, "default": 2}  # WQ-3
    assert pool.queue_named("A").status == wp.Status.NOT_READY  # WQ-4 quirk
    pool = fold(pool, wp.decide_create_work_queue(wp.CreateWorkQueue(work_pool_name="p", name="B"), pool, ctx()))
    assert pool.queue_named("B").priority == 3  # WQ-2
    assert rejected(wp.decide_create_work_queue, wp.CreateWorkQueue(work_pool_name="p", name="A"), pool, ctx()).code == "conflict"
    assert rejected(wp.decide_create_work_queue, wp.CreateWorkQueue(work_pool_name="x", name="A"), None, ctx()).code == "not_found"


def test_wq5_wq6_wq7_update_rename_and_delete():
    pool = new_pool()
    for n in ("a", "b"):
        pool = fold(pool, wp.decide_create_work_queue(wp.CreateWorkQueue(work_pool_name="p", name=n), pool, ctx()))
    r = rejected(wp.decide_update_work_queue, wp.UpdateWorkQueue(work_pool_name="p", work_queue_name="a", name="b"), pool, ctx())
    assert r.code == "conflict"
    renamed = fold(pool, wp.decide_update_work_queue(wp.UpdateWorkQueue(work_pool_name="p", work_queue_name="default", name="main"), pool, ctx()))
    assert renamed.queue_named("main").id == renamed.default_queue_id and renamed.queue_named("default") is None
    r = rejected(wp.decide_delete_work_queue, wp.DeleteWorkQueue(work_pool_name="p", work_queue_name="main"), renamed, ctx())
    assert (r.code, r.message) == ("conflict", "Can't delete a pool's default queue.")
    r = rejected(wp.decide_update_work_queue, wp.UpdateWorkQueue(work_pool_name="p", work_queue_name="zz"), pool, ctx())
    assert r.message == "Work pool queue 'p/zz' not found."
    assert wp.decide_update_work_queue(wp.UpdateWorkQueue(work_pool_name="p", work_queue_name="a", description=""), pool, ctx()).events == []


@pytest.mark.parametrize("seconds_ago, expected", [(None, "NOT_READY"), (30, "READY"), (60, "READY"), (61, "NOT_READY")])
def test_wq8_unpause_looks_at_the_last_poll(seconds_ago, expected):
    pool = new_pool()
    pool = fold(pool, wp.decide_create_work_queue(wp.CreateWorkQueue(work_pool_name="p", name="a"), pool, ctx()))
    pool = fold(pool, wp.decide_update_work_queue(wp.UpdateWorkQueue(work_pool_name="p", work_queue_name="a", is_paused=True), pool, ctx()))
    assert pool.queue_named("a").status == wp.Status.PAUSED
    again = wp.decide_update_work_queue(wp.UpdateWorkQueue(work_pool_name="p", work_queue_name="a", is_paused=True), pool, ctx())
    assert again.events == []  # already paused: no status change, no event
    fields = {} if seconds_ago is None else {"last_polled": NOW - timedelta(seconds=seconds_ago)}
    d = wp.decide_update_work_queue(wp.UpdateWorkQueue(work_pool_name="p", work_queue_name="a", is_paused=False, **fields), pool, ctx())
    assert d.result[1].status == expected


def test_wq9_wq11_legacy_queues():
    claim = wp.WorkPoolNameClaim()
    d = wp.decide_create_legacy_work_queue(wp.CreateLegacyWorkQueue(name="default"), claim, None, ctx())
    pool, queue = d.result
    assert pool.name == "default-agent-pool" and queue.id == pool.default_queue_id and len(d.events) == 2
    d = wp.decide_create_legacy_work_queue(wp.CreateLegacyWorkQueue(name="q1"), claim, None, ctx())
    assert d.result[1].priority == 2 and len(d.events) == 3  # claim, pool, queue: one batch
    pool = d.result[0]
    by_id = wp.decide_update_work_queue_by_id(wp.UpdateWorkQueueById(id=d.result[1].id, priority=1), pool, ctx())
    after = fold(pool, by_id)
    assert sorted(q.priority for q in after.queues.values()) == [1, 1]  # WQ-11: stored as given


def test_events_survive_the_envelope_round_trip():
    d = wp.decide_create_work_pool(wp.CreateWorkPool(name="ü p~.", type="k8s"), wp.WorkPoolNameClaim(), ctx())
    for e in d.events:
        env = EventEnvelope.wrap(e.aggregate_id, e.event, occurred=NOW, event_id=d.result.id)
        again = EventEnvelope.model_validate_json(env.model_dump_json())
        assert again.decode() == e.event
    assert decode_token(encode_token("ü p~.")) == "ü p~."
    assert not set(encode_token("a.b*c>d e")) & set(".*> ")


@pytest.mark.parametrize("body", [
    '{"name": "a/b"}', '{"name": "  \\"\'"}', '{"name": ""}', '{"name": "p", "bogus": 1}',
    '{"name": "p", "is_paused": "yes"}', '{"name": "p", "concurrency_limit": "1"}', '{"name": "' + "x" * 256 + '"}',
    '{"name": "p", "storage_configuration": {"nope": 1}}',
])
def test_malformed_create_payloads_fail_validation(body):
    with pytest.raises(ValidationError):
        wp.CreateWorkPool.model_validate_json(body, strict=True)
