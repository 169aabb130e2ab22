"""`runledger replay` rate: rebuild every read model from a log of N events.

    python bench/replay.py [--events 100000]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
import sys
import time
from pathlib import Path

from harness import bench_settings, publish_history, report, role_env, servers, synthetic_history

from runledger.infra.event_store import EventStore
from runledger.infra.jetstream_setup import ensure_event_stream
from runledger.infra.nats_connection import connect


async def prepare(settings, n: int) -> None:
    nc = await connect(settings)
    await ensure_event_stream(nc.jetstream(), settings)
    await publish_history(EventStore(nc, settings), synthetic_history(n))
    await nc.close()


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--events", type=int, default=100_000)
    p.add_argument("--profile", metavar="OUT", help="Record the replay with py-spy (raw folded stacks) into OUT.")
    args = p.parse_args()
    with servers() as urls:
        settings = bench_settings(urls)
        asyncio.run(prepare(settings, args.events))
        env = dict(os.environ, RUNLEDGER_NATS_URL=settings.nats_url, RUNLEDGER_NAMESPACE=settings.namespace,
                   RUNLEDGER_DATABASE_URL=settings.database_url.get_secret_value(),
                   **role_env(bench_settings(urls, role="analyst")))  # replay reads as the analyst
        exe = Path(sys.executable).parent / "runledger"
        started = time.perf_counter()
        command = [str(exe), "replay", "--quiet"]
        if args.profile:
            command = ["py-spy", "record", "-r", "400", "-f", "raw", "-o", args.profile, "--", *command]
        out = subprocess.run(command, env=env, capture_output=True, text=True, check=True)
        wall = time.perf_counter() - started
    print(out.stderr.strip())
    report("Replay (bench/replay.py)", [
        (f"`runledger replay` of {args.events:,} events, whole command", f"{args.events / wall:,.0f} events/s ({wall:.1f} s)", ">= 20,000 events/s"),
    ])


if __name__ == "__main__":
    main()
