"""The `flow-run` verbs against the real service, as Prefect's CLI has them: `ls --state` takes a
state's name and `--state-type` its type; `cancel` of a run that has not started cancels it at
once and says so (exit 0), a refused one exits 8; `delete` removes a run. Each CLI run is a new
client that must see what was written just before it (its reads catch up first); the test's
own broker does not, so it waits for the read model (`Broker.catch_up`) after a CLI write."""

from __future__ import annotations

import json

from tests.integration.broker import cli_in_thread

_cli = cli_in_thread


async def _runs(broker) -> dict[str, str]:
    """Runs `waiting` (SCHEDULED), `late` (SCHEDULED, named Late), `running` and `done`
    (COMPLETED), by name."""
    flow_id = (await broker.ok_cmd("CreateFlow", name="etl"))["id"]
    ids = {}
    for name, state in (("waiting", {"type": "SCHEDULED"}), ("late", {"type": "SCHEDULED", "name": "Late"}),
                        ("running", {"type": "RUNNING"}), ("done", {"type": "COMPLETED"})):
        ids[name] = (await broker.ok_cmd("CreateFlowRun", flow_id=flow_id, name=name, state=state))["id"]
    return ids


def _names(result) -> list[str]:
    assert result.exit_code == 0, result.output
    return sorted(r["name"] for r in json.loads(result.stdout))


async def test_ls_state_is_a_state_name_and_state_type_a_type(broker, settings):
    cli = _cli(settings)
    await _runs(broker)
    assert _names(await cli("flow-run", "ls", "--state", "late", "--json")) == ["late"]
    assert _names(await cli("flow-run", "ls", "--state", "Scheduled", "-s", "COMPLETED", "--json")) == [
        "done", "waiting"]
    assert _names(await cli("flow-run", "ls", "--state-type", "scheduled", "--json")) == ["late", "waiting"]
    assert _names(await cli("flow-run", "ls", "--state-type", "SCHEDULED", "--state", "Late", "--json")) == ["late"]
    assert _names(await cli("flow-run", "ls", "--state", "NoSuchName", "--json")) == []
    bad = await cli("flow-run", "ls", "--state-type", "late")
    assert bad.exit_code == 2 and "--state-type" in bad.output
    shown = await cli("flow-run", "ls", "--help")
    assert "--state-type" in shown.stdout and "NAME" in shown.stdout and "TYPE" in shown.stdout


async def test_ls_cut_at_its_limit_says_so(broker, settings):
    cli = _cli(settings)
    await _runs(broker)
    cut = await cli("flow-run", "ls", "--limit", "3")
    assert len(cut.stdout.splitlines()) == 1 + 3  # stdout is the table alone: its header and 3 runs
    assert "the first 3 flow runs are shown; there are more: raise --limit" in cut.stderr
    as_json = await cli("flow-run", "ls", "--limit", "3", "--json")
    assert len(json.loads(as_json.stdout)) == 3 and as_json.stderr == ""  # JSON for scripts: nothing else
    assert "there are more" not in (await cli("flow-run", "ls", "--limit", "4")).stderr
    assert (await cli("flow-run", "ls", "--limit", "0")).exit_code == 2


async def test_ls_says_which_filter_names_nothing(broker, settings):
    """A typo in --flow or --deployment is said on stderr, not taken for "no runs"."""
    cli = _cli(settings)
    await _runs(broker)
    typo = await cli("flow-run", "ls", "--flow", "etl", "--flow", "etll", "--deployment", "etl/nosuch")
    assert typo.exit_code == 0 and typo.stdout == "No flow runs found.\n"
    assert "note: no flow is named 'etll'" in typo.stderr and "note: no deployment is named 'etl/nosuch'" in typo.stderr
    assert "no flow is named 'etl'" not in typo.stderr
    assert (await cli("flow-run", "ls", "--flow", "etl")).stderr == ""


async def test_cancel_says_a_run_not_started_is_cancelled_and_exits_0(broker, settings):
    cli = _cli(settings)
    ids = await _runs(broker)
    waiting = await cli("flow-run", "cancel", "waiting")
    assert waiting.exit_code == 0, waiting.output
    assert waiting.stdout.startswith("Cancelled: flow run 'waiting' is now CANCELLED.")
    await broker.catch_up()  # the CLI's command, not the broker's: wait for the read model
    assert (await broker.ok_qry("GetFlowRun", id=ids["waiting"]))["state_type"] == "CANCELLED"
    as_json = await cli("flow-run", "cancel", "late", "--json")
    assert as_json.exit_code == 0 and json.loads(as_json.stdout)["state"]["type"] == "CANCELLED"
    running = await cli("flow-run", "cancel", "running")
    assert running.exit_code == 0 and running.stdout.startswith("ACCEPT: flow run 'running' is CANCELLING.")
    again = await cli("flow-run", "cancel", "waiting")
    assert again.exit_code == 0 and again.stdout.startswith("Flow run 'waiting' is CANCELLED already."), again.output
    done = await cli("flow-run", "cancel", "done")  # a real refusal: it has ended
    assert done.exit_code == 8 and done.stdout.startswith("ABORT: flow run 'done' is COMPLETED.")
    assert (await broker.ok_qry("GetFlowRun", id=ids["done"]))["state_type"] == "COMPLETED"


async def test_delete_removes_a_run_by_name_or_id(broker, settings):
    cli = _cli(settings)
    ids = await _runs(broker)
    deleted = await cli("flow-run", "delete", "running")
    assert deleted.exit_code == 0, deleted.output
    assert deleted.stdout == "Deleted flow run 'running'.\n"
    assert (await cli("flow-run", "inspect", "running")).exit_code == 3
    assert (await cli("flow-run", "delete", ids["done"], "--json")).stdout.strip() == "null"
    assert _names(await cli("flow-run", "ls", "--json")) == ["late", "waiting"]
    gone = await cli("flow-run", "delete", ids["done"])
    assert gone.exit_code == 3 and gone.stderr == f"Error (not_found): Flow run '{ids['done']}' not found.\n"
