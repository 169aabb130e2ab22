"""The work pool aggregate's decider and evolve (BEHAVIOUR §1 work pools, §2 work queues),
pure: no broker, no database. Ids and time come from `DecisionContext.fixed`, so every
assertion is about concrete values."""

from __future__ import annotations

import itertools
import uuid
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from pydantic import ValidationError

from runledger.commands import work_pools as wp
from runledger.commands.bounds import json_time
from runledger.commands.decisions import NewEvent
from runledger.commands.events import EventEnvelope, decode_event, encode_event
from runledger.commands.messages import DecisionContext, Rejection
from runledger.commands.names import encode_token

NOW = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)
LATER = NOW + timedelta(minutes=5)


def uid(i: int) -> uuid.UUID:
    return uuid.UUID(int=i)


VALID_TEMPLATE = {
    "job_configuration": {"image": "{{ image }}", "command": "{{command}}", "env": {"A": "{{  env_a  }}"}},
    "variables": {"properties": {"image": {"type": "string"}, "command": {}, "env_a": {}}},
}


class Env:
    """A test's world: a clock, a stream of fresh ids, and the states decisions fold into."""

    def __init__(self, first_id: int = 1):
        self._ids = (uid(i) for i in itertools.count(first_id))

    def ctx(self, now: datetime = NOW) -> DecisionContext:
        return DecisionContext.fixed(now, self._ids)

    def pool(self, name: str = "p", *, now: datetime = NOW, internal: bool = False, **fields) -> wp.WorkPool:
        d = wp.decide_create_work_pool(wp.CreateWorkPool(name=name, **fields), wp.WorkPoolNameClaim(), self.ctx(now),
                                       internal=internal)
        return fold(None, d)

    def queue(self, pool: wp.WorkPool, name: str, **fields) -> wp.WorkPool:
        d = wp.decide_create_work_queue(wp.CreateWorkQueue(work_pool_name=pool.name, name=name, **fields), pool, self.ctx())
        return fold(pool, d)

    def update_queue(self, pool: wp.WorkPool, queue_name: str, now: datetime = NOW, /, **fields) -> wp.Decision:
        cmd = wp.UpdateWorkQueue(work_pool_name=pool.name, work_queue_name=queue_name, **fields)
        return wp.decide_update_work_queue(cmd, pool, self.ctx(now))


def fold(state, decision: wp.Decision, aggregate: str = wp.WORK_POOL):
    for e in decision.events:
        if e.aggregate_type == aggregate:
            state = wp.evolve(state, e.event)
    # The bus caches `decision.after` instead of folding: it must be exactly the fold.
    for e in decision.events:
        if e.aggregate_type == aggregate and e.aggregate_id in decision.after:
            assert decision.after[e.aggregate_id] == state
    return state


def rejection(fn, *args, **kwargs) -> Rejection:
    with pytest.raises(Rejection) as info:
        fn(*args, **kwargs)
    return info.value


def the_event(decision: wp.Decision, aggregate: str = wp.WORK_POOL):
    (event,) = [e.event for e in decision.events if e.aggregate_type == aggregate]
    return event


def prios(pool: wp.WorkPool) -> dict[str, int]:
    return {q.name: q.priority for q in pool.queues.values()}


# =============================================================================================
# WP-1 create


def test_wp1_create_claims_the_name_and_creates_the_pool_with_its_default_queue():
    d = wp.decide_create_work_pool(wp.CreateWorkPool(name="my pool", type="process"), wp.WorkPoolNameClaim(),
                                   DecisionContext.fixed(NOW, iter([uid(10), uid(11)])))
    assert d.created is True
    claim, created = d.events
    assert claim == NewEvent(encode_token("my pool"), wp.WorkPoolNameClaimed(name="my pool", work_pool_id=uid(10)))
    assert claim.aggregate_id == "my~20pool" and claim.aggregate_type == "work_pool_name"
    assert created.aggregate_id == str(uid(10)) and created.aggregate_type == "work_pool"
    assert created.event.default_queue == wp.WorkQueueSnapshot(
        id=uid(11), name="default", description="The work pool's default queue.", is_paused=False,
        concurrency_limit=None, priority=1, status=wp.Status.NOT_READY, last_polled=None, created=NOW, updated=NOW,
    )
    assert created.event.pool == wp.WorkPoolSnapshot(
        id=uid(10), name="my pool", description=None, type="process", base_job_template={}, is_paused=False,
        concurrency_limit=None, storage_configuration=wp.StorageConfiguration(), status=wp.Status.NOT_READY,
        default_queue_id=uid(11), created=NOW, updated=NOW,
    )


def test_wp1_the_default_queue_is_the_only_queue_and_the_pool_points_at_it():
    pool = Env().pool(type="process")
    (queue,) = pool.queues.values()
    assert pool.default_queue_id == queue.id
    assert (queue.name, queue.description, queue.priority, queue.is_paused, queue.concurrency_limit) == (
        "default", "The work pool's default queue.", 1, False, None)
    assert pool.queue_named("default") is queue
    assert pool.queue_ids_by_name == {"default": queue.id}


def test_wp1_field_defaults():
    pool = Env().pool()
    assert (pool.description, pool.type, pool.base_job_template, pool.is_paused, pool.concurrency_limit) == (
        None, "prefect-agent", {}, False, None)
    assert pool.storage_configuration.model_dump() == {
        "bundle_upload_step": None, "bundle_execution_step": None, "default_result_storage_block_id": None}
    assert (pool.created, pool.updated) == (NOW, NOW)
    assert pool.has_online_worker is False


def test_wp1_given_fields_are_stored():
    storage = {"bundle_upload_step": {"a": 1}, "bundle_execution_step": None,
               "default_result_storage_block_id": str(uid(99))}
    pool = Env().pool(description="d", type="kubernetes", base_job_template=VALID_TEMPLATE, concurrency_limit=0,
                      storage_configuration=storage)
    assert (pool.description, pool.type, pool.base_job_template, pool.concurrency_limit) == (
        "d", "kubernetes", VALID_TEMPLATE, 0)
    assert pool.storage_configuration.default_result_storage_block_id == uid(99)
    assert pool.storage_configuration.bundle_upload_step == {"a": 1}


def test_wp1_replies():
    env = Env()
    pool = env.pool(type="process", concurrency_limit=3)
    assert wp.work_pool_reply(pool) == {
        "id": str(uid(1)), "created": json_time(NOW), "updated": json_time(NOW), "name": "p",
        "description": None, "type": "process", "base_job_template": {}, "is_paused": False,
        "concurrency_limit": 3, "status": "NOT_READY", "default_queue_id": str(uid(2)),
        "storage_configuration": {"bundle_upload_step": None, "bundle_execution_step": None,
                                  "default_result_storage_block_id": None},
        "active_slots": 0,
    }
    assert wp.work_queue_reply(pool, pool.queues[uid(2)]) == {
        "id": str(uid(2)), "created": json_time(NOW), "updated": json_time(NOW), "name": "default",
        "description": "The work pool's default queue.", "is_paused": False, "concurrency_limit": None,
        "priority": 1, "work_pool_id": str(uid(1)), "work_pool_name": "p", "last_polled": None,
        "status": "NOT_READY", "filter": None, "active_slots": None,
    }


# =============================================================================================
# WP-2 / WP-3 statuses


@pytest.mark.parametrize("type_", ["process", "kubernetes", "docker", "", "Prefect-Agent"])
@pytest.mark.parametrize("is_paused, status", [(False, wp.Status.NOT_READY), (True, wp.Status.PAUSED)])
def test_wp2_initial_status(type_, is_paused, status):
    d = wp.decide_create_work_pool(wp.CreateWorkPool(name="p", type=type_, is_paused=is_paused),
                                   wp.WorkPoolNameClaim(), Env().ctx())
    assert the_event(d).pool.status == status
    assert d.result.status == status and d.result.is_paused is is_paused
    assert wp.work_pool_reply(d.result)["status"] == status.value
    # the default queue's own status does not follow the pool's
    assert the_event(d).default_queue.status == wp.Status.NOT_READY
    assert the_event(d).default_queue.is_paused is False


