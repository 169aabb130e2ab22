"""`ReadEvents` through the broker, against real NATS and Postgres: the log filtered by
aggregate, id, type, Prefect resource id and sub-second time bounds; paged with a cursor that
neither misses nor repeats an event while commands keep arriving; pages bounded in the work they
do (short pages that carry the cursor); Prefect's vocabulary with a prefix, equal to the CLI's
export; bad input is `invalid`."""

from __future__ import annotations

import asyncio
import json
import uuid
from datetime import UTC, datetime, timedelta, timezone

import pytest

from runledger.client import RunledgerClient
from runledger.commands.events import EventEnvelope
from runledger.commands.prefect_events import export_log
from runledger.handlers import event_queries

ENVELOPE_KEYS = {"seq", "id", "type", "schema_version", "occurred", "aggregate_type", "aggregate_id", "payload",
                 "idempotency_key"}


async def _read(broker, **body) -> dict:
    return await broker.ok_qry("ReadEvents", **body)


async def _all(broker, **body) -> list[dict]:
    """Every event, following the cursor; checks each cursor moves on."""
    out, after = [], body.pop("after_seq", 0)
    while True:
        page = await _read(broker, after_seq=after, **body)
        out += page["events"]
        if page["next_after_seq"] is None:
            return out
        assert page["next_after_seq"] > after
        after = page["next_after_seq"]


async def _some_history(broker) -> dict:
    pool = await broker.ok_cmd("CreateWorkPool", name="alpha", type="process")
    other = await broker.ok_cmd("CreateWorkPool", name="beta", type="process")
    queue = await broker.ok_cmd("CreateWorkQueue", work_pool_name="alpha", name="urgent", priority=1)
    flow = await broker.ok_cmd("CreateFlow", name="etl")
    variable = await broker.ok_cmd("CreateVariable", name="db_url", value="x")
    return {"pool": pool, "other": other, "queue": queue, "flow": flow, "variable": variable}


async def test_the_log_filtered_by_aggregate_id_type_and_resource(broker):
    made = await _some_history(broker)
    everything = await _read(broker)
    events = everything["events"]
    assert everything["next_after_seq"] is None
    assert all(set(e) == ENVELOPE_KEYS for e in events)
    seqs = [e["seq"] for e in events]
    assert seqs == sorted(seqs) and len(set(seqs)) == len(seqs)
    assert {e["aggregate_type"] for e in events} >= {"work_pool", "work_pool_name", "flow", "unique_key", "variable"}

    pools = (await _read(broker, aggregate_type="work_pool"))["events"]
    assert pools == [e for e in events if e["aggregate_type"] == "work_pool"]
    alpha_id = made["pool"]["id"]
    alpha = (await _read(broker, aggregate_type="work_pool", aggregate_id=alpha_id))["events"]
    assert [e["type"] for e in alpha] == ["WorkPoolCreated", "WorkQueueCreated"]
    assert (await _read(broker, aggregate_id=alpha_id))["events"] == alpha  # an id alone
    created = (await _read(broker, event_type="WorkQueueCreated"))["events"]
    assert [e["payload"]["queue"]["name"] for e in created] == ["urgent"]

    # Prefect's resource ids name the aggregate; a queue's is its pool's.
    assert (await _read(broker, resource_id=f"prefect.work-pool.{alpha_id}"))["events"] == alpha
    assert (await _read(broker, resource_id=f"prefect.work-queue.{made['queue']['id']}"))["events"] == alpha
    variable = (await _read(broker, resource_id=f"prefect.variable.{made['variable']['id'].upper()}"))["events"]
    assert [e["type"] for e in variable] == ["VariableCreated"]
    missing = await broker.qry("ReadEvents", resource_id=f"prefect.work-queue.{uuid.uuid4()}")
    assert missing["error"]["code"] == "not_found" and missing["error"]["field"] == "resource_id"
    assert (await _read(broker, resource_id=f"prefect.flow-run.{uuid.uuid4()}")) == {"events": [], "next_after_seq": None}

    # The cursor: events after it, and a limit.
    first_two = await _read(broker, limit=2)
    assert first_two == {"events": events[:2], "next_after_seq": events[1]["seq"]}
    assert (await _read(broker, after_seq=events[1]["seq"]))["events"] == events[2:]
    assert await _read(broker, after_seq=events[-1]["seq"]) == {"events": [], "next_after_seq": None}


