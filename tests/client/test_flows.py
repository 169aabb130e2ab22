"""Flows in the client and the `flow` verbs, against the fake service: what each call sends (the
bodies are also checked against the service's own command and query schemas), how replies are
read (`created: false` for a name that exists), and the CLI's output, escaping and exit codes."""

from __future__ import annotations

import json
import re
import uuid

import pytest
from typer.testing import CliRunner

from runledger.cli.main import _register, app
from runledger.client import Flow, NotFound, ProtocolError, RunledgerClient
from runledger.commands import flows as fl
from runledger.commands import queries as q

from .fake_service import SILENT, sample_flow

_register()

HOSTILE = ["\x1b]0;pwned\x07", "\x1b[2J", "[red]x[/red]", "tab\there\u202eevil"]

# What the service parses each request with: a body the client sends must pass it.
SCHEMAS = {"CreateFlow": fl.CreateFlow, "DeleteFlow": fl.DeleteFlow, "GetFlow": q.GetFlow,
           "GetFlowByName": q.GetFlowByName, "ListFlows": q.ListFlows, "CountFlows": q.CountFlows}


def _assert_valid_requests(fake) -> None:
    flow_requests = [(name, body) for name, body in fake.requests if name in SCHEMAS]
    assert flow_requests
    for name, body in flow_requests:
        SCHEMAS[name].model_validate(body)


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
# The client

async def test_create_flow_sends_only_given_fields_and_returns_the_flow(rl, fake):
    raw = sample_flow("etl", tags=["nightly", "db"], labels={"team": "data"})
    fake.ok("CreateFlow", raw, seq=5, created=True)
    flow = await rl.create_flow("etl", tags=("nightly", "db"), labels={"team": "data"}, idempotency_key="k1")
    await rl.create_flow("bare")
    assert fake.bodies("CreateFlow") == [
        {"name": "etl", "tags": ["nightly", "db"], "labels": {"team": "data"}, "idempotency_key": "k1"},
        {"name": "bare"}]
    assert isinstance(flow, Flow)
    assert (flow.name, flow.tags, flow.labels, str(flow.id)) == ("etl", ["nightly", "db"], {"team": "data"}, raw["id"])
    assert flow.model_dump(mode="json") == raw  # the service's JSON, `Z` datetimes included
    assert rl.last_seq == 5
    _assert_valid_requests(fake)


async def test_ensure_flow_says_whether_it_created_the_flow(rl, fake):
    raw = sample_flow("etl")
    fake.ok("CreateFlow", raw, seq=2, created=True)
    assert await rl.ensure_flow("etl") == (Flow.model_validate(raw), True)
    fake.ok("CreateFlow", raw, seq=None, created=False)
    flow, created = await rl.ensure_flow("etl", tags=["other"])
    assert created is False and flow.model_dump(mode="json") == raw

    fake.ok("CreateFlow", raw, seq=3)  # no `created` in the reply
    assert (await rl.create_flow("etl")).name == "etl"
    with pytest.raises(ProtocolError, match="does not say whether it created"):
        await rl.ensure_flow("etl")


async def test_read_flow_by_id_and_by_name(rl, fake):
    raw = {**sample_flow("etl"), "deployment_count": 2}  # unknown fields are kept
    fake.ok("GetFlow", raw)
    fake.ok("GetFlowByName", raw)
    by_id = await rl.read_flow(uuid.UUID(raw["id"]))
    by_name = await rl.read_flow_by_name("etl", min_seq=4)
    assert by_id == by_name and by_id.model_extra == {"deployment_count": 2}
    assert by_id.model_dump(mode="json") == raw
    assert fake.bodies("GetFlow") == [{"id": raw["id"]}]
    assert fake.bodies("GetFlowByName") == [{"name": "etl", "min_seq": 4}]

    fake.error("GetFlowByName", "not_found", "Flow 'nope' not found.")
    with pytest.raises(NotFound, match="Flow 'nope' not found."):
        await rl.read_flow_by_name("nope")
    _assert_valid_requests(fake)


async def test_list_and_count_flows_send_the_flow_filter(rl, fake):
    flows = [sample_flow("a", tags=["x"]), sample_flow("b", tags=["x", "y"])]
    fake.ok("ListFlows", flows)
    fake.ok("CountFlows", 2)
    ids = [uuid.UUID(f["id"]) for f in flows]
    listed = await rl.list_flows(names=["a", "b"], ids=ids, tags=["x"], limit=10, offset=0)
    assert [f.name for f in listed] == ["a", "b"] and all(isinstance(f, Flow) for f in listed)
    assert await rl.list_flows() == listed
    assert await rl.count_flows(tags=["x", "y"]) == 2
    assert await rl.count_flows() == 2
    assert fake.bodies("ListFlows") == [
        {"limit": 10, "offset": 0, "flows": {"id": {"any_": [str(i) for i in ids]}, "name": {"any_": ["a", "b"]},
                                             "tags": {"all_": ["x"]}}},
        {}]
    assert fake.bodies("CountFlows") == [{"flows": {"tags": {"all_": ["x", "y"]}}}, {}]
    _assert_valid_requests(fake)


