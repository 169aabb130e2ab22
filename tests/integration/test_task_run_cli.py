"""The `task-run` verbs against the real service: `ls` and its filters over task runs of a flow
run and background ones, `inspect` with the state history, an unknown or ambiguous run, and
`workers` listing the task workers serving now. Each CLI run is a new client that must see what
was written just before it."""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import uuid
from datetime import UTC, datetime, timedelta

from runledger.client import RunledgerClient
from runledger.handlers.task_worker import TaskWorker
from runledger.infra.nats_connection import connect
from tests.integration.broker import cli_in_thread

_cli = cli_in_thread


def _table(stdout: str) -> tuple[list[str], list[list[str]]]:
    """A piped table: its header and rows, cells split where two or more spaces are."""
    lines = stdout.splitlines()
    return re.split(r" {2,}", lines[0]), [re.split(r" {2,}", line) for line in lines[1:]]


def _names(stdout: str) -> list[str]:
    return [r["name"] for r in json.loads(stdout)]


async def _runs(settings) -> dict[str, str]:
    """Flow run `etl-run` (RUNNING) with task runs `extract-0` (tag db), `extract-1` (SCHEDULED
    in an hour) and `load-0`; then the background run `report` (tag db, RUNNING). Returns their
    ids by name, and the flow run's as `etl-run`."""
    async with RunledgerClient(settings) as rl:
        flow = await rl.create_flow("etl")
        flow_run = await rl.create_flow_run(flow.id, name="etl-run")
        assert (await rl.set_flow_run_state(flow_run.id, "RUNNING")).accepted
        later = (datetime.now(UTC) + timedelta(hours=1)).isoformat()
        ids = {"etl-run": str(flow_run.id)}
        for name, key, dynamic, fields in (
                ("extract-0", "etl.extract", "0", {"tags": ["db"]}),
                ("extract-1", "etl.extract", "1",
                 {"state": {"type": "SCHEDULED", "state_details": {"scheduled_time": later}}}),
                ("load-0", "etl.load", "0", {})):
            made, created = await rl.create_task_run(key, dynamic, flow_run_id=flow_run.id, name=name, **fields)
            assert created
            ids[name] = str(made.id)
        report, _ = await rl.create_task_run("report", "r1", name="report", tags=["db", "daily"])
        assert (await rl.set_task_run_state(report.id, "RUNNING")).accepted
        ids["report"] = str(report.id)
    return ids


