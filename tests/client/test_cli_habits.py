"""What a user touches, against the fake service: idempotency keys and retries, text from the
store that cannot drive the terminal, tables that stay one line per row when piped, and
Prefect's habits (`-o json`, `set-concurrency-limit`, `--limit`, `--overwrite`)."""

from __future__ import annotations

import json
import re

import pytest
from rich.console import Console
from typer.testing import CliRunner

from runledger.cli import output
from runledger.cli.main import _register, app

from .fake_service import SILENT, sample_pool, sample_queue

_register()

HOSTILE = ["\x1b]0;pwned\x07", "\x1b[2J", "[red]x[/red]", "tab\there\u202eevil"]


@pytest.fixture
def cli_env(nats_url, namespace, tmp_path) -> dict[str, str]:
    return {"RUNLEDGER_NATS_URL": nats_url, "RUNLEDGER_NAMESPACE": namespace,
            "RUNLEDGER_CONFIG_DIR": str(tmp_path), "RUNLEDGER_REQUEST_TIMEOUT": "2", "COLUMNS": "200"}


@pytest.fixture
def cli(fake, cli_env):
    runner = CliRunner()
    return lambda *args, **env: runner.invoke(app, list(args), env={**cli_env, **env})


def _once_silent(envelope):
    """A reply function: the first request gets no answer (it times out), the others `envelope`."""
    seen = []

    def answer(body):
        seen.append(body)
        return SILENT if len(seen) == 1 else envelope

    return answer


# ---------------------------------------------------------------------------------------------
# Idempotency keys and retries

def test_every_command_carries_one_key_per_run(cli, fake):
    fake.ok("CreateWorkPool", sample_pool("a"), seq=1, created=True)
    assert cli("work-pool", "create", "a").exit_code == 0
    assert cli("work-pool", "create", "a").exit_code == 0
    first, second = fake.keys("CreateWorkPool")
    assert first and second and first != second


def test_a_timeout_is_retried_with_the_same_key(cli, fake):
    fake.replies["CreateWorkPool"] = _once_silent({"ok": True, "result": sample_pool("etl"), "seq": 2,
                                                   "created": True, "repeat": True})
    result = cli("work-pool", "create", "etl", "--json", RUNLEDGER_REQUEST_TIMEOUT="0.3")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["name"] == "etl"
    keys = fake.keys("CreateWorkPool")
    assert len(keys) == 2 and keys[0] == keys[1] and keys[0]


def test_a_given_key_is_sent(cli, fake):
    fake.ok("UpdateWorkPool", sample_pool("etl"), seq=4)
    assert cli("work-pool", "pause", "etl", "--idempotency-key", "my-key-1").exit_code == 0
    assert fake.keys("UpdateWorkPool") == ["my-key-1"]


def test_an_unknown_outcome_says_so_and_how_to_check(cli, fake):
    fake.replies["CreateWorkQueue"] = SILENT
    result = cli("work-queue", "create", "urgent", "--pool", "etl", RUNLEDGER_REQUEST_TIMEOUT="0.2")
    assert result.exit_code == 6
    keys = fake.keys("CreateWorkQueue")
    assert len(keys) == 3 and len(set(keys)) == 1
    assert result.stderr.count("\n") == 1
    assert result.stderr.startswith("Error (unavailable): no reply on ")
    assert "(tried 3 times)" in result.stderr
    assert ("The outcome is unknown: run `runledger work-queue inspect urgent --pool etl` to see whether "
            "it was applied; re-running the same command is safe only with "
            f"--idempotency-key {keys[0]}") in result.stderr


def test_the_services_unavailable_to_a_command_is_an_unknown_outcome(cli, fake):
    fake.error("DeleteWorkPool", "unavailable", "the append's outcome is unknown")
    result = cli("work-pool", "delete", "my pool", "--idempotency-key", "k-9")
    assert result.exit_code == 6
    assert len(fake.keys("DeleteWorkPool")) == 3
    assert "run `runledger work-pool inspect 'my pool'`" in result.stderr
    assert "--idempotency-key k-9" in result.stderr


