"""The export of the log in Prefect's vocabulary (BEHAVIOUR §10), pure: real events made by
the deciders, wrapped in envelopes and read back from JSON as the CLI reads them, turned into
Prefect events and compared with what Prefect's `prefect.server.models.events` builds."""

from __future__ import annotations

import itertools
import uuid
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from typing import Any

from runledger.commands import prefect_events as pe
from runledger.commands import work_pools as wp
from runledger.commands.decisions import Decision
from runledger.commands.events import EVENT_TYPES, EventEnvelope
from runledger.commands.messages import DecisionContext

NOW = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)
NOW_JSON = "2026-03-01T12:00:00Z"


def uid(i: int) -> uuid.UUID:
    return uuid.UUID(int=i)


class Log:
    """A log being written: decisions become envelopes (ids from a counter), the pool states
    fold as the service folds them, and the export folds its own state."""

    def __init__(self) -> None:
        self._ids = (uid(i) for i in itertools.count(1))
        self._event_ids = (uuid.UUID(int=(1 << 100) + i) for i in itertools.count(1))
        self.pools: dict[str, wp.WorkPool] = {}
        self.envelopes: list[EventEnvelope] = []
        self.export = pe.ExportState()

    def pool(self, name: str) -> wp.WorkPool:
        (pool,) = [p for p in self.pools.values() if p.name == name]
        return pool

    def run(self, decide, cmd, *state, now: datetime = NOW) -> list[dict[str, Any]]:
        decision: Decision = decide(cmd, *state, DecisionContext.fixed(now, self._ids))
        out: list[dict[str, Any]] = []
        for new in decision.events:
            envelope = EventEnvelope.wrap(new.aggregate_id, new.event, occurred=now, event_id=next(self._event_ids))
            envelope = EventEnvelope.model_validate_json(envelope.model_dump_json())  # as stored
            self.envelopes.append(envelope)
            if new.aggregate_type == wp.WORK_POOL:
                after = wp.evolve(self.pools.get(new.aggregate_id), new.event)
                if after is None:
                    self.pools.pop(new.aggregate_id, None)
                else:
                    self.pools[new.aggregate_id] = after
            out += pe.to_prefect_events(envelope, self.export)
        return out

    def create_pool(self, name: str, *, now: datetime = NOW, **fields) -> list[dict[str, Any]]:
        return self.run(wp.decide_create_work_pool, wp.CreateWorkPool(name=name, **fields), wp.WorkPoolNameClaim(),
                        now=now)

    def update_pool(self, name: str, *, now: datetime = NOW, **fields) -> list[dict[str, Any]]:
        return self.run(wp.decide_update_work_pool, wp.UpdateWorkPool(name=name, **fields), self.pool(name), now=now)

    def create_queue(self, pool: str, name: str, **fields) -> list[dict[str, Any]]:
        cmd = wp.CreateWorkQueue(work_pool_name=pool, name=name, **fields)
        return self.run(wp.decide_create_work_queue, cmd, self.pool(pool))

    def update_queue(self, pool: str, queue: str, *, now: datetime = NOW, **fields) -> list[dict[str, Any]]:
        cmd = wp.UpdateWorkQueue(work_pool_name=pool, work_queue_name=queue, **fields)
        return self.run(wp.decide_update_work_queue, cmd, self.pool(pool), now=now)


def names(events: list[dict[str, Any]]) -> list[str]:
    return [e["event"] for e in events]


def pool_ref(pool: wp.WorkPool) -> dict[str, str]:
    """A queue event's related pool, as Prefect's work_queue_*_event builds it."""
    return {"prefect.resource.id": f"prefect.work-pool.{pool.id}", "prefect.resource.name": pool.name,
            "prefect.work-pool.type": pool.type, "prefect.resource.role": "work-pool"}


def queue_res(queue_id: uuid.UUID, name: str) -> dict[str, str]:
    return {"prefect.resource.id": f"prefect.work-queue.{queue_id}", "prefect.resource.name": name,
            "prefect.resource.role": "work-queue"}


def qid(pool: wp.WorkPool, name: str) -> uuid.UUID:
    queue = pool.queue_named(name)
    assert queue is not None
    return queue.id


# =============================================================================================
# Work pools


