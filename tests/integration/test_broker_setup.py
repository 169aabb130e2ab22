"""`runledger broker-setup`: the admin role makes and upgrades runledger's streams and buckets;
the service, with its own credentials (which may no longer create or update a stream), only
checks them and refuses to start on a broker that is not set up, naming the command. Against a
nats-server running the generated configuration, as `runledger up` runs it."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import sys
import uuid
from pathlib import Path

import pytest

from runledger.handlers.service import Service
from runledger.infra import broker_auth
from runledger.infra.database import create_engine, drop_schema
from runledger.infra.embedded import EmbeddedNats
from runledger.infra.jetstream_setup import event_stream_config
from runledger.infra.nats_connection import BrokerUnavailable
from runledger.infra.settings import Settings

from .test_roles import Roles

CLI = [sys.executable, "-m", "runledger.cli"]


@pytest.fixture
async def fresh(server_urls, tmp_path):
    """A nats-server with runledger's users and nothing set up on it."""
    namespace = f"b{uuid.uuid4().hex[:12]}"
    creds = broker_auth.local_credentials(tmp_path)
    config = broker_auth.write_local_config(tmp_path, namespace, creds, tmp_path / "nats")
    server = EmbeddedNats(tmp_path / "nats", config_file=config).start()
    r = Roles(server, server_urls["database_url"], namespace, creds)
    try:
        yield r
    finally:
        for nc in r.connections:
            if not nc.is_closed:
                await nc.close()
        engine = create_engine(r.settings("service"))
        await drop_schema(engine, namespace)
        await engine.dispose()
        server.stop()


def _made(r: Roles) -> list[str]:
    """What a setup makes: each stream and bucket, as the setup names it."""
    n = broker_auth.Names(r.namespace)
    return [*(f"stream {s}" for s in (n.stream, *n.task_streams, n.result_stream)),
            *(f"bucket {b}" for b in n.buckets)]


