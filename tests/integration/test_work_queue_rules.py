"""BEHAVIOUR §2 through the broker, against real NATS and Postgres: work queues (WQ-1…WQ-11,
WQ-13) and priorities (PR-1…PR-5), observed in the command replies, the read model and the
event log.

Not here: WQ-12 (implicit queues need deployments)."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta, timezone

from runledger.commands.bounds import json_time

LETTERS = "ABCDE"


def err(reply: dict) -> tuple[str, str]:
    assert reply["ok"] is False, reply
    return reply["error"]["code"], reply["error"]["message"]


async def layout(broker, pool: str) -> dict[str, int]:
    """Queue name -> priority from the read model, checking PR-5 (ascending priority) on the way."""
    queues = await broker.ok_qry("ListWorkQueues", work_pool_name=pool)
    priorities = [q["priority"] for q in queues]
    assert priorities == sorted(priorities), queues
    return {q["name"]: q["priority"] for q in queues}


async def abcde(broker, pool: str, names: str = LETTERS) -> dict:
    """A pool whose queues are `A1 B2 C3 D4 E5`: the default queue renamed to A (WQ-6), the
    others created without a priority (WQ-2)."""
    made = await broker.ok_cmd("CreateWorkPool", name=pool, type="process")
    await broker.ok_cmd("UpdateWorkQueue", work_pool_name=pool, work_queue_name="default", name=names[0])
    for n in names[1:]:
        await broker.ok_cmd("CreateWorkQueue", work_pool_name=pool, name=n)
    assert await layout(broker, pool) == {n: i for i, n in enumerate(names, start=1)}
    return made


def parse_layout(text: str) -> dict[str, int]:
    """`"A2 B3 C4"` -> {"A": 2, "B": 3, "C": 4}"""
    out = {}
    for token in text.split():
        name = token.rstrip("0123456789")
        out[name] = int(token[len(name):])
    return out


# ---------------------------------------------------------------------------------------------
# WQ-1, WQ-2, WQ-3, WQ-4


async def test_create_in_a_pool(broker):
    pool = await broker.ok_cmd("CreateWorkPool", name="p", type="process")
    await broker.ok_cmd("CreateWorkPool", name="other", type="process")
    reply = await broker.cmd("CreateWorkQueue", work_pool_name="p", name="q", description="d", concurrency_limit=3)
    assert reply["ok"] and reply["created"] is True
    q = reply["result"]
    expected = {"name": "q", "description": "d", "is_paused": False, "concurrency_limit": 3, "priority": 2,
                "work_pool_id": pool["id"], "work_pool_name": "p", "last_polled": None, "status": "NOT_READY",
                "filter": None, "active_slots": 0}
    assert {k: q[k] for k in expected} == expected
    assert await broker.ok_qry("GetWorkQueue", work_pool_name="p", work_queue_name="q") == q
    assert await broker.ok_qry("GetWorkQueueById", id=q["id"]) == q
    # description defaults to "", limit to null
    bare = await broker.ok_cmd("CreateWorkQueue", work_pool_name="p", name="bare")
    assert (bare["description"], bare["concurrency_limit"], bare["active_slots"], bare["priority"]) == ("", None, None, 3)
    # WQ-1: unknown pool; same name in the same pool; the same name elsewhere is fine
    before = await broker.stream_messages()
    assert err(await broker.cmd("CreateWorkQueue", work_pool_name="nope", name="q")) == (
        "not_found", 'Work pool "nope" not found.')
    assert err(await broker.cmd("CreateWorkQueue", work_pool_name="p", name="q"))[0] == "conflict"
    assert err(await broker.cmd("CreateWorkQueue", work_pool_name="p", name="default", priority=1))[0] == "conflict"
    assert await broker.stream_messages() == before
    assert await layout(broker, "p") == {"default": 1, "q": 2, "bare": 3}
    elsewhere = await broker.ok_cmd("CreateWorkQueue", work_pool_name="other", name="q")
    assert elsewhere["id"] != q["id"] and elsewhere["work_pool_name"] == "other"
    # names are case-sensitive: "Q" is another queue
    assert (await broker.ok_cmd("CreateWorkQueue", work_pool_name="p", name="Q"))["priority"] == 4
    # WQ-7 reads: unknown pool / queue (both the queue's message); filters and C-2 paging within one pool
    assert err(await broker.qry("GetWorkQueue", work_pool_name="nope", work_queue_name="q")) == (
        "not_found", "Work pool queue 'nope/q' not found.")
    assert err(await broker.qry("GetWorkQueue", work_pool_name="other", work_queue_name="bare")) == (
        "not_found", "Work pool queue 'other/bare' not found.")
    named = await broker.ok_qry("ListWorkQueues", work_pool_name="p", work_queues={"name": {"any_": ["Q", "q", "zz"]}})
    assert [x["name"] for x in named] == ["q", "Q"]
    assert await broker.ok_qry("CountWorkQueues", work_pool_name="p", work_queues={"id": {"any_": [q["id"], elsewhere["id"]]}}) == 1
    assert await broker.ok_qry("CountWorkQueues", work_pool_name="p") == 4
    assert [x["name"] for x in await broker.ok_qry("ListWorkQueues", work_pool_name="p", limit=2, offset=1)] == ["q", "bare"]
    assert await broker.ok_qry("ListWorkQueues", work_pool_name="p", limit=0) == []
    assert await broker.ok_qry("ListWorkQueues", work_pool_name="p", offset=4) == []

    # WQ-4 quirk: created paused, yet NOT_READY
    paused = await broker.ok_cmd("CreateWorkQueue", work_pool_name="p", name="paused", is_paused=True)
    assert (paused["is_paused"], paused["status"]) == (True, "NOT_READY")
    read = await broker.ok_qry("GetWorkQueue", work_pool_name="p", work_queue_name="paused")
    assert (read["is_paused"], read["status"]) == (True, "NOT_READY")


async def test_priority_when_none_is_given(broker):
    # [1] -> 2; [1, 2, 3] -> 4
    await broker.ok_cmd("CreateWorkPool", name="seq", type="process")
    assert [(await broker.ok_cmd("CreateWorkQueue", work_pool_name="seq", name=n))["priority"] for n in "abc"] == [2, 3, 4]
    # [1, 99] -> 2, nothing else moves
    await broker.ok_cmd("CreateWorkPool", name="gap", type="process")
    assert (await broker.ok_cmd("CreateWorkQueue", work_pool_name="gap", name="far", priority=99))["priority"] == 99
    assert (await broker.ok_cmd("CreateWorkQueue", work_pool_name="gap", name="next"))["priority"] == 2
    assert await layout(broker, "gap") == {"default": 1, "next": 2, "far": 99}
    # [2, 3] -> 1: move the default queue away with the by-id update (stored as given, WQ-11)
    pool = await broker.ok_cmd("CreateWorkPool", name="hole", type="process")
    await broker.ok_cmd("CreateWorkQueue", work_pool_name="hole", name="b")
    await broker.ok_cmd("CreateWorkQueue", work_pool_name="hole", name="c")
    await broker.ok_cmd("UpdateWorkQueueById", id=pool["default_queue_id"], priority=10)
    assert await layout(broker, "hole") == {"b": 2, "c": 3, "default": 10}
    assert (await broker.ok_cmd("CreateWorkQueue", work_pool_name="hole", name="a"))["priority"] == 1
    assert await layout(broker, "hole") == {"a": 1, "b": 2, "c": 3, "default": 10}
    # [1, 2, 4] -> 3
    await broker.ok_cmd("UpdateWorkQueueById", id=pool["default_queue_id"], priority=4)
    await broker.ok_cmd("DeleteWorkQueue", work_pool_name="hole", work_queue_name="c")
    assert (await broker.ok_cmd("CreateWorkQueue", work_pool_name="hole", name="c2"))["priority"] == 3


async def test_priority_given_reprioritises_the_pool(broker):
    await broker.ok_cmd("CreateWorkPool", name="p", type="process")
    a = await broker.ok_cmd("CreateWorkQueue", work_pool_name="p", name="A", priority=1)
    assert a["priority"] == 1
    assert await layout(broker, "p") == {"A": 1, "default": 2}
    await broker.ok_cmd("CreateWorkQueue", work_pool_name="p", name="B", priority=2)
    assert await layout(broker, "p") == {"A": 1, "B": 2, "default": 3}
    await broker.ok_cmd("CreateWorkQueue", work_pool_name="p", name="Z", priority=50)
    await broker.ok_cmd("CreateWorkQueue", work_pool_name="p", name="C", priority=1)
    assert await layout(broker, "p") == {"C": 1, "A": 2, "B": 3, "default": 4, "Z": 50}
    # the moved queues are in the read model with their new priorities, also by id
    default = await broker.ok_qry("GetWorkQueue", work_pool_name="p", work_queue_name="default")
    assert (await broker.ok_qry("GetWorkQueueById", id=default["id"]))["priority"] == 4


# ---------------------------------------------------------------------------------------------
# PR-1 … PR-5


PR2_TABLE = [
    ({"A": 2}, "A2 B3 C4 D5 E6"),
    ({"A": 2, "B": 4}, "A2 C3 B4 D5 E6"),
    ({"A": 2, "B": 4, "C": 1}, "C1 A2 B4 D5 E6"),
    ({"A": 2, "B": 1}, "B1 A2 C3 D4 E5"),
    ({"B": 2, "C": 3, "D": 4, "E": 5}, "A1 B2 C3 D4 E5"),
    ({"E": 1}, "E1 A2 B3 C4 D5"),
    ({"A": 5}, "B2 C3 D4 A5 E6"),
    ({"D": 2}, "A1 D2 B3 C4 E5"),
    ({}, "A1 B2 C3 D4 E5"),
]


async def test_pr2_worked_examples(broker):
    for i, (targets, expected) in enumerate(PR2_TABLE):
        pool = f"t{i}"
        await abcde(broker, pool)
        before = await broker.stream_messages()
        reply = await broker.cmd("SetWorkQueuePriorities", work_pool_name=pool, priorities=targets)
        assert reply["ok"], reply
        want = parse_layout(expected)
        # the reply lists the pool's queues by priority
        assert [(q["name"], q["priority"]) for q in reply["result"]] == sorted(want.items(), key=lambda kv: kv[1]), targets
        assert await layout(broker, pool) == want, targets
        changed = want != parse_layout("A1 B2 C3 D4 E5")
        assert await broker.stream_messages() == before + (1 if changed else 0), targets

    # {} also leaves gaps alone: A1 B2 D4 E5 (PR-4 made the gap)
    await abcde(broker, "gaps")
    await broker.ok_cmd("DeleteWorkQueue", work_pool_name="gaps", work_queue_name="C")
    assert await layout(broker, "gaps") == parse_layout("A1 B2 D4 E5")
    await broker.ok_cmd("SetWorkQueuePriorities", work_pool_name="gaps", priorities={})
    assert await layout(broker, "gaps") == parse_layout("A1 B2 D4 E5")

    # default1 C2 A3 B4 with {A:100} -> default1 C2 B4 A100
    await broker.ok_cmd("CreateWorkPool", name="other", type="process")
    for n in "CAB":
        await broker.ok_cmd("CreateWorkQueue", work_pool_name="other", name=n)
    await broker.ok_cmd("SetWorkQueuePriorities", work_pool_name="other", priorities={"A": 100})
    assert await layout(broker, "other") == {"default": 1, "C": 2, "B": 4, "A": 100}


async def test_pr1_rules_through_every_entry_point(broker):
    await abcde(broker, "p")
    # step 1: duplicate targets -> invalid, nothing changes (even if one names no queue)
    before = await broker.stream_messages()
    for targets in ({"A": 2, "B": 2}, {"A": 3, "nope": 3}):
        reply = await broker.cmd("SetWorkQueuePriorities", work_pool_name="p", priorities=targets)
        code, message = err(reply)
        assert code == "invalid" and "Duplicate target priorities provided" in message and reply["error"]["field"] == "priorities"
    assert await broker.stream_messages() == before
    assert await layout(broker, "p") == parse_layout("A1 B2 C3 D4 E5")
    # unknown names are ignored
    await broker.ok_cmd("SetWorkQueuePriorities", work_pool_name="p", priorities={"nope": 1, "E": 2})
    assert await layout(broker, "p") == parse_layout("A1 E2 B3 C4 D5")
    assert err(await broker.cmd("SetWorkQueuePriorities", work_pool_name="ghost", priorities={"A": 1}))[0] == "not_found"

    # the same algorithm through UpdateWorkQueue (WQ-5) — rows of the PR-2 table
    await abcde(broker, "u1")
    out = await broker.ok_cmd("UpdateWorkQueue", work_pool_name="u1", work_queue_name="E", priority=1)
    assert out["priority"] == 1
    assert await layout(broker, "u1") == parse_layout("E1 A2 B3 C4 D5")
    await abcde(broker, "u2")
    await broker.ok_cmd("UpdateWorkQueue", work_pool_name="u2", work_queue_name="A", priority=5)
    assert await layout(broker, "u2") == parse_layout("B2 C3 D4 A5 E6")
    await abcde(broker, "u3")
    await broker.ok_cmd("UpdateWorkQueue", work_pool_name="u3", work_queue_name="D", priority=2)
    assert await layout(broker, "u3") == parse_layout("A1 D2 B3 C4 E5")
    # a priority update to the current value moves nothing and appends nothing
    before = await broker.stream_messages()
    await broker.ok_cmd("UpdateWorkQueue", work_pool_name="u3", work_queue_name="D", priority=2)
    assert await broker.stream_messages() == before


async def test_pr3_quirk_duplicates_are_possible(broker):
    await abcde(broker, "p", "ABC")
    await broker.ok_cmd("SetWorkQueuePriorities", work_pool_name="p", priorities={"A": 2, "C": 3})
    assert await layout(broker, "p") == {"A": 2, "B": 3, "C": 3}
    # the duplicate is stored as such, also by id
    queues = await broker.ok_qry("ListWorkQueues", work_pool_name="p")
    assert sorted(q["priority"] for q in queues) == [2, 3, 3]
    # and a queue created without a priority sees [2, 3, 3] -> 1
    assert (await broker.ok_cmd("CreateWorkQueue", work_pool_name="p", name="D"))["priority"] == 1


async def test_pr4_delete_does_not_renumber(broker):
    pool = await broker.ok_cmd("CreateWorkPool", name="p", type="process")
    qs = {n: await broker.ok_cmd("CreateWorkQueue", work_pool_name="p", name=n) for n in "ABC"}
    assert await layout(broker, "p") == {"default": 1, "A": 2, "B": 3, "C": 4}
    reply = await broker.cmd("DeleteWorkQueue", work_pool_name="p", work_queue_name="B")
    assert reply["ok"] and reply["result"] is None
    assert await layout(broker, "p") == {"default": 1, "A": 2, "C": 4}
    assert err(await broker.qry("GetWorkQueue", work_pool_name="p", work_queue_name="B")) == (
        "not_found", "Work pool queue 'p/B' not found.")
    assert err(await broker.qry("GetWorkQueueById", id=qs["B"]["id"]))[0] == "not_found"
    assert err(await broker.cmd("DeleteWorkQueue", work_pool_name="p", work_queue_name="B"))[0] == "not_found"
    assert err(await broker.cmd("DeleteWorkQueue", work_pool_name="nope", work_queue_name="A")) == (
        "not_found", 'Work pool "nope" not found.')
    # by id too
    await broker.ok_cmd("DeleteWorkQueueById", id=qs["A"]["id"])
    assert await layout(broker, "p") == {"default": 1, "C": 4}
    assert err(await broker.cmd("DeleteWorkQueueById", id=qs["A"]["id"]))[0] == "not_found"
    # the name is free again
    assert (await broker.ok_cmd("CreateWorkQueue", work_pool_name="p", name="B"))["priority"] == 2
    assert await broker.ok_qry("CountWorkQueues", work_pool_name="p") == 3
    assert pool["default_queue_id"] in {q["id"] for q in await broker.ok_qry("ListWorkQueues", work_pool_name="p")}


# ---------------------------------------------------------------------------------------------
# WQ-5, WQ-6, WQ-7 and C-4


async def test_update_and_its_events(broker):
    pool = await broker.ok_cmd("CreateWorkPool", name="p", type="process")
    await broker.ok_cmd("CreateWorkQueue", work_pool_name="p", name="q", description="d", concurrency_limit=2)
    await broker.ok_cmd("CreateWorkQueue", work_pool_name="p", name="r")
    get = lambda n: broker.ok_qry("GetWorkQueue", work_pool_name="p", work_queue_name=n)  # noqa: E731

    # C-4: only what is sent changes
    out = await broker.ok_cmd("UpdateWorkQueue", work_pool_name="p", work_queue_name="q", description="d2")
    read = await get("q")
    assert out == read
    assert (read["description"], read["concurrency_limit"], read["priority"], read["is_paused"]) == ("d2", 2, 2, False)
    await broker.ok_cmd("UpdateWorkQueue", work_pool_name="p", work_queue_name="q", concurrency_limit=None)
    read = await get("q")
    assert (read["description"], read["concurrency_limit"], read["active_slots"]) == ("d2", None, None)
    await broker.ok_cmd("UpdateWorkQueue", work_pool_name="p", work_queue_name="q", concurrency_limit=0)
    assert (await get("q"))["concurrency_limit"] == 0

    # unknown pool or queue; negative limit changes nothing
    before = await broker.stream_messages()
    assert err(await broker.cmd("UpdateWorkQueue", work_pool_name="x", work_queue_name="q", description="z")) == (
        "not_found", 'Work pool "x" not found.')
    assert err(await broker.cmd("UpdateWorkQueue", work_pool_name="p", work_queue_name="x", description="z")) == (
        "not_found", "Work pool queue 'p/x' not found.")
    reply = await broker.cmd("UpdateWorkQueue", work_pool_name="p", work_queue_name="q", concurrency_limit=-5, description="z")
    assert err(reply)[0] == "invalid" and reply["error"]["field"] == "concurrency_limit"
    # renaming onto another queue's name is a conflict
    assert err(await broker.cmd("UpdateWorkQueue", work_pool_name="p", work_queue_name="q", name="r"))[0] == "conflict"
    # nothing changed -> no event
    await broker.ok_cmd("UpdateWorkQueue", work_pool_name="p", work_queue_name="q", description="d2", concurrency_limit=0)
    assert await broker.stream_messages() == before
    assert ((await get("q"))["description"], (await get("q"))["concurrency_limit"]) == ("d2", 0)

    # a rename: reads follow the new name, the old one is free
    q_id = (await get("q"))["id"]
    out = await broker.ok_cmd("UpdateWorkQueue", work_pool_name="p", work_queue_name="q", name="q2", priority=1)
    assert (out["id"], out["name"], out["priority"]) == (q_id, "q2", 1)
    assert err(await broker.qry("GetWorkQueue", work_pool_name="p", work_queue_name="q"))[0] == "not_found"
    assert (await get("q2"))["id"] == q_id
    assert await layout(broker, "p") == {"q2": 1, "default": 2, "r": 3}
    assert (await broker.ok_cmd("CreateWorkQueue", work_pool_name="p", name="q"))["priority"] == 4
    assert err(await broker.cmd("CreateWorkQueue", work_pool_name="p", name="q2"))[0] == "conflict"

    # events: the changed fields from -> to, and the queues PR-1 moved
    events = [e for e in await broker.pool_events(pool["id"]) if e["type"] == "WorkQueueUpdated"]
    reported = {"name", "description", "concurrency_limit", "priority"}
    listed = [{k: v for k, v in e["payload"]["changes"].items() if k in reported} for e in events]
    assert listed == [
        {"description": {"old": "d", "new": "d2"}},
        {"concurrency_limit": {"old": 2, "new": None}},
        {"concurrency_limit": {"old": None, "new": 0}},
        {"name": {"old": "q", "new": "q2"}, "priority": {"old": 2, "new": 1}},
    ]
    # PR-1 moved only the default queue (1 -> 2); r already had 3
    assert events[-1]["payload"]["reprioritized"] == {pool["default_queue_id"]: 2}
    assert all(e["payload"]["status"] is None for e in events)


async def test_the_default_queue(broker):
    pool = await broker.ok_cmd("CreateWorkPool", name="p", type="process")
    dq = pool["default_queue_id"]
    await broker.ok_cmd("CreateWorkQueue", work_pool_name="p", name="a")
    out = await broker.ok_cmd("UpdateWorkQueue", work_pool_name="p", work_queue_name="default", name="main",
                              priority=2, is_paused=True, concurrency_limit=1, description="renamed")
    assert (out["id"], out["name"], out["priority"], out["is_paused"], out["status"], out["concurrency_limit"]) == (
        dq, "main", 2, True, "PAUSED", 1)
    assert await layout(broker, "p") == {"main": 2, "a": 3}  # PR-1: {main: 2} pushes a down
    assert (await broker.ok_qry("GetWorkPool", name="p"))["default_queue_id"] == dq
    before = await broker.stream_messages()
    for reply in (await broker.cmd("DeleteWorkQueue", work_pool_name="p", work_queue_name="main"),
                  await broker.cmd("DeleteWorkQueueById", id=dq)):
        assert err(reply) == ("conflict", "Can't delete a pool's default queue.")
    assert await broker.stream_messages() == before
    assert (await broker.ok_qry("GetWorkQueueById", id=dq))["name"] == "main"
    # a new queue named "default" is just a queue
    other = await broker.ok_cmd("CreateWorkQueue", work_pool_name="p", name="default")
    assert other["id"] != dq and other["priority"] == 1  # WQ-2: [2, 3] -> 1
    await broker.ok_cmd("DeleteWorkQueue", work_pool_name="p", work_queue_name="default")
    # gone only with its pool
    await broker.ok_cmd("DeleteWorkPool", name="p")
    assert err(await broker.qry("GetWorkQueueById", id=dq)) == ("not_found", f"Work queue {dq} not found.")


# ---------------------------------------------------------------------------------------------
# WQ-8


async def test_queue_status_follows_pause_and_polls(broker):
    pool = await broker.ok_cmd("CreateWorkPool", name="p", type="process")
    q = await broker.ok_cmd("CreateWorkQueue", work_pool_name="p", name="q")
    upd = lambda **kw: broker.cmd("UpdateWorkQueue", work_pool_name="p", work_queue_name="q", **kw)  # noqa: E731

    async def status():
        read = await broker.ok_qry("GetWorkQueue", work_pool_name="p", work_queue_name="q")
        return read["is_paused"], read["status"]

    recent = json_time(datetime.now(UTC) - timedelta(seconds=10))  # as replies write a time
    stale = json_time(datetime.now(UTC) - timedelta(seconds=120))
    # last_polled alone never changes the status
    out = (await upd(last_polled=recent))["result"]
    assert (out["status"], out["last_polled"]) == ("NOT_READY", recent)
    assert await status() == (False, "NOT_READY")
    # unpause when not paused: no status change, no event
    n = await broker.stream_messages()
    await upd(is_paused=False)
    assert await broker.stream_messages() == n
    # pause -> PAUSED; pausing again -> nothing at all
    assert (await upd(is_paused=True))["result"]["status"] == "PAUSED"
    assert await status() == (True, "PAUSED")
    n = await broker.stream_messages()
    await upd(is_paused=True)
    assert await broker.stream_messages() == n
    # unpause: READY, the stored last_polled being within 60 s
    assert (await upd(is_paused=False))["result"]["status"] == "READY"
    assert await status() == (False, "READY")
    # unpause with a stale last_polled in the same request -> NOT_READY (the request's value wins)
    await upd(is_paused=True)
    out = (await upd(is_paused=False, last_polled=stale))["result"]
    assert (out["status"], out["last_polled"]) == ("NOT_READY", stale)
    assert await status() == (False, "NOT_READY")
    # ... and a recent one in the same request wins over the stale stored one
    await upd(is_paused=True)
    assert (await upd(is_paused=False, last_polled=recent))["result"]["status"] == "READY"
    # a last_polled while paused changes nothing about the status
    await upd(is_paused=True)
    await upd(last_polled=stale)
    assert await status() == (True, "PAUSED")
    assert (await upd(is_paused=False))["result"]["status"] == "NOT_READY"
    # a naive time is UTC (it used to be stored naive, and the next unpause failed `unavailable`);
    # other offsets are normalised to UTC in the reply as in the read model
    naive = (datetime.now(UTC) - timedelta(seconds=5)).replace(tzinfo=None)
    await upd(is_paused=True)
    out = (await upd(last_polled=naive.isoformat()))["result"]
    assert out["last_polled"] == json_time(naive.replace(tzinfo=UTC))
    out = await broker.ok_cmd("UpdateWorkQueue", work_pool_name="p", work_queue_name="q", is_paused=False)
    assert out["status"] == "READY"
    plus2 = datetime.now(UTC).astimezone(timezone(timedelta(hours=2)))
    out = (await upd(last_polled=plus2.isoformat()))["result"]
    assert out["last_polled"] == json_time(plus2)
    assert (await broker.ok_qry("GetWorkQueue", work_pool_name="p", work_queue_name="q"))["last_polled"] == out["last_polled"]
    # C-4: an explicit null clears last_polled, and WQ-8 then uses that null -> NOT_READY
    await upd(is_paused=True)
    out = await broker.ok_cmd("UpdateWorkQueue", work_pool_name="p", work_queue_name="q", is_paused=False, last_polled=None)
    assert (out["status"], out["last_polled"]) == ("NOT_READY", None)
    assert (await broker.ok_qry("GetWorkQueue", work_pool_name="p", work_queue_name="q"))["last_polled"] is None
    # never polled -> NOT_READY
    await broker.ok_cmd("CreateWorkQueue", work_pool_name="p", name="never")
    await broker.ok_cmd("UpdateWorkQueue", work_pool_name="p", work_queue_name="never", is_paused=True)
    out = await broker.ok_cmd("UpdateWorkQueue", work_pool_name="p", work_queue_name="never", is_paused=False)
    assert (out["status"], out["last_polled"]) == ("NOT_READY", None)

    # WQ-4 + WQ-8: created paused (NOT_READY), then paused again -> PAUSED, a status-only event
    await broker.ok_cmd("CreateWorkQueue", work_pool_name="p", name="cp", is_paused=True)
    n = await broker.stream_messages()
    out = await broker.ok_cmd("UpdateWorkQueue", work_pool_name="p", work_queue_name="cp", is_paused=True)
    assert (out["is_paused"], out["status"]) == (True, "PAUSED")
    assert await broker.stream_messages() == n + 1

    # each status change is one event carrying {old, new}, on the pool's subject
    events = [e["payload"] for e in await broker.pool_events(pool["id"]) if e["type"] == "WorkQueueUpdated"]
    of_q = [(e["status"]["old"], e["status"]["new"]) for e in events if e["queue"]["id"] == q["id"] and e["status"]]
    assert of_q == [
        ("NOT_READY", "PAUSED"), ("PAUSED", "READY"),
        ("READY", "PAUSED"), ("PAUSED", "NOT_READY"),
        ("NOT_READY", "PAUSED"), ("PAUSED", "READY"),
        ("READY", "PAUSED"), ("PAUSED", "NOT_READY"),
        ("NOT_READY", "PAUSED"), ("PAUSED", "READY"),
        ("READY", "PAUSED"), ("PAUSED", "NOT_READY"),
    ]
    assert events[-1]["status"] == {"old": "NOT_READY", "new": "PAUSED"}
    assert {k for k in events[-1]["changes"] if k in {"name", "description", "concurrency_limit", "priority"}} == set()


# ---------------------------------------------------------------------------------------------
# WQ-9, WQ-10, WQ-11


async def test_legacy_create_makes_default_agent_pool(broker):
    assert err(await broker.qry("GetWorkPool", name="default-agent-pool"))[0] == "not_found"
    reply = await broker.cmd("CreateLegacyWorkQueue", name="first", description="legacy")
    assert reply["ok"] and reply["created"] is True
    q = reply["result"]
    assert (q["name"], q["work_pool_name"], q["priority"], q["description"], q["status"]) == (
        "first", "default-agent-pool", 2, "legacy", "NOT_READY")
    pool = await broker.ok_qry("GetWorkPool", name="default-agent-pool")
    assert (pool["type"], pool["status"], pool["id"]) == ("prefect-agent", None, q["work_pool_id"])
    assert await layout(broker, "default-agent-pool") == {"default": 1, "first": 2}
    # pool exists now: "default" is a conflict, like any existing name
    assert err(await broker.cmd("CreateLegacyWorkQueue", name="default"))[0] == "conflict"
    assert err(await broker.cmd("CreateLegacyWorkQueue", name="first"))[0] == "conflict"
    # WQ-2 / WQ-3 within that pool
    assert (await broker.ok_cmd("CreateLegacyWorkQueue", name="second"))["priority"] == 3
    assert (await broker.ok_cmd("CreateLegacyWorkQueue", name="top", priority=1))["priority"] == 1
    assert await layout(broker, "default-agent-pool") == {"top": 1, "default": 2, "first": 3, "second": 4}
    assert await broker.ok_qry("CountWorkPools") == 1


async def test_legacy_default_when_the_pool_is_missing(broker):
    reply = await broker.cmd("CreateLegacyWorkQueue", name="default")
    assert reply["ok"], reply
    q = reply["result"]
    pool = await broker.ok_qry("GetWorkPool", name="default-agent-pool")
    assert q["id"] == pool["default_queue_id"]
    assert (q["name"], q["priority"], q["description"], q["work_pool_name"]) == (
        "default", 1, "The work pool's default queue.", "default-agent-pool")
    assert await layout(broker, "default-agent-pool") == {"default": 1}
    assert (await broker.ok_qry("GetLegacyWorkQueue", name="default"))["id"] == q["id"]


async def test_legacy_reads_updates_and_deletes(broker):
    legacy = await broker.ok_cmd("CreateLegacyWorkQueue", name="shared")
    await broker.ok_cmd("CreateWorkPool", name="other", type="process")
    elsewhere = await broker.ok_cmd("CreateWorkQueue", work_pool_name="other", name="shared")
    only_there = await broker.ok_cmd("CreateWorkQueue", work_pool_name="other", name="only-there")
    # WQ-10: by name only inside default-agent-pool
    assert (await broker.ok_qry("GetLegacyWorkQueue", name="shared"))["id"] == legacy["id"]
    assert err(await broker.qry("GetLegacyWorkQueue", name="only-there"))[0] == "not_found"
    # by id: any pool
    got = await broker.ok_qry("GetWorkQueueById", id=only_there["id"])
    assert (got["name"], got["work_pool_name"]) == ("only-there", "other")
    assert err(await broker.qry("GetWorkQueueById", id="00000000-0000-0000-0000-000000000001"))[0] == "not_found"
    # list spans all pools, by name ascending
    listed = [(q["name"], q["work_pool_name"]) for q in await broker.ok_qry("ListAllWorkQueues")]
    assert [n for n, _ in listed] == ["default", "default", "only-there", "shared", "shared"]
    assert sorted(listed) == sorted([("default", "default-agent-pool"), ("default", "other"), ("only-there", "other"),
                                     ("shared", "default-agent-pool"), ("shared", "other")])
    assert [q["name"] for q in await broker.ok_qry("ListAllWorkQueues", limit=2, offset=2)] == ["only-there", "shared"]
    filtered = await broker.ok_qry("ListAllWorkQueues", work_queues={"name": {"any_": ["shared"]}})
    assert {q["id"] for q in filtered} == {legacy["id"], elsewhere["id"]}
    by_id = await broker.ok_qry("ListAllWorkQueues", work_queues={"id": {"any_": [only_there["id"]]}})
    assert [q["id"] for q in by_id] == [only_there["id"]]

    # WQ-11: a priority through the id route is stored as given, without PR-1
    await broker.ok_cmd("CreateWorkQueue", work_pool_name="other", name="third")
    assert await layout(broker, "other") == {"default": 1, "shared": 2, "only-there": 3, "third": 4}
    out = await broker.ok_cmd("UpdateWorkQueueById", id=only_there["id"], priority=1, description="by id")
    assert (out["priority"], out["description"]) == (1, "by id")
    queues = await broker.ok_qry("ListWorkQueues", work_pool_name="other")
    assert sorted((q["priority"], q["name"]) for q in queues) == [(1, "default"), (1, "only-there"), (2, "shared"), (4, "third")]
    assert [q["priority"] for q in queues] == [1, 1, 2, 4]  # PR-5 order, ties in any order
    # ... and WQ-8 status rules apply the same way, C-4 too
    out = await broker.ok_cmd("UpdateWorkQueueById", id=only_there["id"], is_paused=True)
    assert (out["status"], out["priority"], out["description"]) == ("PAUSED", 1, "by id")
    out = await broker.ok_cmd("UpdateWorkQueueById", id=only_there["id"], is_paused=False,
                              last_polled=datetime.now(UTC).isoformat())
    assert out["status"] == "READY"
    read = await broker.ok_qry("GetWorkQueueById", id=only_there["id"])
    assert (read["status"], read["is_paused"], read["priority"], read["description"]) == ("READY", False, 1, "by id")
    # rename by id; a name taken in its own pool conflicts, in another pool it does not matter
    assert err(await broker.cmd("UpdateWorkQueueById", id=only_there["id"], name="third"))[0] == "conflict"
    assert (await broker.ok_cmd("UpdateWorkQueueById", id=legacy["id"], name="only-there"))["name"] == "only-there"
    assert (await broker.ok_qry("GetLegacyWorkQueue", name="only-there"))["id"] == legacy["id"]
    assert err(await broker.cmd("UpdateWorkQueueById", id="00000000-0000-0000-0000-000000000001", priority=1))[0] == "not_found"
    # delete by id; then gone from every read
    await broker.ok_cmd("DeleteWorkQueueById", id=legacy["id"])
    assert err(await broker.qry("GetLegacyWorkQueue", name="only-there"))[0] == "not_found"
    assert await layout(broker, "default-agent-pool") == {"default": 1}


async def test_legacy_create_with_a_priority_and_after_the_pool_is_gone(broker):
    # the pool is created and the queue placed with PR-1 in one step
    q = await broker.ok_cmd("CreateLegacyWorkQueue", name="urgent", priority=1)
    assert (q["priority"], q["work_pool_name"]) == (1, "default-agent-pool")
    assert await layout(broker, "default-agent-pool") == {"urgent": 1, "default": 2}
    # default-agent-pool is not reserved: it can be deleted, and the legacy API makes it again
    old = await broker.ok_qry("GetWorkPool", name="default-agent-pool")
    await broker.ok_cmd("DeleteWorkPool", name="default-agent-pool")
    assert err(await broker.qry("GetLegacyWorkQueue", name="urgent"))[0] == "not_found"
    again = await broker.cmd("CreateLegacyWorkQueue", name="default")
    assert again["ok"] and again["result"]["work_pool_id"] != old["id"]
    pool = await broker.ok_qry("GetWorkPool", name="default-agent-pool")
    assert again["result"]["id"] == pool["default_queue_id"]
    assert await layout(broker, "default-agent-pool") == {"default": 1}


# ---------------------------------------------------------------------------------------------
# WQ-13


HEALTH_CHECK_POLICY = {"maximum_late_runs": 0, "maximum_seconds_since_last_polled": 60}


async def test_wq13_queue_health_query_exists(broker):
    q = await broker.ok_cmd("CreateLegacyWorkQueue", name="h")
    reply = await broker.qry("GetWorkQueueStatus", id=q["id"])
    assert reply["ok"], reply
    assert reply["result"] == {"healthy": False, "late_runs_count": 0, "last_polled": None,  # never polled
                               "health_check_policy": HEALTH_CHECK_POLICY}


async def test_wq13_healthy_once_polled_and_unhealthy_with_a_late_run_or_a_stale_poll(broker):
    q = await broker.ok_cmd("CreateLegacyWorkQueue", name="h")
    other = await broker.ok_cmd("CreateLegacyWorkQueue", name="other")
    await broker.ok_qry("GetLegacyQueueRuns", id=q["id"])  # a worker's poll, recorded just after

    async def status(queue_id: str) -> dict:
        return await broker.ok_qry("GetWorkQueueStatus", id=queue_id)

    deadline = asyncio.get_running_loop().time() + 5
    while not (health := await status(q["id"]))["healthy"] and asyncio.get_running_loop().time() < deadline:
        await asyncio.sleep(0.05)
    polled = (await broker.ok_qry("GetWorkQueueById", id=q["id"]))["last_polled"]
    assert polled is not None
    assert health == {"healthy": True, "late_runs_count": 0, "last_polled": polled,
                      "health_check_policy": HEALTH_CHECK_POLICY}
    # Late runs count by state name, in this queue only.
    flow_id = (await broker.ok_cmd("CreateFlow", name="etl"))["id"]
    now = datetime.now(UTC)

    async def run(queue: str, name: str) -> None:
        state = {"type": "SCHEDULED", "name": name, "state_details": {"scheduled_time": now.isoformat()}}
        await broker.ok_cmd("CreateFlowRun", flow_id=flow_id, work_pool_name="default-agent-pool",
                            work_queue_name=queue, state=state)

    await run("h", "Scheduled")
    await run("other", "Late")
    assert (await status(q["id"]))["healthy"] is True
    await run("h", "Late")
    await run("h", "Late")
    assert await status(q["id"]) == {"healthy": False, "late_runs_count": 2, "last_polled": polled,
                                     "health_check_policy": HEALTH_CHECK_POLICY}
    # Polled more than 60 s ago: unhealthy, with no Late run.
    stale = json_time(datetime.now(UTC) - timedelta(seconds=90))
    stale_queue = await broker.ok_cmd("CreateLegacyWorkQueue", name="stale")
    await broker.ok_cmd("UpdateWorkQueueById", id=stale_queue["id"], last_polled=stale)
    assert await status(stale_queue["id"]) == {"healthy": False, "late_runs_count": 0, "last_polled": stale,
                                               "health_check_policy": HEALTH_CHECK_POLICY}
    assert (await status(other["id"]))["late_runs_count"] == 1
    missing = await broker.qry("GetWorkQueueStatus", id="00000000-0000-0000-0000-000000000001")
    assert err(missing) == ("not_found", "Work queue with id 00000000-0000-0000-0000-000000000001 not found")
