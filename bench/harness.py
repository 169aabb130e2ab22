"""What the benchmarks share: servers (the environment's, else embedded), a service process,
a synthetic but valid history, and percentile arithmetic."""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

from runledger.cli.broker_config import set_up_broker
from runledger.commands import work_pools as wp
from runledger.commands.events import EventEnvelope
from runledger.commands.messages import DecisionContext
from runledger.infra import broker_auth
from runledger.infra.embedded import EmbeddedNats, EmbeddedNatsCluster, EmbeddedPostgres
from runledger.infra.event_store import EventStore
from runledger.infra.settings import Settings


def machine() -> str:
    cores = os.cpu_count()
    mem = ""
    with contextlib.suppress(OSError):
        kb = int(next(line for line in open("/proc/meminfo") if line.startswith("MemTotal")).split()[1])
        mem = f", {kb / 1024 / 1024:.0f} GiB"
    return f"{platform.machine()}, {cores} cores{mem}, Python {platform.python_version()}"


@contextlib.contextmanager
def servers() -> Iterator[dict[str, str]]:
    nats_url = os.environ.get("RUNLEDGER_NATS_URL")
    db_url = os.environ.get("RUNLEDGER_DATABASE_URL")
    tmp = Path(tempfile.mkdtemp(prefix="rlb-"))
    tmp.chmod(0o711)  # as root, Postgres runs as a system user that must get through (mkdtemp: 0700)
    stack = contextlib.ExitStack()
    stack.callback(shutil.rmtree, tmp, True)
    namespace = f"b{uuid.uuid4().hex[:10]}"
    users = None
    monitor_url = store_dir = None
    with stack:
        if not nats_url:
            # As `runledger up` runs it: a user per role, nothing for anyone else, every write
            # synced before its ack, so the figures are those of what users run.
            users = broker_auth.local_credentials(tmp)
            # RUNLEDGER_BENCH_SYNC=interval: nats-server's default sync (every 2 min), only to
            # measure what syncing every write costs.
            sync_always = os.environ.get("RUNLEDGER_BENCH_SYNC", "always") != "interval"
            cluster_size = int(os.environ.get("RUNLEDGER_BENCH_CLUSTER", "1"))
            if cluster_size > 1:
                # RUNLEDGER_BENCH_CLUSTER=3: a cluster of three nodes on this machine, every
                # stream with three replicas (the service is given RUNLEDGER_STREAM_REPLICAS).
                cluster = EmbeddedNatsCluster(tmp, cluster_size, namespace=namespace, credentials=users,
                                              sync_always=sync_always).start()
                stack.callback(cluster.stop)
                os.environ["RUNLEDGER_STREAM_REPLICAS"] = str(min(cluster_size, 3))
                nats_url = cluster.url
                monitor_url, store_dir = f"http://127.0.0.1:{cluster.nodes[0].monitor_port}", str(tmp / "node0")
            else:
                config = broker_auth.write_local_config(tmp, namespace, users, tmp / "nats", sync_always=sync_always)
                n = EmbeddedNats(tmp / "nats", config_file=config).start()
                stack.callback(n.stop)
                nats_url = n.url
                monitor_url, store_dir = f"http://127.0.0.1:{n.monitor_port}", str(tmp / "nats")
        if users is not None:
            # The streams and buckets are the admin's to make (the service's role may not), as
            # `runledger up` and `runledger broker-setup` make them.
            admin = Settings(nats_url=nats_url, namespace=namespace, nats_user=users["admin"]["user"],
                             nats_password=users["admin"]["password"], inbox_prefix=broker_auth.inbox_prefix("admin"))
            # In a thread of its own: some benches enter `servers()` inside their event loop.
            with concurrent.futures.ThreadPoolExecutor(1) as setup:
                setup.submit(asyncio.run, set_up_broker(admin, change=True)).result()
        if not db_url:
            pg = EmbeddedPostgres(tmp / "pg").start()
            stack.callback(pg.stop)
            db_url = pg.url
        yield {"nats_url": nats_url, "database_url": db_url, "namespace": namespace, "nats_users": users,
               "monitor_url": monitor_url, "store_dir": store_dir}


