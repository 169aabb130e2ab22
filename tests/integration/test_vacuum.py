"""The vacuum against real NATS and Postgres: finished runs older than the retention leave the
read models through `DeleteFlowRun` and `DeleteTaskRun` (their task runs and states with them),
the others stay, and a rebuild of the log still equals the live read models. The vacuum's clock
is moved instead of waiting an hour: runs that ended before `cutoff` are "older than the
retention"."""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime, timedelta

from runledger.handlers.background import CommandSender
from runledger.handlers.service import Service
from runledger.handlers.vacuum import Vacuum
from runledger.infra.nats_connection import connect
from tests.integration.broker import assert_live_equals_rebuild

RETENTION = 3600


async def _state(broker, run_id: str, *types: str) -> None:
    for type_ in types:
        reply = await broker.cmd("SetFlowRunState", id=run_id, state={"type": type_})
        assert reply["ok"] and reply["orchestration"]["status"] == "ACCEPT", reply


async def _task_state(broker, run_id: str, *types: str) -> None:
    for type_ in types:
        reply = await broker.cmd("SetTaskRunState", id=run_id, state={"type": type_})
        assert reply["ok"] and reply["orchestration"]["status"] == "ACCEPT", reply


async def _run(broker, flow_id: str, *types: str, **fields) -> str:
    run_id = (await broker.ok_cmd("CreateFlowRun", flow_id=flow_id, **fields))["id"]
    await _state(broker, run_id, *types)
    return run_id


async def _caught_up(broker) -> None:
    """The read models the vacuum reads hold everything the log holds now (the vacuum's own
    deletes too, sent on its own connection)."""
    await broker.catch_up()
    await broker.ok_qry("CountFlowRuns")
    await broker.ok_qry("CountTaskRuns")


async def _flow_run_ids(broker) -> set[str]:
    await _caught_up(broker)
    return {r["id"] for r in await broker.ok_qry("ListFlowRuns", limit=200)}


async def _task_run_ids(broker) -> set[str]:
    return {r["id"] for r in await broker.ok_qry("ListTaskRuns", limit=200)}


def _vacuum(service, nc, settings, cutoff: datetime, retention: float = RETENTION) -> Vacuum:
    """A vacuum whose cutoff (its now minus the retention) is `cutoff`."""
    now: Callable[[], datetime] = lambda: cutoff + timedelta(seconds=RETENTION)  # noqa: E731
    return Vacuum(service.engine, CommandSender(nc, settings), retention_seconds=retention, clock=now)


async def test_finished_runs_older_than_the_retention_leave_the_read_models_and_the_others_stay(
        broker, service, settings):
    flow_id = (await broker.ok_cmd("CreateFlow", name="etl"))["id"]
    completed = await _run(broker, flow_id, "RUNNING", "COMPLETED")
    failed = await _run(broker, flow_id, "RUNNING", "FAILED")
    cancelled = await _run(broker, flow_id, "CANCELLED")
    crashed = await _run(broker, flow_id, "RUNNING", "CRASHED")
    with_tasks = await _run(broker, flow_id, "RUNNING")
    its_task = (await broker.ok_cmd("CreateTaskRun", flow_run_id=with_tasks, task_key="t", dynamic_key="0"))["id"]
    await _task_state(broker, its_task, "RUNNING", "COMPLETED")
    await _state(broker, with_tasks, "COMPLETED")
    background_done = (await broker.ok_cmd("CreateTaskRun", task_key="bg", dynamic_key="0"))["id"]
    await _task_state(broker, background_done, "RUNNING", "COMPLETED")
    background_running = (await broker.ok_cmd("CreateTaskRun", task_key="bg", dynamic_key="1"))["id"]
    await _task_state(broker, background_running, "RUNNING")
    running = await _run(broker, flow_id, "RUNNING")
    scheduled = await _run(broker, flow_id, state={"type": "SCHEDULED"})
    # A subflow run that ended, in a parent that runs on: it stays while its parent does.
    parent_task = (await broker.ok_cmd("CreateTaskRun", flow_run_id=running, task_key="sub", dynamic_key="0"))["id"]
    subflow = await _run(broker, flow_id, "RUNNING", "COMPLETED", parent_task_run_id=parent_task)
    cutoff = datetime.now(UTC)
    recent = await _run(broker, flow_id, "RUNNING", "COMPLETED")  # ended after the cutoff
    kept = {running, scheduled, subflow, recent}
    assert await _flow_run_ids(broker) == {completed, failed, cancelled, crashed, with_tasks} | kept

    nc = await connect(settings)
    try:
        off = await _vacuum(service, nc, settings, cutoff + timedelta(days=3650), retention=0).run_pass()
        assert (off.flow_runs_deleted, off.task_runs_deleted) == (0, 0)  # the setting at 0: nothing
        assert len(await _flow_run_ids(broker)) == 9

        done = await _vacuum(service, nc, settings, cutoff).run_pass()
        assert (done.flow_runs_deleted, done.task_runs_deleted) == (5, 1)
        assert await _flow_run_ids(broker) == kept
        assert await _task_run_ids(broker) == {background_running, parent_task}  # its_task went with its run
        states = await broker.ok_qry("ListFlowRunStates", flow_run_id=completed)
        assert states == []
        again = await _vacuum(service, nc, settings, cutoff).run_pass()
        assert (again.flow_runs_deleted, again.task_runs_deleted) == (0, 0)
    finally:
        await nc.close()
    # Each delete is an event: `runledger verify` still finds the live read models equal a rebuild.
    await _caught_up(broker)
    await assert_live_equals_rebuild(service, settings)