async def test_a_page_cut_to_fit_is_completed(rl, fake):
    flows = [sample_flow(f"f{i}") for i in range(5)]

    def answer(body):
        start = body.get("offset", 0)
        end = min(start + body.get("limit", 200), start + 2)  # the service fits two per reply
        return {"ok": True, "result": flows[start:end], "seq": None,
                **({"truncated": True, "next_offset": end} if end < len(flows) else {})}

    fake.replies["ListFlows"] = answer
    listed = await rl.list_flows(tags=["t"], limit=4)
    assert [f.name for f in listed] == ["f0", "f1", "f2", "f3"]
    assert fake.bodies("ListFlows") == [{"limit": 4, "flows": {"tags": {"all_": ["t"]}}},
                                        {"limit": 2, "offset": 2, "flows": {"tags": {"all_": ["t"]}}}]


async def test_delete_flow_and_read_your_writes(rl, fake):
    fake.ok("DeleteFlow", None, seq=12)
    fake.ok("CountFlows", 0)
    flow_id = uuid.uuid4()
    assert await rl.delete_flow(flow_id, idempotency_key="k-del") is None
    assert await rl.count_flows(ids=[flow_id]) == 0
    assert fake.bodies("DeleteFlow") == [{"id": str(flow_id), "idempotency_key": "k-del"}]
    assert fake.bodies("CountFlows") == [{"flows": {"id": {"any_": [str(flow_id)]}}, "min_seq": 12}]
    _assert_valid_requests(fake)


async def test_a_reply_that_is_not_a_flow_is_a_protocol_error(rl, fake):
    fake.ok("GetFlow", {"name": "etl"})
    with pytest.raises(ProtocolError, match="not a Flow"):
        await rl.read_flow(uuid.uuid4())
    fake.ok("CountFlows", "3")
    with pytest.raises(ProtocolError, match="not a count"):
        await rl.count_flows()


# ---------------------------------------------------------------------------------------------
# The CLI

def test_flow_create_says_whether_it_created_or_found_the_flow(cli, fake):
    raw = sample_flow("etl", tags=["nightly"])
    fake.ok("CreateFlow", raw, seq=1, created=True)
    made = cli("flow", "create", "etl", "--tag", "nightly", "-t", "db")
    assert made.exit_code == 0, made.output
    assert made.stdout.startswith("Created flow 'etl'.\n")
    assert raw["id"] in made.stdout and made.stderr == ""

    fake.ok("CreateFlow", raw, seq=None, created=False)
    found = cli("flow", "create", "etl")
    assert found.exit_code == 0, found.output
    assert found.stdout.startswith("Flow 'etl' already exists; unchanged.\n")

    as_json = cli("flow", "create", "etl", "--json")
    assert json.loads(as_json.stdout) == raw and as_json.stderr == ""
    assert fake.sent("CreateFlow") == [{"name": "etl", "tags": ["nightly", "db"]}, {"name": "etl"}, {"name": "etl"}]
    keys = fake.keys("CreateFlow")
    assert all(keys) and len(set(keys)) == 3  # one key per run
    _assert_valid_requests(fake)


def test_flow_ls_pages_filters_and_limits(cli, fake):
    flows = [sample_flow(f"f{i:03}") for i in range(250)]
    fake.replies["ListFlows"] = lambda body: {
        "ok": True, "result": flows[body["offset"]:body["offset"] + body["limit"]], "seq": None}
    every = cli("flow", "ls", "--json")
    assert every.exit_code == 0, every.output
    assert json.loads(every.stdout) == flows
    assert [(b["offset"], b["limit"]) for b in fake.sent("ListFlows")] == [(0, 200), (200, 200)]

    fake.requests.clear()
    limited = cli("flow", "ls", "--limit", "203", "--name", "f001", "-n", "f002", "--tag", "x", "-t", "y", "-o", "json")
    assert limited.exit_code == 0, limited.output
    assert len(json.loads(limited.stdout)) == 203
    assert fake.sent("ListFlows") == [
        {"limit": limit, "offset": offset, "flows": {"name": {"any_": ["f001", "f002"]}, "tags": {"all_": ["x", "y"]}}}
        for offset, limit in ((0, 200), (200, 3))]
    _assert_valid_requests(fake)

    assert cli("flow", "ls", "--limit", "-1").exit_code == 2


