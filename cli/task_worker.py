"""`runledger task-worker --module MOD --key KEY ... --limit N`: serve task keys.

The module is imported; its `@task` functions (runledger.client.tasks) are what it serves.
Without `--key`, every task the module registered is served, in the order registered; with
`--key`, those keys in the order given (earlier keys first, each key's retries before its
scheduled runs). SIGTERM or Ctrl-C: no new runs are taken, running ones get `--grace`
seconds to finish, the rest are handed back to other workers.

It connects as the broker's `task_worker` role (RUNLEDGER_NATS_USER/PASSWORD, or the
endpoint file of `runledger up`)."""

from __future__ import annotations

import asyncio
import importlib
import logging
import signal
import sys

import typer
from rich.console import Console

from .main import app

console = Console(stderr=True, soft_wrap=True)
EXIT_UNAVAILABLE = 6


def _load_functions(module: str, keys: list[str]) -> dict:
    from runledger.client.tasks import TASKS

    sys.path.insert(0, ".")
    try:
        importlib.import_module(module)
    except ImportError as e:
        raise typer.BadParameter(f"cannot import {module!r}: {e}", param_hint="--module") from None
    if not TASKS:
        raise typer.BadParameter(f"{module!r} registers no @task functions", param_hint="--module")
    chosen = keys or list(TASKS)
    unknown = [k for k in chosen if k not in TASKS]
    if unknown:
        raise typer.BadParameter(f"no @task registered under {', '.join(map(repr, unknown))}; "
                                 f"{module!r} registers {', '.join(map(repr, TASKS))}", param_hint="--key")
    return {k: TASKS[k].fn for k in chosen}


@app.command("task-worker")
def task_worker(
    module: str = typer.Option(..., "--module", "-m", help="The Python module whose @task functions to serve."),
    key: list[str] = typer.Option([], "--key", "-k", help="A task key to serve (repeat; first = served first). Default: all of the module's."),
    limit: int = typer.Option(10, "--limit", "-l", min=1, help="How many task runs to run at once."),
    worker_id: str | None = typer.Option(None, "--worker-id", help="This worker's name (default: host name and a random suffix)."),
    grace: float = typer.Option(30.0, "--grace", min=0, help="Seconds running tasks get to finish after SIGTERM."),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Log at DEBUG level, not INFO."),
    bound_as: str | None = typer.Option(
        None, "--as", help="Serve as the task worker bound to keys under this name (RUNLEDGER_TASK_WORKER_KEYS): "
                           "its own broker user, task_worker_<name>, which may serve those keys only."),
) -> None:
    """Run task runs of the given keys as task workers do: durably, each once in effect."""
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    logging.getLogger("nats").setLevel(logging.WARNING)
    functions = _load_functions(module, key)
    settings = _settings(bound_as, list(functions))
    from runledger.infra import event_loop

    sys.exit(event_loop.run(_serve(settings, functions, list(functions), limit, worker_id, grace), settings.event_loop))


def _settings(bound_as: str | None, keys: list[str]):
    """The task worker role's settings, or those of the task worker bound to keys named
    `bound_as`, which must be bound to every key served."""
    from runledger.infra.broker_auth import bound_task_worker_user
    from runledger.infra.settings import load_settings

    if bound_as is None:
        return load_settings("task_worker")
    settings = load_settings("task_worker", user=bound_task_worker_user(bound_as))
    bound = settings.task_worker_keys.get(bound_as) or _recorded_keys(bound_task_worker_user(bound_as))
    if bound is None:
        raise typer.BadParameter(f"no task worker is bound to keys under the name {bound_as!r} "
                                 "(RUNLEDGER_TASK_WORKER_KEYS, given to `runledger up` and the service)",
                                 param_hint="--as")
    outside = [k for k in keys if k not in bound]
    if outside:
        raise typer.BadParameter(f"{bound_as!r} is bound to {', '.join(map(repr, bound))}, not to "
                                 f"{', '.join(map(repr, outside))}", param_hint="--as")
    return settings


def _recorded_keys(user: str) -> list[str] | None:
    """The keys `runledger up` recorded for a bound task worker's user (None: not recorded)."""
    from runledger.infra.settings import recorded_endpoint

    entry = (recorded_endpoint().get("nats_users") or {}).get(user)
    keys = entry.get("task_keys") if isinstance(entry, dict) else None
    return list(keys) if isinstance(keys, list) else None


async def _serve(settings, functions: dict, keys: list[str], limit: int, worker_id: str | None, grace: float) -> int:
    from runledger.client import tasks
    from runledger.handlers.task_worker import TaskSourcesUnavailable, TaskWorker
    from runledger.infra.nats_connection import BrokerUnavailable, connect

    tasks.use_settings(settings)  # tasks that submit tasks connect as this role too
    try:
        nc = await connect(settings, name="runledger-task-worker", check_version=False, lazy_headers=True)
    except BrokerUnavailable as e:
        console.print(f"[red]Error (unavailable):[/red] {e}", highlight=False)
        return EXIT_UNAVAILABLE
    worker = TaskWorker(nc, settings, functions, keys=keys, limit=limit, worker_id=worker_id, grace_seconds=grace)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        try:
            await worker.start()
        except TaskSourcesUnavailable as e:
            console.print(f"[red]Error (unavailable):[/red] {e}", highlight=False)
            return EXIT_UNAVAILABLE
        console.print(f"task worker {worker.worker_id} serving {', '.join(map(repr, keys))} "
                      f"({limit} at a time)", highlight=False)
        await worker.serve(stop)
    finally:
        await nc.close()
    console.print(f"task worker {worker.worker_id} stopped: {worker.finished} task runs finished", highlight=False)
    return 0
