"""What the read side can store, checked at the edge (commands/bounds.py): stored text, names,
JSON documents, integers, datetimes, query pages and filters, priorities the rules derive,
and the size of the messages an append sends. Pure: no broker, no database."""

from __future__ import annotations

import json
import uuid
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import BaseModel, TypeAdapter, ValidationError

from runledger.commands import queries as q
from runledger.commands import work_pools as wp
from runledger.commands.bounds import (
    EARLIEST,
    INT32_MAX,
    INT64_MAX,
    LATEST,
    MAX_FILTER_VALUES,
    MAX_JSON_DEPTH,
    JsonDocument,
    StoredText,
    UtcDatetime,
)
from runledger.commands.messages import DecisionContext, ErrorCode, Rejection
from runledger.handlers.command_bus import largest_field, parse_payload
from runledger.infra.event_store import (
    EventStore,
    MessageTooLarge,
    OutgoingMessage,
    check_sizes,
    headers_size,
    message_size,
)
from runledger.infra.settings import Settings

NOW = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)
QID = "00000000-0000-0000-0000-000000000001"
TEMPLATE = {"job_configuration": {"command": "{{ command }}"}, "variables": {"properties": {"command": {}}}}


def invalid_fields(model: type[BaseModel], body: dict[str, Any]) -> list[str]:
    """The fields a body is invalid at, validated as the service does (JSON, strict)."""
    with pytest.raises(ValidationError) as info:
        model.model_validate_json(json.dumps(body), strict=True)
    return [".".join(str(p) for p in e["loc"]) for e in info.value.errors()]


def nested(depth: int) -> dict[str, Any]:
    doc: dict[str, Any] = {}
    for _ in range(depth - 1):
        doc = {"a": doc}
    return doc


# ---------------------------------------------------------------------------------------------
# Stored text: no NUL anywhere the read model stores text


NUL_CASES = [
    (wp.CreateWorkPool, {"name": "a\x00b"}, "name"),
    (wp.CreateWorkPool, {"name": "p", "description": "x\x00"}, "description"),
    (wp.CreateWorkPool, {"name": "p", "type": "\x00"}, "type"),
    (wp.CreateWorkPool, {"name": "p", "base_job_template": {**TEMPLATE, "extra": "a\x00"}}, "base_job_template"),
    (wp.CreateWorkPool, {"name": "p", "base_job_template": {**TEMPLATE, "k\x00": 1}}, "base_job_template"),
    (wp.CreateWorkPool, {"name": "p", "base_job_template": {"job_configuration": {"x": [{"y": ["\x00"]}]},
                                                            "variables": {}}}, "base_job_template"),
    (wp.CreateWorkPool, {"name": "p", "storage_configuration": {"bundle_upload_step": {"a": "\x00"}}},
     "storage_configuration.bundle_upload_step"),
    (wp.UpdateWorkPool, {"name": "p", "storage_configuration": {"bundle_execution_step": {"\x00": {}}}},
     "storage_configuration.bundle_execution_step"),
    (wp.UpdateWorkPool, {"name": "p", "description": "\x00"}, "description"),
    (wp.UpdateWorkPool, {"name": "p", "base_job_template": {"\x00": 1}}, "base_job_template"),
    (wp.DeleteWorkPool, {"name": "\x00"}, "name"),
    (wp.CreateWorkQueue, {"work_pool_name": "p\x00", "name": "q"}, "work_pool_name"),
    (wp.CreateWorkQueue, {"work_pool_name": "p", "name": "q\x00"}, "name"),
    (wp.CreateWorkQueue, {"work_pool_name": "p", "name": "q", "description": "\x00"}, "description"),
    (wp.UpdateWorkQueue, {"work_pool_name": "p", "work_queue_name": "q", "name": "\x00"}, "name"),
    (wp.UpdateWorkQueue, {"work_pool_name": "p", "work_queue_name": "\x00"}, "work_queue_name"),
    (wp.UpdateWorkQueue, {"work_pool_name": "p", "work_queue_name": "q", "description": "\x00"}, "description"),
    (wp.DeleteWorkQueue, {"work_pool_name": "p", "work_queue_name": "\x00"}, "work_queue_name"),
    (wp.SetWorkQueuePriorities, {"work_pool_name": "p", "priorities": {"\x00": 1}}, "priorities.\x00.[key]"),
    (wp.CreateLegacyWorkQueue, {"name": "\x00"}, "name"),
    (wp.CreateLegacyWorkQueue, {"name": "q", "description": "\x00"}, "description"),
    (wp.UpdateWorkQueueById, {"id": QID, "name": "\x00"}, "name"),
    (wp.UpdateWorkQueueById, {"id": QID, "description": "\x00"}, "description"),
    (wp.CreateWorkPool, {"name": "p", "idempotency_key": "\x00"}, "idempotency_key"),
    (q.GetWorkPool, {"name": "\x00"}, "name"),
    (q.ListWorkPools, {"work_pools": {"name": {"any_": ["ok", "\x00"]}}}, "work_pools.name.any_"),
    (q.CountWorkPools, {"work_pools": {"type": {"any_": ["\x00"]}}}, "work_pools.type.any_"),
    (q.ListWorkQueues, {"work_pool_name": "p", "work_queues": {"name": {"any_": ["\x00"]}}},
     "work_queues.name.any_"),
    (q.ListAllWorkQueues, {"work_queues": {"name": {"any_": ["\x00"]}}}, "work_queues.name.any_"),
    (q.GetWorkQueue, {"work_pool_name": "p", "work_queue_name": "\x00"}, "work_queue_name"),
    (q.GetLegacyWorkQueue, {"name": "\x00"}, "name"),
]


