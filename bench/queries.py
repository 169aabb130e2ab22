"""Query round trips through the whole path (request -> wait for min_seq -> Postgres ->
reply), against one `runledger serve` process: one client at a time for latency, 32 clients
for throughput. 1,000 pools of 10 queues, so the tables are not trivially small.

    python bench/queries.py [--pools 1000] [--requests 2000] [--clients 32] [--seconds 5]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random

from harness import bench_settings, now, percentile, report, servers, service_process

from runledger.infra.nats_connection import connect


async def run(args) -> list[tuple[str, str, str]]:
    with servers() as urls:
        settings = bench_settings(urls)
        with service_process(settings):
            nc = await connect(bench_settings(urls, role="client"))

            async def request(subject: str, body: dict) -> dict:
                reply = await nc.request(subject, json.dumps(body).encode(), timeout=30)
                out = json.loads(reply.data)
                if not out["ok"]:
                    raise RuntimeError(out)
                return out

            async def fill(p: int) -> int:
                await request(settings.command_subject("CreateWorkPool"), {"name": f"pool-{p}", "type": "process"})
                last = 0
                for q in range(9):
                    body = {"work_pool_name": f"pool-{p}", "name": f"q{q}"}
                    last = (await request(settings.command_subject("CreateWorkQueue"), body))["seq"]
                return last

            last_seq = 0
            for start in range(0, args.pools, 50):
                last_seq = max([last_seq, *await asyncio.gather(*(fill(p) for p in range(start, min(args.pools, start + 50))))])
            await request(settings.query_subject("CountWorkPools"), {"min_seq": last_seq})  # projected

            rows: list[tuple[str, str, str]] = []
            shapes = [
                ("GetWorkPool", lambda: {"name": f"pool-{random.randrange(args.pools)}"}),
                ("ListWorkQueues (a pool's 10 queues)", lambda: {"work_pool_name": f"pool-{random.randrange(args.pools)}"}),
                ("GetWorkQueue with min_seq (read-your-writes, already reached)",
                 lambda: {"work_pool_name": f"pool-{random.randrange(args.pools)}", "work_queue_name": "q3", "min_seq": last_seq}),
            ]
            for label, body in shapes:
                name = label.split(" ")[0]
                latencies = []
                for _ in range(args.requests):
                    t = now()
                    await request(settings.query_subject(name), body())
                    latencies.append((now() - t) * 1000)
                rows.append((f"{label}, one client, p50 / p99",
                             f"{percentile(latencies, 50):.2f} / {percentile(latencies, 99):.2f} ms", ""))

            stop_at = now() + args.seconds
            done = [0] * args.clients

            async def client(c: int) -> None:
                while now() < stop_at:
                    await request(settings.query_subject("ListWorkQueues"),
                                  {"work_pool_name": f"pool-{random.randrange(args.pools)}"})
                    done[c] += 1

            t0 = now()
            await asyncio.gather(*(client(c) for c in range(args.clients)))
            rows.append((f"ListWorkQueues, {args.clients} clients", f"{sum(done) / (now() - t0):,.0f} queries/s", ""))
            await nc.close()
    return rows


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--pools", type=int, default=1000)
    p.add_argument("--requests", type=int, default=2000)
    p.add_argument("--clients", type=int, default=32)
    p.add_argument("--seconds", type=float, default=5)
    args = p.parse_args()
    report("Queries through the whole path (bench/queries.py)", asyncio.run(run(args)))


if __name__ == "__main__":
    main()
