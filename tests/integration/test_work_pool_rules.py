"""BEHAVIOUR §0 and §1 through the broker, against real NATS and Postgres: every work pool rule
observed in the command replies, in the read model (queries) and, for WP-10, in the event log.

§0 C-1/C-3 (names, unknown fields) are covered payload by payload in `test_bad_input.py`;
C-6 has no counterpart yet (no `paginate` query exists)."""

from __future__ import annotations

import asyncio
import json
import uuid

from runledger.commands import work_pools as wp
from runledger.handlers import work_pool_commands as wpc
from runledger.handlers.command_bus import CommandSpec

VALID_TEMPLATE = {
    "job_configuration": {"command": "{{ command }}", "env": ["{{env}}", "x"], "image": "{{ image }}"},
    "variables": {"type": "object", "properties": {"command": {"type": "string"}, "env": {}, "image": {}}},
}
DEFAULT_STORAGE = {"bundle_upload_step": None, "bundle_execution_step": None, "default_result_storage_block_id": None}


def install_internal_create(service) -> None:
    """WP-5 allows the system itself to create reserved pools; there is no public command for
    it, so the test registers one on the running service's command table."""

    async def handle(unit, cmd, ctx):
        return wp.decide_create_work_pool(cmd, await wpc._claim(unit, cmd.name), ctx, internal=True)

    service.commands.specs["TestInternalCreateWorkPool"] = CommandSpec(
        wp.CreateWorkPool, handle, wp.work_pool_reply, lambda c: [(wp.WORK_POOL_NAME, c.name)]
    )


def err(reply: dict) -> tuple[str, str]:
    assert reply["ok"] is False, reply
    return reply["error"]["code"], reply["error"]["message"]


# ---------------------------------------------------------------------------------------------
# WP-1, WP-2, WP-3, WP-4


async def test_create_makes_the_default_queue_and_the_initial_status(broker):
    reply = await broker.cmd("CreateWorkPool", name="proc", type="process", description="d")
    assert reply["ok"] and reply["created"] is True and reply["seq"] > 0
    pool = reply["result"]
    # WP-2: NOT_READY for a non-agent type; fields and defaults of §1
    assert {k: pool[k] for k in ("name", "type", "description", "is_paused", "concurrency_limit", "status",
                                 "base_job_template", "storage_configuration", "active_slots")} == {
        "name": "proc", "type": "process", "description": "d", "is_paused": False, "concurrency_limit": None,
        "status": "NOT_READY", "base_job_template": {}, "storage_configuration": DEFAULT_STORAGE, "active_slots": None,
    }
    read = await broker.ok_qry("GetWorkPool", name="proc")
    assert read == pool
    # WP-1: exactly one queue, the default one
    queues = await broker.ok_qry("ListWorkQueues", work_pool_name="proc")
    assert len(queues) == 1
    q = queues[0]
    assert q["id"] == pool["default_queue_id"]
    assert {k: q[k] for k in ("name", "description", "priority", "is_paused", "concurrency_limit", "status",
                              "work_pool_id", "work_pool_name", "last_polled", "filter")} == {
        "name": "default", "description": "The work pool's default queue.", "priority": 1, "is_paused": False,
        "concurrency_limit": None, "status": "NOT_READY", "work_pool_id": pool["id"], "work_pool_name": "proc",
        "last_polled": None, "filter": None,
    }
    assert await broker.ok_qry("CountWorkQueues", work_pool_name="proc") == 1

    # WP-2: created paused -> PAUSED
    paused = await broker.ok_cmd("CreateWorkPool", name="k8s-paused", type="kubernetes", is_paused=True, concurrency_limit=4)
    assert (paused["status"], paused["is_paused"], paused["active_slots"]) == ("PAUSED", True, 0)
    read = await broker.ok_qry("GetWorkPool", name="k8s-paused")
    assert (read["status"], read["concurrency_limit"], read["active_slots"]) == ("PAUSED", 4, 0)

    # WP-3: the default type is prefect-agent, whose status is always null, paused or not
    agent = await broker.ok_cmd("CreateWorkPool", name="agent", is_paused=True)
    assert (agent["type"], agent["status"]) == ("prefect-agent", None)
    assert (await broker.ok_qry("GetWorkPool", name="agent"))["status"] is None
    await broker.ok_cmd("UpdateWorkPool", name="agent", is_paused=False)
    read = await broker.ok_qry("GetWorkPool", name="agent")
    assert (read["is_paused"], read["status"]) == (False, None)

    # WP-4: duplicate name, any type, nothing appended
    before = await broker.stream_messages()
    assert err(await broker.cmd("CreateWorkPool", name="proc", type="docker")) == (
        "conflict", "A work pool with this name already exists.")
    assert await broker.stream_messages() == before
    assert (await broker.ok_qry("GetWorkPool", name="proc"))["type"] == "process"
    assert await broker.ok_qry("CountWorkPools") == 3