@pytest.mark.parametrize("is_paused", [False, True])
def test_wp3_prefect_agent_pools_have_no_status(is_paused):
    pool = Env().pool(is_paused=is_paused)
    assert pool.type == "prefect-agent"
    assert pool.status is None
    assert wp.work_pool_reply(pool)["status"] is None


@pytest.mark.parametrize("stored", list(wp.Status))
def test_wp3_reads_report_null_whatever_is_stored(stored):
    pool = replace(Env().pool(), status=stored)
    assert wp.work_pool_reply(pool)["status"] is None


def test_wp3_pause_and_unpause_never_write_a_status_for_prefect_agent():
    env = Env()
    pool = env.pool()
    d = wp.decide_update_work_pool(wp.UpdateWorkPool(name="p", is_paused=True), pool, env.ctx(LATER))
    event = the_event(d)
    assert event.status is None
    assert event.changes == {"is_paused": wp.Change(old=False, new=True)}
    assert event.pool.status is None and event.pool.is_paused is True
    paused = fold(pool, d)
    assert wp.decide_update_work_pool(wp.UpdateWorkPool(name="p", is_paused=True), paused, env.ctx()).events == []
    online = replace(paused, has_online_worker=True)
    d = wp.decide_update_work_pool(wp.UpdateWorkPool(name="p", is_paused=False), online, env.ctx())
    assert the_event(d).status is None and d.result.status is None and d.result.is_paused is False


# =============================================================================================
# WP-4 / WP-5


def test_wp4_a_held_name_is_a_conflict():
    env = Env()
    held = wp.WorkPoolNameClaim(uid(500))
    r = rejection(wp.decide_create_work_pool, wp.CreateWorkPool(name="p", type="process"), held, env.ctx())
    assert (r.code, r.message) == ("conflict", "A work pool with this name already exists.")


def test_wp4_the_name_claim_lifecycle():
    env = Env()
    d = wp.decide_create_work_pool(wp.CreateWorkPool(name="p"), wp.WorkPoolNameClaim(), env.ctx())
    claim = wp.WorkPoolNameClaim()
    for e in d.events:
        if e.aggregate_type == wp.WORK_POOL_NAME:
            claim = wp.evolve_name(claim, e.event)
    assert claim == wp.WorkPoolNameClaim(d.result.id)
    assert rejection(wp.decide_create_work_pool, wp.CreateWorkPool(name="p"), claim, env.ctx()).code == "conflict"
    gone = wp.decide_delete_work_pool(wp.DeleteWorkPool(name="p"), d.result, env.ctx())
    for e in gone.events:
        if e.aggregate_type == wp.WORK_POOL_NAME:
            assert e.aggregate_id == "p"
            claim = wp.evolve_name(claim, e.event)
    assert claim == wp.WorkPoolNameClaim(None)
    again = wp.decide_create_work_pool(wp.CreateWorkPool(name="p"), claim, env.ctx())
    assert again.result.id != d.result.id  # WP-9: the name is released and can be reused


@pytest.mark.parametrize("name", ["prefect", "Prefect", "PREFECT", "prefect-pool", "PrefectPool", "prefect pool"])
def test_wp5_reserved_names_cannot_be_created(name):
    r = rejection(wp.decide_create_work_pool, wp.CreateWorkPool(name=name, type="process"), wp.WorkPoolNameClaim(),
                  Env().ctx())
    assert r.code == "forbidden"
    # the reserved check comes before the name conflict (Prefect answers 403 first)
    r = rejection(wp.decide_create_work_pool, wp.CreateWorkPool(name=name), wp.WorkPoolNameClaim(uid(9)), Env().ctx())
    assert r.code == "forbidden"


def test_wp5_internal_creation_is_allowed():
    pool = Env().pool("prefect-internal", internal=True, type="process")
    assert pool.name == "prefect-internal" and pool.status == wp.Status.NOT_READY


def test_wp5_names_merely_containing_prefect_are_not_reserved():
    assert Env().pool("my-prefect").name == "my-prefect"


@pytest.mark.parametrize(
    "fields, allowed",
    [
        ({"is_paused": True}, True),
        ({"concurrency_limit": 4}, True),
        ({"is_paused": True, "concurrency_limit": None}, True),
        ({}, True),
        ({"description": "x"}, False),
        ({"description": None}, False),
        ({"base_job_template": {}}, False),
        ({"storage_configuration": {}}, False),
        ({"is_paused": True, "description": "x"}, False),
        ({"concurrency_limit": 1, "base_job_template": VALID_TEMPLATE}, False),
    ],
)
def test_wp5_reserved_pools_can_only_be_paused_or_limited(fields, allowed):
    env = Env()
    pool = env.pool("Prefect-x", internal=True, type="process", concurrency_limit=2)
    cmd = wp.UpdateWorkPool(name="Prefect-x", **fields)
    if allowed:
        d = wp.decide_update_work_pool(cmd, pool, env.ctx())
        after = fold(pool, d)
        assert after.concurrency_limit == fields.get("concurrency_limit", 2)
        assert after.is_paused is fields.get("is_paused", False)
    else:
        r = rejection(wp.decide_update_work_pool, cmd, pool, env.ctx())
        assert (r.code, r.message) == ("forbidden", "Work pools starting with 'Prefect' are reserved for internal use "
                                       "and can only be updated to set concurrency limits or pause.")


@pytest.mark.parametrize("exists", [True, False])
def test_wp5_reserved_pools_cannot_be_deleted(exists):
    env = Env()
    pool = env.pool("prefect-x", internal=True) if exists else None
    r = rejection(wp.decide_delete_work_pool, wp.DeleteWorkPool(name="prefect-x"), pool, env.ctx())
    assert r.code == "forbidden"


# =============================================================================================
# WP-6 base_job_template


@pytest.mark.parametrize(
    "template",
    [
        {},
        VALID_TEMPLATE,
        {"job_configuration": {"a": 1}, "variables": {"properties": {}}},  # no placeholders at all
        {"job_configuration": {"cmd": ["{{ a }}", {"x": "{{b}}"}], "n": 5, "f": None},
         "variables": {"properties": {"a": {}, "b": {}}}},
        {"job_configuration": {"s": "{{ a }}-{{ a }}"}, "variables": {"type": "object", "properties": {"a": {}}}},
    ],
)
def test_wp6_valid_templates(template):
    assert Env().pool(base_job_template=template).base_job_template == template


@pytest.mark.parametrize(
    "template",
    [
        {"job_configuration": {"a": "b"}},
        {"variables": {"properties": {"a": {}}}},
        {"job_configuration": {}, "variables": {"properties": {"a": {}}}},
        {"job_configuration": {"a": "b"}, "variables": {}},
        {"job_configuration": None, "variables": {"properties": {}}},
        {"something": "else"},
    ],
)
def test_wp6_both_job_configuration_and_variables_are_required(template):
    r = rejection(wp.decide_create_work_pool, wp.CreateWorkPool(name="p", base_job_template=template),
                  wp.WorkPoolNameClaim(), Env().ctx())
    assert (r.code, r.field) == ("invalid", "base_job_template")
    assert r.message == ("The `base_job_template` must contain both a `job_configuration` key and a `variables` key.")


