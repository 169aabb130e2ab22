"""Nothing is lost when a process dies at any point: real `runledger serve` processes, SIGKILL.

The crash tests in test_projection_crashes.py stop a projection in-process at chosen points.
Here the service runs as the command users run (`runledger serve --roles ...`) in an OS
process of its own, and is killed with SIGKILL (no shutdown code runs) at seeded random
moments, under load, and started again:

- projections: the read model a killed-and-restarted projection process ends with equals a
  rebuild from the log (what `runledger verify` checks), and it skipped nothing;
- commands: every command that was answered `ok` is in the log exactly once, and the commands
  whose answer was lost in the kill, sent again with their idempotency keys, append nothing
  twice and get the reply the first execution gave.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
from nats.aio.client import Client as NATS
from nats.errors import NoRespondersError
from nats.errors import TimeoutError as NatsTimeoutError
from sqlalchemy import text

from runledger.handlers.service import Service, projectors
from runledger.infra.nats_connection import connect
from runledger.projections.runner import read_checkpoint

from .broker import Broker, assert_live_equals_rebuild

pytestmark = [pytest.mark.timeout(120), pytest.mark.alone]  # the timeout: a safety net only (the file takes well under 30 s)

# The `runledger` script's folder depends on the venv: run the CLI with this interpreter.
RUNLEDGER = [sys.executable, "-m", "runledger.cli"]
READY_LINE = "runledger service ready"
PROJECTIONS = [p.name for p in projectors()]


class ServeProcess:
    """`runledger serve --roles <roles>` against the test's servers and namespace, one log
    file per life. `kill` is SIGKILL: no signal handler, no shutdown step runs."""

    def __init__(self, settings, roles: str, workdir: Path, **env: str):
        self.roles = roles
        self.workdir = workdir
        self.env = {
            **os.environ,  # other RUNLEDGER_* settings (credentials, TLS) as this process sees them
            "RUNLEDGER_NATS_URL": settings.nats_url,
            "RUNLEDGER_DATABASE_URL": settings.database_url.get_secret_value(),
            "RUNLEDGER_NAMESPACE": settings.namespace,
            "RUNLEDGER_REQUEST_TIMEOUT": str(settings.request_timeout),
            "RUNLEDGER_CONFIG_DIR": str(workdir / "config"),  # never a developer's endpoint file
            **env,
        }
        self.proc: subprocess.Popen | None = None
        self.lives = 0
        self.log: Path | None = None

    def start(self) -> None:
        assert self.proc is None or self.proc.poll() is not None, "already running"
        self.lives += 1
        self.log = self.workdir / f"serve-{self.roles.replace(',', '-')}-{self.lives}.log"
        with open(self.log, "wb") as out:
            self.proc = subprocess.Popen([*RUNLEDGER, "serve", "--roles", self.roles], env=self.env, cwd=self.workdir,
                                         stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT)

    def output(self) -> str:
        return self.log.read_text(errors="replace") if self.log and self.log.exists() else ""

    def assert_alive(self) -> None:
        assert self.proc is not None and self.proc.poll() is None, (
            f"runledger serve --roles {self.roles} exited with {self.proc and self.proc.returncode}:\n{self.output()}")

    async def wait_ready(self, timeout: float = 15) -> None:
        deadline = time.monotonic() + timeout
        while READY_LINE not in self.output():
            self.assert_alive()
            assert time.monotonic() < deadline, f"not ready after {timeout} s:\n{self.output()}"
            await asyncio.sleep(0.02)

    def kill(self) -> None:
        """SIGKILL, and reap it. Also the clean-up: safe to call whatever the state."""
        if self.proc is not None and self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.send_signal(signal.SIGKILL)
        if self.proc is not None:
            self.proc.wait()


@pytest.fixture
async def workdir(tmp_path):
    (tmp_path / "config").mkdir()
    return tmp_path


@pytest.fixture
async def in_process(settings):
    """An in-process service with the roles the test does *not* kill (the process under test
    gets the other ones), a broker connection, and the namespace's clean-up."""
    from tests.conftest import cleanup_namespace

    services: list[Service] = []
    conns: list[NATS] = []

    async def make(roles: frozenset[str]) -> tuple[Service, Broker]:
        svc = Service(settings, roles=roles)
        services.append(svc)
        await svc.start()
        nc = await connect(settings)
        conns.append(nc)
        return svc, Broker(nc, settings)

    try:
        yield make
    finally:
        for nc in conns:
            await nc.close()
        for svc in services:
            await svc.stop()
        await cleanup_namespace(settings)