async def test_task_run_ls_shows_the_runs_and_filters_them(service, settings):
    cli = _cli(settings)
    ids = await _runs(settings)

    table = await cli("task-run", "ls")
    assert table.exit_code == 0, table.output
    header, rows = _table(table.stdout)
    assert header == ["Name", "Task Key", "State", "Flow Run", "Expected Start", "Start", "End", "ID"]
    # Latest expected start first: the run scheduled in an hour, then the others newest first.
    assert [r[0] for r in rows] == ["extract-1", "report", "load-0", "extract-0"]
    by_name = {r[0]: r for r in rows}
    assert by_name["extract-1"][1:4] == ["etl.extract", "SCHEDULED", "etl-run"]
    assert by_name["report"][1:4] == ["report", "RUNNING", "-"]  # a background task: no flow run
    assert by_name["report"][5] != "-" and by_name["report"][6] == "-"  # started, not ended
    assert by_name["extract-0"][1:4] == ["etl.extract", "PENDING", "etl-run"]
    assert {r[0]: r[-1] for r in rows} == {n: ids[n] for n in ("extract-0", "extract-1", "load-0", "report")}

    # Filters combine: a task key and a state type (any case); a flow run by name and a tag.
    keyed = await cli("task-run", "ls", "--task-key", "etl.extract", "--state", "scheduled", "-o", "json")
    assert keyed.exit_code == 0, keyed.output
    assert _names(keyed.stdout) == ["extract-1"]
    tagged = await cli("task-run", "ls", "--flow-run", "etl-run", "--tag", "db", "--json")
    assert _names(tagged.stdout) == ["extract-0"]  # `report` has the tag but no flow run
    by_id = await cli("task-run", "ls", "-r", ids["etl-run"], "--sort", "name_desc", "--json")
    assert _names(by_id.stdout) == ["load-0", "extract-1", "extract-0"]
    assert _names((await cli("task-run", "ls", "--background", "--json")).stdout) == ["report"]
    assert _names((await cli("task-run", "ls", "-k", "etl.load", "-k", "report", "--sort", "NAME_ASC",
                             "--json")).stdout) == ["load-0", "report"]
    assert _names((await cli("task-run", "ls", "--tag", "db", "--tag", "daily", "--json")).stdout) == ["report"]
    assert _names((await cli("task-run", "ls", "--state-name", "Running", "--json")).stdout) == ["report"]
    assert _names((await cli("task-run", "ls", "--limit", "2", "--json")).stdout) == ["extract-1", "report"]
    assert len(json.loads((await cli("task-run", "ls", "--json")).stdout)[0]["id"]) == 36
    # A listing cut at its limit says so on stderr; one that holds every run does not.
    cut = await cli("task-run", "ls", "--limit", "2")
    assert [r[0] for r in _table(cut.stdout)[1]] == ["extract-1", "report"]
    assert "the first 2 task runs are shown; there are more: raise --limit" in cut.stderr
    assert "there are more" not in table.stderr + (await cli("task-run", "ls", "--limit", "4")).stderr
    assert (await cli("task-run", "ls", "--limit", "0")).exit_code == 2

    none = await cli("task-run", "ls", "--flow-run", "no-such-flow-run")
    assert none.exit_code == 0 and none.stdout == "No task runs found.\n"
    bad_state = await cli("task-run", "ls", "--state", "sleeping")
    assert bad_state.exit_code == 2 and "'sleeping' is not one of SCHEDULED" in bad_state.stderr
    bad_sort = await cli("task-run", "ls", "--sort", "newest")
    assert bad_sort.exit_code == 2 and "'newest' is not one of ID_DESC" in bad_sort.stderr
    both = await cli("task-run", "ls", "--background", "--flow-run", "etl-run")
    assert both.exit_code == 2 and "leave out --flow-run" in both.stderr


async def test_task_run_inspect_shows_the_run_and_its_states(service, settings):
    cli = _cli(settings)
    async with RunledgerClient(settings) as rl:
        made, _ = await rl.create_task_run("mytasks.add", "a1", name="add-1")
        for state in ("RUNNING", "COMPLETED"):
            assert (await rl.set_task_run_state(made.id, state)).accepted
        twin_a, _ = await rl.create_task_run("mytasks.add", "t1", name="twin")
        await rl.create_task_run("mytasks.add", "t2", name="twin")

    shown = await cli("task-run", "inspect", "add-1")  # by its name, which only it has
    assert shown.exit_code == 0, shown.output
    lines = shown.stdout.splitlines()
    at = lines.index(next(line for line in lines if line.startswith("Type ")))
    fields = dict((re.split(r" {2,}", line, maxsplit=1) + [""])[:2] for line in lines[:at])
    assert fields["id"] == str(made.id) and fields["name"] == "add-1" and fields["task_key"] == "mytasks.add"
    assert fields["state_type"] == "COMPLETED" and fields["flow_run_id"] == "-" and fields["end_time"] != "-"
    history = lines[at:]
    assert re.split(r" {2,}", history[0]) == ["Type", "Name", "Timestamp", "Message"]
    assert [re.split(r" {2,}", line)[:2] for line in history[1:]] == [
        ["PENDING", "Pending"], ["RUNNING", "Running"], ["COMPLETED", "Completed"]]

    as_json = await cli("task-run", "inspect", str(made.id), "--json")
    assert as_json.exit_code == 0, as_json.output
    inspected = json.loads(as_json.stdout)
    assert inspected["id"] == str(made.id) and inspected["name"] == "add-1"
    assert [s["type"] for s in inspected["state_history"]] == ["PENDING", "RUNNING", "COMPLETED"]
    assert inspected["end_time"] is not None

    missing_id = str(uuid.uuid4())
    unknown = await cli("task-run", "inspect", missing_id)
    assert unknown.exit_code == 3 and unknown.stdout == ""
    assert unknown.stderr == f"Error (not_found): Task run '{missing_id}' not found.\n"
    unknown_name = await cli("task-run", "inspect", "nope", "-o", "json")
    assert unknown_name.exit_code == 3 and unknown_name.stdout == ""
    assert unknown_name.stderr == "Error (not_found): Task run 'nope' not found.\n"
    ambiguous = await cli("task-run", "inspect", "twin")
    assert ambiguous.exit_code == 4 and "Several task runs are named 'twin'" in ambiguous.stderr
    assert json.loads((await cli("task-run", "inspect", str(twin_a.id), "--json")).stdout)["name"] == "twin"


