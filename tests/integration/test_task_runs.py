"""The read side of task runs through the broker, against real NATS and Postgres, with the typed
client: create and read back, idempotent creates, id conflicts, filters, counts, sorts, the
state history (and one state), the run history per interval (flow runs too), update, delete;
bad query input is invalid; replay equals live."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta

import pytest

from runledger.client import (
    Conflict,
    HistoryInterval,
    Invalid,
    NotFound,
    RunledgerClient,
    State,
    TaskRun,
)
from runledger.commands.task_runs import keys_id
from tests.integration.broker import assert_live_equals_rebuild


async def a_running_flow_run(rl: RunledgerClient, name: str = "etl", **fields) -> uuid.UUID:
    flow = await rl.create_flow(name)
    run = await rl.create_flow_run(flow.id, **fields)
    assert (await rl.set_flow_run_state(run.id, "RUNNING")).accepted
    return run.id


def scheduled_at(when: datetime) -> dict:
    return {"type": "SCHEDULED", "state_details": {"scheduled_time": when.isoformat()}}


async def test_a_task_run_is_created_and_read_back(service, settings):
    async with RunledgerClient(settings) as rl:
        flow_run_id = await a_running_flow_run(rl, labels={"team": "data"})
        run, created = await rl.create_task_run(
            "etl.extract", "0", flow_run_id=flow_run_id, tags=["db", "db", "nightly"], labels={"owner": "ann"},
            task_inputs={"x": [{"input_type": "parameter", "name": "x"}]}, empirical_policy={"retries": 2},
            cache_key="k1", task_version="1.0")
        assert created is True and isinstance(run, TaskRun)
        assert (run.task_key, run.dynamic_key, run.flow_run_id) == ("etl.extract", "0", flow_run_id)
        assert run.state is not None and (run.state.type, run.state.name) == ("PENDING", "Pending")
        assert (run.state_type, run.state_name, run.state_id) == ("PENDING", "Pending", run.state.id)
        assert run.tags == ["db", "nightly"] and run.run_count == 0 and run.total_run_time == 0.0
        assert run.labels["owner"] == "ann" and run.labels["team"] == "data"
        assert run.labels["prefect.flow-run.id"] == str(flow_run_id) and "prefect.flow.id" in run.labels
        assert run.state.state_details["task_run_id"] == str(run.id)

        read = await rl.read_task_run(run.id)
        assert read == run  # the row is the run as its last event carries it
        raw = (await rl.query("GetTaskRun", {"id": str(run.id)})).result
        assert read.model_dump(mode="json") == raw
        assert (read.empirical_policy["retries"], read.cache_key, read.task_version) == (2, "k1", "1.0")

        await rl.update_task_run(run.id, name="renamed")
        assert (await rl.read_task_run(run.id)).name == "renamed"

        with pytest.raises(NotFound, match="Task run not found"):
            await rl.read_task_run(uuid.uuid4())


async def test_a_create_with_the_same_keys_returns_the_run_and_a_reused_id_conflicts(service, settings):
    async with RunledgerClient(settings) as rl:
        first, created = await rl.create_task_run("report", "a")
        assert created is True and first.flow_run_id is None
        again, created = await rl.create_task_run("report", "a", state="RUNNING", tags=["changed"])
        assert created is False and again == first  # unchanged, its state not applied
        assert (await rl.read_task_run(first.id)).state_type == "PENDING"
        # Another dynamic key is another run; a chosen id is kept.
        chosen = uuid.uuid4()
        other, created = await rl.create_task_run("report", "b", id=chosen)
        assert created is True and other.id == chosen
        with pytest.raises(Conflict):
            await rl.create_task_run("report", "c", id=chosen)  # the id exists with other keys
        # The same keys with another id: the keys name the run, whatever id was asked for.
        same, created = await rl.create_task_run("report", "b", id=uuid.uuid4())
        assert created is False and same.id == chosen
        assert await rl.count_task_runs() == 2


async def test_keys_the_service_no_longer_holds_in_memory_still_name_their_run(service, settings):
    """A create presumes keys it does not remember are new (it does not read the log for
    them): keys seen before and forgotten since (another instance wrote them, or the cache let
    them go) are found by the append's check, and the create is decided again on the log. So
    their run comes back unchanged, nothing appended, and keys whose run was deleted get a new
    run under a fresh id, as before."""
    async with RunledgerClient(settings) as rl:
        first, _ = await rl.create_task_run("report", "a")
        gone, _ = await rl.create_task_run("report", "b")
        await rl.delete_task_run(gone.id)
        for run in (first, gone):
            service.commands.repo.forget("task_run", str(keys_id(None, "report", run.dynamic_key)))
            service.commands.repo.forget("task_run", str(run.id))
        last = await service.store.last_sequence()
        again, created = await rl.create_task_run("report", "a", tags=["changed"])
        assert created is False and again == first
        assert await service.store.last_sequence() == last  # nothing appended
        new, created = await rl.create_task_run("report", "b")
        assert created is True and new.id != gone.id and new.dynamic_key == "b"


async def test_task_runs_are_filtered_sorted_and_counted(service, settings):
    async with RunledgerClient(settings) as rl:
        flow_run_id = await a_running_flow_run(rl)
        past = datetime.now(UTC) - timedelta(hours=1)
        future = datetime.now(UTC) + timedelta(hours=1)
        a, _ = await rl.create_task_run("extract", "0", flow_run_id=flow_run_id, name="t-a", tags=["x", "y"])
        b, _ = await rl.create_task_run("extract", "1", flow_run_id=flow_run_id, name="t-b", tags=["x"],
                                        state=scheduled_at(past))
        c, _ = await rl.create_task_run("load", "0", flow_run_id=flow_run_id, name="t-c", state=scheduled_at(future))
        d, _ = await rl.create_task_run("load", "0", name="t-d", tags=["y"])  # a background task
        before_start = datetime.now(UTC)
        assert (await rl.set_task_run_state(a.id, "RUNNING")).accepted
        assert (await rl.set_task_run_state(d.id, "RUNNING")).accepted
        assert (await rl.set_task_run_state(d.id, "COMPLETED")).accepted

        names = lambda runs: sorted(r.name for r in runs)  # noqa: E731
        assert await rl.count_task_runs() == 4
        assert names(await rl.list_task_runs(flow_run_ids=[flow_run_id])) == ["t-a", "t-b", "t-c"]
        assert names(await rl.list_task_runs(flow_run_id_is_null=True)) == ["t-d"]
        assert names(await rl.list_task_runs(flow_run_id_is_null=False)) == ["t-a", "t-b", "t-c"]
        assert await rl.count_task_runs(flow_run_ids=[flow_run_id], flow_run_id_is_null=True) == 0
        assert names(await rl.read_task_runs(task_keys=["load"])) == ["t-c", "t-d"]
        assert names(await rl.list_task_runs(state_types=["SCHEDULED"])) == ["t-b", "t-c"]
        assert names(await rl.list_task_runs(state_names=["Completed", "Running"])) == ["t-a", "t-d"]
        assert names(await rl.list_task_runs(tags=["x", "y"])) == ["t-a"]  # every tag given
        assert names(await rl.list_task_runs(tags=["y"])) == ["t-a", "t-d"]
        assert names(await rl.list_task_runs(ids=[b.id, c.id])) == ["t-b", "t-c"]
        assert names(await rl.list_task_runs(expected_start_time_after=future - timedelta(minutes=1))) == ["t-c"]
        assert names(await rl.list_task_runs(expected_start_time_before=past + timedelta(minutes=1))) == ["t-b"]
        assert names(await rl.list_task_runs(start_time_after=before_start)) == ["t-a", "t-d"]
        assert names(await rl.list_task_runs(end_time_after=before_start, end_time_before=datetime.now(UTC))) == ["t-d"]
        assert await rl.count_task_runs(task_run_filter={"end_time": {"is_null_": True}}) == 3
        assert await rl.count_task_runs(task_keys=["extract"], state_types=["RUNNING"]) == 1

        assert [r.name for r in await rl.list_task_runs(sort="NAME_ASC")] == ["t-a", "t-b", "t-c", "t-d"]
        assert [r.name for r in await rl.list_task_runs(sort="NAME_DESC", limit=2, offset=1)] == ["t-c", "t-b"]
        assert [r.id for r in await rl.list_task_runs()] == sorted([a.id, b.id, c.id, d.id], key=str, reverse=True)
        by_expected = [r.name for r in await rl.list_task_runs(sort="EXPECTED_START_TIME_ASC")]
        assert by_expected[0] == "t-b" and by_expected[-1] == "t-c"
        assert [r.name for r in await rl.list_task_runs(sort="END_TIME_DESC")][0] == "t-d"


async def test_the_state_history_is_oldest_first_and_one_state_reads_by_id(service, settings):
    async with RunledgerClient(settings) as rl:
        run, _ = await rl.create_task_run("work", "0")
        for state in ("RUNNING", "FAILED", "PENDING", "RUNNING", "COMPLETED"):
            assert (await rl.set_task_run_state(run.id, state, force=state == "PENDING")).state is not None
        history = await rl.read_task_run_states(run.id)
        assert all(isinstance(s, State) for s in history)
        assert [s.type for s in history] == ["PENDING", "RUNNING", "FAILED", "PENDING", "RUNNING", "COMPLETED"]
        stamps = [s.timestamp for s in history]
        assert stamps == sorted(stamps) and len(set(stamps)) == len(stamps)
        assert all(s.state_details["task_run_id"] == str(run.id) for s in history)
        read = await rl.read_task_run(run.id)
        assert read.state == history[-1] and read.run_count >= 1 and read.end_time is not None

        assert await rl.read_task_run_state(history[1].id) == history[1]
        with pytest.raises(NotFound, match="Task run state not found"):
            await rl.read_task_run_state(uuid.uuid4())
        # A filter, as Prefect's: an unknown run has no states.
        assert await rl.read_task_run_states(uuid.uuid4()) == []


async def test_run_history_buckets_runs_by_expected_start_time(service, settings):
    async with RunledgerClient(settings) as rl:
        start = (datetime.now(UTC) - timedelta(hours=3)).replace(minute=0, second=0, microsecond=0)
        hour = timedelta(hours=1)
        # Two late runs in the first hour (never started), one in the third that ran 2 s late.
        await rl.create_task_run("h", "0", state=scheduled_at(start + timedelta(minutes=5)))
        await rl.create_task_run("h", "1", state=scheduled_at(start + timedelta(minutes=50)))
        ran, _ = await rl.create_task_run("h", "2", state=scheduled_at(start + 2 * hour))
        assert (await rl.set_task_run_state(ran.id, "RUNNING")).accepted
        await rl.create_task_run("other", "0", state=scheduled_at(start + 2 * hour))

        history = await rl.task_run_history(start, start + 3 * hour, 3600, task_keys=["h"])
        assert all(isinstance(i, HistoryInterval) for i in history)
        assert [(i.interval_start, i.interval_end) for i in history] == [
            (start, start + hour), (start + hour, start + 2 * hour), (start + 2 * hour, start + 3 * hour)]
        (late,) = history[0].states
        assert (late.state_type, late.state_name, late.count_runs) == ("SCHEDULED", "Scheduled", 2)
        # Lateness: the time since each was expected (more than 2 h and 1 h 15 min).
        assert late.sum_estimated_lateness > 3 * 3600 and late.sum_estimated_run_time == 0
        assert history[1].states == []
        (running,) = history[2].states
        assert (running.state_type, running.count_runs) == ("RUNNING", 1)
        assert running.sum_estimated_run_time >= 0 and running.sum_estimated_lateness >= 3600

        everything = await rl.task_run_history(start, start + 3 * hour, 3600)
        assert [sum(s.count_runs for s in i.states) for i in everything] == [2, 0, 2]
        # The last interval may end after history_end; one that starts at history_end is not there.
        assert [i.interval_end for i in await rl.task_run_history(start, start + hour + timedelta(minutes=1), 3600)] \
            == [start + hour, start + 2 * hour]
        assert await rl.task_run_history(start, start, 60) == []

        with pytest.raises(Invalid, match="History interval must not be less than 1 second.") as e:
            await rl.task_run_history(start, start + hour, 0.5)
        assert e.value.field == "history_interval_seconds"
        with pytest.raises(Invalid, match="500 intervals"):
            await rl.task_run_history(start, start + 501 * timedelta(seconds=1), 1)
        assert len(await rl.task_run_history(start, start + 500 * timedelta(seconds=1), 1)) == 500

        # Flow runs: the same shape, filtered as ListFlowRuns.
        flow = await rl.create_flow("hist")
        await rl.create_flow_run(flow.id, state=scheduled_at(start + timedelta(minutes=10)))
        flow_history = await rl.flow_run_history(start, start + 2 * hour, 3600, flow_ids=[flow.id])
        assert [[(s.state_type, s.count_runs) for s in i.states] for i in flow_history] == [[("SCHEDULED", 1)], []]
        with pytest.raises(Invalid, match="History interval must not be less than 1 second."):
            await rl.flow_run_history(start, start + hour, 0)


async def test_a_flow_run_state_reads_by_id(service, settings):
    async with RunledgerClient(settings) as rl:
        flow_run_id = await a_running_flow_run(rl)
        states = await rl.read_flow_run_states(flow_run_id)
        assert await rl.read_flow_run_state(states[-1].id) == states[-1]
        with pytest.raises(NotFound, match="Flow run state not found"):
            await rl.read_flow_run_state(uuid.uuid4())


async def test_a_deleted_task_run_is_gone_from_the_read_model(service, settings):
    async with RunledgerClient(settings) as rl:
        run, _ = await rl.create_task_run("gone", "0")
        assert (await rl.set_task_run_state(run.id, "RUNNING")).accepted
        states = await rl.read_task_run_states(run.id)
        await rl.delete_task_run(run.id)
        with pytest.raises(NotFound, match="Task run not found"):
            await rl.read_task_run(run.id)
        assert await rl.read_task_run_states(run.id) == []
        with pytest.raises(NotFound):
            await rl.read_task_run_state(states[0].id)
        assert await rl.count_task_runs() == 0
        with pytest.raises(NotFound):
            await rl.delete_task_run(run.id)
        again, created = await rl.create_task_run("gone", "0")  # its keys are free again
        assert created is True and again.id != run.id


async def test_deleting_a_flow_run_deletes_its_task_runs(service, settings):
    async with RunledgerClient(settings) as rl:
        flow_run_id = await a_running_flow_run(rl)
        mine, _ = await rl.create_task_run("step", "0", flow_run_id=flow_run_id)
        assert (await rl.set_task_run_state(mine.id, "RUNNING")).accepted
        other, _ = await rl.create_task_run("step", "0")  # a background run of the same key stays
        await rl.delete_flow_run(flow_run_id)
        with pytest.raises(NotFound):
            await rl.read_task_run(mine.id)
        assert await rl.read_task_run_states(mine.id) == []
        for command in (rl.set_task_run_state(mine.id, "COMPLETED"), rl.update_task_run(mine.id, name="x"),
                        rl.delete_task_run(mine.id)):
            with pytest.raises(NotFound, match="Task run not found"):
                await command
        with pytest.raises(NotFound):  # nor can a new one be made in it
            await rl.create_task_run("step", "1", flow_run_id=flow_run_id)
        assert [r.id for r in await rl.list_task_runs()] == [other.id]
        await assert_live_equals_rebuild(service, settings)


@pytest.mark.parametrize("name, body, field", [
    ("ListTaskRuns", {"limit": 201}, "limit"),
    ("ListTaskRuns", {"sort": "SIDEWAYS"}, "sort"),
    ("ListTaskRuns", {"task_runs": {"flow_run_id": {"is_null_": "yes"}}}, "task_runs.flow_run_id.is_null_"),
    ("CountTaskRuns", {"task_runs": {"state_type": {"any_": ["WALKING"]}}}, "task_runs.state_type.any_.0"),
    ("GetTaskRun", {}, "id"),
    ("GetTaskRunHistory", {"history_start": "2026-01-01T00:00:00Z", "history_end": "2026-01-02T00:00:00Z",
                           "history_interval_seconds": 0.999}, "history_interval_seconds"),
    ("GetFlowRunHistory", {"history_start": "2026-01-01T00:00:00Z", "history_end": "2026-01-02T00:00:00Z"},
     "history_interval_seconds"),
])
async def test_bad_task_run_queries_are_invalid(broker, name, body, field):
    reply = await broker.qry(name, **body)
    assert reply["ok"] is False and reply["error"]["code"] == "invalid", reply
    assert reply["error"]["field"] == field


async def test_replay_of_task_runs_equals_live(service, settings):
    async with RunledgerClient(settings) as rl:
        flow_run_id = await a_running_flow_run(rl)
        for i in range(4):
            run, _ = await rl.create_task_run("replayed", str(i), flow_run_id=flow_run_id if i % 2 else None)
            await rl.set_task_run_state(run.id, "RUNNING")
            if i % 2:
                await rl.set_task_run_state(run.id, "COMPLETED")
        await rl.update_task_run(run.id, name="last")
        await rl.delete_task_run(run.id)
        assert await rl.count_task_runs() == 3
    assert await assert_live_equals_rebuild(service, settings) >= 3


async def test_a_scheduled_time_carries_into_pending_and_running_waits_for_it(service, settings):
    async with RunledgerClient(settings) as rl:
        later = datetime.now(UTC) + timedelta(minutes=5)
        run, _ = await rl.create_task_run("or11", "0", state=scheduled_at(later))
        pending = await rl.set_task_run_state(run.id, "PENDING")
        assert pending.accepted and pending.state.state_details.get("scheduled_time") is not None
        running = await rl.set_task_run_state(run.id, "RUNNING")
        assert running.status == "WAIT" and 295 <= running.details.delay_seconds <= 300


async def test_a_rerun_is_named_rerunning_whatever_name_was_proposed(service, settings):
    async with RunledgerClient(settings) as rl:
        run, _ = await rl.create_task_run("or20", "0")
        assert (await rl.set_task_run_state(run.id, "RUNNING")).accepted
        again = await rl.set_task_run_state(run.id, {"type": "RUNNING", "name": "Working"})
        assert again.state.name == "Rerunning"


async def test_a_cache_key_over_2000_characters_is_rejected_not_invalid(service, settings):
    async with RunledgerClient(settings) as rl:
        run, _ = await rl.create_task_run("or14", "0")
        result = await rl.set_task_run_state(run.id, {"type": "COMPLETED", "state_details": {"cache_key": "x" * 2001}})
        assert result.status == "REJECT"
        assert result.details.reason == "Cache key exceeded maximum allowed length of 2000 characters."
        assert result.state.type == "COMPLETED"  # written as proposed (as Prefect does), but not cached
        with pytest.raises(Invalid):  # a key on the run itself is still checked when created
            await rl.create_task_run("or14", "1", cache_key="x" * 2001)
