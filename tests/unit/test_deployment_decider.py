"""The deployment decider, pure: no I/O. Each test decides from states built by folding the
decider's own events, as the service does."""

from __future__ import annotations

import itertools
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from pydantic import ValidationError

from runledger.commands import deployments as dp
from runledger.commands import unique_keys as uk
from runledger.commands import work_pools as wp
from runledger.commands.bounds import MAX_PARAMETERS_BYTES
from runledger.commands.json_schemas import preprocess_schema
from runledger.commands.messages import DecisionContext, ErrorCode, Rejection

NOW = datetime(2026, 12, 1, 12, 0, tzinfo=UTC)
FLOW_ID = uuid.UUID(int=99)


_IDS = itertools.count(1000)  # ids never repeat across decisions, as in the service


def ctx(now: datetime = NOW) -> DecisionContext:
    return DecisionContext.fixed(now, (uuid.UUID(int=next(_IDS)) for _ in itertools.count()))


def fold_pool(decision) -> wp.WorkPool:
    pool = None
    for new in decision.events:
        if new.aggregate_type == wp.WORK_POOL:
            pool = wp.evolve(pool, new.event)
    assert pool is not None
    return pool


def a_pool(name: str = "pool", variables: dict[str, Any] | None = None) -> wp.WorkPool:
    template = {"job_configuration": {"image": "{{ image }}"},
                "variables": variables or {"type": "object", "properties": {"image": {"type": "string", "default": "py"}}}}
    made = wp.decide_create_work_pool(wp.CreateWorkPool(name=name, type="process", base_job_template=template),
                                      wp.WorkPoolNameClaim(), ctx())
    return fold_pool(made)


def create(placement: dp.Placement | None = None, *, claim: uk.UniqueKeyClaim | None = None,
           existing: dp.Deployment | None = None, flow_exists: bool = True, now: datetime = NOW, **fields):
    cmd = dp.CreateDeployment.model_validate({"name": "nightly", "flow_id": str(FLOW_ID), **fields})
    return dp.decide_create_deployment(cmd, claim or uk.UniqueKeyClaim(), existing, flow_exists,
                                       placement or dp.Placement(), ctx(now))


def deployment_of(decision) -> dp.Deployment:
    state = None
    for new in decision.events:
        if new.aggregate_type == dp.DEPLOYMENT:
            state = dp.evolve(state, new.event)
    assert state is not None
    return state


def rejected(code: ErrorCode, fn, *args, **kwargs) -> Rejection:
    with pytest.raises(Rejection) as e:
        fn(*args, **kwargs)
    assert e.value.code == code, e.value
    return e.value


def test_a_create_claims_the_flow_and_name_and_answers_with_the_defaults():
    made = create()
    d = deployment_of(made)
    assert made.created is True and made.result == d
    assert [n.event.event_type for n in made.events] == ["UniqueKeyClaimed", "DeploymentCreated"]
    assert made.events[0].aggregate_id == dp.name_key(FLOW_ID, "nightly")
    reply = d.reply()
    assert reply["paused"] is False and reply["schedules"] == [] and reply["status"] == "NOT_READY"
    assert reply["parameter_openapi_schema"] == {"type": "object", "properties": {}}
    assert reply["enforce_parameter_schema"] is True and reply["work_queue_name"] is None
    assert reply["labels"] == {"prefect.flow.id": str(FLOW_ID)}
    assert reply["concurrency_limit"] is None and reply["global_concurrency_limit"] is None


def test_a_deployment_name_may_be_empty_but_not_hold_banned_characters():
    assert deployment_of(create(name="")).name == ""
    with pytest.raises(ValidationError):
        dp.CreateDeployment.model_validate({"name": "a/b", "flow_id": str(FLOW_ID)})


def test_an_unknown_flow_is_not_found():
    rejected(ErrorCode.NOT_FOUND, create, flow_exists=False)


def test_a_second_create_of_the_pair_updates_in_place_keeps_the_id_and_replaces_schedules():
    first = deployment_of(create(description="one", schedules=[{"schedule": {"interval": 3600}}], tags=["a"]))
    later = NOW + timedelta(minutes=5)
    again = create(claim=uk.UniqueKeyClaim(first.id), existing=first, now=later, paused=True)
    d = again.result
    assert again.created is False and d.id == first.id
    assert d.paused is True and d.description == "one" and d.tags == ["a"]  # absent fields kept
    assert d.schedules == []  # DP-2(b): omitted schedules leave none
    assert d.created == first.created and d.updated == later
    event, noted = again.events
    assert event.event.event_type == "DeploymentUpdated"
    assert set(event.event.changed) == {"paused", "schedules"}
    assert noted.aggregate_id == dp.index_id(d.id) and noted.event.revision == later  # the index notes it


