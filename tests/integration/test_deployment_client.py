"""The deployment and flow-run methods of the typed client, and the `deployment` / `flow-run`
verbs, against the real service: each method once, with what the service answers read back
into the client's models (their JSON the service's), the orchestration outcome of a proposed
state, and the CLI's main verbs in separate runs (each a new client that must see the last
one's writes)."""

from __future__ import annotations

import json
import uuid
from datetime import UTC, datetime, timedelta

import pytest

from runledger.cli.main import _register
from runledger.client import (
    Deployment,
    DeploymentPage,
    DeploymentSchedule,
    FlowRun,
    NotFound,
    OrchestrationResult,
    RunledgerClient,
    State,
)
from tests.integration.broker import cli_in_thread

_register()


async def test_each_deployment_method_against_the_service(service, settings):
    async with RunledgerClient(settings, idempotency_keys=True) as rl:
        flow = await rl.create_flow("etl")
        await rl.create_work_pool("pool", type="process")
        made, created = await rl.create_deployment(
            flow.id, "nightly", work_pool_name="pool", tags=["a"], parameters={"x": 1},
            schedules=[{"schedule": {"cron": "0 2 * * *", "timezone": "Europe/Berlin"}, "slug": "night"}])
        assert created is True and isinstance(made, Deployment)
        assert (made.work_pool_name, made.work_queue_name, made.tags) == ("pool", "default", ["a"])
        again, created = await rl.create_deployment(flow.id, "nightly", description="upserted")
        assert created is False and again.id == made.id and again.description == "upserted"

        read = await rl.read_deployment(made.id)
        assert read == again and await rl.read_deployment_by_name("etl/nightly") == read
        raw = (await rl.query("GetDeployment", {"id": str(made.id)})).result
        assert read.model_dump(mode="json") == raw  # what --json prints is the service's JSON

        updated = await rl.update_deployment(made.id, version="2", schedules=[
            {"schedule": {"interval": 3600}, "slug": "hourly"}])
        assert updated.version == "2" and [s.slug for s in updated.schedules] == ["hourly"]
        other, _ = await rl.create_deployment(flow.id, "adhoc", paused=True)
        assert [d.name for d in await rl.list_deployments()] == ["adhoc", "nightly"]
        assert await rl.read_deployments(flow_names=["etl"], paused=True) == [other]
        assert await rl.list_deployments(work_pool_names=["pool"], tags=["a"], limit=5, offset=0) == [updated]
        assert await rl.count_deployments() == 2 and await rl.count_deployments(names=["nightly"]) == 1
        page = await rl.paginate_deployments(page=2, limit=1)
        assert isinstance(page, DeploymentPage) and (page.count, page.pages, [d.name for d in page.results]) == (
            2, 2, ["nightly"])

        added = await rl.create_deployment_schedules(made.id, [{"schedule": {"interval": 600},
                                                                 "max_scheduled_runs": 5}])
        assert isinstance(added[0], DeploymentSchedule) and added[0].max_scheduled_runs == 5
        await rl.update_deployment_schedule(made.id, added[0].id, active=False)
        schedules = await rl.read_deployment_schedules(made.id)
        assert [(s.slug, s.active) for s in schedules] == [(None, False), ("hourly", True)]  # last updated first
        await rl.delete_deployment_schedule(made.id, added[0].id)
        assert [s.slug for s in await rl.read_deployment_schedules(made.id)] == ["hourly"]

        await rl.pause_deployment(made.id)
        assert (await rl.read_deployment(made.id)).paused is True
        await rl.resume_deployment(made.id)
        assert (await rl.read_deployment(made.id)).paused is False

        ids = await rl.schedule_deployment_runs(made.id, min_runs=3, max_runs=3)
        assert len(ids) == 3 and await rl.schedule_deployment_runs(made.id, min_runs=3, max_runs=3) == []
        start = datetime.now(UTC) - timedelta(hours=5)
        backfill = await rl.schedule_deployment_runs(made.id, start_time=start, end_time=start + timedelta(hours=2),
                                                     min_runs=10)
        assert len(backfill) in (2, 3)  # the hours in [start, start + 2h]
        scheduled = await rl.list_flow_runs(deployment_ids=[made.id], sort="EXPECTED_START_TIME_ASC")
        assert {r.id for r in scheduled} == set(ids) | set(backfill)
        assert all(r.state_type == "SCHEDULED" and r.auto_scheduled for r in scheduled)

        run = await rl.create_flow_run_from_deployment(made.id, parameters={"y": 2}, name="manual", tags=["t"],
                                                       work_queue_name="urgent", idempotency_key="once")
        assert isinstance(run, FlowRun) and run.parameters == {"x": 1, "y": 2} and run.state.type == "SCHEDULED"
        same = await rl.create_flow_run_from_deployment(made.id, idempotency_key="once")  # Prefect's key
        assert same.id == run.id
        results = await rl.create_flow_runs_from_deployment(made.id, [
            {"name": "b1"}, {"parameters": {"v": {"__prefect_kind": "json", "value": "{bad"}}}])
        assert [r.status for r in results] == ["CREATED", "FAILED"] and results[0].flow_run_id is not None

        await rl.delete_deployment(other.id)
        with pytest.raises(NotFound):
            await rl.read_deployment(other.id)


