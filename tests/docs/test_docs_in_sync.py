"""The published contract documents must match the code that serves it."""

import json
from pathlib import Path

from runledger.commands.events import EVENT_TYPES
from runledger.handlers.contract import asyncapi_document

DOCS = Path(__file__).resolve().parents[2] / "docs"


def test_asyncapi_json_is_the_generated_one():
    assert json.loads((DOCS / "asyncapi.json").read_text()) == json.loads(json.dumps(asyncapi_document()))


def test_every_event_type_is_in_the_catalogue():
    catalogue = (DOCS / "events.md").read_text()
    missing = [t for t in EVENT_TYPES if f"`{t}`" not in catalogue]
    assert missing == []


def test_every_command_and_query_is_in_the_protocol_doc():
    protocol = (DOCS / "protocol.md").read_text()
    doc = asyncapi_document()
    missing = [name for name in doc["operations"] if f"`{name}`" not in protocol]
    assert missing == []
