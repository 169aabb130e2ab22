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
INT32_MAX = 2**31 - 1
NUL = "\x00"
TEMPLATE = {"job_configuration": {"command": "{{ command }}"}, "variables": {"properties": {"command": {}}}}
OVERFLOWING_TIMES = ["0001-01-01T00:00:00+14:00", "9999-12-31T23:59:59-14:00"]


def deep(levels: int) -> dict:
    doc: dict = {}
    for _ in range(levels - 1):
        doc = {"a": doc}
    return doc


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
    # What the read model cannot store is invalid at the edge (commands/bounds.py): NUL in any
    # stored text, control characters in names, JSON documents, int32 columns, datetimes.
    C("CreateWorkPool", {**POOL, "name": f"a{NUL}b"}, "invalid", "name", "NUL character (U+0000)"),
    C("CreateWorkPool", {**POOL, "name": "tab\there"}, "invalid", "name", "U+0009"),
    C("CreateWorkPool", {**POOL, "name": "del\x7f"}, "invalid", "name", "U+007F"),
    C("CreateWorkPool", {**POOL, "name": "c1\x85"}, "invalid", "name", "U+0085"),
    C("CreateWorkPool", {**POOL, "description": f"x{NUL}"}, "invalid", "description", "NUL"),
    C("CreateWorkPool", {**POOL, "type": NUL}, "invalid", "type", "NUL"),
    C("CreateWorkPool", {**POOL, "base_job_template": {**TEMPLATE, "job_configuration": {"env": {"A": NUL}}}},
      "invalid", "base_job_template", "job_configuration.env.A"),
    C("CreateWorkPool", {**POOL, "base_job_template": {**TEMPLATE, f"k{NUL}": 1}}, "invalid", "base_job_template", "NUL"),
    C("CreateWorkPool", {**POOL, "base_job_template": {**TEMPLATE, "deep": deep(64)}}, "invalid", "base_job_template",
      "deeper than 64"),
    C("CreateWorkPool", b'{"name": "fresh", "base_job_template": {"job_configuration": {"x": NaN}, "variables": {}}}',
      "invalid", "base_job_template", "finite"),
    C("CreateWorkPool", {**POOL, "storage_configuration": {"bundle_upload_step": {"step": [NUL]}}}, "invalid",
      "storage_configuration.bundle_upload_step", "NUL"),
    C("UpdateWorkPool", {"name": "p", "storage_configuration": {"bundle_execution_step": {NUL: {}}}}, "invalid",
      "storage_configuration.bundle_execution_step", "NUL"),
    C("UpdateWorkPool", {"name": "p", "description": NUL}, "invalid", "description", "NUL"),
    C("UpdateWorkPool", {"name": "p", "base_job_template": {NUL: 1}}, "invalid", "base_job_template", "NUL"),
    C("CreateWorkQueue", {**QUEUE, "name": NUL}, "invalid", "name", "NUL"),
    C("CreateWorkQueue", {**QUEUE, "work_pool_name": f"p{NUL}"}, "invalid", "work_pool_name", "NUL"),
    C("CreateWorkQueue", {**QUEUE, "description": NUL}, "invalid", "description", "NUL"),
    C("UpdateWorkQueue", {**QUEUE_UPDATE, "name": f"q{NUL}"}, "invalid", "name", "NUL"),
    C("UpdateWorkQueue", {**QUEUE_UPDATE, "description": NUL}, "invalid", "description", "NUL"),
    C("CreateLegacyWorkQueue", {"name": NUL}, "invalid", "name", "NUL"),
    C("UpdateWorkQueueById", {"id": "00000000-0000-0000-0000-000000000001", "name": "\n"}, "invalid", "name"),
    C("SetWorkQueuePriorities", {"work_pool_name": "p", "priorities": {NUL: 1}}, "invalid", f"priorities.{NUL}.[key]"),
    C("CreateWorkPool", {**POOL, "idempotency_key": NUL}, "invalid", "idempotency_key", "NUL"),
    C("CreateWorkPool", {**POOL, "concurrency_limit": 2**31}, "invalid", "concurrency_limit", "2147483647"),
    C("UpdateWorkPool", {"name": "p", "concurrency_limit": 2**31}, "invalid", "concurrency_limit"),
    C("CreateWorkQueue", {**QUEUE, "concurrency_limit": 2**31}, "invalid", "concurrency_limit"),
    C("UpdateWorkQueue", {**QUEUE_UPDATE, "concurrency_limit": 2**63}, "invalid", "concurrency_limit"),
    C("UpdateWorkQueue", {**QUEUE_UPDATE, "priority": 2**31}, "invalid", "priority"),
    *[C("UpdateWorkQueue", {**QUEUE_UPDATE, "last_polled": t}, "invalid", "last_polled", "converted to UTC")
      for t in OVERFLOWING_TIMES],
    C("UpdateWorkQueueById", {"id": "00000000-0000-0000-0000-000000000001", "last_polled": OVERFLOWING_TIMES[0]},
      "invalid", "last_polled", "converted to UTC"),
    # queries: the client's mistakes are invalid, never unavailable
    Q("ListWorkPools", {"offset": 2**63}, "invalid", "offset"),
    Q("ListWorkQueues", {"work_pool_name": "p", "offset": 2**63}, "invalid", "offset"),
    Q("ListAllWorkQueues", {"offset": 2**64}, "invalid", "offset"),
    Q("CountWorkPools", {"min_seq": 2**63}, "invalid", "min_seq"),
    Q("ListWorkPools", {"work_pools": {"name": {"any_": ["p", NUL]}}}, "invalid", "work_pools.name.any_", "value 1"),
    Q("CountWorkPools", {"work_pools": {"type": {"any_": [NUL]}}}, "invalid", "work_pools.type.any_", "NUL"),
    Q("ListAllWorkQueues", {"work_queues": {"name": {"any_": [NUL]}}}, "invalid", "work_queues.name.any_"),
    Q("ListWorkPools", {"work_pools": {"name": {"any_": ["p"] * 32_768}}}, "invalid", "work_pools.name.any_",
      "at most 10000"),
    Q("CountWorkQueues", {"work_pool_name": "p", "work_queues": {"id": {"any_": [
        "00000000-0000-0000-0000-000000000001"] * 10_001}}}, "invalid", "work_queues.id.any_"),
    Q("GetWorkPool", {"name": NUL}, "invalid", "name", "NUL"),
    Q("GetWorkQueue", {"work_pool_name": "p", "work_queue_name": NUL}, "invalid", "work_queue_name", "NUL"),
    Q("GetLegacyWorkQueue", {"name": f"q{NUL}"}, "invalid", "name", "NUL"),
    Q("GetDeploymentByName", {"flow_name": "f", "deployment_name": f"a{NUL}b"}, "invalid", "deployment_name", "NUL"),
    # A lone surrogate sent as a JSON escape: JSON's parser refuses it, and the reply says what
    # and where, as for any other unstorable text (not "unexpected end of hex escape").
    C("CreateTaskRun", b'{"task_key": "ab\\ud800", "dynamic_key": "0"}', "invalid", "task_key",
      "must not contain a lone surrogate (U+D800)"),
    C("CreateTaskRun", b'{"task_key": "k", "dynamic_key": "\\udfff"}', "invalid", "dynamic_key",
      "must not contain a lone surrogate (U+DFFF)"),
    C("CreateTaskRun", b'{"task_key": "k", "dynamic_key": "0", "labels": {"a": ["x\\ud800\\u0041"]}}', "invalid",
      "labels.a.0", "lone surrogate (U+D800)"),
    C("CreateFlow", b'{"name": "f", "labels": {"\\ud83d": 1}}', "invalid", "labels.[key]", "lone surrogate (U+D83D)"),
    Q("GetWorkPool", b'{"name": "\\ud800"}', "invalid", "name", "lone surrogate"),
    # A string's length is counted in characters, not items.
    C("CreateFlow", {"name": "f", "tags": ["t" * 5_000]}, "invalid", "tags.0", "at most 255 characters"),
    C("CreateTaskRun", {"task_key": "k", "dynamic_key": "d" * 2_001}, "invalid", "dynamic_key",
      "at most 2000 characters"),
    C("CreateTaskRun", {"task_key": "", "dynamic_key": "0"}, "invalid", "task_key", "at least 1 character"),
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
        # and the read model applies it: it reached the latest sequence (min_seq)
        assert (await broker.ok_qry("GetWorkPool", name=POOL["name"]))["type"] == "process"
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