def test_an_upsert_that_changes_nothing_appends_nothing():
    first = deployment_of(create(description="one"))
    again = create(claim=uk.UniqueKeyClaim(first.id), existing=first, description="one")
    assert again.events == [] and again.created is False


def test_schedules_made_by_create_drop_max_scheduled_runs_as_prefect_does_and_get_an_anchor():
    d = deployment_of(create(schedules=[{"schedule": {"interval": 60}, "max_scheduled_runs": 5, "slug": "s"}]))
    (s,) = d.schedules
    assert s.max_scheduled_runs is None and s.slug == "s" and s.active is True
    assert s.deployment_id == d.id
    assert s.schedule.anchor_date == NOW  # an interval without anchor starts now


def test_duplicate_slugs_are_a_conflict():
    rejected(ErrorCode.CONFLICT, create, schedules=[{"schedule": {"interval": 60}, "slug": "s"},
                                                    {"schedule": {"interval": 120}, "slug": "s"}])


def test_max_scheduled_runs_is_one_to_fifty():
    for bad in (0, 51):
        with pytest.raises(ValidationError):
            dp.ScheduleCreate.model_validate({"schedule": {"interval": 60}, "max_scheduled_runs": bad})


def test_a_pool_alone_means_its_default_queue():
    pool = a_pool()
    d = deployment_of(create(dp.Placement(pool=pool), work_pool_name="pool"))
    assert (d.work_queue_id, d.work_queue_name, d.work_pool_name) == (pool.default_queue_id, "default", "pool")


def test_a_missing_named_queue_is_created_in_the_same_decision():
    pool = a_pool()
    made = create(dp.Placement(pool=pool), work_pool_name="pool", work_queue_name="gpu")
    kinds = [(n.aggregate_type, n.event.event_type) for n in made.events]
    assert kinds[0] == (wp.WORK_POOL, "WorkQueueCreated")
    queue = made.events[0].event.queue
    assert queue.name == "gpu" and queue.priority == 2  # WQ-2: the next free priority
    d = deployment_of(made)
    assert d.work_queue_id == queue.id and d.work_queue_name == "gpu"


def test_an_unknown_pool_is_not_found_with_prefects_message():
    e = rejected(ErrorCode.NOT_FOUND, create, dp.Placement(pool=None), work_pool_name="nope")
    assert e.message == 'Work pool "nope" not found.'


def test_a_queue_named_without_a_pool_lives_in_the_legacy_pool_created_if_missing():
    made = create(dp.Placement(legacy_claim=wp.WorkPoolNameClaim(), legacy_pool=None), work_queue_name="old")
    types = [n.event.event_type for n in made.events]
    assert types[:3] == ["WorkPoolNameClaimed", "WorkPoolCreated", "WorkQueueCreated"]
    d = deployment_of(made)
    assert d.work_pool_name == wp.LEGACY_POOL_NAME and d.work_queue_name == "old"


def test_job_variables_are_checked_against_the_pools_schema_ignoring_required():
    variables = {"type": "object", "required": ["image", "cpu"],
                 "properties": {"image": {"type": "string", "default": "py"}, "cpu": {"type": "integer"}}}
    pool = a_pool(variables=variables)
    ok = deployment_of(create(dp.Placement(pool=pool), work_pool_name="pool", job_variables={"image": "x"}))
    assert ok.job_variables == {"image": "x"}
    e = rejected(ErrorCode.INVALID, create, dp.Placement(pool=pool), work_pool_name="pool", job_variables={"cpu": "many"})
    assert e.message.startswith("Error creating deployment: Validation failed for field 'cpu'")


SCHEMA = {"type": "object", "properties": {"foo": {"type": "string"}, "n": {"type": "integer"}}, "required": ["foo", "n"]}