@pytest.mark.parametrize("model, body, field", NUL_CASES, ids=[f"{m.__name__}-{f}" for m, _, f in NUL_CASES])
def test_a_nul_anywhere_stored_is_invalid_at_its_field(model, body, field):
    assert invalid_fields(model, body) == [field]


def test_the_nul_message_says_what_and_where():
    with pytest.raises(ValidationError) as info:
        wp.CreateWorkPool.model_validate_json(json.dumps(
            {"name": "p", "base_job_template": {"job_configuration": {"env": {"A": "x\x00"}}, "variables": {}}}))
    message = info.value.errors()[0]["msg"]
    assert "NUL character (U+0000)" in message and "job_configuration.env.A" in message
    with pytest.raises(ValidationError) as info:
        wp.CreateWorkPool(name="p", description="\x00")
    assert "NUL character (U+0000)" in info.value.errors()[0]["msg"]


def test_lone_surrogates_are_refused_in_python_and_json_alike():
    with pytest.raises(ValidationError):
        wp.CreateWorkPool(name="p", description="\ud800")
    with pytest.raises(ValidationError):
        wp.CreateWorkPool(name="p", base_job_template={"\udfff": 1})
    with pytest.raises(ValidationError):  # JSON escapes: the parser refuses them itself
        wp.CreateWorkPool.model_validate_json('{"name": "p", "description": "\\ud800"}')


def test_descriptions_and_types_keep_other_control_characters():
    cmd = wp.CreateWorkPool(name="p", description="line\nnext\ttab\x1b", type="a\tb")
    assert (cmd.description, cmd.type) == ("line\nnext\ttab\x1b", "a\tb")


@pytest.mark.parametrize("control", ["\t", "\n", "\x1b", "\x7f", "\x85", "\x9f"])
def test_names_reject_control_characters_in_every_name_field(control):
    for model, body, field in [
        (wp.CreateWorkPool, {"name": f"a{control}"}, "name"),
        (wp.CreateWorkQueue, {"work_pool_name": "p", "name": f"{control}q"}, "name"),
        (wp.UpdateWorkQueueById, {"id": QID, "name": control}, "name"),
        (wp.SetWorkQueuePriorities, {"work_pool_name": "p", "priorities": {control: 1}}, f"priorities.{control}.[key]"),
    ]:
        assert invalid_fields(model, body) == [field]


@given(st.text(st.characters(codec=None, exclude_categories=())))
@settings(max_examples=300)
def test_accepted_text_encodes_to_utf8_without_nul(value):
    try:
        kept = TypeAdapter(StoredText).validate_python(value)
    except ValidationError:
        assert "\x00" in value or any("\ud800" <= c <= "\udfff" for c in value)
        return
    assert "\x00" not in kept.encode("utf-8").decode("utf-8")