async def _invalid_appends_nothing(broker, _name: str, _field: str | None, _says: str, /, **body: Any) -> dict:
    before = await broker.stream_messages()
    reply = await broker.cmd(_name, **body)
    assert (reply["ok"], reply.get("error", {}).get("code"), reply.get("error", {}).get("field")) == (
        False, "invalid", _field), str(reply)[:500]
    assert _says in reply["error"]["message"], reply["error"]["message"]
    assert await broker.stream_messages() == before
    return reply


async def test_priorities_the_rules_would_push_past_int32_are_invalid(broker):
    """PR-1 moves other queues down by +1: a command that would move any past 2^31-1 (the
    `integer` column) is invalid, appends nothing, and the read model keeps projecting."""
    await broker.ok_cmd("CreateWorkPool", name="p", type="process")
    top = await broker.ok_cmd("CreateWorkQueue", work_pool_name="p", name="q", priority=INT32_MAX)
    assert top["priority"] == INT32_MAX  # PR-3: past every other priority, nothing moves
    says = f"work queue 'q' to priority {INT32_MAX + 1}"
    await _invalid_appends_nothing(broker, "UpdateWorkQueue", "priority", says,
                                   work_pool_name="p", work_queue_name="default", priority=INT32_MAX)
    await _invalid_appends_nothing(broker, "CreateWorkQueue", "priority", says,
                                   work_pool_name="p", name="r", priority=INT32_MAX)
    await _invalid_appends_nothing(broker, "SetWorkQueuePriorities", "priorities", says,
                                   work_pool_name="p", priorities={"default": INT32_MAX})
    # WQ-11: the legacy update stores a priority as given, so two queues may share the top one;
    # deleting a third would then push one of them past it (PR-4)
    default = await broker.ok_qry("GetWorkQueue", work_pool_name="p", work_queue_name="default")
    await broker.ok_cmd("UpdateWorkQueueById", id=default["id"], priority=INT32_MAX)
    await broker.ok_cmd("CreateWorkQueue", work_pool_name="p", name="z")
    await _invalid_appends_nothing(broker, "DeleteWorkQueue", None, str(INT32_MAX + 1), work_pool_name="p",
                                   work_queue_name="z")
    await broker.ok_cmd("UpdateWorkQueue", work_pool_name="p", work_queue_name="z", description="after")
    queues = await broker.ok_qry("ListWorkQueues", work_pool_name="p")  # min_seq: the latest command
    assert [(q["name"], q["priority"], q["description"]) for q in queues] == [
        ("z", 1, "after"), ("default", INT32_MAX, "The work pool's default queue."), ("q", INT32_MAX, "")]


