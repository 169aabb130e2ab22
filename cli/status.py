"""`runledger status`: is a service answering, and how far are its read models? A real round
trip through the broker (a query), so it serves as the container health check too."""

from __future__ import annotations

import typer

from runledger.client import RunledgerClient

from .main import app
from .output import JSON_HELP, print_json, run


@app.command()
def status(as_json: bool = typer.Option(False, "--json", help=JSON_HELP)) -> None:
    """Ask the service a query; exit 0 when it answers, 6 when nothing does."""

    async def ask(client: RunledgerClient):
        reply = await client.query("CountWorkPools", {})
        return {"answering": True, "work_pools": reply.result, "read_model_seq": reply.seq,
                "nats_url": client.settings.safe_nats_url(), "namespace": client.settings.namespace}

    info = run(ask)
    if as_json:
        print_json(info)
    else:
        typer.echo(f"runledger is answering on {info['nats_url']} (namespace {info['namespace']}): "
                   f"{info['work_pools']} work pools, read models at stream sequence {info['read_model_seq']}")