def bench_settings(urls: dict, role: str = "service") -> Settings:
    """Settings of the bench's namespace as `role` (service: appends and the service process;
    client: commands and queries; analyst: reading the log)."""
    creds = (urls.get("nats_users") or {}).get(role)
    auth = {"nats_user": creds["user"], "nats_password": creds["password"],
            "js_api_prefix": creds.get("js_api_prefix", "$JS.API")} if creds else {}
    return Settings(nats_url=urls["nats_url"], database_url=urls["database_url"], namespace=urls["namespace"],
                    inbox_prefix=broker_auth.inbox_prefix(role), **auth)


def role_env(settings: Settings) -> dict[str, str]:
    """The environment that gives a `runledger` process the role `settings` were made for."""
    env = {"RUNLEDGER_INBOX_PREFIX": settings.inbox_prefix, "RUNLEDGER_JS_API_PREFIX": settings.js_api_prefix}
    if settings.nats_user and settings.nats_password:
        env.update(RUNLEDGER_NATS_USER=settings.nats_user, RUNLEDGER_NATS_PASSWORD=settings.nats_password.get_secret_value())
    return env


@contextlib.contextmanager
def service_process(settings: Settings, roles: str = "commands,queries,projections") -> Iterator[subprocess.Popen]:
    """`runledger serve` in its own process, as a user would run it."""
    config_dir = tempfile.mkdtemp(prefix="rlbcfg-")
    env = dict(os.environ,
               RUNLEDGER_NATS_URL=settings.nats_url,
               RUNLEDGER_DATABASE_URL=settings.database_url.get_secret_value(),
               RUNLEDGER_NAMESPACE=settings.namespace,
               RUNLEDGER_CONFIG_DIR=config_dir, **role_env(settings))
    exe = Path(sys.executable).parent / "runledger"
    proc = subprocess.Popen([str(exe), "serve", "--roles", roles], env=env, stderr=subprocess.PIPE, text=True)
    spy = None
    try:
        for line in proc.stderr:  # type: ignore[union-attr]
            if "service ready" in line:
                break
        else:
            raise RuntimeError(f"service exited with {proc.wait()}")
        drain = subprocess.Popen(["cat"], stdin=proc.stderr, stdout=subprocess.DEVNULL)
        profile = os.environ.get("RUNLEDGER_BENCH_PROFILE")
        if profile:  # the service's folded stacks from ready to the end (pip install py-spy)
            spy = subprocess.Popen([str(Path(sys.executable).parent / "py-spy"), "record", "-p", str(proc.pid),
                                    "-r", "300", "-f", "raw", "-o", profile], stdout=subprocess.DEVNULL)
        yield proc
    finally:
        if spy is not None:
            spy.send_signal(signal.SIGINT)  # py-spy writes its file on SIGINT
            with contextlib.suppress(subprocess.TimeoutExpired):
                spy.wait(30)
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
        with contextlib.suppress(Exception):
            drain.wait(5)
        shutil.rmtree(config_dir, ignore_errors=True)


def rss_mb(pid: int) -> float:
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("VmRSS"):
            return int(line.split()[1]) / 1024
    return float("nan")


def cpu_seconds(pid: int, children: bool = False) -> float:
    """User + system CPU time a process has used so far; with `children`, also that of its
    children that have ended (Postgres's backends and workers come and go: without them a
    kind's CPU could seem to fall)."""
    fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    ticks = int(fields[11]) + int(fields[12]) + (int(fields[13]) + int(fields[14]) if children else 0)
    return ticks / os.sysconf("SC_CLK_TCK")


def cpu_by_kind() -> dict[str, float]:
    """CPU seconds used so far by every nats-server and every Postgres process on the machine
    (the embedded ones, and any other, idle, beside them)."""
    used = {"nats-server": 0.0, "postgres": 0.0}
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                command = f.read().split(b"\0")[0].decode(errors="replace")
            seconds = cpu_seconds(int(pid), children=True)
        except (OSError, IndexError, ValueError):
            continue
        name = os.path.basename(command.split()[0]) if command else ""
        for kind in used:
            if name.startswith(kind):
                used[kind] += seconds
    return used