# ---------------------------------------------------------------------------------------------
# JSON documents


def test_json_nesting_is_bounded():
    TypeAdapter(JsonDocument).validate_python(nested(MAX_JSON_DEPTH))
    with pytest.raises(ValidationError) as info:
        TypeAdapter(JsonDocument).validate_python(nested(MAX_JSON_DEPTH + 1))
    assert f"deeper than {MAX_JSON_DEPTH}" in str(info.value)
    body = {"name": "p", "storage_configuration": {"bundle_upload_step": nested(MAX_JSON_DEPTH + 1)}}
    assert invalid_fields(wp.CreateWorkPool, body) == ["storage_configuration.bundle_upload_step"]


@pytest.mark.parametrize("raw", ['{"a": NaN}', '{"a": Infinity}', '{"a": -Infinity}', '{"a": [1e400]}',
                                 '{"a": 18446744073709551616}', '{"a": -9223372036854775809}'])
def test_json_numbers_are_finite_and_at_most_64_bits(raw):
    with pytest.raises(ValidationError):
        TypeAdapter(JsonDocument).validate_json(raw)


def test_json_numbers_inside_the_bounds_are_kept():
    doc = {"big": 2**64 - 1, "small": -(2**63), "f": 1.5e308, "t": True, "n": None}
    assert TypeAdapter(JsonDocument).validate_json(json.dumps(doc)) == doc


def test_python_values_that_are_not_json_are_refused():
    with pytest.raises(ValidationError):
        wp.CreateWorkPool(name="p", base_job_template={"a": NOW})
    with pytest.raises(ValidationError):
        wp.CreateWorkPool(name="p", base_job_template={"a": {1: "x"}})


JSON_TEXT = st.text(st.characters(codec=None, exclude_categories=()), max_size=8)
JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(min_value=-(2**70), max_value=2**70) | st.floats() | JSON_TEXT,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(JSON_TEXT, inner, max_size=4),
    max_leaves=20,
)


@given(st.dictionaries(JSON_TEXT, JSON_VALUES, max_size=4))
@settings(max_examples=300)
def test_accepted_json_serialises_strictly_and_without_nul(doc):
    try:
        kept = TypeAdapter(JsonDocument).validate_python(doc)
    except ValidationError:
        return
    text = json.dumps(kept, allow_nan=False, ensure_ascii=False)
    assert "\x00" not in text and "\\u0000" not in text
    text.encode("utf-8")  # no lone surrogate
    assert json.loads(text) == kept


# ---------------------------------------------------------------------------------------------
# Integers


@pytest.mark.parametrize("model, body, field", [
    (wp.CreateWorkPool, {"name": "p", "concurrency_limit": 2**31}, "concurrency_limit"),
    (wp.UpdateWorkPool, {"name": "p", "concurrency_limit": 2**31}, "concurrency_limit"),
    (wp.CreateWorkQueue, {"work_pool_name": "p", "name": "q", "concurrency_limit": 2**31}, "concurrency_limit"),
    (wp.CreateWorkQueue, {"work_pool_name": "p", "name": "q", "priority": 2**31}, "priority"),
    (wp.UpdateWorkQueue, {"work_pool_name": "p", "work_queue_name": "q", "priority": 2**31}, "priority"),
    (wp.UpdateWorkQueueById, {"id": QID, "concurrency_limit": 2**31}, "concurrency_limit"),
    (wp.CreateLegacyWorkQueue, {"name": "q", "priority": 2**40}, "priority"),
    (wp.SetWorkQueuePriorities, {"work_pool_name": "p", "priorities": {"q": 2**31}}, "priorities.q"),
    (q.ListWorkPools, {"offset": 2**63}, "offset"),
    (q.ListWorkQueues, {"work_pool_name": "p", "offset": 2**64}, "offset"),
    (q.ListAllWorkQueues, {"offset": 10**30}, "offset"),
    (q.CountWorkPools, {"min_seq": 2**63}, "min_seq"),
])
def test_integers_stop_where_their_column_does(model, body, field):
    assert invalid_fields(model, body) == [field]