@pytest.mark.parametrize(
    "job_configuration, declared, missing",
    [
        ({"image": "{{ image }} {{ tag }}"}, ["image"], ["tag"]),
        ({"cmd": ["run", "{{ x }}"]}, [], ["x"]),
        ({"env": {"K": {"deep": "{{y}}"}}}, ["x"], ["y"]),
        ({"a": "{{ b }}", "c": "{{ a }}"}, [], ["a", "b"]),
        ({"a": "{{ prefect.blocks.secret.s }}"}, [], ["prefect.blocks.secret.s"]),
        ({"a": "{{ prefect.variables.v }}"}, ["a"], ["prefect.variables.v"]),
        ({"env": {"{{ key }}": "v"}}, [], ["key"]),  # nested keys count (Prefect scans the JSON text)
    ],
)
def test_wp6_every_placeholder_must_be_a_declared_property(job_configuration, declared, missing):
    template = {"job_configuration": job_configuration, "variables": {"properties": {n: {} for n in declared}}}
    r = rejection(wp.decide_create_work_pool, wp.CreateWorkPool(name="p", base_job_template=template),
                  wp.WorkPoolNameClaim(), Env().ctx())
    assert (r.code, r.field) == ("invalid", "base_job_template")
    assert r.message.startswith("The variables specified in the job configuration template must be present as "
                                "properties in the variables schema.")
    assert r.message.endswith(f"undeclared variable(s): {', '.join(missing)}.")


def test_wp6_top_level_job_configuration_keys_are_not_placeholders():
    template = {"job_configuration": {"{{ k }}": "v"}, "variables": {"properties": {"x": {}}}}
    assert Env().pool(base_job_template=template).base_job_template == template


def test_wp6_declared_prefect_placeholders_are_fine():
    template = {"job_configuration": {"a": "{{ prefect.variables.v }}"},
                "variables": {"properties": {"prefect.variables.v": {}}}}
    assert Env().pool(base_job_template=template).base_job_template == template


def test_wp6_template_checked_on_update_before_forbidden_and_not_found():
    bad = {"job_configuration": {"a": "{{ b }}"}, "variables": {"properties": {}}}
    env = Env()
    r = rejection(wp.decide_update_work_pool, wp.UpdateWorkPool(name="missing", base_job_template=bad), None, env.ctx())
    assert (r.code, r.field) == ("invalid", "base_job_template")
    r = rejection(wp.decide_create_work_pool, wp.CreateWorkPool(name="prefect-x", base_job_template=bad),
                  wp.WorkPoolNameClaim(uid(7)), env.ctx())
    assert r.code == "invalid"
    pool = env.pool(type="process")
    d = wp.decide_update_work_pool(wp.UpdateWorkPool(name="p", base_job_template=VALID_TEMPLATE), pool, env.ctx())
    assert the_event(d).changes == {"base_job_template": wp.Change(old={}, new=VALID_TEMPLATE)}
    assert fold(pool, d).base_job_template == VALID_TEMPLATE
    d = wp.decide_update_work_pool(wp.UpdateWorkPool(name="p", base_job_template={}), fold(pool, d), env.ctx())
    assert d.result.base_job_template == {}


def _block_default(default: Any) -> dict[str, Any]:
    return {"job_configuration": {"image": "{{ image }}"},
            "variables": {"type": "object", "properties": {"image": {"type": "string", "default": default}}}}


def test_wp6_block_reference_defaults_must_exist():
    """runledger has no blocks: a default that references one names a block that cannot exist."""
    tmpl = _block_default({"$ref": {"block_document_id": str(uuid.uuid4())}})
    r = rejection(wp.decide_create_work_pool, wp.CreateWorkPool(name="p", type="docker", base_job_template=tmpl),
                  wp.WorkPoolNameClaim(), DecisionContext.fixed(datetime(2025, 1, 1, tzinfo=UTC)))
    assert (r.code, r.message) == ("not_found", "Block not found.")
    # As in Prefect: after the template's own check and the reserved name, before the name's conflict.
    r = rejection(wp.decide_create_work_pool, wp.CreateWorkPool(name="prefect-x", base_job_template=tmpl),
                  wp.WorkPoolNameClaim(), Env().ctx())
    assert r.code == "forbidden"
    r = rejection(wp.decide_create_work_pool, wp.CreateWorkPool(name="p", base_job_template=tmpl),
                  wp.WorkPoolNameClaim(uid(7)), Env().ctx())
    assert r.code == "not_found"


@pytest.mark.parametrize("default", [
    "plain", {"$ref": {}}, {"$ref": {"block_document_id": None}}, {"$ref": "#/definitions/x"},
])
def test_wp6_defaults_that_name_no_block_are_fine(default):
    assert Env().pool(base_job_template=_block_default(default)).base_job_template == _block_default(default)


def test_a_new_pools_variables_must_be_a_valid_schema_and_their_defaults_fit_it():
    """As Prefect checks them at creation (its update does not): the schema first, then the
    defaults, `required` aside and null accepted for an optional variable."""
    def template(variables: dict) -> dict:
        return {"job_configuration": {"image": "{{ image }}"}, "variables": variables}

    bad_schema = template({"type": "nonsense", "properties": {"image": {"type": "string"}}})
    r = rejection(wp.decide_create_work_pool, wp.CreateWorkPool(name="p", base_job_template=bad_schema),
                  wp.WorkPoolNameClaim(uid(7)), Env().ctx())
    assert r.code == "invalid" and r.message.startswith("Invalid schema:")
    for default in (5, {"ref": {}}):
        bad_default = template({"type": "object", "properties": {"image": {"type": "string", "default": default}}})
        r = rejection(wp.decide_create_work_pool, wp.CreateWorkPool(name="p", base_job_template=bad_default),
                      wp.WorkPoolNameClaim(uid(7)), Env().ctx())
        assert r.code == "invalid"
        assert r.message.startswith("Validation failed for work pool's job variable defaults: Validation failed for field 'image'")
    fine = template({"type": "object", "required": ["cpu"],
                     "properties": {"image": {"type": "string", "default": None}, "cpu": {"type": "integer"}}})
    assert Env().pool(base_job_template=fine).base_job_template == fine


# =============================================================================================
# WP-7 / WP-8 update


def test_wp8_unknown_pool_is_not_found():
    r = rejection(wp.decide_update_work_pool, wp.UpdateWorkPool(name="nope", description="x"), None, Env().ctx())
    assert (r.code, r.message) == ("not_found", 'Work pool "nope" not found.')


def test_wp8_partial_update_changes_only_the_given_fields():
    env = Env()
    pool = env.pool(type="process", description="d", concurrency_limit=3, base_job_template=VALID_TEMPLATE)
    d = wp.decide_update_work_pool(wp.UpdateWorkPool(name="p", description="new"), pool, env.ctx(LATER))
    event = the_event(d)
    assert isinstance(event, wp.WorkPoolUpdated)
    assert event.changes == {"description": wp.Change(old="d", new="new")}
    assert event.status is None
    after = fold(pool, d)
    assert after == d.result
    assert (after.description, after.concurrency_limit, after.base_job_template, after.is_paused, after.status) == (
        "new", 3, VALID_TEMPLATE, False, wp.Status.NOT_READY)
    assert (after.created, after.updated) == (NOW, LATER)
    assert after.queues == pool.queues


def test_wp8_explicit_null_clears_nullable_fields_and_is_ignored_for_the_others():
    env = Env()
    pool = env.pool(type="process", description="d", concurrency_limit=3, base_job_template=VALID_TEMPLATE)
    d = wp.decide_update_work_pool(wp.UpdateWorkPool(name="p", description=None, concurrency_limit=None), pool, env.ctx())
    assert the_event(d).changes == {"description": wp.Change(old="d", new=None),
                                    "concurrency_limit": wp.Change(old=3, new=None)}
    assert (d.result.description, d.result.concurrency_limit) == (None, None)
    d = wp.decide_update_work_pool(
        wp.UpdateWorkPool.model_validate_json(
            '{"name": "p", "is_paused": null, "base_job_template": null, "storage_configuration": null}', strict=True),
        pool, env.ctx())
    assert d.events == [] and d.result == pool and d.created is False


