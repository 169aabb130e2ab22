"""The service's CPU per command on each event loop (setting `event_loop`): uvloop, the
default, against asyncio's own, in alternating rounds so that a machine whose speed drifts
(a shared VM) drifts for both alike.

Each round starts a `runledger serve` process on one loop and creates flow runs from a
deployment: first one request at a time, then from 8 clients at once; it prints the
service's CPU per run created and the rate, then the medians.

    python bench/event_loop.py [--rounds 4] [--runs 1500]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import uuid

from harness import (
    bench_settings,
    command_sender,
    cpu_seconds,
    now,
    report,
    servers,
    service_process,
)

from runledger.infra.nats_connection import connect

LOOPS = ("asyncio", "uvloop")


async def one_round(urls: dict, pid: int, runs: int) -> dict[str, float]:
    settings = bench_settings(urls)
    nc = await connect(bench_settings(urls, role="client"))
    try:
        cmd = command_sender(nc, settings)
        flow = (await cmd("CreateFlow", {"name": "bench"}))["result"]
        pool = f"pool-{uuid.uuid4().hex[:8]}"
        await cmd("CreateWorkPool", {"name": pool, "type": "process"})
        deployment = (await cmd("CreateDeployment", {"name": pool, "flow_id": flow["id"],
                                                     "work_pool_name": pool}))["result"]

        async def create(count: int) -> None:
            for _ in range(count):
                await cmd("CreateFlowRunFromDeployment", {"deployment_id": deployment["id"]})

        await create(200)  # warm: caches, prepared statements, the projection's consumer
        await asyncio.sleep(0.5)
        cpu0, t0 = cpu_seconds(pid), now()
        await create(runs)
        lone_cpu = (cpu_seconds(pid) - cpu0) / runs * 1e6
        await asyncio.sleep(0.5)
        per_client = runs // 4
        cpu0, t0 = cpu_seconds(pid), now()
        await asyncio.gather(*(create(per_client) for _ in range(8)))
        done = 8 * per_client
        return {"lone_cpu": lone_cpu, "cpu": (cpu_seconds(pid) - cpu0) / done * 1e6, "rate": done / (now() - t0)}
    finally:
        await nc.close()


def run(args) -> list[tuple[str, str, str]]:
    results: dict[str, list[dict[str, float]]] = {loop: [] for loop in LOOPS}
    with servers() as urls:
        for _ in range(args.rounds):
            for loop in LOOPS:
                os.environ["RUNLEDGER_EVENT_LOOP"] = loop  # the service process inherits it
                with service_process(bench_settings(urls)) as proc:
                    results[loop].append(asyncio.run(one_round(urls, proc.pid, args.runs)))
    rows = []
    for loop in LOOPS:
        r = results[loop]

        def median(key: str, r: list[dict[str, float]] = r) -> float:
            return statistics.median(x[key] for x in r)

        rows += [(f"{loop}: service CPU per run created, one request at a time (median of {args.rounds})",
                  f"{median('lone_cpu'):.0f} µs", ""),
                 (f"{loop}: the same with 8 clients; runs created per second",
                  f"{median('cpu'):.0f} µs; {median('rate'):,.0f}/s", "")]
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--runs", type=int, default=1500)
    args = p.parse_args()
    report("The service on each event loop (bench/event_loop.py)", run(args))


if __name__ == "__main__":
    main()
