"""Runs created from a deployment by 1, 2, 4 and 8 clients, each waiting for its reply, against
one `runledger serve` process: where throughput stops following the clients, and the service's
share of a core meanwhile (is the service the bound, or the rest of the machine?).

    python bench/create_sweep.py [--seconds 4] [--roles commands,queries,projections]

With `--roles commands`, a second process serves queries and projections.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import time

from harness import (
    bench_settings,
    command_sender,
    cpu_seconds,
    percentile,
    report,
    servers,
    service_process,
)

from runledger.infra.nats_connection import connect


async def run(args) -> list[tuple[int, float, float, float]]:
    rows = []
    with servers() as urls, contextlib.ExitStack() as stack:
        settings = bench_settings(urls)
        proc = stack.enter_context(service_process(settings, args.roles))
        if args.roles == "commands":
            stack.enter_context(service_process(settings, "queries,projections"))
        nc = await connect(bench_settings(urls, role="client"))

        cmd = command_sender(nc, settings)

        flow = (await cmd("CreateFlow", {"name": "sweep"}))["result"]
        await cmd("CreateWorkPool", {"name": "pool", "type": "process"})
        deployment = (await cmd("CreateDeployment", {"name": "d", "flow_id": flow["id"],
                                                     "work_pool_name": "pool"}))["result"]
        for clients in (1, 2, 4, 8):
            latencies: list[float] = []
            stop_at = time.perf_counter() + args.seconds

            async def client(latencies: list[float], stop_at: float) -> None:
                while time.perf_counter() < stop_at:
                    t = time.perf_counter()
                    await cmd("CreateFlowRunFromDeployment", {"deployment_id": deployment["id"]})
                    latencies.append((time.perf_counter() - t) * 1000)

            cpu0, t0 = cpu_seconds(proc.pid), time.perf_counter()
            await asyncio.gather(*(client(latencies, stop_at) for _ in range(clients)))
            elapsed = time.perf_counter() - t0
            rows.append((clients, len(latencies) / elapsed, percentile(latencies, 50),
                         (cpu_seconds(proc.pid) - cpu0) / elapsed * 100))
        await nc.close()
    return rows


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--seconds", type=float, default=4)
    p.add_argument("--roles", default="commands,queries,projections")
    args = p.parse_args()
    rows = asyncio.run(run(args))
    report(f"Runs from a deployment by 1 – 8 clients (bench/create_sweep.py, roles {args.roles})", [
        (f"{clients} client(s)", f"{rate:,.0f} runs/s, p50 {p50:.2f} ms, service {cpu:.0f} % of a core", "")
        for clients, rate, p50, cpu in rows
    ])


if __name__ == "__main__":
    main()
