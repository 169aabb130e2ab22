"""Variables and global concurrency limits through the broker, against real NATS and Postgres:
created, read by id and by name, updated partially (renamed too), filtered, counted, deleted
(the name is free again); a taken name is a `conflict`; a name is unique under a race between
two service instances; bad input is `invalid` and appends nothing; replay equals live; the
client, once, against the real service."""

from __future__ import annotations

import asyncio
import json
import uuid

import pytest

from runledger.client import ConcurrencyLimit, Conflict, NotFound, RunledgerClient, Variable
from runledger.handlers.service import Service
from runledger.infra.nats_connection import connect
from tests.integration.broker import assert_live_equals_rebuild

# ---------------------------------------------------------------------------------------------
# Variables


async def test_a_variable_is_created_read_updated_and_deleted(broker):
    first = await broker.cmd("CreateVariable", name="db_url", value={"host": "db", "port": 5432}, tags=["prod"])
    assert first["ok"] and first["created"] is True
    v = first["result"]
    assert set(v) == {"id", "created", "updated", "name", "value", "tags"}
    assert (v["name"], v["value"], v["tags"]) == ("db_url", {"host": "db", "port": 5432}, ["prod"])
    assert await broker.ok_qry("GetVariable", id=v["id"]) == v
    assert await broker.ok_qry("GetVariableByName", name="db_url") == v

    taken = await broker.cmd("CreateVariable", name="db_url", value=1)
    assert taken["error"] == {"code": "conflict", "message": "A variable with the name 'db_url' already exists."}

    updated = await broker.ok_cmd("UpdateVariable", name="db_url", tags=["prod", "eu"])
    assert updated["value"] == v["value"] and updated["tags"] == ["prod", "eu"] and updated["updated"] > v["updated"]
    nulled = await broker.ok_cmd("UpdateVariable", name="db_url", value=None)
    assert nulled["value"] is None and nulled["tags"] == ["prod", "eu"]
    assert await broker.ok_qry("GetVariableByName", name="db_url") == nulled

    renamed = await broker.ok_cmd("UpdateVariable", name="db_url", new_name="database_url", value="postgres://db")
    assert renamed["id"] == v["id"] and renamed["name"] == "database_url"
    assert (await broker.qry("GetVariableByName", name="db_url"))["error"]["code"] == "not_found"
    assert (await broker.ok_qry("GetVariable", id=v["id"]))["value"] == "postgres://db"
    reused = await broker.cmd("CreateVariable", name="db_url", value=2)  # the old name is free
    assert reused["created"] is True
    clash = await broker.cmd("UpdateVariable", name="db_url", new_name="database_url")
    assert clash["error"]["code"] == "conflict"

    await broker.ok_cmd("DeleteVariable", name="database_url")
    assert (await broker.qry("GetVariable", id=v["id"]))["error"]["code"] == "not_found"
    for gone in (await broker.cmd("DeleteVariable", name="database_url"),
                 await broker.cmd("UpdateVariable", name="database_url", value=1)):
        assert gone["error"] == {"code": "not_found", "message": "Variable 'database_url' not found."}


@pytest.mark.parametrize("value", ["text", 0, -1.5, True, None, [1, "a", None], {"nested": {"list": [1, 2]}}])
async def test_any_json_value_is_stored_and_read_back_as_it_was(broker, value):
    await broker.ok_cmd("CreateVariable", name="v", value=value)
    assert (await broker.ok_qry("GetVariableByName", name="v"))["value"] == value


async def test_variables_are_filtered_counted_and_ordered_by_name(broker):
    made = {}
    for name, tags in [("b_var", ["x", "y"]), ("a_var", ["x"]), ("c-other", [])]:
        made[name] = await broker.ok_cmd("CreateVariable", name=name, value=name, tags=tags)
    assert [v["name"] for v in await broker.ok_qry("ListVariables")] == ["a_var", "b_var", "c-other"]
    assert [v["name"] for v in await broker.ok_qry("ListVariables", variables={"tags": {"all_": ["x", "y"]}})] == [
        "b_var"]
    assert [v["name"] for v in await broker.ok_qry("ListVariables", variables={"name": {"like_": "VAR"}})] == [
        "a_var", "b_var"]  # a part of the name, any case
    assert [v["name"] for v in await broker.ok_qry("ListVariables", variables={"name": {"like_": "_o"}})] == [
        "c-other"]  # `_` is any one character
    by_id = await broker.ok_qry("ListVariables", variables={"id": {"any_": [made["c-other"]["id"]]}})
    assert [v["name"] for v in by_id] == ["c-other"]
    assert [v["name"] for v in await broker.ok_qry("ListVariables", limit=1, offset=1)] == ["b_var"]
    assert await broker.ok_qry("CountVariables") == 3
    assert await broker.ok_qry("CountVariables", variables={"name": {"any_": ["a_var", "zz"], "like_": "a"}}) == 1


