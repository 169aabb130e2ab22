"""Scheduling a deployment's runs, pure: which dates, which run ids, what each run holds."""

from __future__ import annotations

import itertools
import uuid
from datetime import UTC, datetime, timedelta

import pytest
from pydantic import ValidationError

from runledger.commands import deployment_runs as sc
from runledger.commands import deployments as dp
from runledger.commands import unique_keys as uk
from runledger.commands import work_pools as wp
from runledger.commands.messages import DecisionContext, ErrorCode, Rejection

NOW = datetime(2026, 3, 10, 12, 34, 56, tzinfo=UTC)
D = datetime(2026, 3, 10, tzinfo=UTC)
_IDS = itertools.count(1)


def ctx(now: datetime = NOW) -> DecisionContext:
    return DecisionContext.fixed(now, (uuid.UUID(int=next(_IDS)) for _ in itertools.count()))


def deployment(*schedules: dict, **fields) -> dp.Deployment:
    cmd = dp.CreateDeployment.model_validate({"name": "d", "flow_id": str(uuid.UUID(int=7)),
                                              "schedules": list(schedules), **fields})
    made = dp.decide_create_deployment(cmd, uk.UniqueKeyClaim(), None, True, dp.Placement(), ctx())
    return made.result


DAILY = {"schedule": {"interval": 86400, "anchor_date": "2020-01-01T00:00:00Z"}}


def test_defaults_give_three_daily_runs_with_deterministic_ids():
    d = deployment(DAILY)
    planned = sc.planned_runs(d, sc.ScheduleDeploymentRuns(deployment_id=d.id), NOW)
    assert [p.date for p in planned] == [D + timedelta(days=k) for k in (1, 2, 3)]
    again = sc.planned_runs(d, sc.ScheduleDeploymentRuns(deployment_id=d.id), NOW + timedelta(minutes=1))
    assert [p.run_id for p in again] == [p.run_id for p in planned]  # same dates, same runs


def test_inactive_schedules_make_nothing_and_each_active_one_its_own_dates():
    d = deployment({**DAILY, "active": False}, {"schedule": {"cron": "0 9 * * *"}})
    planned = sc.planned_runs(d, sc.ScheduleDeploymentRuns(deployment_id=d.id), NOW)
    assert [p.date for p in planned] == [D + timedelta(days=k, hours=9) for k in (1, 2, 3)]


def test_existing_runs_are_skipped_and_new_ones_have_prefects_shape():
    d = deployment(DAILY, tags=["x"], parameters={"a": 1})
    planned = sc.planned_runs(d, sc.ScheduleDeploymentRuns(deployment_id=d.id), NOW)
    first = sc.decide_schedule_runs(d, planned, {}, ctx())
    assert first.result == [p.run_id for p in planned]
    runs = [n.event.run for n in first.events if n.event.event_type == "FlowRunCreated"]
    (index,) = [n.event for n in first.events if n.event.event_type == "DeploymentRunsScheduled"]
    assert set(index.runs) == {p.run_id for p in planned}  # the deployment's index holds them
    existing = {runs[0].id: runs[0]}
    second = sc.decide_schedule_runs(d, planned, existing, ctx())
    assert second.result == [p.run_id for p in planned[1:]]
    run = runs[0]
    assert run.state is not None and run.state.type == "SCHEDULED" and run.state.name == "Scheduled"
    assert run.state.state_details.scheduled_time == D + timedelta(days=1)
    assert run.expected_start_time == run.next_scheduled_start_time == D + timedelta(days=1)
    assert run.tags == ["auto-scheduled", "x"] and run.auto_scheduled and run.parameters == {"a": 1}
    assert run.created_by is not None and run.created_by.type == "SCHEDULE"


def test_an_unknown_deployment_schedules_nothing():
    assert sc.decide_schedule_runs(None, [], {}, ctx()).result == []


def test_one_command_makes_at_most_its_bound_earliest_first():
    d = deployment(*({"schedule": {"interval": 60 * (i + 1)}} for i in range(8)))
    cmd = sc.ScheduleDeploymentRuns(deployment_id=d.id, min_runs=100, max_runs=100)
    planned = sc.planned_runs(d, cmd, NOW)
    assert len(planned) == 800 and [p.date for p in planned] == sorted(p.date for p in planned)
    made = sc.decide_schedule_runs(d, planned, {}, ctx())
    assert made.result == [p.run_id for p in planned[:sc.MAX_RUNS_PER_COMMAND]]


def test_the_bound_counts_only_dates_without_a_run_so_a_long_backfill_goes_on():
    """The dates whose run exists are skipped before the bound is taken: a second identical
    command makes the dates the first one left, where cutting first made none."""
    d = deployment(*({"schedule": {"interval": 60 * (i + 1)}} for i in range(8)))
    planned = sc.planned_runs(d, sc.ScheduleDeploymentRuns(deployment_id=d.id, min_runs=100, max_runs=100), NOW)
    first = sc.decide_schedule_runs(d, planned, {}, ctx())
    existing = {n.event.run.id: n.event.run for n in first.events if n.event.event_type == "FlowRunCreated"}
    second = sc.decide_schedule_runs(d, planned, existing, ctx())
    assert second.result == [p.run_id for p in planned[sc.MAX_RUNS_PER_COMMAND:]]


