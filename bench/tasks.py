"""Task runs end to end: one `runledger serve` process, task workers as `runledger task-worker`
processes (4 by default), submitters through the client, every state recorded.

    python bench/tasks.py [--only latency,throughput,throughput-map,chain,tag-handoff,faults,worker-kill,commands]
                          [--workers 4] [--rate 200] [--seconds 10] [--tasks 20000]
                          [--worker-kind native|faststream]

- latency: submit → the task function starts, at `--rate` tasks/s offered (p50, p99);
- throughput: `--tasks` trivial tasks submitted by 8 clients and run by the workers, from the
  first submit to the last COMPLETED; throughput-map: the same, submitted 100 per request
  (`submit_tasks`, what `Task.map` sends);
- chain: 40 steps of 10 ms, each submitted by the step before, the driver awaiting each;
- tag-handoff: 40 runs of 20 ms under a tag limited to 1, submitted at once: how long a slot
  given back sits idle before the next waiting run starts;
- faults: 1,000 tasks of 50 ms; the NATS server restarted, then killed (-9) and restarted,
  in the middle: runs lost and runs started twice (from the workers' own records);
- worker-kill: a worker killed (-9) mid-task: how long until another worker starts it;
- commands: task-run creates (one per command, and 100 per `CreateTaskRuns`) and state
  transitions through commands, 8 clients.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

from harness import (
    bench_settings,
    command_sender,
    cpu_by_kind,
    cpu_seconds,
    now,
    percentile,
    report,
    role_env,
    servers,
    service_process,
    stored_messages,
)

from runledger.client import RunledgerClient
from runledger.client.tasks import submit_task, submit_tasks, wait_for_task_run
from runledger.infra.embedded import RestartableNats
from runledger.infra.settings import Settings

HERE = Path(__file__).resolve().parent


class Workers:
    """`runledger task-worker` processes serving the bench's task keys, each recording its calls."""

    def __init__(self, settings: Settings, out: Path, count: int, limit: int, keys: list[str],
                 kind: str = "native"):
        self.settings, self.out, self.count, self.limit, self.keys = settings, out, count, limit, keys
        self.kind = kind  # native: `runledger task-worker`; faststream: bench/faststream_worker.py
        self.procs: list[subprocess.Popen] = []

    def start_one(self, name: str) -> subprocess.Popen:
        env = dict(os.environ, RUNLEDGER_NATS_URL=self.settings.nats_url, RUNLEDGER_NAMESPACE=self.settings.namespace,
                   RUNLEDGER_DATABASE_URL=self.settings.database_url.get_secret_value(),
                   RL_BENCH_OUT=str(self.out), PYTHONPATH=str(HERE), **role_env(self.settings))
        if self.kind == "faststream":
            args = [sys.executable, str(HERE / "faststream_worker.py"), "--limit", str(self.limit), "--worker-id", name]
        else:
            exe = Path(sys.executable).parent / "runledger"
            args = [str(exe), "task-worker", "--module", "task_functions", "--limit", str(self.limit),
                    "--worker-id", name, "--grace", "5"]
        for key in self.keys:
            args += ["--key", key]
        proc = subprocess.Popen(args, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        for line in proc.stderr:  # type: ignore[union-attr]
            if "serving" in line:
                break
        else:
            raise RuntimeError(f"task worker exited with {proc.wait()}")
        subprocess.Popen(["cat"], stdin=proc.stderr, stdout=subprocess.DEVNULL)
        self.procs.append(proc)
        return proc

    def __enter__(self) -> Workers:
        for i in range(self.count):
            self.start_one(f"bench-{i}")
        return self

    def __exit__(self, *_: object) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in self.procs:
            try:
                p.wait(20)
            except subprocess.TimeoutExpired:
                p.kill()

    def records(self) -> list[list[str]]:
        lines: list[list[str]] = []
        for f in self.out.glob("*.log"):
            lines += [line.split() for line in f.read_text().splitlines() if line.strip()]
        return lines


async def _until(predicate, seconds: float, every: float = 0.05) -> None:
    deadline = time.monotonic() + seconds
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError("the bench waited too long")
        await asyncio.sleep(every)


async def latency(client: RunledgerClient, workers: Workers, rate: float, seconds: float) -> list[tuple]:
    count = int(rate * seconds)
    gap = 1.0 / rate
    start = time.monotonic()
    pending: set[asyncio.Task] = set()
    submitted: list[tuple[str, float, uuid.UUID]] = []  # label, sent, run id

    async def submit(label: str) -> None:
        sent = time.time()
        run = await submit_task(client, "bench.trivial", {"label": label, "sent": sent})
        submitted.append((label, sent, run.id))

    for i in range(count):
        delay = start + i * gap - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)
        t = asyncio.create_task(submit(f"l{i}"))
        pending.add(t)
        t.add_done_callback(pending.discard)
    await asyncio.gather(*pending)
    await _until(lambda: sum(1 for r in workers.records() if r[1].startswith("l")) >= count, 60, 0.2)
    waits = [float(r[2]) * 1000 for r in workers.records() if r[0] == "start" and r[1].startswith("l")]
    # Where the time goes, from the service's own timestamps of the states (each taken as the
    # decision is made) and the function's start (one clock: the same machine).
    waited = {r[1]: float(r[2]) for r in workers.records() if r[0] == "start"}
    stages: list[list[float]] = [[], [], []]
    for label, sent, run_id in submitted[-100:]:
        states = {s.type: s.timestamp.timestamp() for s in await client.read_task_run_states(run_id)}
        if "SCHEDULED" in states and "RUNNING" in states and label in waited:
            for i, gap_s in enumerate((states["SCHEDULED"] - sent, states["RUNNING"] - states["SCHEDULED"],
                                       sent + waited[label] - states["RUNNING"])):
                stages[i].append(gap_s * 1000)

    def median_ms(values: list[float]) -> str:
        return f"{statistics.median(values):.2f} ms" if values else "n/a"

    return [("submit → task starts, p50", f"{percentile(waits, 50):.2f} ms", "≤ 1 ms"),
            ("submit → task starts, p99", f"{percentile(waits, 99):.2f} ms", "≤ 3 ms"),
            ("offered", f"{rate:g} tasks/s for {seconds:g} s ({count} tasks)", ""),
            ("  submit → SCHEDULED decided: the request, its parsing, the decision", median_ms(stages[0]), ""),
            ("  SCHEDULED decided → RUNNING decided: the create's append and the run's message on its "
             "key (side by side), the delivery to a worker, its start request", median_ms(stages[1]), ""),
            ("  RUNNING decided → the function starts: the append, the reply, the call", median_ms(stages[2]), "")]


