"""Flow runs through the whole path, against one `runledger serve` process: runs created from a
deployment, state transitions Scheduled -> Pending -> Running -> Completed, and a deployment's
schedule turned into runs.

    python bench/runs.py [--clients 8] [--seconds 10] [--deployments 100] [--runs-per-deployment 100]
                         [--only create,transitions,handoffs,schedule] [--split [none|two]]

(`--only transitions` still creates the runs it walks; with RUNLEDGER_BENCH_PROFILE set, the
profile then covers the creates too.)

The transitions run in a pool, queue and deployment that all have limits (large enough never
to refuse), so each claim and each release is decided against the pool's slot counts and the
deployment's limit and appended with them.

Then a slot's release to the next waiting run's claim: a deployment with a limit of 1, one run
holding the slot and one sent to wait (`AwaitingConcurrencySlot`); the holder completes, which
wakes the waiter in the same batch, and a claimer that proposes PENDING as soon as the release
is acknowledged gets it. Timed from sending the release to the claim's ACCEPT.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import os

from harness import (
    bench_settings,
    command_sender,
    cpu_by_kind,
    cpu_seconds,
    now,
    percentile,
    report,
    rss_mb,
    servers,
    service_process,
    stored_messages,
)

from runledger.infra.nats_connection import connect

# The service processes started (their `--roles`): one for all (default); `--split`: the
# projections in a second; `--split none`: no projection at all (what the commands cost alone);
# `--split two`: a second process taking commands beside the first (the CPU printed is the
# first's).
LAYOUTS = {None: ("commands,queries,projections",), "yes": ("commands,queries", "projections"),
           "two": ("commands,queries,projections", "commands,queries"),
           "none": ("commands,queries",)}


async def caught_up(nc, settings, seq: int) -> None:
    """Waits until every read model holds the log up to `seq` (a query's `min_seq` waits for
    all of them; each wait is bounded by the service, so it is asked again)."""
    while True:
        reply = await nc.request(settings.query_subject("CountFlowRuns"), json.dumps({"min_seq": seq}).encode(),
                                 timeout=30)
        if json.loads(reply.data)["ok"]:
            return


def cpu_now(pid: int) -> dict[str, float]:
    """CPU seconds so far of the service, nats-server, Postgres and this load generator."""
    own = os.times()
    return {"service": cpu_seconds(pid), **cpu_by_kind(), "clients": own.user + own.system}


def cpu_per(before: dict[str, float], after: dict[str, float], count: int) -> dict[str, float]:
    """Each process kind's CPU per operation, in µs."""
    return {kind: (after[kind] - before[kind]) / max(count, 1) * 1e6 for kind in before}


def messages_per(before: int | None, after: int | None, count: int) -> float | None:
    """Messages the broker stored per operation (every stream), where it can be asked."""
    return None if before is None or after is None else (after - before) / max(count, 1)


