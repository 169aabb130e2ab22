"""Serving task keys from a FastStream app (`pip install 'runledger[faststream]'`).

    from faststream import FastStream
    from faststream.nats import NatsBroker
    from faststream.security import SASLPlaintext
    from runledger.handlers.faststream_tasks import RunledgerTasks

    broker = NatsBroker("nats://...", inbox_prefix="_INBOX.task_worker",
                        security=SASLPlaintext(username="task_worker", password="..."))
    app = FastStream(broker)
    tasks = RunledgerTasks(broker, limit=10)

    @tasks.task("reports.render")
    async def render(report_id: str) -> str: ...

    tasks.attach(app)   # served while the app runs, beside its own subscribers

The app's broker connection carries runledger's task worker (`handlers/task_worker.py`), the
same code `runledger task-worker` runs: the same order, the same start through
`SetTaskRunState`, the same keep-alive, report, retry and hand-back, hence the same
guarantees, proven by the same fault tests (`tests/integration/test_faststream_tasks.py`).
It does not go through FastStream subscribers: their acknowledgement policies settle a message
when the handler returns or raises, before the run's outcome is recorded, which is exactly
the window in which a broker restart makes a task run twice (FastStream's `AckPolicy`
cannot wait for a command's reply), and a pull subscriber serves one subject's messages
without looking at the retry side first.

The broker must connect as the `task_worker` broker role, with that role's inbox prefix
(`_INBOX.task_worker`); `settings` (default: `load_settings("task_worker")`) gives the
namespace, the JetStream API prefix of the role's account and the ack wait.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from typing import Any

from runledger.infra.settings import Settings, load_settings

from .task_worker import TaskFunction, TaskWorker


class RunledgerTasks:
    """Task keys a FastStream app serves, in the order they were registered (earlier keys
    first; each key's retries before its scheduled runs)."""

    def __init__(self, broker: Any, *, settings: Settings | None = None, limit: int = 10,
                 worker_id: str | None = None, grace_seconds: float = 30.0):
        self.broker = broker
        self.settings = settings
        self.limit, self.worker_id, self.grace_seconds = limit, worker_id, grace_seconds
        self.functions: dict[str, TaskFunction] = {}
        self.worker: TaskWorker | None = None
        self._stop = asyncio.Event()
        self._serving: asyncio.Task | None = None

    def task(self, key: str | None = None) -> Callable[[TaskFunction], TaskFunction]:
        """Registers a function (async or plain) for a task key (default: `<module>.<name>`,
        the key `runledger.client.tasks.task` gives it, so `.delay()` of that reaches it)."""

        def register(fn: TaskFunction) -> TaskFunction:
            target = getattr(fn, "fn", fn)  # a runledger `@task` object: its function and key
            name = key or getattr(fn, "key", None) or f"{target.__module__}.{target.__qualname__}"
            self.functions[name] = target
            return fn

        return register

    def attach(self, app: Any) -> None:
        """Serve while `app` runs: after its startup (its broker connected), until its shutdown
        (before its broker closes, so running tasks report their end)."""
        app.after_startup(self.start)
        app.on_shutdown(self.stop)

    async def start(self) -> None:
        if not self.functions:
            raise ValueError("no task registered: use @tasks.task(...) before the app starts")
        settings = self.settings or load_settings("task_worker")
        self._stop.clear()
        self.worker = TaskWorker(self.broker.connection, settings, self.functions, limit=self.limit,
                                 worker_id=self.worker_id, grace_seconds=self.grace_seconds)
        await self.worker.start()
        self._serving = asyncio.create_task(self.worker.serve(self._stop), name="runledger-faststream-tasks")

    async def stop(self) -> None:
        """Takes nothing new, lets running tasks finish within the grace period, hands the rest
        back to other workers."""
        self._stop.set()
        if self._serving is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await self._serving
            self._serving = None
