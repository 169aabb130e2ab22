"""Workers, the pool poll and the foreman against real NATS and Postgres: heartbeats and the
pool's status (WK-1, WK-2), listing and deleting workers (WK-5, WK-6), the pool poll with
every case of the worked example (GS-1..GS-7), what a poll records (GS-9, ST-2, ST-3), the
legacy queue poll (LQ-1, LQ-2, LQ-4), and the foreman's transitions (WK-3, WK-4, ST-2..ST-4)
with a fake clock."""

from __future__ import annotations

import asyncio
import uuid
from datetime import UTC, datetime, timedelta

import pytest

from runledger.handlers.background import CommandSender
from runledger.handlers.foreman import Foreman

from .broker import foreman_clock

HOUR = timedelta(hours=1)


async def _eventually(check, timeout: float = 5.0):
    """The value of `check()` once it is truthy (a poll is recorded in the background)."""
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        value = await check()
        if value or asyncio.get_running_loop().time() > deadline:
            return value
        await asyncio.sleep(0.05)


# ---------------------------------------------------------------------------------------------
# Heartbeats and workers


async def test_three_heartbeats_make_one_online_worker_and_a_ready_pool(broker):
    await broker.ok_cmd("CreateWorkPool", name="p", type="process")
    assert (await broker.ok_qry("GetWorkPool", name="p"))["status"] == "NOT_READY"
    first = await broker.ok_cmd("WorkerHeartbeat", work_pool_name="p", name="w1", heartbeat_interval_seconds=20)
    await broker.ok_cmd("WorkerHeartbeat", work_pool_name="p", name="w1")
    last = await broker.ok_cmd("WorkerHeartbeat", work_pool_name="p", name="w1")
    assert first["id"] == last["id"] and last["status"] == "ONLINE"
    assert last["heartbeat_interval_seconds"] == 20  # an absent interval keeps the one given before
    workers = await broker.ok_qry("ListWorkers", work_pool_name="p")
    assert [(w["name"], w["status"]) for w in workers] == [("w1", "ONLINE")]
    assert workers[0]["last_heartbeat_time"] == last["last_heartbeat_time"]
    assert (await broker.ok_qry("GetWorkPool", name="p"))["status"] == "READY"


async def test_a_heartbeat_leaves_a_paused_pool_paused(broker):
    await broker.ok_cmd("CreateWorkPool", name="p", type="process", is_paused=True)
    w = await broker.ok_cmd("WorkerHeartbeat", work_pool_name="p", name="w1")
    assert w["status"] == "ONLINE"
    assert (await broker.ok_qry("GetWorkPool", name="p"))["status"] == "PAUSED"
    # Resumed with an online worker: READY (WP-8 reads the pool's online workers).
    await broker.ok_cmd("UpdateWorkPool", name="p", is_paused=False)
    assert (await broker.ok_qry("GetWorkPool", name="p"))["status"] == "READY"


async def test_heartbeat_errors_append_nothing(broker):
    await broker.ok_cmd("CreateWorkPool", name="p", type="process")
    before = await broker.stream_messages()
    missing = await broker.cmd("WorkerHeartbeat", work_pool_name="nope", name="w1")
    assert missing["error"]["code"] == "not_found" and missing["error"]["message"] == 'Work pool "nope" not found.'
    for body in ({"work_pool_name": "p"}, {"work_pool_name": "p", "name": "w", "heartbeat_interval_seconds": -1},
                 {"work_pool_name": "p", "name": "w", "heartbeat_interval_seconds": "30"},
                 {"work_pool_name": "p", "name": "w", "extra": 1}):
        reply = await broker.cmd("WorkerHeartbeat", **body)
        assert reply["error"]["code"] == "invalid", body
    assert await broker.stream_messages() == before


