"""The `work-pool` and `work-queue` verbs against a fake service: what each sends, `--json` output
(the result and nothing else), one-line errors on stderr and the exit codes."""

from __future__ import annotations

import json
import uuid

import pytest
from typer.testing import CliRunner

from runledger.cli.main import _register, app

from .fake_service import sample_pool, sample_queue

_register()


@pytest.fixture
def cli(fake, nats_url, namespace, tmp_path):
    """Run `runledger ...` against the fake: environment only, no endpoint file."""
    env = {"RUNLEDGER_NATS_URL": nats_url, "RUNLEDGER_NAMESPACE": namespace,
           "RUNLEDGER_CONFIG_DIR": str(tmp_path), "RUNLEDGER_REQUEST_TIMEOUT": "2",
           "COLUMNS": "200"}
    runner = CliRunner()
    return lambda *args: runner.invoke(app, list(args), env=env)


def test_create_json_prints_the_result_and_nothing_else(cli, fake):
    raw = sample_pool("etl", type="process")
    fake.ok("CreateWorkPool", raw, seq=3, created=True)
    result = cli("work-pool", "create", "etl", "--type", "process", "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout) == raw
    assert result.stderr == ""
    assert fake.sent("CreateWorkPool") == [{"name": "etl", "type": "process"}]


def test_create_human_output_and_all_options(cli, fake, tmp_path):
    template = {"job_configuration": {"command": "{{ command }}"},
                "variables": {"properties": {"command": {"type": "string"}}}}
    path = tmp_path / "template.json"
    path.write_text(json.dumps(template))
    fake.ok("CreateWorkPool", sample_pool("etl", type="process"), seq=3, created=True)
    result = cli("work-pool", "create", "etl", "--type", "process", "--description", "d", "--paused",
                 "--concurrency-limit", "4", "--base-job-template", str(path))
    assert result.exit_code == 0, result.output
    assert "Created work pool 'etl'." in result.stdout
    assert "NOT_READY" in result.stdout
    assert fake.sent("CreateWorkPool") == [{"name": "etl", "type": "process", "description": "d",
                                              "is_paused": True, "concurrency_limit": 4,
                                              "base_job_template": template}]


def test_a_template_that_is_not_json_is_invalid(cli, fake, tmp_path):
    path = tmp_path / "bad.json"
    path.write_text("{nope")
    result = cli("work-pool", "create", "etl", "--base-job-template", str(path))
    assert result.exit_code == 5
    assert result.stderr.startswith("Error (invalid): ")
    assert "base_job_template" in result.stderr
    assert fake.requests == []


def test_ls_pages_through_every_pool(cli, fake):
    pools = [sample_pool(f"p{i:03}") for i in range(201)]
    fake.replies["ListWorkPools"] = lambda body: {
        "ok": True, "result": pools[body["offset"]:body["offset"] + body["limit"]], "seq": None}
    result = cli("work-pool", "ls", "--json")
    assert result.exit_code == 0, result.output
    assert [p["name"] for p in json.loads(result.stdout)] == [p["name"] for p in pools]
    assert [b["offset"] for b in fake.sent("ListWorkPools")] == [0, 200]

    table = cli("work-pool", "ls")
    assert table.exit_code == 0 and "p000" in table.stdout and "p200" in table.stdout


def test_inspect_update_pause_resume_delete(cli, fake):
    raw = sample_pool("etl", type="process")
    for name in ("GetWorkPool", "UpdateWorkPool"):
        fake.ok(name, raw, seq=5)
    fake.ok("DeleteWorkPool", None, seq=6)

    assert json.loads(cli("work-pool", "inspect", "etl", "--json").stdout) == raw
    assert "default_queue_id" in cli("work-pool", "inspect", "etl").stdout
    assert cli("work-pool", "update", "etl", "--clear-concurrency-limit", "--description", "").exit_code == 0
    assert cli("work-pool", "pause", "etl").exit_code == 0
    assert cli("work-pool", "resume", "etl", "--json").exit_code == 0
    assert fake.sent("UpdateWorkPool") == [
        {"name": "etl", "concurrency_limit": None, "description": ""},
        {"name": "etl", "is_paused": True},
        {"name": "etl", "is_paused": False},
    ]
    deleted = cli("work-pool", "delete", "etl", "--json")
    assert deleted.exit_code == 0 and json.loads(deleted.stdout) is None
    assert "Deleted work pool 'etl'." in cli("work-pool", "delete", "etl").stdout


@pytest.mark.parametrize(
    ("code", "exit_code"),
    [("not_found", 3), ("conflict", 4), ("invalid", 5), ("forbidden", 5), ("unavailable", 6), ("other", 1)],
)
def test_error_codes_become_exit_codes(cli, fake, code, exit_code):
    fake.error("GetWorkPool", code, 'Work pool "x" not found.')
    result = cli("work-pool", "inspect", "x", "--json")
    assert result.exit_code == exit_code
    assert result.stdout == ""
    # An `unavailable` query is asked again before giving up: nothing is applied by a query.
    tried = " (tried 3 times)" if code == "unavailable" else ""
    assert result.stderr == f'Error ({code}): Work pool "x" not found.{tried}\n'


def test_an_invalid_reply_names_its_field(cli, fake):
    fake.error("UpdateWorkPool", "invalid", "Input should be greater than or equal to 0", field="concurrency_limit")
    result = cli("work-pool", "update", "etl", "--concurrency-limit", "-5")
    assert result.exit_code == 5
    assert result.stderr == ("Error (invalid): Input should be greater than or equal to 0 "
                             "(field: concurrency_limit)\n")
    assert fake.sent("UpdateWorkPool") == [{"name": "etl", "concurrency_limit": -5}]


def test_no_service_is_unavailable(nats_url, tmp_path):
    env = {"RUNLEDGER_NATS_URL": nats_url, "RUNLEDGER_NAMESPACE": f"t{uuid.uuid4().hex[:12]}",
           "RUNLEDGER_CONFIG_DIR": str(tmp_path)}
    result = CliRunner().invoke(app, ["work-pool", "ls"], env=env)
    assert result.exit_code == 6
    assert result.stderr.startswith("Error (unavailable): no runledger service answers on ")
    assert result.stderr.count("\n") == 1


@pytest.mark.parametrize(("variable", "value", "reason"), [
    ("RUNLEDGER_NAMESPACE", "Bad NS", "String should match pattern"),
    ("RUNLEDGER_NATS_TLS_CA_FILE", "/no/such/ca-s3cret.pem", "Path does not point to a file"),
    ("RUNLEDGER_NATS_CREDS_FILE", "/no/such/s3cret.creds", "Path does not point to a file"),
    ("RUNLEDGER_HANDLER_CONCURRENCY", "many-s3cret", "Input should be a valid integer"),
])
def test_a_setting_that_cannot_be_used_is_one_line_naming_it_and_not_its_value(tmp_path, variable, value, reason):
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if not k.startswith("RUNLEDGER_")}
    env.update({"RUNLEDGER_CONFIG_DIR": str(tmp_path), variable: value})
    for args in (["work-pool", "ls"], ["serve"]):
        done = subprocess.run([sys.executable, "-m", "runledger.cli", *args], env=env, capture_output=True, text=True, timeout=60)
        assert done.returncode == 5, done.stderr
        assert done.stderr.startswith(f"Error (invalid settings): {variable}: {reason}")
        assert done.stderr.count("\n") == 1 and "s3cret" not in done.stderr


