"""`runledger broker-config`: the nats-server configuration of runledger's broker roles for a
namespace (what deploy/nats.conf holds for `runledger`), or fresh passwords for it as a
`.env` file for docker compose. With `--server-name` and `--route`, one node's of a NATS
cluster (docs/operations.md, "A NATS cluster").

`runledger broker-setup`: makes and upgrades runledger's streams and buckets as the admin role,
since the service's own may not (docs/security.md)."""

from __future__ import annotations

import asyncio
import os
import sys

import typer

from runledger.infra import broker_auth
from runledger.infra.settings import Settings

from .main import app
from .output import EXIT_ERROR, EXIT_UNAVAILABLE, err_console


@app.command("broker-config")
def broker_config(
    namespace: str = typer.Option("runledger", help="The namespace whose subjects, stream and buckets the roles cover."),
    env_file: bool = typer.Option(False, "--env-file",
                                  help="Print fresh random passwords as a .env file (RUNLEDGER_<ROLE>_PASSWORD=...) instead."),
    server_name: str | None = typer.Option(None, "--server-name", help="This node's name in a NATS cluster."),
    route: list[str] = typer.Option([], "--route", help="Another node's route address (host:port), once per node; "
                                    "the routes log in with RUNLEDGER_ROUTE_PASSWORD, which the file then holds."),
    cluster_listen: str = typer.Option("0.0.0.0:6222", "--cluster-listen", help="Where this node listens for the others."),
    route_tls_cert: str | None = typer.Option(None, "--route-tls-cert", help="This node's certificate for its routes (PEM)."),
    route_tls_key: str | None = typer.Option(None, "--route-tls-key", help="Its key (PEM)."),
    route_tls_ca: str | None = typer.Option(None, "--route-tls-ca",
                                            help="The CA the other nodes' certificates are checked against (PEM)."),
) -> None:
    """Print a nats-server configuration with users service, client, analyst, task_worker and admin,
    whose passwords nats-server reads from RUNLEDGER_<ROLE>_PASSWORD, and one user per task
    worker bound to keys (RUNLEDGER_TASK_WORKER_KEYS, JSON {"name": ["key", ...]}): user
    task_worker_<name>, password from RUNLEDGER_TASK_WORKER_<NAME>_PASSWORD."""
    from runledger.infra.settings import load_settings

    bound = load_settings(role="service").task_worker_keys
    if env_file:
        sys.stdout.write(broker_auth.dotenv(task_worker_keys=bound))
        return
    cluster = None
    if server_name is not None or route:
        if server_name is None or not route:
            raise typer.BadParameter("a cluster node needs both --server-name and at least one --route")
        tls_files = (route_tls_cert, route_tls_key, route_tls_ca)
        if any(tls_files) and not all(tls_files):
            raise typer.BadParameter("route TLS needs all of --route-tls-cert, --route-tls-key and --route-tls-ca")
        tls = broker_auth.RouteTLS(*tls_files) if route_tls_cert and route_tls_key and route_tls_ca else None
        try:
            cluster = broker_auth.ClusterNode(server_name, route, os.environ.get(broker_auth.ROUTE_PASSWORD_VAR, ""),
                                              listen=cluster_listen, tls=tls)
        except ValueError as e:
            raise typer.BadParameter(str(e)) from None
    sys.stdout.write(broker_auth.compose_config(namespace, bound, cluster))


async def set_up_broker(settings: Settings, *, change: bool) -> list[str]:
    """`ensure_broker` over a connection of its own (`settings`: the admin's credentials, the
    service's namespace and stream settings)."""
    from runledger.infra.jetstream_setup import ensure_broker
    from runledger.infra.nats_connection import connect

    nc = await connect(settings, name="runledger-broker-setup", wait_for_server=False)
    try:
        return await ensure_broker(nc.jetstream(timeout=settings.request_timeout), settings, change=change)
    finally:
        await nc.close()


def admin_settings() -> Settings:
    """The admin's credentials (RUNLEDGER_NATS_USER and RUNLEDGER_NATS_PASSWORD, or those a
    running `runledger up` recorded), with its own inbox unless RUNLEDGER_INBOX_PREFIX names
    one; the stream settings (namespace, replicas, task queue bounds) are the service's, from
    the same environment."""
    from runledger.infra.settings import load_settings

    settings = load_settings(role="service", user="admin")
    if "RUNLEDGER_INBOX_PREFIX" not in os.environ:
        settings = settings.model_copy(update={"inbox_prefix": broker_auth.inbox_prefix("admin")})
    return settings


@app.command("broker-setup")
def broker_setup(
    check: bool = typer.Option(False, "--check", help="Change nothing: print what is missing or outdated, "
                               "and exit 1 if anything is."),
) -> None:
    """Make or upgrade runledger's streams and buckets, as the admin role (its credentials from
    RUNLEDGER_NATS_USER=admin and RUNLEDGER_NATS_PASSWORD, or a running `runledger up`'s).
    Run it before the first start and before starting a new version; the service, with its own
    credentials, only checks them. Prints each change, or "already set up"."""
    from runledger.infra.nats_connection import BrokerUnavailable

    settings = admin_settings()
    try:
        said = asyncio.run(set_up_broker(settings, change=not check))
    except BrokerUnavailable as e:
        err_console.print(f"[red]Error (unavailable):[/red] {_escape(str(e))}")
        raise typer.Exit(EXIT_UNAVAILABLE) from None
    except OSError as e:
        err_console.print(f"[red]Error (unavailable):[/red] {type(e).__name__}: {_escape(str(e.strerror or e))}")
        raise typer.Exit(EXIT_UNAVAILABLE) from None
    for line in said or ["already set up"]:
        typer.echo(line)
    if check and said:
        raise typer.Exit(EXIT_ERROR)


def _escape(text: str) -> str:
    from rich.markup import escape

    return escape(text)