def test_the_largest_storable_integers_are_accepted():
    assert wp.CreateWorkQueue(work_pool_name="p", name="q", priority=INT32_MAX, concurrency_limit=INT32_MAX).priority == INT32_MAX
    assert q.ListWorkPools(offset=INT64_MAX, min_seq=INT64_MAX).offset == INT64_MAX


def test_filters_are_bounded_below_the_bind_parameter_limit():
    assert len(q.ListWorkPools(work_pools={"name": {"any_": ["a"] * MAX_FILTER_VALUES}}).work_pools.name.any_) == MAX_FILTER_VALUES
    assert invalid_fields(q.ListWorkPools, {"work_pools": {"name": {"any_": ["a"] * 32_768}}}) == ["work_pools.name.any_"]
    assert invalid_fields(q.CountWorkQueues, {"work_pool_name": "p", "work_queues": {"id": {"any_": [QID] * (MAX_FILTER_VALUES + 1)}}}) == [
        "work_queues.id.any_"]
    # every filter of a query at its bound stays under asyncpg's 32,767 bind parameters
    assert 3 * MAX_FILTER_VALUES + 2 < 32_767


# ---------------------------------------------------------------------------------------------
# Datetimes


@pytest.mark.parametrize("value", ["0001-01-01T00:00:00+14:00", "9999-12-31T23:59:59-14:00", "0001-01-01T00:00:00Z",
                                   "9999-12-31T00:00:00Z", "0001-01-01T23:59:59+00:00"])
def test_datetimes_that_do_not_survive_utc_are_invalid(value):
    for model, body in [(wp.UpdateWorkQueue, {"work_pool_name": "p", "work_queue_name": "q"}),
                        (wp.UpdateWorkQueueById, {"id": QID})]:
        assert invalid_fields(model, {**body, "last_polled": value}) == ["last_polled"]


def test_datetimes_inside_the_bounds_become_utc():
    adapter = TypeAdapter(UtcDatetime)
    assert adapter.validate_python(EARLIEST) == EARLIEST
    assert adapter.validate_python(LATEST) == LATEST
    assert adapter.validate_json('"2026-03-01T14:00:00+02:00"') == NOW
    assert adapter.validate_json('"2026-03-01T12:00:00"') == NOW  # naive means UTC
    assert adapter.validate_json('"2026-03-01T14:00:00+02:00"').tzinfo is UTC
    # a day either side of the bounds still computes
    assert (EARLIEST - timedelta(days=1)).year == 1 and (LATEST + timedelta(days=1)).year == 9999


def test_a_datetime_overflow_is_an_invalid_reply_not_an_exception():
    reply = parse_payload(wp.UpdateWorkQueue, json.dumps(
        {"work_pool_name": "p", "work_queue_name": "q", "last_polled": "0001-01-01T00:00:00+14:00"}).encode())
    assert isinstance(reply, dict) and reply["error"]["code"] == "invalid" and reply["error"]["field"] == "last_polled"
    assert "once converted to UTC" in reply["error"]["message"]


def test_any_exception_while_validating_is_an_invalid_reply():
    from pydantic import field_validator

    class Fragile(BaseModel):
        x: int

        @field_validator("x")
        @classmethod
        def boom(cls, v):
            raise OverflowError("too far")

    reply = parse_payload(Fragile, b'{"x": 1}')
    assert isinstance(reply, dict) and reply["ok"] is False and reply["error"]["code"] == "invalid"
    assert "OverflowError" in reply["error"]["message"]


# ---------------------------------------------------------------------------------------------
# Priorities the rules derive (PR-1, PR-4, WQ-2) stay storable


def ctx() -> DecisionContext:
    return DecisionContext.fixed(NOW)


