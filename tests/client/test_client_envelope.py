"""The client against a fake service on a real nats-server: what it sends (only the fields given,
read-your-writes `min_seq`), how it reads replies, and how every error becomes a typed exception."""

from __future__ import annotations

import json
import time
import uuid
from datetime import UTC, datetime

import nats
import pytest

from runledger.client import (
    Conflict,
    Forbidden,
    Invalid,
    NotFound,
    ProtocolError,
    RunledgerClient,
    RunledgerError,
    Unavailable,
    WorkPool,
    WorkQueue,
)
from runledger.infra.settings import Settings

from .fake_service import SILENT, sample_pool, sample_queue


@pytest.fixture
async def rl(fake, client_settings):
    async with RunledgerClient(client_settings) as client:
        yield client


async def test_create_sends_only_given_fields_and_returns_the_pool(rl, fake):
    fake.ok("CreateWorkPool", sample_pool("etl", type="process", concurrency_limit=5), seq=7, created=True)
    pool = await rl.create_work_pool("etl", type="process", concurrency_limit=5)
    assert fake.bodies("CreateWorkPool") == [{"name": "etl", "type": "process", "concurrency_limit": 5}]
    assert isinstance(pool, WorkPool)
    assert (pool.name, pool.type, pool.concurrency_limit, pool.status) == ("etl", "process", 5, "NOT_READY")
    assert rl.last_seq == 7


async def test_models_dump_back_to_the_reply_json(rl, fake):
    raw_pool = sample_pool("etl", type="process", concurrency_limit=2)
    raw_queue = sample_queue("urgent", priority=1)
    fake.ok("GetWorkPool", raw_pool)
    fake.ok("GetWorkQueue", raw_queue)
    assert (await rl.read_work_pool("etl")).model_dump(mode="json") == raw_pool
    assert (await rl.read_work_queue("etl", "urgent")).model_dump(mode="json") == raw_queue


async def test_unknown_reply_fields_are_kept(rl, fake):
    fake.ok("GetWorkPool", {**sample_pool(), "worker_count": 3})
    pool = await rl.read_work_pool("etl")
    assert pool.model_extra == {"worker_count": 3}
    assert pool.model_dump(mode="json")["worker_count"] == 3


async def test_update_sends_explicit_null_and_leaves_out_the_rest(rl, fake):
    fake.ok("UpdateWorkPool", sample_pool(), seq=3)
    await rl.update_work_pool("etl", concurrency_limit=None, idempotency_key="k1")
    assert fake.bodies("UpdateWorkPool") == [{"name": "etl", "concurrency_limit": None, "idempotency_key": "k1"}]


async def test_values_are_sent_unvalidated_so_the_service_judges(rl, fake):
    fake.error("UpdateWorkQueue", "invalid", "concurrency_limit: Input should be greater than or equal to 0",
               field="concurrency_limit", details=[{"field": "concurrency_limit", "reason": "..."}])
    with pytest.raises(Invalid) as caught:
        await rl.update_work_queue("etl", "q", concurrency_limit=-5, last_polled=datetime(2025, 1, 1, tzinfo=UTC))
    assert fake.bodies("UpdateWorkQueue") == [{
        "work_pool_name": "etl", "work_queue_name": "q", "concurrency_limit": -5,
        "last_polled": "2025-01-01T00:00:00+00:00",
    }]
    assert caught.value.field == "concurrency_limit"
    assert caught.value.details == [{"field": "concurrency_limit", "reason": "..."}]


async def test_a_value_json_cannot_carry_is_invalid_naming_the_field(rl, fake):
    with pytest.raises(Invalid) as caught:
        await rl.create_work_pool("etl", base_job_template={"x": object()})
    assert caught.value.field == "base_job_template"
    assert fake.requests == []


@pytest.mark.parametrize(
    ("code", "cls"),
    [("not_found", NotFound), ("conflict", Conflict), ("invalid", Invalid), ("forbidden", Forbidden),
     ("unavailable", Unavailable)],
)
async def test_error_codes_map_to_typed_errors(rl, fake, code, cls):
    fake.error("DeleteWorkPool", code, "the message", field="name", details={"why": 1})
    with pytest.raises(cls) as caught:
        await rl.delete_work_pool("etl")
    error = caught.value
    assert type(error) is cls
    assert (error.code, error.message, error.field, error.details) == (code, "the message", "name", {"why": 1})
    assert str(error) == "the message"


async def test_forbidden_is_a_kind_of_invalid(rl, fake):
    fake.error("CreateWorkPool", "forbidden", "Work pools starting with 'Prefect' are reserved for internal use.")
    with pytest.raises(Invalid):
        await rl.create_work_pool("prefect-pool")


