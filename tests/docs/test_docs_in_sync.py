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


def test_no_user_facing_document_cites_a_rule_id_of_the_behaviour_contract():
    """The behaviour contract's rule ids (`FR-7`, `OR-14`, ...) are the developers' shorthand,
    from a document the project does not ship: a user reading the docs or the AsyncAPI
    contract (built from docstrings) would find them unexplained."""
    import re

    rule_id = re.compile(r"\b(?:C|DP|SC|OR|FR|SL|GS|WQ|WP|TQ|TR|LQ|ST|WK|PR)-\d+\b")
    texts = {p.name: p.read_text() for p in [*DOCS.glob("*.md"), DOCS.parent / "README.md"]}
    texts["asyncapi (generated)"] = json.dumps(asyncapi_document())
    cited = {name: sorted(set(rule_id.findall(text))) for name, text in texts.items() if rule_id.search(text)}
    assert cited == {}