def test_wp8_concurrency_limit_zero_is_stored():
    env = Env()
    pool = env.pool(type="process", concurrency_limit=3)
    d = wp.decide_update_work_pool(wp.UpdateWorkPool(name="p", concurrency_limit=0), pool, env.ctx())
    assert the_event(d).changes == {"concurrency_limit": wp.Change(old=3, new=0)}
    assert fold(pool, d).concurrency_limit == 0


@pytest.mark.parametrize("limit", [-5, -1])
def test_wp8_negative_concurrency_limit_is_invalid(limit):
    with pytest.raises(ValidationError):
        wp.UpdateWorkPool.model_validate_json(f'{{"name": "p", "concurrency_limit": {limit}}}', strict=True)
    with pytest.raises(ValidationError):
        wp.UpdateWorkPool(name="p", concurrency_limit=limit)


def test_wp8_storage_configuration_update():
    env = Env()
    pool = env.pool(type="process")
    cmd = wp.UpdateWorkPool.model_validate_json(
        '{"name": "p", "storage_configuration": {"bundle_upload_step": {"step": 1}}}', strict=True)
    d = wp.decide_update_work_pool(cmd, pool, env.ctx())
    assert the_event(d).changes == {"storage_configuration": wp.Change(
        old={"bundle_upload_step": None, "bundle_execution_step": None, "default_result_storage_block_id": None},
        new={"bundle_upload_step": {"step": 1}, "bundle_execution_step": None, "default_result_storage_block_id": None},
    )}
    assert d.result.storage_configuration.bundle_upload_step == {"step": 1}


def test_wp8_unchanged_values_emit_nothing():
    env = Env()
    pool = env.pool(type="process", description="d", concurrency_limit=3)
    d = wp.decide_update_work_pool(wp.UpdateWorkPool(name="p", description="d", concurrency_limit=3), pool, env.ctx())
    assert (d.events, d.result, d.created) == ([], pool, False)
    assert wp.decide_update_work_pool(wp.UpdateWorkPool(name="p"), pool, env.ctx()).events == []


def test_wp8_pause_writes_paused_every_time():
    env = Env()
    pool = env.pool(type="process")
    d = wp.decide_update_work_pool(wp.UpdateWorkPool(name="p", is_paused=True), pool, env.ctx(LATER))
    event = the_event(d)
    assert event.status == wp.Change(old=wp.Status.NOT_READY, new=wp.Status.PAUSED)
    assert event.pool.status == wp.Status.PAUSED and event.pool.is_paused is True
    paused = fold(pool, d)
    assert (paused.status, paused.is_paused, paused.updated) == (wp.Status.PAUSED, True, LATER)
    # a repeated pause: the status is written again (PAUSED -> PAUSED), one event
    again = wp.decide_update_work_pool(wp.UpdateWorkPool(name="p", is_paused=True), paused, env.ctx())
    event = the_event(again)
    assert event.status.model_dump() == {"old": "PAUSED", "new": "PAUSED"}
    assert event.changes == {}


@pytest.mark.parametrize("online, expected", [(False, wp.Status.NOT_READY), (True, wp.Status.READY)])
@pytest.mark.parametrize("start_paused", [True, False])
def test_wp8_unpause_status_follows_the_workers(online, expected, start_paused):
    env = Env()
    pool = replace(env.pool(type="process", is_paused=start_paused), has_online_worker=online)
    d = wp.decide_update_work_pool(wp.UpdateWorkPool(name="p", is_paused=False), pool, env.ctx())
    event = the_event(d)  # written whatever the previous status was
    start = wp.Status.PAUSED if start_paused else wp.Status.NOT_READY
    assert event.status == wp.Change(old=start, new=expected)
    assert fold(pool, d).status == expected and d.result.is_paused is False


def test_wp8_ready_pool_paused_then_unpaused_without_workers():
    env = Env()
    pool = replace(env.pool(type="process"), status=wp.Status.READY)
    paused = fold(pool, wp.decide_update_work_pool(wp.UpdateWorkPool(name="p", is_paused=True), pool, env.ctx()))
    assert paused.status == wp.Status.PAUSED
    d = wp.decide_update_work_pool(wp.UpdateWorkPool(name="p", is_paused=False), paused, env.ctx())
    assert the_event(d).status == wp.Change(old=wp.Status.PAUSED, new=wp.Status.NOT_READY)


# =============================================================================================
# WP-9 delete


def test_wp9_delete_releases_the_name_and_lists_every_queue():
    env = Env()
    pool = env.pool("p")
    pool = env.queue(pool, "a")
    pool = env.queue(pool, "b", priority=1)
    d = wp.decide_delete_work_pool(wp.DeleteWorkPool(name="p"), pool, env.ctx(LATER))
    assert d.result is None
    release, deleted = d.events
    assert release == NewEvent("p", wp.WorkPoolNameReleased(name="p", work_pool_id=pool.id))
    assert deleted.aggregate_id == str(pool.id)
    assert deleted.event == wp.WorkPoolDeleted(pool_id=pool.id, name="p", deleted=LATER,
                                               queue_ids=[pool.queue_named(n).id for n in ("b", "default", "a")])
    assert fold(pool, d) is None


def test_wp9_unknown_pool_is_not_found():
    r = rejection(wp.decide_delete_work_pool, wp.DeleteWorkPool(name="zz"), None, Env().ctx())
    assert (r.code, r.message) == ("not_found", 'Work pool "zz" not found.')


def test_evolve_ignores_events_after_a_delete():
    env = Env()
    pool = env.pool(type="process")
    event = the_event(wp.decide_update_work_pool(wp.UpdateWorkPool(name="p", description="x"), pool, env.ctx()))
    assert wp.evolve(None, event) is None


# =============================================================================================
# WQ-1 … WQ-4 creating queues


def test_wq1_unknown_pool_is_not_found():
    r = rejection(wp.decide_create_work_queue, wp.CreateWorkQueue(work_pool_name="nope", name="q"), None, Env().ctx())
    assert (r.code, r.message) == ("not_found", 'Work pool "nope" not found.')


def test_wq1_create_a_queue():
    env = Env()
    pool = env.pool(type="process")
    cmd = wp.CreateWorkQueue(work_pool_name="p", name="q", description="desc", concurrency_limit=0)
    d = wp.decide_create_work_queue(cmd, pool, DecisionContext.fixed(LATER, iter([uid(77)])))
    assert d.created is True
    (new,) = d.events
    assert new.aggregate_id == str(pool.id)
    assert new.event == wp.WorkQueueCreated(queue=wp.WorkQueueSnapshot(
        id=uid(77), name="q", description="desc", is_paused=False, concurrency_limit=0, priority=2,
        status=wp.Status.NOT_READY, last_polled=None, created=LATER, updated=LATER), reprioritized={})
    after, queue = d.result
    assert after == fold(pool, d)
    assert queue == after.queues[uid(77)] and after.queue_named("q") == queue
    assert wp.work_queue_reply(after, queue)["description"] == "desc"


def test_wq1_queue_defaults():
    env = Env()
    pool = env.queue(env.pool(type="process"), "q")
    q = pool.queue_named("q")
    assert (q.description, q.is_paused, q.concurrency_limit, q.last_polled, q.status) == (
        "", False, None, None, wp.Status.NOT_READY)


def test_wq1_same_name_in_the_same_pool_is_a_conflict_but_fine_elsewhere():
    env = Env()
    p = env.queue(env.pool("p", type="process"), "q")
    r = rejection(wp.decide_create_work_queue, wp.CreateWorkQueue(work_pool_name="p", name="q"), p, env.ctx())
    assert r.code == "conflict"
    r = rejection(wp.decide_create_work_queue, wp.CreateWorkQueue(work_pool_name="p", name="default"), p, env.ctx())
    assert r.code == "conflict"
    other = env.queue(env.pool("other", type="process"), "q")
    assert other.queue_named("q") is not None


