"""The vacuum's pure side: its setting (off, or at least an hour), and what its command,
`DeleteFlowRun`, writes for a finished run: the deletion alone, never a slot given back or a
waiting run woken (a finished run holds nothing), and never a refusal."""

from __future__ import annotations

import uuid

import pytest

from runledger.commands import flow_runs as fr
from runledger.commands import slots as sl
from runledger.commands.states import TERMINAL
from runledger.infra.settings import SettingsError, load_settings
from tests.unit.test_slots import a_limit, a_pool, a_run, counts, ctx


@pytest.mark.parametrize("value", ["0", "3600", "7776000"])
def test_the_retention_is_off_or_at_least_an_hour(monkeypatch, value):
    monkeypatch.setenv("RUNLEDGER_FLOW_RUN_RETENTION_SECONDS", value)
    assert load_settings().flow_run_retention_seconds == int(value)


@pytest.mark.parametrize("value", ["1", "3599", "-1"])
def test_a_retention_under_an_hour_is_refused_by_name(monkeypatch, value):
    monkeypatch.setenv("RUNLEDGER_FLOW_RUN_RETENTION_SECONDS", value)
    with pytest.raises(SettingsError, match="RUNLEDGER_FLOW_RUN_RETENTION_SECONDS"):
        load_settings()


@pytest.mark.parametrize("final", sorted(TERMINAL))
def test_deleting_a_finished_run_writes_the_deletion_alone(final):
    pool = a_pool(pool_limit=2)
    # It ran with a deployment slot (its last state still names the lease), and another run
    # waits for that limit: a delete that gave back or handed over anything would show here.
    run = a_run(pool, final, deployment=True, lease=uuid.uuid4())
    waiter = a_run(pool, deployment=True, state_name="AwaitingConcurrencySlot")
    limit = a_limit(1, active=1)
    limits = sl.Limits(pool=pool, slots=counts(pool, 1), deployment_limit=limit,
                       waiters=sl.LimitWaiters(limit_id=limit.id, run_ids=[waiter.id]),
                       first_waiters={waiter.id: waiter})
    decision = fr.decide_delete_flow_run(fr.DeleteFlowRun(id=run.id), run, None, ctx(), limits)
    assert [type(new.event) for new in decision.events] == [fr.FlowRunDeleted]
    assert decision.events[0].aggregate_id == str(run.id)


def test_the_vacuums_delete_checks_the_runs_end_again_on_the_log():
    """The vacuum's candidates come from a read model that may lag: a run rerun meanwhile, or
    one that ended after the cutoff, is kept."""
    from datetime import timedelta

    from runledger.commands.states import StateType
    from tests.unit.test_slots import EARLIER

    cutoff = EARLIER + timedelta(minutes=1)

    def vacuum(run):
        return fr.decide_delete_finished_flow_run(fr.DeleteFinishedFlowRun(id=run.id, ended_before=cutoff), run,
                                                  None, ctx())

    ended = a_run(None, StateType.COMPLETED, end_time=EARLIER)
    gone = vacuum(ended)
    assert gone.created is True and [type(new.event) for new in gone.events] == [fr.FlowRunDeleted]
    for kept in (a_run(None, StateType.SCHEDULED, end_time=EARLIER),  # rerun since it ended
                 a_run(None, StateType.COMPLETED, end_time=cutoff),  # ended at the cutoff, not before
                 a_run(None, StateType.FAILED)):  # no end recorded
        decision = vacuum(kept)
        assert decision.events == [] and decision.created is False
    # A subflow run whose parent is still in the log stays, whatever a lagging read model said.
    subflow = a_run(None, StateType.COMPLETED, end_time=EARLIER, parent_task_run_id=uuid.uuid4())
    assert fr.decide_delete_finished_flow_run(fr.DeleteFinishedFlowRun(id=subflow.id, ended_before=cutoff), subflow,
                                              None, ctx(), parent_exists=True).events == []
    assert vacuum(subflow).created is True  # its parent gone
    missing = fr.decide_delete_finished_flow_run(fr.DeleteFinishedFlowRun(id=uuid.uuid4(), ended_before=cutoff),
                                                 None, None, ctx())
    assert missing.events == [] and missing.created is False


def test_the_vacuums_delete_of_a_background_task_run_checks_it_again_on_the_log():
    from datetime import timedelta

    from runledger.commands import task_runs as tr
    from runledger.commands.states import State, StateType
    from tests.unit.test_slots import EARLIER

    cutoff = EARLIER + timedelta(minutes=1)

    def run(state: StateType, end, flow_run_id=None) -> tr.TaskRun:
        s = State(id=uuid.uuid4(), type=state, name=state.value.title(), timestamp=EARLIER)
        return tr.TaskRun.model_validate({"id": uuid.uuid4(), "created": EARLIER, "updated": EARLIER, "name": "t",
                                          "task_key": "k", "dynamic_key": "0", "flow_run_id": flow_run_id,
                                          "state": s, "state_type": state, "state_name": s.name, "end_time": end})

    def vacuum(r):
        return tr.decide_delete_finished_task_run(tr.DeleteFinishedTaskRun(id=r.id, ended_before=cutoff), r)

    gone = vacuum(run(StateType.COMPLETED, EARLIER))
    assert gone.created is True and any(isinstance(e.event, tr.TaskRunDeleted) for e in gone.events)
    for kept in (run(StateType.RUNNING, EARLIER),  # rerun since it ended
                 run(StateType.FAILED, cutoff),  # ended at the cutoff, not before
                 run(StateType.COMPLETED, EARLIER, flow_run_id=uuid.uuid4())):  # goes with its flow run
        decision = vacuum(kept)
        assert decision.events == [] and decision.created is False
    assert tr.decide_delete_finished_task_run(tr.DeleteFinishedTaskRun(id=uuid.uuid4(), ended_before=cutoff),
                                              None).created is False