def _template_of(size: int) -> dict:
    return {"job_configuration": {"command": "{{ command }}", "blob": "x" * size}, "variables": {"properties": {"command": {}}}}


async def test_commands_whose_messages_exceed_the_max_payload_are_invalid_before_sending(broker, settings):
    """The server counts headers in its max payload and closes a connection that exceeds it
    (nats-py checks only the body): every message of an append, headers included, is checked
    before the first is sent, and a command over the limit is invalid, naming what and the limit."""
    from runledger.commands import work_pools as wp
    from runledger.commands.events import encode_event
    from runledger.commands.messages import DecisionContext

    limit = broker.nc.max_payload
    # 1. A pool create (an atomic batch: the name claim, then the pool) whose pool event is
    #    under the limit by its body but over it with the batch's headers.
    ctx = DecisionContext()
    probe = wp.decide_create_work_pool(wp.CreateWorkPool(name="big", type="process", base_job_template=_template_of(0)),
                                       wp.WorkPoolNameClaim(), ctx)
    overhead = len(encode_event(probe.events[1].aggregate_id, probe.events[1].event, occurred=ctx.now,
                                event_id=ctx.new_id()).data)
    size = limit - 100 - overhead  # the body 100 bytes under the limit; the headers are ~250
    reply = await _invalid_appends_nothing(broker, "CreateWorkPool", "base_job_template", f"{limit:,} bytes",
                                           name="big", type="process", base_job_template=_template_of(size))
    assert "WorkPoolCreated" in reply["error"]["message"] and "max payload" in reply["error"]["message"]
    # 2. An update whose event holds the template three times (snapshot, old, new): invalid, not
    #    `unavailable` (which a client would retry for ever).
    await broker.ok_cmd("CreateWorkPool", name="big", type="process", base_job_template=_template_of(limit // 3))
    reply = await _invalid_appends_nothing(broker, "UpdateWorkPool", "base_job_template", "WorkPoolUpdated",
                                           name="big", base_job_template=_template_of(limit // 3 + 1))
    # 3. With an idempotency key (a batch of record, claim, pool) as well.
    await _invalid_appends_nothing(broker, "CreateWorkPool", "base_job_template", "max payload", name="big2",
                                   type="process", base_job_template=_template_of(size), idempotency_key="k-big")
    # The connection lived, no batch was left open, and the read model still projects.
    for i in range(3):
        await broker.ok_cmd("CreateWorkPool", name=f"after-{i}", type="process", idempotency_key=f"k-{i}")
    await broker.ok_cmd("UpdateWorkPool", name="big", description="small change")
    pool = await broker.ok_qry("GetWorkPool", name="big")  # min_seq: the latest command
    assert pool["description"] == "small change" and len(pool["base_job_template"]["job_configuration"]["blob"]) == limit // 3
    assert await broker.ok_qry("CountWorkPools") == 4


async def test_every_command_refuses_malformed_bodies_and_appends_nothing(broker, settings):
    """Whatever the command (every one the registry knows, new ones included): not JSON, not an
    object, an unknown field, a NUL in a text field → `invalid`, and the log does not grow."""
    from runledger.handlers.registry import command_specs

    nc = await connect(settings)
    js = nc.jetstream()
    try:
        start = (await js.stream_info(settings.stream_name)).state.messages
        failures = []
        for name in sorted(command_specs(None)):
            for raw in (b"{not json", b"[1, 2]", json.dumps({"zz_unknown_field": 1}).encode(),
                        json.dumps({"name": "x\u0000", "id": "x\u0000"}).encode()):
                reply = json.loads((await nc.request(settings.command_subject(name), raw, timeout=10)).data)
                if reply.get("ok") is not False or reply["error"]["code"] != "invalid":
                    failures.append(f"{name} {raw!r}: {reply}")
        assert failures == [], "\n".join(failures[:10])
        assert (await js.stream_info(settings.stream_name)).state.messages == start
    finally:
        await nc.close()
