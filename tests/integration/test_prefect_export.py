"""`runledger events --vocabulary prefect`: commands through the broker, the log exported in
Prefect's event vocabulary by the CLI (BEHAVIOUR §10)."""

from __future__ import annotations

import asyncio
import json
import uuid

from typer.testing import CliRunner

from .broker import cli_env

EVENT_KEYS = {"occurred", "event", "resource", "related", "payload", "id", "follows"}


async def _cli(settings, *args: str):
    from runledger.cli.main import _register, app

    _register()
    # The CLI runs its own event loop: run it in a thread.
    result = await asyncio.to_thread(CliRunner().invoke, app, ["events", *args], env=cli_env(settings))
    assert result.exit_code == 0, result.output
    return result


async def _export(settings, *args: str) -> list[dict]:
    result = await _cli(settings, "--vocabulary", "prefect", *args)
    return [json.loads(line) for line in result.stdout.splitlines()]


def _brief(events: list[dict]) -> list[tuple[str, str | None]]:
    return [(e["event"], e["resource"].get("prefect.resource.name")) for e in events]


async def _history(broker) -> dict[str, str]:
    alpha = await broker.ok_cmd("CreateWorkPool", name="alpha", type="process")
    await broker.ok_cmd("CreateWorkQueue", work_pool_name="alpha", name="a", priority=1)  # a1 default2
    await broker.ok_cmd("CreateWorkQueue", work_pool_name="alpha", name="b")  # b3
    await broker.ok_cmd("UpdateWorkPool", name="alpha", description="d", concurrency_limit=5)
    await broker.ok_cmd("UpdateWorkPool", name="alpha", is_paused=True)
    await broker.ok_cmd("UpdateWorkPool", name="alpha", is_paused=False)
    await broker.ok_cmd("UpdateWorkQueue", work_pool_name="alpha", work_queue_name="a", description="x", is_paused=True)
    await broker.ok_cmd("SetWorkQueuePriorities", work_pool_name="alpha", priorities={"b": 1})  # b1 a2 default3
    legacy = await broker.ok_cmd("CreateLegacyWorkQueue", name="legacy")  # priority 2
    await broker.ok_cmd("UpdateWorkQueueById", id=legacy["id"], priority=1)  # WQ-11: stored as given
    await broker.ok_cmd("DeleteWorkQueue", work_pool_name="alpha", work_queue_name="b")
    await broker.ok_cmd("DeleteWorkPool", name="alpha")
    return {"alpha": alpha["id"], "default": alpha["default_queue_id"], "legacy": legacy["id"]}


