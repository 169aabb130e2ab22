"""Uniqueness and no lost updates when many clients race, served by two service instances
(each with its own aggregate cache), so the guarantees come from the log, not from a lock."""

from __future__ import annotations

import asyncio
import json
import random

from runledger.commands import work_pools as wp
from runledger.infra.nats_connection import connect


async def _cmd(nc, settings, name, body):
    reply = await nc.request(settings.command_subject(name), json.dumps(body).encode(), timeout=20)
    return json.loads(reply.data)


async def test_fifty_concurrent_creates_of_one_pool_name(broker, settings, second_instance):
    nc = await connect(settings)
    try:
        replies = await asyncio.gather(*(
            _cmd(nc, settings, "CreateWorkPool", {"name": "race", "type": "process", "description": f"#{i}"})
            for i in range(50)
        ))
    finally:
        await nc.close()
    wins = [r for r in replies if r["ok"]]
    losses = [r for r in replies if not r["ok"]]
    assert len(wins) == 1
    assert {r["error"]["code"] for r in losses} == {"conflict"}
    assert all(r["error"]["message"] == "A work pool with this name already exists." for r in losses)
    broker.last_seq = wins[0]["seq"]
    pools = await broker.ok_qry("ListWorkPools", work_pools={"name": {"any_": ["race"]}})
    assert [p["id"] for p in pools] == [wins[0]["result"]["id"]]
    assert pools[0]["description"] == wins[0]["result"]["description"]


async def test_fifty_concurrent_queue_creates_with_priorities(broker, settings, second_instance):
    await broker.ok_cmd("CreateWorkPool", name="busy", type="process")
    rng = random.Random(7)
    wanted = {f"q{i:02d}": rng.randint(1, 60) for i in range(50)}
    nc = await connect(settings)
    try:
        replies = await asyncio.gather(*(
            _cmd(nc, settings, "CreateWorkQueue", {"work_pool_name": "busy", "name": n, "priority": p})
            for n, p in wanted.items()
        ))
    finally:
        await nc.close()
    assert all(r["ok"] for r in replies), [r for r in replies if not r["ok"]][:3]
    broker.last_seq = max(r["seq"] for r in replies)
    queues = await broker.ok_qry("ListWorkQueues", work_pool_name="busy")
    names = [q["name"] for q in queues]
    assert sorted(names) == sorted([*wanted, "default"])  # none lost, none duplicated
    assert len({q["id"] for q in queues}) == 51
    priorities = [q["priority"] for q in queues]
    assert priorities == sorted(priorities)
    # The read model agrees with the write model folded from the log.
    pool_id = queues[0]["work_pool_id"]
    state = None
    for stored in await second_instance.store.read_aggregate(wp.WORK_POOL, pool_id):
        state = wp.evolve(state, stored.envelope.decode())
    assert {q.name: q.priority for q in state.queues.values()} == {q["name"]: q["priority"] for q in queues}
