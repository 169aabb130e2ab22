"""`runledger broker-config`: the nats-server configuration of runledger's broker roles for a
namespace (what deploy/nats.conf holds for `runledger`), or fresh passwords for it as a
`.env` file for docker compose. With `--server-name` and `--route`, one node's of a NATS
cluster (docs/operations.md, "A NATS cluster")."""

from __future__ import annotations

import os
import sys

import typer

from runledger.infra import broker_auth

from .main import app


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
    """Print a nats-server configuration with users service, client, analyst and task_worker,
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