async def _completed_once_settled(client: RunledgerClient) -> int:
    """The trivial runs COMPLETED, counted once none of an earlier phase is still finishing."""
    deadline = now() + 60
    while True:
        completed = await client.count_task_runs(task_keys=["bench.trivial"], state_types=["COMPLETED"])
        if completed >= await client.count_task_runs(task_keys=["bench.trivial"]) or now() > deadline:
            return completed
        await asyncio.sleep(0.05)


async def throughput(client: RunledgerClient, workers: Workers, tasks: int, service_pids: list[int],
                     submitters: int = 8, bulk: int = 1, urls: dict | None = None) -> list[tuple]:
    before = sum(1 for r in workers.records() if r[1].startswith("t"))
    completed0 = await _completed_once_settled(client)
    stored0 = stored_messages(urls or {})
    cpu0 = sum(cpu_seconds(pid) for pid in service_pids)
    workers_cpu0 = sum(cpu_seconds(p.pid) for p in workers.procs)
    others0 = cpu_by_kind()
    t0 = now()
    per = tasks // submitters

    async def submitter(c: int) -> None:
        if bulk > 1:  # `submit_tasks` (what `Task.map` sends): `bulk` runs per request
            for start in range(0, per, bulk):
                await submit_tasks(client, "bench.trivial", [{"label": f"t{c}-{i}", "sent": time.time()}
                                                             for i in range(start, min(per, start + bulk))],
                                   queue_wait_seconds=30)
            return
        for i in range(per):
            await submit_task(client, "bench.trivial", {"label": f"t{c}-{i}", "sent": time.time()},
                              queue_wait_seconds=30)

    await asyncio.gather(*(submitter(c) for c in range(submitters)))
    submitted = now() - t0
    done = per * submitters
    await _until(lambda: sum(1 for r in workers.records() if r[1].startswith("t")) - before >= done, 300, 0.2)
    # Every one's COMPLETED recorded, as the read model shows it (the last ones follow their starts).
    while await client.count_task_runs(task_keys=["bench.trivial"], state_types=["COMPLETED"]) < completed0 + done:
        if now() - t0 > 300:
            raise TimeoutError("the bench waited too long for the runs' COMPLETED states")
        await asyncio.sleep(0.02)
    total = now() - t0
    cpu = sum(cpu_seconds(pid) for pid in service_pids) - cpu0
    workers_cpu = sum(cpu_seconds(p.pid) for p in workers.procs) - workers_cpu0
    others = {kind: used - others0[kind] for kind, used in cpu_by_kind().items()}
    stored = stored_messages(urls or {})
    how = f"{submitters} submitters" + (f", {bulk} runs per request (`Task.map`)" if bulk > 1 else "")
    return [(f"end to end, trivial tasks, every state recorded, {how}",
             f"{done / total:,.0f} tasks/s ({done} tasks in {total:.1f} s; submits alone {done / submitted:,.0f}/s)",
             "≥ 5,000 tasks/s"),
            ("service CPU per task", f"{cpu / done * 1e6:.0f} µs", ""),
            (f"task workers' CPU per task ({workers.kind})", f"{workers_cpu / done * 1e6:.0f} µs", ""),
            ("nats-server's CPU per task", f"{others['nats-server'] / done * 1e6:.0f} µs", ""),
            ("Postgres' CPU per task", f"{others['postgres'] / done * 1e6:.0f} µs", ""),
            *([("messages the broker stored per task (the log and the task queues)",
                f"{(stored - stored0) / done:.2f}", "")] if stored is not None and stored0 is not None else [])]


