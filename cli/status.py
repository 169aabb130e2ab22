"""`runledger status`: is a service answering, and how far are its read models? A real round
trip through the broker (queries), so it serves as the container health check too: it fails
when no service answers (6) and when a projection is stalled at an event it cannot apply (7)."""

from __future__ import annotations

import asyncio

import typer
from rich.markup import escape

from runledger.client import RunledgerClient

from .main import app
from .output import JsonFlag, OutputOption, err_console, print_json, run, wants_json

# A projection is stopped at an event it cannot apply (see docs/operations.md, "A stalled
# projection"). `runledger verify` and `runledger replay` use the same code for the same fact.
EXIT_STALLED = 7


def stalled_line(failure: dict) -> str:
    return (f"projection {failure['projection']} is stopped at stream sequence {failure['seq']} "
            f"({failure['event_type']}): {failure['error']}")


@app.command()
def status(as_json: JsonFlag = False, output: OutputOption = None) -> None:
    """Ask the service two queries; exit 0 when it answers and every projection is applying,
    6 when nothing answers, 7 when a projection is stalled at an event it cannot apply."""

    async def ask(client: RunledgerClient):
        count, health = await asyncio.gather(client.query("CountWorkPools", {}), client.query("GetServiceHealth", {}))
        h = health.result or {}
        return {"answering": True, "work_pools": count.result, "read_model_seq": count.seq,
                "nats_url": client.settings.safe_nats_url(), "namespace": client.settings.namespace,
                "stream_last_seq": h.get("stream_last_seq"), "projections": h.get("projections", []),
                "stalled": h.get("stalled", []), "replication": h.get("replication")}

    info = run(ask)
    if wants_json(as_json, output):
        print_json(info)
    else:
        typer.echo(f"runledger is answering on {info['nats_url']} (namespace {info['namespace']}): "
                   f"{info['work_pools']} work pools, read models at stream sequence {info['read_model_seq']}"
                   + (f" of {info['stream_last_seq']}" if info["stream_last_seq"] is not None else ""))
        if (copies := info["replication"]) is not None:
            typer.echo(f"  event log: {copies['replicas']} replicas, led by {copies['leader']}; " + ", ".join(
                f"{peer['name']} " + ("offline" if peer["offline"] else "current" if peer["current"]
                                      else f"{peer['lag']} behind") for peer in copies["peers"]))
        for p in info["projections"]:
            where = f"at {p['checkpoint']}" + (f", {p['behind']} behind" if p.get("behind") else "")
            holder = p.get("lease_holder", "-")
            who = "no runner holds its lease" if holder is None else f"applied by {holder}"
            typer.echo(f"  projection {p['name']}: {where}{' (stalled)' if p['stalled'] else ''}; {who}")
    if info["stalled"]:
        for failure in info["stalled"]:
            err_console.print(f"[red]Error (stalled):[/red] {escape(stalled_line(failure))}")
        raise typer.Exit(EXIT_STALLED)