@pytest.mark.parametrize("bad", ["a/b", "a%b", "a&b", "a>b", "a<b", ""])
def test_wq1_queue_names_follow_c1(bad):
    with pytest.raises(ValidationError):
        wp.CreateWorkQueue.model_validate_json(f'{{"work_pool_name": "p", "name": "{bad}"}}', strict=True)


def test_wq2_wq3_priorities_on_create():
    env = Env()
    pool = env.pool(type="process")
    pool = env.queue(pool, "a")
    assert prios(pool) == {"default": 1, "a": 2}
    d = wp.decide_create_work_queue(wp.CreateWorkQueue(work_pool_name="p", name="b", priority=1), pool, env.ctx())
    assert the_event(d).reprioritized == {pool.default_queue_id: 2, pool.queue_named("a").id: 3}
    assert prios(fold(pool, d)) == {"b": 1, "default": 2, "a": 3}


@pytest.mark.parametrize("priority", [0, -1])
def test_wq3_priority_must_be_positive(priority):
    with pytest.raises(ValidationError):
        wp.CreateWorkQueue.model_validate_json(f'{{"work_pool_name": "p", "name": "q", "priority": {priority}}}',
                                               strict=True)


def test_wq4_created_paused_is_still_not_ready():
    env = Env()
    pool = env.queue(env.pool(type="process"), "q", is_paused=True)
    q = pool.queue_named("q")
    assert (q.is_paused, q.status) == (True, wp.Status.NOT_READY)
    assert wp.work_queue_reply(pool, q)["status"] == "NOT_READY"
    # only a later pause sets PAUSED: is_paused does not change, the status does
    d = env.update_queue(pool, "q", is_paused=True)
    event = the_event(d)
    assert event.changes == {}
    assert event.status == wp.Change(old=wp.Status.NOT_READY, new=wp.Status.PAUSED)
    assert fold(pool, d).queue_named("q").status == wp.Status.PAUSED


# =============================================================================================
# WQ-5 update


def test_wq5_unknown_pool_or_queue_is_not_found():
    env = Env()
    r = rejection(wp.decide_update_work_queue,
                  wp.UpdateWorkQueue(work_pool_name="nope", work_queue_name="q", description="x"), None, env.ctx())
    assert (r.code, r.message) == ("not_found", 'Work pool "nope" not found.')
    pool = env.pool(type="process")
    r = rejection(env.update_queue, pool, "zz", description="x")
    assert (r.code, r.message) == ("not_found", "Work pool queue 'p/zz' not found.")


def test_wq5_update_lists_changed_fields_from_to():
    env = Env()
    pool = env.pool(type="process")
    pool = env.queue(pool, "q", description="d", concurrency_limit=2)
    pool = env.queue(pool, "r")
    q = pool.queue_named("q")
    d = env.update_queue(pool, "q", LATER, name="q2", description="d2", concurrency_limit=0, priority=1)
    event = the_event(d)
    assert isinstance(event, wp.WorkQueueUpdated)
    assert event.changes == {
        "name": wp.Change(old="q", new="q2"),
        "description": wp.Change(old="d", new="d2"),
        "concurrency_limit": wp.Change(old=2, new=0),
        "priority": wp.Change(old=2, new=1),
    }
    assert event.status is None
    assert event.reprioritized == {pool.default_queue_id: 2}  # r (3) already clear of the new order
    assert event.queue == wp.WorkQueueSnapshot(
        id=q.id, name="q2", description="d2", is_paused=False, concurrency_limit=0, priority=1,
        status=wp.Status.NOT_READY, last_polled=None, created=NOW, updated=LATER)
    after = fold(pool, d)
    assert d.result == (after, after.queues[q.id])
    assert after.queue_named("q") is None and after.queue_named("q2").id == q.id
    assert prios(after) == {"q2": 1, "default": 2, "r": 3}
    assert after.queues[pool.default_queue_id].updated == LATER  # a moved queue is touched too
    assert after.queue_named("r").updated == NOW
    # the old name is free again
    assert env.queue(after, "q").queue_named("q").priority == 4


def test_wq5_no_event_when_nothing_changed():
    env = Env()
    pool = env.queue(env.pool(type="process"), "q", description="d", concurrency_limit=2)
    d = env.update_queue(pool, "q", name="q", description="d", concurrency_limit=2, priority=2, is_paused=False)
    assert (d.events, d.created) == ([], False)
    assert d.result == (pool, pool.queue_named("q"))
    assert env.update_queue(pool, "q").events == []


def test_wq5_explicit_null_clears_description_limit_and_last_polled():
    env = Env()
    pool = env.queue(env.pool(type="process"), "q", description="d", concurrency_limit=2)
    pool = fold(pool, env.update_queue(pool, "q", last_polled=NOW))
    cmd = wp.UpdateWorkQueue.model_validate_json(
        '{"work_pool_name": "p", "work_queue_name": "q", "description": null, "concurrency_limit": null, '
        '"last_polled": null, "name": null, "priority": null, "is_paused": null}', strict=True)
    d = wp.decide_update_work_queue(cmd, pool, env.ctx())
    assert the_event(d).changes == {
        "description": wp.Change(old="d", new=None),
        "concurrency_limit": wp.Change(old=2, new=None),
        "last_polled": wp.Change(old=NOW.isoformat(), new=None),
    }
    q = fold(pool, d).queue_named("q")
    assert (q.name, q.priority, q.is_paused, q.description, q.concurrency_limit, q.last_polled) == (
        "q", 2, False, None, None, None)


def test_wq5_rename_onto_another_queue_is_a_conflict():
    env = Env()
    pool = env.queue(env.pool(type="process"), "a")
    r = rejection(env.update_queue, pool, "a", name="default")
    assert (r.code, r.message) == ("conflict", "A work queue with this name already exists.")


@pytest.mark.parametrize("limit", [-5, -1])
def test_wq5_negative_limit_is_invalid(limit):
    with pytest.raises(ValidationError):
        wp.UpdateWorkQueue.model_validate_json(
            f'{{"work_pool_name": "p", "work_queue_name": "q", "concurrency_limit": {limit}}}', strict=True)


def test_wq5_limit_zero_is_allowed():
    env = Env()
    pool = env.queue(env.pool(type="process"), "q")
    d = env.update_queue(pool, "q", concurrency_limit=0)
    assert the_event(d).changes == {"concurrency_limit": wp.Change(old=None, new=0)}
    assert fold(pool, d).queue_named("q").concurrency_limit == 0


# =============================================================================================
# WQ-6 / WQ-7 default queue, reads, deletes


def test_wq6_the_default_queue_can_be_renamed_reprioritised_paused_and_limited():
    env = Env()
    pool = env.queue(env.pool(type="process"), "a")
    did = pool.default_queue_id
    pool = fold(pool, env.update_queue(pool, "default", name="main", priority=5, is_paused=True, concurrency_limit=1))
    q = pool.queues[did]
    assert (q.name, q.priority, q.is_paused, q.status, q.concurrency_limit) == ("main", 5, True, wp.Status.PAUSED, 1)
    assert pool.default_queue_id == did and pool.queue_named("main") is q and pool.queue_named("default") is None
    assert prios(pool) == {"main": 5, "a": 2}


def test_wq6_the_default_queue_cannot_be_deleted():
    env = Env()
    pool = env.pool(type="process")
    pool = fold(pool, env.update_queue(pool, "default", name="renamed"))
    r = rejection(wp.decide_delete_work_queue, wp.DeleteWorkQueue(work_pool_name="p", work_queue_name="renamed"), pool,
                  env.ctx())
    assert (r.code, r.message) == ("conflict", "Can't delete a pool's default queue.")
    r = rejection(wp.decide_delete_work_queue_by_id, wp.DeleteWorkQueueById(id=pool.default_queue_id), pool, env.ctx())
    assert (r.code, r.message) == ("conflict", "Can't delete a pool's default queue.")
    assert pool.queue_named("renamed").id == pool.default_queue_id