def test_parameters_are_enforced_at_create_only_when_the_request_says_so():
    e = rejected(ErrorCode.INVALID, create, parameters={"foo": 1}, parameter_openapi_schema=SCHEMA,
                 enforce_parameter_schema=True)
    assert e.message == "Validation failed for field 'foo'. Failure reason: 1 is not of type 'string'"
    # Partial parameters are fine (required ignored) ...
    assert deployment_of(create(parameters={"n": 1}, parameter_openapi_schema=SCHEMA, enforce_parameter_schema=True))
    # ... and the quirk: no check when the request omits enforce_parameter_schema.
    assert deployment_of(create(parameters={"foo": 1}, parameter_openapi_schema=SCHEMA)).enforce_parameter_schema


def test_an_invalid_schema_is_invalid_and_remote_refs_are_never_fetched():
    rejected(ErrorCode.INVALID, create, parameter_openapi_schema={"type": "blork"}, enforce_parameter_schema=True)
    remote = {"type": "object", "properties": {"x": {"$ref": "https://example.com/schema.json"}}}
    rejected(ErrorCode.INVALID, create, parameters={"x": 1}, parameter_openapi_schema=remote,
             enforce_parameter_schema=True)


def test_parameters_larger_than_512_kib_are_invalid():
    rejected(ErrorCode.INVALID, create, parameters={"x": "a" * MAX_PARAMETERS_BYTES})


def update(d: dp.Deployment, placement: dp.Placement | None = None, now: datetime = NOW, **fields):
    cmd = dp.UpdateDeployment.model_validate({"id": str(d.id), **fields})
    return dp.decide_update_deployment(cmd, d, placement or dp.Placement(), ctx(now))


def test_an_update_changes_only_what_it_names():
    d = deployment_of(create(description="one", tags=["a"], version="1"))
    after = update(d, version="2").result
    assert (after.version, after.description, after.tags) == ("2", "one", ["a"])
    assert update(d).events == []  # nothing named, nothing changed


def test_an_update_of_an_unknown_deployment_is_not_found():
    cmd = dp.UpdateDeployment(id=uuid.uuid4())
    rejected(ErrorCode.NOT_FOUND, dp.decide_update_deployment, cmd, None, dp.Placement(), ctx())


def test_an_update_enforces_the_schema_with_the_stored_values_as_a_conflict():
    d = deployment_of(create(parameter_openapi_schema=SCHEMA))
    e = rejected(ErrorCode.CONFLICT, update, d, parameters={"foo": 1})
    assert e.message.startswith("Error updating deployment: Validation failed for field 'foo'")
    assert update(d, parameters={"foo": 1}, enforce_parameter_schema=False).result.parameters == {"foo": 1}


def test_an_explicit_null_pool_clears_the_queue():
    pool = a_pool()
    d = deployment_of(create(dp.Placement(pool=pool), work_pool_name="pool"))
    after = update(d, work_pool_name=None).result
    assert after.work_queue_id is None and after.work_pool_name is None


def test_schedules_with_slugs_are_patched_by_slug_and_renamed_with_replaces():
    d = deployment_of(create(schedules=[{"schedule": {"interval": 60}, "slug": "a"},
                                        {"schedule": {"interval": 120}, "slug": "b"}]))
    a, b = d.schedules
    after = update(d, schedules=[{"slug": "a", "active": False}, {"slug": "c", "replaces": "b"},
                                 {"slug": "new", "schedule": {"interval": 30}}]).result
    assert [s.slug for s in after.schedules] == ["a", "c", "new"]
    assert after.schedules[0].id == a.id and after.schedules[0].active is False
    assert after.schedules[1].id == b.id and after.schedules[1].schedule == b.schedule


def test_a_list_without_slugs_for_slugged_schedules_is_invalid():
    d = deployment_of(create(schedules=[{"schedule": {"interval": 60}, "slug": "a"}]))
    rejected(ErrorCode.INVALID, update, d, schedules=[{"schedule": {"interval": 60}}])


def test_schedules_without_slugs_are_replaced_whole():
    d = deployment_of(create(schedules=[{"schedule": {"interval": 60}}]))
    after = update(d, schedules=[{"schedule": {"interval": 10}}, {"schedule": {"cron": "0 9 * * *"}}]).result
    assert len(after.schedules) == 2 and d.schedules[0].id not in {s.id for s in after.schedules}