async def test_task_run_cancel_cancels_a_waiting_run_and_refuses_a_finished_one(service, settings):
    cli = _cli(settings)
    async with RunledgerClient(settings) as rl:
        waiting, _ = await rl.create_task_run("mytasks.add", "c1", name="to-cancel")
        done, _ = await rl.create_task_run("mytasks.add", "c2", name="done-already")
        for state in ("RUNNING", "COMPLETED"):
            assert (await rl.set_task_run_state(done.id, state)).accepted

    cancelled = await cli("task-run", "cancel", "to-cancel")
    assert cancelled.exit_code == 0, cancelled.output
    assert cancelled.stdout == "ACCEPT: task run 'to-cancel' is CANCELLED.\n"
    async with RunledgerClient(settings) as rl:
        assert (await rl.read_task_run(waiting.id, min_seq=await rl.catch_up())).state_type == "CANCELLED"

    refused = await cli("task-run", "cancel", str(done.id), "--json")
    assert refused.exit_code == 8, refused.output
    assert json.loads(refused.stdout)["status"] == "ABORT"
    async with RunledgerClient(settings) as rl:
        assert (await rl.read_task_run(done.id, min_seq=await rl.catch_up())).state_type == "COMPLETED"


@contextlib.asynccontextmanager
async def _serving(settings, keys: list[str], worker_id: str):
    """A task worker serving `keys` on a connection of its own until the block ends."""
    async def noop() -> None:
        return None

    nc = await connect(settings, name="test-task-worker")
    worker = TaskWorker(nc, settings, dict.fromkeys(keys, noop), worker_id=worker_id)
    await worker.start()
    stop = asyncio.Event()
    serving = asyncio.create_task(worker.serve(stop))
    try:
        yield worker
    finally:
        stop.set()
        await asyncio.wait_for(serving, 30)
        await nc.close()


async def test_task_run_workers_lists_the_task_workers_serving_now(service, settings):
    cli = _cli(settings)
    empty = await cli("task-run", "workers")
    assert empty.exit_code == 0 and empty.stdout == "No task workers serving.\n"

    async with _serving(settings, ["k1", "k2"], "cli-a"), _serving(settings, ["k3"], "cli-b"):
        async with RunledgerClient(settings) as rl:
            for _ in range(50):  # each is listed from its first heartbeat
                if len(await rl.read_task_workers()) == 2:
                    break
                await asyncio.sleep(0.1)
        table = await cli("task-run", "workers")
        assert table.exit_code == 0, table.output
        header, rows = _table(table.stdout)
        assert header == ["Identifier", "Task Keys", "Last Heartbeat"]
        assert [r[:2] for r in rows] == [["cli-a", "k1, k2"], ["cli-b", "k3"]]
        assert all(datetime.fromisoformat(r[2]) > datetime.now(UTC) - timedelta(minutes=1) for r in rows)
        listed = json.loads((await cli("task-run", "workers", "--task-key", "k3", "--task-key", "nope",
                                       "--json")).stdout)
        assert [(w["identifier"], w["task_keys"]) for w in listed] == [("cli-b", ["k3"])]
        assert json.loads((await cli("task-run", "workers", "-k", "nope", "-o", "json")).stdout) == []
    # A worker that stops removes itself: no longer listed.
    assert (await cli("task-run", "workers")).stdout == "No task workers serving.\n"


async def test_task_worker_still_runs_a_worker_with_module_and_key(service, settings):
    # `task-worker` stays the command that serves keys (the listing is `task-run workers`): its
    # options are parsed as before, so a module that cannot be imported is a usage error.
    cli = _cli(settings)
    refused = await cli("task-worker", "--module", "no_such_tasks_module_xyz", "--key", "k1")
    assert refused.exit_code == 2 and "cannot import 'no_such_tasks_module_xyz'" in refused.stderr