def test_runs_scheduled_together_equal_runs_made_one_by_one():
    """`scheduled_runs` copies each schedule's first run for its other dates: every copy must be
    the run `scheduled_run` would have made (same ids drawn in the same order)."""
    d = deployment({"schedule": {"interval": 3600}, "parameters": {"b": 2}, "slug": "hourly"},
                   {"schedule": {"cron": "30 2 * * *", "timezone": "Europe/Berlin"}},
                   {"schedule": {"rrule": "FREQ=DAILY;BYHOUR=7", "timezone": "America/New_York"}},
                   tags=["x"], parameters={"a": 1}, labels={"team": "data"})
    cmd = sc.ScheduleDeploymentRuns(deployment_id=d.id, min_runs=40, max_runs=40)
    planned = sc.planned_runs(d, cmd, NOW)
    assert len({p.schedule.id for p in planned}) == 3 and len(planned) > 40

    def same_ids() -> DecisionContext:
        return DecisionContext.fixed(NOW, (uuid.UUID(int=i) for i in itertools.count(10_000)))

    together = sc.scheduled_runs(d, planned, same_ids())
    one_by_one_ctx = same_ids()
    one_by_one = [sc.scheduled_run(d, p, one_by_one_ctx) for p in planned]
    assert together == one_by_one
    assert [r.model_dump(mode="json") for r in together] == [r.model_dump(mode="json") for r in one_by_one]


# ---------------------------------------------------------------------------------------------
# On demand


def run_of(d: dp.Deployment, inputs: sc.RunInputs | None = None, **fields):
    cmd = sc.CreateFlowRunFromDeployment.model_validate({"deployment_id": str(d.id), **fields})
    return sc.decide_run_from_deployment(cmd, d, inputs or sc.RunInputs(), ctx())


def test_a_run_made_on_demand_writes_only_the_run():
    """Making a run from a deployment appends the run and nothing of the deployment's: the
    runs a delete leaves are found by the foreman, not recorded on this path."""
    d = deployment()
    made = run_of(d)
    assert [n.event.event_type for n in made.events] == ["FlowRunCreated"]
    bulk = sc.decide_runs_from_deployment(sc.CreateFlowRunsFromDeployment.model_validate(
        {"deployment_id": str(d.id), "runs": [{"name": "a"}, {"name": "b"}]}), d, sc.RunInputs(), ctx())
    assert [n.event.event_type for n in bulk.events] == ["FlowRunCreated", "FlowRunCreated"]


def test_dp6_a_runs_parameters_are_size_checked_as_prefect_counts_them():
    d = deployment()
    for big in ({"s": "a" * 600_000}, {"s": "é" * 100_000}):  # the second: 600,008 bytes escaped
        with pytest.raises(ValidationError, match="bytes once serialised"):
            sc.CreateFlowRunFromDeployment.model_validate({"deployment_id": str(d.id), "parameters": big})
        with pytest.raises(ValidationError, match="bytes once serialised"):  # one item refuses the bulk
            sc.CreateFlowRunsFromDeployment.model_validate(
                {"deployment_id": str(d.id), "runs": [{}, {"parameters": big}]})
    assert run_of(d, parameters={"s": "é" * 80_000}).created


def test_dp6_a_flow_runs_own_parameters_have_the_same_limit_on_create_and_update():
    from runledger.commands import flow_runs as fr

    flow_id, run_id = str(uuid.uuid4()), str(uuid.uuid4())
    for big in ({"s": "a" * 600_000}, {"s": "é" * 100_000}):
        with pytest.raises(ValidationError, match="bytes once serialised"):
            fr.CreateFlowRun.model_validate({"flow_id": flow_id, "parameters": big})
        with pytest.raises(ValidationError, match="bytes once serialised"):
            fr.UpdateFlowRun.model_validate({"id": run_id, "parameters": big})
    assert fr.CreateFlowRun.model_validate({"flow_id": flow_id, "parameters": {"s": "é" * 80_000}})
    assert fr.UpdateFlowRun.model_validate({"id": run_id, "parameters": None}).parameters is None


def test_dp14_dp15_null_for_an_optional_parameter_or_job_variable_is_accepted():
    schema = {"type": "object", "properties": {"x": {"type": "string"}, "r": {"type": "string"}}, "required": ["r"]}
    d = deployment(parameter_openapi_schema=schema)
    assert run_of(d, parameters={"x": None, "r": "y"}).result.parameters == {"x": None, "r": "y"}
    with pytest.raises(Rejection) as e:  # a required one is not nullable
        run_of(d, parameters={"r": None})
    assert e.value.code == ErrorCode.CONFLICT
    template = {"job_configuration": {"cpu": "{{ cpu }}"}, "variables": {"type": "object", "properties": {
        "image": {"type": "string", "default": "python:3.12"}, "cpu": {"type": "integer"}}}}
    pool_made = wp.decide_create_work_pool(wp.CreateWorkPool(name="pool", type="process", base_job_template=template),
                                           wp.WorkPoolNameClaim(), ctx())
    pool = None
    for n in pool_made.events:
        if n.aggregate_type == wp.WORK_POOL:
            pool = wp.evolve(pool, n.event)
    assert sc.run_job_variables_problem(d, pool, {"cpu": None, "image": None}) is None
    assert "Validation failed for field 'cpu'" in (sc.run_job_variables_problem(d, pool, {"cpu": "x"}) or "")
