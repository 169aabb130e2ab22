"""The `worker` verbs and `work-pool get-runs` / `preview` against the fake service: what each
sends (checked against the service's own command and query schemas, parsed as the service
parses them), the tables and `--json` output, the one-line errors and the exit codes, and
that `preview` never sends the poll (the service records every `GetScheduledFlowRuns`)."""

from __future__ import annotations

import json
import re
import uuid
from datetime import UTC, datetime, timedelta

import pytest
from typer.testing import CliRunner

from runledger.cli.main import _register, app
from runledger.commands import queries as q
from runledger.commands import workers as wk
from runledger.projections.health import GetServiceHealth

from .fake_service import SILENT, sample_flow_run, sample_pool, sample_queue, sample_worker

_register()

HOSTILE = ["\x1b]0;pwned\x07", "[red]x[/red]", "tab\there\u202eevil"]

SCHEMAS = {
    "ListWorkers": q.ListWorkers, "DeleteWorker": wk.DeleteWorker, "GetScheduledFlowRuns": q.GetScheduledFlowRuns,
    "GetWorkPool": q.GetWorkPool, "ListWorkQueues": q.ListWorkQueues, "ListFlowRuns": q.ListFlowRuns,
    "GetServiceHealth": GetServiceHealth,
}


def _assert_valid_requests(fake) -> None:
    ours = [(name, body) for name, body in fake.requests if name in SCHEMAS]
    assert ours
    for name, body in ours:
        SCHEMAS[name].model_validate_json(json.dumps(body), strict=True)  # as the service parses it


@pytest.fixture
def cli(fake, nats_url, namespace, tmp_path):
    env = {"RUNLEDGER_NATS_URL": nats_url, "RUNLEDGER_NAMESPACE": namespace,
           "RUNLEDGER_CONFIG_DIR": str(tmp_path), "RUNLEDGER_REQUEST_TIMEOUT": "2", "COLUMNS": "200"}
    runner = CliRunner()
    fake.ok("GetServiceHealth", {"stream_last_seq": 40, "projections": [], "stalled": []})
    return lambda *args, **extra: runner.invoke(app, list(args), env={**env, **extra})


def _queue(name: str, priority: int, **fields) -> dict:
    return {**sample_queue(name), "priority": priority, **fields}


def _run(name: str, queue: dict, priority: int = 0, at: str = "2025-01-02T04:00:00Z", **fields) -> dict:
    return {**sample_flow_run(name, state={"type": "SCHEDULED"}), "work_queue_id": queue["id"],
            "work_queue_name": queue["name"], "priority": priority, "next_scheduled_start_time": at,
            "work_pool_name": "etl", **fields}


def _item(run: dict) -> dict:
    return {"work_pool_id": str(uuid.UUID(int=1)), "work_queue_id": run["work_queue_id"], "flow_run": run}


# ---------------------------------------------------------------------------------------------
# worker ls, worker delete

def test_worker_ls_shows_a_table_and_sends_the_filters(cli, fake):
    workers = [sample_worker("w1"), sample_worker("w2", heartbeat_interval_seconds=None, status="OFFLINE")]
    fake.ok("ListWorkers", workers)
    result = cli("worker", "ls", "--pool", "etl", "--status", "online", "-s", "OFFLINE", "--limit", "5")
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert re.match(r"Name +Status +Last Heartbeat +Heartbeat Interval$", lines[0])
    assert lines[1].split() == ["w1", "ONLINE", "2025-01-02T03:04:05+00:00", "30s"]
    assert lines[2].split() == ["w2", "OFFLINE", "2025-01-02T03:04:05+00:00", "-"]
    assert fake.sent("ListWorkers") == [{"work_pool_name": "etl", "limit": 5, "offset": 0, "min_seq": 40,
                                         "workers": {"status": {"any_": ["ONLINE", "OFFLINE"]}}}]
    for flags in (["--json"], ["-o", "json"], ["--output", "JSON"]):
        as_json = cli("worker", "ls", "-p", "etl", *flags)
        assert as_json.exit_code == 0 and json.loads(as_json.stdout) == workers
    assert fake.sent("ListWorkers")[-1] == {"work_pool_name": "etl", "limit": 100, "offset": 0, "min_seq": 40}
    fake.ok("ListWorkers", [])
    empty = cli("worker", "ls", "--pool", "etl")
    assert empty.exit_code == 0 and empty.stdout == "No workers found.\n"
    assert json.loads(cli("worker", "ls", "--pool", "etl", "--json").stdout) == []
    _assert_valid_requests(fake)


