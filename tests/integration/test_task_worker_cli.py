"""`runledger task-worker` as a process, against real NATS and Postgres: several modules served
at once; a module that cannot be imported said in one line; SIGTERM said at once, a second one
handing the running runs back at once; SIGTERM with the broker gone still exits 0 saying how many
runs it finished."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import textwrap
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from runledger.client import RunledgerClient
from runledger.client.tasks import submit_task, task_result, wait_for_task_run
from runledger.infra.embedded import RestartableNats
from runledger.infra.nats_connection import connect
from runledger.infra.task_queues import ensure_task_streams, ensure_task_worker_bucket

from .test_task_queues import running_worker

pytestmark = pytest.mark.asyncio

MODULE_A = textwrap.dedent('''
    from runledger.client.tasks import task

    @task(key="cli.a")
    async def a() -> str:
        return "from a"
''')

MODULE_B = textwrap.dedent('''
    import asyncio
    from runledger.client.tasks import task

    @task(key="cli.b")
    async def b(seconds: float) -> str:
        await asyncio.sleep(seconds)
        return "from b"
''')


class Worker:
    """A `runledger task-worker` process; `lines` holds what it printed (stdout and stderr)."""

    def __init__(self, proc: asyncio.subprocess.Process):
        self.proc = proc
        self.lines: list[str] = []
        self._reading = asyncio.create_task(self._read())

    async def _read(self) -> None:
        assert self.proc.stdout is not None
        while line := await self.proc.stdout.readline():
            self.lines.append(line.decode())

    async def said(self, text: str, seconds: float) -> float:
        """Waits until a line holds `text`; returns how long that took."""
        t0 = time.monotonic()
        while not any(text in line for line in self.lines):
            assert time.monotonic() - t0 < seconds, f"{text!r} not said within {seconds} s:\n{''.join(self.lines)}"
            assert self.proc.returncode is None or not self._reading.done(), "".join(self.lines)
            await asyncio.sleep(0.05)
        return time.monotonic() - t0

    async def exit_code(self, seconds: float) -> int:
        code = await asyncio.wait_for(self.proc.wait(), seconds)
        await self._reading
        return code

    async def kill(self) -> None:
        if self.proc.returncode is None:
            self.proc.kill()
            await self.proc.wait()


async def start_worker(settings, tmp_path: Path, *args: str, **env: str) -> Worker:
    environment = {**os.environ, "RUNLEDGER_NATS_URL": settings.nats_url, "RUNLEDGER_NAMESPACE": settings.namespace,
                   "RUNLEDGER_DATABASE_URL": settings.database_url.get_secret_value(), "PYTHONPATH": str(tmp_path),
                   **env}
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "runledger.cli.main", "task-worker", *args, env=environment, cwd=tmp_path,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
    return Worker(proc)


async def until_running(client: RunledgerClient, run_id, seconds: float = 20) -> None:
    deadline = time.monotonic() + seconds
    while (await client.query("GetTaskRun", {"id": str(run_id)}, min_seq=await client.catch_up())
           ).result["state_type"] != "RUNNING":
        assert time.monotonic() < deadline, "the run did not start"
        await asyncio.sleep(0.1)


async def test_several_modules_are_served_and_a_second_sigterm_hands_back_at_once(service, settings, tmp_path):
    service.connected_at -= 60  # a service up for a while (right after a connect, takeovers wait)
    (tmp_path / "cli_mod_a.py").write_text(MODULE_A)
    (tmp_path / "cli_mod_b.py").write_text(MODULE_B)
    # A long ack wait: a run not handed back would come back only after it.
    worker = await start_worker(settings, tmp_path, "--module", "cli_mod_a", "--module", "cli_mod_b",
                                "--grace", "60", "--worker-id", "two-modules",
                                RUNLEDGER_TASK_ACK_WAIT_SECONDS="30")
    try:
        await worker.said("serving 'cli.a', 'cli.b'", 30)
        async with RunledgerClient(settings) as client:
            quick = await submit_task(client, "cli.a")
            assert task_result(await wait_for_task_run(client, quick.id, timeout=20)) == "from a"
            slow = await submit_task(client, "cli.b", {"seconds": 120})
            await until_running(client, slow.id)

            worker.proc.send_signal(signal.SIGTERM)
            assert await worker.said("stopping: finishing 1 running task run (up to 60 s); again to hand them "
                                     "back now", 5) < 2
            await asyncio.sleep(0.5)
            assert worker.proc.returncode is None  # still finishing
            worker.proc.send_signal(signal.SIGTERM)
            assert await worker.exit_code(20) == 0
            assert any("two-modules stopped: 1 task run finished" in line for line in worker.lines), worker.lines
            assert not any("Traceback" in line for line in worker.lines), "".join(worker.lines)

            # Handed back at once: another worker takes it over well before the 30 s ack wait.
            async def quick_b(seconds: float) -> str:
                return "taken over"

            t0 = time.monotonic()
            patient = settings.model_copy(update={"task_ack_wait_seconds": 30.0})
            async with running_worker(patient, {"cli.b": quick_b}):
                done = await wait_for_task_run(client, slow.id, timeout=20)
            assert task_result(done) == "taken over" and time.monotonic() - t0 < 10
    finally:
        await worker.kill()


async def test_sigterm_with_the_broker_gone_exits_0_saying_how_many_runs_finished(settings, tmp_path):
    nats = RestartableNats(tmp_path / "nats")
    nats.start()
    worker = None
    try:
        alone = settings.model_copy(update={"nats_url": nats.url})
        nc = await connect(alone)
        try:
            js = nc.jetstream(prefix=alone.js_api_prefix)
            await ensure_task_streams(js, alone)
            await ensure_task_worker_bucket(js, alone)
        finally:
            await nc.close()
        (tmp_path / "cli_mod_a.py").write_text(MODULE_A)
        worker = await start_worker(alone, tmp_path, "--module", "cli_mod_a", "--worker-id", "orphan")
        await worker.said("serving 'cli.a'", 30)
        nats.kill()
        await asyncio.sleep(1.0)
        worker.proc.send_signal(signal.SIGTERM)
        assert await worker.exit_code(60) == 0, "".join(worker.lines)
        assert any("orphan stopped: 0 task runs finished" in line for line in worker.lines), "".join(worker.lines)
        assert not any("Traceback" in line for line in worker.lines), "".join(worker.lines)
    finally:
        if worker is not None:
            await worker.kill()
        nats.kill()


@pytest.fixture
def cli(tmp_path, monkeypatch):
    """`runledger task-worker ...` in this process: the refusals below come before any connection."""
    from runledger.cli.main import _register, app

    _register()
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    runner = CliRunner()

    def invoke(*args: str):
        return runner.invoke(app, ["task-worker", *args])

    return invoke


async def test_a_module_that_cannot_be_imported_is_one_line_and_a_usage_error(cli, tmp_path):
    (tmp_path / "cli_mod_raises.py").write_text("raise RuntimeError('no database configured')\n")
    for module, said in (("", "--module: give a module name (e.g. mytasks), not an empty one"),
                         ("no_such_cli_module_xyz",
                          "cannot import 'no_such_cli_module_xyz': ModuleNotFoundError: No module named"),
                         ("cli_mod_raises", "cannot import 'cli_mod_raises': RuntimeError: no database configured")):
        result = cli("--module", module)
        lines = result.stderr.strip().splitlines()
        assert result.exit_code == 2, result.stderr
        assert len(lines) == 1 and said in lines[0] and "Traceback" not in result.stderr, result.stderr
        if module:
            assert "(run with -v for the traceback)" in lines[0]
    verbose = cli("--module", "cli_mod_raises", "-v")
    assert verbose.exit_code == 2
    assert "Traceback" in verbose.stderr and "RuntimeError: no database configured" in verbose.stderr
    assert verbose.stderr.strip().splitlines()[-1].startswith("Error")