async def test_a_subflow_run_goes_at_the_pass_after_its_parent_never_before(broker, service, settings):
    flow_id = (await broker.ok_cmd("CreateFlow", name="etl"))["id"]
    parent = await _run(broker, flow_id, "RUNNING")
    task = (await broker.ok_cmd("CreateTaskRun", flow_run_id=parent, task_key="sub", dynamic_key="0"))["id"]
    subflow = await _run(broker, flow_id, "RUNNING", "COMPLETED", parent_task_run_id=task)
    await _state(broker, parent, "COMPLETED")
    cutoff = datetime.now(UTC)
    await _caught_up(broker)
    nc = await connect(settings)
    try:
        vacuum = _vacuum(service, nc, settings, cutoff)
        # Sent for the subflow while its parent is there (a task-runs read model lagging in a
        # rebuild would): the log says the parent exists, so it stays.
        kept = await broker.cmd("DeleteFinishedFlowRun", id=subflow, ended_before=datetime.now(UTC).isoformat())
        assert kept["ok"] and kept["created"] is False, kept
        assert await _flow_run_ids(broker) == {parent, subflow}
        assert (await vacuum.run_pass()).flow_runs_deleted == 1  # the parent: its subflow's task was still there
        assert await _flow_run_ids(broker) == {subflow}
        assert await _task_run_ids(broker) == set()
        assert (await vacuum.run_pass()).flow_runs_deleted == 1
        assert await _flow_run_ids(broker) == set()
    finally:
        await nc.close()


async def test_a_scheduled_run_cancelled_before_its_date_is_kept_so_the_scheduler_does_not_make_it_again(
        broker, service, settings):
    flow_id = (await broker.ok_cmd("CreateFlow", name="etl"))["id"]
    d = await broker.ok_cmd("CreateDeployment", name="daily", flow_id=flow_id,
                            schedules=[{"schedule": {"interval": 86400, "anchor_date": "2020-01-01T00:00:00Z"}}])
    now = datetime.now(UTC)
    (past,) = (await broker.ok_cmd("ScheduleDeploymentRuns", deployment_id=d["id"], max_runs=1,
                                   start_time=(now - timedelta(days=2)).isoformat(),
                                   end_time=(now - timedelta(days=1)).isoformat()))["flow_run_ids"]
    future = (await broker.ok_cmd("ScheduleDeploymentRuns", deployment_id=d["id"]))["flow_run_ids"][-1]
    await _state(broker, past, "CANCELLED")
    await _state(broker, future, "CANCELLED")
    cutoff = datetime.now(UTC)
    await _caught_up(broker)
    nc = await connect(settings)
    try:
        assert (await _vacuum(service, nc, settings, cutoff).run_pass()).flow_runs_deleted == 1
    finally:
        await nc.close()
    ids = await _flow_run_ids(broker)
    assert past not in ids and future in ids
    # The scheduler's next pass plans the future date again: its run exists, so nothing is made.
    assert (await broker.ok_cmd("ScheduleDeploymentRuns", deployment_id=d["id"]))["flow_run_ids"] == []
    assert (await broker.ok_qry("GetFlowRun", id=future))["state_type"] == "CANCELLED"


async def test_the_vacuum_is_a_role_of_its_own_run_only_when_a_retention_is_set(broker, settings):
    for retention, roles, expected in ((0, {"vacuum"}, False), (RETENTION, {"foreman"}, False),
                                       (RETENTION, {"vacuum"}, True)):
        svc = Service(settings.model_copy(update={"flow_run_retention_seconds": retention}), roles=frozenset(roles))
        await svc.start()
        try:
            names = {t.get_name() for t in svc.background}
            assert ("runledger-vacuum" in names) is expected, (retention, roles)
        finally:
            await svc.stop()