async def test_type_is_any_string(broker):
    for t in ("process", "docker", "my-custom type ✓"):
        assert (await broker.ok_cmd("CreateWorkPool", name=f"t-{len(t)}", type=t))["type"] == t
    types = [p["type"] for p in await broker.ok_qry("ListWorkPools")]
    assert sorted(types) == sorted(["process", "docker", "my-custom type ✓"])


# ---------------------------------------------------------------------------------------------
# WP-5


async def test_reserved_names_are_forbidden_to_users(broker):
    before = await broker.stream_messages()
    for name in ("prefect", "Prefect", "PREFECT", "prefect-pool", "PrefectPool", "prefect pool", "pReFeCt_x"):
        code, message = err(await broker.cmd("CreateWorkPool", name=name, type="process"))
        assert code == "forbidden", name
        assert "reserved" in message
    # Not reserved: the word elsewhere in the name
    await broker.ok_cmd("CreateWorkPool", name="my-prefect", type="process")
    await broker.ok_cmd("CreateWorkPool", name=" prefect", type="process")
    assert await broker.stream_messages() == before + 4  # two creates, two events each (name claim + pool)
    # Delete is refused before the lookup; update too, unless only is_paused/concurrency_limit
    assert err(await broker.cmd("DeleteWorkPool", name="prefect-missing"))[0] == "forbidden"
    assert err(await broker.cmd("UpdateWorkPool", name="prefect-missing", description="x"))[0] == "forbidden"
    assert err(await broker.cmd("UpdateWorkPool", name="prefect-missing", is_paused=True, base_job_template={}))[0] == "forbidden"
    assert err(await broker.cmd("UpdateWorkPool", name="prefect-missing", is_paused=True)) == (
        "not_found", 'Work pool "prefect-missing" not found.')
    assert await broker.ok_qry("CountWorkPools") == 2


async def test_a_reserved_pool_made_by_the_system(broker, service):
    install_internal_create(service)
    made = await broker.ok_cmd("TestInternalCreateWorkPool", name="Prefect-Managed", type="prefect:managed")
    assert made["status"] == "NOT_READY"
    # only is_paused and/or concurrency_limit may change
    out = await broker.ok_cmd("UpdateWorkPool", name="Prefect-Managed", is_paused=True)
    assert (out["is_paused"], out["status"]) == (True, "PAUSED")
    out = await broker.ok_cmd("UpdateWorkPool", name="Prefect-Managed", concurrency_limit=3)
    assert out["concurrency_limit"] == 3
    out = await broker.ok_cmd("UpdateWorkPool", name="Prefect-Managed", concurrency_limit=None, is_paused=False)
    assert (out["concurrency_limit"], out["is_paused"], out["status"]) == (None, False, "NOT_READY")
    before = await broker.stream_messages()
    for body in ({"description": "x"}, {"is_paused": True, "description": "x"},
                 {"storage_configuration": DEFAULT_STORAGE}, {"base_job_template": {}}):
        assert err(await broker.cmd("UpdateWorkPool", name="Prefect-Managed", **body))[0] == "forbidden", body
    assert err(await broker.cmd("DeleteWorkPool", name="Prefect-Managed"))[0] == "forbidden"
    assert await broker.stream_messages() == before
    read = await broker.ok_qry("GetWorkPool", name="Prefect-Managed")
    assert (read["description"], read["is_paused"], read["status"], read["concurrency_limit"]) == (None, False, "NOT_READY", None)
    # its queues are ordinary
    q = await broker.ok_cmd("CreateWorkQueue", work_pool_name="Prefect-Managed", name="q")
    assert q["priority"] == 2


# ---------------------------------------------------------------------------------------------
# WP-6


