"""`runledger replay`, `runledger verify` and `runledger events`: the log as the source of truth."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import json
import os
import signal
import sys
import uuid
from datetime import UTC, datetime
from typing import Literal

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from runledger.commands.events import EventEnvelope
from runledger.commands.prefect_events import ExportState, to_prefect_events
from runledger.infra.database import DatabaseUnavailable, check_database, create_engine, drop_schema
from runledger.infra.event_store import EventStore
from runledger.infra.jetstream_setup import ensure_event_stream
from runledger.infra.leases import stop_if_cancelled
from runledger.infra.nats_connection import BrokerUnavailable, connect
from runledger.infra.settings import Settings, load_settings
from runledger.projections.replay import (
    ReplayStopped,
    SchemaNotMadeByReplay,
    compare,
    default_schema,
    iter_log,
    replay,
    snapshot,
    snapshot_each,
)
from runledger.projections.runner import read_failures

from .main import app
from .output import EXIT_CONFLICT, EXIT_INVALID
from .status import EXIT_STALLED, stalled_line

console = Console(stderr=True, soft_wrap=True)
EXIT_UNAVAILABLE = 6
FOLLOW_POLL_SECONDS = 0.25  # how often `events --follow` looks for new events


async def _log_is_there(js, settings: Settings) -> None:
    """The log as it is, checked (`ensure_event_stream`): the analyst may not make or upgrade
    it, so a missing one is said, not asked for (the request would only time out)."""
    if missing := await ensure_event_stream(js, settings, upgrade=False, change=False):
        raise BrokerUnavailable(f"{missing[0]} in namespace {settings.namespace!r}: nothing to read until the "
                                "service has started there (or `runledger broker-setup` has made it)")


def _projectors():
    from runledger.handlers.registry import projectors

    return projectors()


def _aware(moment: datetime | None) -> datetime | None:
    """A moment as typed (typer parses it without a zone) read as UTC, as the help says: the
    log's times carry their zone, and a naive one cannot be compared with them."""
    return moment.replace(tzinfo=UTC) if moment is not None and moment.tzinfo is None else moment


def _run(coro):
    try:
        return asyncio.run(coro)
    except (BrokerUnavailable, DatabaseUnavailable) as e:
        console.print(f"[red]Error (unavailable):[/red] {e}")
        raise typer.Exit(EXIT_UNAVAILABLE) from None
    except ReplayStopped as e:  # an event a projection cannot apply: one line, not a traceback
        console.print(f"[red]Error (stalled):[/red] {escape(str(e))}")
        raise typer.Exit(EXIT_STALLED) from None
    except SchemaNotMadeByReplay as e:
        console.print(f"[red]Error (invalid):[/red] {escape(str(e))}")
        raise typer.Exit(EXIT_INVALID) from None


async def _rebuild(settings: Settings, schema: str, until_seq: int | None, as_of: datetime | None, quiet: bool,
                   until_each: dict[str, int] | None = None):
    nc = await connect(settings, name="runledger-replay", wait_for_server=False)
    try:
        await _log_is_there(nc.jetstream(prefix=settings.js_api_prefix), settings)
        store = EventStore(nc, settings)
        total = max(until_each.values(), default=0) if until_each is not None else until_seq or await store.last_sequence()
        with Progress(TextColumn("replaying"), BarColumn(), MofNCompleteColumn(), TextColumn("seq"),
                      TimeRemainingColumn(), console=console, disable=quiet, transient=True) as progress:
            task = progress.add_task("replay", total=total or None)
            result = await replay(settings, store, _projectors(), schema, until_seq=until_seq, as_of=as_of,
                                  on_progress=lambda n, seq: progress.update(task, completed=seq),
                                  until_each=until_each)
        return result
    finally:
        await nc.close()