class World:
    """One pool, decided and folded without I/O."""

    def __init__(self):
        self.ctx = ctx()
        self.pool = self.apply(wp.decide_create_work_pool(wp.CreateWorkPool(name="p", type="process"),
                                                          wp.WorkPoolNameClaim(), self.ctx), None)

    def apply(self, decision, pool=...):
        state = self.pool if pool is ... else pool
        for e in decision.events:
            if e.aggregate_type == wp.WORK_POOL:
                state = wp.evolve(state, e.event)
        self.pool = state
        return state

    def queue(self, name: str, priority: int | None = None) -> None:
        self.apply(wp.decide_create_work_queue(wp.CreateWorkQueue(work_pool_name="p", name=name, priority=priority),
                                               self.pool, self.ctx))

    def priorities(self) -> dict[str, int]:
        return {q.name: q.priority for q in self.pool.queues.values()}


def rejection(fn, *args) -> Rejection:
    with pytest.raises(Rejection) as info:
        fn(*args)
    return info.value


def test_a_queue_can_sit_at_the_largest_priority():
    w = World()
    w.queue("q", INT32_MAX)  # PR-3: past every other priority, nothing moves
    assert w.priorities() == {"default": 1, "q": INT32_MAX}


def test_a_create_that_would_push_a_queue_past_int32_is_invalid():
    w = World()
    w.queue("q", INT32_MAX)
    r = rejection(wp.decide_create_work_queue, wp.CreateWorkQueue(work_pool_name="p", name="r", priority=INT32_MAX),
                  w.pool, w.ctx)
    assert (r.code, r.field) == (ErrorCode.INVALID, "priority")
    assert "'q'" in r.message and str(INT32_MAX + 1) in r.message and str(INT32_MAX) in r.message


def test_an_update_that_would_push_a_queue_past_int32_is_invalid():
    w = World()
    w.queue("q", INT32_MAX)
    cmd = wp.UpdateWorkQueue(work_pool_name="p", work_queue_name="default", priority=INT32_MAX)
    r = rejection(wp.decide_update_work_queue, cmd, w.pool, w.ctx)
    assert (r.code, r.field) == (ErrorCode.INVALID, "priority") and "'q'" in r.message
    # just below it is fine: nothing has to move
    ok = wp.decide_update_work_queue(wp.UpdateWorkQueue(work_pool_name="p", work_queue_name="default",
                                                        priority=INT32_MAX - 1), w.pool, w.ctx)
    assert {q.name: q.priority for q in ok.result[0].queues.values()} == {"default": INT32_MAX - 1, "q": INT32_MAX}


def test_a_bulk_reprioritisation_past_int32_is_invalid():
    w = World()
    w.queue("q", INT32_MAX)
    cmd = wp.SetWorkQueuePriorities(work_pool_name="p", priorities={"default": INT32_MAX})
    r = rejection(wp.decide_set_work_queue_priorities, cmd, w.pool, w.ctx)
    assert (r.code, r.field) == (ErrorCode.INVALID, "priorities")


def test_a_delete_that_would_push_a_shared_priority_past_int32_is_invalid():
    w = World()
    w.queue("q", INT32_MAX)
    queue_id = w.pool.default_queue_id
    # WQ-11: the legacy update stores the priority as given, so two queues can share one
    w.apply(wp.decide_update_work_queue_by_id(wp.UpdateWorkQueueById(id=queue_id, priority=INT32_MAX), w.pool, w.ctx))
    w.queue("z")
    assert w.priorities() == {"default": INT32_MAX, "q": INT32_MAX, "z": 1}
    r = rejection(wp.decide_delete_work_queue, wp.DeleteWorkQueue(work_pool_name="p", work_queue_name="z"), w.pool, w.ctx)
    assert r.code == ErrorCode.INVALID and str(INT32_MAX + 1) in r.message


def test_event_payloads_refuse_unstorable_values_too():
    """A second net: a decider that forgot a bound cannot build the event."""
    w = World()
    queue = w.pool.queues[w.pool.default_queue_id]
    with pytest.raises(ValidationError):
        wp.WorkQueueSnapshot.of(replace(queue, priority=INT32_MAX + 1))
    with pytest.raises(ValidationError):
        wp.WorkQueueSnapshot.of(replace(queue, name="a\x00"))
    with pytest.raises(ValidationError):
        wp.WorkQueuesReprioritized(reprioritized={uuid.uuid4(): INT32_MAX + 1}, updated=NOW)