async def test_list_workers_newest_heartbeat_first_with_filters(broker):
    await broker.ok_cmd("CreateWorkPool", name="p", type="process")
    await broker.ok_cmd("CreateWorkPool", name="other", type="process")
    beats = {}
    for name in ("a", "b", "c"):
        beats[name] = (await broker.ok_cmd("WorkerHeartbeat", work_pool_name="p", name=name))["last_heartbeat_time"]
    await broker.ok_cmd("WorkerHeartbeat", work_pool_name="other", name="x")
    names = [w["name"] for w in await broker.ok_qry("ListWorkers", work_pool_name="p")]
    assert names == ["c", "b", "a"]
    assert [w["name"] for w in await broker.ok_qry("ListWorkers", work_pool_name="p", limit=1, offset=1)] == ["b"]
    after_b = await broker.ok_qry("ListWorkers", work_pool_name="p", workers={"last_heartbeat_time": {"after_": beats["b"]}})
    assert [w["name"] for w in after_b] == ["c", "b"]
    before_b = await broker.ok_qry("ListWorkers", work_pool_name="p",
                                   workers={"last_heartbeat_time": {"before_": beats["b"]}})
    assert [w["name"] for w in before_b] == ["b", "a"]
    offline = await broker.ok_qry("ListWorkers", work_pool_name="p", workers={"status": {"any_": ["OFFLINE"]}})
    assert offline == []
    assert (await broker.qry("ListWorkers", work_pool_name="nope"))["error"]["code"] == "not_found"
    assert (await broker.qry("ListWorkers", work_pool_name="p", limit=201))["error"]["code"] == "invalid"
    assert (await broker.qry("ListWorkers", work_pool_name="p", workers={"status": {"any_": ["GONE"]}}))["error"]["code"] == "invalid"


async def test_delete_worker(broker):
    await broker.ok_cmd("CreateWorkPool", name="p", type="process")
    await broker.ok_cmd("WorkerHeartbeat", work_pool_name="p", name="w1")
    assert (await broker.cmd("DeleteWorker", work_pool_name="nope", name="w1"))["error"]["code"] == "not_found"
    gone = await broker.cmd("DeleteWorker", work_pool_name="p", name="w2")
    assert gone["error"] == {"code": "not_found", "message": "Worker not found."}
    await broker.ok_cmd("DeleteWorker", work_pool_name="p", name="w1")
    assert await broker.ok_qry("ListWorkers", work_pool_name="p") == []
    assert (await broker.qry("GetWorker", work_pool_name="p", name="w1"))["error"]["code"] == "not_found"
    again = await broker.ok_cmd("WorkerHeartbeat", work_pool_name="p", name="w1")  # comes back on its next beat
    assert again["status"] == "ONLINE"


# ---------------------------------------------------------------------------------------------
# The pool poll: GS-7, case by case


async def _run(broker, flow_id: str, queue: str, state: dict, pool: str = "p", **fields) -> str:
    return (await broker.ok_cmd("CreateFlowRun", flow_id=flow_id, work_pool_name=pool, work_queue_name=queue,
                                state=state, **fields))["id"]


def _scheduled(at: datetime, name: str | None = None) -> dict:
    state = {"type": "SCHEDULED", "state_details": {"scheduled_time": at.isoformat()}}
    if name:
        state["name"] = name
    return state


@pytest.fixture
async def gs7(broker):
    """Pool `p` with default(1), AA(2), AB(3), AC(4); each of AA/AB/AC holds 1 Running,
    1 Pending and 5 Scheduled runs at now-1h, now, +1h, +2h, +3h."""
    await broker.ok_cmd("CreateWorkPool", name="p", type="process")
    flow_id = (await broker.ok_cmd("CreateFlow", name="etl"))["id"]
    now = datetime.now(UTC)
    runs: dict[str, list[str]] = {}
    for queue in ("AA", "AB", "AC"):
        await broker.ok_cmd("CreateWorkQueue", work_pool_name="p", name=queue)
        await _run(broker, flow_id, queue, {"type": "RUNNING"})
        await _run(broker, flow_id, queue, {"type": "PENDING"})
        runs[queue] = [await _run(broker, flow_id, queue, _scheduled(now + k * HOUR)) for k in range(-1, 4)]
    queues = await broker.ok_qry("ListWorkQueues", work_pool_name="p")
    assert [(q["name"], q["priority"]) for q in queues] == [("default", 1), ("AA", 2), ("AB", 3), ("AC", 4)]
    return runs


async def _poll(broker, **body) -> list[dict]:
    return await broker.ok_qry("GetScheduledFlowRuns", work_pool_name="p", **body)


def _t(value: str) -> datetime:
    return datetime.fromisoformat(value)


def _ids(items: list[dict]) -> list[str]:
    return [i["flow_run"]["id"] for i in items]


async def test_gs7_poll_everything_and_limits(broker, gs7):
    everything = await _poll(broker)
    assert _ids(everything) == gs7["AA"] + gs7["AB"] + gs7["AC"]  # 15: AA's five in time order, AB's, AC's
    pool = await broker.ok_qry("GetWorkPool", name="p")
    queues = {q["name"]: q["id"] for q in await broker.ok_qry("ListWorkQueues", work_pool_name="p")}
    first = everything[0]
    assert first["work_pool_id"] == pool["id"] and first["work_queue_id"] == queues["AA"]
    assert first["flow_run"]["state_type"] == "SCHEDULED" and first["flow_run"]["work_pool_name"] == "p"
    assert _ids(await _poll(broker, limit=7)) == gs7["AA"] + gs7["AB"][:2]
    assert await _poll(broker, limit=0) == []