def test_worker_ls_pages_up_to_the_limit(cli, fake):
    base = sample_worker("w")
    workers = [{**base, "name": f"w{i:03}"} for i in range(450)]
    fake.replies["ListWorkers"] = lambda body: {
        "ok": True, "result": workers[body["offset"]:body["offset"] + body["limit"]], "seq": None}
    result = cli("worker", "ls", "--pool", "etl", "--limit", "250", "--json")
    assert result.exit_code == 0, result.output
    assert [w["name"] for w in json.loads(result.stdout)] == [f"w{i:03}" for i in range(250)]
    assert [(b["offset"], b["limit"]) for b in fake.sent("ListWorkers")] == [(0, 200), (200, 50)]
    _assert_valid_requests(fake)


def test_worker_ls_errors_exit_with_their_codes(cli, fake):
    fake.error("ListWorkers", "not_found", 'Work pool "nope" not found.')
    missing = cli("worker", "ls", "--pool", "nope")
    assert missing.exit_code == 3 and missing.stderr == 'Error (not_found): Work pool "nope" not found.\n'
    assert missing.stdout == ""
    before = len(fake.requests)
    assert cli("worker", "ls", "--pool", "etl", "--status", "BUSY").exit_code == 2
    assert cli("worker", "ls").exit_code == 2  # --pool is required
    assert cli("worker", "ls", "--pool", "etl", "--limit", "-1").exit_code == 2
    assert len(fake.requests) == before  # a usage error sends nothing
    fake.error("GetServiceHealth", "unavailable", "the service is restarting")
    assert cli("worker", "ls", "--pool", "etl").exit_code == 6


def test_worker_delete_and_its_not_found_cases(cli, fake):
    fake.ok("DeleteWorker", None, seq=9)
    deleted = cli("worker", "delete", "w1", "--pool", "etl", "--idempotency-key", "k-1")
    assert deleted.exit_code == 0, deleted.output
    assert deleted.stdout == "Deleted worker 'w1' of work pool 'etl'.\n"
    assert fake.sent("DeleteWorker") == [{"work_pool_name": "etl", "name": "w1"}]
    assert fake.keys("DeleteWorker") == ["k-1"]
    for flags in (["--json"], ["-o", "json"]):
        assert cli("worker", "delete", "w1", "-p", "etl", *flags).stdout == "null\n"
    keys = fake.keys("DeleteWorker")
    assert all(keys) and len(set(keys)) == 3  # a new key per run

    fake.error("DeleteWorker", "not_found", "Worker not found.")
    gone = cli("worker", "delete", "w1", "--pool", "etl")
    assert gone.exit_code == 3 and gone.stderr == "Error (not_found): Worker 'w1' not found in work pool 'etl'.\n"
    fake.error("DeleteWorker", "not_found", 'Work pool "nope" not found.')
    no_pool = cli("worker", "delete", "w1", "--pool", "nope")
    assert no_pool.exit_code == 3 and no_pool.stderr == 'Error (not_found): Work pool "nope" not found.\n'
    assert cli("worker", "delete", "w1").exit_code == 2

    fake.replies["DeleteWorker"] = SILENT
    lost = cli("worker", "delete", "w1", "--pool", "etl", "--idempotency-key", "k-2", RUNLEDGER_REQUEST_TIMEOUT="0.2")
    assert lost.exit_code == 6 and lost.stderr.count("\n") == 1
    assert "run `runledger worker ls --pool etl` to see whether it was applied" in lost.stderr
    assert "--idempotency-key k-2" in lost.stderr
    _assert_valid_requests(fake)


# ---------------------------------------------------------------------------------------------
# work-pool get-runs

def test_get_runs_polls_and_prints_the_runs_in_the_services_order(cli, fake):
    urgent, default = _queue("urgent", 1), _queue("default", 2)
    runs = [_run("u-first", urgent, priority=0, at="2025-01-02T05:00:00Z"),
            _run("u-second", urgent, priority=3, at="2025-01-02T04:00:00Z", state_name="Late"),
            _run("d-first", default, priority=0, at="2025-01-02T03:00:00Z")]
    items = [_item(r) for r in runs]
    fake.ok("GetScheduledFlowRuns", items)
    result = cli("work-pool", "get-runs", "etl", "--queue", "urgent", "-q", "default", "--limit", "3",
                 "--scheduled-before", "2025-01-03T00:00:00+01:00")
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert re.match(r"ID +Name +Queue +State +Scheduled +Priority$", lines[0])
    assert [line.split() for line in lines[1:]] == [
        [runs[0]["id"], "u-first", "urgent", "Scheduled", "2025-01-02T05:00:00+00:00", "0"],
        [runs[1]["id"], "u-second", "urgent", "Late", "2025-01-02T04:00:00+00:00", "3"],
        [runs[2]["id"], "d-first", "default", "Scheduled", "2025-01-02T03:00:00+00:00", "0"]]
    assert fake.sent("GetScheduledFlowRuns") == [
        {"work_pool_name": "etl", "limit": 3, "work_queue_names": ["urgent", "default"],
         "scheduled_before": "2025-01-03T00:00:00+01:00", "min_seq": 40}]
    for flags in (["--json"], ["-o", "json"]):
        as_json = cli("work-pool", "get-runs", "etl", *flags)
        assert as_json.exit_code == 0 and json.loads(as_json.stdout) == items  # the service's items
    assert fake.sent("GetScheduledFlowRuns")[-1] == {"work_pool_name": "etl", "min_seq": 40}
    fake.ok("GetScheduledFlowRuns", [])
    empty = cli("work-pool", "get-runs", "etl")
    assert empty.exit_code == 0 and empty.stdout == "No scheduled flow runs found.\n"
    _assert_valid_requests(fake)