def test_nobody_listening_is_not_an_unknown_outcome(nats_url, namespace, tmp_path):
    env = {"RUNLEDGER_NATS_URL": nats_url, "RUNLEDGER_NAMESPACE": namespace, "RUNLEDGER_CONFIG_DIR": str(tmp_path)}
    result = CliRunner().invoke(app, ["work-pool", "create", "etl"], env=env)
    assert result.exit_code == 6
    assert "no runledger service answers" in result.stderr and "outcome is unknown" not in result.stderr


# ---------------------------------------------------------------------------------------------
# Text from the store

# The service now refuses control characters in names; the CLI still shows safely whatever the
# store holds (an older log, another writer), so the fake sends them.
def _hostile_pools():
    return [{**sample_pool(f"p{i}"), "name": name} for i, name in enumerate(HOSTILE)]


def _hostile_queues():
    return [{**sample_queue(f"q{i}"), "name": name, "work_pool_name": name} for i, name in enumerate(HOSTILE)]


def _assert_harmless(text: str) -> None:
    assert "\x1b]" not in text and "\x1b[2J" not in text and "\x07" not in text and "\u202e" not in text


@pytest.mark.parametrize("terminal", [False, True])
def test_control_characters_and_markup_in_names_are_shown_not_obeyed(cli, fake, monkeypatch, terminal):
    if terminal:  # rich's own rendering, as on a terminal (it adds its own colour codes)
        monkeypatch.setattr(output, "console", Console(force_terminal=True, width=200, highlight=False, soft_wrap=True))
    pools = _hostile_pools()
    fake.ok("ListWorkPools", pools)
    fake.ok("GetWorkPool", pools[0])
    fake.ok("ListAllWorkQueues", _hostile_queues())
    for args in (["work-pool", "ls"], ["work-pool", "inspect", "x"], ["work-queue", "ls"]):
        result = cli(*args)
        assert result.exit_code == 0, result.output
        _assert_harmless(result.stdout)
        assert "\\x1b]0;pwned\\x07" in result.stdout
    listed = cli("work-pool", "ls").stdout
    assert "\\x1b[2J" in listed and "[red]x[/red]" in listed and "tab\\x09here\\u202eevil" in listed


def test_json_output_stays_exact(cli, fake):
    fake.ok("ListWorkPools", _hostile_pools())
    result = cli("work-pool", "ls", "--json")
    _assert_harmless(result.stdout)
    assert [p["name"] for p in json.loads(result.stdout)] == HOSTILE


def test_errors_and_messages_are_harmless_too(cli, fake):
    fake.error("GetWorkPool", "not_found", 'Work pool "\x1b]0;pwned\x07" not found.')
    result = cli("work-pool", "inspect", "\x1b]0;pwned\x07")
    _assert_harmless(result.stderr)
    assert result.stderr == 'Error (not_found): Work pool "\\x1b]0;pwned\\x07" not found.\n'
    fake.ok("UpdateWorkPool", _hostile_pools()[1], seq=3)
    paused = cli("work-pool", "pause", "\x1b[2J")
    _assert_harmless(paused.stdout)


# ---------------------------------------------------------------------------------------------
# Tables when piped

def test_piped_tables_are_one_line_per_row(cli, fake):
    long_name = "a-very-long-work-pool-name-" + "x" * 150
    pools = [sample_pool(long_name, type="kubernetes-with-a-long-type-name"), sample_pool("default-agent-pool")]
    fake.ok("ListWorkPools", pools)
    result = cli("work-pool", "ls", COLUMNS="40")
    lines = result.stdout.splitlines()
    assert len(lines) == 3  # header and one line per pool
    assert re.match(r"Name +Type +Status +Paused +Concurrency Limit +ID$", lines[0])
    row = next(line for line in lines if "default-agent-pool" in line)
    assert row.split()[0] == "default-agent-pool" and row.split()[-1] == pools[1]["id"]
    assert long_name in lines[1] and pools[0]["id"] in lines[1]

    fake.ok("ListWorkQueues", [sample_queue("urgent-" + "q" * 120, priority=1)])
    queues = cli("work-queue", "ls", "--pool", "etl", COLUMNS="40").stdout.splitlines()
    assert len(queues) == 2 and queues[1].startswith("urgent-" + "q" * 120)

    fake.ok("GetWorkPool", pools[0])
    details = cli("work-pool", "inspect", long_name, COLUMNS="40").stdout.splitlines()
    assert any(line.split() == ["name", long_name] for line in details)
    assert any(line.startswith("base_job_template") and line.endswith("{}") for line in details)


