"""Variables and global concurrency limits in the client and the `variable` /
`concurrency-limit` verbs, against the fake service: what each call sends (the bodies are also
checked against the service's own command and query schemas), how replies are read, and the
CLI's output, escaping and exit codes."""

from __future__ import annotations

import json
import re
import uuid

import pytest
from typer.testing import CliRunner

from runledger.cli.main import _register, app
from runledger.client import (
    ConcurrencyLimit,
    Conflict,
    NotFound,
    ProtocolError,
    RunledgerClient,
    Variable,
)
from runledger.commands import concurrency_limits as cl
from runledger.commands import queries as q
from runledger.commands import variables as va

from .fake_service import sample_limit, sample_variable

_register()

HOSTILE = ["\x1b]0;pwned\x07", "[red]x[/red]", "tab\there\u202eevil"]

# What the service parses each request with: a body the client sends must pass it.
SCHEMAS = {
    "CreateVariable": va.CreateVariable, "UpdateVariable": va.UpdateVariable, "DeleteVariable": va.DeleteVariable,
    "GetVariable": q.GetVariable, "GetVariableByName": q.GetVariableByName, "ListVariables": q.ListVariables,
    "CountVariables": q.CountVariables,
    "CreateConcurrencyLimit": cl.CreateConcurrencyLimit, "UpdateConcurrencyLimit": cl.UpdateConcurrencyLimit,
    "DeleteConcurrencyLimit": cl.DeleteConcurrencyLimit, "GetConcurrencyLimit": q.GetConcurrencyLimit,
    "GetConcurrencyLimitByName": q.GetConcurrencyLimitByName, "ListConcurrencyLimits": q.ListConcurrencyLimits,
    "CountConcurrencyLimits": q.CountConcurrencyLimits,
}


def _assert_valid_requests(fake) -> None:
    ours = [(name, body) for name, body in fake.requests if name in SCHEMAS]
    assert ours
    for name, body in ours:
        SCHEMAS[name].model_validate_json(json.dumps(body), strict=True)  # as the service parses it


@pytest.fixture
async def rl(fake, client_settings):
    async with RunledgerClient(client_settings) as client:
        yield client


@pytest.fixture
def cli(fake, nats_url, namespace, tmp_path):
    env = {"RUNLEDGER_NATS_URL": nats_url, "RUNLEDGER_NAMESPACE": namespace,
           "RUNLEDGER_CONFIG_DIR": str(tmp_path), "RUNLEDGER_REQUEST_TIMEOUT": "2", "COLUMNS": "200"}
    runner = CliRunner()
    return lambda *args, **extra: runner.invoke(app, list(args), env={**env, **extra})


# ---------------------------------------------------------------------------------------------
# Variables: the client

async def test_create_update_and_delete_variable_send_what_is_given(rl, fake):
    raw = sample_variable("db_url", {"host": "db"}, tags=["prod"])
    fake.ok("CreateVariable", raw, seq=4, created=True)
    made = await rl.create_variable("db_url", {"host": "db"}, tags=["prod"], idempotency_key="k1")
    assert isinstance(made, Variable) and made.value == {"host": "db"} and made.tags == ["prod"]
    assert made.model_dump(mode="json") == raw  # the service's JSON, `Z` datetimes included
    await rl.create_variable("empty", None)
    assert fake.bodies("CreateVariable") == [
        {"name": "db_url", "value": {"host": "db"}, "tags": ["prod"], "idempotency_key": "k1"},
        {"name": "empty", "value": None}]

    fake.ok("UpdateVariable", {**raw, "value": None}, seq=6)
    assert (await rl.update_variable("db_url", value=None)).value is None
    await rl.update_variable("db_url", tags=[], new_name="db_url_2")
    assert fake.bodies("UpdateVariable") == [{"name": "db_url", "value": None},
                                             {"name": "db_url", "tags": [], "new_name": "db_url_2"}]

    fake.ok("DeleteVariable", None, seq=9)
    fake.ok("CountVariables", 0)
    assert await rl.delete_variable("db_url") is None
    assert await rl.count_variables(names=["db_url"]) == 0
    assert fake.bodies("CountVariables") == [{"variables": {"name": {"any_": ["db_url"]}}, "min_seq": 9}]
    _assert_valid_requests(fake)