# ---------------------------------------------------------------------------------------------
# Global concurrency limits


async def test_a_limit_is_created_read_updated_and_deleted_by_id_or_name(broker):
    first = await broker.cmd("CreateConcurrencyLimit", name="db", limit=3)
    assert first["ok"] and first["created"] is True
    lim = first["result"]
    assert {k: v for k, v in lim.items() if k not in ("id", "created", "updated")} == {
        "name": "db", "limit": 3, "active": True, "active_slots": 0, "denied_slots": 0,
        "slot_decay_per_second": 0.0, "avg_slot_occupancy_seconds": 2.0}
    assert await broker.ok_qry("GetConcurrencyLimit", id=lim["id"]) == lim
    assert await broker.ok_qry("GetConcurrencyLimitByName", name="db") == lim
    taken = await broker.cmd("CreateConcurrencyLimit", name="db", limit=1)
    assert taken["error"] == {"code": "conflict", "message": "A concurrency limit with the name 'db' already exists."}

    by_name = await broker.ok_cmd("UpdateConcurrencyLimit", name="db", limit=5, active=False)
    assert (by_name["limit"], by_name["active"], by_name["slot_decay_per_second"]) == (5, False, 0.0)
    by_id = await broker.ok_cmd("UpdateConcurrencyLimit", id=lim["id"], slot_decay_per_second=0.5, new_name="db-2")
    assert (by_id["name"], by_id["limit"], by_id["active"], by_id["slot_decay_per_second"]) == ("db-2", 5, False, 0.5)
    assert await broker.ok_qry("GetConcurrencyLimitByName", name="db-2") == by_id
    assert (await broker.qry("GetConcurrencyLimitByName", name="db"))["error"]["code"] == "not_found"

    other = await broker.ok_cmd("CreateConcurrencyLimit", name="db", limit=1)  # the old name is free
    assert (await broker.cmd("UpdateConcurrencyLimit", id=other["id"], new_name="db-2"))["error"]["code"] == "conflict"
    assert [x["name"] for x in await broker.ok_qry("ListConcurrencyLimits")] == ["db", "db-2"]
    assert await broker.ok_qry("CountConcurrencyLimits") == 2
    assert [x["name"] for x in await broker.ok_qry("ListConcurrencyLimits", limit=1, offset=1)] == ["db-2"]

    await broker.ok_cmd("DeleteConcurrencyLimit", id=lim["id"])
    await broker.ok_cmd("DeleteConcurrencyLimit", name="db")
    assert await broker.ok_qry("CountConcurrencyLimits") == 0
    missing = await broker.cmd("DeleteConcurrencyLimit", name="db")
    assert missing["error"] == {"code": "not_found", "message": "Concurrency limit 'db' not found."}
    assert (await broker.cmd("UpdateConcurrencyLimit", id=lim["id"], limit=1))["error"]["code"] == "not_found"
    assert (await broker.ok_cmd("CreateConcurrencyLimit", name="db-2", limit=1))["id"] != lim["id"]


# ---------------------------------------------------------------------------------------------
# Both: bad input, races, replay


@pytest.mark.parametrize("name, body, field", [
    ("CreateVariable", {"value": 1}, "name"),
    ("CreateVariable", {"name": "v"}, "value"),
    ("CreateVariable", {"name": "Bad Name", "value": 1}, "name"),
    ("CreateVariable", {"name": "v", "value": "x" * 5000}, "value"),
    ("CreateVariable", {"name": "v", "value": {"k": "\u0000"}}, "value"),
    ("CreateVariable", {"name": "v", "value": 1, "tags": "prod"}, "tags"),
    ("CreateVariable", {"name": "v", "value": 1, "colour": "red"}, "colour"),
    ("UpdateVariable", {"name": "v", "new_name": "UPPER"}, "new_name"),
    ("DeleteVariable", {}, "name"),
    ("CreateConcurrencyLimit", {"name": "db"}, "limit"),
    ("CreateConcurrencyLimit", {"name": "db", "limit": -1}, "limit"),
    ("CreateConcurrencyLimit", {"name": "db", "limit": "3"}, "limit"),
    ("CreateConcurrencyLimit", {"name": "a/b", "limit": 1}, "name"),
    ("CreateConcurrencyLimit", {"name": "db", "limit": 1, "slot_decay_per_second": -1}, "slot_decay_per_second"),
    ("CreateConcurrencyLimit", {"name": "db", "limit": 1, "active_slots": -1}, "active_slots"),
    ("UpdateConcurrencyLimit", {"limit": 1}, None),
    ("UpdateConcurrencyLimit", {"name": "db", "id": str(uuid.UUID(int=1))}, None),
    ("DeleteConcurrencyLimit", {"id": "not-a-uuid"}, "id"),
])
async def test_bad_input_is_invalid_and_appends_nothing(broker, name, body, field):
    await broker.ok_cmd("CreateVariable", name="v", value=1)
    await broker.ok_cmd("CreateConcurrencyLimit", name="db", limit=1)
    before = await broker.stream_messages()
    reply = await broker.raw(broker.settings.command_subject(name), json.dumps(body).encode())
    assert reply["ok"] is False and reply["error"]["code"] == "invalid", reply
    assert reply["error"].get("field") == field
    assert await broker.stream_messages() == before


