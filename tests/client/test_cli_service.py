"""The CLI against the real service, where the behaviour depends on it: a lost reply retried
with the same idempotency key is applied once; `--overwrite` and the concurrency-limit verbs;
piped output that `grep` can use; `events --follow`; and the README's Python snippet, run as
pasted."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import sys
import uuid
from pathlib import Path

import pytest
from typer.testing import CliRunner

from runledger.cli.main import _register, app
from runledger.client import RunledgerClient
from tests.integration.broker import cli_env

pytestmark = pytest.mark.integration

_register()

README = Path(__file__).resolve().parents[2] / "README.md"
RUNLEDGER = Path(sys.executable).parent / "runledger"


async def _cli(env: dict[str, str], *args: str):
    # The CLI runs its own event loop, and the service runs on this one: a thread for the CLI.
    return await asyncio.to_thread(CliRunner().invoke, app, list(args), env=env)


def _process_env(settings) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("RUNLEDGER_")}
    return {**env, **cli_env(settings)}


async def _created_events(settings, name: str) -> list[dict]:
    result = await _cli(cli_env(settings), "events", "--aggregate", "work_pool", "--type", "WorkPoolCreated")
    assert result.exit_code == 0, result.output
    return [e for e in map(json.loads, result.stdout.splitlines()) if f'"name": "{name}"' in json.dumps(e)]


async def test_a_lost_reply_is_retried_with_the_same_key_and_applied_once(service, settings):
    """A relay between the CLI and the service drops the service's first reply to a command: the
    CLI times out, sends the command again with the same key, and gets the first reply back."""
    from runledger.infra.nats_connection import connect

    relay_ns = f"r{uuid.uuid4().hex[:12]}"
    nc = await connect(settings, name="test-relay")
    dropped: list[dict] = []

    async def forward(msg) -> None:
        reply = await nc.request(settings.namespace + msg.subject[len(relay_ns):], msg.data, timeout=10)
        if ".cmd." in msg.subject and not dropped:
            dropped.append(json.loads(msg.data))  # applied by the service, its reply lost
            return
        await msg.respond(reply.data)

    await nc.subscribe(f"{relay_ns}.>", cb=forward)
    try:
        env = {**cli_env(settings), "RUNLEDGER_NAMESPACE": relay_ns, "RUNLEDGER_REQUEST_TIMEOUT": "1"}
        result = await _cli(env, "work-pool", "create", "etl", "--type", "process", "--json")
    finally:
        await nc.close()
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["name"] == "etl"
    assert dropped and dropped[0]["idempotency_key"]
    assert len(await _created_events(settings, "etl")) == 1


async def test_overwrite_and_the_concurrency_limit_verbs(service, settings):
    env = cli_env(settings)
    assert (await _cli(env, "work-pool", "create", "etl", "--type", "process")).exit_code == 0
    again = await _cli(env, "work-pool", "create", "etl", "--type", "process")
    assert again.exit_code == 4 and "use --overwrite to update it" in again.stderr
    over = await _cli(env, "work-pool", "create", "etl", "--type", "process", "--concurrency-limit", "3",
                      "--description", "nightly", "--overwrite", "-o", "json")
    assert over.exit_code == 0, over.output
    pool = json.loads(over.stdout)
    assert (pool["concurrency_limit"], pool["description"], pool["type"]) == (3, "nightly", "process")
    assert len(await _created_events(settings, "etl")) == 1

    cleared = await _cli(env, "work-pool", "clear-concurrency-limit", "etl", "--json")
    assert json.loads(cleared.stdout)["concurrency_limit"] is None
    limited = await _cli(env, "work-pool", "set-concurrency-limit", "etl", "7", "--json")
    assert json.loads(limited.stdout)["concurrency_limit"] == 7

    created = await _cli(env, "work-queue", "create", "urgent", "--pool", "etl", "--limit", "2", "--json")
    assert json.loads(created.stdout)["concurrency_limit"] == 2
    queue = await _cli(env, "work-queue", "set-concurrency-limit", "urgent", "5", "--pool", "etl", "--json")
    assert json.loads(queue.stdout)["concurrency_limit"] == 5
    queue = await _cli(env, "work-queue", "clear-concurrency-limit", "urgent", "--pool", "etl", "--json")
    assert json.loads(queue.stdout)["concurrency_limit"] is None


async def test_piped_ls_greps_whole_lines_and_an_empty_list_says_so(service, settings):
    env = _process_env(settings)
    empty = await asyncio.create_subprocess_exec(str(RUNLEDGER), "work-pool", "ls", env=env,
                                                 stdout=asyncio.subprocess.PIPE)
    out, _ = await asyncio.wait_for(empty.communicate(), 60)
    assert out.decode() == "No work pools found.\n"

    async with RunledgerClient(settings) as rl:
        queue = await rl.create_legacy_work_queue("old")  # makes default-agent-pool
        pool = await rl.read_work_pool("default-agent-pool")
        await rl.create_work_pool("a-pool-with-a-rather-long-name-" + "n" * 80, type="process")
    shell = await asyncio.create_subprocess_shell(
        f"{RUNLEDGER} work-pool ls | grep default-agent-pool", env={**env, "COLUMNS": "40"},
        stdout=asyncio.subprocess.PIPE)
    out, _ = await asyncio.wait_for(shell.communicate(), 60)
    assert shell.returncode == 0
    (line,) = out.decode().splitlines()
    assert re.fullmatch(rf"default-agent-pool +prefect-agent +- +no +- +{pool.id}", line)

    queues = await asyncio.create_subprocess_shell(
        f"{RUNLEDGER} work-queue ls | grep old", env={**env, "COLUMNS": "40"}, stdout=asyncio.subprocess.PIPE)
    out, _ = await asyncio.wait_for(queues.communicate(), 60)
    assert out.decode().split() == ["old", "default-agent-pool", str(queue.priority), *out.decode().split()[3:]]
    assert out.decode().rstrip().endswith(str(queue.id))


async def test_events_follow_prints_new_events_until_ctrl_c(service, settings):
    async with RunledgerClient(settings) as rl:
        await rl.create_work_pool("before", type="process")
    proc = await asyncio.create_subprocess_exec(
        str(RUNLEDGER), "events", "--follow", "--aggregate", "work_pool", env=_process_env(settings),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    try:
        async def line_naming(name: str) -> dict:
            while True:
                raw = await asyncio.wait_for(proc.stdout.readline(), 30)
                assert raw, "events --follow ended"
                event = json.loads(raw)
                if f'"name": "{name}"' in json.dumps(event):
                    return event

        first = await line_naming("before")  # what was there already
        assert first["type"] == "WorkPoolCreated"
        async with RunledgerClient(settings) as rl:
            await rl.create_work_pool("after", type="process")
        later = await line_naming("after")  # appended while following
        assert later["type"] == "WorkPoolCreated" and later["seq"] > first["seq"]
        proc.send_signal(signal.SIGINT)
        _, err = await asyncio.wait_for(proc.communicate(), 30)
        assert proc.returncode == 0, err.decode()
        assert b"Traceback" not in err
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


def _readme_python() -> str:
    """The client example (the README's first Python block)."""
    return re.findall(r"```python\n(.*?)```", README.read_text(), re.S)[0]


def _readme_tasks() -> tuple[str, list[str]]:
    """The background-task example: its module (the Python block that starts `# mytasks.py`)
    and the shell lines after it."""
    text = README.read_text()
    module = next(b for b in re.findall(r"```python\n(.*?)```", text, re.S) if b.startswith("# mytasks.py"))
    after = text.split(module, 1)[1]
    (shell,) = re.findall(r"```bash\n(.*?)```", after, re.S)[:1]
    return module, [line for line in shell.splitlines() if line.strip()]


async def test_the_readme_task_example_runs_as_pasted(service, settings, tmp_path):
    """The worker line started as written (in the background), then each submit line: each
    prints what its comment says (up to a remark in parentheses)."""
    import ast
    import shlex

    module, (worker_line, *submit_lines) = _readme_tasks()
    assert submit_lines
    (tmp_path / "mytasks.py").write_text(module)
    env = {**_process_env(settings), "PYTHONPATH": str(tmp_path)}
    worker_args = shlex.split(worker_line, comments=True)
    assert worker_args[0] == "runledger" and worker_args[-1] == "&"
    exe = os.path.join(os.path.dirname(sys.executable), "runledger")
    worker = await asyncio.create_subprocess_exec(exe, *worker_args[1:-1], env=env, cwd=tmp_path,
                                                  stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    runs = 0
    try:
        for submit_line in submit_lines:
            submit = shlex.split(submit_line, comments=True)
            assert submit[0] == "python"
            expected = submit_line.rsplit("#", 1)[1].split(" (")[0].strip()
            proc = await asyncio.create_subprocess_exec(sys.executable, *submit[1:], env=env, cwd=tmp_path,
                                                        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
            out, err = await asyncio.wait_for(proc.communicate(), 60)
            assert proc.returncode == 0, err.decode()
            assert out.decode() == expected + "\n"
            value = ast.literal_eval(expected)
            runs += len(value) if isinstance(value, list) else 1
    finally:
        worker.send_signal(signal.SIGTERM)
        _, werr = await asyncio.wait_for(worker.communicate(), 60)
    assert worker.returncode == 0, werr.decode()
    assert f"{runs} task runs finished".encode() in werr


async def test_the_readme_python_snippet_runs_as_pasted(service, settings):
    proc = await asyncio.create_subprocess_exec(sys.executable, "-c", _readme_python(), env=_process_env(settings),
                                                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == 0, err.decode()
    async with RunledgerClient(settings) as rl:
        await rl.catch_up()  # another process wrote it: wait until the read model holds it
        queue = await rl.read_work_queue("etl", "urgent")
    assert queue.priority == 1
    assert out.decode() == "etl urgent 1\n"


def _readme_tour() -> list[list[str]]:
    import shlex

    tour = README.read_text().split("## A five-minute tour", 1)[1]
    (block,) = re.findall(r"```bash\n(.*?)```", tour, re.S)[:1]
    lines = [shlex.split(line, comments=True) for line in block.splitlines()]
    return [words[1:] for words in lines if words and words[0] == "runledger"]


async def test_the_readme_tour_runs(service, settings):
    env = cli_env(settings)
    tour = _readme_tour()
    assert len(tour) >= 10
    for args in tour:
        if "--follow" in args:  # it runs until Ctrl-C: tested above
            args = [a for a in args if a != "--follow"]
        result = await _cli(env, *args)
        assert result.exit_code == 0, (args, result.output)
    async with RunledgerClient(settings) as rl:
        await rl.catch_up()  # the tour's clients wrote it: wait until the read model holds it
        queues = {q.name: q for q in await rl.list_work_queues("my-pool")}
        pool = await rl.read_work_pool("my-pool")
    assert {n: q.priority for n, q in queues.items()} == {"low": 1, "high": 2, "default": 3}
    assert all(q.last_polled is not None for q in queues.values())  # `work-pool get-runs` polled them
    assert queues["low"].concurrency_limit is None
    assert (pool.description, pool.concurrency_limit, pool.is_paused) == ("nightly", 10, True)
    async with RunledgerClient(settings) as rl:
        deployment = await rl.read_deployment_by_name("etl/nightly")
        runs = await rl.list_flow_runs(deployment_ids=[deployment.id])
        (first,) = [r for r in runs if r.name == "first-run"]
        history = await rl.read_flow_run_states(first.id)
    assert [s.schedule for s in deployment.schedules] == [{"cron": "0 2 * * *", "timezone": "Europe/Berlin",
                                                           "day_or": True}]
    assert (deployment.work_pool_name, deployment.parameters) == ("my-pool", {"day": "monday"})
    assert len(runs) == 4 and sum(r.auto_scheduled for r in runs) == 3
    assert first.parameters == {"day": "friday"}
    assert [s.type for s in history] == ["SCHEDULED", "PENDING", "RUNNING", "CANCELLING"]


async def test_status_takes_output_json_too(service, settings):
    for flags in (["--json"], ["-o", "json"]):
        result = await _cli(cli_env(settings), "status", *flags)
        assert result.exit_code == 0, result.output
        assert json.loads(result.stdout)["answering"] is True


async def test_events_follow_into_head_ends_quietly_when_head_does(service, settings):
    async with RunledgerClient(settings) as rl:
        await rl.create_work_pool("one", type="process")
    proc = await asyncio.create_subprocess_exec(
        "bash", "-c", f"set -o pipefail; {RUNLEDGER} events --follow --aggregate work_pool | head -n 1",
        env=_process_env(settings), stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    try:
        first = await asyncio.wait_for(proc.stdout.readline(), 30)
        assert json.loads(first)["type"] == "WorkPoolCreated"
        async with RunledgerClient(settings) as rl:  # the follower's next write meets a closed pipe
            for i in range(3):
                await rl.create_work_pool(f"more-{i}", type="process")
                await asyncio.sleep(0.3)
        _, err = await asyncio.wait_for(proc.communicate(), 30)
        assert proc.returncode == 0, err.decode()
        assert err == b""
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
