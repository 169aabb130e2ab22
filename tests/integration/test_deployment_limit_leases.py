"""A deployment's concurrency limit holds, whatever happens to the leases of its slots: a run
whose lease expired while PENDING takes no slot by moving between PENDING's sub-states; a
lease of a limit that was removed and set again gives back nothing of the new one; and the
clock marks `Late` only runs still `Scheduled` past their time, so a run waiting for a slot
keeps its place. Against real NATS and Postgres."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from tests.integration.broker import assert_live_equals_rebuild, foreman_clock


async def _set(broker, run_id: str, type_: str, name: str | None = None) -> dict:
    state = {"type": type_, **({"name": name} if name else {})}
    reply = await broker.cmd("SetFlowRunState", id=run_id, state=state)
    assert reply["ok"], reply
    return reply


async def _active_slots(broker, deployment_id: str) -> int:
    return (await broker.ok_qry("GetDeployment", id=deployment_id))["global_concurrency_limit"]["active_slots"]


async def _deployment(broker, name: str, **fields) -> dict:
    flow_id = (await broker.ok_cmd("CreateFlow", name=name))["id"]
    return await broker.ok_cmd("CreateDeployment", flow_id=flow_id, name="one", concurrency_limit=1, **fields)


async def _runs(broker, deployment: dict, n: int) -> list[dict]:
    return [await broker.ok_cmd("CreateFlowRunFromDeployment", deployment_id=deployment["id"]) for _ in range(n)]


async def _running(broker) -> int:
    return await broker.ok_qry("CountFlowRuns", flow_runs={"state_type": {"any_": ["RUNNING"]}})


async def test_a_run_whose_lease_expired_takes_no_slot_through_pending_sub_states(broker, service, settings):
    await broker.ok_cmd("CreateWorkPool", name="p", type="process")
    deployment = await _deployment(broker, "slow-infra", work_pool_name="p")
    slow, other = await _runs(broker, deployment, 2)
    assert (await _set(broker, slow["id"], "PENDING"))["orchestration"]["status"] == "ACCEPT"
    assert (await _set(broker, other["id"], "PENDING"))["result"]["name"] == "AwaitingConcurrencySlot"
    await broker.catch_up()
    async with foreman_clock(service, settings) as at:
        # Past the slot's lease: the slot goes back and to the waiting run, which starts.
        later = datetime.now(UTC) + timedelta(seconds=settings.deployment_slot_lease_seconds + 60)
        assert await at(later).deployment_leases_expired() == 1
        await broker.catch_up()
        assert (await _set(broker, other["id"], "PENDING"))["orchestration"]["status"] == "ACCEPT"
        assert (await _set(broker, other["id"], "RUNNING"))["orchestration"]["status"] == "ACCEPT"

        # The slow run's worker goes on through PENDING's sub-states: accepted, holding nothing.
        for name in ("Submitting", "InfrastructurePending"):
            sub = await _set(broker, slow["id"], "PENDING", name)
            assert sub["orchestration"]["status"] == "ACCEPT" and sub["result"]["name"] == name
            assert sub["result"]["state_details"]["deployment_concurrency_lease_id"] is None
        assert await _active_slots(broker, deployment["id"]) == 1
        assert (await broker.ok_qry("GetFlowRun", id=slow["id"]))["deployment_lease_expired"] is True

        # Its RUNNING finds no slot free: cancelled, not a second run past the limit.
        started = await _set(broker, slow["id"], "RUNNING")
        assert started["orchestration"]["status"] == "REJECT"
        assert started["result"]["type"] == "CANCELLED"
        assert await _active_slots(broker, deployment["id"]) == 1
        assert await _running(broker) == 1
    await assert_live_equals_rebuild(service, settings)


async def test_a_limit_removed_and_set_again_counts_only_its_own_slots(broker, service, settings):
    deployment = await _deployment(broker, "reset")
    first, second, third = await _runs(broker, deployment, 3)
    await _set(broker, first["id"], "PENDING")
    await _set(broker, first["id"], "RUNNING")
    await broker.ok_cmd("UpdateDeployment", id=deployment["id"], concurrency_limit=None)
    await broker.ok_cmd("UpdateDeployment", id=deployment["id"], concurrency_limit=1)
    assert await _active_slots(broker, deployment["id"]) == 0  # a new limit: nothing held
    await _set(broker, second["id"], "PENDING")
    await _set(broker, second["id"], "RUNNING")
    assert await _active_slots(broker, deployment["id"]) == 1

    # The run that started under the removed limit ends: the new limit's slot stays taken.
    await _set(broker, first["id"], "COMPLETED")
    assert await _active_slots(broker, deployment["id"]) == 1
    waits = await _set(broker, third["id"], "PENDING")
    assert waits["orchestration"]["status"] == "REJECT" and waits["result"]["name"] == "AwaitingConcurrencySlot"

    # The new limit's own run ends: its slot goes to the waiting run.
    await _set(broker, second["id"], "COMPLETED")
    claimed = await _set(broker, third["id"], "PENDING")
    assert claimed["orchestration"]["status"] == "ACCEPT"
    assert await _active_slots(broker, deployment["id"]) == 1
    await assert_live_equals_rebuild(service, settings)


async def test_the_clock_leaves_a_run_waiting_for_a_slot_in_its_place(broker, service, settings):
    """The clock read the run as `Scheduled` and past due; by the time its command is decided
    the run waits for a slot (`AwaitingConcurrencySlot`), due in 30 s: nothing is written,
    and the release still wakes it."""
    past = (datetime.now(UTC) - timedelta(minutes=5)).isoformat()
    deployment = await _deployment(broker, "waiting")
    holder, due_now = await _runs(broker, deployment, 2)
    waiter = await broker.ok_cmd("CreateFlowRunFromDeployment", deployment_id=deployment["id"],
                                 state={"type": "SCHEDULED", "state_details": {"scheduled_time": past}})
    await _set(broker, holder["id"], "PENDING")
    assert (await _set(broker, waiter["id"], "PENDING"))["result"]["name"] == "AwaitingConcurrencySlot"

    before = await broker.stream_messages()
    marked = await broker.cmd("MarkFlowRunLate", id=waiter["id"])
    assert marked["ok"] and marked["orchestration"]["status"] == "REJECT"
    assert marked["result"]["name"] == "AwaitingConcurrencySlot"
    for run in (holder, due_now):  # PENDING: moved on; `Scheduled`, but due just now
        refused = await broker.cmd("MarkFlowRunLate", id=run["id"])
        assert refused["ok"] and refused["orchestration"]["status"] == "REJECT"
    assert await broker.stream_messages() == before

    await _set(broker, holder["id"], "COMPLETED")
    woken = await broker.ok_qry("GetFlowRun", id=waiter["id"])
    assert woken["state_name"] == "AwaitingConcurrencySlot"
    assert woken["state"]["state_details"]["deployment_concurrency_lease_id"] is not None  # handed the slot
    assert (await _set(broker, waiter["id"], "PENDING"))["orchestration"]["status"] == "ACCEPT"