# ---------------------------------------------------------------------------------------------
# Message sizes: body plus headers, every message, before any is sent


def test_header_size_is_what_nats_py_sends():
    assert headers_size({"A": "b"}) == len(b"NATS/1.0\r\nA: b\r\n\r\n")
    assert headers_size({"Nats-Msg-Id": "x", "K": "vv"}) == len(b"NATS/1.0\r\nNats-Msg-Id: x\r\nK: vv\r\n\r\n")


def msg(size: int, subject: str = "ns.evt.work_pool.1.WorkPoolUpdated") -> OutgoingMessage:
    return OutgoingMessage(subject, b"x" * size, "id-1", 0, "ns.evt.work_pool.1.*")


def test_a_body_under_the_limit_with_headers_over_it_is_too_large():
    limit = 1000
    m = msg(990)
    assert len(m.data) < limit < message_size(m, batched=False)
    with pytest.raises(MessageTooLarge) as info:
        check_sizes([m], limit)
    assert "WorkPoolUpdated" in str(info.value) and "1,000" in str(info.value)
    fits = msg(limit - headers_size(m.headers()))
    check_sizes([fits], limit)
    with pytest.raises(MessageTooLarge):  # in a batch the batch headers count too
        check_sizes([fits, msg(1)], limit)


def test_the_idempotency_record_is_named_when_it_is_the_large_one():
    with pytest.raises(MessageTooLarge) as info:
        check_sizes([msg(10), msg(5000, "ns.idem.abcdef")], 1000)
    assert "idempotency record" in str(info.value)


def test_a_message_must_leave_its_headroom_under_the_limit():
    limit = 1000
    fits = replace(msg(0), headroom=100)
    fits = replace(fits, data=b"x" * (limit - 100 - message_size(fits, batched=False)))
    check_sizes([fits], limit)
    with pytest.raises(MessageTooLarge) as info:
        check_sizes([replace(fits, data=fits.data + b"x")], limit)
    assert (info.value.size, info.value.limit, info.value.headroom) == (901, 1000, 100)
    assert "a run must stay 100 bytes under the server's max payload of 1,000 bytes" in str(info.value)
    assert "later states" in str(info.value)
    deployment = replace(fits, subject="ns.evt.deployment.1.DeploymentCreated", data=fits.data + b"x")
    with pytest.raises(MessageTooLarge) as info:
        check_sizes([deployment], limit)
    assert "a deployment must stay 100 bytes under" in str(info.value) and "the runs it makes" in str(info.value)


def test_what_creates_or_grows_a_run_carries_the_headroom_and_stores_nothing_of_it():
    from runledger.commands import deployments as dp
    from runledger.commands import flow_runs as fr
    from runledger.commands import task_runs as tr
    from runledger.commands.bounds import (
        RUN_FROM_DEPLOYMENT_BYTES,
        RUN_STATE_HEADROOM_BYTES,
        UPDATE_SLACK_BYTES,
    )
    from runledger.commands.events import encode_event

    run = tr.TaskRun(id=uuid.uuid4(), created=NOW, updated=NOW, name="r", task_key="k", dynamic_key="0")
    encoded = encode_event(str(run.id), tr.TaskRunCreated(run=run), occurred=NOW, event_id=uuid.uuid4())
    assert encoded.headroom == RUN_STATE_HEADROOM_BYTES
    assert set(json.loads(encoded.data)["payload"]) == {"run"}  # nothing of it stored
    state_set = encode_event(str(run.id), tr.TaskRunStateSet(run=run), occurred=NOW, event_id=uuid.uuid4())
    assert state_set.headroom == 0  # a state is never refused for the run's size
    # A deployment leaves room for its runs, which are larger than it; an update leaves a little
    # less than its creation did, a pause or resume none (the way out).
    created = RUN_STATE_HEADROOM_BYTES + RUN_FROM_DEPLOYMENT_BYTES
    assert dp.DeploymentCreated.model_construct().append_headroom() == created
    updated = dp.DeploymentUpdated.model_construct(changed=["parameters"], by_pause_or_resume=False)
    assert updated.append_headroom() == created - UPDATE_SLACK_BYTES
    paused = dp.DeploymentUpdated.model_construct(changed=["paused"], by_pause_or_resume=True)
    assert paused.append_headroom() == 0
    assert fr.FlowRunUpdated.model_construct(changed=["tags"]).append_headroom() == RUN_STATE_HEADROOM_BYTES - UPDATE_SLACK_BYTES
    assert fr.FlowRunStateSet.model_construct().append_headroom() == 0
    assert wp.WorkPoolUpdated.model_construct().append_headroom() == 0