@pytest.mark.parametrize("command, body, count, flt", [
    ("CreateVariable", {"name": "contested", "value": 1}, "CountVariables", {"variables": {"name": {"any_": ["contested"]}}}),
    ("CreateConcurrencyLimit", {"name": "contested", "limit": 1}, "CountConcurrencyLimits", {}),
])
async def test_thirty_racing_creates_of_one_name_on_two_instances_make_one(broker, settings, service,
                                                                           command, body, count, flt):
    other = Service(settings, roles=frozenset({"commands"}))
    await other.start()
    nc = await connect(settings)
    try:
        replies = await asyncio.gather(*(
            nc.request(settings.command_subject(command), json.dumps(body).encode(), timeout=20) for _ in range(30)))
    finally:
        await nc.close()
        await other.stop()
    bodies = [json.loads(r.data) for r in replies]
    made = [b for b in bodies if b["ok"]]
    assert len(made) == 1 and made[0]["created"] is True
    assert all(b["error"]["code"] == "conflict" for b in bodies if not b["ok"])
    broker.last_seq = made[0]["seq"]
    assert await broker.ok_qry(count, **flt) == 1


async def test_replay_of_variables_and_limits_equals_live(broker, service, settings):
    for i in range(4):
        await broker.ok_cmd("CreateVariable", name=f"v{i}", value={"i": i} if i % 2 else None, tags=[f"t{i % 2}"])
        await broker.ok_cmd("CreateConcurrencyLimit", name=f"l{i}", limit=i, slot_decay_per_second=i / 4)
    await broker.ok_cmd("UpdateVariable", name="v1", new_name="v1b", value=[1, 2])
    await broker.ok_cmd("UpdateConcurrencyLimit", name="l1", limit=9, active=False)
    await broker.ok_cmd("DeleteVariable", name="v2")
    await broker.ok_cmd("DeleteConcurrencyLimit", name="l2")
    await broker.ok_qry("CountVariables")  # the read models have caught up with the last command
    await broker.ok_qry("CountConcurrencyLimits")
    assert await assert_live_equals_rebuild(service, settings) >= 6


# ---------------------------------------------------------------------------------------------
# The client against the real service


async def test_each_client_method_against_the_service(service, settings):
    async with RunledgerClient(settings) as rl:
        v = await rl.create_variable("db_url", {"host": "db"}, tags=["prod"], idempotency_key="k-var")
        assert isinstance(v, Variable) and v.value == {"host": "db"}
        with pytest.raises(Conflict):
            await rl.create_variable("db_url", 1)
        assert await rl.read_variable(v.id) == await rl.read_variable_by_name("db_url") == v
        after = await rl.update_variable("db_url", value="postgres://db")
        assert after.value == "postgres://db" and after.tags == ["prod"]
        assert await rl.list_variables(like="DB", tags=["prod"]) == [after]
        assert await rl.count_variables(names=["db_url", "nope"]) == 1
        raw = (await rl.query("GetVariable", {"id": str(v.id)})).result
        assert after.model_dump(mode="json") == raw  # what --json prints is the service's JSON
        await rl.delete_variable("db_url")
        with pytest.raises(NotFound):
            await rl.read_variable_by_name("db_url")

        lim = await rl.create_concurrency_limit("db", 2, slot_decay_per_second=0.5)
        assert isinstance(lim, ConcurrencyLimit) and (lim.limit, lim.active, lim.slot_decay_per_second) == (2, True, 0.5)
        assert await rl.read_concurrency_limit(lim.id) == await rl.read_concurrency_limit_by_name("db") == lim
        by_name = await rl.update_concurrency_limit("db", limit=4)
        by_id = await rl.update_concurrency_limit(lim.id, active=False)
        assert (by_name.limit, by_id.limit, by_id.active) == (4, 4, False)
        assert await rl.list_concurrency_limits() == [by_id]
        assert (await rl.query("GetConcurrencyLimitByName", {"name": "db"})).result == by_id.model_dump(mode="json")
        await rl.delete_concurrency_limit(lim.id)
        assert await rl.count_concurrency_limits() == 0