async def test_time_bounds_are_inclusive_with_sub_second_precision(broker):
    await broker.ok_cmd("CreateVariable", name="a", value=1)
    await asyncio.sleep(0.002)
    await broker.ok_cmd("CreateVariable", name="b", value=2)
    a, b = (await _read(broker, event_type="VariableCreated"))["events"]
    t_a, t_b = (datetime.fromisoformat(e["occurred"]) for e in (a, b))
    assert t_b - t_a >= timedelta(milliseconds=1)

    def names(page):
        return [e["payload"]["variable"]["name"] for e in page["events"]]

    iso = datetime.isoformat
    assert names(await _read(broker, event_type="VariableCreated", since=iso(t_a), until=iso(t_a))) == ["a"]
    assert names(await _read(broker, event_type="VariableCreated", since=iso(t_b))) == ["b"]
    assert names(await _read(broker, event_type="VariableCreated", until=iso(t_b - timedelta(microseconds=1)))) == ["a"]
    assert names(await _read(broker, event_type="VariableCreated",
                             since=iso(t_a + timedelta(microseconds=500)))) == ["b"]
    # Another offset names the same moment; a naive time is UTC.
    berlin = t_b.astimezone(timezone(timedelta(hours=2)))
    assert names(await _read(broker, event_type="VariableCreated", since=iso(berlin))) == ["b"]
    naive = t_b.astimezone(UTC).replace(tzinfo=None)
    assert names(await _read(broker, event_type="VariableCreated", since=iso(naive))) == ["b"]
    assert names(await _read(broker, event_type="VariableCreated", until=iso(naive))) == ["a", "b"]


async def test_paging_misses_and_repeats_nothing_while_commands_arrive(broker, settings):
    for i in range(10):
        await broker.ok_cmd("CreateVariable", name=f"before-{i}", value=i)
    before = await broker.stream_messages()
    stop = asyncio.Event()

    async def writer() -> int:
        n = 0
        while not stop.is_set():
            await broker.ok_cmd("CreateVariable", name=f"during-{n}", value=n)
            n += 1
        return n

    task = asyncio.create_task(writer())
    try:
        paged = []
        async with RunledgerClient(settings) as rl:
            after = 0
            while True:  # by hand, so that commands land between the pages
                page = await rl.read_events(after_seq=after, limit=7)
                paged += page.events
                if page.next_after_seq is None:
                    break
                after = page.next_after_seq
                await asyncio.sleep(0.005)
    finally:
        stop.set()
        written = await task
    assert written > 0
    full = (await _read(broker, limit=1000))["events"]
    seqs = [e["seq"] for e in paged]
    assert len(set(seqs)) == len(seqs) and seqs == sorted(seqs)
    assert paged == full[:len(paged)]  # no event missed, none repeated
    assert len(paged) >= before  # at least the log as it was before (events only: no idempotency keys)

    # The client follows the cursor by itself.
    async with RunledgerClient(settings) as rl:
        whole = await rl.read_events(limit=3, all_pages=True)
        assert whole.next_after_seq is None
        assert whole.events == (await _all(broker, limit=1000))
        variables = await rl.read_events(aggregate_type="variable", event_type="VariableCreated", all_pages=True, limit=4)
        assert len(variables.events) == 10 + written


async def test_a_page_that_scans_its_bound_ends_short_with_the_cursor(broker, monkeypatch):
    for i in range(12):
        await broker.ok_cmd("CreateVariable", name=f"v{i}", value=i)
    monkeypatch.setattr(event_queries, "READ_BATCH", 4)
    monkeypatch.setattr(event_queries, "MAX_SCAN", 4)
    everything = await _all(broker)
    # Nothing matches: every page reads 4 events and returns none, with the cursor.
    future = (datetime.now(UTC) + timedelta(days=1)).isoformat()
    page = await _read(broker, since=future)
    assert page["events"] == [] and page["next_after_seq"] == everything[3]["seq"]
    assert await _all(broker, since=future) == []
    recent = datetime.fromisoformat(everything[-3]["occurred"])
    assert await _all(broker, since=recent.isoformat()) == [
        e for e in everything if datetime.fromisoformat(e["occurred"]) >= recent]


