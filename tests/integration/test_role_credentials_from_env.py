"""The CLI's analyst verbs and `task-worker` with their role's credentials from the environment
alone (as on a host reaching a compose deployment): the role's JetStream API prefix follows
from its user, and a JetStream request that still goes unanswered is one line naming the
setting, not a traceback."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from pathlib import Path

import pytest

from .test_roles import Roles, roles_served

pytestmark = pytest.mark.asyncio

CLI = [sys.executable, "-m", "runledger.cli"]
BOUND = {"adder": ["add"]}


@pytest.fixture
async def served(server_urls, tmp_path):
    async with roles_served(server_urls, tmp_path, BOUND) as r:
        yield r


def _env(r: Roles, user: str, tmp_path: Path, **extra: str) -> dict[str, str]:
    """Only the environment: no endpoint file to find anything in."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("RUNLEDGER_")}
    env.update(RUNLEDGER_CONFIG_DIR=str(tmp_path / "no-endpoint"), RUNLEDGER_NATS_URL=r.server.url,
               RUNLEDGER_NATS_USER=user, RUNLEDGER_NATS_PASSWORD=r.creds[user]["password"],
               RUNLEDGER_NAMESPACE=r.namespace, RUNLEDGER_DATABASE_URL=r.database_url, **extra)
    return env


async def _run(env: dict[str, str], *args: str, cwd: Path | None = None) -> tuple[int, str, str]:
    # A subprocess the test's loop awaits: the service under test runs on that loop.
    proc = await asyncio.create_subprocess_exec(*CLI, *args, env=env, cwd=cwd, stdout=asyncio.subprocess.PIPE,
                                                stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(proc.communicate(), 120)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


async def test_events_as_the_analyst_from_the_environment_needs_no_prefix(served, tmp_path):
    code, out, err = await _run(_env(served, "analyst", tmp_path), "events")
    assert code == 0, err
    assert not served.violations("analyst")


async def test_an_unanswered_jetstream_request_is_one_line_naming_the_setting(served, tmp_path):
    """The analyst's account has no `$JS.API`: a request there is dropped and times out."""
    code, out, err = await _run(_env(served, "analyst", tmp_path, RUNLEDGER_JS_API_PREFIX="$JS.API"), "events")
    assert code == 6, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    assert lines[0].startswith("Error (unavailable):") and "RUNLEDGER_JS_API_PREFIX" in lines[0], err


@pytest.mark.parametrize("user", ["task_worker", "task_worker_adder"])
async def test_a_task_worker_from_the_environment_serves(served, tmp_path, user):
    (tmp_path / "env_tasks_mod.py").write_text(
        "from runledger.client.tasks import task\n\n@task(key='add')\nasync def add(a, b):\n    return a + b\n")
    args = ["task-worker", "--module", "env_tasks_mod"] + (["--as", "adder"] if user != "task_worker" else [])
    env = _env(served, user, tmp_path, RUNLEDGER_TASK_WORKER_KEYS='{"adder": ["add"]}')
    proc = await asyncio.create_subprocess_exec(*CLI, *args, env=env, cwd=tmp_path, stdout=asyncio.subprocess.PIPE,
                                                stderr=asyncio.subprocess.PIPE)
    assert proc.stderr is not None
    said: list[str] = []
    try:
        while line := (await asyncio.wait_for(proc.stderr.readline(), 120)).decode():
            said.append(line)
            if " serving 'add'" in line:
                break
    finally:
        if proc.returncode is None:
            proc.send_signal(signal.SIGTERM)
        rest = (await asyncio.wait_for(proc.communicate(), 120))[1].decode()
    assert any(" serving 'add'" in line for line in said), "".join(said) + rest
    assert proc.returncode == 0, "".join(said) + rest
    assert not served.violations(user)
