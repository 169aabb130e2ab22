"""A deployment slot held by a run that stays PENDING (its infrastructure never comes up) is
given back when its lease runs out, as Prefect's lease reaper does: the foreman finds the run,
its decider releases the slot and wakes the next waiting run; the expired run, when it does
start, takes a slot again if one is free, and is cancelled if none is. Against real NATS and
Postgres, with the service's lease shortened to 1 s."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime

import pytest
from typer.testing import CliRunner

from runledger.cli.main import _register, app
from runledger.handlers.background import CommandSender
from runledger.handlers.foreman import Foreman
from runledger.infra.nats_connection import connect
from tests.integration.broker import assert_live_equals_rebuild, cli_env

_register()

LEASE_SECONDS = 1.0


@pytest.fixture
def settings(settings):
    """The service's default lease (no `grace_period_seconds` on the deployment), and how long
    a waiting run keeps the slots a release handed it, shortened."""
    return settings.model_copy(update={"deployment_slot_lease_seconds": LEASE_SECONDS,
                                       "handed_slot_seconds": LEASE_SECONDS})


async def _set(broker, run_id: str, state: str) -> dict:
    reply = await broker.cmd("SetFlowRunState", id=run_id, state={"type": state})
    assert reply["ok"], reply
    return reply


async def _catch_up(broker) -> None:
    """The next queries wait for the read models to hold every event appended so far (the
    foreman's too, sent on its own connection)."""
    broker.last_seq = (await broker.nc.jetstream().stream_info(broker.settings.stream_name)).state.last_seq


async def _expire_leases(broker, foreman: Foreman, expected: int) -> None:
    """Foreman passes until `expected` leases expired (the read model may lag a moment)."""
    await asyncio.sleep(LEASE_SECONDS + 0.2)
    expired = 0
    for _ in range(50):
        await broker.ok_qry("CountFlowRuns")  # the read model has caught up with our writes
        expired += (await foreman.run_pass()).leases_expired
        if expired >= expected:
            break
        await asyncio.sleep(0.1)
    assert expired == expected
    await _catch_up(broker)


async def _active_slots(broker, deployment_id: str) -> int:
    return (await broker.ok_qry("GetDeployment", id=deployment_id))["global_concurrency_limit"]["active_slots"]


async def test_a_run_pending_past_its_lease_gives_its_slot_to_the_next_run(broker, service, settings):
    await broker.ok_cmd("CreateWorkPool", name="p", type="process")
    flow_id = (await broker.ok_cmd("CreateFlow", name="slow-infra"))["id"]
    deployment = await broker.ok_cmd("CreateDeployment", flow_id=flow_id, name="one", work_pool_name="p",
                                     concurrency_limit=1)
    stuck, waiting = [await broker.ok_cmd("CreateFlowRunFromDeployment", deployment_id=deployment["id"])
                      for _ in range(2)]
    assert (await _set(broker, stuck["id"], "PENDING"))["orchestration"]["status"] == "ACCEPT"
    refused = await _set(broker, waiting["id"], "PENDING")
    assert refused["result"]["name"] == "AwaitingConcurrencySlot"  # due in 30 s

    nc = await connect(settings)
    try:
        foreman = Foreman(service.engine, CommandSender(nc, settings), deployment_lease_seconds=LEASE_SECONDS)
        await _expire_leases(broker, foreman, 1)

        expired = await broker.ok_qry("GetFlowRun", id=stuck["id"])
        assert expired["state_type"] == "PENDING" and expired["deployment_lease_expired"] is True
        shown = await asyncio.to_thread(CliRunner().invoke, app, ["flow-run", "inspect", stuck["id"]],
                                        env=cli_env(settings))
        assert shown.exit_code == 0 and "Deployment slot: its lease expired" in shown.stdout, shown.output
        # The slot went to the waiting run, woken (due now, not in 30 s) and holding it until
        # its claim, which takes it.
        assert await _active_slots(broker, deployment["id"]) == 1
        woken = await broker.ok_qry("GetFlowRun", id=waiting["id"])
        assert datetime.fromisoformat(woken["next_scheduled_start_time"]) <= datetime.now(UTC)
        assert woken["state"]["state_details"]["deployment_concurrency_lease_id"] is not None
        claimed = await _set(broker, waiting["id"], "PENDING")
        assert claimed["orchestration"]["status"] == "ACCEPT"
        assert (claimed["result"]["state_details"]["deployment_concurrency_lease_id"]
                == woken["state"]["state_details"]["deployment_concurrency_lease_id"])
        assert await _active_slots(broker, deployment["id"]) == 1

        # The slow run's infrastructure comes up at last: no slot is free, so it is cancelled.
        late = await _set(broker, stuck["id"], "RUNNING")
        assert late["orchestration"]["status"] == "REJECT"
        assert late["orchestration"]["details"]["reason"] == "Deployment concurrency limit reached after lease expiry."
        assert late["result"]["type"] == "CANCELLED"
        assert late["result"]["message"].startswith("Deployment concurrency slot lost during provisioning")
        assert await _active_slots(broker, deployment["id"]) == 1
        assert (await broker.ok_qry("GetFlowRun", id=stuck["id"]))["deployment_lease_expired"] is False

        # Once the slot is free again, a run whose lease expired takes it back when it starts.
        await _set(broker, waiting["id"], "RUNNING")
        await _set(broker, waiting["id"], "COMPLETED")
        third = await broker.ok_cmd("CreateFlowRunFromDeployment", deployment_id=deployment["id"])
        assert (await _set(broker, third["id"], "PENDING"))["orchestration"]["status"] == "ACCEPT"
        await _expire_leases(broker, foreman, 1)
        assert await _active_slots(broker, deployment["id"]) == 0
        started = await _set(broker, third["id"], "RUNNING")
        assert started["orchestration"]["status"] == "ACCEPT" and started["result"]["type"] == "RUNNING"
        assert await _active_slots(broker, deployment["id"]) == 1

        # Sent again (a second foreman, a stale read): nothing more is written.
        before = await broker.stream_messages()
        lease = expired["state"]["state_details"]["deployment_concurrency_lease_id"]
        again = await broker.cmd("ExpireDeploymentSlotLease", id=stuck["id"], lease_id=lease)
        assert again["ok"] and again["result"]["type"] == "CANCELLED"
        assert await broker.stream_messages() == before
    finally:
        await nc.close()
    await assert_live_equals_rebuild(service, settings)


async def test_a_deployments_grace_period_is_its_slots_lease(broker, service, settings):
    """`concurrency_options.grace_period_seconds` (60 s at least) outlasts the service's
    default: the run keeps its slot."""
    await broker.ok_cmd("CreateWorkPool", name="p", type="process")
    flow_id = (await broker.ok_cmd("CreateFlow", name="patient"))["id"]
    deployment = await broker.ok_cmd("CreateDeployment", flow_id=flow_id, name="one", work_pool_name="p",
                                     concurrency_limit=1, concurrency_options={"grace_period_seconds": 60})
    run = await broker.ok_cmd("CreateFlowRunFromDeployment", deployment_id=deployment["id"])
    await _set(broker, run["id"], "PENDING")
    nc = await connect(settings)
    try:
        foreman = Foreman(service.engine, CommandSender(nc, settings), deployment_lease_seconds=LEASE_SECONDS)
        await asyncio.sleep(LEASE_SECONDS + 0.2)
        await broker.ok_qry("CountFlowRuns")
        assert (await foreman.run_pass()).leases_expired == 0
        lease = (await broker.ok_qry("GetFlowRun", id=run["id"]))["state"]["state_details"][
            "deployment_concurrency_lease_id"]
        # Asked directly, the decider checks the time itself: nothing is written.
        before = await broker.stream_messages()
        assert (await broker.cmd("ExpireDeploymentSlotLease", id=run["id"], lease_id=lease))["ok"]
        assert await broker.stream_messages() == before
    finally:
        await nc.close()
    assert await _active_slots(broker, deployment["id"]) == 1


async def test_slots_handed_to_a_run_nobody_claims_go_to_the_next_waiter(broker, service, settings):
    """A release hands the slots it frees to the run it wakes; when that run's worker never
    comes for it (it stopped polling), the foreman gives them back after `handed_slot_seconds`:
    to the next waiter, and the first one waits again at the end of the line."""
    await broker.ok_cmd("CreateWorkPool", name="p", type="process")
    flow_id = (await broker.ok_cmd("CreateFlow", name="forgotten"))["id"]
    deployment = await broker.ok_cmd("CreateDeployment", flow_id=flow_id, name="one", work_pool_name="p",
                                     concurrency_limit=1)
    holder, first, second = [(await broker.ok_cmd("CreateFlowRunFromDeployment", deployment_id=deployment["id"]))["id"]
                             for _ in range(3)]
    await _set(broker, holder, "PENDING")
    for waiter in (first, second):
        assert (await _set(broker, waiter, "PENDING"))["result"]["name"] == "AwaitingConcurrencySlot"
    await _set(broker, holder, "COMPLETED")
    handed = await broker.ok_qry("GetFlowRun", id=first)
    assert handed["state"]["state_details"]["deployment_concurrency_lease_id"] is not None

    nc = await connect(settings)
    try:
        foreman = Foreman(service.engine, CommandSender(nc, settings), deployment_lease_seconds=LEASE_SECONDS,
                          handed_slot_seconds=LEASE_SECONDS)
        await _expire_leases(broker, foreman, 1)
    finally:
        await nc.close()
    gave_back = await broker.ok_qry("GetFlowRun", id=first)
    assert gave_back["state_name"] == "AwaitingConcurrencySlot" and gave_back["pool_slot_reserved"] is False
    assert gave_back["state"]["state_details"]["deployment_concurrency_lease_id"] is None
    assert "went unclaimed" in gave_back["state"]["message"]
    now_second = await broker.ok_qry("GetFlowRun", id=second)
    assert now_second["pool_slot_reserved"] is True
    assert now_second["state"]["state_details"]["deployment_concurrency_lease_id"] is not None
    assert await _active_slots(broker, deployment["id"]) == 1  # still one: the second run's
    # The first run's claim now waits again; the second's goes through.
    assert (await _set(broker, first, "PENDING"))["result"]["name"] == "AwaitingConcurrencySlot"
    assert (await _set(broker, second, "PENDING"))["orchestration"]["status"] == "ACCEPT"
    await assert_live_equals_rebuild(service, settings)