def test_pause_and_resume_are_idempotent_and_leave_schedules_active():
    d = deployment_of(create(schedules=[{"schedule": {"interval": 60}}]))
    paused = dp.decide_set_paused(d.id, True, d, ctx())
    after = paused.after[str(d.id)]
    assert after.paused is True and after.schedules[0].active is True
    assert dp.decide_set_paused(d.id, True, after, ctx()).events == []
    assert dp.decide_set_paused(d.id, False, after, ctx()).after[str(d.id)].paused is False
    rejected(ErrorCode.NOT_FOUND, dp.decide_set_paused, d.id, True, None, ctx())


def test_a_delete_frees_the_name():
    d = deployment_of(create())
    made = dp.decide_delete_deployment(dp.DeleteDeployment(id=d.id), d, uk.UniqueKeyClaim(d.id), ctx())
    assert [n.event.event_type for n in made.events] == ["UniqueKeyReleased", "DeploymentRunsForgotten",
                                                         "DeploymentDeleted"]
    assert dp.evolve(d, made.events[-1].event) is None


def test_schedule_crud_keeps_max_runs_refuses_duplicate_slugs_and_finds_unknown_ones():
    d = deployment_of(create())
    made = dp.decide_create_schedules(dp.CreateDeploymentSchedules.model_validate(
        {"deployment_id": str(d.id), "schedules": [{"schedule": {"interval": 60}, "max_scheduled_runs": 5, "slug": "x"}]}),
        d, ctx())
    d2 = made.after[str(d.id)]
    (s,) = d2.schedules
    assert s.max_scheduled_runs == 5 and made.result == [s]
    rejected(ErrorCode.CONFLICT, dp.decide_create_schedules, dp.CreateDeploymentSchedules.model_validate(
        {"deployment_id": str(d.id), "schedules": [{"schedule": {"interval": 1}, "slug": "x"}]}), d2, ctx())
    upd = dp.decide_update_schedule(dp.UpdateDeploymentSchedule(deployment_id=d.id, schedule_id=s.id, active=False),
                                    d2, ctx())
    assert upd.after[str(d.id)].schedules[0].active is False
    e = rejected(ErrorCode.NOT_FOUND, dp.decide_delete_schedule,
                 dp.DeleteDeploymentSchedule(deployment_id=d.id, schedule_id=uuid.uuid4()), d2, ctx())
    assert e.message == "Schedule not found."
    gone = dp.decide_delete_schedule(dp.DeleteDeploymentSchedule(deployment_id=d.id, schedule_id=s.id), d2, ctx())
    assert gone.after[str(d.id)].schedules == []


def test_a_limit_is_reported_as_the_deployments_global_limit():
    d = deployment_of(create(concurrency_limit=3, concurrency_options={"collision_strategy": "CANCEL_NEW"}))
    reply = d.reply()
    assert reply["concurrency_limit"] is None
    assert reply["global_concurrency_limit"]["name"] == f"deployment:{d.id}"
    assert reply["global_concurrency_limit"]["limit"] == 3
    assert reply["concurrency_options"] == {"collision_strategy": "CANCEL_NEW", "grace_period_seconds": None}
    # Kept unless named; an explicit null removes it.
    assert update(d, description="x").result.concurrency_limit == 3
    assert update(d, concurrency_limit=None).result.concurrency_limit is None


def _indexed_runs(d: dp.Deployment, now: datetime) -> tuple[dp.IndexedRuns, dict[str, Any]]:
    """Five runs of the deployment's schedule: future, past (Late), started, awaiting a slot, gone."""
    from runledger.commands import flow_runs as fr
    from runledger.commands.states import StateCreate

    def run(start: datetime, **state) -> fr.FlowRun:
        made = fr.decide_create_flow_run(fr.CreateFlowRun(flow_id=FLOW_ID, state=StateCreate(
            type="SCHEDULED", state_details={"scheduled_time": start}, **state)), None, None, True, None, ctx())
        return made.result

    future, late, waiting = run(now + timedelta(hours=1)), run(now - timedelta(hours=1), name="Late"), \
        run(now + timedelta(hours=2), name="AwaitingConcurrencySlot")
    started = run(now + timedelta(hours=3)).model_copy(update={"state_type": "RUNNING", "run_count": 1})
    gone_id = uuid.uuid4()
    schedule_id = uuid.uuid4()
    runs = {"future": future, "late": late, "waiting": waiting, "started": started}
    index = dp.ScheduledRunIndex(runs={
        **{r.id: dp.TrackedRun(date=r.next_scheduled_start_time or now, schedule_id=schedule_id) for r in runs.values()},
        gone_id: dp.TrackedRun(date=now, schedule_id=schedule_id)})
    return dp.IndexedRuns(index=index, runs={**{r.id: r for r in runs.values()}, gone_id: None}), runs