def test_creating_a_pool_emits_its_default_queue_then_the_pool_then_its_status():
    log = Log()
    out = log.create_pool("etl", type="process")
    pool = log.pool("etl")
    assert names(out) == ["prefect.work-queue.created", "prefect.work-pool.created", "prefect.work-pool.not-ready"]
    queue_created, pool_created, status = out
    assert queue_created == {
        "occurred": NOW_JSON, "event": "prefect.work-queue.created",
        "resource": queue_res(pool.default_queue_id, "default"), "related": [pool_ref(pool)], "payload": {},
        "id": queue_created["id"], "follows": None,
    }
    assert pool_created == {
        "occurred": NOW_JSON, "event": "prefect.work-pool.created",
        "resource": {"prefect.resource.id": f"prefect.work-pool.{pool.id}", "prefect.resource.name": "etl",
                     "prefect.work-pool.type": "process", "prefect.resource.role": "work-pool"},
        "related": [{"prefect.resource.id": f"prefect.work-queue.{pool.default_queue_id}",
                     "prefect.resource.role": "default-queue"}],
        "payload": {}, "id": pool_created["id"], "follows": None,
    }
    # work_pool_status_event: no role, no related; nothing precedes a creation
    assert status["resource"] == {"prefect.resource.id": f"prefect.work-pool.{pool.id}",
                                  "prefect.resource.name": "etl", "prefect.work-pool.type": "process"}
    assert (status["related"], status["payload"], status["follows"]) == ([], {}, None)


def test_a_pool_created_paused_emits_paused_and_a_prefect_agent_pool_no_status():
    log = Log()
    assert names(log.create_pool("p", type="k8s", is_paused=True))[-1] == "prefect.work-pool.paused"
    assert names(log.create_pool("agent")) == ["prefect.work-queue.created", "prefect.work-pool.created"]  # WP-3


def test_a_result_storage_block_is_a_related_resource_of_the_pool():
    log = Log()
    block = str(uid(999))
    out = log.create_pool("p", type="process", storage_configuration={"default_result_storage_block_id": block})
    assert out[1]["related"][1] == {"prefect.resource.id": f"prefect.block-document.{block}",
                                    "prefect.resource.role": "result-storage"}


def test_a_pool_update_lists_the_changed_fields_from_and_to():
    log = Log()
    log.create_pool("p", type="process", concurrency_limit=2)
    pool = log.pool("p")
    out = log.update_pool("p", description="d", concurrency_limit=5, base_job_template={})
    (updated,) = out  # base_job_template did not change: not listed
    assert updated["event"] == "prefect.work-pool.updated"
    assert updated["resource"] == {"prefect.resource.id": f"prefect.work-pool.{pool.id}",
                                   "prefect.resource.name": "p", "prefect.work-pool.type": "process",
                                   "prefect.resource.role": "work-pool"}
    assert updated["related"] == []
    assert updated["payload"] == {"updated_fields": ["description", "concurrency_limit"],
                                  "updates": {"description": {"from": None, "to": "d"},
                                              "concurrency_limit": {"from": 2, "to": 5}}}
    storage = {"default_result_storage_block_id": str(uid(7))}
    (updated,) = log.update_pool("p", storage_configuration=storage)
    assert updated["payload"]["updates"]["storage_configuration"] == {
        "from": {"bundle_upload_step": None, "bundle_execution_step": None, "default_result_storage_block_id": None},
        "to": {"bundle_upload_step": None, "bundle_execution_step": None, "default_result_storage_block_id": str(uid(7))},
    }


def test_pausing_a_pool_is_only_a_status_event_and_every_status_write_is_one():
    log = Log()
    log.create_pool("p", type="process")
    (paused,) = log.update_pool("p", is_paused=True)
    assert paused["event"] == "prefect.work-pool.paused" and paused["follows"] is None  # creation sets nothing
    # WP-8: pausing again writes the status again, and the event follows the previous one
    (again,) = log.update_pool("p", is_paused=True, now=NOW + timedelta(minutes=1))
    assert again["event"] == "prefect.work-pool.paused" and again["follows"] == paused["id"]
    # resuming: NOT_READY without an online worker ...
    (resumed,) = log.update_pool("p", is_paused=False, now=NOW + timedelta(minutes=2))
    assert resumed["event"] == "prefect.work-pool.not-ready" and resumed["follows"] == again["id"]
    # ... READY with one (WP-8); more than ten minutes later nothing is followed
    log.pools[str(log.pool("p").id)] = replace(log.pool("p"), has_online_worker=True)
    log.update_pool("p", is_paused=True, now=NOW + timedelta(minutes=3))
    (ready,) = log.update_pool("p", is_paused=False, description="x", now=NOW + timedelta(minutes=14))[1:]
    assert ready["event"] == "prefect.work-pool.ready" and ready["follows"] is None


