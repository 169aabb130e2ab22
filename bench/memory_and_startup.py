"""Service memory with many pools and queues, and `runledger up` time to ready.

    python bench/memory_and_startup.py [--pools 10000] [--queues 50000]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from harness import bench_settings, report, rss_mb, servers, service_process

from runledger.infra.nats_connection import connect


async def fill(settings, pools: int, queues: int, concurrency: int = 64) -> None:
    nc = await connect(settings)
    sem = asyncio.Semaphore(concurrency)

    async def cmd(name, body):
        async with sem:
            reply = json.loads((await nc.request(settings.command_subject(name), json.dumps(body).encode(), timeout=60)).data)
            if not reply["ok"]:
                raise RuntimeError(reply)

    await asyncio.gather(*(cmd("CreateWorkPool", {"name": f"m{p}", "type": "process"}) for p in range(pools)))
    extra = queues - pools  # each pool already has its default queue
    await asyncio.gather(*(cmd("CreateWorkQueue", {"work_pool_name": f"m{i % pools}", "name": f"q{i}"}) for i in range(extra)))
    await nc.close()


def startup_seconds() -> float:
    """`runledger up` on an empty data dir: from exec to its 'is up' line."""
    data = Path(tempfile.mkdtemp(prefix="rlup-"))
    data.chmod(0o711)  # as root, Postgres runs as a system user that must get through (mkdtemp: 0700)
    cfg = tempfile.mkdtemp(prefix="rlupcfg-")
    env = {k: v for k, v in os.environ.items() if not k.startswith("RUNLEDGER_")}
    env["RUNLEDGER_CONFIG_DIR"] = cfg
    exe = Path(sys.executable).parent / "runledger"
    started = time.perf_counter()
    proc = subprocess.Popen([str(exe), "up", "--data-dir", str(data)], env=env, stderr=subprocess.PIPE, text=True)
    try:
        said = []
        for line in proc.stderr:  # type: ignore[union-attr]
            if "runledger is up" in line:
                return time.perf_counter() - started
            said.append(line)
        raise RuntimeError("runledger up exited before it was ready:\n" + "".join(said[-10:]))
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(30)
        shutil.rmtree(data, ignore_errors=True)
        shutil.rmtree(cfg, ignore_errors=True)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--pools", type=int, default=10_000)
    p.add_argument("--queues", type=int, default=50_000)
    args = p.parse_args()
    with servers() as urls:
        settings = bench_settings(urls)
        with service_process(settings) as proc:
            idle = rss_mb(proc.pid)
            t = time.perf_counter()
            asyncio.run(fill(bench_settings(urls, role="client"), args.pools, args.queues))
            fill_s = time.perf_counter() - t
            loaded = rss_mb(proc.pid)
    up = startup_seconds()
    report("Memory and start-up (bench/memory_and_startup.py)", [
        ("service RSS at start", f"{idle:.0f} MB", ""),
        (f"service RSS with {args.pools:,} pools and {args.queues:,} queues (all cached)", f"{loaded:.0f} MB (filled in {fill_s:.0f} s)", "<= 300 MB"),
        ("`runledger up` from start to ready, empty data dir", f"{up:.1f} s", "<= 5 s"),
    ])


if __name__ == "__main__":
    main()