def test_flow_ls_piped_is_one_line_per_row_and_empty_says_so(cli, fake):
    long_name = "a-flow-with-a-long-name-" + "x" * 150
    flows = [sample_flow(long_name, tags=["nightly", "db"]), sample_flow("etl")]
    fake.ok("ListFlows", flows)
    lines = cli("flow", "ls", COLUMNS="40").stdout.splitlines()
    assert len(lines) == 3
    assert re.match(r"Name +Tags +Created +ID$", lines[0])
    assert lines[1].split() == [long_name, "nightly,db", "2025-01-02T03:04:05+00:00", flows[0]["id"]]
    assert lines[2].split() == ["etl", "-", "2025-01-02T03:04:05+00:00", flows[1]["id"]]

    fake.ok("ListFlows", [])
    empty = cli("flow", "ls")
    assert empty.exit_code == 0 and empty.stdout == "No flows found.\n"
    assert json.loads(cli("flow", "ls", "--json").stdout) == []


def test_flow_names_and_tags_from_the_store_are_shown_not_obeyed(cli, fake):
    flows = [{**sample_flow(f"f{i}"), "name": name, "tags": [name]} for i, name in enumerate(HOSTILE)]
    fake.ok("ListFlows", flows)
    fake.ok("GetFlowByName", flows[0])
    fake.ok("CreateFlow", flows[1], seq=1, created=False)
    for args in (["flow", "ls"], ["flow", "inspect", "x"], ["flow", "create", "\x1b[2J"]):
        result = cli(*args)
        assert result.exit_code == 0, result.output
        assert "\x1b]" not in result.stdout and "\x1b[2J" not in result.stdout and "\u202e" not in result.stdout
    listed = cli("flow", "ls").stdout
    assert "\\x1b]0;pwned\\x07" in listed and "[red]x[/red]" in listed and "tab\\x09here\\u202eevil" in listed
    assert [f["name"] for f in json.loads(cli("flow", "ls", "--json").stdout)] == HOSTILE


def test_flow_inspect_takes_a_name_or_an_id(cli, fake):
    raw = sample_flow("etl", labels={"team": "data"})
    fake.ok("GetFlow", raw)
    fake.ok("GetFlowByName", raw)
    by_id = cli("flow", "inspect", raw["id"], "--json")
    by_name = cli("flow", "inspect", "etl", "-o", "json")
    assert json.loads(by_id.stdout) == json.loads(by_name.stdout) == raw
    assert fake.sent("GetFlow") == [{"id": raw["id"]}] and fake.sent("GetFlowByName") == [{"name": "etl"}]

    details = cli("flow", "inspect", "etl").stdout.splitlines()
    assert any(line.split() == ["name", "etl"] for line in details)
    assert any(line.split() == ["labels", '{"team":', '"data"}'] for line in details)

    fake.error("GetFlowByName", "not_found", "Flow 'nope' not found.")
    missing = cli("flow", "inspect", "nope")
    assert missing.exit_code == 3
    assert missing.stderr == "Error (not_found): Flow 'nope' not found.\n"


def test_flow_delete(cli, fake):
    flow_id = str(uuid.uuid4())
    fake.ok("DeleteFlow", None, seq=3)
    done = cli("flow", "delete", flow_id, "--idempotency-key", "k-7")
    assert done.exit_code == 0, done.output
    assert done.stdout == f"Deleted flow {flow_id}.\n"
    assert json.loads(cli("flow", "delete", flow_id, "--json").stdout) is None
    assert fake.sent("DeleteFlow") == [{"id": flow_id}] * 2 and fake.keys("DeleteFlow")[0] == "k-7"
    _assert_valid_requests(fake)

    fake.error("DeleteFlow", "not_found", f"Flow {flow_id} not found.")
    assert cli("flow", "delete", flow_id).exit_code == 3
    fake.error("DeleteFlow", "invalid", "id: Input should be a valid UUID", field="id")
    refused = cli("flow", "delete", "etl")
    assert refused.exit_code == 5 and refused.stderr.startswith("Error (invalid): id: ")


def test_an_unknown_flow_outcome_says_how_to_check(cli, fake):
    fake.replies["CreateFlow"] = SILENT
    result = cli("flow", "create", "my flow", RUNLEDGER_REQUEST_TIMEOUT="0.5")
    assert result.exit_code == 6
    keys = fake.keys("CreateFlow")
    assert len(keys) == 3 and len(set(keys)) == 1
    assert ("The outcome is unknown: run `runledger flow inspect 'my flow'` to see whether it was applied; "
            f"re-running the same command is safe only with --idempotency-key {keys[0]}") in result.stderr