async def run(args) -> dict:
    with servers() as urls:
        settings = bench_settings(urls)
        with contextlib.ExitStack() as processes:
            # The CPU and RSS figures are the first process's: the one that decides commands.
            proc = [processes.enter_context(service_process(settings, roles)) for roles in LAYOUTS[args.split]][0]
            nc = await connect(bench_settings(urls, role="client"))

            cmd = command_sender(nc, settings)

            flow = (await cmd("CreateFlow", {"name": "bench"}))["result"]
            await cmd("CreateWorkPool", {"name": "pool", "type": "process", "concurrency_limit": 1_000_000})
            await cmd("CreateWorkQueue", {"work_pool_name": "pool", "name": "q", "concurrency_limit": 1_000_000})
            deployment = (await cmd("CreateDeployment", {
                "name": "d", "flow_id": flow["id"], "work_pool_name": "pool", "work_queue_name": "q",
                "concurrency_limit": 1_000_000, "parameters": {"x": 1}}))["result"]

            out: dict = {}
            only = set(args.only.split(","))
            # 1. Runs from a deployment, each client one request at a time.
            stop_at = now() + (args.seconds if only & {"create", "transitions"} else 0)
            made: list[list[str]] = [[] for _ in range(args.clients)]
            latencies: list[float] = []

            async def creator(c: int) -> None:
                while now() < stop_at:
                    t = now()
                    out = await cmd("CreateFlowRunFromDeployment", {"deployment_id": deployment["id"],
                                                                    "parameters": {"c": c}})
                    latencies.append((now() - t) * 1000)
                    made[c].append(out["result"]["id"])

            t0, cpu0, stored0 = now(), cpu_now(proc.pid), stored_messages(urls)
            await asyncio.gather(*(creator(c) for c in range(args.clients)))
            created = sum(map(len, made))
            if "create" in only:
                out.update(create_rate=created / (now() - t0), created=created,
                           create_cpu=cpu_per(cpu0, cpu_now(proc.pid), created),
                           create_messages=messages_per(stored0, stored_messages(urls), created),
                           create_p50=percentile(latencies, 50), create_p99=percentile(latencies, 99))

            # 2. Transitions: each client walks its own runs Scheduled -> Pending -> Running -> Completed.
            stop_at = now() + (args.seconds if "transitions" in only else 0)
            transitions = [0] * args.clients

            async def walker(c: int) -> None:
                for run_id in itertools.cycle(made[c]) if made[c] else ():
                    for state in ("PENDING", "RUNNING", "COMPLETED"):
                        if now() >= stop_at:
                            return
                        out = await cmd("SetFlowRunState", {"id": run_id, "state": {"type": state}, "force": False})
                        if out["orchestration"]["status"] != "ACCEPT":
                            break  # a run walked already (cycle): the rules refuse it; next one
                        transitions[c] += 1
                    else:
                        continue

            t0, cpu0, stored0 = now(), cpu_now(proc.pid), stored_messages(urls)
            await asyncio.gather(*(walker(c) for c in range(args.clients)))
            moved = sum(transitions)
            if "transitions" in only:
                out.update(transition_rate=moved / (now() - t0), transitions=moved,
                           transition_cpu=cpu_per(cpu0, cpu_now(proc.pid), moved),
                           transition_messages=messages_per(stored0, stored_messages(urls), moved))

            # 3. A release to the next waiter's claim, once the read models have caught up with
            # what came before (so that the figure is the handoff's, not that of a backlog's
            # projection beside it).
            made_limited = await cmd("CreateDeployment", {"name": "one-at-a-time", "flow_id": flow["id"],
                                                          "work_pool_name": "pool", "concurrency_limit": 1})
            limited = made_limited["result"]
            if "handoffs" in only and args.split != "none":
                await caught_up(nc, settings, made_limited["seq"])
            handoffs: list[float] = []
            after_release: list[float] = []  # from the release's acknowledgement

            async def new_run() -> str:
                out = await cmd("CreateFlowRunFromDeployment", {"deployment_id": limited["id"]})
                return out["result"]["id"]

            holder = await new_run()
            await cmd("SetFlowRunState", {"id": holder, "state": {"type": "PENDING"}})
            for _ in range(args.handoffs if "handoffs" in only else 0):
                waiter = await new_run()
                sent = await cmd("SetFlowRunState", {"id": waiter, "state": {"type": "PENDING"}})
                assert sent["result"]["name"] == "AwaitingConcurrencySlot", sent
                t = now()
                await cmd("SetFlowRunState", {"id": holder, "state": {"type": "COMPLETED"}, "force": True})
                released = now()
                claim = await cmd("SetFlowRunState", {"id": waiter, "state": {"type": "PENDING"}})
                if claim["orchestration"]["status"] == "ACCEPT":
                    handoffs.append((now() - t) * 1000)
                    after_release.append((now() - released) * 1000)
                holder = waiter
            if "handoffs" in only:
                out.update(handoff_p50=percentile(handoffs, 50), handoff_p99=percentile(handoffs, 99),
                           handoffs=len(handoffs), acked_p50=percentile(after_release, 50),
                           acked_p99=percentile(after_release, 99))

            # 4. The schedule: deployments x runs, scheduled by 8 clients side by side.
            ids = []
            for i in range(args.deployments if "schedule" in only else 0):
                ids.append((await cmd("CreateDeployment", {
                    "name": f"s{i}", "flow_id": flow["id"],
                    "schedules": [{"schedule": {"interval": 60, "anchor_date": "2020-01-01T00:00:00Z"}}]}))["result"]["id"])
            queue = list(ids)
            scheduled = [0]

            async def scheduler() -> None:
                while queue:
                    dep = queue.pop()
                    out = await cmd("ScheduleDeploymentRuns", {"deployment_id": dep, "min_runs": args.runs_per_deployment,
                                                               "max_runs": args.runs_per_deployment})
                    scheduled[0] += len(out["result"]["flow_run_ids"])

            t0, cpu0, stored0 = now(), cpu_now(proc.pid), stored_messages(urls)
            await asyncio.gather(*(scheduler() for _ in range(args.clients)))
            if "schedule" in only:
                out.update(schedule_rate=scheduled[0] / (now() - t0), scheduled=scheduled[0],
                           schedule_cpu=cpu_per(cpu0, cpu_now(proc.pid), scheduled[0]),
                           schedule_messages=messages_per(stored0, stored_messages(urls), scheduled[0]))
                again = 0
                for dep in ids[:10]:
                    again += len((await cmd("ScheduleDeploymentRuns", {
                        "deployment_id": dep, "min_runs": args.runs_per_deployment,
                        "max_runs": args.runs_per_deployment}))["result"]["flow_run_ids"])
                out["duplicates"] = again
            out["rss_mb"] = rss_mb(proc.pid)
            await nc.close()
    return out