async def test_gs7_named_queues(broker, gs7):
    assert _ids(await _poll(broker, work_queue_names=["AA"])) == gs7["AA"]
    assert _ids(await _poll(broker, work_queue_names=["AA", "AB"])) == gs7["AA"] + gs7["AB"]
    assert _ids(await _poll(broker, work_queue_names=[])) == gs7["AA"] + gs7["AB"] + gs7["AC"]


async def test_gs7_time_bounds(broker, gs7):
    now = datetime.now(UTC)  # after the runs' "now": the run at "now" is before it
    assert len(await _poll(broker, scheduled_before=now.isoformat())) == 6
    assert len(await _poll(broker, scheduled_after=now.isoformat())) == 9
    assert await _poll(broker, scheduled_before=(now - HOUR).isoformat(), scheduled_after=now.isoformat()) == []


@pytest.mark.parametrize(("limit", "expected"), [(10, 5), (5, 3), (2, 0)])
async def test_gs7_queue_concurrency_limit(broker, gs7, limit, expected):
    await broker.ok_cmd("UpdateWorkQueue", work_pool_name="p", work_queue_name="AA", concurrency_limit=limit)
    assert _ids(await _poll(broker, work_queue_names=["AA"])) == gs7["AA"][:expected]


@pytest.mark.parametrize(("limit", "whole_pool", "only_aa"), [(25, 15, None), (16, 10, None), (7, 1, 1), (2, 0, 0),
                                                              (20, None, 5), (10, None, 4)])
async def test_gs7_pool_concurrency_limit(broker, gs7, limit, whole_pool, only_aa):
    await broker.ok_cmd("UpdateWorkPool", name="p", concurrency_limit=limit)
    everything = gs7["AA"] + gs7["AB"] + gs7["AC"]
    if whole_pool is not None:  # filled from the highest-priority queue first
        assert _ids(await _poll(broker)) == everything[:whole_pool]
    if only_aa is not None:
        assert _ids(await _poll(broker, work_queue_names=["AA"])) == gs7["AA"][:only_aa]


async def test_gs7_paused_queue(broker, gs7):
    await broker.ok_cmd("UpdateWorkQueue", work_pool_name="p", work_queue_name="AA", is_paused=True)
    assert await _poll(broker, work_queue_names=["AA"]) == []
    assert _ids(await _poll(broker)) == gs7["AB"] + gs7["AC"]


async def test_a_paused_pool_yields_nothing(broker, gs7):
    await broker.ok_cmd("UpdateWorkPool", name="p", is_paused=True)
    assert await _poll(broker) == []


async def test_sl4_quirk_runs_in_a_paused_queue_leave_the_pools_slots_to_the_poll(broker):
    """Postgres's Prefect: a pool's free slots for a poll count the runs of its unpaused queues
    only, while its `active_slots` counts every queue's."""
    await broker.ok_cmd("CreateWorkPool", name="p", type="process", concurrency_limit=3)
    for queue in ("a", "b"):
        await broker.ok_cmd("CreateWorkQueue", work_pool_name="p", name=queue)
    flow_id = (await broker.ok_cmd("CreateFlow", name="etl"))["id"]
    for _ in range(2):
        await _run(broker, flow_id, "a", {"type": "RUNNING"})
    now = datetime.now(UTC)
    scheduled = [await _run(broker, flow_id, "b", _scheduled(now + k * HOUR)) for k in range(3)]
    assert _ids(await _poll(broker)) == scheduled[:1]
    await broker.ok_cmd("UpdateWorkQueue", work_pool_name="p", work_queue_name="a", is_paused=True)
    assert _ids(await _poll(broker)) == scheduled
    assert (await broker.ok_qry("GetWorkPool", name="p"))["active_slots"] == 2