@pytest.mark.parametrize(("value", "found"), [
    ({"a": "x", "b": ["ok", {"c": "y\ud800z"}]}, ("b.1.c", "must not contain a lone surrogate (U+D800)")),
    ({"a": {"\udfff": 1}}, ("a.[key]", "keys must not contain a lone surrogate (U+DFFF)")),
    ({"a": "\x00", "b": "\udc00"}, ("b", "must not contain a lone surrogate (U+DC00)")),
    ({"a": "\x00\ud800"}, ("a", "must not contain a lone surrogate (U+D800)")),
    ({"a": ["\U0001f600", 1, None, 2.5]}, None),
])
def test_a_lone_surrogate_is_found_where_it_is(value, found):
    from runledger.commands.bounds import lone_surrogate_at

    assert lone_surrogate_at(value) == found


def test_a_lone_surrogate_escape_names_its_field_not_the_json_parser():
    from runledger.commands import task_runs as tr

    reply = parse_payload(tr.CreateTaskRun, b'{"task_key": "ab\\ud800", "dynamic_key": "0"}')
    assert reply == {"ok": False, "error": {"code": "invalid", "field": "task_key",
                                            "message": "task_key: must not contain a lone surrogate (U+D800)"}}
    # Malformed otherwise: JSON's own message, as before.
    reply = parse_payload(tr.CreateTaskRun, b'{"task_key": "ab\\ud800", "dynamic_key": }')
    assert isinstance(reply, dict) and reply["error"]["message"].startswith("body is not valid JSON:")
    reply = parse_payload(tr.CreateTaskRun, b'"\\ud800"')
    assert isinstance(reply, dict) and reply["error"]["message"].startswith("body is not valid JSON:")


def test_a_string_too_long_or_short_is_counted_in_characters():
    from runledger.commands import flows as fl
    from runledger.commands import task_runs as tr

    reply = parse_payload(fl.CreateFlow, json.dumps({"name": "f", "tags": ["t" * 5_000]}).encode())
    assert isinstance(reply, dict)
    assert reply["error"]["message"] == "tags.0: String should have at most 255 characters"
    assert reply["error"]["details"][0]["type"] == "string_too_long"
    reply = parse_payload(tr.CreateTaskRun, b'{"task_key": "", "dynamic_key": "0"}')
    assert isinstance(reply, dict) and reply["error"]["message"] == "task_key: String should have at least 1 character"
    # A list is still counted in items.
    reply = parse_payload(fl.CreateFlow, json.dumps({"name": "f", "tags": ["t"] * 1_001}).encode())
    assert isinstance(reply, dict) and "at most 1000 items" in reply["error"]["message"]


class _RecordingNats:
    max_payload = 1000

    def __init__(self):
        self.published: list[str] = []

    def jetstream(self, **_):
        return None

    async def publish(self, subject, data, **_):
        self.published.append(subject)


async def test_an_append_checks_every_message_before_sending_the_first():
    nc = _RecordingNats()
    store = EventStore(nc, Settings(namespace="ns"))
    assert store.max_payload == 1000
    with pytest.raises(MessageTooLarge):
        await store.append([msg(10), msg(10), msg(2000)])
    with pytest.raises(MessageTooLarge):
        await store.append_alone([msg(10), msg(2000)])
    assert nc.published == []
    assert EventStore(nc, Settings(namespace="ns"), max_payload=50).max_payload == 50


def test_the_largest_field_names_what_to_shrink():
    cmd = wp.UpdateWorkPool(name="p", description="d", base_job_template={"job_configuration": {"a": "x" * 100},
                                                                          "variables": {"a": 1}})
    assert largest_field(cmd) == "base_job_template"