def test_resuming_a_pool_that_was_not_paused_still_writes_and_reports_its_status():
    log = Log()
    log.create_pool("p", type="process")
    (resumed,) = log.update_pool("p", is_paused=False)  # NOT_READY -> NOT_READY: Prefect emits it (WP-8)
    assert resumed["event"] == "prefect.work-pool.not-ready"
    assert log.envelopes[-1].payload["status"] == {"old": "NOT_READY", "new": "NOT_READY"}


def test_an_update_with_a_status_emits_updated_first():
    log = Log()
    log.create_pool("p", type="process")
    assert names(log.update_pool("p", is_paused=True, description="x")) == [
        "prefect.work-pool.updated", "prefect.work-pool.paused"]


def test_pausing_a_prefect_agent_pool_emits_nothing():
    log = Log()
    log.create_pool("agent")
    assert log.update_pool("agent", is_paused=True) == []  # the runledger event exists (is_paused changed)
    assert log.envelopes[-1].type == "WorkPoolUpdated"


def test_deleting_a_pool_deletes_each_queue_in_priority_order_then_the_pool():
    log = Log()
    log.create_pool("p", type="process")
    log.create_queue("p", "b")
    log.create_queue("p", "a", priority=1)  # a1 default2 b3
    pool = log.pool("p")
    out = log.run(wp.decide_delete_work_pool, wp.DeleteWorkPool(name="p"), pool)
    assert names(out) == ["prefect.work-queue.deleted"] * 3 + ["prefect.work-pool.deleted"]
    assert [e["resource"] for e in out[:3]] == [queue_res(qid(pool, n), n) for n in ("a", "default", "b")]
    assert all(e["related"] == [pool_ref(pool)] for e in out[:3])
    assert out[3]["resource"] == {"prefect.resource.id": f"prefect.work-pool.{pool.id}",
                                  "prefect.resource.name": "p", "prefect.work-pool.type": "process",
                                  "prefect.resource.role": "work-pool"}
    assert out[3]["related"] == [{"prefect.resource.id": f"prefect.work-queue.{pool.default_queue_id}",
                                  "prefect.resource.role": "default-queue"}]
    assert str(pool.id) not in log.export.pools


def test_the_name_claim_events_produce_nothing_and_are_not_skipped():
    log = Log()
    log.create_pool("p", type="process")
    log.run(wp.decide_delete_work_pool, wp.DeleteWorkPool(name="p"), log.pool("p"))
    claims = [e for e in log.envelopes if e.aggregate_type == wp.WORK_POOL_NAME]
    assert [e.type for e in claims] == ["WorkPoolNameClaimed", "WorkPoolNameReleased"]
    assert all(pe.to_prefect_events(e, log.export) == [] for e in claims)
    assert not log.export.skipped and log.export.warning() is None


# =============================================================================================
# Work queues


def test_creating_a_queue_names_its_pool_and_moved_queues_emit_nothing():
    log = Log()
    log.create_pool("p", type="process")
    (created,) = log.create_queue("p", "high", priority=1)  # WQ-3: default moves to 2, silently
    pool = log.pool("p")
    assert created == {"occurred": NOW_JSON, "event": "prefect.work-queue.created",
                       "resource": queue_res(qid(pool, "high"), "high"), "related": [pool_ref(pool)],
                       "payload": {}, "id": created["id"], "follows": None}


