"""A RUNNING flow run's deployment slot, held by a process that renews its lease, goes back
once the process stops renewing it (it died), instead of being held for ever with every other
run of the deployment waiting behind it (Prefect issue #17415). Against real NATS and
Postgres; leases of a second or so, and the foreman's passes run by the test."""

from __future__ import annotations

import asyncio

import pytest
from typer.testing import CliRunner

from runledger.cli.main import _register, app
from runledger.client import DeploymentSlotLost, NotFound, RunledgerClient
from runledger.client import leases as client_leases
from runledger.handlers.background import CommandSender
from runledger.handlers.foreman import Foreman
from runledger.infra.nats_connection import connect
from tests.integration.broker import assert_live_equals_rebuild, cli_env

_register()

LEASE_SECONDS = 1.0


async def _deployment_with_one_slot(rl: RunledgerClient) -> tuple[str, str, str]:
    """A deployment with a limit of 1: (deployment id, a run holding its slot RUNNING, a run
    waiting for it)."""
    await rl.create_work_pool("p", type="process")
    flow = await rl.create_flow("renewing")
    deployment, _ = await rl.create_deployment(flow.id, "one", work_pool_name="p", concurrency_limit=1)
    holder = await rl.create_flow_run_from_deployment(deployment.id)
    waiter = await rl.create_flow_run_from_deployment(deployment.id)
    assert (await rl.set_flow_run_state(holder.id, "PENDING")).status == "ACCEPT"
    assert (await rl.set_flow_run_state(holder.id, "RUNNING")).status == "ACCEPT"  # no worker named
    refused = await rl.set_flow_run_state(waiter.id, "PENDING")
    assert refused.state.name == "AwaitingConcurrencySlot"
    return str(deployment.id), str(holder.id), str(waiter.id)


async def _active_slots(rl: RunledgerClient, deployment_id: str) -> int:
    await rl.catch_up()
    return (await rl.read_deployment(deployment_id)).global_concurrency_limit["active_slots"]


async def _expire(rl: RunledgerClient, foreman: Foreman, expected: int) -> None:
    """Foreman passes until `expected` leases ran out (the read model may lag a moment); one
    pass, on a read model that caught up, when none should."""
    expired = 0
    for _ in range(50):
        await rl.catch_up()
        await rl.count_flow_runs()
        expired += (await foreman.run_pass()).leases_expired
        if expired >= expected:
            break
        await asyncio.sleep(0.1)
    assert expired == expected
    await rl.catch_up()  # the foreman's writes, on its own connection


@pytest.fixture
async def foreman(service, settings):
    nc = await connect(settings)
    try:
        yield Foreman(service.engine, CommandSender(nc, settings))
    finally:
        await nc.close()


async def test_a_running_runs_slot_goes_back_when_its_process_stops_renewing_it(client, broker, foreman, service,
                                                                                settings):
    rl = client
    deployment_id, holder, waiter = await _deployment_with_one_slot(rl)

    # Never renewed, a RUNNING run keeps its slot, however long it runs.
    await asyncio.sleep(LEASE_SECONDS + 0.2)
    await _expire(rl, foreman, 0)
    assert await _active_slots(rl, deployment_id) == 1

    # Its process renews the lease once, then dies.
    renewal = await rl.renew_deployment_slot_lease(holder, lease_seconds=LEASE_SECONDS)
    run = await rl.read_flow_run(holder)
    assert str(renewal.lease_id) == run.state.state_details["deployment_concurrency_lease_id"]
    assert run.deployment_lease_expiration == renewal.expiration
    shown = await asyncio.to_thread(CliRunner().invoke, app, ["flow-run", "inspect", holder], env=cli_env(settings))
    assert shown.exit_code == 0 and "held under a renewed lease until" in shown.stdout, shown.output

    await asyncio.sleep(LEASE_SECONDS + 0.2)
    await _expire(rl, foreman, 1)
    gone = await rl.read_flow_run(holder)
    assert gone.state_type == "RUNNING" and gone.deployment_lease_expired and gone.deployment_lease_expiration is None
    # The slot went to the waiting run, woken at once and holding it until its claim takes it.
    woken = await rl.read_flow_run(waiter)
    assert woken.state.state_details["deployment_concurrency_lease_id"] is not None
    assert (await rl.set_flow_run_state(waiter, "PENDING")).status == "ACCEPT"
    assert await _active_slots(rl, deployment_id) == 1

    # The dead process's renewal, had it come back: refused, and nothing written.
    before = await broker.stream_messages()
    with pytest.raises(NotFound, match="Lease not found"):
        await rl.renew_deployment_slot_lease(holder, lease_id=renewal.lease_id)
    assert await broker.stream_messages() == before
    # Its end gives nothing back twice.
    await rl.set_flow_run_state(holder, "COMPLETED")
    assert await _active_slots(rl, deployment_id) == 1
    await assert_live_equals_rebuild(service, settings)


