"""The service's memory with a long history of runs (issue 11: "service RSS with 1,000,000 runs
in history: ≤ 500 MB"), and the scheduler's rate while it makes them.

    python bench/history_memory.py [--runs 1000000] [--deployments 1000] [--clients 8]
                                   [--roles ROLES] [--only history|schedule-goal]

`history` (the default): one `runledger serve` process as a user runs it (every role, unless
`--roles`), `--deployments` deployments over `--pools` pools, and exactly `--runs` runs made by
the scheduler's own command, `ScheduleDeploymentRuns`, through the broker, 8 clients side by
side: every run is in the log and in the read models as the service wrote it. Then the
service's RSS (VmRSS) and peak (VmHWM) once the projections caught up; again after the service
is stopped and started (time to ready, RSS once idle); again after a workload that touches
many runs: runs read (`GetFlowRun`), pools polled (`GetScheduledFlowRuns`, limit 10), runs
rescheduled to now and walked PENDING -> RUNNING -> COMPLETED, and every deployment's first
dates asked for again (each such command loads the deployment's index of scheduled runs and
the run of every date it plans, through the command side's aggregate cache; none may be made
twice).

How exactly `--runs` runs are made: a command makes at most 500 runs (`MAX_RUNS_PER_COMMAND`)
and plans at most `max_runs` (≤ 1,000) dates per schedule, so each deployment's share is asked
for in windows of at most 500 consecutive dates, each command naming its window
(`start_time`, `end_time`, `min_runs` = `max_runs` = the window's size, `min_time` 0). The
schedule is a minutely rrule starting 2030-01-01: the service's own scheduler (whose default
window is now to 100 days from now) finds no date of it to schedule, and the runs' dates are
in the future, so its clock marks none late; the count stays exact with every role running.
The windows go round the deployments (every deployment's first window, then the second ...),
so that two clients seldom ask the same deployment at once.

`--only schedule-goal`: the issue's scheduler goal, "schedule 1,000 deployments × 100 runs:
≥ 10,000 runs/s, none duplicated", as bench/runs.py part 4 measures it (interval schedules,
a service with the commands, queries and projections roles: its own scheduler would race the
bench for the same dates), checking that no run id comes back twice and that the read model
holds exactly the runs made.

RUNLEDGER_BENCH_TRACEMALLOC=<file>: the service runs under tracemalloc (slower, and bigger by
tracemalloc's own bookkeeping) and writes its 40 largest allocation sites to <file>.<pid>.<n> at
each measurement point (n = 1, 2, ...): to find what holds the memory when the RSS is too high.
Give it RUNLEDGER_REQUEST_TIMEOUT=60 too: traced, a command of 500 runs takes longer than the
default deadline (4 s).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

from harness import (
    bench_settings,
    command_sender,
    cpu_seconds,
    now,
    percentile,
    report,
    role_env,
    servers,
)
from runs import CPU_KINDS, caught_up, cpu_cells, cpu_now, cpu_per

from runledger.cli.service import ROLES
from runledger.commands.deployment_runs import MAX_RUNS_PER_COMMAND
from runledger.infra.nats_connection import connect
from runledger.infra.settings import Settings

FIRST_DATE = datetime(2030, 1, 1, tzinfo=UTC)
MINUTELY_FROM_2030 = {"rrule": "DTSTART:20300101T000000\nRRULE:FREQ=MINUTELY"}
TRACEMALLOC_ENV = "RUNLEDGER_BENCH_TRACEMALLOC"

# Run as the service under tracemalloc: the `runledger` command, with a SIGUSR1 handler that
# writes the largest allocation sites to the next numbered file.
_TRACED_SERVICE = """
import itertools, os, signal, sys, tracemalloc
out, numbers = f"{sys.argv.pop(1)}.{os.getpid()}", itertools.count(1)
def dump(signum, frame):
    stats = tracemalloc.take_snapshot().statistics("traceback")
    total = sum(s.size for s in stats)
    with open(f"{out}.{next(numbers)}", "w") as f:
        f.write(f"traced: {total / 2**20:.1f} MiB in {sum(s.count for s in stats)} blocks\\n")
        for s in stats[:40]:
            f.write(f"\\n{s.size / 2**20:.1f} MiB in {s.count} blocks\\n")
            f.write("\\n".join(s.traceback.format(limit=12)) + "\\n")
