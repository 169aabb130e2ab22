"""The flow methods of the typed client, and the `flow` verbs, against the real service: each
method once, with what the service answers read back into `Flow` (its JSON reproduced)."""

from __future__ import annotations

import asyncio
import json

import pytest
from typer.testing import CliRunner

from runledger.cli.main import _register, app
from runledger.client import Flow, NotFound, RunledgerClient
from tests.integration.broker import cli_env

_register()


async def test_each_flow_method_against_the_service(service, settings):
    async with RunledgerClient(settings) as rl:
        etl = await rl.create_flow("etl", tags=["nightly", "db"], labels={"team": "data"}, idempotency_key="k-etl")
        assert isinstance(etl, Flow)
        assert (etl.name, etl.tags, etl.labels) == ("etl", ["nightly", "db"], {"team": "data"})

        again, created = await rl.ensure_flow("etl", tags=["other"])
        assert created is False and again == etl  # the existing flow, unchanged
        other, created = await rl.ensure_flow("report", tags=["nightly"])
        assert created is True

        assert await rl.read_flow(etl.id) == etl
        assert await rl.read_flow_by_name("etl") == etl
        assert [f.name for f in await rl.list_flows()] == ["etl", "report"]
        assert await rl.list_flows(tags=["nightly", "db"]) == [etl]
        assert await rl.list_flows(names=["report"], ids=[other.id], limit=5, offset=0) == [other]
        assert await rl.count_flows(tags=["nightly"]) == 2
        raw = (await rl.query("GetFlow", {"id": str(etl.id)})).result
        assert etl.model_dump(mode="json") == raw  # what --json prints is the service's JSON

        assert await rl.delete_flow(etl.id) is None
        with pytest.raises(NotFound):
            await rl.read_flow(etl.id)
        assert await rl.count_flows() == 1
        recreated = await rl.create_flow("etl")  # the name is free again: a new flow
        assert recreated.id != etl.id


async def test_flow_create_and_ls_in_the_cli(service, settings):
    env = cli_env(settings)
    runner = CliRunner()

    async def cli(*args: str):
        # The CLI runs its own event loop, and the service runs on this one: a thread for the CLI.
        return await asyncio.to_thread(runner.invoke, app, list(args), env=env)

    made = await cli("flow", "create", "etl", "--tag", "nightly")
    assert made.exit_code == 0, made.output
    assert made.stdout.startswith("Created flow 'etl'.")
    found = await cli("flow", "create", "etl")
    assert found.exit_code == 0, found.output
    assert found.stdout.startswith("Flow 'etl' already exists; unchanged.")

    listed = await cli("flow", "ls", "-o", "json")
    assert listed.exit_code == 0, listed.output
    (flow,) = json.loads(listed.stdout)
    assert (flow["name"], flow["tags"]) == ("etl", ["nightly"])
    async with RunledgerClient(settings) as rl:
        assert (await rl.read_flow_by_name("etl")).model_dump(mode="json") == flow