async def test_base_job_template_validation(broker):
    made = await broker.ok_cmd("CreateWorkPool", name="tpl", type="process", base_job_template=VALID_TEMPLATE)
    assert made["base_job_template"] == VALID_TEMPLATE
    assert (await broker.ok_qry("GetWorkPool", name="tpl"))["base_job_template"] == VALID_TEMPLATE

    before = await broker.stream_messages()
    bad = [
        {"job_configuration": {"a": "b"}},  # no variables
        {"variables": {"properties": {"a": {}}}},  # no job_configuration
        {"job_configuration": {}, "variables": {"properties": {"a": {}}}},  # empty job_configuration
        {"job_configuration": {"a": "b"}, "variables": {}},  # empty variables
    ]
    for template in bad:
        reply = await broker.cmd("CreateWorkPool", name="tpl2", type="process", base_job_template=template)
        assert err(reply)[0] == "invalid", template
        assert reply["error"]["field"] == "base_job_template"
    undeclared = {
        "job_configuration": {"cmd": "{{ command }}", "nested": {"list": ["{{ zeta }}", "{{alpha}}"]}},
        "variables": {"properties": {"command": {}}},
    }
    reply = await broker.cmd("CreateWorkPool", name="tpl2", type="process", base_job_template=undeclared)
    code, message = err(reply)
    assert code == "invalid" and reply["error"]["field"] == "base_job_template"
    assert "alpha, zeta" in message and "command" not in message.split("variable(s):")[1]
    # the same checks on update; nothing changes
    reply = await broker.cmd("UpdateWorkPool", name="tpl", base_job_template=undeclared)
    assert err(reply)[0] == "invalid" and reply["error"]["field"] == "base_job_template"
    assert await broker.stream_messages() == before
    assert err(await broker.qry("GetWorkPool", name="tpl2"))[0] == "not_found"
    assert (await broker.ok_qry("GetWorkPool", name="tpl"))["base_job_template"] == VALID_TEMPLATE
    # Prefect checks the template in its request schema, so `invalid` comes before the
    # conflict (WP-4), the reserved name (WP-5) and the unknown pool (WP-8)
    for name, body in (("CreateWorkPool", {"name": "tpl"}), ("CreateWorkPool", {"name": "prefect-x"}),
                       ("UpdateWorkPool", {"name": "ghost"}), ("UpdateWorkPool", {"name": "prefect-x"})):
        reply = await broker.cmd(name, **body, base_job_template=undeclared)
        assert (err(reply)[0], reply["error"].get("field")) == ("invalid", "base_job_template"), (name, body)
    assert await broker.stream_messages() == before
    # A default that references a block names one that cannot exist (runledger has no blocks).
    with_block = {"job_configuration": {"image": "{{ image }}"},
                  "variables": {"properties": {"image": {"default": {"$ref": {"block_document_id": str(uuid.uuid4())}}}}}}
    reply = await broker.cmd("CreateWorkPool", name="tpl2", type="docker", base_job_template=with_block)
    assert err(reply) == ("not_found", "Block not found.")
    assert await broker.stream_messages() == before
    # {} is valid on update too
    assert (await broker.ok_cmd("UpdateWorkPool", name="tpl", base_job_template={}))["base_job_template"] == {}
    assert (await broker.ok_qry("GetWorkPool", name="tpl"))["base_job_template"] == {}


# ---------------------------------------------------------------------------------------------
# WP-7 and C-2