def test_wq7_delete_by_name():
    env = Env()
    pool = env.queue(env.queue(env.pool(type="process"), "a"), "b")
    a = pool.queue_named("a")
    d = wp.decide_delete_work_queue(wp.DeleteWorkQueue(work_pool_name="p", work_queue_name="a"), pool, env.ctx(LATER))
    (new,) = d.events
    assert new == NewEvent(str(pool.id), wp.WorkQueueDeleted(queue_id=a.id, name="a", reprioritized={}, deleted=LATER))
    after = fold(pool, d)
    assert a.id not in after.queues and after.queue_named("a") is None
    assert prios(after) == {"default": 1, "b": 3}
    assert env.queue(after, "a").queue_named("a").priority == 2  # the name and the hole are free


def test_wq7_unknown_queue_or_pool_on_delete():
    env = Env()
    pool = env.pool(type="process")
    r = rejection(wp.decide_delete_work_queue, wp.DeleteWorkQueue(work_pool_name="p", work_queue_name="x"), pool,
                  env.ctx())
    assert (r.code, r.message) == ("not_found", "Work pool queue 'p/x' not found.")
    r = rejection(wp.decide_delete_work_queue, wp.DeleteWorkQueue(work_pool_name="q", work_queue_name="x"), None,
                  env.ctx())
    assert (r.code, r.message) == ("not_found", 'Work pool "q" not found.')


def test_delete_by_id_runs_pr4():
    env = Env()
    pool = env.queue(env.queue(env.pool(type="process"), "a"), "b")
    d = wp.decide_delete_work_queue_by_id(wp.DeleteWorkQueueById(id=pool.queue_named("a").id), pool, env.ctx())
    assert prios(fold(pool, d)) == {"default": 1, "b": 3}
    r = rejection(wp.decide_delete_work_queue_by_id, wp.DeleteWorkQueueById(id=uid(999)), pool, env.ctx())
    assert r.code == "not_found" and str(uid(999)) in r.message
    r = rejection(wp.decide_delete_work_queue_by_id, wp.DeleteWorkQueueById(id=uid(999)), None, env.ctx())
    assert r.code == "not_found"


# =============================================================================================
# WQ-8 queue status


def paused_queue(env: Env, last_polled: datetime | None = None) -> wp.WorkPool:
    pool = env.queue(env.pool(type="process"), "q")
    if last_polled is not None:
        pool = fold(pool, env.update_queue(pool, "q", last_polled=last_polled))
    pool = fold(pool, env.update_queue(pool, "q", is_paused=True))
    assert pool.queue_named("q").status == wp.Status.PAUSED
    return pool


def test_wq8_pause_from_not_ready():
    env = Env()
    pool = env.queue(env.pool(type="process"), "q")
    d = env.update_queue(pool, "q", is_paused=True)
    event = the_event(d)
    assert event.status == wp.Change(old=wp.Status.NOT_READY, new=wp.Status.PAUSED)
    assert event.changes == {"is_paused": wp.Change(old=False, new=True)}
    assert (event.queue.status, event.queue.is_paused) == (wp.Status.PAUSED, True)


def test_wq8_already_paused_is_no_status_change_and_no_event():
    env = Env()
    pool = paused_queue(env)
    assert env.update_queue(pool, "q", is_paused=True).events == []


@pytest.mark.parametrize(
    "stored_ago, expected",
    [(None, wp.Status.NOT_READY), (0, wp.Status.READY), (30, wp.Status.READY), (60, wp.Status.READY),
     (61, wp.Status.NOT_READY), (3600, wp.Status.NOT_READY), (-10, wp.Status.READY)],
)
def test_wq8_unpause_uses_the_stored_last_polled(stored_ago, expected):
    env = Env()
    stored = None if stored_ago is None else NOW - timedelta(seconds=stored_ago)
    pool = paused_queue(env, stored)
    d = env.update_queue(pool, "q", NOW, is_paused=False)
    event = the_event(d)
    assert event.status == wp.Change(old=wp.Status.PAUSED, new=expected)
    assert event.changes == {"is_paused": wp.Change(old=True, new=False)}
    assert fold(pool, d).queue_named("q").status == expected


def test_wq8_the_window_is_inclusive_to_the_microsecond():
    env = Env()
    pool = paused_queue(env, NOW)
    at_60 = env.update_queue(pool, "q", NOW + timedelta(seconds=60), is_paused=False)
    assert at_60.result[1].status == wp.Status.READY
    past = env.update_queue(pool, "q", NOW + timedelta(seconds=60, microseconds=1), is_paused=False)
    assert past.result[1].status == wp.Status.NOT_READY


def test_wq8_the_last_polled_in_the_request_wins():
    env = Env()
    old = NOW - timedelta(hours=1)
    pool = paused_queue(env, old)
    d = env.update_queue(pool, "q", is_paused=False, last_polled=NOW - timedelta(seconds=5))
    assert d.result[1].status == wp.Status.READY
    assert the_event(d).changes["last_polled"] == wp.Change(old=old.isoformat(),
                                                             new=(NOW - timedelta(seconds=5)).isoformat())
    recent = paused_queue(Env(), NOW - timedelta(seconds=5))
    assert env.update_queue(recent, "q", is_paused=False, last_polled=old).result[1].status == wp.Status.NOT_READY
    assert env.update_queue(recent, "q", is_paused=False, last_polled=None).result[1].status == wp.Status.NOT_READY


def test_wq8_naive_last_polled_is_utc():
    env = Env()
    pool = paused_queue(env)
    cmd = wp.UpdateWorkQueue.model_validate_json(
        '{"work_pool_name": "p", "work_queue_name": "q", "is_paused": false, "last_polled": "2026-03-01T11:59:30"}',
        strict=True)
    assert cmd.last_polled == NOW - timedelta(seconds=30)
    d = wp.decide_update_work_queue(cmd, pool, env.ctx())
    assert d.result[1].status == wp.Status.READY
    assert d.result[1].last_polled.tzinfo is not None


def test_wq8_unpause_when_not_paused_changes_no_status():
    env = Env()
    pool = env.queue(env.pool(type="process"), "q")
    assert env.update_queue(pool, "q", NOW, is_paused=False).events == []
    # the WQ-4 queue: is_paused true, status NOT_READY; unpausing changes the flag only
    pool = env.queue(pool, "c", is_paused=True)
    d = env.update_queue(pool, "c", is_paused=False, last_polled=NOW)
    event = the_event(d)
    assert event.status is None
    assert event.changes["is_paused"] == wp.Change(old=True, new=False)
    assert d.result[1].status == wp.Status.NOT_READY


def test_wq8_last_polled_alone_never_changes_status():
    env = Env()
    pool = env.queue(env.pool(type="process"), "q")
    d = env.update_queue(pool, "q", last_polled=NOW)
    assert the_event(d).status is None and d.result[1].status == wp.Status.NOT_READY
    pool = paused_queue(env)
    d = env.update_queue(pool, "q", last_polled=NOW)
    assert the_event(d).status is None and d.result[1].status == wp.Status.PAUSED


def test_wq8_ready_queue_pause_cycle():
    env = Env()
    pool = paused_queue(env, NOW)
    pool = fold(pool, env.update_queue(pool, "q", is_paused=False))
    assert pool.queue_named("q").status == wp.Status.READY
    d = env.update_queue(pool, "q", is_paused=True)
    assert the_event(d).status == wp.Change(old=wp.Status.READY, new=wp.Status.PAUSED)
    pool = fold(pool, d)
    d = env.update_queue(pool, "q", LATER, is_paused=False)  # 5 min after the poll
    assert the_event(d).status == wp.Change(old=wp.Status.PAUSED, new=wp.Status.NOT_READY)


# =============================================================================================
# WQ-9 legacy create, WQ-11 update by id