def deleted_ids(events) -> set:
    return {n.event.flow_run_id for n in events if n.event.event_type == "FlowRunDeleted"}


def forgotten_ids(events) -> set:
    return {i for n in events if n.event.event_type == "DeploymentRunsForgotten" for i in n.event.run_ids}


def test_an_update_deletes_the_future_runs_never_run_and_forgets_those_that_ran():
    d = deployment_of(create())
    indexed, runs = _indexed_runs(d, NOW)
    events = dp.delete_scheduled_runs(d.id, indexed, NOW, future_only=True)
    assert deleted_ids(events) == {runs["future"].id}  # not Late (past), not awaiting a slot, not started
    assert forgotten_ids(events) == {runs["future"].id, runs["started"].id} | (set(indexed.index.runs) - set(
        r.id for r in runs.values()))


def test_a_pause_deletes_past_ones_too():
    d = deployment_of(create())
    indexed, runs = _indexed_runs(d, NOW)
    paused = dp.decide_set_paused(d.id, True, d, ctx(), indexed)
    assert deleted_ids(paused.events) == {runs["future"].id, runs["late"].id}
    assert dp.decide_set_paused(d.id, False, d, ctx(), indexed).events == []  # a resume deletes nothing


def test_dp8_a_delete_takes_the_runs_its_schedules_made_and_leaves_the_others_to_the_foreman():
    d = deployment_of(create())
    indexed, runs = _indexed_runs(d, NOW)
    made = dp.decide_delete_deployment(dp.DeleteDeployment(id=d.id), d, uk.UniqueKeyClaim(d.id), ctx(), indexed)
    # Past ones (Late) too; not the one awaiting a slot, nor the one that started.
    assert deleted_ids(made.events) == {runs["future"].id, runs["late"].id}
    # Nothing else is read: the runs made on demand are not known here (see below).
    assert {n.event.event_type for n in made.events} == {"UniqueKeyReleased", "FlowRunDeleted",
                                                         "DeploymentRunsForgotten", "DeploymentDeleted"}


def _run_of_deleted(d: dp.Deployment, **fields) -> Any:
    """A run made from `d` on demand, still SCHEDULED, with an idempotency key."""
    from runledger.commands import flow_runs as fr
    from runledger.commands.states import StateCreate

    made = fr.decide_create_flow_run(fr.CreateFlowRun(flow_id=FLOW_ID, deployment_id=d.id, idempotency_key="k",
                                                      state=StateCreate(type="SCHEDULED")), None, None, True, None,
                                     ctx())
    return made.result.model_copy(update=fields)


def _sweep(run, deployment_id: uuid.UUID, deployment: dp.Deployment | None = None, in_log: bool = True):
    from runledger.commands import flow_runs as fr

    claim = uk.UniqueKeyClaim(run.id) if run is not None else None
    cmd = dp.DeleteRunOfDeletedDeployment(id=run.id if run is not None else uuid.uuid4(), deployment_id=deployment_id)
    return dp.decide_delete_run_of_deleted_deployment(cmd, run, deployment, in_log, claim, ctx()), fr, claim


def test_dp8_the_foreman_deletes_a_run_of_a_deleted_deployment_as_delete_flow_run_does():
    d = deployment_of(create())
    run = _run_of_deleted(d)
    made, fr, claim = _sweep(run, d.id)
    assert made.created is True and made.result is None
    assert deleted_ids(made.events) == {run.id}
    alone = fr.decide_delete_flow_run(fr.DeleteFlowRun(id=run.id), run, claim, ctx())
    assert [(n.aggregate_id, n.event) for n in made.events] == [(n.aggregate_id, n.event) for n in alone.events]
    assert "UniqueKeyReleased" in {n.event.event_type for n in made.events}  # its key is free again
    late, _, _ = _sweep(run.model_copy(update={"state_name": "Late"}), d.id)
    assert deleted_ids(late.events) == {run.id}  # past ones too