@pytest.mark.parametrize("args", [
    ["work-pool", "get-runs", "etl", "--scheduled-before", "tomorrow"],
    ["work-pool", "get-runs", "etl", "--limit", "201"],
    ["work-pool", "get-runs", "etl", "--limit", "-1"],
    ["work-pool", "get-runs"],
    ["work-pool", "preview", "etl", "--hours", "-1"],
    ["work-pool", "preview", "etl", "--hours", "soon"],
    ["work-pool", "preview", "etl", "-o", "yaml"],
])
def test_usage_errors_exit_2_and_send_nothing(cli, fake, args):
    result = cli(*args)
    assert result.exit_code == 2, result.output
    assert fake.requests == []


def test_get_runs_errors_exit_with_their_codes(cli, fake):
    fake.error("GetScheduledFlowRuns", "not_found", 'Work pool "nope" not found.')
    missing = cli("work-pool", "get-runs", "nope")
    assert missing.exit_code == 3 and missing.stderr == 'Error (not_found): Work pool "nope" not found.\n'
    fake.error("GetScheduledFlowRuns", "not_found", "Work pool queue 'etl/gpu' not found.")
    no_queue = cli("work-pool", "get-runs", "etl", "-q", "gpu")
    assert no_queue.exit_code == 3 and "Work pool queue 'etl/gpu' not found." in no_queue.stderr
    fake.replies["GetScheduledFlowRuns"] = SILENT
    slow = cli("work-pool", "get-runs", "etl", RUNLEDGER_REQUEST_TIMEOUT="0.2", RUNLEDGER_QUERY_WAIT_TIMEOUT="0.2")
    assert slow.exit_code == 6 and slow.stderr.startswith("Error (unavailable): no reply on ")


# ---------------------------------------------------------------------------------------------
# work-pool preview

def _preview_fakes(fake, pool: dict | None = None, urgent_paused: bool = False):
    urgent, default = _queue("urgent", 1, is_paused=urgent_paused), _queue("default", 2)
    # As the service lists them: by next scheduled start, whatever the queue.
    runs = [_run("d-early", default, at="2025-01-02T03:00:00Z"),
            _run("u-late-low", urgent, priority=5, at="2025-01-02T03:30:00Z"),
            _run("u-later", urgent, at="2025-01-02T04:00:00Z"),
            _run("retry-in-process", urgent, at="2025-01-02T04:10:00Z",
                 empirical_policy={"retry_type": "in_process"}),
            _run("d-late", default, at="2025-01-02T05:00:00Z")]
    fake.ok("GetWorkPool", pool or sample_pool("etl", type="process"))
    fake.ok("ListWorkQueues", [urgent, default])
    fake.ok("ListFlowRuns", runs)
    return urgent, default, runs


def test_preview_lists_the_runs_due_sorted_as_the_poll_without_polling(cli, fake):
    _, _, runs = _preview_fakes(fake)
    started = datetime.now(UTC)
    result = cli("work-pool", "preview", "etl", "--hours", "2.5")
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert re.match(r"ID +Name +Queue +State +Scheduled +Priority$", lines[0])
    assert [line.split()[1] for line in lines[1:]] == ["u-later", "u-late-low", "d-early", "d-late"]
    assert "GetScheduledFlowRuns" not in {n for n, _ in fake.requests}  # records no poll
    (body,) = fake.sent("ListFlowRuns")
    horizon = datetime.fromisoformat(body["flow_runs"].pop("next_scheduled_start_time")["before_"])
    assert started + timedelta(hours=2.5) <= horizon <= datetime.now(UTC) + timedelta(hours=2.5)
    assert body == {"sort": "NEXT_SCHEDULED_START_TIME_ASC", "limit": 200, "offset": 0, "min_seq": 40,
                    "flow_runs": {"state_type": {"any_": ["SCHEDULED"]}}, "work_pool_name": {"any_": ["etl"]}}
    assert fake.sent("GetWorkPool") == [{"name": "etl", "min_seq": 40}]
    assert fake.sent("ListWorkQueues") == [{"work_pool_name": "etl", "limit": 200, "offset": 0, "min_seq": 40}]

    for flags in (["--json"], ["-o", "json"]):
        as_json = cli("work-pool", "preview", "etl", *flags)
        assert as_json.exit_code == 0
        assert [r["name"] for r in json.loads(as_json.stdout)] == ["u-later", "u-late-low", "d-early", "d-late"]
        assert json.loads(as_json.stdout)[0] == runs[2]
    default_hours = fake.sent("ListFlowRuns")[-1]["flow_runs"]["next_scheduled_start_time"]["before_"]
    assert datetime.fromisoformat(default_hours) <= datetime.now(UTC) + timedelta(hours=1)
    assert "GetScheduledFlowRuns" not in {n for n, _ in fake.requests}
    fake.ok("ListFlowRuns", [])
    empty = cli("work-pool", "preview", "etl")
    assert empty.exit_code == 0 and empty.stdout == "No scheduled flow runs found.\n"
    _assert_valid_requests(fake)