@app.command("replay")
def replay_command(
    schema: str = typer.Option(None, help="Schema to rebuild into (default: <namespace>_replay, dropped first): "
                                             "a new or empty one, or one replay made, which is dropped first."),
    until_seq: int = typer.Option(None, help="Stop after this stream sequence."),
    as_of: datetime = typer.Option(None, help="The read models as of this moment (UTC): the events the log had stored by then."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar."),
) -> None:
    """Rebuild every read model from the event log into a fresh schema."""
    settings = load_settings(role="analyst")
    target = schema or default_schema(settings)
    if target == settings.db_schema:
        console.print("[red]Error (invalid):[/red] refusing to replay into the live schema")
        raise typer.Exit(EXIT_INVALID)
    # Decoding allocates many short-lived dicts; the cyclic collector's default (gen 0 every
    # 700 allocations) then scans the whole heap often. Nothing here builds cycles to collect.
    gc.freeze()
    gc.set_threshold(50_000, 20, 100)
    result = _run(_rebuild(settings, target, until_seq, _aware(as_of), quiet))
    rate = result.events / result.seconds if result.seconds else 0
    console.print(f"rebuilt schema [bold]{result.schema}[/bold]: {result.events} events up to seq {result.last_seq} "
                  f"in {result.seconds:.2f} s ({rate:,.0f} events/s)")


@app.command()
def verify(keep: bool = typer.Option(False, help="Keep the rebuilt schema for inspection.")) -> None:
    """Rebuild the read models from the log and compare them with the live ones; exit 1 on
    any difference, 7 when a live projection is stalled at an event it cannot apply."""
    settings = load_settings(role="analyst")

    async def go() -> int:
        live_engine = create_engine(settings, pool_size=1)
        try:
            await check_database(live_engine, settings)
            names = [p.name for p in _projectors()]
            positions, live = await snapshot_each(live_engine, names)
            until_each = {n: positions.get(n, 0) for n in names}  # each projection where it is
            seq = min(until_each.values(), default=0)
            async with live_engine.connect() as conn:
                stalled = await read_failures(conn)
        finally:
            await live_engine.dispose()
        schema = f"{settings.namespace}_verify_{uuid.uuid4().hex[:8]}"
        await _rebuild(settings, schema, seq, None, quiet=False, until_each=until_each)
        rebuilt_engine = create_engine(settings, schema=schema, pool_size=1)
        try:
            _, rebuilt = await snapshot(rebuilt_engine, [p.name for p in _projectors()])
            if not keep:
                await drop_schema(rebuilt_engine, schema)
        finally:
            await rebuilt_engine.dispose()
        differences = compare(live, rebuilt)
        for d in differences:
            print(f"{d.table} {d.key}: {d.kind}: {d.detail}")
        rows = sum(len(t) for t in live.values())
        for failure in stalled:
            console.print(f"[red]Error (stalled):[/red] {escape(stalled_line(failure))}")
        if stalled:
            console.print(f"the live read models stop before the end of the log; compared up to seq {seq}: "
                          f"{len(differences)} difference(s)")
            return EXIT_STALLED
        if differences:
            console.print(f"[red]{len(differences)} difference(s)[/red] between the live read models and a rebuild up to seq {seq}")
            return 1
        console.print(f"[green]identical[/green]: {rows} rows in {len(live)} tables match a rebuild from the log up to seq {seq}")
        return 0

    code = _run(go())
    raise typer.Exit(code)


@app.command()
def rebuild(
    projections: list[str] = typer.Argument(None, help="The projections to rebuild, e.g. flow_runs (see --list)."),
    all_: bool = typer.Option(False, "--all", help="Rebuild every projection, one after the other."),
    list_: bool = typer.Option(False, "--list", help="List the projections and their tables, and exit."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar."),
) -> None:
    """Rebuild live read models from the log while the service runs: each is replayed into a
    schema of its own, brought up to its live checkpoint, and swapped in under a lock the live
    projection waits on for a moment (docs/operations.md, "Rebuilding a read model")."""
    from runledger.projections.rebuild import RebuildFailed, rebuild_live

    by_name = {p.name: p for p in _projectors()}
    if list_:
        for name, p in by_name.items():
            print(f"{name}: {', '.join(t.name for t in p.tables)}")
        return
    names = list(by_name) if all_ else list(dict.fromkeys(projections or []))
    if not names:
        console.print("[red]Error (invalid):[/red] name the projections to rebuild, or --all (--list shows them)")
        raise typer.Exit(EXIT_INVALID)
    unknown = [n for n in names if n not in by_name]
    if unknown:
        console.print(f"[red]Error (invalid):[/red] no projection named {', '.join(unknown)}; "
                      f"the projections are {', '.join(by_name)}")
        raise typer.Exit(EXIT_INVALID)
    settings = load_settings(role="analyst")
    gc.freeze()
    gc.set_threshold(50_000, 20, 100)

    async def go() -> None:
        nc = await connect(settings, name="runledger-rebuild", wait_for_server=False)
        try:
            await _log_is_there(nc.jetstream(prefix=settings.js_api_prefix), settings)
            store = EventStore(nc, settings)
            for name in names:
                with Progress(TextColumn(f"rebuilding {name}"), BarColumn(), MofNCompleteColumn(), TextColumn("seq"),
                              TimeRemainingColumn(), console=console, disable=quiet, transient=True) as progress:
                    task = progress.add_task(name, total=None)

                    def shown(_: int, seq: int, task=task, progress=progress) -> None:
                        progress.update(task, completed=seq)

                    result = await rebuild_live(settings, store, by_name[name], on_progress=shown)
                rate = result.events / result.seconds if result.seconds else 0
                console.print(f"rebuilt [bold]{name}[/bold] ({', '.join(result.tables)}): {result.events} events up to "
                              f"seq {result.last_seq} in {result.seconds:.2f} s ({rate:,.0f} events/s), swapped in")
        except RebuildFailed as e:
            console.print(f"[red]Error ({e.kind}):[/red] {escape(str(e))}")
            raise typer.Exit({"conflict": EXIT_CONFLICT, "invalid": EXIT_INVALID}.get(e.kind, EXIT_UNAVAILABLE)) from None
        finally:
            await nc.close()

    _run(go())


@app.command()
def events(
    aggregate: str = typer.Option(None, "--aggregate", help="Aggregate type, e.g. work_pool."),
    aggregate_id: str = typer.Option(None, "--id", help="Aggregate id."),
    event_type: str = typer.Option(None, "--type", help="Event type, e.g. WorkQueueCreated."),
    since: datetime = typer.Option(None, help="Only events that occurred at or after this moment (UTC)."),
    until: datetime = typer.Option(None, help="Only events that occurred at or before this moment (UTC)."),
    from_seq: int = typer.Option(1, help="Start at this stream sequence."),
    limit: int = typer.Option(None, help="Print at most this many events."),
    vocabulary: Literal["runledger", "prefect"] = typer.Option(
        "runledger", "--vocabulary",
        help="runledger: the stored envelopes, each with its seq. prefect: the events Prefect emits for "
             "the same facts (prefect.* events: pools, queues, deployments, flows, flow runs, variables, "
             "concurrency limits..., listed in docs/events.md); the filters pick the runledger "
             "events whose Prefect events are printed, --limit counts printed lines. A deployment or "
             "flow run (--aggregate and --id) also gets the events other aggregates write about it "
             "(a deployment's ready / not-ready)."),
    follow: bool = typer.Option(False, "--follow", "-f", help="Keep printing new events as they are appended, until Ctrl-C."),
) -> None:
    """Print the event log as JSON lines: one event per line, with its stream sequence, or
    (--vocabulary prefect) one Prefect event per line. With --follow, keep going as new events
    arrive."""
    settings = load_settings(role="analyst")
    subject = ".".join([settings.event_subject_prefix, aggregate or "*", aggregate_id or "*", event_type or "*"])
    prefect = vocabulary == "prefect"
    export = ExportState() if prefect else None
    if prefect:
        # Prefect events name things earlier events introduced (a queue's pool, the queues of
        # a deleted pool): read each aggregate's whole history, print only what the filters keep.
        subject = ".".join([settings.event_subject_prefix, aggregate or "*", aggregate_id or "*", "*"])

    lo, hi = _aware(since), _aware(until)

    async def go() -> None:
        # Ctrl-C sets `stopped` rather than cancelling the task: on Python 3.11 a cancel that
        # lands inside nats-py's `wait_for` can be swallowed, and a follower stayed deaf to it.
        stopped = asyncio.Event()
        loop = asyncio.get_running_loop()
        if follow:
            loop.add_signal_handler(signal.SIGINT, stopped.set)
        nc = await connect(settings, name="runledger-events", wait_for_server=False)
        printed = 0
        try:
            store = EventStore(nc, settings)
            start = 1 if prefect else from_seq
            from runledger.handlers.event_queries import WITH_NEIGHBOURS, neighbour_subjects
            from runledger.handlers.work_pool_commands import queue_index

            subjects, about = [subject], None
            if prefect and aggregate in WITH_NEIGHBOURS and aggregate_id:
                # One deployment or run: read with the aggregates that name what it relates and
                # those that write events about it (a deployment's READY / NOT_READY), as found
                # when the command starts; of theirs, print only the events about it.
                subjects += await neighbour_subjects(store, queue_index(store), aggregate, aggregate_id,
                                                     await store.last_sequence())
                about = f"prefect.{WITH_NEIGHBOURS[aggregate]}.{aggregate_id}"
            while not stopped.is_set():
                stop_if_cancelled()
                end = await store.last_sequence()
                async for batch in iter_log(store, subjects, start, until_seq=end):
                    for raw in batch:
                        env = EventEnvelope.model_validate_json(raw.data)
                        # The Prefect export folds every event it reads, printed or not.
                        exported = to_prefect_events(env, export) if export is not None else None
                        if raw.seq < from_seq or (event_type and env.type != event_type):
                            continue
                        if (lo and env.occurred < lo) or (hi and env.occurred > hi):
                            continue
                        neighbour = about is not None and (env.aggregate_type, env.aggregate_id) != (aggregate, aggregate_id)
                        if exported is not None and neighbour:
                            exported = [e for e in exported if e["resource"].get("prefect.resource.id") == about]
                        lines = exported if exported is not None else [{"seq": raw.seq, **env.model_dump(mode="json")}]
                        for line in lines:
                            sys.stdout.write(json.dumps(line) + "\n")
                            printed += 1
                            if limit is not None and printed >= limit:
                                return
                    sys.stdout.flush()  # a follower sees each batch at once, even through a pipe
                    if stopped.is_set():
                        return
                if not follow:
                    return
                # Then poll: the log's end, and a read of what was appended since.
                start = max(start, end + 1)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stopped.wait(), FOLLOW_POLL_SECONDS)
        finally:
            with contextlib.suppress(BrokenPipeError):
                sys.stdout.flush()
            if follow:
                loop.remove_signal_handler(signal.SIGINT)
            await nc.close()
            warning = export.warning() if export is not None else None
            if warning:
                sys.stderr.write(warning + "\n")

    try:
        _run(go())
    except KeyboardInterrupt:  # Ctrl-C ends --follow: what was printed is the output
        raise typer.Exit(0) from None
    except BrokenPipeError:  # the reader went away (`| head`): stop quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # nothing left to flush at exit
        raise typer.Exit(0) from None