async def test_each_flow_run_method_against_the_service(service, settings):
    async with RunledgerClient(settings, idempotency_keys=True) as rl:
        flow = await rl.create_flow("etl")
        run = await rl.create_flow_run(flow.id, name="r1", parameters={"x": 1}, tags=["t"], idempotency_key="k1")
        assert isinstance(run, FlowRun) and run.state_type == "PENDING" and run.state.name == "Pending"
        assert (await rl.create_flow_run(flow.id, idempotency_key="k1")).id == run.id  # Prefect's key

        accepted = await rl.set_flow_run_state(run.id, "RUNNING")
        assert isinstance(accepted, OrchestrationResult) and accepted.status == "ACCEPT" and accepted.accepted
        assert isinstance(accepted.state, State) and accepted.state.type == "RUNNING"
        aborted = await rl.set_flow_run_state(run.id, {"type": "PENDING"})  # a running run is not pending again
        assert aborted.status == "ABORT" and aborted.details.reason and aborted.state.id == accepted.state.id
        done = await rl.set_flow_run_state(run.id, {"type": "COMPLETED", "message": "ok"})
        assert done.status == "ACCEPT"
        forced = await rl.set_flow_run_state(run.id, {"type": "PENDING", "name": "Again"}, force=True)
        assert (forced.status, forced.state.name) == ("ACCEPT", "Again")

        later = (datetime.now(UTC) + timedelta(minutes=5)).isoformat()
        waiting = await rl.create_flow_run(flow.id, state={"type": "SCHEDULED",
                                                           "state_details": {"scheduled_time": later}})
        wait = await rl.set_flow_run_state(waiting.id, "RUNNING")
        assert wait.status == "WAIT" and 290 <= wait.details.delay_seconds <= 300

        read = await rl.read_flow_run(run.id)
        assert (read.state_type, read.state_name, read.run_count) == ("PENDING", "Again", 1)
        raw = (await rl.query("GetFlowRun", {"id": str(run.id)})).result
        assert read.model_dump(mode="json") == raw
        history = await rl.read_flow_run_states(run.id)
        assert [s.type for s in history] == ["PENDING", "RUNNING", "COMPLETED", "PENDING"]

        await rl.update_flow_run(waiting.id, name="renamed", priority=-2, tags=["u"])
        renamed = await rl.read_flow_run(waiting.id)
        assert (renamed.name, renamed.priority, renamed.tags) == ("renamed", -2, ["u"])
        assert [r.id for r in await rl.list_flow_runs(state_types=["SCHEDULED"])] == [waiting.id]
        assert await rl.read_flow_runs(names=["r1", "renamed"], sort="NAME_ASC") == [read, renamed]
        assert await rl.count_flow_runs() == 2 and await rl.count_flow_runs(tags=["t"]) == 1
        assert await rl.count_flow_runs(expected_start_time_after=datetime.now(UTC) + timedelta(minutes=1)) == 1

        await rl.delete_flow_run(waiting.id)
        with pytest.raises(NotFound):
            await rl.read_flow_run(waiting.id)
        assert await rl.catch_up() is not None


