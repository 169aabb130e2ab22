"""Concurrency slots under races (BEHAVIOUR §4, OR-7, OR-13): 32 claimers, served by two service
instances (each with its own cache and locks, so only the log can keep the count), race for
the runs of a pool with limits on the pool, its queues and a deployment. Each check reads the
event log in order and replays the slot holders: at no moment more than a limit allows, and
no run claimed twice."""

from __future__ import annotations

import asyncio
import json
import random
from collections import Counter
from datetime import UTC, datetime
from typing import Any

from runledger.infra.event_store import EventStore
from runledger.infra.nats_connection import connect
from tests.integration.broker import assert_live_equals_rebuild

CLAIMERS = 32
HOLDING = {"PENDING", "RUNNING"}


async def _cmd(nc, settings, name: str, body: dict[str, Any]) -> dict[str, Any]:
    reply = await nc.request(settings.command_subject(name), json.dumps(body).encode(), timeout=30)
    return json.loads(reply.data)


async def _claim_all(settings, run_ids: list[str], seed: int) -> Counter:
    """32 claimers, each over its own connection, take any run still waiting, run it briefly
    and complete it, until every run is done. Returns the outcomes of the claims."""
    outcomes: Counter = Counter()
    done: set[str] = set()
    conns = [await connect(settings) for _ in range(4)]

    async def claimer(i: int) -> None:
        rng = random.Random(seed * 100 + i)
        nc = conns[i % len(conns)]
        while len(done) < len(run_ids):
            run_id = rng.choice([r for r in run_ids if r not in done] or run_ids)
            # Due now, whatever the run's scheduled time (a waiter's retry time is 30 s away).
            now = datetime.now(UTC).isoformat()
            reply = await _cmd(nc, settings, "SetFlowRunState",
                               {"id": run_id, "state": {"type": "PENDING", "state_details": {"scheduled_time": now}}})
            if not reply["ok"] and reply["error"]["code"] == "conflict":
                # Two instances fighting for one limit: a claim that lost every race of its
                # retries says so (`conflict`: try again), as a worker's claim would hear it.
                outcomes["conflict"] += 1
                await asyncio.sleep(rng.uniform(0, 0.005))
                continue
            assert reply["ok"], reply
            status = reply["orchestration"]["status"]
            outcomes[status] += 1
            if status != "ACCEPT":
                await asyncio.sleep(rng.uniform(0, 0.005))
                continue
            await asyncio.sleep(rng.uniform(0, 0.01))
            running = await _cmd(nc, settings, "SetFlowRunState", {"id": run_id, "state": {"type": "RUNNING"}})
            assert running["ok"] and running["orchestration"]["status"] == "ACCEPT", running
            await asyncio.sleep(rng.uniform(0, 0.01))
            # A persisted result: a late claimer's PENDING is then refused, not a rerun.
            finished = await _cmd(nc, settings, "SetFlowRunState",
                                  {"id": run_id, "state": {"type": "COMPLETED", "data": {"type": "reference"}}})
            assert finished["ok"] and finished["orchestration"]["status"] == "ACCEPT", finished
            done.add(run_id)

    try:
        await asyncio.wait_for(asyncio.gather(*(claimer(i) for i in range(CLAIMERS))), 120)
    finally:
        for nc in conns:
            await nc.close()
    return outcomes


async def _run_events_in_log_order(settings, run_ids: set[str]) -> list[dict[str, Any]]:
    nc = await connect(settings)
    try:
        rows = await EventStore(nc, settings).read_subject(f"{settings.event_subject_prefix}.flow_run.*.*")
    finally:
        await nc.close()
    events = [json.loads(data) for _, _, data, _ in sorted(rows, key=lambda r: r[0])]
    return [e for e in events if e["aggregate_id"] in run_ids and e["type"] in ("FlowRunCreated", "FlowRunStateSet")]


def _replay_holders(events: list[dict[str, Any]], holds: Any) -> tuple[list[set[str]], Counter]:
    """The holders after each event (a run holds while `holds(run)`), and each run's claims."""
    state: dict[str, bool] = {}
    claims: Counter = Counter()
    history = []
    for e in events:
        run = e["payload"]["run"]
        was, now = state.get(run["id"], False), holds(run)
        if now and not was:
            claims[run["id"]] += 1
        state[run["id"]] = now
        history.append({r for r, h in state.items() if h})
    return history, claims