def test_a_queue_update_lists_name_description_limit_and_priority():
    log = Log()
    log.create_pool("p", type="process")
    log.create_queue("p", "a")
    log.create_queue("p", "b")  # default1 a2 b3
    pool = log.pool("p")
    out = log.update_queue("p", "a", name="renamed", description="d", concurrency_limit=4, priority=1,
                           last_polled=NOW)
    (updated,) = out  # default moved to 2 by PR-1: no event for it (Prefect: none)
    assert updated["resource"] == queue_res(qid(pool, "a"), "renamed")  # the name after the update
    assert updated["related"] == [pool_ref(pool)]
    assert updated["payload"] == {
        "updated_fields": ["name", "description", "concurrency_limit", "priority"],
        "updates": {"name": {"from": "a", "to": "renamed"}, "description": {"from": "", "to": "d"},
                    "concurrency_limit": {"from": None, "to": 4}, "priority": {"from": 2, "to": 1}}}
    assert log.update_queue("p", "renamed", last_polled=NOW + timedelta(seconds=5)) == []  # last_polled alone


def test_queue_status_events_pause_and_resume():
    log = Log()
    log.create_pool("p", type="process")
    log.create_queue("p", "q")
    pool = log.pool("p")
    out = log.update_queue("p", "q", is_paused=True, description="x")
    assert names(out) == ["prefect.work-queue.updated", "prefect.work-queue.paused"]
    assert out[1]["resource"] == queue_res(qid(pool, "q"), "q") and out[1]["related"] == [pool_ref(pool)]
    assert log.update_queue("p", "q", is_paused=True) == []  # already PAUSED: no status change (WQ-8)
    # resuming: NOT_READY when not polled recently, READY when polled within 60 s
    assert names(log.update_queue("p", "q", is_paused=False)) == ["prefect.work-queue.not-ready"]
    log.update_queue("p", "q", is_paused=True)
    out = log.update_queue("p", "q", is_paused=False, last_polled=NOW - timedelta(seconds=30))
    assert names(out) == ["prefect.work-queue.ready"]
    assert log.update_queue("p", "q", is_paused=False) == []  # not paused: nothing


def test_deleting_a_queue():
    log = Log()
    log.create_pool("p", type="process")
    log.create_queue("p", "q")
    pool = log.pool("p")
    cmd = wp.DeleteWorkQueue(work_pool_name="p", work_queue_name="q")
    (deleted,) = log.run(wp.decide_delete_work_queue, cmd, pool)
    assert deleted["event"] == "prefect.work-queue.deleted"
    assert deleted["resource"] == queue_res(qid(pool, "q"), "q") and deleted["related"] == [pool_ref(pool)]
    assert str(qid(pool, "q")) not in log.export.pools[str(pool.id)].queues


def test_a_bulk_reprioritisation_is_one_update_per_moved_queue():
    log = Log()
    log.create_pool("p", type="process")
    log.create_queue("p", "a")
    log.create_queue("p", "b")  # default1 a2 b3
    pool = log.pool("p")
    cmd = wp.SetWorkQueuePriorities(work_pool_name="p", priorities={"b": 1})
    out = log.run(wp.decide_set_work_queue_priorities, cmd, pool)  # b1 default2 a3
    assert names(out) == ["prefect.work-queue.updated"] * 3
    got = {e["resource"]["prefect.resource.name"]: e["payload"] for e in out}
    assert got == {n: {"updated_fields": ["priority"], "updates": {"priority": {"from": f, "to": t}}}
                   for n, f, t in (("b", 3, 1), ("default", 1, 2), ("a", 2, 3))}
    assert all(e["related"] == [pool_ref(pool)] for e in out)
    # the export tracked the new priorities: a second move reports from the right values
    cmd = wp.SetWorkQueuePriorities(work_pool_name="p", priorities={"a": 1})
    out = log.run(wp.decide_set_work_queue_priorities, cmd, log.pool("p"))
    got = {e["resource"]["prefect.resource.name"]: e["payload"]["updates"]["priority"] for e in out}
    assert got == {"a": {"from": 3, "to": 1}, "b": {"from": 1, "to": 2}, "default": {"from": 2, "to": 3}}


# =============================================================================================
# Legacy (pool-less) commands


