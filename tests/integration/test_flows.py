"""Flows through the broker, against real NATS and Postgres: created by name and idempotent
(a second create returns the first flow unchanged, `created: false`), read by id and by name,
filtered and counted, deleted (the name is free again); a name is unique under a race between
two service instances; bad input is `invalid` and appends nothing; replay equals live."""

from __future__ import annotations

import asyncio
import json
import uuid

import pytest

from runledger.handlers.service import Service
from runledger.infra.nats_connection import connect
from tests.integration.broker import assert_live_equals_rebuild


async def test_a_flow_is_created_once_by_name_and_read_back(broker):
    first = await broker.cmd("CreateFlow", name="etl", tags=["nightly", "db", "nightly"], labels={"team": "data"})
    assert first["ok"] and first["created"] is True
    flow = first["result"]
    assert set(flow) == {"id", "created", "updated", "name", "tags", "labels"}
    assert flow["name"] == "etl" and flow["tags"] == ["nightly", "db"] and flow["labels"] == {"team": "data"}

    again = await broker.cmd("CreateFlow", name="etl", tags=["other"])
    assert again["ok"] and again["created"] is False
    assert again["result"] == flow  # unchanged: the tags of the second create are not applied

    assert await broker.ok_qry("GetFlow", id=flow["id"]) == flow
    assert await broker.ok_qry("GetFlowByName", name="etl") == flow
    missing = await broker.qry("GetFlow", id=str(uuid.uuid4()))
    assert missing["error"]["code"] == "not_found"
    assert (await broker.qry("GetFlowByName", name="nope"))["error"]["code"] == "not_found"


async def test_flows_are_filtered_counted_and_ordered_by_name(broker):
    made = {}
    for name, tags in [("b", ["x", "y"]), ("a", ["x"]), ("c", [])]:
        made[name] = await broker.ok_cmd("CreateFlow", name=name, tags=tags)
    listed = await broker.ok_qry("ListFlows")
    assert [f["name"] for f in listed] == ["a", "b", "c"]
    assert [f["name"] for f in await broker.ok_qry("ListFlows", flows={"tags": {"all_": ["x"]}})] == ["a", "b"]
    assert [f["name"] for f in await broker.ok_qry("ListFlows", flows={"tags": {"all_": ["x", "y"]}})] == ["b"]
    by_id = await broker.ok_qry("ListFlows", flows={"id": {"any_": [made["c"]["id"], made["a"]["id"]]}})
    assert [f["name"] for f in by_id] == ["a", "c"]
    assert [f["name"] for f in await broker.ok_qry("ListFlows", limit=1, offset=1)] == ["b"]
    assert await broker.ok_qry("CountFlows") == 3
    assert await broker.ok_qry("CountFlows", flows={"name": {"any_": ["a", "c", "zz"]}}) == 2


async def test_a_deleted_flow_is_gone_and_its_name_makes_a_new_flow(broker):
    old = await broker.ok_cmd("CreateFlow", name="short-lived")
    await broker.ok_cmd("DeleteFlow", id=old["id"])
    assert (await broker.qry("GetFlow", id=old["id"]))["error"]["code"] == "not_found"
    assert (await broker.cmd("DeleteFlow", id=old["id"]))["error"]["code"] == "not_found"
    new = await broker.cmd("CreateFlow", name="short-lived")
    assert new["created"] is True and new["result"]["id"] != old["id"]
    assert [f["id"] for f in await broker.ok_qry("ListFlows")] == [new["result"]["id"]]


@pytest.mark.parametrize("body, field", [
    ({}, "name"),
    ({"name": ""}, "name"),
    ({"name": "a/b"}, "name"),
    ({"name": "x\u0000"}, "name"),
    ({"name": "x" * 256}, "name"),
    ({"name": "ok", "tags": ["t\u0000"]}, "tags.0"),
    ({"name": "ok", "tags": "nightly"}, "tags"),
    ({"name": "ok", "labels": {"k": float("nan")}}, None),
    ({"name": "ok", "colour": "blue"}, "colour"),
])
async def test_bad_flow_input_is_invalid_and_appends_nothing(broker, body, field):
    before = await broker.stream_messages()
    raw = json.dumps(body).encode() if "labels" not in body else b'{"name": "ok", "labels": {"k": NaN}}'
    reply = await broker.raw(broker.settings.command_subject("CreateFlow"), raw)
    assert reply["ok"] is False and reply["error"]["code"] == "invalid", reply
    if field is not None:
        assert reply["error"]["field"] == field
    assert await broker.stream_messages() == before


async def test_thirty_racing_creates_of_one_name_on_two_instances_make_one_flow(broker, settings, service):
    other = Service(settings, roles=frozenset({"commands"}))
    await other.start()
    nc = await connect(settings)
    try:
        replies = await asyncio.gather(*(
            nc.request(settings.command_subject("CreateFlow"), json.dumps({"name": "contested"}).encode(), timeout=20)
            for _ in range(30)))
    finally:
        await nc.close()
        await other.stop()
    bodies = [json.loads(r.data) for r in replies]
    assert all(b["ok"] for b in bodies), [b for b in bodies if not b["ok"]][:2]
    assert sum(b["created"] for b in bodies) == 1
    assert len({b["result"]["id"] for b in bodies}) == 1
    broker.last_seq = max(b["seq"] for b in bodies)
    assert await broker.ok_qry("CountFlows", flows={"name": {"any_": ["contested"]}}) == 1


async def test_replay_of_flows_equals_live(broker, service, settings):
    for i in range(5):
        await broker.ok_cmd("CreateFlow", name=f"f{i}", tags=[f"t{i % 2}"])
    gone = await broker.ok_cmd("CreateFlow", name="gone")
    await broker.ok_cmd("DeleteFlow", id=gone["id"])
    await broker.ok_qry("CountFlows")  # the read model has caught up with the last command
    assert await assert_live_equals_rebuild(service, settings) >= 5
