"""`runledger up` (everything embedded, one command) and `runledger serve` (against the servers
the environment names)."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import json
import logging
import os
import signal
import sys
import time
from pathlib import Path

import typer
from rich.console import Console
from rich.markup import escape

from runledger.infra import event_loop
from runledger.infra.database import DatabaseUnavailable
from runledger.infra.nats_connection import BrokerUnavailable
from runledger.infra.settings import Settings, endpoint_file, load_settings

from .main import app

console = Console(stderr=True, soft_wrap=True)
EXIT_UNAVAILABLE = 6
ROLES = ("commands", "queries", "projections", "scheduler", "clock", "foreman", "task_recovery", "vacuum")


def default_data_dir() -> Path:
    """~/.local/share/runledger; as root /var/lib/runledger, since Postgres then runs as a
    system user that must get through every parent (/root is 0700)."""
    if os.environ.get("XDG_DATA_HOME"):
        return Path(os.environ["XDG_DATA_HOME"]) / "runledger"
    if hasattr(os, "geteuid") and os.geteuid() == 0:
        return Path("/var/lib/runledger")
    return Path.home() / ".local" / "share" / "runledger"


def _configure_logging(verbose: bool) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    for noisy in ("nats", "faststream", "asyncio", "pgserver"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


async def _serve_until_signalled(settings: Settings, roles: frozenset[str], on_ready=None) -> None:
    from runledger.handlers.service import Service

    service = Service(settings, roles=roles)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):  # SIGHUP: its terminal closed
        loop.add_signal_handler(sig, stop.set)
    await service.start()
    try:
        if on_ready:
            on_ready()
        # A signal is a clean stop; a NATS connection closed for good (nats-py does not
        # reconnect after a fatal protocol error) ends the process with an error, so that its
        # supervisor starts it again instead of it living on deaf.
        signalled = asyncio.ensure_future(stop.wait())
        lost = asyncio.ensure_future(service.lost.wait())
        try:
            await asyncio.wait({signalled, lost}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            signalled.cancel()
            lost.cancel()
        if service.lost.is_set() and not stop.is_set():
            raise BrokerUnavailable(f"the NATS connection closed for good ({service.lost_reason}); "
                                    "exiting so that a supervisor restarts the service")
    finally:
        await service.stop()


def _tune_garbage_collector() -> None:
    """Every request allocates many short-lived objects; with the default threshold (a gen-0
    collection every 700 allocations) the collector runs several times per command. Objects
    alive at start-up are frozen out of its scans."""
    gc.freeze()
    gc.set_threshold(10_000, 10, 10)


def _parse_roles(roles: str) -> frozenset[str]:
    chosen = frozenset(r.strip() for r in roles.split(",") if r.strip())
    unknown = chosen - set(ROLES)
    if unknown or not chosen:
        raise typer.BadParameter(f"roles must be a comma-separated subset of {','.join(ROLES)}")
    return chosen


def _roles_to_run(chosen: frozenset[str], settings: Settings) -> frozenset[str]:
    """Without a retention (RUNLEDGER_FLOW_RUN_RETENTION_SECONDS) the vacuum does nothing: left
    out, so that the ready line does not name it among the roles running."""
    return chosen if settings.flow_run_retention_seconds else chosen - {"vacuum"}


@app.command()
def serve(
    roles: str = typer.Option(",".join(ROLES), help="Which parts to run here: commands,queries,projections,scheduler,clock,foreman,task_recovery,vacuum (the last five hold a lease: one active on the servers at a time; the vacuum runs only with RUNLEDGER_FLOW_RUN_RETENTION_SECONDS set)."),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Log at DEBUG level, not INFO."),
) -> None:
    """Run the service against RUNLEDGER_NATS_URL and RUNLEDGER_DATABASE_URL."""
    _configure_logging(verbose)
    settings = load_settings(role="service")  # credentials and inbox prefix from the environment
    chosen = _roles_to_run(_parse_roles(roles), settings)
    _tune_garbage_collector()
    try:
        event_loop.run(_serve_until_signalled(settings, chosen), settings.event_loop)
    except (BrokerUnavailable, DatabaseUnavailable) as e:
        console.print(f"[red]Error (unavailable):[/red] {e}")
        raise typer.Exit(EXIT_UNAVAILABLE) from None
    except OSError as e:  # Postgres and NATS failures have their own errors above
        console.print(f"[red]Error (unavailable):[/red] {type(e).__name__}: {e.strerror or e}")
        raise typer.Exit(EXIT_UNAVAILABLE) from None


def _ports_of_last_run(data_dir: Path) -> tuple[int, int, int | None]:
    """The NATS client and monitoring ports `up` listened on last time in this data directory,
    where still free (0: a free one), and the client port it had to leave (None: kept or none
    recorded). Keeping them keeps the task workers and other clients of the last run, which
    reconnect to the address they were given, working across a restart of `up`."""
    from runledger.infra.embedded import port_free

    try:
        last = json.loads((data_dir / PORTS_FILE).read_text())
        nats_port, monitor_port = int(last["nats"]), int(last["monitor"])
    except (OSError, ValueError, KeyError, TypeError):
        return 0, 0, None
    if not (0 < nats_port < 65536 and 0 < monitor_port < 65536 and nats_port != monitor_port):
        return 0, 0, None
    kept_nats = nats_port if port_free(nats_port) else 0
    kept_monitor = monitor_port if port_free(monitor_port) else 0
    return kept_nats, kept_monitor, (nats_port if not kept_nats else None)


def _keep_ports(data_dir: Path, nats_port: int, monitor_port: int) -> None:
    with contextlib.suppress(OSError):
        (data_dir / PORTS_FILE).write_text(json.dumps({"nats": nats_port, "monitor": monitor_port}) + "\n")


# Where `up` notes the ports it listened on, to take them again on its next start.
PORTS_FILE = "ports.json"


@app.command()
def up(
    data_dir: Path = typer.Option(None, "--data-dir", help="Where NATS and Postgres keep their data (default: ~/.local/share/runledger; as root /var/lib/runledger)."),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Log at DEBUG level, not INFO."),
) -> None:
    """Start an embedded NATS and Postgres (127.0.0.1 only; NATS on the ports of the last run in
    this data directory when they are free, else free ones) and the service, in one command. Ctrl-C stops all three; the data stays in the data directory."""
    from pydantic import SecretStr

    from runledger.infra import broker_auth
    from runledger.infra.embedded import EmbeddedNats, EmbeddedPostgres, PostgresUnavailable
    from runledger.infra.lifetime import DataDirInUse, DataDirLock

    from .broker_config import set_up_broker

    _configure_logging(verbose)
    started = time.perf_counter()
    legacy = Path.home() / ".local" / "share" / "runledger"  # root's default before /var/lib
    if data_dir is None and default_data_dir() != legacy and (legacy / "pg").is_dir():
        console.print(f"note: data from an earlier runledger is in {legacy}; --data-dir {legacy} uses it")
    data_dir = (data_dir or default_data_dir()).expanduser().resolve()
    if (other := _other_live_up(data_dir)) is not None:  # before anything is made: its endpoint file is the CLI's way to it
        pid, other_dir = other
        console.print(f"[red]Error (in use):[/red] {escape(str(endpoint_file()))} belongs to runledger up process "
                      f"{pid} of {escape(other_dir)}, still running; set RUNLEDGER_CONFIG_DIR to another directory "
                      "for this one (and for the CLI that talks to it)", highlight=False)
        raise typer.Exit(EXIT_UNAVAILABLE)
    data_dir.mkdir(parents=True, exist_ok=True)
    try:  # one `up` per data dir, for its whole life; the kernel drops the lock when it dies
        lock = DataDirLock(data_dir).acquire()
    except DataDirInUse as e:  # before anything is started or written, the endpoint file too
        console.print(f"[red]Error (in use):[/red] {escape(str(e))}")
        raise typer.Exit(EXIT_UNAVAILABLE) from None
    # Users and permissions per role (infra/broker_auth.py), passwords made once per data dir;
    # the server refuses unauthenticated connections and syncs every write before its ack.
    service_settings = load_settings(role="service")
    creds = broker_auth.local_credentials(data_dir, service_settings.task_worker_keys)
    nats_config = broker_auth.write_local_config(data_dir, service_settings.namespace, creds, data_dir / "nats")
    nats_port, monitor_port, moved = _ports_of_last_run(data_dir)
    nats_server = EmbeddedNats(data_dir / "nats", port=nats_port, monitor_port=monitor_port, config_file=nats_config)
    postgres = EmbeddedPostgres(data_dir / "pg")
    try:  # its binaries and, as root, the user it runs as and that user's way in
        postgres.prepare()
    except (PostgresUnavailable, DataDirInUse) as e:
        console.print(f"[red]Error (unavailable):[/red] {escape(str(e))}")
        raise typer.Exit(EXIT_UNAVAILABLE) from None
    if postgres.notice:
        console.print(escape(postgres.notice))
    record = endpoint_file()
    try:
        with console.status("starting NATS and Postgres..."):
            nats_server.start()
            postgres.start()
        _keep_ports(data_dir, nats_server.port, nats_server.monitor_port)
        if moved:
            console.print(f"note: NATS listens on {nats_server.port}, not on {moved} as last time (another process holds "
                          "it): restart the task workers and other long-running clients of the last run")
        settings = load_settings(role="service", nats_url=nats_server.url, database_url=postgres.url,
                                 nats_user=creds["service"]["user"], nats_password=creds["service"]["password"])
        _tune_garbage_collector()  # as `serve` does: `up` served ~25 % fewer commands without it

        def ready() -> None:
            record.parent.mkdir(parents=True, exist_ok=True)
            broker_auth.write_private(record, json.dumps({
                "nats_url": settings.nats_url, "database_url": settings.database_url.get_secret_value(),
                "namespace": settings.namespace, "data_dir": str(data_dir), "pid": os.getpid(),
                "nats_users": creds,  # per role; load_settings(role=...) picks one
            }, indent=2))  # mode 0600 from the first byte: it holds passwords
            console.print(f"[green]runledger is up[/green] in {time.perf_counter() - started:.1f} s")
            console.print(f"  NATS      {settings.nats_url}  (monitoring http://127.0.0.1:{nats_server.monitor_port})")
            console.print(f"  Postgres  {settings.safe_database_url()}")
            console.print(f"  data      {data_dir}")
            console.print(f"  users     {', '.join(creds)} (passwords in {data_dir / 'credentials.json'}, mode 0600)")
            console.print(f"  endpoint  {record}  (other terminals find the service through it)")
            console.print("Press Ctrl-C to stop.")

        # The streams and buckets are the admin's to make and upgrade (the service's role may
        # not): done here, in-process, with the admin's credentials, before the service starts.
        admin = settings.model_copy(update={"nats_user": creds["admin"]["user"],
                                            "nats_password": SecretStr(creds["admin"]["password"]),
                                            "inbox_prefix": broker_auth.inbox_prefix("admin")})

        async def set_up_and_serve() -> None:
            for line in await set_up_broker(admin, change=True):
                logging.getLogger("runledger.up").info("broker set up: %s", line)
            await _serve_until_signalled(settings, _roles_to_run(frozenset(ROLES), settings), on_ready=ready)

        event_loop.run(set_up_and_serve(), settings.event_loop)
    except (BrokerUnavailable, DatabaseUnavailable, PostgresUnavailable, DataDirInUse) as e:
        console.print(f"[red]Error (unavailable):[/red] {escape(str(e))}")
        raise typer.Exit(EXIT_UNAVAILABLE) from None
    finally:
        _remove_own_record(record)
        postgres.stop()
        nats_server.stop()
        lock.release()
        console.print("runledger stopped; data kept in", str(data_dir))


def _other_live_up(data_dir: Path) -> tuple[int, str] | None:
    """The pid and data dir of a running `up` whose endpoint file this one would overwrite: the
    file is one per config dir, and the first would be left unreachable by the CLI. Its own data
    dir's lock refuses a second `up` there, naming it, so only another data dir is refused here."""
    from runledger.infra.lifetime import alive
    from runledger.infra.settings import recorded_endpoint

    recorded = recorded_endpoint()
    pid, other_dir = recorded.get("pid"), recorded.get("data_dir")
    if not isinstance(pid, int) or not isinstance(other_dir, str) or other_dir == str(data_dir) or not alive(pid):
        return None
    if not _locked(Path(other_dir)):  # that `up` is gone (its pid may be another program's since)
        return None
    return pid, other_dir


def _locked(data_dir: Path) -> bool:
    """Whether a live `up` holds that data dir's lock (`DataDirLock`), looked at without
    taking it for long nor writing to it."""
    import fcntl

    from runledger.infra.lifetime import LOCK_NAME

    try:
        fd = os.open(data_dir / LOCK_NAME, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)  # closing drops a lock taken here
    return False


def _remove_own_record(record: Path) -> None:
    try:
        if json.loads(record.read_text()).get("pid") == os.getpid():
            record.unlink()
    except (OSError, ValueError):
        pass