async def test_prefect_vocabulary_with_a_prefix(broker, settings):
    await broker.ok_cmd("CreateWorkPool", name="pool", type="process")
    flow = await broker.ok_cmd("CreateFlow", name="etl")
    deployment = await broker.ok_cmd("CreateDeployment", name="nightly", flow_id=flow["id"], work_pool_name="pool",
                                     description="one")
    await broker.ok_cmd("UpdateDeployment", id=deployment["id"], description="two")
    run = await broker.ok_cmd("CreateFlowRunFromDeployment", deployment_id=deployment["id"])
    await broker.ok_cmd("SetFlowRunState", id=run["id"], state={"type": "PENDING"})

    updated = await _read(broker, vocabulary="prefect", prefect_event_prefix="prefect.deployment.updated")
    assert updated["next_after_seq"] is None
    [event] = updated["events"]
    assert event["event"] == "prefect.deployment.updated"
    assert event["resource"]["prefect.resource.id"] == f"prefect.deployment.{deployment['id']}"
    assert event["payload"]["updates"]["description"] == {"from": "one", "to": "two"}
    source = (await _read(broker, event_type="DeploymentUpdated"))["events"]
    assert event["seq"] == source[-1]["seq"]

    deployments = await _read(broker, vocabulary="prefect", prefect_event_prefix="prefect.deployment.")
    assert [e["event"] for e in deployments["events"]] == ["prefect.deployment.created", "prefect.deployment.updated"]
    by_resource = await _read(broker, vocabulary="prefect", resource_id=f"prefect.deployment.{deployment['id']}")
    assert by_resource["events"] == deployments["events"]
    runs = await _read(broker, vocabulary="prefect", prefect_event_prefix="prefect.flow-run.")
    assert [e["event"] for e in runs["events"]] == ["prefect.flow-run.Scheduled", "prefect.flow-run.Pending"]
    # The fold starts at the log's start even past the cursor: the Pending event still knows
    # the run was Scheduled.
    pending = await _read(broker, vocabulary="prefect", prefect_event_prefix="prefect.flow-run.",
                          after_seq=runs["events"][0]["seq"])
    assert pending["events"] == runs["events"][1:]
    assert pending["events"][0]["payload"]["initial_state"]["type"] == "SCHEDULED"

    # The whole export, page by page (a page ends between two runledger events), equals the
    # export of the whole log and what `runledger events --vocabulary prefect` prints.
    envelopes = (await _read(broker, limit=1000))["events"]
    expected, _ = export_log(EventEnvelope.model_validate({k: v for k, v in e.items() if k != "seq"})
                             for e in envelopes)
    paged = await _all(broker, vocabulary="prefect", limit=2)
    assert [{k: v for k, v in e.items() if k != "seq"} for e in paged] == json.loads(json.dumps(expected))
    from tests.integration.test_prefect_export import _export

    assert [{k: v for k, v in e.items() if k != "seq"} for e in paged] == await _export(settings)


async def test_the_prefect_fold_is_bounded(broker, monkeypatch):
    for i in range(10):
        await broker.ok_cmd("CreateVariable", name=f"v{i}", value=i)
    last = (await _read(broker))["events"][-1]["seq"]
    monkeypatch.setattr(event_queries, "READ_BATCH", 4)
    monkeypatch.setattr(event_queries, "MAX_FOLD", 8)
    too_far = await broker.qry("ReadEvents", vocabulary="prefect", after_seq=last - 2)
    assert too_far["error"]["code"] == "invalid" and too_far["error"]["field"] == "vocabulary"
    # Narrowed to one aggregate, the fold is short.
    one = await _read(broker, vocabulary="prefect", aggregate_type="variable",
                      aggregate_id=(await _read(broker, event_type="VariableCreated"))["events"][-1]["aggregate_id"])
    assert [e["event"] for e in one["events"]] == ["prefect.variable.created"]
    # From the start, a page stops at the bound with its cursor, and the next goes on.
    first = await _read(broker, vocabulary="prefect")
    assert first["next_after_seq"] is not None and first["events"]