async def test_read_list_filter_count(broker):
    ids = {}
    for name, t in (("charlie", "process"), ("alpha", "docker"), ("bravo", "process"), ("delta", "k8s")):
        ids[name] = (await broker.ok_cmd("CreateWorkPool", name=name, type=t))["id"]
    assert err(await broker.qry("GetWorkPool", name="nope")) == ("not_found", 'Work pool "nope" not found.')
    assert (await broker.ok_qry("GetWorkPool", name="bravo"))["id"] == ids["bravo"]
    names = lambda pools: [p["name"] for p in pools]  # noqa: E731
    # ordered by name ascending, whatever the creation order
    assert names(await broker.ok_qry("ListWorkPools")) == ["alpha", "bravo", "charlie", "delta"]
    plain = ["alpha", "bravo", "charlie"]
    f_type = {"type": {"any_": ["process", "docker"]}}
    assert names(await broker.ok_qry("ListWorkPools", work_pools=f_type)) == plain
    assert await broker.ok_qry("CountWorkPools", work_pools=f_type) == 3
    f_name = {"name": {"any_": ["charlie", "alpha", "zulu"]}}
    assert names(await broker.ok_qry("ListWorkPools", work_pools=f_name)) == ["alpha", "charlie"]
    assert await broker.ok_qry("CountWorkPools", work_pools=f_name) == 2
    f_id = {"id": {"any_": [ids["delta"], ids["bravo"]]}}
    assert names(await broker.ok_qry("ListWorkPools", work_pools=f_id)) == ["bravo", "delta"]
    assert await broker.ok_qry("CountWorkPools", work_pools=f_id) == 2
    both = {"type": {"any_": ["process"]}, "name": {"any_": ["alpha", "bravo"]}}
    assert names(await broker.ok_qry("ListWorkPools", work_pools=both)) == ["bravo"]
    assert await broker.ok_qry("CountWorkPools", work_pools=both) == 1
    assert await broker.ok_qry("CountWorkPools", work_pools={"name": {"any_": []}}) == 0
    assert await broker.ok_qry("CountWorkPools") == 4
    # C-2: limit / offset; limit 0 is an empty page; a page past the end is empty, not an error
    assert names(await broker.ok_qry("ListWorkPools", work_pools=f_type, limit=2)) == ["alpha", "bravo"]
    assert names(await broker.ok_qry("ListWorkPools", work_pools=f_type, limit=2, offset=2)) == ["charlie"]
    assert await broker.ok_qry("ListWorkPools", limit=0) == []
    assert await broker.ok_qry("ListWorkPools", offset=4) == []
    assert await broker.ok_qry("ListWorkPools", offset=1000, limit=200) == []
    for body, word in (({"limit": 201}, "less than or equal to 200"), ({"limit": -1}, "greater than or equal to 0"),
                       ({"offset": -1}, "greater than or equal to 0")):
        reply = await broker.qry("ListWorkPools", **body)
        code, message = err(reply)
        assert code == "invalid" and word in message and reply["error"]["field"] == next(iter(body))


async def test_default_list_limit_is_200(broker):
    replies = await asyncio.gather(*(
        broker.cmd("CreateWorkPool", name=f"p{i:03d}", type="process") for i in range(201)
    ))
    assert all(r["ok"] for r in replies)
    broker.last_seq = max(r["seq"] for r in replies)
    assert await broker.ok_qry("CountWorkPools") == 201
    page = await broker.ok_qry("ListWorkPools")
    assert len(page) == 200
    assert [p["name"] for p in page] == [f"p{i:03d}" for i in range(200)]
    assert [p["name"] for p in await broker.ok_qry("ListWorkPools", offset=200)] == ["p200"]
    queues = await broker.ok_qry("ListAllWorkQueues")
    assert len(queues) == 200 and {q["name"] for q in queues} == {"default"}


# ---------------------------------------------------------------------------------------------
# WP-8 and C-4


