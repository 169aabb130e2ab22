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
    """Print a nats-server configuration with users service, client and analyst, whose
    passwords nats-server reads from RUNLEDGER_<ROLE>_PASSWORD."""
    sys.stdout.write(broker_auth.dotenv() if env_file else broker_auth.compose_config(namespace))