async def test_not_found_message_is_the_services(rl, fake):
    fake.error("GetWorkPool", "not_found", 'Work pool "nope" not found.')
    with pytest.raises(NotFound, match='Work pool "nope" not found.') as caught:
        await rl.read_work_pool("nope")
    assert caught.value.field is None and caught.value.details is None


async def test_an_unknown_error_code_keeps_the_base_class_and_code(rl, fake):
    fake.error("GetWorkPool", "rejected", "transition refused")
    with pytest.raises(RunledgerError) as caught:
        await rl.read_work_pool("etl")
    assert type(caught.value) is RunledgerError
    assert caught.value.code == "rejected"


@pytest.mark.parametrize(
    "reply",
    [b"not json", b"[1, 2]", json.dumps({"result": 1}).encode(), json.dumps({"ok": False, "error": "boom"}).encode(),
     json.dumps({"ok": True, "result": {"name": "etl"}}).encode(),  # not a work pool
     json.dumps({"ok": True, "result": None, "seq": "7"}).encode()],
)
async def test_replies_that_are_not_envelopes_raise_protocol_error(rl, fake, reply):
    fake.replies["GetWorkPool"] = reply
    with pytest.raises(ProtocolError):
        await rl.read_work_pool("etl")


async def test_reads_carry_the_last_command_seq(rl, fake):
    fake.ok("GetWorkPool", sample_pool())
    await rl.read_work_pool("etl")
    assert "min_seq" not in fake.bodies("GetWorkPool")[-1]  # nothing written yet

    fake.ok("CreateWorkPool", sample_pool(), seq=41)
    await rl.create_work_pool("etl")
    await rl.read_work_pool("etl")
    assert fake.bodies("GetWorkPool")[-1] == {"name": "etl", "min_seq": 41}

    fake.ok("UpdateWorkPool", sample_pool(), seq=None)  # a no-op may carry no sequence
    await rl.update_work_pool("etl", description="x")
    fake.ok("DeleteWorkQueue", None, seq=40)  # never go backwards
    await rl.delete_work_queue("etl", "q")
    assert rl.last_seq == 41

    await rl.read_work_pool("etl", min_seq=3)  # an explicit min_seq wins
    assert fake.bodies("GetWorkPool")[-1]["min_seq"] == 3


async def test_consistent_reads_off_sends_no_min_seq(fake, client_settings):
    fake.ok("CreateWorkPool", sample_pool(), seq=5)
    fake.ok("CountWorkPools", 1)
    async with RunledgerClient(client_settings, consistent_reads=False) as rl:
        await rl.create_work_pool("etl")
        assert await rl.count_work_pools() == 1
    assert fake.bodies("CountWorkPools") == [{}]


async def test_lists_counts_and_filters(rl, fake):
    pools = [sample_pool("a"), sample_pool("b")]
    fake.ok("ListWorkPools", pools)
    fake.ok("CountWorkPools", 2)
    pool_id = uuid.uuid4()
    listed = await rl.list_work_pools(names=["a", "b"], ids=[pool_id], types=["process"], limit=10, offset=5)
    assert [p.name for p in listed] == ["a", "b"]
    assert fake.bodies("ListWorkPools") == [{
        "limit": 10, "offset": 5,
        "work_pools": {"id": {"any_": [str(pool_id)]}, "name": {"any_": ["a", "b"]}, "type": {"any_": ["process"]}},
    }]
    assert await rl.count_work_pools(types=["process"]) == 2
    assert fake.bodies("CountWorkPools") == [{"work_pools": {"type": {"any_": ["process"]}}}]


async def test_a_count_that_is_not_an_int_is_a_protocol_error(rl, fake):
    fake.ok("CountWorkQueues", True)
    with pytest.raises(ProtocolError):
        await rl.count_work_queues("etl")


async def test_work_queue_calls(rl, fake):
    q = sample_queue("urgent", priority=1)
    default = sample_queue("default")
    fake.ok("CreateWorkQueue", q, seq=10, created=True)
    fake.ok("ListWorkQueues", [q, default])
    fake.ok("CountWorkQueues", 2)
    fake.ok("SetWorkQueuePriorities", [q, default], seq=11)
    fake.ok("DeleteWorkQueue", None, seq=12)

    created = await rl.create_work_queue("etl", "urgent", priority=1, is_paused=True)
    assert isinstance(created, WorkQueue) and created.work_pool_name == "etl" and created.priority == 1
    assert fake.bodies("CreateWorkQueue") == [{"work_pool_name": "etl", "name": "urgent", "is_paused": True,
                                               "priority": 1}]
    listed = await rl.list_work_queues("etl", names=["urgent"])
    assert [x.name for x in listed] == ["urgent", "default"]
    assert fake.bodies("ListWorkQueues") == [{"work_pool_name": "etl", "work_queues": {"name": {"any_": ["urgent"]}},
                                              "min_seq": 10}]
    assert await rl.count_work_queues("etl") == 2
    ordered = await rl.set_work_queue_priorities("etl", {"urgent": 1, "default": 2})
    assert [x.name for x in ordered] == ["urgent", "default"]
    assert fake.bodies("SetWorkQueuePriorities") == [{"work_pool_name": "etl",
                                                      "priorities": {"urgent": 1, "default": 2}}]
    assert await rl.delete_work_queue("etl", "urgent") is None
    assert rl.last_seq == 12