@pytest.mark.parametrize("case", ["run gone", "another deployment", "deployment exists", "never in the log",
                                  "awaiting a slot", "ran", "pending", "ended"])
def test_dp8_the_foreman_deletes_nothing_when_the_log_says_otherwise(case: str):
    d = deployment_of(create())
    run = _run_of_deleted(d)
    deployment_id, deployment, in_log = d.id, None, True
    if case == "run gone":
        run = None
    elif case == "another deployment":
        deployment_id = uuid.uuid4()
    elif case == "deployment exists":
        deployment = d
    elif case == "never in the log":
        in_log = False
    elif case == "awaiting a slot":
        run = run.model_copy(update={"state_name": "AwaitingConcurrencySlot"})
    elif case == "ran":
        run = run.model_copy(update={"run_count": 1})
    else:
        run = run.model_copy(update={"state_type": "PENDING" if case == "pending" else "COMPLETED"})
    made, _, _ = _sweep(run, deployment_id, deployment, in_log)
    assert made.events == [] and made.created is False and made.result is None


def test_sc7_deleting_a_schedule_deletes_every_auto_scheduled_run_of_the_deployment():
    d = deployment_of(create(schedules=[{"schedule": {"interval": 60}, "slug": "a"},
                                        {"schedule": {"interval": 120}, "slug": "b"}]))
    indexed, runs = _indexed_runs(d, NOW)  # tracked under a schedule that is neither a nor b
    made = dp.decide_delete_schedule(dp.DeleteDeploymentSchedule(deployment_id=d.id, schedule_id=d.schedules[0].id),
                                     d, ctx(), indexed)
    assert deleted_ids(made.events) == {runs["future"].id, runs["late"].id}


def test_dp7_circular_schema_on_update_is_invalid():
    circ = {"type": "object", "properties": {"x": {"$ref": "#/properties/x"}}}
    d = deployment_of(create(parameter_openapi_schema=circ))
    cmd = dp.UpdateDeployment.model_validate({"id": str(d.id), "parameters": {"x": 1}})
    e = rejected(ErrorCode.INVALID, dp.decide_update_deployment, cmd, d, dp.Placement(), ctx())
    assert e.message == "Invalid schema: Unable to validate schema with circular references."


def test_dp7_a_replace_list_drops_the_items_without_a_schedule():
    d = deployment_of(create(schedules=[{"schedule": {"interval": 60}}]))
    after = update(d, schedules=[{"active": False}, {"schedule": {"interval": 10}}]).result
    assert [s.schedule.interval for s in after.schedules] == [timedelta(seconds=10)]
    # Patching by slug still refuses a new slug without a schedule.
    slugged = deployment_of(create(name="s", schedules=[{"schedule": {"interval": 60}, "slug": "a"}]))
    rejected(ErrorCode.INVALID, update, slugged, schedules=[{"slug": "b", "active": True}])


def test_dp1_labels_are_the_flows_then_the_system_label_then_the_requests_on_every_upsert():
    cmd = dp.CreateDeployment.model_validate({"name": "n", "flow_id": str(FLOW_ID), "labels": {"a": 1}})
    made = dp.decide_create_deployment(cmd, uk.UniqueKeyClaim(), None, True, dp.Placement(), ctx(),
                                       flow_labels={"team": "x", "a": 0})
    d = deployment_of(made)
    assert d.labels == {"team": "x", "a": 1, "prefect.flow.id": str(FLOW_ID)}
    upsert = dp.CreateDeployment.model_validate({"name": "n", "flow_id": str(FLOW_ID), "labels": {"b": 2}})
    again = dp.decide_create_deployment(upsert, uk.UniqueKeyClaim(d.id), d, True, dp.Placement(), ctx())
    assert again.result.labels == {"b": 2, "prefect.flow.id": str(FLOW_ID)}
    kept = dp.CreateDeployment.model_validate({"name": "n", "flow_id": str(FLOW_ID)})
    assert dp.decide_create_deployment(kept, uk.UniqueKeyClaim(d.id), d, True, dp.Placement(), ctx()).result.labels \
        == d.labels  # absent: kept (DP-1)