def test_wq9_legacy_create_makes_the_default_agent_pool():
    d = wp.decide_create_legacy_work_queue(wp.CreateLegacyWorkQueue(name="q", description="x"), wp.WorkPoolNameClaim(),
                                           None, DecisionContext.fixed(NOW, iter([uid(1), uid(2), uid(3)])))
    claim, created, queue_created = d.events
    assert claim == NewEvent("default-agent-pool",
                             wp.WorkPoolNameClaimed(name="default-agent-pool", work_pool_id=uid(1)))
    assert created.event.pool.type == "prefect-agent" and created.event.pool.status is None
    assert created.event.default_queue.id == uid(2)
    assert queue_created.aggregate_id == str(uid(1))
    assert queue_created.event.queue.id == uid(3) and queue_created.event.queue.priority == 2
    pool, queue = d.result
    assert (pool, queue) == (fold(None, d), fold(None, d).queues[uid(3)])
    assert d.created is True
    reply = wp.work_queue_reply(pool, queue)
    assert (reply["work_pool_name"], reply["priority"], reply["description"]) == ("default-agent-pool", 2, "x")
    assert wp.work_pool_reply(pool)["status"] is None


def test_wq9_default_returns_the_new_pools_default_queue():
    d = wp.decide_create_legacy_work_queue(wp.CreateLegacyWorkQueue(name="default"), wp.WorkPoolNameClaim(), None,
                                           DecisionContext.fixed(NOW, iter([uid(1), uid(2)])))
    assert [type(e.event) for e in d.events] == [wp.WorkPoolNameClaimed, wp.WorkPoolCreated]
    pool, queue = d.result
    assert queue.id == pool.default_queue_id == uid(2)
    assert (queue.name, queue.priority, queue.description) == ("default", 1, "The work pool's default queue.")
    assert d.created is True


def test_wq9_existing_legacy_pool():
    env = Env()
    d = wp.decide_create_legacy_work_queue(wp.CreateLegacyWorkQueue(name="a"), wp.WorkPoolNameClaim(), None, env.ctx())
    pool = d.result[0]
    held = wp.WorkPoolNameClaim(pool.id)
    d = wp.decide_create_legacy_work_queue(wp.CreateLegacyWorkQueue(name="b"), held, pool, env.ctx())
    assert [type(e.event) for e in d.events] == [wp.WorkQueueCreated]
    assert prios(d.result[0]) == {"default": 1, "a": 2, "b": 3}
    # "default" now exists: a name conflict, like any other name
    for name in ("default", "a"):
        r = rejection(wp.decide_create_legacy_work_queue, wp.CreateLegacyWorkQueue(name=name), held, pool, env.ctx())
        assert r.code == "conflict"
    # WQ-3 applies within that pool
    d = wp.decide_create_legacy_work_queue(wp.CreateLegacyWorkQueue(name="top", priority=1), held, pool, env.ctx())
    assert prios(d.result[0]) == {"top": 1, "default": 2, "a": 3}


def test_wq11_update_by_id_stores_the_priority_without_pr1():
    env = Env()
    pool = env.queue(env.queue(env.pool(type="process"), "a"), "b")
    b = pool.queue_named("b")
    d = wp.decide_update_work_queue_by_id(wp.UpdateWorkQueueById(id=b.id, priority=1), pool, env.ctx())
    event = the_event(d)
    assert event.reprioritized == {}
    assert event.changes == {"priority": wp.Change(old=3, new=1)}
    assert prios(fold(pool, d)) == {"default": 1, "a": 2, "b": 1}  # duplicates possible


def test_wq11_update_by_id_applies_wq8_and_other_fields():
    env = Env()
    pool = env.queue(env.pool(type="process"), "q")
    qid = pool.queue_named("q").id
    pool = fold(pool, wp.decide_update_work_queue_by_id(wp.UpdateWorkQueueById(id=qid, is_paused=True), pool, env.ctx()))
    assert pool.queues[qid].status == wp.Status.PAUSED
    d = wp.decide_update_work_queue_by_id(
        wp.UpdateWorkQueueById(id=qid, is_paused=False, last_polled=NOW, name="renamed"), pool, env.ctx())
    assert the_event(d).status == wp.Change(old=wp.Status.PAUSED, new=wp.Status.READY)
    assert fold(pool, d).queue_named("renamed").id == qid


def test_wq11_unknown_id_is_not_found():
    env = Env()
    pool = env.pool(type="process")
    r = rejection(wp.decide_update_work_queue_by_id, wp.UpdateWorkQueueById(id=uid(404), priority=1), pool, env.ctx())
    assert r.code == "not_found" and str(uid(404)) in r.message
    r = rejection(wp.decide_update_work_queue_by_id, wp.UpdateWorkQueueById(id=uid(404)), None, env.ctx())
    assert r.code == "not_found"


# =============================================================================================
# WQ-13 queue health


POLICY = {"maximum_late_runs": 0, "maximum_seconds_since_last_polled": 60}


@pytest.mark.parametrize(("late", "polled_ago", "healthy"), [
    (0, timedelta(seconds=5), True),
    (0, timedelta(seconds=60), True),  # at most 60 s ago
    (0, timedelta(seconds=60, microseconds=1), False),
    (1, timedelta(seconds=5), False),
    (0, None, False),  # never polled
])
def test_wq13_a_queue_is_healthy_without_late_runs_and_recently_polled(late, polled_ago, healthy):
    last_polled = NOW - polled_ago if polled_ago is not None else None
    assert wp.work_queue_health(late, last_polled, NOW) == {
        "healthy": healthy, "late_runs_count": late,
        "last_polled": json_time(last_polled), "health_check_policy": POLICY}


# =============================================================================================
# Command models (C-1, C-3, C-5 and the field types), strict JSON