async def chain(client: RunledgerClient, workers: Workers, steps: int = 40, work: float = 0.010) -> list[tuple]:
    per_step: list[float] = []
    ids: list[uuid.UUID] = []
    label = ""
    for _ in range(3):
        t0 = time.time()
        label = uuid.uuid4().hex[:8]
        run = await submit_task(client, "bench.chain", {"step": 0, "steps": steps, "work": work, "label": label})
        run_id = run.id
        ids = []
        for _ in range(steps):
            ids.append(run_id)
            done = await wait_for_task_run(client, run_id, timeout=60)
            data = done.state.data if done.state is not None else None
            nxt = data.get("value") if isinstance(data, dict) else None
            if nxt is None:
                break
            run_id = uuid.UUID(nxt)
        # From the submission of the first step to the last step's COMPLETED as the service
        # recorded it (the driver follows the chain run by run, behind it, to learn the ids).
        last = {s.type: s.timestamp.timestamp() for s in await client.read_task_run_states(ids[-1])}
        per_step.append((last["COMPLETED"] - t0) / steps * 1000)
    # Where a step's time goes, from the service's own timestamps of the last chain's states and
    # the function's own records (one clock: the same machine).
    states = [{s.type: s.timestamp.timestamp() for s in await client.read_task_run_states(run_id)} for run_id in ids]
    seen: dict[str, dict[int, float]] = {"cstart": {}, "cwork": {}, "csubmitted": {}}
    for record in workers.records():
        if record[0] in seen and record[1] == label:
            seen[record[0]][int(record[2])] = float(record[3])

    def median_ms(pairs: list[float]) -> str:
        return f"{statistics.median(pairs) * 1000:.1f} ms" if pairs else "n/a"

    def gaps(before, after) -> list[float]:
        out = []
        for i in range(len(states)):
            a, b = before(i), after(i)
            if a is not None and b is not None:
                out.append(b - a)
        return out

    state = lambda kind, i: states[i].get(kind) if 0 <= i < len(states) else None  # noqa: E731
    return [(f"chain of {steps} tasks of {work * 1000:g} ms, per step", f"{min(per_step):.1f} ms (of 3: "
             f"{', '.join(f'{x:.1f}' for x in per_step)})", "≤ 12 ms"),
            ("chain step: queued (SCHEDULED decided) → RUNNING decided: the create's append, the publish on "
             "the key, the delivery, the start's request",
             median_ms(gaps(lambda i: state("SCHEDULED", i), lambda i: state("RUNNING", i))), ""),
            ("chain step: RUNNING decided → the function starts: its append, the reply, the call",
             median_ms(gaps(lambda i: state("RUNNING", i), lambda i: seen["cstart"].get(i))), ""),
            ("chain step: the function's work (asyncio.sleep)",
             median_ms(gaps(lambda i: seen["cstart"].get(i), lambda i: seen["cwork"].get(i))), ""),
            ("chain step: work done → the next step's create decided: the request",
             median_ms(gaps(lambda i: seen["cwork"].get(i), lambda i: state("SCHEDULED", i + 1))), ""),
            ("chain step: the next step's create decided → its submitter answered",
             median_ms(gaps(lambda i: state("SCHEDULED", i + 1), lambda i: seen["csubmitted"].get(i))), "")]