@pytest.mark.parametrize("body, field", [
    ({"aggregate_type": "work_pool.x"}, "aggregate_type"),
    ({"aggregate_type": "*"}, "aggregate_type"),
    ({"aggregate_type": ">"}, "aggregate_type"),
    ({"aggregate_id": "a b"}, "aggregate_id"),
    ({"aggregate_id": ""}, "aggregate_id"),
    ({"event_type": "Work*"}, "event_type"),
    ({"prefect_event_prefix": "prefect."}, "prefect_event_prefix"),
    ({"vocabulary": "runledger", "prefect_event_prefix": "prefect."}, "prefect_event_prefix"),
    ({"since": "2026-01-01T00:00:00.002Z", "until": "2026-01-01T00:00:00.001Z"}, "until"),
    ({"limit": 0}, "limit"),
    ({"limit": 1001}, "limit"),
    ({"after_seq": -1}, "after_seq"),
    ({"vocabulary": "cloudevents"}, "vocabulary"),
    ({"resource_id": "prefect.tag.nightly"}, "resource_id"),
    ({"resource_id": f"prefect.deployment.{uuid.UUID(int=1)}", "aggregate_id": "x"}, "resource_id"),
    ({"since": "yesterday"}, "since"),
    ({"seq_from": 1}, "seq_from"),
])
async def test_bad_input_is_invalid(broker, body, field):
    out = await broker.qry("ReadEvents", **body)
    assert out["ok"] is False and out["error"]["code"] == "invalid", out
    assert out["error"]["field"] == field


async def test_a_deployment_and_a_run_read_alone_in_prefects_vocabulary(broker, settings):
    """A deployment's READY is written by its pool's polls and by runners' polls, outside its
    own aggregate: read by itself (resource id, aggregate id, or the CLI's --aggregate/--id),
    it still has those events. A run read by itself relates its flow, deployment, queue and
    pool by name, as in the export of the whole log."""
    pool = await broker.ok_cmd("CreateWorkPool", name="etl-pool", type="process")
    flow = await broker.ok_cmd("CreateFlow", name="etl", tags=["team"])
    placed = await broker.ok_cmd("CreateDeployment", name="placed", flow_id=flow["id"], work_pool_name="etl-pool")
    served = await broker.ok_cmd("CreateDeployment", name="served", flow_id=flow["id"])
    await broker.ok_cmd("RecordWorkQueuesPolled", work_pool_name="etl-pool",
                        work_queue_ids=[pool["default_queue_id"]], readies_deployments=True)
    await broker.ok_cmd("RecordDeploymentsPolled", deployment_ids=[served["id"]])
    run = await broker.ok_cmd("CreateFlowRunFromDeployment", deployment_id=placed["id"])

    def brief(events):
        return [(e["event"], e["resource"]["prefect.resource.id"]) for e in events]

    for d in (placed, served):
        expected = [("prefect.deployment.created", f"prefect.deployment.{d['id']}"),
                    ("prefect.deployment.ready", f"prefect.deployment.{d['id']}")]
        by_resource = await _all(broker, vocabulary="prefect", resource_id=f"prefect.deployment.{d['id']}")
        assert brief(by_resource) == expected
        by_aggregate = await _all(broker, vocabulary="prefect", aggregate_type="deployment", aggregate_id=d["id"])
        assert by_aggregate == by_resource
        from tests.integration.test_prefect_export import _export

        cli = await _export(settings, "--aggregate", "deployment", "--id", d["id"])
        assert cli == [{k: v for k, v in e.items() if k != "seq"} for e in by_resource]
    ready = by_aggregate[-1]
    assert ready["resource"]["prefect.resource.name"] == "served"
    assert ready["related"] == [{"prefect.resource.id": f"prefect.flow.{flow['id']}", "prefect.resource.name": "etl",
                                 "prefect.resource.role": "flow"}]

    whole = await _all(broker, vocabulary="prefect", limit=1000)
    run_events = await _all(broker, vocabulary="prefect", resource_id=f"prefect.flow-run.{run['id']}")
    assert brief(run_events) == [("prefect.flow-run.Scheduled", f"prefect.flow-run.{run['id']}")]
    assert run_events == [e for e in whole if e["resource"]["prefect.resource.id"] == f"prefect.flow-run.{run['id']}"]
    related = {r["prefect.resource.role"]: r.get("prefect.resource.name") for r in run_events[0]["related"]}
    assert related == {"flow": "etl", "deployment": "placed", "work-queue": "default", "work-pool": "etl-pool",
                       "tag": None}
    assert run_events[0]["related"][3]["prefect.work-pool.type"] == "process"