async def test_poll_resolution_errors(broker, gs7):
    await broker.ok_cmd("CreateWorkPool", name="other", type="process")
    await broker.ok_cmd("CreateWorkQueue", work_pool_name="other", name="elsewhere")
    missing = await broker.qry("GetScheduledFlowRuns", work_pool_name="nope")
    assert missing["error"] == {"code": "not_found", "message": 'Work pool "nope" not found.'}
    foreign = await broker.qry("GetScheduledFlowRuns", work_pool_name="p", work_queue_names=["AA", "elsewhere"])
    assert foreign["error"] == {"code": "not_found", "message": "Work pool queue 'p/elsewhere' not found."}
    for body in ({"limit": -1}, {"limit": 201}, {"scheduled_before": "yesterday"}, {"work_queue_names": "AA"},
                 {"extra": True}):
        reply = await broker.qry("GetScheduledFlowRuns", work_pool_name="p", **body)
        assert reply["error"]["code"] == "invalid", body


async def test_eligibility_excludes_in_process_retries_and_includes_late(broker):
    await broker.ok_cmd("CreateWorkPool", name="p", type="process")
    flow_id = (await broker.ok_cmd("CreateFlow", name="etl"))["id"]
    now = datetime.now(UTC)
    late = await _run(broker, flow_id, "default", _scheduled(now - 2 * HOUR, "Late"))
    waiting = await _run(broker, flow_id, "default", _scheduled(now - HOUR, "AwaitingRetry"))
    await _run(broker, flow_id, "default", _scheduled(now), empirical_policy={"retry_type": "in_process"})
    rescheduled = await _run(broker, flow_id, "default", _scheduled(now + HOUR),
                             empirical_policy={"retry_type": "reschedule"})
    await _run(broker, flow_id, "default", {"type": "COMPLETED"})
    await broker.ok_cmd("CreateFlowRun", flow_id=flow_id, state=_scheduled(now))  # in no queue
    assert _ids(await _poll(broker)) == [late, waiting, rescheduled]


async def test_run_priority_orders_runs_within_a_queue_before_their_time(broker):
    await broker.ok_cmd("CreateWorkPool", name="p", type="process")
    await broker.ok_cmd("CreateWorkQueue", work_pool_name="p", name="low")
    flow_id = (await broker.ok_cmd("CreateFlow", name="etl"))["id"]
    now = datetime.now(UTC)
    early = await _run(broker, flow_id, "default", _scheduled(now - HOUR))
    urgent = await _run(broker, flow_id, "default", _scheduled(now), priority=-5)
    later = await _run(broker, flow_id, "default", _scheduled(now + HOUR))
    other_queue = await _run(broker, flow_id, "low", _scheduled(now - 2 * HOUR), priority=-100)
    assert _ids(await _poll(broker)) == [urgent, early, later, other_queue]  # queue priority first
    await broker.ok_cmd("UpdateWorkQueue", work_pool_name="p", work_queue_name="default", concurrency_limit=1)
    assert _ids(await _poll(broker, work_queue_names=["default"])) == [urgent]  # the cap keeps the same order


# ---------------------------------------------------------------------------------------------
# What a poll records


async def test_a_poll_makes_queues_and_their_deployments_ready(broker):
    await broker.ok_cmd("CreateWorkPool", name="p", type="process")
    await broker.ok_cmd("CreateWorkQueue", work_pool_name="p", name="paused", is_paused=True)
    await broker.ok_cmd("CreateWorkQueue", work_pool_name="p", name="unpolled")
    flow_id = (await broker.ok_cmd("CreateFlow", name="etl"))["id"]
    on_default = await broker.ok_cmd("CreateDeployment", name="d", flow_id=flow_id, work_pool_name="p")
    elsewhere = await broker.ok_cmd("CreateDeployment", name="e", flow_id=flow_id, work_pool_name="p",
                                    work_queue_name="unpolled")
    before = await broker.ok_qry("GetDeployment", id=on_default["id"])
    assert before["status"] == "NOT_READY" and before["last_polled"] is None
    await _poll(broker, work_queue_names=["default", "paused"])

    async def default_ready():
        q = await broker.ok_qry("GetWorkQueue", work_pool_name="p", work_queue_name="default")
        return q if q["status"] == "READY" else None

    default = await _eventually(default_ready)
    assert default and default["last_polled"] is not None
    paused = await broker.ok_qry("GetWorkQueue", work_pool_name="p", work_queue_name="paused")
    assert paused["status"] == "READY" and paused["last_polled"] == default["last_polled"]  # a Prefect quirk
    unpolled = await broker.ok_qry("GetWorkQueue", work_pool_name="p", work_queue_name="unpolled")
    assert unpolled["status"] == "NOT_READY" and unpolled["last_polled"] is None
    assert (await broker.ok_qry("GetWorkPool", name="p"))["status"] == "NOT_READY"  # polls leave the pool alone

    async def deployment_ready():
        d = await broker.ok_qry("GetDeployment", id=on_default["id"])
        return d if d["status"] == "READY" else None

    d = await _eventually(deployment_ready)
    assert d and _t(d["last_polled"]) == _t(default["last_polled"]) and d["updated"] == before["updated"]
    assert (await broker.ok_qry("GetDeployment", id=elsewhere["id"]))["status"] == "NOT_READY"
    # An update of the deployment keeps what the poll recorded.
    await broker.ok_cmd("UpdateDeployment", id=on_default["id"], description="changed")
    after = await broker.ok_qry("GetDeployment", id=on_default["id"])
    assert (after["status"], _t(after["last_polled"]), after["description"]) == ("READY", _t(d["last_polled"]), "changed")
    # One event per poll: the pool's log holds one WorkQueuesPolled for it.
    events = await broker.pool_events(default["work_pool_id"])
    polled = [e for e in events if e["type"] == "WorkQueuesPolled"]
    assert len(polled) == 1 and len(polled[0]["payload"]["queue_ids"]) == 2


