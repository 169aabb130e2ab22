"""Commands addressed by a queue's id find its pool from the log, never from the read model:
they work with no projection running at all, in a process that has just started, and for a
queue made a moment ago by another process."""

from __future__ import annotations

import time
import uuid

from runledger.handlers.service import Service
from runledger.infra.nats_connection import connect
from tests.integration.broker import Broker


async def test_queue_ids_resolve_from_the_log_with_no_read_model(writer, settings):
    """`writer` takes commands and projects nothing: the read model stays empty."""
    _, broker = writer
    pool = await broker.ok_cmd("CreateWorkPool", name="p", type="process")
    queue = await broker.ok_cmd("CreateWorkQueue", work_pool_name="p", name="q")
    moved = await broker.ok_cmd("UpdateWorkQueueById", id=queue["id"], description="by id")
    assert moved["description"] == "by id" and moved["work_pool_name"] == "p"
    default = await broker.ok_cmd("UpdateWorkQueueById", id=pool["default_queue_id"], priority=5)
    assert default["name"] == "default" and default["priority"] == 5

    # A second command process, started after them, and a queue it did not make.
    other = Service(settings, roles=frozenset({"commands"}))
    await other.start()
    try:
        newer = await broker.ok_cmd("CreateWorkQueue", work_pool_name="p", name="newer")
        for target in (queue["id"], newer["id"]):
            reply = await other.commands.execute("UpdateWorkQueueById", f'{{"id": "{target}", "is_paused": true}}'.encode())
            assert reply["ok"] and reply["result"]["is_paused"] is True, reply
        started = time.perf_counter()
        missing = await other.commands.execute("DeleteWorkQueueById", f'{{"id": "{uuid.uuid4()}"}}'.encode())
        assert missing["error"]["code"] == "not_found"
        assert time.perf_counter() - started < 1.0  # a miss reads only what is new: no read-model wait
    finally:
        await other.stop()

    await broker.ok_cmd("DeleteWorkQueueById", id=newer["id"])
    gone = await broker.cmd("UpdateWorkQueueById", id=newer["id"], description="x")
    assert gone["error"]["code"] == "not_found"


async def test_a_queue_of_a_deleted_pool_is_not_found_by_id(writer, settings):
    _, broker = writer
    await broker.ok_cmd("CreateWorkPool", name="doomed", type="process")
    queue = await broker.ok_cmd("CreateWorkQueue", work_pool_name="doomed", name="q")
    await broker.ok_cmd("DeleteWorkPool", name="doomed")
    reply = await broker.cmd("UpdateWorkQueueById", id=queue["id"], description="x")
    assert reply["error"]["code"] == "not_found"
    nc = await connect(settings)
    try:
        # A pool of the same name later holds other queues; the old id stays unknown.
        await Broker(nc, settings).ok_cmd("CreateWorkPool", name="doomed", type="process")
        reply = await Broker(nc, settings).cmd("DeleteWorkQueueById", id=queue["id"])
        assert reply["error"]["code"] == "not_found"
    finally:
        await nc.close()
