"""`runledger worker ...`: list and delete a work pool's workers, through the client only.

A worker is known by its heartbeats (`RunledgerClient.worker_heartbeat`): it appears with its
first one, is ONLINE on each, and OFFLINE once it missed three. Exit codes: see `output.py`
(3 not found: an unknown pool or worker, 5 invalid, 6 unavailable, 2 usage, 1 other).

Each CLI run is a new client, so `ls` first waits until the read models hold every write the
service had acknowledged (`RunledgerClient.catch_up`): a heartbeat just sent by a worker shows."""

from __future__ import annotations

from collections.abc import Iterable

import typer

from runledger.client import NotFound, RunledgerClient
from runledger.client.models import Worker as WorkerModel
from runledger.commands.queries import DEFAULT_LIMIT

from .deployments import when
from .main import app
from .output import (
    JsonFlag,
    KeyOption,
    OutputOption,
    command_line,
    emit_done,
    print_json,
    run,
    run_command,
    show_rows,
    visible,
    wants_json,
)

worker_app = typer.Typer(name="worker", help="List and delete the workers of a work pool.", no_args_is_help=True)
app.add_typer(worker_app, name="worker")

WORKER_STATUSES = ("ONLINE", "OFFLINE")
WORKER_COLUMNS = ("Name", "Status", "Last Heartbeat", "Heartbeat Interval")
POOL_HELP = "The work pool's name."
DEFAULT_LS_LIMIT = 100


def worker_status(text: str) -> str:
    """ONLINE or OFFLINE in any case, as the service spells it; else a usage error."""
    upper = text.upper()
    if upper not in WORKER_STATUSES:
        raise typer.BadParameter(f"{text!r} is not one of {', '.join(WORKER_STATUSES)}", param_hint="--status")
    return upper


def _interval(seconds: int | None) -> str:
    return "-" if seconds is None else f"{seconds}s"


def show_workers(workers: Iterable[WorkerModel]) -> None:
    rows = [(visible(w.name), visible(w.status), when(w.last_heartbeat_time),
             _interval(w.heartbeat_interval_seconds)) for w in workers]
    show_rows("Workers", WORKER_COLUMNS, rows, "No workers found.")


async def _workers(rl: RunledgerClient, pool: str, statuses: list[str] | None, limit: int) -> list[WorkerModel]:
    await rl.catch_up()
    workers: list[WorkerModel] = []
    while True:  # once even for --limit 0: an unknown pool is still not_found
        want = min(DEFAULT_LIMIT, limit - len(workers))
        page = await rl.read_workers(pool, statuses=statuses, limit=want, offset=len(workers))
        workers.extend(page)
        if len(page) < want or len(workers) >= limit:
            return workers


@worker_app.command("ls")
def list_workers(
    pool: str = typer.Option(..., "--pool", "-p", help=POOL_HELP),
    statuses: list[str] | None = typer.Option(None, "--status", "-s",
                                              help="Only workers with this status: ONLINE or OFFLINE (any case)."),
    limit: int = typer.Option(DEFAULT_LS_LIMIT, "--limit", "-l", min=0,
                              help=f"Most workers to list (default {DEFAULT_LS_LIMIT})."),
    as_json: JsonFlag = False,
    output: OutputOption = None,
) -> None:
    """List a work pool's workers, the latest heartbeat first."""
    wanted = list(dict.fromkeys(worker_status(s) for s in statuses)) if statuses else None
    workers = run(lambda rl: _workers(rl, pool, wanted, limit))
    if wants_json(as_json, output):
        print_json(workers)
    else:
        show_workers(workers)


@worker_app.command()
def delete(
    name: str = typer.Argument(..., help="The worker's name."),
    pool: str = typer.Option(..., "--pool", "-p", help=POOL_HELP),
    as_json: JsonFlag = False,
    output: OutputOption = None,
    idempotency_key: KeyOption = None,
) -> None:
    """Delete a worker of a work pool (a worker that heartbeats again comes back)."""

    async def action(rl: RunledgerClient, key: str) -> None:
        try:
            await rl.delete_worker(pool, name, idempotency_key=key)
        except NotFound as e:
            if e.message.startswith("Worker"):  # not the pool's "Work pool ... not found."
                raise NotFound(f"Worker {name!r} not found in work pool {pool!r}.", field=e.field,
                               details=e.details) from None
            raise

    run_command(action, idempotency_key, command_line("runledger", "worker", "ls", "--pool", pool))
    emit_done(wants_json(as_json, output), f"Deleted worker {name!r} of work pool {pool!r}.")