async def _runner_poll(broker, **body) -> list[dict]:
    return await broker.ok_qry("GetScheduledFlowRunsForDeployments", **body)


async def test_the_runner_poll_answers_its_deployments_scheduled_runs_earliest_first(broker):
    await broker.ok_cmd("CreateWorkPool", name="p", type="process")
    flow_id = (await broker.ok_cmd("CreateFlow", name="etl"))["id"]
    a = await broker.ok_cmd("CreateDeployment", name="a", flow_id=flow_id)  # a runner's: no pool
    b = await broker.ok_cmd("CreateDeployment", name="b", flow_id=flow_id, work_pool_name="p")
    other = await broker.ok_cmd("CreateDeployment", name="other", flow_id=flow_id)
    now = datetime.now(UTC)

    async def run(deployment: dict, at: datetime, **state) -> str:
        return (await broker.ok_cmd("CreateFlowRunFromDeployment", deployment_id=deployment["id"],
                                    state={**_scheduled(at), **state}))["id"]

    late_b = await run(b, now - HOUR)
    soon_a = await run(a, now + HOUR)
    later_a = await run(a, now + 2 * HOUR)
    await run(other, now - 2 * HOUR)
    running = await run(a, now - 3 * HOUR)
    await broker.ok_cmd("SetFlowRunState", id=running, state={"type": "RUNNING"})
    ids = [a["id"], b["id"], str(uuid.uuid4())]  # an unknown id matches nothing
    polled = await _runner_poll(broker, deployment_ids=ids)
    assert [r["id"] for r in polled] == [late_b, soon_a, later_a]
    assert polled[0]["deployment_id"] == b["id"] and polled[0]["state"]["type"] == "SCHEDULED"  # whole runs
    assert [r["id"] for r in await _runner_poll(broker, deployment_ids=ids, limit=2)] == [late_b, soon_a]
    before = (now + HOUR).isoformat()  # inclusive
    assert [r["id"] for r in await _runner_poll(broker, deployment_ids=ids, scheduled_before=before)] == [late_b, soon_a]
    assert await _runner_poll(broker, deployment_ids=[]) == []
    assert (await broker.qry("GetScheduledFlowRunsForDeployments", deployment_ids=ids, limit=201))["error"]["code"] \
        == "invalid"


async def test_the_runner_poll_makes_its_deployments_ready_without_updating_them(broker):
    flow_id = (await broker.ok_cmd("CreateFlow", name="etl"))["id"]
    d = await broker.ok_cmd("CreateDeployment", name="d", flow_id=flow_id)
    untouched = await broker.ok_cmd("CreateDeployment", name="e", flow_id=flow_id)
    before = await broker.ok_qry("GetDeployment", id=d["id"])
    assert (before["status"], before["last_polled"]) == ("NOT_READY", None)
    await _runner_poll(broker, deployment_ids=[d["id"]])

    async def ready():
        got = await broker.ok_qry("GetDeployment", id=d["id"])
        return got if got["status"] == "READY" else None

    first = await _eventually(ready)
    assert first and first["last_polled"] is not None and first["updated"] == before["updated"]
    assert (await broker.ok_qry("GetDeployment", id=untouched["id"]))["status"] == "NOT_READY"
    await _runner_poll(broker, deployment_ids=[d["id"]])  # again: a later last_polled, no second event

    async def polled_again():
        got = await broker.ok_qry("GetDeployment", id=d["id"])
        return got if _t(got["last_polled"]) > _t(first["last_polled"]) else None

    second = await _eventually(polled_again)
    assert second and second["status"] == "READY" and second["updated"] == before["updated"]
    await broker.catch_up()
    polls = await broker.ok_qry("ReadEvents", event_type="DeploymentsPolled")
    assert [e["payload"]["deployment_ids"] for e in polls["events"]] == [[d["id"]], [d["id"]]]  # one per poll
    prefect = await broker.ok_qry("ReadEvents", vocabulary="prefect", prefect_event_prefix="prefect.deployment.ready")
    assert [(e["event"], e["resource"]["prefect.resource.id"]) for e in prefect["events"]] == [
        ("prefect.deployment.ready", f"prefect.deployment.{d['id']}")]