def test_dp6_parameters_are_measured_as_prefect_escapes_them():
    # 100,000 × "é" is 200,008 bytes of UTF-8 but 600,008 of escaped JSON, as Prefect counts.
    e = rejected(ErrorCode.INVALID, create, parameters={"s": "é" * 100_000})
    assert "600008 bytes" in e.message
    assert deployment_of(create(parameters={"s": "é" * 80_000}))  # 480,008 bytes


NULLABLE = {"type": "object", "properties": {"image": {"type": "string", "default": "python:3.12"},
                                             "cpu": {"type": "integer"}}}


def test_dp4_dp7_null_is_accepted_for_an_optional_field_as_prefect_preprocesses_schemas():
    pool = a_pool(variables=NULLABLE)
    d = deployment_of(create(dp.Placement(pool=pool), work_pool_name="pool", job_variables={"image": None},
                             parameter_openapi_schema={"type": "object", "properties": {"x": {"type": "string"}}}))
    assert d.job_variables == {"image": None}
    assert update(d, parameters={"x": None}).result.parameters == {"x": None}
    rejected(ErrorCode.CONFLICT, update, d, parameters={"x": 1})
    # A required property, or one with a default (parameters), stays non-null.
    assert preprocess_schema({"properties": {"r": {"type": "string"}, "d": {"type": "string", "default": "a"}},
                                 "required": ["r"]}) == {
        "properties": {"r": {"type": "string"}, "d": {"type": "string", "default": "a"}}, "required": ["r"]}
    assert preprocess_schema({"properties": {"d": {"type": "string", "default": "a"}}},
                                allow_none_with_default=True) == {
        "properties": {"d": {"default": "a", "anyOf": [{"type": "string"}, {"type": "null"}]}}}
    # DP-5 at create keeps Prefect's older check, without preprocessing.
    rejected(ErrorCode.INVALID, create, parameters={"x": None}, enforce_parameter_schema=True,
             parameter_openapi_schema={"type": "object", "properties": {"x": {"type": "string"}}})


def _index_after(events, index: dp.ScheduledRunIndex = dp.ScheduledRunIndex()) -> dp.ScheduledRunIndex:
    for new in events:
        if new.aggregate_type == dp.DEPLOYMENT_RUNS:
            index = dp.evolve_index(index, new.event)
    return index


def test_every_change_notes_the_deployment_in_its_index_so_a_stale_copy_is_not_followed():
    """The scheduler writes runs and the index, never the deployment: each change of the
    deployment notes its new `updated` in the index (one event there, even with no run to
    delete), and a copy of the deployment other than the noted one is not followed."""
    d = deployment_of(create(schedules=[{"schedule": {"interval": 60}, "slug": "a"}]))
    index = dp.ScheduledRunIndex()
    assert dp.follows(index, d)  # as created: nothing noted, nothing needed
    later = NOW + timedelta(minutes=1)
    changes = [
        lambda d: create(claim=uk.UniqueKeyClaim(d.id), existing=d, now=later, parameters={"v": 2},
                         schedules=[{"schedule": {"interval": 60}, "slug": "a"}]),
        lambda d: update(d, now=later, parameters={"v": 3}),
        lambda d: dp.decide_set_paused(d.id, True, d, ctx(later)),
        lambda d: dp.decide_set_paused(d.id, False, d, ctx(later)),
        lambda d: dp.decide_create_schedules(dp.CreateDeploymentSchedules.model_validate(
            {"deployment_id": str(d.id), "schedules": [{"schedule": {"interval": 5}}]}), d, ctx(later)),
        lambda d: dp.decide_update_schedule(dp.UpdateDeploymentSchedule(deployment_id=d.id, schedule_id=d.schedules[0].id,
                                                                        active=False), d, ctx(later)),
        lambda d: dp.decide_delete_schedule(dp.DeleteDeploymentSchedule(deployment_id=d.id,
                                                                        schedule_id=d.schedules[0].id), d, ctx(later)),
    ]
    for change in changes:
        made = change(d)
        after = deployment_of(made)
        noted = [n for n in made.events if n.aggregate_type == dp.DEPLOYMENT_RUNS]
        assert len(noted) == 1 and noted[0].event.run_ids == []  # nothing indexed: nothing deleted
        index = _index_after(made.events, index)
        assert dp.follows(index, after) and not dp.follows(index, d)
        d, later = after, later + timedelta(minutes=1)
    gone = dp.decide_delete_deployment(dp.DeleteDeployment(id=d.id), d, uk.UniqueKeyClaim(d.id), ctx(later))
    assert not dp.follows(_index_after(gone.events, index), d)
    # A change that changes nothing notes nothing (the deployment is as noted).
    assert update(d, parameters=d.parameters).events == []
    assert dp.decide_set_paused(d.id, d.paused, d, ctx(later)).events == []