BAD_PAYLOADS: list[tuple[type, str]] = [
    # C-3 unknown fields
    (wp.CreateWorkPool, '{"name": "p", "bogus": 1}'),
    (wp.UpdateWorkPool, '{"name": "p", "status": "READY"}'),
    (wp.CreateWorkQueue, '{"work_pool_name": "p", "name": "q", "filter": null}'),
    (wp.UpdateWorkQueue, '{"work_pool_name": "p", "work_queue_name": "q", "work_pool_id": "x"}'),
    (wp.CreateWorkPool, '{"name": "p", "storage_configuration": {"nope": 1}}'),
    (wp.SetWorkQueuePriorities, '{"work_pool_name": "p", "priorities": {}, "extra": 1}'),
    # missing required fields
    (wp.CreateWorkPool, "{}"),
    (wp.CreateWorkQueue, '{"name": "q"}'),
    (wp.UpdateWorkQueueById, "{}"),
    # wrong types (strict: no coercion)
    (wp.CreateWorkPool, '{"name": 5}'),
    (wp.CreateWorkPool, '{"name": "p", "is_paused": "yes"}'),
    (wp.CreateWorkPool, '{"name": "p", "is_paused": 1}'),
    (wp.CreateWorkPool, '{"name": "p", "concurrency_limit": "1"}'),
    (wp.CreateWorkPool, '{"name": "p", "concurrency_limit": 1.5}'),
    (wp.CreateWorkPool, '{"name": "p", "base_job_template": []}'),
    (wp.CreateWorkPool, '{"name": "p", "type": 3}'),
    (wp.CreateWorkQueue, '{"work_pool_name": "p", "name": "q", "priority": "2"}'),
    (wp.UpdateWorkQueue, '{"work_pool_name": "p", "work_queue_name": "q", "last_polled": "yesterday"}'),
    (wp.UpdateWorkQueueById, '{"id": "not-a-uuid"}'),
    (wp.SetWorkQueuePriorities, '{"work_pool_name": "p", "priorities": {"a": "1"}}'),
    # C-5 non-negative limits and positive priorities
    (wp.CreateWorkPool, '{"name": "p", "concurrency_limit": -1}'),
    (wp.UpdateWorkPool, '{"name": "p", "concurrency_limit": -5}'),
    (wp.CreateWorkQueue, '{"work_pool_name": "p", "name": "q", "concurrency_limit": -5}'),
    (wp.UpdateWorkQueue, '{"work_pool_name": "p", "work_queue_name": "q", "concurrency_limit": -1}'),
    (wp.CreateWorkQueue, '{"work_pool_name": "p", "name": "q", "priority": 0}'),
    (wp.CreateWorkQueue, '{"work_pool_name": "p", "name": "q", "priority": -3}'),
    (wp.UpdateWorkQueue, '{"work_pool_name": "p", "work_queue_name": "q", "priority": 0}'),
    (wp.UpdateWorkQueueById, '{"id": "00000000-0000-0000-0000-000000000001", "priority": 0}'),
    (wp.CreateLegacyWorkQueue, '{"name": "q", "priority": 0}'),
    (wp.CreateLegacyWorkQueue, '{"name": "q", "concurrency_limit": -1}'),
    (wp.SetWorkQueuePriorities, '{"work_pool_name": "p", "priorities": {"a": 0}}'),
    # C-1 names: banned characters, emptiness, length
    (wp.CreateWorkPool, '{"name": "a/b"}'),
    (wp.CreateWorkPool, '{"name": "a%b"}'),
    (wp.CreateWorkPool, '{"name": "a&b"}'),
    (wp.CreateWorkPool, '{"name": "a>b"}'),
    (wp.CreateWorkPool, '{"name": "a<b"}'),
    (wp.CreateWorkPool, '{"name": ""}'),
    (wp.CreateWorkPool, '{"name": "  \\"\' "}'),
    (wp.CreateWorkPool, '{"name": "' + "x" * 256 + '"}'),
    (wp.CreateWorkQueue, '{"work_pool_name": "p", "name": "' + "q" * 256 + '"}'),
    (wp.CreateWorkQueue, '{"work_pool_name": "p", "name": "a/b"}'),
    (wp.CreateWorkQueue, '{"work_pool_name": "a/b", "name": "q"}'),
    (wp.UpdateWorkQueue, '{"work_pool_name": "p", "work_queue_name": "q", "name": "x>y"}'),
    (wp.UpdateWorkQueue, '{"work_pool_name": "p", "work_queue_name": "q", "name": ""}'),
    (wp.UpdateWorkQueueById, '{"id": "00000000-0000-0000-0000-000000000001", "name": "a&b"}'),
    (wp.CreateLegacyWorkQueue, '{"name": "a<b"}'),
    (wp.SetWorkQueuePriorities, '{"work_pool_name": "p", "priorities": {"a/b": 1}}'),
    (wp.DeleteWorkPool, '{"name": "a%b"}'),
]


@pytest.mark.parametrize("model, body", BAD_PAYLOADS, ids=[f"{m.__name__}:{b[:40]}" for m, b in BAD_PAYLOADS])
def test_bad_payloads_fail_validation(model, body):
    with pytest.raises(ValidationError):
        model.model_validate_json(body, strict=True)


GOOD_PAYLOADS: list[tuple[type, str, dict[str, Any]]] = [
    (wp.CreateWorkPool, '{"name": "p"}', {"type": "prefect-agent", "concurrency_limit": None}),
    (wp.CreateWorkPool, '{"name": "p", "concurrency_limit": 0, "type": ""}', {"concurrency_limit": 0, "type": ""}),
    (wp.CreateWorkPool, '{"name": "' + "x" * 255 + '"}', {"name": "x" * 255}),
    (wp.CreateWorkPool, '{"name": "a b.c*"}', {"name": "a b.c*"}),
    (wp.CreateWorkQueue, '{"work_pool_name": "p", "name": " "}', {"name": " ", "description": ""}),
    (wp.CreateWorkQueue, '{"work_pool_name": "p", "name": "q", "priority": 1}', {"priority": 1}),
    (wp.UpdateWorkQueue, '{"work_pool_name": "p", "work_queue_name": "q", "last_polled": "2026-03-01T12:00:00Z"}',
     {"last_polled": NOW}),
    (wp.UpdateWorkQueueById, '{"id": "00000000-0000-0000-0000-000000000007"}', {"id": uid(7)}),
    (wp.SetWorkQueuePriorities, '{"work_pool_name": "p", "priorities": {"a": 1, "b": 1}}', {"priorities": {"a": 1, "b": 1}}),
    (wp.CreateWorkPool, '{"name": "p", "idempotency_key": "k"}', {"idempotency_key": "k"}),
]


@pytest.mark.parametrize("model, body, expected", GOOD_PAYLOADS)
def test_good_payloads_validate(model, body, expected):
    cmd = model.model_validate_json(body, strict=True)
    for field, value in expected.items():
        assert getattr(cmd, field) == value


def test_explicitly_set_is_what_the_caller_sent():
    cmd = wp.UpdateWorkQueue.model_validate_json(
        '{"work_pool_name": "p", "work_queue_name": "q", "description": null, "idempotency_key": "k"}', strict=True)
    assert cmd.explicitly_set() == {"work_pool_name", "work_queue_name", "description"}


# =============================================================================================
# Evolve: events carry what the result says


def test_folding_the_create_events_from_nothing_reproduces_the_result():
    d = wp.decide_create_work_pool(wp.CreateWorkPool(name="p", type="process", description="x",
                                                     base_job_template=VALID_TEMPLATE, concurrency_limit=2),
                                   wp.WorkPoolNameClaim(), Env().ctx())
    assert fold(None, d) == d.result
    assert wp.evolve(None, the_event(d)) == d.result


def _roundtrip(event):
    env = EventEnvelope.wrap("agg", event, occurred=NOW, event_id=uid(1), idempotency_key="k")
    encoded = encode_event("agg", event, occurred=NOW, event_id=uid(1), idempotency_key="k")
    # The bus appends `encode_event`'s bytes: exactly what the envelope model would write.
    assert encoded.data == env.model_dump_json().encode()
    again = EventEnvelope.model_validate_json(encoded.data)
    return again.decode()


def test_a_whole_history_replays_from_the_log_to_the_same_state():
    env = Env()
    history: list = []

    def run(state, decision):
        history.extend(e.event for e in decision.events if e.aggregate_type == wp.WORK_POOL)
        state = fold(state, decision)
        if isinstance(decision.result, tuple):
            assert decision.result[0] == state
        elif decision.result is not None:
            assert decision.result == state
        return state

    ctx = env.ctx()
    pool = run(None, wp.decide_create_work_pool(wp.CreateWorkPool(name="ü p~.", type="k8s"), wp.WorkPoolNameClaim(), ctx))
    pool = run(pool, wp.decide_create_work_queue(wp.CreateWorkQueue(work_pool_name="ü p~.", name="a"), pool, ctx))
    pool = run(pool, wp.decide_create_work_queue(wp.CreateWorkQueue(work_pool_name="ü p~.", name="b", priority=1), pool,
                                                 ctx))
    pool = run(pool, env.update_queue(pool, "a", LATER, is_paused=True, last_polled=NOW, name="a2", priority=1))
    pool = run(pool, wp.decide_set_work_queue_priorities(
        wp.SetWorkQueuePriorities(work_pool_name="ü p~.", priorities={"default": 1, "nope": 2}), pool, ctx))
    pool = run(pool, wp.decide_update_work_pool(wp.UpdateWorkPool(name="ü p~.", is_paused=True, description="d"),
                                                pool, ctx))
    pool = run(pool, wp.decide_delete_work_queue(wp.DeleteWorkQueue(work_pool_name="ü p~.", work_queue_name="b"), pool,
                                                 ctx))
    replayed = None
    for event in history:
        decoded = _roundtrip(event)
        assert decoded == event
        assert decode_event(event.event_type, event.schema_version, event.model_dump(mode="json")) == event
        replayed = wp.evolve(replayed, decoded)
    assert replayed == pool
    assert prios(pool) == {"default": 1, "a2": 2}
    assert pool.status == wp.Status.PAUSED and pool.description == "d"