def test_preview_of_some_queues_and_its_notes_and_errors(cli, fake):
    urgent, _, _ = _preview_fakes(fake, urgent_paused=True)
    some = cli("work-pool", "preview", "etl", "-q", "urgent", "-q", "urgent", "-h", "3")
    assert some.exit_code == 0, some.output
    assert fake.sent("ListFlowRuns")[0]["flow_runs"]["work_queue_id"] == {"any_": [urgent["id"]]}
    assert "work_pool_name" not in fake.sent("ListFlowRuns")[0]
    assert some.stdout.splitlines()[-1] == "Note: paused queues, whose runs workers do not get: urgent."

    _preview_fakes(fake, pool={**sample_pool("etl", type="process", is_paused=True), "status": "PAUSED"})
    paused = cli("work-pool", "preview", "etl")
    assert paused.stdout.splitlines()[-1] == ("Note: work pool 'etl' is paused: its workers get no runs until it "
                                              "is resumed.")
    assert "Note" not in cli("work-pool", "preview", "etl", "--json").stdout

    before = len(fake.sent("ListFlowRuns"))
    no_queue = cli("work-pool", "preview", "etl", "-q", "gpu")
    assert no_queue.exit_code == 3 and no_queue.stderr == "Error (not_found): Work pool queue 'etl/gpu' not found.\n"
    assert len(fake.sent("ListFlowRuns")) == before
    fake.error("GetWorkPool", "not_found", 'Work pool "nope" not found.')
    missing = cli("work-pool", "preview", "nope")
    assert missing.exit_code == 3 and missing.stderr == 'Error (not_found): Work pool "nope" not found.\n'
    assert "GetScheduledFlowRuns" not in {n for n, _ in fake.requests}
    _assert_valid_requests(fake)


# ---------------------------------------------------------------------------------------------
# Text from the store, an absent service

def test_worker_and_run_text_from_the_store_is_shown_not_obeyed(cli, fake):
    fake.ok("ListWorkers", [{**sample_worker(f"w{i}"), "name": text} for i, text in enumerate(HOSTILE)])
    queue = _queue("urgent", 1)
    runs = [{**_run(f"r{i}", queue), "name": text, "work_queue_name": text, "state_name": text}
            for i, text in enumerate(HOSTILE)]
    fake.ok("GetScheduledFlowRuns", [_item(r) for r in runs])
    _preview_fakes(fake)
    fake.ok("ListFlowRuns", runs)
    for args in (["worker", "ls", "-p", "etl"], ["work-pool", "get-runs", "etl"], ["work-pool", "preview", "etl"]):
        result = cli(*args)
        assert result.exit_code == 0, (args, result.output)
        assert "\x1b]" not in result.stdout and "\u202e" not in result.stdout and "\x07" not in result.stdout
        assert "\\x1b]0;pwned\\x07" in result.stdout and "[red]x[/red]" in result.stdout


def test_an_unreachable_service_is_exit_6_for_each_verb(nats_url, tmp_path):
    env = {"RUNLEDGER_NATS_URL": nats_url, "RUNLEDGER_NAMESPACE": f"n{uuid.uuid4().hex[:8]}",
           "RUNLEDGER_CONFIG_DIR": str(tmp_path), "RUNLEDGER_REQUEST_TIMEOUT": "1"}
    runner = CliRunner()
    for args in (["worker", "ls", "-p", "etl"], ["worker", "delete", "w", "-p", "etl"],
                 ["work-pool", "get-runs", "etl"], ["work-pool", "preview", "etl"]):
        result = runner.invoke(app, args, env=env)
        assert result.exit_code == 6, (args, result.output)
        assert "no runledger service answers" in result.stderr