signal.signal(signal.SIGUSR1, dump)
tracemalloc.start(12)
from runledger.cli.main import main
sys.argv[0] = "runledger"
main()
"""


def memory_mb(pid: int) -> dict[str, float]:
    """The process's resident set now (VmRSS) and its peak so far (VmHWM), in MiB."""
    out = {}
    for line in open(f"/proc/{pid}/status"):
        key = line.split(":", 1)[0]
        if key in ("VmRSS", "VmHWM"):
            out[key] = int(line.split()[1]) / 1024
    return out


@contextlib.contextmanager
def service(settings: Settings, roles: str | None) -> Iterator[tuple[subprocess.Popen, float]]:
    """`runledger serve` in its own process (every role unless `roles`), and the seconds from
    its start to its "service ready" line (bench/harness.py's `service_process`, timed)."""
    config_dir = tempfile.mkdtemp(prefix="rlbcfg-")
    env = dict(os.environ, RUNLEDGER_NATS_URL=settings.nats_url,
               RUNLEDGER_DATABASE_URL=settings.database_url.get_secret_value(),
               RUNLEDGER_NAMESPACE=settings.namespace, RUNLEDGER_CONFIG_DIR=config_dir, **role_env(settings))
    args = ["serve", *(["--roles", roles] if roles else [])]
    traced = os.environ.get(TRACEMALLOC_ENV)
    command = ([sys.executable, "-c", _TRACED_SERVICE, traced, *args] if traced
               else [str(Path(sys.executable).parent / "runledger"), *args])
    started = now()
    proc = subprocess.Popen(command, env=env, stderr=subprocess.PIPE, text=True)
    drain = None
    try:
        said = []
        for line in proc.stderr:  # type: ignore[union-attr]
            said.append(line)
            if "service ready" in line:
                break
        else:
            raise RuntimeError(f"service exited with {proc.wait()}:\n" + "".join(said[-20:]))
        ready = now() - started
        drain = subprocess.Popen(["cat"], stdin=proc.stderr, stdout=subprocess.DEVNULL)
        yield proc, ready
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        if drain is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                drain.wait(5)
        shutil.rmtree(config_dir, ignore_errors=True)


def traced_snapshot(proc: subprocess.Popen) -> None:
    """Under tracemalloc, has the service write its largest allocation sites (and waits a
    little: the snapshot takes a while with many blocks)."""
    if os.environ.get(TRACEMALLOC_ENV):
        proc.send_signal(signal.SIGUSR1)
        time.sleep(30)


async def until_idle(pid: int, most: float = 120, window: int = 5) -> float:
    """Waits until the process has used less than 5 % of a core over the last `window`
    seconds (its start-up work done: background passes, projections' first looks; its
    background roles keep polling), at most `most` seconds; the seconds waited."""
    started = now()
    used = [cpu_seconds(pid)]
    while now() - started < most:
        await asyncio.sleep(1)
        used.append(cpu_seconds(pid))
        if len(used) > window and used[-1] - used[-1 - window] < 0.05 * window:
            break
    return now() - started


def progress(text: str) -> None:
    sys.stderr.write(f"\r{text}\033[K")
    sys.stderr.flush()