@pytest.mark.parametrize(("args", "reply", "words"), [
    (["work-pool", "ls"], "ListWorkPools", "No work pools found."),
    (["work-queue", "ls"], "ListAllWorkQueues", "No work queues found."),
    (["work-queue", "ls", "--pool", "etl"], "ListWorkQueues", "No work queues found in pool 'etl'."),
])
def test_an_empty_list_says_so(cli, fake, args, reply, words):
    fake.ok(reply, [])
    result = cli(*args)
    assert result.exit_code == 0 and result.stdout == words + "\n"
    assert json.loads(cli(*args, "--json").stdout) == []


# ---------------------------------------------------------------------------------------------
# Prefect's habits

def test_output_json_on_every_verb_that_prints(cli, fake):
    pool, queue = sample_pool("etl"), sample_queue("urgent")
    for name in ("CreateWorkPool", "UpdateWorkPool", "GetWorkPool"):
        fake.ok(name, pool, seq=1)
    fake.ok("ListWorkPools", [pool])
    for name in ("CreateWorkQueue", "UpdateWorkQueue", "GetWorkQueue"):
        fake.ok(name, queue, seq=1)
    fake.ok("ListWorkQueues", [queue])
    fake.ok("DeleteWorkPool", None, seq=2)
    fake.ok("DeleteWorkQueue", None, seq=2)
    verbs = {
        ("work-pool", "create", "etl"): pool, ("work-pool", "ls"): [pool], ("work-pool", "inspect", "etl"): pool,
        ("work-pool", "update", "etl", "-d", "x"): pool, ("work-pool", "pause", "etl"): pool,
        ("work-pool", "resume", "etl"): pool, ("work-pool", "set-concurrency-limit", "etl", "3"): pool,
        ("work-pool", "clear-concurrency-limit", "etl"): pool, ("work-pool", "delete", "etl"): None,
        ("work-queue", "create", "urgent", "-p", "etl"): queue, ("work-queue", "ls", "-p", "etl"): [queue],
        ("work-queue", "inspect", "urgent", "-p", "etl"): queue,
        ("work-queue", "update", "urgent", "-p", "etl", "-d", "x"): queue,
        ("work-queue", "pause", "urgent", "-p", "etl"): queue, ("work-queue", "resume", "urgent", "-p", "etl"): queue,
        ("work-queue", "set-priority", "urgent", "2", "-p", "etl"): queue,
        ("work-queue", "set-concurrency-limit", "urgent", "2", "-p", "etl"): queue,
        ("work-queue", "clear-concurrency-limit", "urgent", "-p", "etl"): queue,
        ("work-queue", "delete", "urgent", "-p", "etl"): None,
    }
    for args, expected in verbs.items():
        for flags in (["--json"], ["--output", "json"], ["-o", "JSON"]):
            result = cli(*args, *flags)
            assert result.exit_code == 0, (args, flags, result.output)
            assert json.loads(result.stdout) == expected, (args, flags)
    assert cli("work-pool", "ls", "-o", "yaml").exit_code == 2


def test_set_and_clear_concurrency_limits(cli, fake):
    fake.ok("UpdateWorkPool", sample_pool("etl"), seq=1)
    fake.ok("UpdateWorkQueue", sample_queue("urgent"), seq=2)
    assert cli("work-pool", "set-concurrency-limit", "etl", "5").exit_code == 0
    assert cli("work-pool", "clear-concurrency-limit", "etl").exit_code == 0
    assert fake.sent("UpdateWorkPool") == [{"name": "etl", "concurrency_limit": 5},
                                           {"name": "etl", "concurrency_limit": None}]
    result = cli("work-queue", "set-concurrency-limit", "urgent", "2", "--pool", "etl")
    assert result.exit_code == 0
    assert "Set the concurrency limit of work queue 'urgent' in pool 'etl' to 2." in result.stdout
    assert cli("work-queue", "clear-concurrency-limit", "urgent", "-p", "etl").exit_code == 0
    assert fake.sent("UpdateWorkQueue") == [
        {"work_pool_name": "etl", "work_queue_name": "urgent", "concurrency_limit": 2},
        {"work_pool_name": "etl", "work_queue_name": "urgent", "concurrency_limit": None}]


