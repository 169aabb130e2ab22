"""`runledger broker-config`: the nats-server configuration of runledger's broker roles for a
namespace (what deploy/nats.conf holds for `runledger`), or fresh passwords for it as a
`.env` file for docker compose."""

from __future__ import annotations

import sys

import typer

from runledger.infra import broker_auth

from .main import app


@app.command("broker-config")
def broker_config(
    namespace: str = typer.Option("runledger", help="The namespace whose subjects, stream and buckets the roles cover."),
    env_file: bool = typer.Option(False, "--env-file",
                                  help="Print fresh random passwords as a .env file (RUNLEDGER_<ROLE>_PASSWORD=...) instead."),
) -> None:
    """Print a nats-server configuration with users service, client, analyst and task_worker,
    whose passwords nats-server reads from RUNLEDGER_<ROLE>_PASSWORD, and one user per task
    worker bound to keys (RUNLEDGER_TASK_WORKER_KEYS, JSON {"name": ["key", ...]}): user
    task_worker_<name>, password from RUNLEDGER_TASK_WORKER_<NAME>_PASSWORD."""
    from runledger.infra.settings import load_settings

    bound = load_settings(role="service").task_worker_keys
    sys.stdout.write(broker_auth.dotenv(task_worker_keys=bound) if env_file
                     else broker_auth.compose_config(namespace, bound))