async def test_32_claimers_never_exceed_a_pool_limit_of_5_or_queue_limits_of_2(broker, settings, second_instance):
    await broker.ok_cmd("CreateWorkPool", name="tight", type="process", concurrency_limit=5)
    queues = [f"q{i}" for i in range(4)]
    for name in queues:
        await broker.ok_cmd("CreateWorkQueue", work_pool_name="tight", name=name, concurrency_limit=2)
    flow_id = (await broker.ok_cmd("CreateFlow", name="raced"))["id"]
    runs = {}
    for i in range(40):
        run = await broker.ok_cmd("CreateFlowRun", flow_id=flow_id, work_pool_name="tight",
                                  work_queue_name=queues[i % 4], state={"type": "SCHEDULED"})
        runs[run["id"]] = run["work_queue_id"]

    outcomes = await _claim_all(settings, list(runs), seed=1)

    assert outcomes["ACCEPT"] == len(runs)
    assert outcomes["REJECT"] > 0  # the limits did hold claimers back
    events = await _run_events_in_log_order(settings, set(runs))
    history, claims = _replay_holders(events, lambda run: run["state_type"] in HOLDING)
    assert max(len(h) for h in history) == 5  # reached, never passed
    for holders in history:
        per_queue = Counter(runs[r] for r in holders)
        assert max(per_queue.values(), default=0) <= 2, per_queue
    assert set(claims.values()) == {1}  # each run claimed once
    # The counts in the log are back to zero.
    pool = await broker.ok_qry("GetWorkPool", name="tight")
    last = await second_instance.store.last_event("pool_slots", f"slots-{pool['id']}")
    assert last is not None and last.envelope.payload["slots"]["by_queue"] == {}
    await assert_live_equals_rebuild(second_instance, settings)


async def test_32_claimers_never_exceed_a_deployment_limit_and_waiters_get_their_turn(broker, settings,
                                                                                       second_instance):
    await broker.ok_cmd("CreateWorkPool", name="open", type="process")
    flow_id = (await broker.ok_cmd("CreateFlow", name="limited"))["id"]
    deployment = await broker.ok_cmd("CreateDeployment", flow_id=flow_id, name="three-at-a-time",
                                     work_pool_name="open", concurrency_limit=3)
    runs = []
    for _ in range(24):
        made = await broker.ok_cmd("CreateFlowRunFromDeployment", deployment_id=deployment["id"])
        runs.append(made["id"])

    outcomes = await _claim_all(settings, runs, seed=2)

    assert outcomes["ACCEPT"] == len(runs) and outcomes["REJECT"] > 0
    events = await _run_events_in_log_order(settings, set(runs))
    leased = lambda run: (run["state_type"] in ("PENDING", "RUNNING", "CANCELLING")  # noqa: E731
                          and run["state"]["state_details"]["deployment_concurrency_lease_id"] is not None)
    history, claims = _replay_holders(events, leased)
    assert max(len(h) for h in history) == 3
    assert set(claims.values()) == {1}
    waited = [e for e in events if e["payload"]["run"]["state_name"] == "AwaitingConcurrencySlot"]
    # Each says why it waits, but for one a release handed the slot it freed: it waits no more.
    handed = lambda run: run["state"]["state_details"]["deployment_concurrency_lease_id"] is not None  # noqa: E731
    assert waited and all(e["payload"]["run"]["waiting_reason"] == (
        None if handed(e["payload"]["run"]) else "Deployment concurrency limit reached.") for e in waited)
    limit = await broker.ok_qry("GetConcurrencyLimitByName", name=f"deployment:{deployment['id']}")
    assert limit["active_slots"] == 0 and limit["limit"] == 3
    # Each release woke the first waiter still waiting: its next attempt was due at once.
    woken = [e for e in waited if e["payload"]["run"]["state"]["message"] ==
             "A slot of the deployment's concurrency limit was freed."]
    assert woken
    for e in woken:
        state = e["payload"]["run"]["state"]
        due, written = (datetime.fromisoformat(state[k] if k == "timestamp" else state["state_details"][k])
                        for k in ("scheduled_time", "timestamp"))
        assert abs((written - due).total_seconds()) < 1
    await assert_live_equals_rebuild(second_instance, settings)