async def _checkpoints(svc: Service) -> int:
    async with svc.engine.connect() as conn:
        return min([await read_checkpoint(conn, name) for name in PROJECTIONS])


# -- projections -----------------------------------------------------------------------------

POOLS = 8
WRITERS = 16


async def _write(broker: Broker, rng: random.Random, writer: str, pool: str, commands: int, pace: float) -> None:
    """One client's share of a varied history: queues created (with and without a priority,
    which moves the others), renamed, reprioritised, paused, deleted; pools updated."""
    queues: list[str] = []
    for i in range(commands):
        await asyncio.sleep(pace)
        roll = rng.random()
        if not queues or roll < 0.3:
            name = f"w{writer}-{i}"
            await broker.ok_cmd("CreateWorkQueue", work_pool_name=pool, name=name, priority=rng.choice([None, 1, 2, 5]))
            queues.append(name)
        elif roll < 0.5:
            await broker.ok_cmd("UpdateWorkQueue", work_pool_name=pool, work_queue_name=rng.choice(queues),
                                priority=rng.randint(1, 6), is_paused=rng.random() < 0.5)
        elif roll < 0.6:
            old = queues.pop(rng.randrange(len(queues)))
            queues.append(f"{old}r")
            await broker.ok_cmd("UpdateWorkQueue", work_pool_name=pool, work_queue_name=old, name=f"{old}r")
        elif roll < 0.65:
            await broker.ok_cmd("DeleteWorkQueue", work_pool_name=pool, work_queue_name=queues.pop(rng.randrange(len(queues))))
        else:
            await broker.ok_cmd("UpdateWorkPool", name=pool, description=f"{writer}-{i}", concurrency_limit=rng.randint(0, 9))


async def _write_history(broker: Broker, rng: random.Random, part: str, commands_per_writer: int, pace: float = 0) -> None:
    seeds = [rng.random() for _ in range(WRITERS)]
    await asyncio.gather(*(
        _write(broker, random.Random(seeds[w]), f"{part}{w}", f"pool{w % POOLS}", commands_per_writer, pace) for w in range(WRITERS)
    ))


async def test_a_projection_process_killed_at_random_moments_loses_nothing(in_process, settings, workdir):
    rng = random.Random(20240611)
    svc, broker = await in_process(frozenset({"commands"}))
    for p in range(POOLS):
        await broker.ok_cmd("CreateWorkPool", name=f"pool{p}", type="process")
    await _write_history(broker, rng, "a", 150)  # the backlog: ~2,400 events
    backlog = await svc.store.last_sequence()

    # Small batches: many commits, so a kill lands between any two of the steps that matter
    # (fetch, apply, commit, ack) rather than after the one big batch that would do it all.
    # A 2 s lease (5 s by default): each life waits for the killed one's lease to run out first.
    projection = ServeProcess(settings, "projections", workdir, RUNLEDGER_PROJECTION_BATCH_SIZE="40",
                              RUNLEDGER_LEASE_TTL_SECONDS="2")
    writing = asyncio.create_task(_write_history(broker, rng, "b", 60, pace=0.05))  # more while it projects
    kills: list[tuple[str, int, int, int]] = []  # (when, checkpoint at start, at kill, log end at kill)
    try:
        for life in range(6):
            at_start = await _checkpoints(svc)
            projection.start()
            if life == 3:
                # One kill at a random moment of start-up: connecting, migrating, binding.
                await asyncio.sleep(rng.uniform(0.05, 0.9))
                when = "start-up"
            else:
                # The others at a random moment after it has committed a batch in this life.
                deadline = time.monotonic() + 15
                while await _checkpoints(svc) == at_start:
                    projection.assert_alive()
                    assert time.monotonic() < deadline, f"no progress after a restart:\n{projection.output()}"
                    await asyncio.sleep(0.01)
                await asyncio.sleep(rng.uniform(0, 0.25))
                when = "projecting"
            at_kill, end = await _checkpoints(svc), await svc.store.last_sequence()
            projection.assert_alive()
            projection.kill()
            kills.append((when, at_start, at_kill, end))
        await writing
        last = await svc.store.last_sequence()
        assert last > backlog

        projection.start()
        deadline = time.monotonic() + 20
        while await _checkpoints(svc) < last:
            projection.assert_alive()
            assert time.monotonic() < deadline, f"the projection did not reach seq {last}:\n{projection.output()}"
            await asyncio.sleep(0.02)
        projection.assert_alive()
    finally:
        projection.kill()
        writing.cancel()
        with contextlib.suppress(BaseException):
            await writing
    # The kills meant something: most landed with work still to do, after progress in that life.
    mid_way = [k for k in kills if k[0] == "projecting" and k[1] < k[2] < k[3]]
    assert len(mid_way) >= 3, kills
    rows = await assert_live_equals_rebuild(svc, settings, last)
    assert rows > POOLS * 2
    print(f"\n{len(kills)} SIGKILLs (when, checkpoint at start, at kill, log end): {kills}; "
          f"{last} events, {rows} rows equal a rebuild")


