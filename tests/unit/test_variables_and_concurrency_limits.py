"""The variable and global concurrency limit deciders, pure: no I/O. Names are unique keys;
rules and defaults follow Prefect's `VariableCreate`/`VariableUpdate` and
`ConcurrencyLimitV2Create`/`ConcurrencyLimitV2Update`."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta

import pytest
from pydantic import ValidationError

from runledger.commands import concurrency_limits as cl
from runledger.commands import prefect_events as pe
from runledger.commands import unique_keys as uk
from runledger.commands import variables as va
from runledger.commands.events import EventEnvelope
from runledger.commands.messages import DecisionContext, Rejection

NOW = datetime(2026, 12, 1, 12, 0, tzinfo=UTC)
LATER = NOW + timedelta(minutes=5)


def ctx(now: datetime = NOW) -> DecisionContext:
    return DecisionContext.fixed(now)


def fold(evolve, events, state=None):
    for e in events:
        state = evolve(state, e.event)
    return state


def rejected(code: str, fn, *args) -> Rejection:
    with pytest.raises(Rejection) as e:
        fn(*args)
    assert e.value.code == code
    return e.value


# ---------------------------------------------------------------------------------------------
# Variables

def _variable(name: str = "db_url", value=None, tags=()) -> va.Variable:
    cmd = va.CreateVariable(name=name, value=value, tags=list(tags))
    return va.decide_create_variable(cmd, uk.UniqueKeyClaim(), ctx()).result


@pytest.mark.parametrize("value", ["s", 0, 1.5, True, None, {"a": [1, {"b": None}]}, [1, "x"]])
def test_a_variable_holds_any_json_value(value):
    d = va.decide_create_variable(va.CreateVariable(name="v", value=value, tags=["a", "b"]), uk.UniqueKeyClaim(), ctx())
    claim, created = d.events
    assert d.created is True and claim.aggregate_id == va.VARIABLE_NAME.aggregate_id("v")
    assert claim.event.owner_id == d.result.id and created.aggregate_id == str(d.result.id)
    assert d.result.value == value and d.result.tags == ["a", "b"] and d.result.created == NOW == d.result.updated
    assert fold(va.evolve, d.events[1:]) == d.result


def test_a_taken_variable_name_is_a_conflict():
    r = rejected("conflict", va.decide_create_variable, va.CreateVariable(name="v", value=1),
                 uk.UniqueKeyClaim(uuid.uuid4()), ctx())
    assert r.message == "A variable with the name 'v' already exists."


@pytest.mark.parametrize("body, says", [
    ({"name": "Upper", "value": 1}, "lowercase letters, numbers, and dashes or underscores"),
    ({"name": "a.b", "value": 1}, "lowercase letters"),
    ({"name": "a b", "value": 1}, "lowercase letters"),
    ({"name": "x" * 256, "value": 1}, "at most 255 characters"),
    ({"name": "v"}, "Field required"),
    ({"name": "v", "value": "x" * 4999}, "less than 5000 characters"),  # 5001 as JSON, quotes included
    ({"name": "v", "value": {"k": "\x00"}}, "NUL"),
    ({"name": "v", "value": float("inf")}, "finite"),
    ({"name": "v", "value": 1, "tags": ["t\x00"]}, "NUL"),
    ({"name": "v", "value": 1, "colour": "red"}, "Extra inputs"),
])
def test_variable_input_follows_prefects_rules(body, says):
    with pytest.raises(ValidationError, match=says):
        va.CreateVariable.model_validate(body)


def test_the_value_limit_is_on_the_json_text_and_names_may_use_dashes_underscores_and_digits():
    assert va.CreateVariable(name="my-var_2", value="x" * 4998).value == "x" * 4998  # 5000 as JSON
    assert va.CreateVariable(name="", value=None).name == ""  # Prefect's pattern allows it


def test_update_changes_only_what_is_given():
    v = _variable("v", value={"a": 1}, tags=["x"])
    claim = uk.UniqueKeyClaim(v.id)
    d = va.decide_update_variable(va.UpdateVariable(name="v", tags=["y"]), claim, v, None, ctx(LATER))
    (event,) = d.events
    assert event.event.variable == d.result and d.result.value == {"a": 1} and d.result.tags == ["y"]
    assert d.result.updated == LATER and d.result.created == NOW
    assert event.event.changes == {"tags": va.Change(old=["x"], new=["y"])}

    d = va.decide_update_variable(va.UpdateVariable(name="v", value=None), claim, v, None, ctx(LATER))
    assert d.result.value is None and d.result.tags == ["x"]  # an explicit null is a value

    same = va.decide_update_variable(va.UpdateVariable(name="v", value={"a": 1}, tags=None), claim, v, None, ctx(LATER))
    assert same.events == [] and same.result is v


def test_a_rename_moves_the_claim_and_a_taken_new_name_is_a_conflict():
    v = _variable("old", value=1)
    d = va.decide_update_variable(va.UpdateVariable(name="old", new_name="new"), uk.UniqueKeyClaim(v.id), v,
                                  uk.UniqueKeyClaim(), ctx(LATER))
    released, claimed, updated = d.events
    assert isinstance(released.event, uk.UniqueKeyReleased) and released.aggregate_id == va.VARIABLE_NAME.aggregate_id("old")
    assert isinstance(claimed.event, uk.UniqueKeyClaimed) and claimed.aggregate_id == va.VARIABLE_NAME.aggregate_id("new")
    assert updated.event.variable.name == "new" and d.result.id == v.id
    rejected("conflict", va.decide_update_variable, va.UpdateVariable(name="old", new_name="new"),
             uk.UniqueKeyClaim(v.id), v, uk.UniqueKeyClaim(uuid.uuid4()), ctx())


def test_updating_or_deleting_an_unknown_variable_is_not_found():
    r = rejected("not_found", va.decide_update_variable, va.UpdateVariable(name="nope", value=1),
                 uk.UniqueKeyClaim(), None, None, ctx())
    assert r.message == "Variable 'nope' not found."
    rejected("not_found", va.decide_delete_variable, va.DeleteVariable(name="nope"), uk.UniqueKeyClaim(), None, ctx())


def test_deleting_a_variable_releases_its_name():
    v = _variable("v", value="x")
    d = va.decide_delete_variable(va.DeleteVariable(name="v"), uk.UniqueKeyClaim(v.id), v, ctx())
    assert [type(e.event) for e in d.events] == [uk.UniqueKeyReleased, va.VariableDeleted]
    assert fold(va.evolve, d.events[1:], v) is None


# ---------------------------------------------------------------------------------------------
# Global concurrency limits

def _limit(name: str = "db", limit: int = 3, **fields) -> cl.ConcurrencyLimit:
    cmd = cl.CreateConcurrencyLimit(name=name, limit=limit, **fields)
    return cl.decide_create_concurrency_limit(cmd, uk.UniqueKeyClaim(), ctx()).result


def test_a_new_limit_has_prefects_defaults_and_claims_its_name():
    d = cl.decide_create_concurrency_limit(cl.CreateConcurrencyLimit(name="db", limit=0), uk.UniqueKeyClaim(), ctx())
    claim, created = d.events
    assert claim.aggregate_id == cl.CONCURRENCY_LIMIT_NAME.aggregate_id("db") and claim.event.owner_id == d.result.id
    assert created.aggregate_id == str(d.result.id) and d.created is True
    assert d.result.reply() == {
        "id": str(d.result.id), "created": "2026-12-01T12:00:00Z", "updated": "2026-12-01T12:00:00Z",
        "name": "db", "limit": 0, "active": True, "active_slots": 0, "denied_slots": 0,
        "slot_decay_per_second": 0.0, "avg_slot_occupancy_seconds": 2.0}
    assert cl.ConcurrencyLimit.model_validate(d.result.model_dump()) == d.result  # a read-model row
    rejected("conflict", cl.decide_create_concurrency_limit, cl.CreateConcurrencyLimit(name="db", limit=1),
             uk.UniqueKeyClaim(d.result.id), ctx())


@pytest.mark.parametrize("model, body, says", [
    (cl.CreateConcurrencyLimit, {"name": "db", "limit": -1}, "greater than or equal to 0"),
    (cl.CreateConcurrencyLimit, {"name": "db"}, "Field required"),
    (cl.CreateConcurrencyLimit, {"name": "a/b", "limit": 1}, "must not contain"),
    (cl.CreateConcurrencyLimit, {"name": "", "limit": 1}, "must not be empty"),
    (cl.CreateConcurrencyLimit, {"name": "db", "limit": 1, "slot_decay_per_second": -0.5}, "greater than or equal"),
    (cl.CreateConcurrencyLimit, {"name": "db", "limit": 2**31}, "less than or equal"),
    (cl.UpdateConcurrencyLimit, {"limit": 1}, "either id or name"),
    (cl.UpdateConcurrencyLimit, {"id": str(uuid.uuid4()), "name": "db"}, "either id or name"),
    (cl.DeleteConcurrencyLimit, {}, "either id or name"),
])
def test_limit_input_follows_prefects_rules(model, body, says):
    with pytest.raises(ValidationError, match=says):
        model.model_validate(body)


def test_a_limit_is_updated_partially_by_id_or_by_name():
    lim = _limit("db", 3)
    for which in ({"id": lim.id}, {"name": "db"}):
        cmd = cl.UpdateConcurrencyLimit(**which, limit=5, active=False, slot_decay_per_second=None)
        d = cl.decide_update_concurrency_limit(cmd, lim, None, ctx(LATER))
        (event,) = d.events
        assert (d.result.limit, d.result.active, d.result.slot_decay_per_second) == (5, False, 0.0)
        assert d.result.updated == LATER and event.event.limit == d.result
        assert set(event.event.changes) == {"limit", "active"}
    same = cl.decide_update_concurrency_limit(cl.UpdateConcurrencyLimit(name="db", limit=3), lim, None, ctx())
    assert same.events == [] and same.result is lim
    rejected("not_found", cl.decide_update_concurrency_limit, cl.UpdateConcurrencyLimit(name="x", limit=1), None, None, ctx())
    rejected("not_found", cl.decide_delete_concurrency_limit, cl.DeleteConcurrencyLimit(id=uuid.uuid4()), None, ctx())


def test_renaming_a_limit_moves_its_claim():
    lim = _limit("db", 3)
    d = cl.decide_update_concurrency_limit(cl.UpdateConcurrencyLimit(id=lim.id, new_name="db2"), lim,
                                           uk.UniqueKeyClaim(), ctx())
    assert [(type(e.event), e.aggregate_id) for e in d.events] == [
        (uk.UniqueKeyReleased, cl.CONCURRENCY_LIMIT_NAME.aggregate_id("db")),
        (uk.UniqueKeyClaimed, cl.CONCURRENCY_LIMIT_NAME.aggregate_id("db2")),
        (cl.ConcurrencyLimitUpdated, str(lim.id))]
    assert d.result.name == "db2"
    rejected("conflict", cl.decide_update_concurrency_limit, cl.UpdateConcurrencyLimit(id=lim.id, new_name="db2"),
             lim, uk.UniqueKeyClaim(uuid.uuid4()), ctx())


def test_the_helpers_a_deployment_uses_make_update_and_delete_its_limit():
    deployment_id = uuid.uuid4()
    name = f"deployment:{deployment_id}"
    made = cl.new_limit_events(uuid.UUID(int=9), name, 2, ctx())
    assert [type(e.event) for e in made] == [uk.UniqueKeyClaimed, cl.ConcurrencyLimitCreated]
    lim = fold(cl.evolve, made[1:])
    assert (lim.name, lim.limit, lim.active, lim.active_slots) == (name, 2, True, 0)

    assert cl.update_limit_events(lim, 2, ctx()) == []
    changed = cl.update_limit_events(lim, 4, ctx(LATER))
    after = fold(cl.evolve, changed, lim)
    assert after.limit == 4 and after.updated == LATER and after.id == lim.id

    gone = cl.delete_limit_events(after)
    assert [(type(e.event), e.aggregate_id) for e in gone] == [
        (uk.UniqueKeyReleased, cl.CONCURRENCY_LIMIT_NAME.aggregate_id(name)), (cl.ConcurrencyLimitDeleted, str(lim.id))]
    assert fold(cl.evolve, gone[1:], after) is None


# ---------------------------------------------------------------------------------------------
# Prefect's vocabulary

def _export(events) -> list[dict]:
    envelopes = [EventEnvelope.wrap(e.aggregate_id, e.event, occurred=NOW, event_id=uuid.UUID(int=i + 1))
                 for i, e in enumerate(events)]
    return pe.export_log(envelopes)[0]


def test_variables_and_limits_export_as_prefects_lifecycle_events():
    v = _variable("v", value={"a": 1}, tags=["t"])
    (created,) = _export(va.decide_create_variable(va.CreateVariable(name="v", value={"a": 1}, tags=["t"]),
                                                   uk.UniqueKeyClaim(), DecisionContext.fixed(NOW)).events)
    assert created["event"] == "prefect.variable.created"
    assert created["resource"] == {"prefect.resource.id": f"prefect.variable.{v.id}", "prefect.resource.name": "v"}
    assert created["payload"] == {"name": "v", "value": {"a": 1}, "tags": ["t"]}

    lim = _limit("db", 3)
    events = [*cl.new_limit_events(lim.id, "db", 3, ctx()), *cl.update_limit_events(lim, 4, ctx()),
              *cl.delete_limit_events(lim)]
    out = _export(events)
    assert [e["event"] for e in out] == ["prefect.concurrency-limit.created", "prefect.concurrency-limit.updated",
                                         "prefect.concurrency-limit.deleted"]
    assert out[1]["payload"] == {"name": "db", "limit": 4, "active": True, "slot_decay_per_second": 0.0}
    assert out[0]["resource"]["prefect.resource.id"] == f"prefect.concurrency-limit.{lim.id}"