async def test_partial_updates_change_only_what_is_sent(broker):
    storage = {"bundle_upload_step": {"step": "up"}, "bundle_execution_step": {"step": "run"},
               "default_result_storage_block_id": "8b8b3e5e-4c39-4c5c-9d5a-1f0d3a1b2c3d"}
    made = await broker.ok_cmd("CreateWorkPool", name="pp", type="process", description="first", concurrency_limit=5,
                               base_job_template=VALID_TEMPLATE, storage_configuration=storage)
    assert made["storage_configuration"] == storage

    out = await broker.ok_cmd("UpdateWorkPool", name="pp", description="second")
    read = await broker.ok_qry("GetWorkPool", name="pp")
    assert out == read
    assert (read["description"], read["concurrency_limit"], read["base_job_template"], read["storage_configuration"],
            read["is_paused"], read["status"]) == ("second", 5, VALID_TEMPLATE, storage, False, "NOT_READY")
    assert read["updated"] > made["updated"] and read["created"] == made["created"]

    # explicit null where the field allows it
    await broker.ok_cmd("UpdateWorkPool", name="pp", concurrency_limit=None)
    read = await broker.ok_qry("GetWorkPool", name="pp")
    assert (read["description"], read["concurrency_limit"], read["active_slots"]) == ("second", None, None)
    await broker.ok_cmd("UpdateWorkPool", name="pp", description=None)
    read = await broker.ok_qry("GetWorkPool", name="pp")
    assert (read["description"], read["base_job_template"]) == (None, VALID_TEMPLATE)

    # storage_configuration is replaced as a whole object; missing keys take their defaults
    out = await broker.ok_cmd("UpdateWorkPool", name="pp", storage_configuration={"bundle_upload_step": {"s": 1}})
    assert out["storage_configuration"] == {**DEFAULT_STORAGE, "bundle_upload_step": {"s": 1}}
    assert (await broker.ok_qry("GetWorkPool", name="pp"))["storage_configuration"] == out["storage_configuration"]

    # an update with nothing changed appends nothing
    before = await broker.stream_messages()
    same = await broker.cmd("UpdateWorkPool", name="pp", description=None, concurrency_limit=None)
    assert same["ok"] and same["result"]["description"] is None
    assert await broker.stream_messages() == before

    # WP-8: unknown pool; negative limit changes nothing; 0 is stored
    assert err(await broker.cmd("UpdateWorkPool", name="ghost", description="x")) == (
        "not_found", 'Work pool "ghost" not found.')
    reply = await broker.cmd("UpdateWorkPool", name="pp", concurrency_limit=-5, description="never")
    assert err(reply)[0] == "invalid" and reply["error"]["field"] == "concurrency_limit"
    assert await broker.stream_messages() == before
    read = await broker.ok_qry("GetWorkPool", name="pp")
    assert (read["concurrency_limit"], read["description"]) == (None, None)
    assert (await broker.ok_cmd("UpdateWorkPool", name="pp", concurrency_limit=0))["concurrency_limit"] == 0
    read = await broker.ok_qry("GetWorkPool", name="pp")
    assert (read["concurrency_limit"], read["active_slots"]) == (0, 0)


async def test_pause_and_unpause_statuses(broker):
    await broker.ok_cmd("CreateWorkPool", name="w", type="process")
    get = lambda: broker.ok_qry("GetWorkPool", name="w")  # noqa: E731

    n0 = await broker.stream_messages()
    out = await broker.ok_cmd("UpdateWorkPool", name="w", is_paused=True)
    assert (out["is_paused"], out["status"]) == (True, "PAUSED")
    assert ((await get())["is_paused"], (await get())["status"]) == (True, "PAUSED")
    # pausing again writes the status again (a new event), even though nothing else changes
    await broker.ok_cmd("UpdateWorkPool", name="w", is_paused=True)
    assert await broker.stream_messages() == n0 + 2
    assert (await get())["status"] == "PAUSED"
    # unpause: no online worker -> NOT_READY
    out = await broker.ok_cmd("UpdateWorkPool", name="w", is_paused=False)
    assert (out["is_paused"], out["status"]) == (False, "NOT_READY")
    assert ((await get())["is_paused"], (await get())["status"]) == (False, "NOT_READY")
    # unpausing a pool that is not paused still writes the status (whatever the previous one)
    await broker.ok_cmd("UpdateWorkPool", name="w", is_paused=False)
    assert await broker.stream_messages() == n0 + 4
    # other fields never touch the status
    await broker.ok_cmd("UpdateWorkPool", name="w", description="x", concurrency_limit=2)
    assert (await get())["status"] == "NOT_READY"
    # an explicit null is_paused leaves it
    await broker.ok_cmd("UpdateWorkPool", name="w", is_paused=True)
    await broker.ok_cmd("UpdateWorkPool", name="w", is_paused=None, description="y")
    assert ((await get())["is_paused"], (await get())["status"], (await get())["description"]) == (True, "PAUSED", "y")


# ---------------------------------------------------------------------------------------------
# WP-9


