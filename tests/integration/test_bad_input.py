"""Malformed and invalid payloads through the broker (DESIGN: "a malformed or invalid command
gets `invalid` with the field and reason, and appends nothing"; BEHAVIOUR C-1, C-2, C-3, C-5,
WP-5, WP-6, WP-8, WQ-5, PR-1).

Every case gets the expected error code naming the expected field, and the event stream holds
exactly as many messages afterwards as before."""

from __future__ import annotations

import json
from typing import Any

from runledger.infra.nats_connection import connect

BAD_UUID = "not-a-uuid"
LONG_NAME = "n" * 256
LONG_DESCRIPTION = "d" * 10_001
NO_FIELD = None


def C(name: str, body: Any, code: str, field: str | None, says: str = "") -> tuple:
    """A command case; `body` is bytes as sent, or a JSON value."""
    return ("cmd", name, body, code, field, says)


def Q(name: str, body: Any, code: str, field: str | None, says: str = "") -> tuple:
    return ("qry", name, body, code, field, says)


POOL = {"name": "fresh", "type": "process"}
QUEUE = {"work_pool_name": "p", "name": "fresh"}
QUEUE_UPDATE = {"work_pool_name": "p", "work_queue_name": "q"}

CASES = [
    # not a JSON object at all
    C("CreateWorkPool", b"not json", "invalid", NO_FIELD, "not valid JSON"),
    C("CreateWorkPool", b'{"name": "x",', "invalid", NO_FIELD, "not valid JSON"),
    C("CreateWorkPool", b"\xff\xfe\x00garbage", "invalid", NO_FIELD, "not valid JSON"),
    C("CreateWorkPool", b'[{"name": "x"}]', "invalid", NO_FIELD, "a JSON object"),
    C("CreateWorkPool", b"null", "invalid", NO_FIELD, "a JSON object"),
    C("CreateWorkPool", b'"x"', "invalid", NO_FIELD, "a JSON object"),
    C("CreateWorkPool", b"42", "invalid", NO_FIELD, "a JSON object"),
    C("DropAllWorkPools", {}, "invalid", NO_FIELD, "unknown command"),
    # missing required fields
    C("CreateWorkPool", {}, "invalid", "name", "Field required"),
    C("CreateWorkPool", b"", "invalid", "name", "Field required"),
    C("DeleteWorkPool", {}, "invalid", "name", "Field required"),
    C("CreateWorkQueue", {"name": "x"}, "invalid", "work_pool_name", "Field required"),
    C("UpdateWorkQueue", {"work_pool_name": "p", "description": "x"}, "invalid", "work_queue_name", "Field required"),
    C("SetWorkQueuePriorities", {"work_pool_name": "p"}, "invalid", "priorities", "Field required"),
    C("DeleteWorkQueueById", {}, "invalid", "id", "Field required"),
    # wrong types (strict: "1" is not an int, "yes" is not a bool, 1 is not a bool)
    C("CreateWorkPool", {"name": 5}, "invalid", "name"),
    C("CreateWorkPool", {**POOL, "concurrency_limit": "1"}, "invalid", "concurrency_limit"),
    C("CreateWorkPool", {**POOL, "concurrency_limit": 1.5}, "invalid", "concurrency_limit"),
    C("CreateWorkPool", {**POOL, "is_paused": "yes"}, "invalid", "is_paused"),
    C("CreateWorkPool", {**POOL, "type": None}, "invalid", "type"),
    C("UpdateWorkPool", {"name": "p", "is_paused": 1}, "invalid", "is_paused"),
    C("CreateWorkQueue", {**QUEUE, "priority": "1"}, "invalid", "priority"),
    C("CreateWorkQueue", {**QUEUE, "description": 7}, "invalid", "description"),
    C("UpdateWorkQueue", {**QUEUE_UPDATE, "last_polled": "yesterday"}, "invalid", "last_polled"),
    C("UpdateWorkQueue", {**QUEUE_UPDATE, "is_paused": "false"}, "invalid", "is_paused"),
    C("SetWorkQueuePriorities", {"work_pool_name": "p", "priorities": [1, 2]}, "invalid", "priorities"),
    C("CreateWorkPool", {**POOL, "idempotency_key": 5}, "invalid", "idempotency_key"),
    # C-3: unknown fields, including fields that exist but cannot be set this way
    C("CreateWorkPool", {**POOL, "bogus": 1}, "invalid", "bogus", "Extra inputs are not permitted"),
    C("CreateWorkPool", {**POOL, "status": "READY"}, "invalid", "status", "Extra inputs are not permitted"),
    C("UpdateWorkPool", {"name": "p", "type": "docker"}, "invalid", "type", "Extra inputs are not permitted"),
    C("UpdateWorkPool", {"name": "p", "new_name": "p2"}, "invalid", "new_name"),
    C("CreateWorkQueue", {**QUEUE, "filter": None}, "invalid", "filter"),
    C("UpdateWorkQueue", {**QUEUE_UPDATE, "work_pool_id": "x"}, "invalid", "work_pool_id"),
    C("CreateLegacyWorkQueue", {"name": "x", "work_pool_name": "p"}, "invalid", "work_pool_name"),
    C("UpdateWorkQueueById", {"id": "00000000-0000-0000-0000-000000000001", "status": "READY"}, "invalid", "status"),
    # C-5 / WP-8 / WQ-5: negative and zero limits and priorities
    C("CreateWorkPool", {**POOL, "concurrency_limit": -1}, "invalid", "concurrency_limit", "greater than or equal to 0"),
    C("UpdateWorkPool", {"name": "p", "concurrency_limit": -5}, "invalid", "concurrency_limit"),
    C("CreateWorkQueue", {**QUEUE, "concurrency_limit": -5}, "invalid", "concurrency_limit"),
    C("UpdateWorkQueue", {**QUEUE_UPDATE, "concurrency_limit": -5}, "invalid", "concurrency_limit"),
    C("CreateWorkQueue", {**QUEUE, "priority": 0}, "invalid", "priority", "greater than 0"),
    C("CreateWorkQueue", {**QUEUE, "priority": -3}, "invalid", "priority"),
    C("CreateWorkQueue", {**QUEUE, "priority": 2**31}, "invalid", "priority"),
    C("UpdateWorkQueue", {**QUEUE_UPDATE, "priority": 0}, "invalid", "priority"),
    C("UpdateWorkQueueById", {"id": "00000000-0000-0000-0000-000000000001", "priority": -1}, "invalid", "priority"),
    C("CreateLegacyWorkQueue", {"name": "x", "priority": 0}, "invalid", "priority"),
    C("SetWorkQueuePriorities", {"work_pool_name": "p", "priorities": {"q": 0}}, "invalid", "priorities.q"),
    # PR-1 step 1
    C("SetWorkQueuePriorities", {"work_pool_name": "p", "priorities": {"default": 1, "q": 1}}, "invalid",
      "priorities", "Duplicate target priorities provided"),
    # C-1: banned characters, in every name field
    C("CreateWorkPool", {**POOL, "name": "a/b"}, "invalid", "name", "must not contain"),
    C("CreateWorkPool", {**POOL, "name": "100%"}, "invalid", "name", "must not contain"),
    C("CreateWorkPool", {**POOL, "name": "a&b"}, "invalid", "name", "must not contain"),
    C("CreateWorkPool", {**POOL, "name": "a>b"}, "invalid", "name", "must not contain"),
    C("CreateWorkPool", {**POOL, "name": "<b"}, "invalid", "name", "must not contain"),
    C("CreateWorkQueue", {**QUEUE, "name": "q/1"}, "invalid", "name", "must not contain"),
    C("CreateWorkQueue", {**QUEUE, "work_pool_name": "p&q"}, "invalid", "work_pool_name", "must not contain"),
    C("UpdateWorkQueue", {**QUEUE_UPDATE, "name": "x>y"}, "invalid", "name", "must not contain"),
    C("CreateLegacyWorkQueue", {"name": "x<y"}, "invalid", "name", "must not contain"),
    C("UpdateWorkQueueById", {"id": "00000000-0000-0000-0000-000000000001", "name": "%"}, "invalid", "name"),
    C("SetWorkQueuePriorities", {"work_pool_name": "p", "priorities": {"a/b": 1}}, "invalid", "priorities.a/b.[key]"),
    # C-1: emptyish pool names; empty queue names
    C("CreateWorkPool", {**POOL, "name": ""}, "invalid", "name", "name cannot be an empty string"),
    C("CreateWorkPool", {**POOL, "name": " "}, "invalid", "name", "name cannot be an empty string"),
    C("CreateWorkPool", {**POOL, "name": "''"}, "invalid", "name", "name cannot be an empty string"),
    C("CreateWorkPool", {**POOL, "name": "' ' "}, "invalid", "name", "name cannot be an empty string"),
    C("CreateWorkPool", {**POOL, "name": '" "'}, "invalid", "name", "name cannot be an empty string"),
    C("UpdateWorkPool", {"name": "  ", "description": "x"}, "invalid", "name", "name cannot be an empty string"),
    C("CreateWorkQueue", {**QUEUE, "work_pool_name": "''"}, "invalid", "work_pool_name", "name cannot be an empty string"),
    C("CreateWorkQueue", {**QUEUE, "name": ""}, "invalid", "name"),
    C("CreateLegacyWorkQueue", {"name": ""}, "invalid", "name"),
    # lengths
    C("CreateWorkPool", {**POOL, "name": LONG_NAME}, "invalid", "name", "at most 255"),
    C("CreateWorkQueue", {**QUEUE, "name": LONG_NAME}, "invalid", "name", "at most 255"),
    C("CreateWorkPool", {**POOL, "description": LONG_DESCRIPTION}, "invalid", "description", "at most 10000"),
    C("UpdateWorkPool", {"name": "p", "description": LONG_DESCRIPTION}, "invalid", "description"),
    C("UpdateWorkQueue", {**QUEUE_UPDATE, "description": LONG_DESCRIPTION}, "invalid", "description"),
    # bad UUIDs
    C("UpdateWorkQueueById", {"id": BAD_UUID, "description": "x"}, "invalid", "id"),
    C("DeleteWorkQueueById", {"id": 12}, "invalid", "id"),
    C("DeleteWorkQueueById", {"id": ""}, "invalid", "id"),
    C("CreateWorkPool", {**POOL, "storage_configuration": {"default_result_storage_block_id": BAD_UUID}},
      "invalid", "storage_configuration.default_result_storage_block_id"),
    # storage_configuration: unknown keys and wrong shapes
    C("CreateWorkPool", {**POOL, "storage_configuration": {"bucket": "s3://x"}}, "invalid", "storage_configuration.bucket"),
    C("UpdateWorkPool", {"name": "p", "storage_configuration": {"bundle_upload_step": "step"}}, "invalid",
      "storage_configuration.bundle_upload_step"),
    # WP-6: base_job_template
    C("CreateWorkPool", {**POOL, "base_job_template": []}, "invalid", "base_job_template"),
    C("CreateWorkPool", {**POOL, "base_job_template": {"job_configuration": {"a": 1}}}, "invalid",
      "base_job_template", "`variables`"),
    C("CreateWorkPool", {**POOL, "base_job_template": {"job_configuration": {"image": "{{ image }}"},
                                                        "variables": {"properties": {"cmd": {}}}}},
      "invalid", "base_job_template", "image"),
    C("UpdateWorkPool", {"name": "p", "base_job_template": {"variables": {"properties": {}}}}, "invalid",
      "base_job_template"),
    C("UpdateWorkPool", {"name": "p", "base_job_template": {"job_configuration": [1], "variables": {"a": 1}}},
      "invalid", "base_job_template"),
    # WP-5: reserved names
    C("CreateWorkPool", {**POOL, "name": "Prefect Pool"}, "forbidden", NO_FIELD, "reserved"),
    C("DeleteWorkPool", {"name": "prefect-managed"}, "forbidden", NO_FIELD, "reserved"),
    C("UpdateWorkPool", {"name": "PREFECT", "description": "x"}, "forbidden", NO_FIELD, "reserved"),
    # queries: C-2 limits and offsets, filters, ids
    Q("ListWorkPools", {"limit": 201}, "invalid", "limit", "less than or equal to 200"),
    Q("ListWorkPools", {"limit": -1}, "invalid", "limit", "greater than or equal to 0"),
    Q("ListWorkPools", {"offset": -1}, "invalid", "offset", "greater than or equal to 0"),
    Q("ListWorkPools", {"limit": "10"}, "invalid", "limit"),
    Q("ListWorkQueues", {"work_pool_name": "p", "limit": 500}, "invalid", "limit", "less than or equal to 200"),
    Q("ListWorkQueues", {"work_pool_name": "p", "offset": -2}, "invalid", "offset"),
    Q("ListAllWorkQueues", {"limit": 1000}, "invalid", "limit", "less than or equal to 200"),
    Q("ListAllWorkQueues", {"offset": -5}, "invalid", "offset"),
    Q("ListWorkPools", {"work_pools": {"id": {"any_": [BAD_UUID]}}}, "invalid", "work_pools.id.any_.0"),
    Q("ListWorkPools", {"work_pools": {"status": {"any_": ["READY"]}}}, "invalid", "work_pools.status"),
    Q("CountWorkPools", {"work_pools": {"name": {"all_": ["x"]}}}, "invalid", "work_pools.name.all_"),
    Q("ListAllWorkQueues", {"work_queues": {"name": {"any_": "x"}}}, "invalid", "work_queues.name.any_"),
    Q("GetWorkQueueById", {"id": BAD_UUID}, "invalid", "id"),
    Q("GetWorkPool", {"name": "a/b"}, "invalid", "name", "must not contain"),
    Q("GetWorkPool", {}, "invalid", "name", "Field required"),
    Q("GetWorkQueue", {"work_pool_name": "p"}, "invalid", "work_queue_name"),
    Q("ListWorkPools", {"min_seq": -1}, "invalid", "min_seq"),
    Q("ListWorkPools", b"[]", "invalid", NO_FIELD, "a JSON object"),
    Q("CountWorkPools", b"{oops", "invalid", NO_FIELD, "not valid JSON"),
    Q("ListWorkPools", {"bogus": 1}, "invalid", "bogus"),
    Q("NoSuchQuery", {}, "invalid", NO_FIELD, "unknown query"),
]


