"""A FastStream app serving the bench's task keys (`bench/tasks.py --worker-kind faststream`):
the app's broker connection carries runledger's task worker (handlers/faststream_tasks.py).

    python bench/faststream_worker.py --key bench.trivial [--key ...] --limit 16 --worker-id NAME

Settings come from the environment (RUNLEDGER_NATS_URL, _NAMESPACE, _NATS_USER/_PASSWORD,
_INBOX_PREFIX, _JS_API_PREFIX), as for `runledger task-worker`."""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys

import task_functions  # noqa: F401  (registers the bench's @task functions)
from faststream import FastStream
from faststream.nats import NatsBroker
from faststream.security import SASLPlaintext

from runledger.client import tasks as client_tasks
from runledger.handlers.faststream_tasks import RunledgerTasks
from runledger.infra.settings import load_settings


async def main(args) -> None:
    settings = load_settings("task_worker")
    client_tasks.use_settings(settings)
    security = None
    if settings.nats_user and settings.nats_password:
        security = SASLPlaintext(username=settings.nats_user, password=settings.nats_password.get_secret_value())
    broker = NatsBroker(settings.nats_url, security=security, inbox_prefix=settings.inbox_prefix,
                        max_reconnect_attempts=-1, logger=None)
    app = FastStream(broker, logger=None)
    tasks = RunledgerTasks(broker, settings=settings, limit=args.limit, worker_id=args.worker_id, grace_seconds=5)
    for key in args.key:
        tasks.task(key)(client_tasks.TASKS[key])
    tasks.attach(app)
    await app.start()
    print(f"task worker {args.worker_id} serving {args.key}", file=sys.stderr, flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await app.stop()


if __name__ == "__main__":
    p = argparse.ArgumentParser()
    p.add_argument("--key", action="append", required=True)
    p.add_argument("--limit", type=int, default=16)
    p.add_argument("--worker-id", required=True)
    asyncio.run(main(p.parse_args()))