async def test_deployment_and_flow_run_verbs_in_the_cli(service, settings):
    cli = cli_in_thread(settings)  # the CLI's own loop, in a thread: the service runs on this one

    async with RunledgerClient(settings) as rl:
        await rl.create_work_pool("pool", type="process")
    made = await cli("deployment", "create", "--flow", "etl", "--name", "nightly", "--pool", "pool",
                     "--cron", "0 2 * * *", "--timezone", "Europe/Berlin", "--param", "day=monday", "--tag", "x")
    assert made.exit_code == 0, made.output
    assert made.stdout.startswith("Created deployment 'etl/nightly'.")
    # Each is a new client: a read right after another run's write must see it.
    scheduled = await cli("deployment", "schedule", "etl/nightly", "--max-runs", "3", "--json")
    assert scheduled.exit_code == 0, scheduled.output
    ids = json.loads(scheduled.stdout)["flow_run_ids"]
    assert len(ids) == 3
    listed = await cli("deployment", "ls", "-o", "json")
    assert [d["name"] for d in json.loads(listed.stdout)] == ["nightly"]
    table = await cli("deployment", "ls")
    assert "etl/nightly" in table.stdout and "cron 0 2 * * * (Europe/Berlin)" in table.stdout

    ran = await cli("deployment", "run", "etl/nightly", "--name", "first-run", "--param", "day=friday")
    assert ran.exit_code == 0, ran.output
    assert ran.stdout.startswith("Created flow run 'first-run' of deployment 'etl/nightly'.")
    assert "State: SCHEDULED" in ran.stdout
    runs = json.loads((await cli("flow-run", "ls", "--deployment", "etl/nightly", "--json")).stdout)
    assert len(runs) == 4 and {r["id"] for r in runs} >= set(ids)
    pending = await cli("flow-run", "set-state", "first-run", "pending")
    assert pending.exit_code == 0 and pending.stdout.startswith("ACCEPT: flow run 'first-run' is PENDING.")
    again = await cli("flow-run", "set-state", "first-run", "PENDING")
    assert again.exit_code == 8 and again.stdout.startswith("ABORT: ") and "Reason: " in again.stdout
    assert (await cli("flow-run", "set-state", "first-run", "RUNNING")).exit_code == 0
    shown = await cli("flow-run", "inspect", "first-run", "--json")
    assert shown.exit_code == 0, shown.output
    inspected = json.loads(shown.stdout)
    assert [s["type"] for s in inspected["state_history"]] == ["SCHEDULED", "PENDING", "RUNNING"]
    assert inspected["parameters"] == {"day": "friday"}
    cancelled = await cli("flow-run", "cancel", "first-run")
    assert cancelled.exit_code == 0, cancelled.output
    assert cancelled.stdout.startswith("ACCEPT: flow run 'first-run' is CANCELLING.")
    state_filtered = json.loads((await cli("flow-run", "ls", "--state", "cancelling", "-o", "json")).stdout)
    assert [r["name"] for r in state_filtered] == ["first-run"]

    assert (await cli("deployment", "pause", "etl/nightly")).exit_code == 0
    assert json.loads((await cli("deployment", "inspect", "etl/nightly", "--json")).stdout)["paused"] is True
    # Scheduled when asked all the same (as Prefect's route does), and said so.
    while_paused = await cli("deployment", "schedule", "etl/nightly", "--max-runs", "4")
    assert while_paused.exit_code == 0 and while_paused.stdout.startswith("Scheduled "), while_paused.output
    assert "note: deployment 'etl/nightly' is paused" in while_paused.stderr
    assert (await cli("deployment", "resume", "etl/nightly")).exit_code == 0
    assert (await cli("deployment", "delete", "etl/nightly")).exit_code == 0
    gone = await cli("deployment", "inspect", "etl/nightly")
    assert gone.exit_code == 3 and gone.stderr == "Error (not_found): Deployment 'etl/nightly' not found.\n"
    unknown = await cli("flow-run", "inspect", str(uuid.uuid4()))
    assert unknown.exit_code == 3


async def test_an_update_that_drops_the_schedules_says_so(service, settings):
    """Re-running `deployment create` to change one option takes the schedules given (none), as
    Prefect's upsert does, and deletes their future runs: said on stderr, easy to miss otherwise."""
    cli = cli_in_thread(settings)
    async with RunledgerClient(settings) as rl:
        await rl.create_work_pool("pool", type="process")
    made = await cli("deployment", "create", "--flow", "etl", "--name", "nightly", "--pool", "pool", "--interval", "3600")
    assert made.exit_code == 0 and made.stderr == "", made.output
    again = await cli("deployment", "create", "--flow", "etl", "--name", "nightly", "--pool", "pool", "--interval", "3600",
                      "--limit", "2")
    assert again.exit_code == 0 and again.stderr == "", again.output  # its schedule given again: nothing to say
    dropped = await cli("deployment", "create", "--flow", "etl", "--name", "nightly", "--pool", "pool", "--limit", "3")
    assert dropped.exit_code == 0 and dropped.stdout.startswith("Updated deployment 'etl/nightly'."), dropped.output
    assert "note: the update replaced the deployment's 1 schedule with none" in dropped.stderr
    as_json = await cli("deployment", "create", "--flow", "etl", "--name", "other", "--pool", "pool", "--json")
    assert as_json.exit_code == 0 and as_json.stderr == ""
    for _ in range(2):  # an empty name (Prefect allows it), made then updated: the read before takes it too
        unnamed = await cli("deployment", "create", "--flow", "etl", "--name", "", "--pool", "pool")
        assert unnamed.exit_code == 0, unnamed.output