async def test_the_legacy_queue_poll(broker):
    await broker.ok_cmd("CreateWorkPool", name="p", type="process")
    queue = await broker.ok_cmd("CreateWorkQueue", work_pool_name="p", name="q", concurrency_limit=10)
    flow_id = (await broker.ok_cmd("CreateFlow", name="etl"))["id"]
    now = datetime.now(UTC)
    scheduled = [await _run(broker, flow_id, "q", _scheduled(now + k * HOUR)) for k in range(3)]
    for state in ("PENDING", "RUNNING", "CANCELLING"):
        await _run(broker, flow_id, "q", {"type": state})

    async def runs(**body) -> list[str]:
        return [r["id"] for r in await broker.ok_qry("GetLegacyQueueRuns", id=queue["id"], **body)]

    assert await runs() == scheduled
    assert await runs(scheduled_before=(now + 30 * timedelta(minutes=1)).isoformat()) == scheduled[:1]
    for limit, expected in ((5, 2), (1, 0)):
        await broker.ok_cmd("UpdateWorkQueueById", id=queue["id"], concurrency_limit=limit)
        assert await runs() == scheduled[:expected]
    await broker.ok_cmd("UpdateWorkQueueById", id=queue["id"], concurrency_limit=5)
    assert await runs(limit=1) == scheduled[:1]
    await broker.ok_cmd("UpdateWorkQueueById", id=queue["id"], concurrency_limit=None)
    assert await runs(limit=2) == scheduled[:2] and await runs(limit=0) == []
    ready = await _eventually(lambda: _status(broker, "q"))
    assert ready == "READY"
    await broker.ok_cmd("UpdateWorkQueueById", id=queue["id"], is_paused=True)
    assert await runs() == []
    missing = await broker.qry("GetLegacyQueueRuns", id="00000000-0000-0000-0000-000000000001")
    assert missing["error"]["code"] == "not_found"


async def test_a_deprecated_tag_based_queue_polls_runs_by_tags_and_deployments(broker):
    """Prefect's deprecated tag-filter queues: the legacy poll serves SCHEDULED runs that have
    every tag of the filter and a deployment (one of the filter's when it names some), whatever
    queue they name; the cap counts PENDING and RUNNING matches only."""
    await broker.ok_cmd("CreateWorkPool", name="p", type="process")
    await broker.ok_cmd("CreateWorkQueue", work_pool_name="p", name="q")
    flow_id = (await broker.ok_cmd("CreateFlow", name="etl"))["id"]
    d1, d2 = [(await broker.ok_cmd("CreateDeployment", name=n, flow_id=flow_id, work_pool_name="p"))["id"]
              for n in ("d1", "d2")]
    now = datetime.now(UTC)

    async def run(state: dict, tags: list[str], deployment: str | None) -> str:
        return await _run(broker, flow_id, "q", state, tags=tags, deployment_id=deployment)

    first = await run(_scheduled(now), ["gpu", "x"], d1)
    await run(_scheduled(now), ["x"], d1)  # lacks a tag
    other_deployment = await run(_scheduled(now + HOUR), ["gpu"], d2)
    await run(_scheduled(now), ["gpu"], None)  # no deployment: never matched
    later = await run(_scheduled(now + 2 * HOUR), ["gpu"], d1)
    await run({"type": "RUNNING"}, ["gpu"], d1)  # counted against the limit
    await run({"type": "CANCELLING"}, ["gpu"], d1)  # not counted (unlike the name-based poll)

    tagged = await broker.ok_cmd("CreateLegacyWorkQueue", name="tagged", concurrency_limit=10,
                                 filter={"tags": ["gpu"], "deployment_ids": [d1]})
    assert tagged["filter"] == {"tags": ["gpu"], "deployment_ids": [d1]}
    assert (await broker.ok_qry("GetWorkQueueById", id=tagged["id"]))["filter"] == tagged["filter"]

    async def runs(**body) -> list[str]:
        return [r["id"] for r in await broker.ok_qry("GetLegacyQueueRuns", id=tagged["id"], **body)]

    assert await runs() == [first, later]
    assert await runs(limit=1) == [first]
    assert await runs(scheduled_before=(now + 30 * timedelta(minutes=1)).isoformat()) == [first]
    await broker.ok_cmd("UpdateWorkQueueById", id=tagged["id"], concurrency_limit=2)
    assert await runs() == [first]  # 2 - 1 RUNNING match
    await broker.ok_cmd("UpdateWorkQueueById", id=tagged["id"], concurrency_limit=None, filter={"tags": ["gpu"]})
    assert await runs() == [first, other_deployment, later]  # any deployment, but one
    await broker.ok_cmd("UpdateWorkQueueById", id=tagged["id"], filter=None)
    assert await runs() == []  # by its name again: no run names `tagged`
    assert (await broker.ok_qry("GetWorkQueueById", id=tagged["id"]))["filter"] is None
    for bad in ({"tags": "gpu"}, {"tags": ["gpu"], "flows": []}, {"deployment_ids": ["not-a-uuid"]}):
        refused = await broker.cmd("CreateLegacyWorkQueue", name="bad", filter=bad)
        assert refused["error"]["code"] == "invalid" and refused["error"]["field"].startswith("filter"), refused
    # The pool API's queues take no filter.
    refused = await broker.cmd("CreateWorkQueue", work_pool_name="p", name="f", filter={"tags": ["gpu"]})
    assert refused["error"]["code"] == "invalid"


