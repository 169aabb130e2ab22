"""Unique keys and the flow decider, pure: no I/O."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime

import pytest

from runledger.commands import flows as fl
from runledger.commands import unique_keys as uk
from runledger.commands.messages import DecisionContext, Rejection

NOW = datetime(2026, 12, 1, 12, 0, tzinfo=UTC)


def ctx() -> DecisionContext:
    return DecisionContext.fixed(NOW)


def test_a_keys_aggregate_id_is_stable_per_scope_and_fits_a_subject_token():
    scope = uk.UniqueKeyScope("deployment_name")
    one = scope.aggregate_id(str(uuid.UUID(int=1)), "my deployment.v2 *>")
    assert one == scope.aggregate_id(str(uuid.UUID(int=1)), "my deployment.v2 *>")
    assert one.startswith("deployment_name-") and len(one) == len("deployment_name-") + 40
    assert all(c.isalnum() or c in "_-" for c in one)  # no dot, space, wildcard
    assert scope.aggregate_id("a.b", "c") != scope.aggregate_id("a", "b.c")  # parts are kept apart
    assert uk.UniqueKeyScope("flow_name").aggregate_id("x") != uk.UniqueKeyScope("flow_namex").aggregate_id("x")
    assert uk.FLOW_NAME.aggregate_id("x") != uk.UniqueKeyScope("other").aggregate_id("x")


@pytest.mark.parametrize("name", ["", "Flow", "a.b", "a-b", "a b"])
def test_a_scope_name_is_lowercase_letters_and_underscores(name):
    with pytest.raises(ValueError):
        uk.UniqueKeyScope(name)


def test_a_claim_holds_its_owner_until_released():
    owner = uuid.uuid4()
    claimed = uk.FLOW_NAME.claim(owner, "etl")
    released = uk.FLOW_NAME.release(owner, "etl")
    assert claimed.aggregate_id == released.aggregate_id == uk.FLOW_NAME.aggregate_id("etl")
    assert claimed.aggregate_type == uk.UNIQUE_KEY
    state = uk.evolve_claim(uk.UniqueKeyClaim(), claimed.event)
    assert state.owner_id == owner
    assert uk.evolve_claim(state, released.event).owner_id is None


def test_creating_a_flow_claims_its_name_in_the_same_decision():
    d = fl.decide_create_flow(fl.CreateFlow(name="etl", tags=["a", "b", "a"]), uk.UniqueKeyClaim(), None, ctx())
    assert d.created is True
    claim, created = d.events
    assert claim.aggregate_id == uk.FLOW_NAME.aggregate_id("etl") and claim.event.owner_id == created.event.flow.id
    assert created.aggregate_id == str(d.result.id)
    assert d.result.tags == ["a", "b"] and d.result.created == NOW == d.result.updated


def test_a_taken_name_returns_the_existing_flow_unchanged_and_appends_nothing():
    existing = fl.Flow(id=uuid.uuid4(), created=NOW, updated=NOW, name="etl", tags=["x"])
    d = fl.decide_create_flow(fl.CreateFlow(name="etl", tags=["y"]), uk.UniqueKeyClaim(existing.id), existing, ctx())
    assert d.events == [] and d.created is False and d.result is existing


def test_deleting_a_flow_releases_its_name_only_when_it_holds_it():
    flow = fl.Flow(id=uuid.uuid4(), created=NOW, updated=NOW, name="etl")
    d = fl.decide_delete_flow(fl.DeleteFlow(id=flow.id), flow, uk.UniqueKeyClaim(flow.id), ctx())
    assert [type(e.event) for e in d.events] == [uk.UniqueKeyReleased, fl.FlowDeleted]
    d = fl.decide_delete_flow(fl.DeleteFlow(id=flow.id), flow, uk.UniqueKeyClaim(uuid.uuid4()), ctx())
    assert [type(e.event) for e in d.events] == [fl.FlowDeleted]
    with pytest.raises(Rejection) as e:
        fl.decide_delete_flow(fl.DeleteFlow(id=flow.id), None, None, ctx())
    assert e.value.code == "not_found"


def test_the_flow_shape_is_one_model_for_state_event_and_reply():
    flow = fl.Flow(id=uuid.UUID(int=7), created=NOW, updated=NOW, name="etl", tags=["t"], labels={"k": 1})
    assert fl.Flow.model_validate(flow.model_dump()) == flow  # a read-model row makes the same flow
    assert fl.FlowCreated(flow=flow).flow.reply() == {
        "id": str(uuid.UUID(int=7)), "created": NOW.isoformat().replace("+00:00", "Z"),
        "updated": NOW.isoformat().replace("+00:00", "Z"), "name": "etl", "tags": ["t"], "labels": {"k": 1}}