async def test_variables_are_read_listed_and_counted_with_the_variable_filter(rl, fake):
    raw = sample_variable("a", 1, tags=["x"])
    fake.ok("GetVariable", raw)
    fake.ok("GetVariableByName", raw)
    assert await rl.read_variable(raw["id"]) == await rl.read_variable_by_name("a") == Variable.model_validate(raw)
    fake.ok("ListVariables", [raw])
    fake.ok("CountVariables", 1)
    ids = [uuid.UUID(raw["id"])]
    assert await rl.list_variables(names=["a"], ids=ids, like="a%", tags=["x"], limit=5, offset=0) == [
        Variable.model_validate(raw)]
    assert await rl.list_variables(like="a") and await rl.count_variables(tags=["x"]) == 1
    assert fake.bodies("ListVariables") == [
        {"limit": 5, "offset": 0, "variables": {"id": {"any_": [raw["id"]]}, "name": {"any_": ["a"], "like_": "a%"},
                                                "tags": {"all_": ["x"]}}},
        {"variables": {"name": {"like_": "a"}}}]
    assert fake.bodies("CountVariables") == [{"variables": {"tags": {"all_": ["x"]}}}]

    fake.error("GetVariableByName", "not_found", "Variable 'nope' not found.")
    with pytest.raises(NotFound, match="Variable 'nope' not found."):
        await rl.read_variable_by_name("nope")
    fake.ok("GetVariable", {"name": "a"})
    with pytest.raises(ProtocolError, match="not a Variable"):
        await rl.read_variable(raw["id"])
    _assert_valid_requests(fake)


# ---------------------------------------------------------------------------------------------
# Variables: the CLI

def test_variable_set_reads_json_or_text_and_overwrites_only_when_asked(cli, fake):
    fake.ok("CreateVariable", sample_variable("n", 42), seq=1, created=True)
    made = cli("variable", "set", "n", "42", "--tag", "a")
    assert made.exit_code == 0, made.output
    assert made.stdout.startswith("Set variable 'n'.\n")
    cli("variable", "set", "s", "plain text")
    cli("variable", "set", "d", '{"a": [1, true]}')
    assert [b["value"] for b in fake.sent("CreateVariable")] == [42, "plain text", {"a": [1, True]}]
    assert fake.sent("CreateVariable")[0]["tags"] == ["a"]

    fake.error("CreateVariable", "conflict", "A variable with the name 'n' already exists.")
    refused = cli("variable", "set", "n", "43")
    assert refused.exit_code == 4
    assert refused.stderr == "Error (conflict): Variable 'n' already exists; use --overwrite to update it.\n"
    assert fake.sent("UpdateVariable") == []

    fake.ok("UpdateVariable", sample_variable("n", 43), seq=3)
    replaced = cli("variable", "set", "n", "43", "--overwrite", "--idempotency-key", "k-9", "--json")
    assert replaced.exit_code == 0, replaced.output
    assert json.loads(replaced.stdout)["value"] == 43
    assert fake.sent("UpdateVariable") == [{"name": "n", "value": 43, "tags": []}]  # Prefect's --overwrite
    assert fake.keys("UpdateVariable") == ["k-9:overwrite"]
    _assert_valid_requests(fake)


def test_variable_get_ls_and_unset(cli, fake):
    raw = sample_variable("db_url", {"host": "db"}, tags=["prod", "eu"])
    fake.ok("GetVariableByName", raw)
    got = cli("variable", "get", "db_url")
    assert got.exit_code == 0 and json.loads(got.stdout) == {"host": "db"}

    fake.ok("ListVariables", [raw, sample_variable("empty", None)])
    lines = cli("variable", "ls", "--like", "d", "-t", "prod").stdout.splitlines()
    assert re.match(r"Name +Value +Tags +Updated$", lines[0])
    assert lines[1].split() == ["db_url", '{"host":', '"db"}', "prod,eu", "2025-01-02T03:04:05+00:00"]
    assert lines[2].split() == ["empty", "null", "-", "2025-01-02T03:04:05+00:00"]
    assert fake.sent("ListVariables") == [{"limit": 200, "offset": 0,
                                           "variables": {"name": {"like_": "d"}, "tags": {"all_": ["prod"]}}}]
    fake.ok("ListVariables", [])
    assert cli("variable", "ls").stdout == "No variables found.\n"

    fake.ok("DeleteVariable", None, seq=2)
    done = cli("variable", "unset", "db_url")
    assert done.exit_code == 0 and done.stdout == "Unset variable 'db_url'.\n"
    fake.error("DeleteVariable", "not_found", "Variable 'db_url' not found.")
    gone = cli("variable", "unset", "db_url")
    assert gone.exit_code == 3 and gone.stderr == "Error (not_found): Variable 'db_url' not found.\n"
    _assert_valid_requests(fake)


def test_variable_text_from_the_store_is_shown_not_obeyed(cli, fake):
    variables = [{**sample_variable(f"v{i}"), "name": text, "value": text, "tags": [text]}
                 for i, text in enumerate(HOSTILE)]
    fake.ok("ListVariables", variables)
    fake.ok("GetVariableByName", variables[0])
    for args in (["variable", "ls"], ["variable", "get", "v0"], ["variable", "inspect", "v0"]):
        result = cli(*args)
        assert result.exit_code == 0, result.output
        assert "\x1b]" not in result.stdout and "\u202e" not in result.stdout
    assert "[red]x[/red]" in cli("variable", "ls").stdout


# ---------------------------------------------------------------------------------------------
# Global concurrency limits: the client