async def _status(broker, queue: str) -> str | None:
    q = await broker.ok_qry("GetWorkQueue", work_pool_name="p", work_queue_name=queue)
    return q["status"] if q["status"] == "READY" else None


# ---------------------------------------------------------------------------------------------
# The foreman


async def test_the_foreman_turns_silent_workers_pools_deployments_and_queues_not_ready(broker, service, settings):
    await broker.ok_cmd("CreateWorkPool", name="p", type="process")
    await broker.ok_cmd("CreateWorkPool", name="busy", type="process")
    await broker.ok_cmd("CreateWorkQueue", work_pool_name="p", name="never-polled")
    flow_id = (await broker.ok_cmd("CreateFlow", name="etl"))["id"]
    d = await broker.ok_cmd("CreateDeployment", name="d", flow_id=flow_id, work_pool_name="p")
    silent = await broker.ok_cmd("WorkerHeartbeat", work_pool_name="p", name="silent")
    await broker.ok_cmd("WorkerHeartbeat", work_pool_name="p", name="slow", heartbeat_interval_seconds=60)
    await _poll(broker, work_queue_names=["default"])
    assert await _eventually(lambda: _status(broker, "default")) == "READY"
    start = _t(silent["last_heartbeat_time"])
    real_clock = service.commands.clock
    async with foreman_clock(service, settings) as foreman_at:
        def at(offset: float) -> Foreman:
            return foreman_at(start + timedelta(seconds=offset))

        async def state() -> tuple:
            workers = {w["name"]: w["status"] for w in await broker.ok_qry("ListWorkers", work_pool_name="p")}
            pool = (await broker.ok_qry("GetWorkPool", name="p"))["status"]
            queues = {q["name"]: q["status"] for q in await broker.ok_qry("ListWorkQueues", work_pool_name="p")}
            deployment = (await broker.ok_qry("GetDeployment", id=d["id"]))["status"]
            return workers, pool, queues, deployment

        ready = ({"silent": "ONLINE", "slow": "ONLINE"}, "READY", {"default": "READY", "never-polled": "NOT_READY"},
                 "READY")
        assert await _eventually(lambda: _same(state, ready)) == ready
        await at(30).run_pass()  # nothing is due yet
        await broker.ok_qry("CountWorkPools")
        assert await state() == ready
        # A stale or wrong read changes nothing: the deciders check the log at their own time.
        service.commands.clock = real_clock
        stale = Foreman(service.engine, CommandSender(broker.nc, settings), clock=lambda: start + timedelta(seconds=500))
        await stale.run_pass()
        await broker.ok_qry("CountWorkPools")
        assert await state() == ready
        # 90 s: exactly 3 × 30 s is not more than that, so the worker stays online; the queue and
        # its deployment, last polled more than 60 s before, are not ready any more.
        await at(90).run_pass()
        expected = ({"silent": "ONLINE", "slow": "ONLINE"}, "READY",
                    {"default": "NOT_READY", "never-polled": "NOT_READY"}, "NOT_READY")
        assert await _eventually(lambda: _same(state, expected)) == expected
        # 91 s: the worker without an interval goes; the other (3 × 60 s) stays, so does the pool.
        await at(91).run_pass()
        expected = ({"silent": "OFFLINE", "slow": "ONLINE"}, "READY", expected[2], "NOT_READY")
        assert await _eventually(lambda: _same(state, expected)) == expected
        # 181 s: the last worker goes, and with it the pool, in the same pass.
        await at(181).run_pass()
        expected = ({"silent": "OFFLINE", "slow": "OFFLINE"}, "NOT_READY", expected[2], "NOT_READY")
        assert await _eventually(lambda: _same(state, expected)) == expected
        await at(200).run_pass()  # a second pass, or a second foreman: nothing more
        await broker.ok_qry("CountWorkPools")
        assert await state() == expected
        # The other pool never had a worker: NOT_READY from the start, never touched.
        assert (await broker.ok_qry("GetWorkPool", name="busy"))["status"] == "NOT_READY"
    # A heartbeat brings the pool back.
    await broker.ok_cmd("WorkerHeartbeat", work_pool_name="p", name="silent")
    assert (await broker.ok_qry("GetWorkPool", name="p"))["status"] == "READY"


