"""What `runledger serve` says: a start that fails, why in one line (the NATS connections it
closes itself on the way out are not reported as lost: that error is for a connection the
server ended); a start that succeeds, the roles running, the vacuum only with a retention."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import sys

import pytest

from tests.conftest import cleanup_namespace

pytestmark = pytest.mark.asyncio

CLI = [sys.executable, "-m", "runledger.cli"]


def _env(settings, tmp_path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("RUNLEDGER_")}
    env.update(RUNLEDGER_CONFIG_DIR=str(tmp_path / "no-endpoint"), RUNLEDGER_NATS_URL=settings.nats_url,
               RUNLEDGER_NAMESPACE=settings.namespace, RUNLEDGER_DATABASE_URL=settings.database_url.get_secret_value())
    env.update(extra)
    return env


async def test_serve_with_a_database_it_cannot_reach_says_only_that(settings, tmp_path):
    env = _env(settings, tmp_path, RUNLEDGER_DATABASE_URL="postgresql://nobody@127.0.0.1:1/nothing")  # nothing listens on port 1
    try:
        proc = await asyncio.create_subprocess_exec(*CLI, "serve", env=env, stdout=asyncio.subprocess.PIPE,
                                                    stderr=asyncio.subprocess.STDOUT)
        out = (await asyncio.wait_for(proc.communicate(), 120))[0].decode()
    finally:
        await cleanup_namespace(settings)  # the streams it made before reaching Postgres
    assert proc.returncode == 6, out
    assert "Error (unavailable): cannot use Postgres" in out, out
    assert "closed for good" not in out, out
    assert "Traceback" not in out, out


async def _ready_roles(env: dict[str, str]) -> list[str]:
    """The roles `serve` names in its ready line; it is stopped with SIGTERM after."""
    proc = await asyncio.create_subprocess_exec(*CLI, "serve", env=env, stdout=asyncio.subprocess.PIPE,
                                                stderr=asyncio.subprocess.STDOUT)
    assert proc.stdout is not None
    said: list[str] = []
    try:
        while line := (await asyncio.wait_for(proc.stdout.readline(), 120)).decode():
            said.append(line)
            if ready := re.search(r"runledger service ready: roles ([a-z_,]+),", line):
                return ready.group(1).split(",")
        raise AssertionError("serve did not become ready:\n" + "".join(said))
    finally:
        if proc.returncode is None:
            proc.send_signal(signal.SIGTERM)
        await asyncio.wait_for(proc.communicate(), 120)


async def test_the_ready_line_names_the_vacuum_only_with_a_retention(settings, tmp_path):
    try:
        without = await _ready_roles(_env(settings, tmp_path))
        with_retention = await _ready_roles(_env(settings, tmp_path, RUNLEDGER_FLOW_RUN_RETENTION_SECONDS="3600"))
    finally:
        await cleanup_namespace(settings)
    assert "vacuum" not in without and {"commands", "queries", "projections", "foreman"} <= set(without), without
    assert "vacuum" in with_retention, with_retention