async def test_a_deleted_queue_is_found_by_its_resource_id(broker):
    """What happened to a queue, asked after it was deleted: its events, its deletion
    included; `not_found` only for a queue the log never had."""
    await broker.ok_cmd("CreateWorkPool", name="p", type="process")
    queue = await broker.ok_cmd("CreateWorkQueue", work_pool_name="p", name="short-lived")
    await broker.ok_cmd("UpdateWorkQueue", work_pool_name="p", work_queue_name="short-lived", description="x")
    await broker.ok_cmd("DeleteWorkQueue", work_pool_name="p", work_queue_name="short-lived")
    resource = f"prefect.work-queue.{queue['id']}"
    events = await _all(broker, vocabulary="prefect", resource_id=resource)
    assert [e["event"] for e in events] == ["prefect.work-queue.created", "prefect.work-queue.updated",
                                            "prefect.work-queue.deleted"]
    stored = await _all(broker, resource_id=resource)  # the pool's events, in runledger's vocabulary
    assert [e["type"] for e in stored][-1] == "WorkQueueDeleted"
    # A queue that goes with its pool is found too.
    other = await broker.ok_cmd("CreateWorkPool", name="gone", type="process")
    await broker.ok_cmd("DeleteWorkPool", name="gone")
    events = await _all(broker, vocabulary="prefect", resource_id=f"prefect.work-queue.{other['default_queue_id']}")
    assert [e["event"] for e in events] == ["prefect.work-queue.created", "prefect.work-queue.deleted"]


async def test_a_run_in_a_busy_pool_is_read_alone_without_the_pools_polls(broker, monkeypatch):
    """A run's Prefect events need its pool's and queue's names, not the pool's polls: a busy
    pool's workers write thousands a day, which would use up a page's reads before the run's
    own events and make it `invalid`."""
    await broker.ok_cmd("CreateWorkPool", name="busy", type="process")
    flow = await broker.ok_cmd("CreateFlow", name="etl")
    deployment = await broker.ok_cmd("CreateDeployment", name="d", flow_id=flow["id"], work_pool_name="busy")
    pool = await broker.ok_qry("GetWorkPool", name="busy")
    run = await broker.ok_cmd("CreateFlowRunFromDeployment", deployment_id=deployment["id"])
    for _ in range(40):
        await broker.ok_cmd("RecordWorkQueuesPolled", work_pool_name="busy", work_queue_ids=[pool["default_queue_id"]])
    await broker.ok_cmd("SetFlowRunState", id=run["id"], state={"type": "PENDING"})
    monkeypatch.setattr(event_queries, "READ_BATCH", 4)
    monkeypatch.setattr(event_queries, "MAX_FOLD", 30)
    events = await _all(broker, vocabulary="prefect", resource_id=f"prefect.flow-run.{run['id']}")
    assert [e["event"] for e in events] == ["prefect.flow-run.Scheduled", "prefect.flow-run.Pending"]
    assert {r["prefect.resource.role"]: r.get("prefect.resource.name") for r in events[-1]["related"]}["work-pool"] == "busy"


async def test_a_deployment_among_many_runner_polls_is_read_without_them(broker, monkeypatch):
    """The runners' polls of other deployments (one event each, kept a day or more) would use up
    a page's reads before the deployment's own events: past half a page's reads they are left
    out, with its ready and not-ready, rather than the read refused."""
    flow = await broker.ok_cmd("CreateFlow", name="etl")
    mine = await broker.ok_cmd("CreateDeployment", name="mine", flow_id=flow["id"])
    other = await broker.ok_cmd("CreateDeployment", name="other", flow_id=flow["id"])
    await broker.ok_cmd("RecordDeploymentsPolled", deployment_ids=[mine["id"]])
    for _ in range(40):
        await broker.ok_cmd("RecordDeploymentsPolled", deployment_ids=[other["id"]], all_ready=True)
    await broker.ok_cmd("UpdateDeployment", id=mine["id"], description="changed")
    resource = f"prefect.deployment.{mine['id']}"
    with_polls = [e["event"] for e in await _all(broker, vocabulary="prefect", resource_id=resource)]
    assert with_polls == ["prefect.deployment.created", "prefect.deployment.ready", "prefect.deployment.updated"]
    monkeypatch.setattr(event_queries, "READ_BATCH", 4)
    monkeypatch.setattr(event_queries, "MAX_FOLD", 30)
    without = [e["event"] for e in await _all(broker, vocabulary="prefect", resource_id=resource)]
    assert without == ["prefect.deployment.created", "prefect.deployment.updated"]


async def test_an_aggregate_id_in_upper_case_finds_the_aggregate(broker):
    pool = await broker.ok_cmd("CreateWorkPool", name="upper", type="process")
    lower = await _read(broker, aggregate_type="work_pool", aggregate_id=pool["id"])
    upper = await _read(broker, aggregate_type="work_pool", aggregate_id=pool["id"].upper())
    assert upper == lower and [e["type"] for e in upper["events"]] == ["WorkPoolCreated"]