def test_legacy_queue_commands():
    log = Log()
    out = log.run(wp.decide_create_legacy_work_queue, wp.CreateLegacyWorkQueue(name="legacy"),
                  wp.WorkPoolNameClaim(), None)
    pool = log.pool(wp.LEGACY_POOL_NAME)
    # the pool is made first (its default queue, then itself; `prefect-agent`: no status), then the queue
    assert names(out) == ["prefect.work-queue.created", "prefect.work-pool.created", "prefect.work-queue.created"]
    assert out[1]["resource"]["prefect.work-pool.type"] == "prefect-agent"
    assert out[2]["resource"] == queue_res(qid(pool, "legacy"), "legacy")
    assert out[2]["related"] == [pool_ref(pool)]
    legacy = qid(pool, "legacy")
    # WQ-11: the priority is stored as given; the update is reported the same way
    (updated,) = log.run(wp.decide_update_work_queue_by_id, wp.UpdateWorkQueueById(id=legacy, priority=1), pool)
    assert updated["payload"] == {"updated_fields": ["priority"], "updates": {"priority": {"from": 2, "to": 1}}}
    (deleted,) = log.run(wp.decide_delete_work_queue_by_id, wp.DeleteWorkQueueById(id=legacy), log.pool(pool.name))
    assert deleted["event"] == "prefect.work-queue.deleted" and deleted["resource"] == queue_res(legacy, "legacy")


# =============================================================================================
# The export as a whole


def _history() -> Log:
    log = Log()
    log.create_pool("p", type="process")
    log.create_queue("p", "a", priority=1)
    log.update_pool("p", is_paused=True)
    log.update_queue("p", "a", description="x", is_paused=True)
    log.run(wp.decide_set_work_queue_priorities,
            wp.SetWorkQueuePriorities(work_pool_name="p", priorities={"default": 1}), log.pool("p"))
    log.run(wp.decide_delete_work_pool, wp.DeleteWorkPool(name="p"), log.pool("p"))
    return log


def test_two_exports_of_the_same_log_are_identical_and_ids_are_uuid5_of_the_source():
    log = _history()
    first, _ = pe.export_log(log.envelopes)
    second, _ = pe.export_log(log.envelopes)
    assert first == second and len(first) > 10
    assert len({e["id"] for e in first}) == len(first)
    created = log.envelopes[1]  # WorkPoolCreated: the default queue, the pool, its status
    assert created.type == "WorkPoolCreated"
    assert [e["id"] for e in first[:3]] == [str(uuid.uuid5(pe.EXPORT_NAMESPACE, f"{created.id}/{i}")) for i in range(3)]


def test_every_event_type_has_a_mapping():
    handled = set(pe._HANDLERS)
    assert set(EVENT_TYPES.values()) <= handled  # a new event type must be given a mapping (or none)


def test_unknown_types_newer_versions_and_bad_payloads_are_skipped_and_counted():
    log = _history()
    known = log.envelopes[1]
    strangers = [
        known.model_copy(update={"type": "WorkPoolRenamed"}),
        known.model_copy(update={"type": "WorkPoolRenamed", "id": uid(5)}),
        known.model_copy(update={"schema_version": 99}),
        known.model_copy(update={"payload": {"nonsense": True}}),
    ]
    envelopes = log.envelopes[:3] + strangers + log.envelopes[3:]
    events, state = pe.export_log(envelopes)
    assert events == pe.export_log(log.envelopes)[0]  # nothing else changed
    assert state.skipped == {"WorkPoolRenamed": 2, "WorkPoolCreated v99": 1, "WorkPoolCreated (unreadable payload)": 1}
    assert state.warning() == ("warning: the Prefect export skipped 4 event(s) it cannot map: "
                               "WorkPoolCreated (unreadable payload) (1), WorkPoolCreated v99 (1), WorkPoolRenamed (2)")


def test_without_the_history_events_still_come_out_without_what_they_cannot_know():
    log = _history()
    deleted = log.envelopes[-1]
    assert deleted.type == "WorkPoolDeleted"
    out = pe.to_prefect_events(deleted, pe.ExportState())
    assert names(out) == ["prefect.work-queue.deleted"] * 2 + ["prefect.work-pool.deleted"]
    assert out[0]["resource"] == {"prefect.resource.id": out[0]["resource"]["prefect.resource.id"],
                                  "prefect.resource.role": "work-queue"}  # no name known
    assert out[0]["related"] == []
    assert out[2]["resource"] == {"prefect.resource.id": f"prefect.work-pool.{deleted.aggregate_id}",
                                  "prefect.resource.name": "p", "prefect.resource.role": "work-pool"}
    assert out[2]["related"] == []