def _env(r: Roles, tmp_path: Path, user: str | None = "admin") -> dict[str, str]:
    """The admin's credentials from the environment alone (as the compose setup step has them);
    `user` None: nothing, the endpoint file of an `up` names the server and its users."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("RUNLEDGER_")}
    env.update(RUNLEDGER_CONFIG_DIR=str(tmp_path / "cfg"))
    if user is not None:
        env.update(RUNLEDGER_NATS_URL=r.server.url, RUNLEDGER_NAMESPACE=r.namespace, RUNLEDGER_NATS_USER=user,
                   RUNLEDGER_NATS_PASSWORD=r.creds[user]["password"])
    return env


async def _cli(env: dict[str, str], *args: str) -> tuple[int, str, str]:
    # A subprocess the test's loop awaits (the CLI runs a loop of its own).
    proc = await asyncio.create_subprocess_exec(*CLI, *args, env=env, stdout=asyncio.subprocess.PIPE,
                                                stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(proc.communicate(), 120)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


async def _start_refused(settings: Settings) -> str:
    service = Service(settings)
    try:
        with pytest.raises(BrokerUnavailable) as refused:
            await service.start()
    finally:
        await service.stop()
    return str(refused.value)


async def _starts(settings: Settings) -> None:
    service = Service(settings)
    try:
        await service.start()
    finally:
        await service.stop()


async def test_the_service_refuses_a_fresh_broker_and_broker_setup_sets_it_up(fresh, tmp_path):
    refused = await _start_refused(fresh.settings("service"))
    assert "\n" not in refused
    assert refused.startswith("the broker is not set up for this runledger (")
    assert all(f"{s} missing" in refused for s in _made(fresh)), refused
    assert "run `runledger broker-setup` with the admin role's credentials (or others that may create and update streams), then start again" in refused
    nc, _ = await fresh.connect("admin")
    assert (await nc.jetstream().account_info()).streams == 0  # the refused start made nothing

    code, out, err = await _cli(_env(fresh, tmp_path), "broker-setup", "--check")
    assert code == 1, out + err
    assert all(f"{s} missing" in out for s in _made(fresh)), out
    assert (await nc.jetstream().account_info()).streams == 0  # a check changes nothing

    code, out, err = await _cli(_env(fresh, tmp_path), "broker-setup")
    assert code == 0, out + err
    assert sorted(out.splitlines()) == sorted(f"created {s}" for s in _made(fresh))
    assert (await nc.jetstream().account_info()).streams == len(_made(fresh))

    # The admin's credentials from a running `up`'s endpoint file, no environment.
    (tmp_path / "cfg").mkdir(exist_ok=True)
    (tmp_path / "cfg" / "endpoint.json").write_text(json.dumps({
        "nats_url": fresh.server.url, "namespace": fresh.namespace, "nats_users": fresh.creds}))
    code, out, err = await _cli(_env(fresh, tmp_path, user=None), "broker-setup", "--check")
    assert (code, out.strip()) == (0, "already set up"), out + err

    await _starts(fresh.settings("service"))
    assert not fresh.violations("service") and not fresh.violations("admin")


async def test_an_outdated_event_stream_is_reported_and_upgraded_by_broker_setup(fresh, tmp_path):
    """A log an earlier runledger made (here: purges not denied yet) is the admin's to upgrade;
    the service names it and refuses until then."""
    service = fresh.settings("service")
    nc, _ = await fresh.connect("admin")
    js = nc.jetstream()
    await js.add_stream(dataclasses.replace(event_stream_config(service), deny_purge=False))
    outdated = f"stream {service.stream_name} outdated: deny_purge"

    refused = await _start_refused(service)
    assert f"({outdated}; " in refused, refused
    code, out, err = await _cli(_env(fresh, tmp_path), "broker-setup", "--check")
    assert code == 1 and outdated in out.splitlines(), out + err
    assert not (await js.stream_info(service.stream_name)).config.deny_purge  # a check changes nothing
    code, out, err = await _cli(_env(fresh, tmp_path), "broker-setup")
    assert code == 0 and f"upgraded stream {service.stream_name}: deny_purge" in out.splitlines(), out + err
    assert (await js.stream_info(service.stream_name)).config.deny_purge
    code, out, err = await _cli(_env(fresh, tmp_path), "broker-setup", "--check")
    assert (code, out.strip()) == (0, "already set up"), out + err
    await _starts(service)
    assert not fresh.violations("service") and not fresh.violations("admin")


async def test_a_service_logging_in_by_its_url_is_refused_too_not_left_to_time_out(fresh):
    """The user and password in the server's URL (no RUNLEDGER_NATS_USER) log in as the
    service all the same: its start checks, and says what to run, rather than asking to make a
    stream its role may not make."""
    service = fresh.settings("service")
    password = service.nats_password.get_secret_value() if service.nats_password else ""
    in_url = service.model_copy(update={"nats_url": fresh.server.url.replace("nats://", f"nats://service:{password}@"),
                                        "nats_user": None, "nats_password": None})
    assert in_url.logs_in
    refused = await asyncio.wait_for(_start_refused(in_url), 20)
    assert "run `runledger broker-setup`" in refused, refused
    assert not fresh.violations("service")  # it asked for nothing its role lacks


async def test_streams_that_take_in_or_send_on_messages_or_are_sealed_are_refused(fresh, tmp_path):
    """A stream update sets sources, republish or sealed as easily as an upgrade's settings
    (NATS permissions cannot tell them apart): a log that republishes every event would be read
    by whoever listens, a task stream sourcing another stream would take runs from it. The
    service, `broker-setup` and its check refuse them, naming them; setting up changes nothing."""
    from nats.js.api import RePublish, StreamSource

    service = fresh.settings("service")
    nc, _ = await fresh.connect("admin")
    js = nc.jetstream()
    code, out, err = await _cli(_env(fresh, tmp_path), "broker-setup")
    assert code == 0, out + err
    log = (await js.stream_info(service.stream_name)).config
    await js.update_stream(dataclasses.replace(log, republish=RePublish(src=">", dest="leak.>")))
    for args in (["broker-setup", "--check"], ["broker-setup"]):
        code, out, err = await _cli(_env(fresh, tmp_path), *args)
        assert code == 6 and f"stream {service.stream_name} has republish, which runledger never sets" in err, out + err
    assert "runledger never sets" in await _start_refused(service)
    await js.update_stream(log)  # the republish taken away: set up again
    await _starts(service)

    tasks = broker_auth.Names(fresh.namespace).task_streams[0]
    task_config = (await js.stream_info(tasks)).config
    await js.update_stream(dataclasses.replace(task_config, sources=[StreamSource(name=service.stream_name)]))
    refused = await _start_refused(service)
    assert f"stream {tasks} has sources" in refused, refused
    await js.update_stream(dataclasses.replace(task_config, sources=None))
    await _starts(service)

    results = broker_auth.Names(fresh.namespace).result_stream
    await js.update_stream(dataclasses.replace((await js.stream_info(results)).config, sealed=True))
    assert f"stream {results} has sealed" in await _start_refused(service)