async def test_delete_removes_the_pool_and_its_queues(broker):
    pool = await broker.ok_cmd("CreateWorkPool", name="gone", type="process")
    other = await broker.ok_cmd("CreateWorkPool", name="stays", type="process")
    a = await broker.ok_cmd("CreateWorkQueue", work_pool_name="gone", name="a")
    b = await broker.ok_cmd("CreateWorkQueue", work_pool_name="gone", name="b", priority=1)
    assert await broker.ok_qry("CountWorkQueues", work_pool_name="gone") == 3

    reply = await broker.cmd("DeleteWorkPool", name="gone")
    assert reply["ok"] and reply["result"] is None
    assert err(await broker.qry("GetWorkPool", name="gone")) == ("not_found", 'Work pool "gone" not found.')
    assert err(await broker.qry("ListWorkQueues", work_pool_name="gone"))[0] == "not_found"
    for qid in (pool["default_queue_id"], a["id"], b["id"]):
        assert err(await broker.qry("GetWorkQueueById", id=qid))[0] == "not_found"
        assert err(await broker.cmd("UpdateWorkQueueById", id=qid, description="x"))[0] == "not_found"
    assert [(q["work_pool_name"], q["name"]) for q in await broker.ok_qry("ListAllWorkQueues")] == [("stays", "default")]
    assert [p["id"] for p in await broker.ok_qry("ListWorkPools")] == [other["id"]]
    # unknown now; the name is free again, with a new id and a fresh default queue
    assert err(await broker.cmd("DeleteWorkPool", name="gone")) == ("not_found", 'Work pool "gone" not found.')
    assert err(await broker.cmd("CreateWorkQueue", work_pool_name="gone", name="a"))[0] == "not_found"
    again = await broker.cmd("CreateWorkPool", name="gone", type="docker")
    assert again["ok"] and again["created"] is True and again["result"]["id"] != pool["id"]
    queues = await broker.ok_qry("ListWorkQueues", work_pool_name="gone")
    assert [(q["name"], q["priority"], q["id"]) for q in queues] == [("default", 1, again["result"]["default_queue_id"])]
    assert (await broker.ok_qry("GetWorkPool", name="gone"))["type"] == "docker"


async def test_wp9_deleting_a_pool_clears_work_queue_id(broker):
    await broker.ok_cmd("CreateWorkPool", name="gone", type="process")
    q = await broker.ok_cmd("CreateWorkQueue", work_pool_name="gone", name="q")
    flow_id = (await broker.ok_cmd("CreateFlow", name="etl"))["id"]
    d = await broker.ok_cmd("CreateDeployment", name="dep", flow_id=flow_id, work_pool_name="gone",
                            work_queue_name="q")
    run = await broker.ok_cmd("CreateFlowRunFromDeployment", deployment_id=d["id"])
    assert run["work_queue_id"] == q["id"]
    await broker.ok_cmd("DeleteWorkPool", name="gone")
    d2 = await broker.ok_qry("GetDeployment", id=d["id"])
    r2 = await broker.ok_qry("GetFlowRun", id=run["id"])
    assert (d2["work_queue_id"], d2["work_queue_name"], d2["work_pool_name"]) == (None, "q", None)
    assert (r2["work_queue_id"], r2["work_queue_name"], r2["work_pool_name"]) == (None, "q", None)
    assert await broker.ok_qry("ListFlowRuns", flow_runs={"work_queue_id": {"any_": [q["id"]]}}) == []
    assert await broker.ok_qry("ListDeployments", deployments={"work_queue_id": {"any_": [q["id"]]}}) == []
    later = await broker.ok_cmd("CreateFlowRunFromDeployment", deployment_id=d["id"])
    assert (later["work_queue_id"], later["work_queue_name"]) == (None, "q")
    # The runs' and the deployment's later events, decided with the queue or not, keep it cleared;
    # so does a new pool of the same name, whose queue "q" is another one.
    await broker.ok_cmd("CreateWorkPool", name="gone", type="process")
    await broker.ok_cmd("CreateWorkQueue", work_pool_name="gone", name="q")
    moved = await broker.cmd("SetFlowRunState", id=run["id"], state={"type": "RUNNING"})
    assert moved["ok"] and moved["orchestration"]["status"] == "ACCEPT", moved
    await broker.ok_cmd("PauseDeployment", id=d["id"])
    assert (await broker.ok_qry("GetFlowRun", id=run["id"]))["work_queue_id"] is None
    d3 = await broker.ok_qry("GetDeployment", id=d["id"])
    assert (d3["work_queue_id"], d3["work_pool_name"], d3["paused"]) == (None, None, True)