def test_work_queue_create_takes_prefects_limit_flag(cli, fake):
    fake.ok("CreateWorkQueue", sample_queue("urgent"), seq=1, created=True)
    for flag in ("--limit", "-l", "--concurrency-limit"):
        assert cli("work-queue", "create", "urgent", "-p", "etl", flag, "7", "-q", "1").exit_code == 0
    assert fake.sent("CreateWorkQueue") == [
        {"work_pool_name": "etl", "name": "urgent", "concurrency_limit": 7, "priority": 1}] * 3


def test_create_overwrite_updates_an_existing_pool(cli, fake):
    fake.error("CreateWorkPool", "conflict", "A work pool with this name already exists.")
    fake.ok("GetWorkPool", sample_pool("etl", type="process"))
    fake.ok("UpdateWorkPool", sample_pool("etl", type="process"), seq=4)

    refused = cli("work-pool", "create", "etl")
    assert refused.exit_code == 4
    assert refused.stderr == ("Error (conflict): A work pool with this name already exists; "
                              "use --overwrite to update it.\n")

    result = cli("work-pool", "create", "etl", "--type", "process", "--concurrency-limit", "3", "--paused",
                 "--overwrite", "--idempotency-key", "k1")
    assert result.exit_code == 0, result.output
    assert "Updated work pool 'etl'." in result.stdout
    assert fake.sent("UpdateWorkPool") == [{"name": "etl", "concurrency_limit": 3, "is_paused": True}]
    assert fake.keys("UpdateWorkPool") == ["k1:overwrite"]

    other_type = cli("work-pool", "create", "etl", "--type", "docker", "--overwrite")
    assert other_type.exit_code == 4 and "cannot change a pool's type" in other_type.stderr
    assert len(fake.sent("UpdateWorkPool")) == 1


# ---------------------------------------------------------------------------------------------
# User-facing text names no rule of a document outside the repository

RULE_ID = re.compile(r"\b(?:WP|WQ|PR|SL|C)-\d+\b|BEHAVIOUR")


def _help_texts() -> dict[str, str]:
    import typer.main

    texts: dict[str, str] = {}

    def walk(command, path: str) -> None:
        texts[path] = " ".join(filter(None, [command.help, command.short_help,
                                            *(getattr(p, "help", None) for p in command.params)]))
        for name, sub in getattr(command, "commands", {}).items():
            walk(sub, f"{path} {name}")

    walk(typer.main.get_command(app), "runledger")
    return texts


def test_readme_docs_and_cli_help_cite_no_rule_ids():
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    # docs/asyncapi.json is generated from the docstrings in commands/: it is checked too.
    paths = [root / "README.md", *sorted((root / "docs").glob("*.md")), root / "docs" / "asyncapi.json"]
    files = {str(p.relative_to(root)): p.read_text() for p in paths}
    found = {where: RULE_ID.findall(text) for where, text in {**files, **_help_texts()}.items()}
    assert {where: ids for where, ids in found.items() if ids} == {}


def test_ls_into_head_ends_quietly(fake, cli_env):
    """typer turns a closed pipe into a quiet end; this keeps it so."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    base = sample_pool("p")
    pools = [{**base, "name": f"p{i:05}"} for i in range(3000)]  # far more than a pipe holds
    fake.replies["ListWorkPools"] = lambda body: {
        "ok": True, "result": pools[body["offset"]:body["offset"] + body["limit"]], "seq": None}
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("RUNLEDGER_")}, **cli_env}
    runledger = Path(sys.executable).parent / "runledger"
    done = subprocess.run(["bash", "-c", f"set -o pipefail; {runledger} work-pool ls | head -n 2"],
                          env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stderr == ""
    assert done.stdout.splitlines()[1].startswith("p00000 ")