async def test_legacy_work_queue_calls(rl, fake):
    q = sample_queue("old", pool_name="default-agent-pool")
    queue_id = uuid.UUID(q["id"])
    for name in ("CreateLegacyWorkQueue", "UpdateWorkQueueById", "GetWorkQueueById", "GetLegacyWorkQueue"):
        fake.ok(name, q)
    fake.ok("ListAllWorkQueues", [q])
    fake.ok("DeleteWorkQueueById", None)

    assert (await rl.create_legacy_work_queue("old", description="")).work_pool_name == "default-agent-pool"
    await rl.update_work_queue_by_id(queue_id, priority=7)
    assert (await rl.read_work_queue_by_id(queue_id)).id == queue_id
    assert (await rl.read_legacy_work_queue("old")).name == "old"
    assert len(await rl.list_all_work_queues(limit=1)) == 1
    await rl.delete_work_queue_by_id(str(queue_id))

    assert fake.bodies("CreateLegacyWorkQueue") == [{"name": "old", "description": ""}]
    assert fake.bodies("UpdateWorkQueueById") == [{"id": str(queue_id), "priority": 7}]
    assert fake.bodies("GetWorkQueueById") == [{"id": str(queue_id)}]
    assert fake.bodies("ListAllWorkQueues") == [{"limit": 1}]
    assert fake.bodies("DeleteWorkQueueById") == [{"id": str(queue_id)}]


async def test_work_queue_status(rl, fake):
    queue_id = uuid.uuid4()
    polled = "2026-03-01T12:00:00.123456Z"  # as the service writes a time
    raw = {"healthy": True, "late_runs_count": 0, "last_polled": polled,
           "health_check_policy": {"maximum_late_runs": 0, "maximum_seconds_since_last_polled": 60}}
    fake.ok("GetWorkQueueStatus", raw)
    health = await rl.read_work_queue_status(queue_id)
    assert health.healthy and health.late_runs_count == 0
    assert health.health_check_policy.maximum_seconds_since_last_polled == 60
    assert health.model_dump(mode="json") == raw
    assert fake.bodies("GetWorkQueueStatus") == [{"id": str(queue_id)}]


async def test_no_responder_is_unavailable_naming_subject_and_safe_url(nats_url, namespace):
    # Credentials in the URL are accepted by an auth-less server; they must never be printed.
    url = nats_url.replace("nats://", "nats://bob:s3cret@")
    async with RunledgerClient(Settings(nats_url=url, namespace=namespace)) as rl:
        with pytest.raises(Unavailable) as caught:
            await rl.read_work_pool("etl")
    message = str(caught.value)
    assert f"{namespace}.qry.GetWorkPool" in message
    assert "bob:***@127.0.0.1" in message and "s3cret" not in message
    assert caught.value.code == "unavailable"


async def test_no_reply_in_time_is_unavailable(fake, nats_url, namespace):
    fake.replies["DeleteWorkPool"] = SILENT
    settings = Settings(nats_url=nats_url, namespace=namespace, request_timeout=0.3)
    async with RunledgerClient(settings) as rl:
        with pytest.raises(Unavailable, match=f"no reply on {namespace}.cmd.DeleteWorkPool"):
            await rl.delete_work_pool("etl")


async def test_no_broker_is_unavailable_without_hanging(namespace):
    settings = Settings(nats_url="nats://127.0.0.1:1", namespace=namespace, request_timeout=0.5)
    started = time.monotonic()
    with pytest.raises(Unavailable, match="127.0.0.1:1"):
        async with RunledgerClient(settings):
            pass
    assert time.monotonic() - started < 5


async def test_from_nats_reuses_and_leaves_open_the_callers_connection(fake, nats_url, client_settings):
    fake.ok("CountWorkPools", 0)
    nc = await nats.connect(nats_url)
    try:
        async with RunledgerClient.from_nats(nc, client_settings) as rl:
            assert await rl.count_work_pools() == 0
        assert nc.is_connected
    finally:
        await nc.close()


async def test_a_client_that_is_not_connected_says_so(client_settings):
    with pytest.raises(RuntimeError, match="not connected"):
        await RunledgerClient(client_settings).read_work_pool("etl")