async def test_malformed_payloads_are_invalid_and_append_nothing(broker, settings):
    # Every case would otherwise act on existing objects: pool "p" with queues default and q.
    await broker.ok_cmd("CreateWorkPool", name="p", type="process", description="kept")
    await broker.ok_cmd("CreateWorkQueue", work_pool_name="p", name="q")
    await broker.ok_qry("CountWorkPools")
    nc = await connect(settings)
    js = nc.jetstream()

    async def messages() -> int:
        return (await js.stream_info(settings.stream_name)).state.messages

    try:
        start = await messages()
        assert start == 3  # name claim, pool created, queue created
        assert len(CASES) >= 30
        bodies = set()
        failures = []
        for kind, name, body, code, field, says in CASES:
            raw = body if isinstance(body, bytes) else json.dumps(body).encode()
            bodies.add((name, raw))
            subject = settings.command_subject(name) if kind == "cmd" else settings.query_subject(name)
            reply = json.loads((await nc.request(subject, raw, timeout=10)).data)
            got = (reply.get("ok"), reply.get("error", {}).get("code"), reply.get("error", {}).get("field"))
            problems = []
            if got != (False, code, field):
                problems.append(f"got ok/code/field {got}, want {(False, code, field)}")
            elif says and says not in reply["error"]["message"]:
                problems.append(f"message {reply['error']['message']!r} lacks {says!r}")
            if await messages() != start:
                problems.append(f"stream grew to {await messages()} messages")
                start = await messages()
            if problems:
                failures.append(f"{name} {raw[:80]!r}: {'; '.join(problems)}")
        assert len(bodies) == len(CASES)  # every case is distinct
        assert failures == [], "\n".join(failures)
        # nothing changed in the read model either
        pool = await broker.ok_qry("GetWorkPool", name="p")
        assert (pool["description"], pool["concurrency_limit"], pool["base_job_template"], pool["is_paused"]) == (
            "kept", None, {}, False)
        queues = await broker.ok_qry("ListWorkQueues", work_pool_name="p")
        assert [(q["name"], q["priority"], q["concurrency_limit"], q["description"]) for q in queues] == [
            ("default", 1, None, "The work pool's default queue."), ("q", 2, None, "")]
        assert await broker.ok_qry("CountWorkPools") == 1
        # the same service still takes a good command, and only that one appends
        await broker.ok_cmd("CreateWorkPool", **POOL)
        assert await messages() == start + 2
    finally:
        await nc.close()


async def test_validation_error_details(broker):
    """An invalid reply names the field in `message` and lists every problem in `details`."""
    reply = await broker.cmd("CreateWorkQueue", work_pool_name="p/x", name="", priority=0, bogus=True)
    assert reply["ok"] is False and reply["error"]["code"] == "invalid"
    details = {d["field"]: d["type"] for d in reply["error"]["details"]}
    assert details == {"work_pool_name": "value_error", "name": "value_error", "priority": "greater_than",
                       "bogus": "extra_forbidden"}
    assert reply["error"]["message"].startswith(f"{reply['error']['field']}: ")


async def test_a_nested_non_object_names_its_field(broker):
    reply = await broker.cmd("UpdateWorkPool", name="p", storage_configuration=[])
    assert (reply["ok"], reply["error"]["code"], reply["error"].get("field")) == (False, "invalid", "storage_configuration")
    reply = await broker.cmd("CreateWorkPool", name="p", storage_configuration=None)
    assert (reply["ok"], reply["error"]["code"], reply["error"].get("field")) == (False, "invalid", "storage_configuration")
    reply = await broker.qry("ListWorkPools", work_pools=[])
    assert (reply["ok"], reply["error"]["code"], reply["error"].get("field")) == (False, "invalid", "work_pools")