async def test_deleting_a_queue_clears_deployment_work_queue_id(broker):
    await broker.ok_cmd("CreateWorkPool", name="p", type="process")
    q = await broker.ok_cmd("CreateWorkQueue", work_pool_name="p", name="q")
    flow_id = (await broker.ok_cmd("CreateFlow", name="etl"))["id"]
    d = await broker.ok_cmd("CreateDeployment", name="dep", flow_id=flow_id, work_pool_name="p", work_queue_name="q")
    run = await broker.ok_cmd("CreateFlowRunFromDeployment", deployment_id=d["id"])
    await broker.ok_cmd("DeleteWorkQueue", work_pool_name="p", work_queue_name="q")
    after = await broker.ok_qry("GetDeployment", id=d["id"])
    assert (after["work_queue_id"], after["work_queue_name"], after["work_pool_name"]) == (None, "q", None)
    assert (await broker.ok_qry("GetFlowRun", id=run["id"]))["work_queue_id"] is None
    later = await broker.ok_cmd("CreateFlowRunFromDeployment", deployment_id=d["id"])
    assert later["work_queue_id"] is None
    # A queue of the same name made again is another queue: the deployment does not follow it.
    await broker.ok_cmd("CreateWorkQueue", work_pool_name="p", name="q")
    await broker.ok_cmd("UpdateDeployment", id=d["id"], description="again")
    assert (await broker.ok_qry("GetDeployment", id=d["id"]))["work_queue_id"] is None
    assert q["id"] not in {r["work_queue_id"] for r in await broker.ok_qry("ListFlowRuns")}


# ---------------------------------------------------------------------------------------------
# WP-10


async def test_events_in_the_log(broker):
    made = await broker.ok_cmd("CreateWorkPool", name="ev", type="process", description="a", concurrency_limit=1)
    pid = made["id"]
    await broker.ok_cmd("UpdateWorkPool", name="ev", is_paused=True)  # a pause alone
    await broker.ok_cmd("UpdateWorkPool", name="ev", description="b", concurrency_limit=2,
                        base_job_template=VALID_TEMPLATE, is_paused=False)
    await broker.ok_cmd("UpdateWorkPool", name="ev", description="b")  # nothing changes: no event
    await broker.ok_cmd("DeleteWorkPool", name="ev")
    events = await broker.pool_events(pid)
    assert [e["type"] for e in events] == ["WorkPoolCreated", "WorkPoolUpdated", "WorkPoolUpdated", "WorkPoolDeleted"]
    assert all(e["aggregate_type"] == "work_pool" and e["aggregate_id"] == pid for e in events)
    created, paused, edited, deleted = (e["payload"] for e in events)
    # created, with the initial status (WP-2's not-ready event)
    assert created["pool"]["status"] == "NOT_READY" and created["pool"]["name"] == "ev"
    assert created["default_queue"]["id"] == made["default_queue_id"]
    # a pause alone: the status event only, no change of the fields an `updated` event lists
    reported = {"description", "base_job_template", "concurrency_limit", "storage_configuration"}
    assert paused["status"] == {"old": "NOT_READY", "new": "PAUSED"}
    assert set(paused["changes"]) & reported == set()
    # an edit lists what changed, from -> to, and the status write of the unpause
    assert {k: v for k, v in edited["changes"].items() if k in reported} == {
        "description": {"old": "a", "new": "b"},
        "concurrency_limit": {"old": 1, "new": 2},
        "base_job_template": {"old": {}, "new": VALID_TEMPLATE},
    }
    assert edited["status"] == {"old": "PAUSED", "new": "NOT_READY"}
    assert deleted["pool_id"] == pid and deleted["name"] == "ev"
    assert deleted["queue_ids"] == [made["default_queue_id"]]

    # a pool created paused carries PAUSED; the name aggregate records claim and release
    p2 = await broker.ok_cmd("CreateWorkPool", name="ev", type="process", is_paused=True)
    assert (await broker.pool_events(p2["id"]))[0]["payload"]["pool"]["status"] == "PAUSED"
    js = broker.nc.jetstream()
    last = await js.get_msg(broker.settings.stream_name, subject=f"{broker.settings.event_subject_prefix}.work_pool_name.ev.*",
                            direct=True)
    assert json.loads(last.data)["type"] == "WorkPoolNameClaimed"
    assert json.loads(last.data)["payload"]["work_pool_id"] == p2["id"]