async def test_hold_deployment_slot_keeps_the_slot_and_stops_the_block_once_it_is_lost(
        client, foreman, monkeypatch):
    rl = client
    deployment_id, holder, waiter = await _deployment_with_one_slot(rl)

    # Renewed in time, the slot stays however long the block lasts.
    async with rl.hold_deployment_slot(holder, lease_seconds=LEASE_SECONDS) as held:
        assert held.lease_id is not None
        for _ in range(3):
            await asyncio.sleep(LEASE_SECONDS * 0.8)
            await _expire(rl, foreman, 0)
        assert not held.lost
    assert await _active_slots(rl, deployment_id) == 1

    # A process that stalls past its lease (here: renewals three times too late) loses it, and
    # the block is stopped rather than run on past the limit.
    monkeypatch.setattr(client_leases, "RENEWAL_FRACTION", 3.0)

    async def stalled_flow() -> None:
        async with rl.hold_deployment_slot(holder, lease_seconds=LEASE_SECONDS):
            await asyncio.sleep(LEASE_SECONDS + 0.2)
            await _expire(rl, foreman, 1)
            await asyncio.sleep(30)  # the flow's work, stopped by the loss

    with pytest.raises(DeploymentSlotLost):
        await asyncio.wait_for(stalled_flow(), 10)
    assert (await rl.read_flow_run(holder)).deployment_lease_expired
    # The slot went to the run waiting for it.
    assert (await rl.read_flow_run(waiter)).state.state_details["deployment_concurrency_lease_id"] is not None
    assert await _active_slots(rl, deployment_id) == 1

    # A run that holds no lease: nothing to keep, the block just runs.
    plain = await rl.create_flow_run(await _flow_id(rl))
    async with rl.hold_deployment_slot(plain.id) as nothing:
        assert nothing.lease_id is None
    with pytest.raises(NotFound, match="not found"):
        async with rl.hold_deployment_slot("00000000-0000-0000-0000-000000000001"):
            pass


async def _flow_id(rl: RunledgerClient) -> str:
    return str((await rl.create_flow("renewing")).id)


async def test_a_block_entered_before_the_run_takes_its_slot_keeps_the_lease_it_takes(client, monkeypatch):
    """A process that runs the flow itself enters the block first, then claims the run: the
    lease taken at PENDING is found at once (the client's own state change tells the block)
    and renewed from then on."""
    rl = client
    monkeypatch.setattr(client_leases, "LOOK_FOR_LEASE_SECONDS", 60.0)  # found by the nudge, not a look
    await rl.create_work_pool("p", type="process")
    flow = await rl.create_flow("self-run")
    deployment, _ = await rl.create_deployment(flow.id, "one", work_pool_name="p", concurrency_limit=1)
    run = await rl.create_flow_run_from_deployment(deployment.id)
    async with rl.hold_deployment_slot(run.id, lease_seconds=60) as held:
        assert held.lease_id is None  # SCHEDULED: no slot yet
        assert (await rl.set_flow_run_state(run.id, "PENDING")).status == "ACCEPT"
        for _ in range(20):
            if held.lease_id is not None:
                break
            await asyncio.sleep(0.1)
        read = await rl.read_flow_run(run.id)
        assert str(held.lease_id) == read.state.state_details["deployment_concurrency_lease_id"]
        assert read.deployment_lease_expiration is not None  # renewed: it runs out if this process dies
    # A run of a deployment without a limit has nothing to keep, and nothing is looked for.
    free, _ = await rl.create_deployment(flow.id, "free", work_pool_name="p")
    other = await rl.create_flow_run_from_deployment(free.id)
    async with rl.hold_deployment_slot(other.id) as nothing:
        assert nothing.lease_id is None and nothing._renewing is None