def windows(runs: int, deployments: list[str]) -> list[tuple[str, int, int]]:
    """(deployment, first date's index, dates) of every command: each deployment's share of
    `runs` in windows of at most `MAX_RUNS_PER_COMMAND` consecutive dates, going round the
    deployments window by window."""
    share = [runs // len(deployments) + (i < runs % len(deployments)) for i in range(len(deployments))]
    out = []
    for first in range(0, max(share, default=0), MAX_RUNS_PER_COMMAND):
        for dep, dates in zip(deployments, share, strict=True):
            if dates > first:
                out.append((dep, first, min(MAX_RUNS_PER_COMMAND, dates - first)))
    return out


def window_body(deployment_id: str, first: int, dates: int) -> dict:
    """The command that schedules exactly the minutely dates first .. first + dates - 1."""
    start = FIRST_DATE + timedelta(minutes=first)
    end = start + timedelta(minutes=dates - 1)
    return {"deployment_id": deployment_id, "start_time": start.isoformat(), "end_time": end.isoformat(),
            "min_runs": dates, "max_runs": dates, "min_time": 0}


async def schedule_all(cmd, bodies: list[dict], clients: int, pid: int, label: str,
                       sample_every: int = 0) -> dict:
    """Sends every body as `ScheduleDeploymentRuns`, `clients` at a time; the runs made, the
    seconds, the CPU used before and after, the commands retried, and every `sample_every`-th
    run id of the replies (0: every one)."""
    queue = list(reversed(bodies))
    made = [0]
    kept: list[str] = []
    counted = [0]
    retried = [0]

    async def send(body: dict) -> dict:
        """The command, sent again while the service answers `unavailable` (its deadline
        passed, or busy): safe, since a date whose run exists is skipped; such a run is then
        missing from the replies, so the runs are counted in the read model."""
        for _ in range(20):
            try:
                return await cmd("ScheduleDeploymentRuns", body)
            except RuntimeError as e:
                if not (isinstance(e.args[0], dict) and e.args[0].get("error", {}).get("code") == "unavailable"):
                    raise
                retried[0] += 1
                await asyncio.sleep(0.5)
        raise RuntimeError(f"still unavailable after 20 tries: {body}")

    async def client() -> None:
        while queue:
            body = queue.pop()
            out = await send(body)
            ids = out["result"]["flow_run_ids"]
            made[0] += len(ids)
            for run_id in ids:
                if not sample_every or counted[0] % sample_every == 0:
                    kept.append(run_id)
                counted[0] += 1

    async def report_progress() -> None:
        while True:
            await asyncio.sleep(2)
            rate = made[0] / max(now() - t0, 1e-9)
            progress(f"{label}: {made[0]:,} runs, {rate:,.0f} runs/s, {retried[0]} commands retried, "
                     f"service RSS {memory_mb(pid)['VmRSS']:.0f} MB")

    t0, cpu0 = now(), cpu_now(pid)
    ticker = asyncio.create_task(report_progress())
    try:
        await asyncio.gather(*(client() for _ in range(clients)))
    finally:
        ticker.cancel()
    seconds = now() - t0
    progress("")
    return {"made": made[0], "seconds": seconds, "cpu": cpu0, "cpu_after": cpu_now(pid), "ids": kept,
            "retried": retried[0]}


async def query(nc, settings: Settings, name: str, body: dict) -> dict:
    reply = json.loads((await nc.request(settings.query_subject(name), json.dumps(body).encode(), timeout=60)).data)
    if not reply["ok"]:
        raise RuntimeError(reply)
    return reply


async def event_log(urls: dict) -> tuple[int, int]:
    """The event stream's messages and last sequence (the service role may read its state)."""
    settings = bench_settings(urls)
    nc = await connect(settings)
    try:
        state = (await nc.jetstream(prefix=settings.js_api_prefix).stream_info(settings.stream_name)).state
        return state.messages, state.last_seq
    finally:
        await nc.close()


async def all_projected(nc, settings: Settings, urls: dict, most: float = 600) -> int:
    """Waits until the read models hold the whole log (a command retried after its deadline
    may have appended later than any reply said); the runs they hold. A read model stalled
    (an event it could not apply: the service tries it again) is waited for too."""
    last_seq = (await event_log(urls))[1]
    started = now()
    while True:
        await caught_up(nc, settings, last_seq)
        reply = await query(nc, settings, "CountFlowRuns", {"min_seq": last_seq})
        if "stalled" not in reply:
            return reply["result"]
        if now() - started > most:
            raise RuntimeError(f"read models still stalled after {most:.0f} s: {reply['stalled']}")
        progress(f"read models stalled: {reply['stalled']}")
        await asyncio.sleep(5)


async def timed(calls: list, concurrency: int = 1) -> list[float]:
    """Each awaitable factory called in turn (`concurrency` at a time); their round trips in ms."""
    latencies: list[float] = []
    pending = list(reversed(calls))

    async def worker() -> None:
        while pending:
            call = pending.pop()
            t = now()
            await call()
            latencies.append((now() - t) * 1000)

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return latencies


async def setup(cmd, deployments: int, pools: int, schedule: dict) -> list[str]:
    """A flow, `pools` work pools, and `deployments` deployments spread over them, each with
    one active `schedule`; the deployments' ids."""
    flow = (await cmd("CreateFlow", {"name": "history"}))["result"]
    for p in range(pools):
        await cmd("CreateWorkPool", {"name": f"pool-{p}", "type": "process"})
    ids: list[str] = [""] * deployments

    async def one(i: int) -> None:
        ids[i] = (await cmd("CreateDeployment", {
            "name": f"d{i}", "flow_id": flow["id"], "work_pool_name": f"pool-{i % pools}",
            "schedules": [{"schedule": schedule}]}))["result"]["id"]

    for start in range(0, deployments, 50):
        await asyncio.gather(*(one(i) for i in range(start, min(deployments, start + 50))))
    return ids


async def history(args, urls: dict) -> dict:
    settings = bench_settings(urls)
    client_settings = bench_settings(urls, role="client")
    out: dict = {}
    with contextlib.ExitStack() as first:
        proc, out["first_ready"] = first.enter_context(service(settings, args.roles))
        out["start"] = memory_mb(proc.pid)
        nc = await connect(client_settings)
        cmd = command_sender(nc, client_settings)
        deployment_ids = await setup(cmd, args.deployments, args.pools, MINUTELY_FROM_2030)
        bodies = [window_body(*w) for w in windows(args.runs, deployment_ids)]
        made = await schedule_all(cmd, bodies, args.clients, proc.pid, "scheduling",
                                  sample_every=max(1, args.runs // 20_000))
        out["made"] = {k: v for k, v in made.items() if k != "ids"}
        sample = made["ids"]
        t = now()
        out["count"] = await all_projected(nc, client_settings, urls)
        out["catch_up"] = now() - t
        if out["count"] != args.runs:  # said in the table; the memory is still worth measuring
            progress(f"{out['count']} runs in the read model once caught up, {args.runs} asked for, "
                     f"{made['made']} in the replies\n")
        out["idle_first"] = await until_idle(proc.pid)
        out["filled"] = memory_mb(proc.pid)
        traced_snapshot(proc)
        out["events"] = (await event_log(urls))[0]
        await nc.close()
        progress("restarting the service")

    with contextlib.ExitStack() as second:
        proc, out["ready"] = second.enter_context(service(settings, args.roles))
        out["at_ready"] = memory_mb(proc.pid)
        out["idle_wait"] = await until_idle(proc.pid)
        out["restarted"] = memory_mb(proc.pid)
        traced_snapshot(proc)
        nc = await connect(client_settings)
        cmd = command_sender(nc, client_settings)
        rng = random.Random(11)

        progress("workload: reads")
        read_ids = rng.sample(sample, min(args.reads, len(sample)))
        out["reads"] = await timed([lambda i=i: query(nc, client_settings, "GetFlowRun", {"id": i}) for i in read_ids])

        progress("workload: polls")
        out["polls"] = await timed([lambda p=p: query(nc, client_settings, "GetScheduledFlowRuns", {
            "work_pool_name": f"pool-{p % args.pools}", "limit": 10}) for p in range(args.polls)])

        progress("workload: transitions")
        were_read = set(read_ids)
        walked = [i for i in sample if i not in were_read][:args.walks]
        accepted = [0]

        async def walk(run_id: str) -> None:
            # Its date is years away (a PENDING proposed before it is told to WAIT): first
            # rescheduled to now, as an operator starting it early does.
            due = {"type": "SCHEDULED", "state_details": {"scheduled_time": datetime.now(UTC).isoformat()}}
            for state in (due, {"type": "PENDING"}, {"type": "RUNNING"}, {"type": "COMPLETED"}):
                reply = await cmd("SetFlowRunState", {"id": run_id, "state": state})
                if reply["orchestration"]["status"] != "ACCEPT":
                    raise RuntimeError(reply)
                accepted[0] += 1

        t = now()
        await timed([lambda i=i: walk(i) for i in walked], concurrency=args.clients)
        out["walk"] = {"runs": len(walked), "rate": accepted[0] / (now() - t)}

        firsts = [window_body(dep, 0, min(dates, args.again_dates))
                  for dep, first, dates in windows(args.runs, deployment_ids) if first == 0]
        again = await schedule_all(cmd, firsts, args.clients, proc.pid, "every deployment's first dates asked for again")
        out["again"] = {"made": again["made"], "seconds": again["seconds"], "commands": len(firsts),
                        "dates": sum(b["max_runs"] for b in firsts)}
        out["idle_after_wait"] = await until_idle(proc.pid)
        out["after_work"] = memory_mb(proc.pid)
        traced_snapshot(proc)
        await nc.close()
    progress("")
    return out


async def schedule_goal(args, urls: dict) -> dict:
    settings = bench_settings(urls)
    client_settings = bench_settings(urls, role="client")
    with service(settings, args.roles or "commands,queries,projections") as (proc, _):
        nc = await connect(client_settings)
        cmd = command_sender(nc, client_settings)
        ids = await setup(cmd, args.deployments, args.pools, {"interval": 60, "anchor_date": "2020-01-01T00:00:00Z"})
        start = datetime.now(UTC).replace(second=0, microsecond=0) + timedelta(days=1)
        bodies = [{"deployment_id": d, "start_time": start.isoformat(), "min_runs": args.runs_per_deployment,
                   "max_runs": args.runs_per_deployment} for d in ids]
        made = await schedule_all(cmd, bodies, args.clients, proc.pid, "scheduling")
        count = await all_projected(nc, client_settings, urls)
        again = await schedule_all(cmd, bodies, args.clients, proc.pid, "the same again")
        rss = memory_mb(proc.pid)
        await nc.close()
    progress("")
    return {"made": made, "distinct": len(set(made["ids"])), "count": count, "again": again["made"], "rss": rss}


def mb(m: dict[str, float]) -> str:
    return f"{m['VmRSS']:.0f} MB (peak so far {m['VmHWM']:.0f} MB)"


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--runs", type=int, default=1_000_000)
    p.add_argument("--deployments", type=int, default=1_000)
    p.add_argument("--pools", type=int, default=10)
    p.add_argument("--clients", type=int, default=8)
    p.add_argument("--roles", default=None,
                   help=f"the service's roles (default: every one, {','.join(ROLES)}; schedule-goal: "
                        "commands,queries,projections)")
    p.add_argument("--reads", type=int, default=3_000, help="GetFlowRun after the restart")
    p.add_argument("--polls", type=int, default=300, help="GetScheduledFlowRuns after the restart")
    p.add_argument("--walks", type=int, default=1_000, help="runs walked to COMPLETED after the restart")
    p.add_argument("--again-dates", type=int, default=25,
                   help="after the restart, every deployment's first dates asked for again")
    p.add_argument("--runs-per-deployment", type=int, default=100, help="schedule-goal only")
    p.add_argument("--only", default="history", choices=["history", "schedule-goal"])
    args = p.parse_args()
    with servers() as urls:
        if args.only == "schedule-goal":
            r = asyncio.run(schedule_goal(args, urls))
            m, count = r["made"], r["count"]
            report("The scheduler's goal (bench/history_memory.py --only schedule-goal)", [
                (f"schedule {args.deployments:,} deployments x {args.runs_per_deployment} runs, {args.clients} clients",
                 f"{count / m['seconds']:,.0f} runs/s ({count:,} runs in {m['seconds']:.1f} s; "
                 f"{m['retried']} commands retried)", ">= 10,000 runs/s"),
                ("  CPU per run scheduled: " + CPU_KINDS, cpu_cells(cpu_per(m["cpu"], m["cpu_after"], count)), ""),
                ("  run ids in the replies, distinct ones among them / runs in the read model",
                 f"{m['made']:,}, {r['distinct']:,} / {count:,}",
                 f"{args.deployments * args.runs_per_deployment:,} each"),
                ("  runs made by asking every deployment again", f"{r['again']}", "0"),
                ("service RSS after", mb(r["rss"]), ""),
            ])
            return
        r = asyncio.run(history(args, urls))
    made, reads, polls = r["made"], r["reads"], r["polls"]
    report(f"A million runs in history (bench/history_memory.py --runs {args.runs})", [
        ("service started (empty), ready in", f"{r['first_ready']:.1f} s, RSS {mb(r['start'])}", ""),
        (f"runs made by ScheduleDeploymentRuns, {args.deployments:,} deployments, {args.clients} clients",
         f"{r['count']:,} in {made['seconds']:.0f} s: {r['count'] / made['seconds']:,.0f} runs/s "
         f"({made['retried']} commands retried)", ">= 10,000 runs/s"),
        ("  CPU per run scheduled: " + CPU_KINDS, cpu_cells(cpu_per(made["cpu"], made["cpu_after"], r["count"])), ""),
        ("  read models caught up after the last command, in", f"{r['catch_up']:.1f} s", ""),
        ("runs in the read model (CountFlowRuns) / events in the log", f"{r['count']:,} / {r['events']:,}",
         f"{args.runs:,} runs"),
        ("1. service RSS, all runs made and projected, idle", mb(r["filled"]), "<= 500 MB"),
        ("2. restarted: from start to ready", f"{r['ready']:.1f} s", ""),
        ("   RSS at ready / once idle", f"{r['at_ready']['VmRSS']:.0f} MB / {mb(r['restarted'])} "
                                       f"(idle after {r['idle_wait']:.0f} s)", "<= 500 MB"),
        (f"3. after the workload: {len(reads):,} GetFlowRun, p50 / p99",
         f"{percentile(reads, 50):.2f} / {percentile(reads, 99):.2f} ms", ""),
        (f"   {len(polls)} GetScheduledFlowRuns (limit 10) over {args.pools} pools, p50 / p99",
         f"{percentile(polls, 50):.2f} / {percentile(polls, 99):.2f} ms", ""),
        (f"   {r['walk']['runs']:,} runs rescheduled to now, then walked PENDING -> RUNNING -> COMPLETED, {args.clients} clients",
         f"{r['walk']['rate']:,.0f} transitions/s", ""),
        (f"   every deployment's first {args.again_dates} dates asked for again ({r['again']['commands']:,} commands: "
         f"their indexes and {r['again']['dates']:,} runs read)",
         f"{r['again']['made']} runs made, in {r['again']['seconds']:.0f} s", "0"),
        ("   service RSS once idle", mb(r["after_work"]), "<= 500 MB"),
    ])


if __name__ == "__main__":
    main()
