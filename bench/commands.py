"""Command throughput and round-trip latency through the whole path
(request -> decide -> append -> reply), against one `runledger serve` process.

    python bench/commands.py [--clients 32] [--seconds 10] [--latency-requests 2000]
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json

from harness import (
    bench_settings,
    command_sender,
    cpu_seconds,
    now,
    percentile,
    report,
    rss_mb,
    servers,
    service_process,
)

from runledger.infra.nats_connection import connect


async def run(args) -> dict:
    with servers() as urls:
        settings = bench_settings(urls)
        with service_process(settings) as proc:
            nc = await connect(bench_settings(urls, role="client"))

            cmd = command_sender(nc, settings)

            for c in range(args.clients):
                await cmd("CreateWorkPool", {"name": f"bench-{c}", "type": "process"})

            # Throughput: each client works on its own pool, alternating creates and updates.
            stop_at = now() + args.seconds
            done = [0] * args.clients

            async def client(c: int) -> None:
                pool = f"bench-{c}"
                for i in itertools.count():
                    if now() >= stop_at:
                        return
                    if i % 2 == 0:
                        await cmd("CreateWorkQueue", {"work_pool_name": pool, "name": f"q{i}"})
                    else:
                        await cmd("UpdateWorkQueue", {"work_pool_name": pool, "work_queue_name": f"q{i - 1}",
                                                      "description": f"updated {i}", "concurrency_limit": i % 7})
                    done[c] += 1

            t0, cpu0 = now(), cpu_seconds(proc.pid)
            await asyncio.gather(*(client(c) for c in range(args.clients)))
            elapsed = now() - t0
            throughput = sum(done) / elapsed
            # Let the projection finish its backlog, so the latency run measures commands alone.
            last = (await cmd("UpdateWorkPool", {"name": "bench-0", "description": "settle"}))["seq"]
            await nc.request(settings.query_subject("CountWorkPools"), json.dumps({"min_seq": last}).encode(), timeout=60)
            cpu_per_command = (cpu_seconds(proc.pid) - cpu0) / sum(done) * 1e6

            # Multi-aggregate decisions: pool creates are an atomic batch (name claim + pool).
            stop_at = now() + args.seconds / 2
            made = [0] * args.clients

            async def pool_creator(c: int) -> None:
                for i in itertools.count():
                    if now() >= stop_at:
                        return
                    await cmd("CreateWorkPool", {"name": f"p-{c}-{i}", "type": "process"})
                    made[c] += 1

            t0 = now()
            await asyncio.gather(*(pool_creator(c) for c in range(args.clients)))
            pool_throughput = sum(made) / (now() - t0)

            # Latency: one client, one request at a time.
            await cmd("CreateWorkQueue", {"work_pool_name": "bench-0", "name": "lat"})
            latencies = []
            for i in range(args.latency_requests):
                t = now()
                await cmd("UpdateWorkQueue", {"work_pool_name": "bench-0", "work_queue_name": "lat", "description": f"l{i}"})
                latencies.append((now() - t) * 1000)
            memory = rss_mb(proc.pid)
            await nc.close()
    return {"cpu_us": cpu_per_command, "throughput": throughput, "pool_throughput": pool_throughput, "commands": sum(done), "p50": percentile(latencies, 50),
            "p99": percentile(latencies, 99), "rss_mb": memory}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--clients", type=int, default=32)
    p.add_argument("--seconds", type=float, default=10)
    p.add_argument("--latency-requests", type=int, default=2000)
    args = p.parse_args()
    r = asyncio.run(run(args))
    report("Commands through the whole path (bench/commands.py)", [
        (f"throughput, {args.clients} clients, CreateWorkQueue/UpdateWorkQueue mix", f"{r['throughput']:,.0f} commands/s ({r['commands']} in {args.seconds:g} s)", ">= 3,000 commands/s"),
        (f"throughput, {args.clients} clients, CreateWorkPool (atomic batch: name claim + pool)", f"{r['pool_throughput']:,.0f} commands/s", ""),
        ("round trip, one client, p50", f"{r['p50']:.2f} ms", "<= 2 ms"),
        ("round trip, one client, p99", f"{r['p99']:.2f} ms", "<= 10 ms"),
        ("service CPU per command (decide, append, reply, and project)", f"{r['cpu_us']:.0f} µs", ""),
        ("service RSS after the run", f"{r['rss_mb']:.0f} MB", ""),
    ])


if __name__ == "__main__":
    main()