async def test_concurrency_limit_methods_send_what_is_given_by_id_or_name(rl, fake):
    raw = sample_limit("db", 3)
    fake.ok("CreateConcurrencyLimit", raw, seq=2, created=True)
    made = await rl.create_concurrency_limit("db", 3, idempotency_key="k")
    assert isinstance(made, ConcurrencyLimit) and made.model_dump(mode="json") == raw
    assert (made.active, made.active_slots, made.slot_decay_per_second, made.avg_slot_occupancy_seconds) == (
        True, 0, 0.0, 2.0)
    await rl.create_concurrency_limit("rate", 10, active=False, active_slots=1, denied_slots=0,
                                      slot_decay_per_second=0.5)
    assert fake.bodies("CreateConcurrencyLimit") == [
        {"name": "db", "limit": 3, "idempotency_key": "k"},
        {"name": "rate", "limit": 10, "active": False, "active_slots": 1, "denied_slots": 0,
         "slot_decay_per_second": 0.5}]

    fake.ok("UpdateConcurrencyLimit", {**raw, "limit": 5}, seq=3)
    assert (await rl.update_concurrency_limit("db", limit=5)).limit == 5
    await rl.update_concurrency_limit(made.id, active=False, new_name="db2")
    await rl.update_concurrency_limit(str(made.id), slot_decay_per_second=1.0)
    assert fake.bodies("UpdateConcurrencyLimit") == [
        {"name": "db", "limit": 5}, {"id": raw["id"], "active": False, "new_name": "db2"},
        {"id": raw["id"], "slot_decay_per_second": 1.0}]

    fake.ok("DeleteConcurrencyLimit", None, seq=4)
    await rl.delete_concurrency_limit("db")
    await rl.delete_concurrency_limit(made.id)
    assert fake.bodies("DeleteConcurrencyLimit") == [{"name": "db"}, {"id": raw["id"]}]

    fake.ok("GetConcurrencyLimit", raw)
    fake.ok("GetConcurrencyLimitByName", raw)
    fake.ok("ListConcurrencyLimits", [raw])
    fake.ok("CountConcurrencyLimits", 1)
    assert await rl.read_concurrency_limit(made.id) == await rl.read_concurrency_limit_by_name("db") == made
    assert await rl.list_concurrency_limits(limit=1, offset=0) == [made]
    assert await rl.count_concurrency_limits() == 1
    assert fake.bodies("ListConcurrencyLimits") == [{"limit": 1, "offset": 0, "min_seq": 4}]
    fake.error("CreateConcurrencyLimit", "conflict", "A concurrency limit with the name 'db' already exists.")
    with pytest.raises(Conflict):
        await rl.create_concurrency_limit("db", 1)
    _assert_valid_requests(fake)


# ---------------------------------------------------------------------------------------------
# Global concurrency limits: the CLI

def test_concurrency_limit_create_ls_inspect_delete(cli, fake):
    raw = sample_limit("db", 3)
    fake.ok("CreateConcurrencyLimit", raw, seq=1, created=True)
    made = cli("concurrency-limit", "create", "db", "--limit", "3")
    assert made.exit_code == 0, made.output
    assert made.stdout.startswith("Created global concurrency limit 'db'.\n") and raw["id"] in made.stdout
    cli("concurrency-limit", "create", "rate", "-l", "10", "--disable", "--slot-decay-per-second", "0.5")
    assert fake.sent("CreateConcurrencyLimit") == [
        {"name": "db", "limit": 3}, {"name": "rate", "limit": 10, "active": False, "slot_decay_per_second": 0.5}]
    assert cli("concurrency-limit", "create", "db").exit_code == 2  # --limit is required

    fake.ok("ListConcurrencyLimits", [raw, {**sample_limit("rate", 10), "active": False}])
    lines = cli("concurrency-limit", "ls").stdout.splitlines()
    assert re.match(r"Name +Active +Limit +Active Slots +Slot Decay Per Second +ID$", lines[0])
    assert lines[1].split() == ["db", "yes", "3", "0", "0", raw["id"]]
    assert lines[2].split()[:2] == ["rate", "no"]
    assert json.loads(cli("concurrency-limit", "ls", "-o", "json").stdout)[0] == raw

    fake.ok("GetConcurrencyLimit", raw)
    fake.ok("GetConcurrencyLimitByName", raw)
    assert json.loads(cli("concurrency-limit", "inspect", raw["id"], "--json").stdout) == raw
    assert json.loads(cli("concurrency-limit", "inspect", "db", "--json").stdout) == raw
    assert fake.sent("GetConcurrencyLimit") == [{"id": raw["id"]}]
    assert fake.sent("GetConcurrencyLimitByName") == [{"name": "db"}]

    fake.ok("DeleteConcurrencyLimit", None, seq=2)
    done = cli("concurrency-limit", "delete", "db")
    assert done.exit_code == 0 and done.stdout == "Deleted global concurrency limit 'db'.\n"
    cli("concurrency-limit", "delete", raw["id"])
    assert fake.sent("DeleteConcurrencyLimit") == [{"name": "db"}, {"id": raw["id"]}]
    fake.error("DeleteConcurrencyLimit", "not_found", "Concurrency limit 'db' not found.")
    assert cli("concurrency-limit", "delete", "db").exit_code == 3
    _assert_valid_requests(fake)