def test_no_broker_is_unavailable(tmp_path):
    # No request timeout to wait out: a refused connection is reported at once.
    env = {"RUNLEDGER_NATS_URL": "nats://127.0.0.1:1", "RUNLEDGER_CONFIG_DIR": str(tmp_path),
           "RUNLEDGER_REQUEST_TIMEOUT": "60"}
    result = CliRunner().invoke(app, ["work-queue", "ls"], env=env)
    assert result.exit_code == 6
    assert "cannot connect to NATS at nats://127.0.0.1:1: nothing accepts connections there" in result.stderr


@pytest.mark.parametrize(
    "args",
    [["work-pool", "update", "etl", "--concurrency-limit", "3", "--clear-concurrency-limit"],
     ["work-pool", "update", "etl"],
     ["work-queue", "update", "q", "--pool", "etl"],
     ["work-pool", "create", "etl", "--concurrency-limit", "many"],
     ["work-queue", "set-priority", "q", "--pool", "etl"]],
)
def test_usage_errors_exit_2_and_send_nothing(cli, fake, args):
    result = cli(*args)
    assert result.exit_code == 2
    assert fake.requests == []


def test_work_queue_create_in_a_pool_and_legacy(cli, fake):
    fake.ok("CreateWorkQueue", sample_queue("urgent", priority=1), seq=2, created=True)
    fake.ok("CreateLegacyWorkQueue", sample_queue("old", pool_name="default-agent-pool"), seq=3, created=True)
    result = cli("work-queue", "create", "urgent", "--pool", "etl", "--priority", "1", "--concurrency-limit", "0",
                 "--description", "fast", "--paused", "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["work_pool_name"] == "etl"
    assert fake.sent("CreateWorkQueue") == [{"work_pool_name": "etl", "name": "urgent", "priority": 1,
                                               "concurrency_limit": 0, "description": "fast", "is_paused": True}]
    legacy = cli("work-queue", "create", "old")
    assert legacy.exit_code == 0
    assert "Created work queue 'old' in pool 'default-agent-pool'." in legacy.stdout
    assert fake.sent("CreateLegacyWorkQueue") == [{"name": "old"}]


def test_work_queue_ls_by_pool_or_everywhere(cli, fake):
    queues = [sample_queue("urgent", priority=1), sample_queue("default")]
    fake.ok("ListWorkQueues", queues)
    fake.ok("ListAllWorkQueues", queues[::-1])
    by_pool = cli("work-queue", "ls", "--pool", "etl", "--json")
    assert by_pool.exit_code == 0 and json.loads(by_pool.stdout) == queues
    assert fake.sent("ListWorkQueues") == [{"work_pool_name": "etl", "limit": 200, "offset": 0}]
    everywhere = cli("work-queue", "ls")
    assert everywhere.exit_code == 0 and "urgent" in everywhere.stdout
    assert fake.sent("ListAllWorkQueues") == [{"limit": 200, "offset": 0}]


def test_work_queue_verbs_by_pool_and_name(cli, fake):
    q = sample_queue("urgent")
    for name in ("GetWorkQueue", "UpdateWorkQueue"):
        fake.ok(name, q, seq=4)
    fake.ok("DeleteWorkQueue", None, seq=5)
    assert json.loads(cli("work-queue", "inspect", "urgent", "--pool", "etl", "--json").stdout) == q
    assert cli("work-queue", "set-priority", "urgent", "1", "--pool", "etl").exit_code == 0
    assert cli("work-queue", "update", "urgent", "-p", "etl", "--name", "fast", "--clear-concurrency-limit").exit_code == 0
    assert cli("work-queue", "pause", "urgent", "--pool", "etl").exit_code == 0
    assert cli("work-queue", "resume", "urgent", "--pool", "etl").exit_code == 0
    deleted = cli("work-queue", "delete", "urgent", "--pool", "etl", "--json")
    assert deleted.exit_code == 0 and json.loads(deleted.stdout) is None
    base = {"work_pool_name": "etl", "work_queue_name": "urgent"}
    assert fake.sent("GetWorkQueue") == [base]
    assert fake.sent("UpdateWorkQueue") == [
        {**base, "priority": 1},  # through the pool API, so PR-1 applies
        {**base, "name": "fast", "concurrency_limit": None},
        {**base, "is_paused": True},
        {**base, "is_paused": False},
    ]
    assert fake.sent("DeleteWorkQueue") == [base]


def test_work_queue_without_pool_means_legacy_name_or_id(cli, fake):
    q = sample_queue("urgent")
    fake.ok("GetLegacyWorkQueue", q)
    fake.ok("GetWorkQueueById", q)
    fake.ok("UpdateWorkQueue", q, seq=8)
    fake.ok("DeleteWorkQueue", None, seq=9)
    fake.ok("DeleteWorkQueueById", None, seq=10)

    assert cli("work-queue", "inspect", "urgent").exit_code == 0
    assert fake.sent("GetLegacyWorkQueue") == [{"name": "urgent"}]
    assert cli("work-queue", "inspect", q["id"], "--json").exit_code == 0
    # By id: resolved to its pool and name, then updated through the pool API (PR-1).
    assert cli("work-queue", "set-priority", q["id"], "3").exit_code == 0
    assert fake.sent("GetWorkQueueById") == [{"id": q["id"]}, {"id": q["id"]}]
    assert fake.sent("UpdateWorkQueue") == [{"work_pool_name": "etl", "work_queue_name": "urgent", "priority": 3}]
    assert cli("work-queue", "delete", "old").exit_code == 0
    assert fake.sent("DeleteWorkQueue") == [{"work_pool_name": "default-agent-pool", "work_queue_name": "old"}]
    assert cli("work-queue", "delete", q["id"]).exit_code == 0
    assert fake.sent("DeleteWorkQueueById") == [{"id": q["id"]}]


def test_work_queue_status_by_pool_and_name_or_id(cli, fake):
    q = sample_queue("urgent")
    health = {"healthy": False, "late_runs_count": 2, "last_polled": None,
              "health_check_policy": {"maximum_late_runs": 0, "maximum_seconds_since_last_polled": 60}}
    fake.ok("GetWorkQueue", q)
    fake.ok("GetWorkQueueById", q)
    fake.ok("GetWorkQueueStatus", health)
    as_json = cli("work-queue", "status", "urgent", "--pool", "etl", "--json")
    assert as_json.exit_code == 0, as_json.output
    assert json.loads(as_json.stdout) == health
    human = cli("work-queue", "status", q["id"])
    assert human.exit_code == 0, human.output
    assert [line.split() for line in human.stdout.splitlines()[:3]] == [
        ["healthy", "false"], ["late_runs_count", "2"], ["last_polled", "-"]]
    assert fake.sent("GetWorkQueue") == [{"work_pool_name": "etl", "work_queue_name": "urgent"}]
    assert fake.sent("GetWorkQueueById") == [{"id": q["id"]}]
    assert fake.sent("GetWorkQueueStatus") == [{"id": q["id"]}, {"id": q["id"]}]
    fake.error("GetLegacyWorkQueue", "not_found", "Work queue 'nope' not found.")
    missing = cli("work-queue", "status", "nope")
    assert missing.exit_code == 3 and missing.stderr == "Error (not_found): Work queue 'nope' not found.\n"


def test_work_queue_conflict_exit_code(cli, fake):
    fake.error("DeleteWorkQueue", "conflict", "Can't delete a pool's default queue.")
    result = cli("work-queue", "delete", "default", "--pool", "etl")
    assert result.exit_code == 4
    assert result.stderr == "Error (conflict): Can't delete a pool's default queue.\n"


def test_markup_in_names_is_printed_literally(cli, fake):
    fake.error("GetWorkPool", "not_found", 'Work pool "[bold]x[/bold]" not found.')
    result = cli("work-pool", "inspect", "[bold]x[/bold]")
    assert result.stderr == 'Error (not_found): Work pool "[bold]x[/bold]" not found.\n'