def stored_messages(urls: dict) -> int | None:
    """Messages stored so far in every stream of the embedded nats-server (its monitoring
    endpoint's `/jsz`: the sum of the streams' last sequences, so removed ones count too);
    None with a server of the environment's."""
    if not urls.get("monitor_url"):
        return None
    with urllib.request.urlopen(f"{urls['monitor_url']}/jsz?streams=true", timeout=10) as r:
        jsz = json.load(r)
    return sum(stream["state"]["last_seq"] for account in jsz.get("account_details", [])
               for stream in account.get("stream_detail", []))


def fsyncs_per_second(directory: str, count: int = 2000) -> float:
    """How many small appends, each followed by an fsync, one file takes per second in
    `directory`: what one stream with `sync_interval: always` does for every message it
    stores (its messages are written one after the other)."""
    path = os.path.join(directory, f"fsync-probe-{uuid.uuid4().hex}")
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    try:
        started = time.perf_counter()
        for _ in range(count):
            os.write(fd, b"x" * 300)
            os.fsync(fd)
        return count / (time.perf_counter() - started)
    finally:
        os.close(fd)
        os.unlink(path)


def percentile(values: list[float], p: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    k = min(len(ordered) - 1, max(0, round(p / 100 * (len(ordered) - 1))))
    return ordered[k]


def synthetic_history(n_events: int, pools: int = 1000) -> list[EventEnvelope]:
    """A valid history of `n_events`: pools created, then queue creates and updates spread
    over them, decided by the real deciders."""
    ctx = DecisionContext(now=datetime.now(UTC))
    out: list[EventEnvelope] = []
    states: list[wp.WorkPool] = []

    def add(decision) -> None:
        for e in decision.events:
            out.append(EventEnvelope.wrap(e.aggregate_id, e.event, occurred=ctx.now, event_id=uuid.uuid4()))

    for i in range(pools):
        d = wp.decide_create_work_pool(wp.CreateWorkPool(name=f"pool-{i}", type="process"), wp.WorkPoolNameClaim(), ctx)
        add(d)
        states.append(d.result)
    i = 0
    while len(out) < n_events:
        k = i % pools
        pool = states[k]
        if i // pools % 4 == 0:
            d = wp.decide_create_work_queue(wp.CreateWorkQueue(work_pool_name=pool.name, name=f"q{i}"), pool, ctx)
        else:
            queue = pool.queues_by_priority()[-1]
            cmd = wp.UpdateWorkQueue(work_pool_name=pool.name, work_queue_name=queue.name, description=f"d{i}")
            d = wp.decide_update_work_queue(cmd, pool, ctx)
        add(d)
        states[k] = d.result[0]
        i += 1
    return out[:n_events]


async def publish_history(store: EventStore, envelopes: list[EventEnvelope], window: int = 256) -> None:
    """Pipelined appends (no expected-sequence checks: a bench backlog, not a decision)."""
    js = store.js
    pending: list[asyncio.Future] = []
    for env in envelopes:
        pending.append(await js.publish_async(store.subject_of(env), env.model_dump_json().encode(),
                                              headers={"Nats-Msg-Id": str(env.id)}))
        if len(pending) >= window:
            await asyncio.gather(*pending)
            pending.clear()
    await asyncio.gather(*pending)


def report(title: str, rows: list[tuple[str, str, str]]) -> None:
    print(f"\n## {title}\n")
    print(f"machine: {machine()}; {datetime.now(UTC):%Y-%m-%d}")
    print("| figure | measured | goal |\n|---|---|---|")
    for name, value, goal in rows:
        print(f"| {name} | {value} | {goal} |")
    sys.stdout.flush()


def dump_json(path: str | None, data: dict) -> None:
    if path:
        Path(path).write_text(json.dumps(data, indent=2))


def now() -> float:
    return time.perf_counter()


def command_sender(nc, settings: Settings):
    """`await cmd(name, body)`: a command through the broker, its reply envelope, or
    RuntimeError when it is not ok (a benchmark's commands are all expected to succeed)."""

    async def cmd(name: str, body: dict) -> dict:
        reply = await nc.request(settings.command_subject(name), json.dumps(body).encode(), timeout=30)
        out = json.loads(reply.data)
        if not out["ok"]:
            raise RuntimeError(out)
        return out

    return cmd