async def _same(state, expected):
    got = await state()
    return got if got == expected else None


async def test_the_client_methods(service, settings):
    from runledger.client import NotFound, RunledgerClient

    async with RunledgerClient(settings) as client:
        await client.create_work_pool("p", type="process")
        worker = await client.worker_heartbeat("p", "w1", heartbeat_interval_seconds=15)
        assert worker.status == "ONLINE" and worker.heartbeat_interval_seconds == 15
        assert [w.name for w in await client.read_workers("p", statuses=["ONLINE"])] == ["w1"]
        assert await client.read_workers("p", statuses=["OFFLINE"]) == []
        flow = await client.create_flow("etl")
        run = await client.create_flow_run(flow.id, work_pool_name="p",
                                           state={"type": "SCHEDULED"})
        polled = await client.get_scheduled_flow_runs("p", limit=5)
        assert [p.flow_run.id for p in polled] == [run.id]
        deployment, _ = await client.create_deployment(flow.id, "d")
        from_deployment = await client.create_flow_run_from_deployment(deployment.id, state={"type": "SCHEDULED"})
        runner_polled = await client.get_scheduled_flow_runs_for_deployments([deployment.id], limit=5)
        assert [r.id for r in runner_polled] == [from_deployment.id]
        await client.delete_worker("p", "w1")
        with pytest.raises(NotFound):
            await client.delete_worker("p", "w1")


async def test_a_lost_worker_s_run_is_crashed_after_its_queue_was_deleted(broker, service, settings):
    """Deleting a queue takes it off its runs in the read model, but a run it held still holds
    its slots in the log: when its worker goes silent, the foreman still finds and crashes it,
    so the pool's limit is not lost for good."""
    await broker.ok_cmd("CreateWorkPool", name="p", type="process", concurrency_limit=1)
    await broker.ok_cmd("CreateWorkQueue", work_pool_name="p", name="q")
    flow_id = (await broker.ok_cmd("CreateFlow", name="etl"))["id"]
    beat = await broker.ok_cmd("WorkerHeartbeat", work_pool_name="p", name="w", heartbeat_interval_seconds=1)
    run = await broker.ok_cmd("CreateFlowRun", flow_id=flow_id, work_pool_name="p", work_queue_name="q",
                              state={"type": "SCHEDULED"})
    claimed = await broker.cmd("SetFlowRunState", id=run["id"], state={"type": "PENDING"}, worker_name="w")
    assert claimed["orchestration"]["status"] == "ACCEPT"
    await broker.ok_cmd("SetFlowRunState", id=run["id"], state={"type": "RUNNING"})
    await broker.ok_cmd("DeleteWorkQueue", work_pool_name="p", work_queue_name="q")
    await broker.catch_up()
    assert (await broker.ok_qry("GetFlowRun", id=run["id"]))["work_queue_id"] is None
    async with foreman_clock(service, settings) as at:
        foreman = at(_t(beat["last_heartbeat_time"]) + timedelta(seconds=10))
        await foreman.run_pass()
    assert foreman.last.runs_crashed == 1
    await broker.catch_up()
    crashed = await broker.ok_qry("GetFlowRun", id=run["id"])
    assert crashed["state_type"] == "CRASHED" and crashed["worker_name"] is None