async def test_the_log_exported_in_prefects_vocabulary(broker, settings):
    ids = await _history(broker)
    events = await _export(settings)
    assert all(set(e) == EVENT_KEYS for e in events)
    assert len({e["id"] for e in events}) == len(events)
    assert _brief(events[:10]) == [
        ("prefect.work-queue.created", "default"),
        ("prefect.work-pool.created", "alpha"),
        ("prefect.work-pool.not-ready", "alpha"),
        ("prefect.work-queue.created", "a"),
        ("prefect.work-queue.created", "b"),
        ("prefect.work-pool.updated", "alpha"),
        ("prefect.work-pool.paused", "alpha"),
        ("prefect.work-pool.not-ready", "alpha"),  # resumed, no online worker (WP-8)
        ("prefect.work-queue.updated", "a"),
        ("prefect.work-queue.paused", "a"),
    ]
    # SetWorkQueuePriorities: one update per moved queue
    assert sorted(_brief(events[10:13])) == [("prefect.work-queue.updated", n) for n in ("a", "b", "default")]
    moved = {e["resource"]["prefect.resource.name"]: e["payload"]["updates"]["priority"] for e in events[10:13]}
    assert moved == {"b": {"from": 3, "to": 1}, "a": {"from": 1, "to": 2}, "default": {"from": 2, "to": 3}}
    assert _brief(events[13:]) == [
        ("prefect.work-queue.created", "default"),
        ("prefect.work-pool.created", "default-agent-pool"),  # prefect-agent: no status event
        ("prefect.work-queue.created", "legacy"),
        ("prefect.work-queue.updated", "legacy"),
        ("prefect.work-queue.deleted", "b"),
        ("prefect.work-queue.deleted", "a"),  # the pool's queues in priority order, then the pool
        ("prefect.work-queue.deleted", "default"),
        ("prefect.work-pool.deleted", "alpha"),
    ]

    created = events[1]
    assert created["resource"] == {"prefect.resource.id": f"prefect.work-pool.{ids['alpha']}",
                                   "prefect.resource.name": "alpha", "prefect.work-pool.type": "process",
                                   "prefect.resource.role": "work-pool"}
    assert created["related"] == [{"prefect.resource.id": f"prefect.work-queue.{ids['default']}",
                                   "prefect.resource.role": "default-queue"}]
    pool_ref = {"prefect.resource.id": f"prefect.work-pool.{ids['alpha']}", "prefect.resource.name": "alpha",
                "prefect.work-pool.type": "process", "prefect.resource.role": "work-pool"}
    assert all(e["related"] == [pool_ref] for e in events if e["event"].startswith("prefect.work-queue.")
               and e["resource"]["prefect.resource.name"] in ("a", "b"))
    assert events[5]["payload"] == {"updated_fields": ["description", "concurrency_limit"],
                                    "updates": {"description": {"from": None, "to": "d"},
                                                "concurrency_limit": {"from": None, "to": 5}}}
    paused, resumed = events[6], events[7]
    assert paused["follows"] is None and resumed["follows"] == paused["id"]
    assert events[8]["payload"] == {"updated_fields": ["description"],
                                    "updates": {"description": {"from": "", "to": "x"}}}
    assert events[16]["resource"]["prefect.resource.id"] == f"prefect.work-queue.{ids['legacy']}"
    assert events[16]["payload"]["updates"] == {"priority": {"from": 2, "to": 1}}

    # Deterministic: a second export is the same, byte for byte.
    assert await _export(settings) == events
    # Filters pick runledger events; names still come from the whole history.
    assert await _export(settings, "--type", "WorkPoolDeleted") == events[-3:]
    assert await _export(settings, "--id", ids["alpha"], "--type", "WorkQueuesReprioritized") == events[10:13]
    assert await _export(settings, "--limit", "2") == events[:2]
    # The default vocabulary is unchanged: envelopes with their seq.
    plain = (await _cli(settings, "--type", "WorkPoolDeleted")).stdout.splitlines()
    assert [json.loads(line)["type"] for line in plain] == ["WorkPoolDeleted"]


async def test_unknown_event_types_are_skipped_with_one_warning(broker, settings):
    await broker.ok_cmd("CreateWorkPool", name="p", type="process")
    stranger = str(uuid.uuid4())
    envelope = {"id": str(uuid.uuid4()), "type": "WorkPoolRenamed", "schema_version": 1,
                "occurred": "2026-11-23T14:52:00Z", "aggregate_type": "work_pool", "aggregate_id": stranger,
                "payload": {"name": "q"}, "idempotency_key": None}
    subject = f"{settings.event_subject_prefix}.work_pool.{stranger}.WorkPoolRenamed"
    await broker.nc.jetstream().publish(subject, json.dumps(envelope).encode(),
                                        headers={"Nats-Msg-Id": envelope["id"]})
    await broker.ok_cmd("UpdateWorkPool", name="p", is_paused=True)

    result = await _cli(settings, "--vocabulary", "prefect")
    lines = [json.loads(line) for line in result.stdout.splitlines()]
    assert [e["event"] for e in lines] == ["prefect.work-queue.created", "prefect.work-pool.created",
                                          "prefect.work-pool.not-ready", "prefect.work-pool.paused"]
    assert result.stderr.splitlines() == [
        "warning: the Prefect export skipped 1 event(s) it cannot map: WorkPoolRenamed (1)"]
