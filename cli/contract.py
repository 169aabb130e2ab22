"""`runledger asyncapi`: the broker contract as an AsyncAPI document."""

from __future__ import annotations

import json

import typer

from .main import app


@app.command()
def asyncapi(namespace: str = typer.Option("runledger", help="Subject prefix to document.")) -> None:
    """Print the AsyncAPI 3.0 document of the broker contract (generated from the models)."""
    from runledger.handlers.contract import asyncapi_document

    print(json.dumps(asyncapi_document(namespace), indent=2, sort_keys=True))