def test_a_changed_deployment_not_noted_is_never_followed():
    """A deployment changed before changes were noted (its `updated` after its `created`, the
    index without a revision) is read again from the log by the scheduler."""
    d = deployment_of(create())
    assert not dp.follows(dp.ScheduledRunIndex(), d.model_copy(update={"updated": NOW + timedelta(seconds=1)}))
    assert not dp.follows(dp.ScheduledRunIndex(), None)


def test_a_forgotten_event_of_version_1_reads_without_a_revision():
    from runledger.commands.events import decode_event

    read = decode_event("DeploymentRunsForgotten", 1, {"run_ids": [str(uuid.UUID(int=1))]})
    assert read == dp.DeploymentRunsForgotten(run_ids=[uuid.UUID(int=1)]) and dp.evolve_index(dp.ScheduledRunIndex(revision=NOW), read).revision == NOW


def test_nulls_in_a_schedule_patch_change_nothing_as_prefect_excludes_them():
    """Prefect patches a schedule with the request's non-null fields (`exclude_none`): an
    explicit null keeps the value, by id and by slug alike."""
    d = deployment_of(create())
    made = dp.decide_create_schedules(dp.CreateDeploymentSchedules.model_validate(
        {"deployment_id": str(d.id), "schedules": [{"schedule": {"interval": 60}, "max_scheduled_runs": 5,
                                                    "slug": "s1", "parameters": {"a": 1}}]}), d, ctx())
    d = made.after[str(d.id)]
    (s,) = d.schedules
    cmd = dp.UpdateDeploymentSchedule.model_validate({"deployment_id": str(d.id), "schedule_id": str(s.id),
                                                      "slug": None, "max_scheduled_runs": None, "parameters": None,
                                                      "active": None, "schedule": None})
    (after,) = deployment_of(dp.decide_update_schedule(cmd, d, ctx(NOW + timedelta(minutes=1)))).schedules
    assert (after.slug, after.max_scheduled_runs, after.parameters, after.active) == ("s1", 5, {"a": 1}, True)
    by_slug = update(d, schedules=[{"slug": "s1", "max_scheduled_runs": None, "parameters": None}]).result
    (kept,) = by_slug.schedules
    assert (kept.max_scheduled_runs, kept.parameters) == (5, {"a": 1})


def test_a_schedule_added_by_slug_in_an_update_drops_max_scheduled_runs_as_prefect_does():
    d = deployment_of(create(schedules=[{"schedule": {"interval": 600}, "slug": "a"}]))
    after = update(d, schedules=[{"slug": "a", "max_scheduled_runs": 3},
                                 {"slug": "b", "schedule": {"interval": 900}, "max_scheduled_runs": 7}]).result
    assert [(s.slug, s.max_scheduled_runs) for s in after.schedules] == [("a", 3), ("b", None)]


def test_schedules_are_answered_last_updated_first():
    d = deployment_of(create(schedules=[{"schedule": {"interval": 60}, "slug": "a"},
                                        {"schedule": {"interval": 70}, "slug": "b"}]))
    assert [s["slug"] for s in d.reply()["schedules"]] == ["a", "b"]  # updated together: as stored
    a = d.schedules[0]
    later = dp.decide_update_schedule(dp.UpdateDeploymentSchedule(deployment_id=d.id, schedule_id=a.id,
                                                                  active=False), d, ctx(NOW + timedelta(minutes=1)))
    after = later.after[str(d.id)]
    assert [s.slug for s in after.schedules] == ["a", "b"]  # stored as added
    assert [s["slug"] for s in after.reply()["schedules"]] == ["a", "b"]
    b = after.schedules[1]
    last = dp.decide_update_schedule(dp.UpdateDeploymentSchedule(deployment_id=d.id, schedule_id=b.id,
                                                                 active=False), after, ctx(NOW + timedelta(minutes=2)))
    assert [s["slug"] for s in last.after[str(d.id)].reply()["schedules"]] == ["b", "a"]