CPU_KINDS = "service / nats-server / postgres / clients"


def messages_row(per: float | None, what: str) -> list[tuple[str, str, str]]:
    return [] if per is None else [(f"  messages the broker stored per {what}", f"{per:.2f}", "")]


def cpu_cells(per: dict[str, float]) -> str:
    return " / ".join(f"{per[kind]:.0f}" for kind in ("service", "nats-server", "postgres", "clients")) + " µs"


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--clients", type=int, default=8)
    p.add_argument("--seconds", type=float, default=10)
    p.add_argument("--deployments", type=int, default=100)
    p.add_argument("--runs-per-deployment", type=int, default=100)
    p.add_argument("--handoffs", type=int, default=200)
    p.add_argument("--split", nargs="?", const="yes", choices=["yes", "none", "two"],
                   help="the projections in a service process of their own ('none': no projections)")
    p.add_argument("--only", default="create,transitions,handoffs,schedule",
                   help="comma-separated: create, transitions, handoffs, schedule")
    args = p.parse_args()
    r = asyncio.run(run(args))
    rows = []
    if "create_rate" in r:
        rows += [
            (f"create a flow run from a deployment, {args.clients} clients",
             f"{r['create_rate']:,.0f} runs/s ({r['created']} in {args.seconds:g} s)", ">= 2,000 runs/s (Prefect ≈ 15)"),
            ("  round trip p50 / p99", f"{r['create_p50']:.2f} / {r['create_p99']:.2f} ms", ""),
            ("  CPU per run: " + CPU_KINDS, cpu_cells(r["create_cpu"]), ""),
            *messages_row(r["create_messages"], "run"),
    ]
    if "transition_rate" in r:
        rows += [
            (f"transitions Scheduled -> Pending -> Running -> Completed, {args.clients} clients",
             f"{r['transition_rate']:,.0f} transitions/s ({r['transitions']})", ">= 3,000/s (Prefect ≈ 30)"),
            ("  CPU per transition: " + CPU_KINDS, cpu_cells(r["transition_cpu"]), ""),
            *messages_row(r["transition_messages"], "transition"),
    ]
    if "handoff_p50" in r:
        rows += [
            (f"a slot's release to the next waiting run's claim ({r['handoffs']} handoffs), p50 / p99",
             f"{r['handoff_p50']:.2f} / {r['handoff_p99']:.2f} ms", "p50 <= 10 ms (Prefect: the waiter retries after 30 s)"),
            ("  from the release's acknowledgement to the claim's, p50 / p99",
             f"{r['acked_p50']:.2f} / {r['acked_p99']:.2f} ms", ""),
    ]
    if "schedule_rate" in r:
        rows += [
            (f"schedule {args.deployments} deployments x {args.runs_per_deployment} runs, {args.clients} clients",
             f"{r['schedule_rate']:,.0f} runs/s ({r['scheduled']} runs)", ">= 10,000 runs/s"),
            ("  CPU per run scheduled: " + CPU_KINDS, cpu_cells(r["schedule_cpu"]), ""),
            *messages_row(r["schedule_messages"], "run scheduled"),
            ("  runs written again by scheduling 10 of them a second time", f"{r['duplicates']}", "0"),
    ]
    rows.append(("service RSS after the run", f"{r['rss_mb']:.0f} MB", ""))
    report("Flow runs through the whole path (bench/runs.py)", rows)


if __name__ == "__main__":
    main()