async def tag_handoff(client: RunledgerClient, runs: int = 40, work: float = 0.02) -> list[tuple]:
    """A tag limited to one run at a time and `runs` tasks carrying it, submitted at once to the
    workers: each one waits until the one before gives the slot back. From the service's own
    timestamps: the holder's COMPLETED → the next run's RUNNING, i.e. how long a freed slot
    sits idle (a waiting run used to try again only after its WAIT's 10 s)."""
    tag = f"bench-{uuid.uuid4().hex[:6]}"
    await client.create_tag_concurrency_limit(tag, 1)
    t0 = time.time()
    ids = [(await submit_task(client, "bench.tagged", {"seconds": work}, tags=[tag])).id for _ in range(runs)]
    for run_id in ids:
        await wait_for_task_run(client, run_id, timeout=runs * 15)
    elapsed = time.time() - t0
    spans = []
    for run_id in ids:
        times = {s.type: s.timestamp.timestamp() for s in await client.read_task_run_states(run_id)}
        spans.append((times["RUNNING"], times["COMPLETED"]))
    spans.sort()
    gaps = sorted((nxt[0] - prev[1]) * 1000 for prev, nxt in zip(spans, spans[1:], strict=False))
    p50, p99 = gaps[len(gaps) // 2], gaps[min(len(gaps) - 1, int(len(gaps) * 0.99))]
    return [(f"a freed tag slot → the next waiting task run's RUNNING, tag limit 1, {runs} runs of "
             f"{work * 1000:g} ms at once, p50 / p99 / max", f"{p50:.1f} / {p99:.1f} / {gaps[-1]:.1f} ms", ""),
            ("  the same runs, first submit → last COMPLETED", f"{elapsed:.2f} s", "")]


async def faults(urls: dict, workers_count: int, tasks: int = 1000, work: float = 0.05) -> list[tuple]:
    """The broker restarted and killed while tasks flow; its own server, so it can be killed."""
    tmp = Path(tempfile.mkdtemp(prefix="rlbf-"))
    nats = RestartableNats(tmp / "nats")
    nats.start()
    settings = Settings(nats_url=nats.url, database_url=urls["database_url"],
                        namespace=f"f{uuid.uuid4().hex[:10]}")
    out = tmp / "out"
    out.mkdir()
    rows = []
    try:
        with service_process(settings, roles="commands,queries,projections,task_recovery"), \
                Workers(settings, out, workers_count, 16, ["bench.sleepy"]) as workers:
            client = await RunledgerClient(settings, retries=20, retry_backoff=0.2).connect()
            ids: list[uuid.UUID] = []

            async def submit(i: int) -> None:
                while True:
                    try:
                        run = await submit_task(client, "bench.sleepy", {"label": f"f{i}", "seconds": work},
                                                dynamic_key=f"f{i}", queue_wait_seconds=30)
                        ids.append(run.id)
                        return
                    except Exception:
                        await asyncio.sleep(0.2)

            async def submitter() -> None:
                for i in range(tasks):
                    await submit(i)

            submitting = asyncio.create_task(submitter())
            await _until(lambda: len(workers.records()) >= tasks // 4, 120)
            nats.stop(signal.SIGTERM)  # a restart
            nats.start()
            await _until(lambda: len(workers.records()) >= tasks // 2, 120)
            nats.stop(signal.SIGKILL)  # a crash
            nats.start()
            await submitting
            await _until(lambda: len({r[1] for r in workers.records()}) >= tasks, 300, 0.2)
            await asyncio.sleep(2 * settings.task_ack_wait_seconds + 1)  # any late second start would show by now
            labels = [r[1] for r in workers.records()]
            twice = len(labels) - len(set(labels))
            lost = tasks - len(set(labels))
            await client.close()
        rows = [(f"broker restart and kill -9 amid {tasks} tasks of {work * 1000:g} ms",
                 f"{lost} lost, {twice} run twice", "0 lost, 0 run twice")]
    finally:
        nats.stop(signal.SIGKILL)
        shutil.rmtree(tmp, ignore_errors=True)
    return rows


async def worker_kill(client: RunledgerClient, settings: Settings, out: Path) -> list[tuple]:
    """One worker takes a long task and is killed; a second, already serving, takes it over.
    Measured once the service has been connected for longer than its takeover grace: right after
    it (re)connects, it holds takeovers back for that long (a broker restart brings every
    worker's messages back at once, while their workers still hold them)."""
    from runledger.commands.task_run_rules import TAKEOVER_GRACE_SECONDS

    await asyncio.sleep(TAKEOVER_GRACE_SECONDS)
    moved = []
    for attempt in range(3):
        sub = out / f"kill{attempt}"
        sub.mkdir()
        with Workers(settings, sub, 0, 4, ["bench.sleepy"]) as workers:
            doomed = workers.start_one(f"doomed-{attempt}")
            run = await submit_task(client, "bench.sleepy", {"label": f"k{attempt}", "seconds": 3600})
            await _until(lambda: bool(workers.records()), 30)
            heir = workers.start_one(f"heir-{attempt}")
            doomed.send_signal(signal.SIGKILL)
            killed = time.time()
            doomed.wait()
            await _until(lambda: len(workers.records()) >= 2, 60)
            started_again = max(float(r[2]) for r in workers.records())
            moved.append(started_again - killed)
            heir.send_signal(signal.SIGKILL)  # its copy would run for an hour
            heir.wait()
            with contextlib.suppress(Exception):
                await client.command("SetTaskRunState", {"id": str(run.id), "force": True,
                                                         "state": {"type": "CANCELLED"}})
    return [("a worker killed mid-task: its task starts elsewhere after",
             f"{max(moved):.1f} s (of 3: {', '.join(f'{m:.1f}' for m in moved)})", "≤ 5 s")]


async def commands(nc, settings: Settings, seconds: float) -> list[tuple]:
    cmd = command_sender(nc, settings)
    stop_at = now() + seconds
    made: list[list[str]] = [[] for _ in range(8)]

    async def creator(c: int) -> None:
        i = 0
        while now() < stop_at:
            out = await cmd("CreateTaskRun", {"task_key": "bench.create", "dynamic_key": f"{c}-{i}"})
            made[c].append(out["result"]["id"])
            i += 1

    await asyncio.gather(*(creator(c) for c in range(8)))
    creates = sum(len(m) for m in made) / seconds
    stop_at = now() + seconds
    in_bulk: list[list[str]] = [[] for _ in range(8)]

    async def bulk_creator(c: int) -> None:
        i = 0
        while now() < stop_at:
            out = await cmd("CreateTaskRuns", {"task_runs": [{"task_key": "bench.create", "dynamic_key": f"b{c}-{i + j}"}
                                                             for j in range(100)]})
            in_bulk[c] += [r["result"]["id"] for r in out["result"] if r["ok"]]
            i += 100

    await asyncio.gather(*(bulk_creator(c) for c in range(8)))
    bulk_creates = sum(map(len, in_bulk)) / seconds
    stop_at = now() + seconds
    moves = [0] * 8

    async def mover(c: int) -> None:
        cycle = ("RUNNING", "COMPLETED")
        for run_id in made[c]:
            for state in cycle:
                if now() >= stop_at:
                    return
                await cmd("SetTaskRunState", {"id": run_id, "state": {"type": state}})
                moves[c] += 1

    await asyncio.gather(*(mover(c) for c in range(8)))
    stop_at = now() + seconds
    bulk_moves = [0] * 8

    async def bulk_mover(c: int) -> None:
        """What a busy task worker sends: many runs' states in one `SetTaskRunStates`."""
        for start in range(0, len(in_bulk[c]), 100):
            for state in ("RUNNING", "COMPLETED"):
                if now() >= stop_at:
                    return
                out = await cmd("SetTaskRunStates", {"states": [{"id": run_id, "state": {"type": state}}
                                                                for run_id in in_bulk[c][start:start + 100]]})
                bulk_moves[c] += sum(1 for r in out["result"] if r["ok"])

    await asyncio.gather(*(bulk_mover(c) for c in range(8)))
    return [("task-run creates through commands, 8 clients", f"{creates:,.0f}/s", "≥ 5,000/s"),
            ("task-run creates, 100 per `CreateTaskRuns`, 8 clients", f"{bulk_creates:,.0f}/s", ""),
            ("task-run state transitions, 8 clients", f"{sum(moves) / seconds:,.0f}/s", "≥ 3,000/s"),
            ("task-run state transitions, 100 per `SetTaskRunStates`, 8 clients",
             f"{sum(bulk_moves) / seconds:,.0f}/s", "")]


async def run(args) -> list[tuple]:
    only = set(args.only.split(","))
    rows: list[tuple] = []
    with servers() as urls:
        settings = bench_settings(urls)
        worker_settings = bench_settings(urls, role="task_worker")
        out = Path(tempfile.mkdtemp(prefix="rlbt-"))
        try:
            with contextlib.ExitStack() as processes:
                # --split: the projections in a process of their own, beside the commands and queries.
                pids = [processes.enter_context(service_process(settings, roles)).pid
                        for roles in (("commands,queries", "projections") if args.split
                                      else ("commands,queries,projections",))]
                client = await RunledgerClient(bench_settings(urls, role="client")).connect()
                if only & {"latency", "throughput", "throughput-map", "chain", "tag-handoff"}:
                    with Workers(worker_settings, out, args.workers, args.limit,
                                 ["bench.trivial", "bench.chain", "bench.tagged"], kind=args.worker_kind) as workers:
                        if "latency" in only:
                            rows += await latency(client, workers, args.rate, args.seconds)
                        if "throughput" in only:
                            rows += await throughput(client, workers, args.tasks, pids, args.submitters, urls=urls)
                        if "throughput-map" in only:
                            rows += await throughput(client, workers, args.tasks, pids, args.submitters, bulk=100, urls=urls)
                        if "chain" in only:
                            rows += await chain(client, workers)
                        if "tag-handoff" in only:
                            rows += await tag_handoff(client, args.tagged)
                if "worker-kill" in only:
                    rows += await worker_kill(client, worker_settings, out)
                if "commands" in only:
                    rows += await commands(client._nc, settings, args.seconds)
                await client.close()
            if "faults" in only:
                rows += await faults(urls, args.workers)
        finally:
            shutil.rmtree(out, ignore_errors=True)
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--only", default="latency,throughput,throughput-map,chain,tag-handoff,faults,worker-kill,commands")
    p.add_argument("--workers", type=int, default=4)
    p.add_argument("--limit", type=int, default=16, help="task runs each worker runs at once")
    p.add_argument("--rate", type=float, default=200.0)
    p.add_argument("--seconds", type=float, default=10.0)
    p.add_argument("--tasks", type=int, default=20_000)
    p.add_argument("--tagged", type=int, default=40, help="runs in the tag-handoff figure")
    p.add_argument("--submitters", type=int, default=8, help="concurrent submitters in the throughput figure")
    p.add_argument("--worker-kind", choices=("native", "faststream"), default="native",
                   help="workers as `runledger task-worker` processes, or as FastStream apps")
    p.add_argument("--split", action="store_true",
                   help="run the projections in a service process of their own (--roles projections)")
    p.add_argument("--json")
    args = p.parse_args()
    rows = asyncio.run(run(args))
    report(f"Task runs (bench/tasks.py, {args.worker_kind} workers)", rows)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