# -- commands --------------------------------------------------------------------------------

CLIENTS = 16
COMMAND_POOLS = 4


class Outcome:
    def __init__(self) -> None:
        self.ok: dict[str, dict] = {}  # queue name -> the ok reply
        self.lost: dict[str, str] = {}  # queue name -> why no reply came: "timeout" | "no responders"
        self.errors: list[dict] = []


def _queue_command(client: int, i: int) -> tuple[str, bytes]:
    name = f"c{client}-{i}"
    body = {"work_pool_name": f"pool{client % COMMAND_POOLS}", "name": name, "idempotency_key": f"key:{name}"}
    return name, json.dumps(body).encode()


async def _until(condition, process: ServeProcess, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        process.assert_alive()
        assert time.monotonic() < deadline, f"no progress in {timeout} s:\n{process.output()}"
        await asyncio.sleep(0.01)


async def _send(nc: NATS, settings, body: bytes, timeout: float) -> dict:
    reply = await nc.request(settings.command_subject("CreateWorkQueue"), body, timeout=timeout)
    return json.loads(reply.data)


async def _client(nc: NATS, settings, client: int, stop: asyncio.Event, out: Outcome) -> None:
    i = 0
    while not stop.is_set():
        name, body = _queue_command(client, i)
        i += 1
        try:
            reply = await _send(nc, settings, body, timeout=1)
        except NoRespondersError:  # no process serves commands right now: never delivered
            out.lost[name] = "no responders"
            await asyncio.sleep(0.05)
            continue
        except (NatsTimeoutError, TimeoutError):  # in flight when the process died (or just slow)
            out.lost[name] = "timeout"
            continue
        if reply.get("ok"):
            out.ok[name] = reply
        else:
            out.errors.append(reply)


async def test_a_killed_command_process_loses_no_answered_command_and_repeats_none(in_process, settings, workdir):
    rng = random.Random(20240612)
    svc, _ = await in_process(frozenset({"projections"}))  # the read model follows in-process
    commands = ServeProcess(settings, "commands", workdir)
    nc = await connect(settings)
    out = Outcome()
    stop = asyncio.Event()
    clients: list[asyncio.Task] = []
    kills = []
    try:
        commands.start()
        await commands.wait_ready()
        for p in range(COMMAND_POOLS):
            await Broker(nc, settings).ok_cmd("CreateWorkPool", name=f"pool{p}", type="process")
        clients = [asyncio.create_task(_client(nc, settings, c, stop, out)) for c in range(CLIENTS)]
        for _ in range(2):
            # Under full load again (the clients whose requests died with the last process
            # have timed out), then a random moment later: SIGKILL.
            await _until(lambda answered=len(out.ok): len(out.ok) >= answered + 50, commands)
            await asyncio.sleep(rng.uniform(0.1, 0.6))
            commands.assert_alive()
            commands.kill()
            kills.append(len(out.ok))
            await asyncio.sleep(rng.uniform(0.1, 0.4))  # down: requests find no responders
            commands.start()
            await commands.wait_ready()
        await _until(lambda answered=len(out.ok): len(out.ok) >= answered + 50, commands)
        stop.set()
        await asyncio.gather(*clients)

        assert out.errors == []
        timed_out = sorted(n for n, why in out.lost.items() if why == "timeout")
        assert timed_out, "no command was in flight at a kill"
        assert len(out.ok) > 100

        # Every command again, with its key: the answered ones repeat their first reply and
        # append nothing; the lost ones either ran (then this is their first reply, again) or
        # did not (then they run now).
        before = await svc.store.last_sequence()
        originals = dict(out.ok)
        sem = asyncio.Semaphore(CLIENTS)

        async def again(name: str) -> dict:
            client, i = (int(x) for x in name[1:].split("-"))
            async with sem:
                return await _send(nc, settings, _queue_command(client, i)[1], timeout=10)

        names = sorted(originals) + sorted(out.lost)
        replies = dict(zip(names, await asyncio.gather(*(again(n) for n in names)), strict=True))
        assert all(r["ok"] for r in replies.values()), [r for r in replies.values() if not r["ok"]][:3]
        for name, first in originals.items():
            r = replies[name]
            assert r.get("repeat") is True and (r["result"], r["seq"], r["created"]) == (first["result"], first["seq"], first["created"]), (name, first, r)
        ran_before = sorted(n for n in out.lost if replies[n].get("repeat"))
        ran_now = sorted(n for n in out.lost if not replies[n].get("repeat"))
        # The case idempotency keys are for: appended, then the process died before replying.
        # (Each kill catches ~16 commands in flight, several of them past their append.)
        assert ran_before, "no command had run without its reply reaching the client"
        # Only the commands that had never run appended anything: one record and one event each.
        assert await svc.store.last_sequence() == before + 2 * len(ran_now)
        # A third time: now everything is a repeat of the reply just given.
        third = dict(zip(names, await asyncio.gather(*(again(n) for n in names)), strict=True))
        for name in names:
            assert third[name].get("repeat") is True
            assert (third[name]["result"], third[name]["seq"]) == (replies[name]["result"], replies[name]["seq"])

        # The log: exactly one WorkQueueCreated per command issued, none twice, at the
        # sequence and with the queue its reply named.
        rows = await svc.store.read_subject(f"{settings.event_subject_prefix}.work_pool.*.WorkQueueCreated")
        created_events = [(seq, json.loads(data)["payload"]["queue"]) for seq, _, data, _ in rows]
        counts = Counter(q["name"] for _, q in created_events)
        assert [n for n, c in counts.items() if c > 1] == []
        assert set(counts) == set(names)
        by_name = {q["name"]: (seq, q["id"]) for seq, q in created_events}
        for name in names:
            assert by_name[name] == (replies[name]["seq"], replies[name]["result"]["id"]), name
        # and one idempotency record per key
        info = await nc.jetstream().stream_info(settings.stream_name, subjects_filter=f"{settings.namespace}.idem.>")
        assert len(info.state.subjects or {}) == len(names) and set((info.state.subjects or {}).values()) == {1}

        # The read model (projected in-process throughout) holds each queue once and equals a rebuild.
        last = await svc.store.last_sequence()
        assert await svc.watch.wait_for(last, 10)
        async with svc.engine.connect() as conn:
            projected = Counter(r[0] for r in await conn.execute(text("SELECT name FROM work_queues WHERE name <> 'default'")))
        assert projected == Counter(names)
        await assert_live_equals_rebuild(svc, settings, last)
        print(f"\n{len(kills)} SIGKILLs (answered before each: {kills}); {len(originals)} answered ok, "
              f"{len(timed_out)} timed out, {len(out.lost) - len(timed_out)} found no responders; "
              f"of the lost, {len(ran_before)} had run (reply lost), {len(ran_now)} ran on retry")
    finally:
        stop.set()
        for t in clients:
            t.cancel()
        await asyncio.gather(*clients, return_exceptions=True)
        commands.kill()
        await nc.close()
