"""`runledger task-worker --module MOD [--module MOD ...] --key KEY ... --limit N`: serve task keys.

The modules are imported; their `@task` functions (runledger.client.tasks) are what it serves.
Without `--key`, every task registered is served, in the order registered; with `--key`,
those keys in the order given (earlier keys first, each key's retries before its scheduled
runs). SIGTERM or Ctrl-C: no new runs are taken, running ones get `--grace` seconds to
finish, the rest are handed back to other workers; a second one hands them back at once.
A module, key or name it cannot use is said in one line, exit code 2 (usage).

It connects as the broker's `task_worker` role (RUNLEDGER_NATS_USER/PASSWORD, or the
endpoint file of `runledger up`)."""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import logging
import signal
import sys
import traceback
from typing import NoReturn

import typer
from rich.console import Console
from rich.markup import escape

from .main import app

console = Console(stderr=True, soft_wrap=True)
EXIT_USAGE = 2
EXIT_UNAVAILABLE = 6


def _usage_error(option: str, message: str) -> NoReturn:
    """Bad input, said in one line (no usage box, no traceback), exit code 2 as Typer's own."""
    console.print(f"[red]Error (usage):[/red] {option}: {escape(message)}", highlight=False)
    raise typer.Exit(EXIT_USAGE)


def _load_functions(modules: list[str], keys: list[str], verbose: bool = False) -> dict:
    from runledger.client.tasks import TASKS

    sys.path.insert(0, ".")
    for module in modules:
        if not module.strip():
            _usage_error("--module", "give a module name (e.g. mytasks), not an empty one")
        try:
            importlib.import_module(module)
        except Exception as e:  # the module's own code failed too (a missing setting, a bug): its user's to fix
            if verbose:
                traceback.print_exc()
            _usage_error("--module", f"cannot import {module!r}: {type(e).__name__}: {e}"
                                     + ("" if verbose else " (run with -v for the traceback)"))
    names = ", ".join(map(repr, modules))
    if not TASKS:
        _usage_error("--module", f"{names} register{'s' if len(modules) == 1 else ''} no @task functions")
    chosen = keys or list(TASKS)
    unknown = [k for k in chosen if k not in TASKS]
    if unknown:
        _usage_error("--key", f"no @task registered under {', '.join(map(repr, unknown))}; "
                              f"{names} register{'s' if len(modules) == 1 else ''} {', '.join(map(repr, TASKS))}")
    return {k: TASKS[k].fn for k in chosen}


@app.command("task-worker")
def task_worker(
    module: list[str] = typer.Option(..., "--module", "-m", help="A Python module whose @task functions to serve "
                                                                 "(repeat for several)."),
    key: list[str] = typer.Option([], "--key", "-k", help="A task key to serve (repeat; first = served first). Default: all of the module's."),
    limit: int = typer.Option(10, "--limit", "-l", min=1, help="How many task runs to run at once."),
    worker_id: str | None = typer.Option(None, "--worker-id", help="This worker's name (default: host name and a random suffix)."),
    grace: float = typer.Option(30.0, "--grace", min=0, help="Seconds running tasks get to finish after SIGTERM "
                                                             "(a second SIGTERM hands them back at once)."),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Log at DEBUG level, not INFO."),
    bound_as: str | None = typer.Option(
        None, "--as", help="Serve as the task worker bound to keys under this name (RUNLEDGER_TASK_WORKER_KEYS): "
                           "its own broker user, task_worker_<name>, which may serve those keys only."),
) -> None:
    """Run task runs of the given keys as task workers do: durably, each once in effect."""
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    logging.getLogger("nats").setLevel(logging.WARNING)
    functions = _load_functions(module, key, verbose)
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
        _usage_error("--as", f"no task worker is bound to keys under the name {bound_as!r} "
                             "(RUNLEDGER_TASK_WORKER_KEYS, given to `runledger up` and the service)")
    outside = [k for k in keys if k not in bound]
    if outside:
        _usage_error("--as", f"{bound_as!r} is bound to {', '.join(map(repr, bound))}, not to "
                             f"{', '.join(map(repr, outside))}")
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

    def on_signal() -> None:
        # Said at once: the grace period may be long, and a silent process looks hung.
        if stop.is_set():
            worker.hand_back_now()
            console.print(f"task worker {worker.worker_id}: handing back its running task runs now", highlight=False)
            return
        stop.set()
        running = worker.running
        if running:
            console.print(f"task worker {worker.worker_id} stopping: finishing {running} running "
                          f"task run{'' if running == 1 else 's'} (up to {grace:g} s); again to hand them back now",
                          highlight=False)
        else:
            console.print(f"task worker {worker.worker_id} stopping: no task run is running", highlight=False)

    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, on_signal)
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
        # A broker gone away leaves a connection that fails to close: nothing is lost by it
        # (the runs not finished were handed back, or come back after the ack wait).
        with contextlib.suppress(Exception):
            await nc.close()
    console.print(f"task worker {worker.worker_id} stopped: {_runs(worker.finished)} finished", highlight=False)
    return 0


def _runs(count: int) -> str:
    return f"{count} task run{'' if count == 1 else 's'}"
