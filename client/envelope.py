"""The wire format of the broker contract: request bodies out, reply envelopes in.

A success is `{"ok": true, "result": ..., "seq": int|null, "created": bool|null}` (and, for a
proposed state, `"orchestration": {...}`); an error is
`{"ok": false, "error": {"code", "message", "field"?, "details"?}}` and becomes the typed
exception for its code (see `errors.py`)."""

from __future__ import annotations

import enum
import json
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import date, datetime
from typing import Any

from pydantic import BaseModel

from .errors import Invalid, ProtocolError, error_from_reply


class Unset(enum.Enum):
    """The type of `UNSET`: "not given", as opposed to an explicit None (partial updates)."""

    UNSET = "UNSET"

    def __repr__(self) -> str:
        return "UNSET"


UNSET = Unset.UNSET


@dataclass(frozen=True, slots=True)
class Reply:
    """A successful reply: the raw JSON result, the stream sequence of the last event the
    command appended (or the read model's position), and whether a create made something new."""

    result: Any
    seq: int | None = None
    created: bool | None = None
    # Set when the service cut a list page to fit the broker's max payload (`truncated`): the
    # offset to ask for the rest from (docs/protocol.md, "Replies").
    next_offset: int | None = None
    # A proposed state's outcome, beside the result (`SetFlowRunState`):
    # `{"status": "ACCEPT"|"REJECT"|"WAIT"|"ABORT", "details": {...}}`.
    orchestration: dict[str, Any] | None = None
    # Read models a query's `min_seq` wait left out: stopped at an event they cannot apply at
    # or before it, so the answer may lack what came later in them (docs/protocol.md):
    # `[{"projection", "seq", "event_type"}]`.
    stalled: list[dict[str, Any]] | None = None


def given(**fields: Any) -> dict[str, Any]:
    """The fields the caller gave: what `model_dump(exclude_unset=True)` would send."""
    return {k: v for k, v in fields.items() if v is not UNSET}


def _json_default(value: Any) -> Any:
    if isinstance(value, BaseModel):
        return value.model_dump(mode="json", exclude_unset=True)
    if isinstance(value, datetime | date):
        return value.isoformat()
    if isinstance(value, uuid.UUID):
        return str(value)
    if isinstance(value, set | frozenset | tuple):
        return list(value)
    raise TypeError(f"{type(value).__name__} is not JSON serializable")


def encode_body(body: Mapping[str, Any]) -> bytes:
    """JSON for a request, unvalidated: the service decides what is valid, so its `invalid`
    replies (with field and reason) are what the caller sees. Only a value JSON cannot express
    is refused here, as `Invalid` naming the field.

    Text goes as UTF-8, not as `\\u` escapes, which make a character up to six bytes (and a
    request past the broker's max payload sooner); the service reads both alike. A lone
    surrogate has no UTF-8: that body goes escaped, and the service says which field holds it."""
    try:
        text = json.dumps(body, default=_json_default, separators=(",", ":"), ensure_ascii=False)
    except (TypeError, ValueError):
        for key, value in body.items():
            try:
                json.dumps(value, default=_json_default)
            except (TypeError, ValueError) as e:
                raise Invalid(f"{key}: {e}", field=key) from None
        raise
    try:
        return text.encode()
    except UnicodeEncodeError:
        return json.dumps(body, default=_json_default, separators=(",", ":")).encode()


def too_large_to_send(name: str, body: Mapping[str, Any], size: int, limit: int) -> Invalid:
    """The error for a request over the broker's max payload, which nats-py refuses before
    sending anything: the caller's to change (as the service's own "too large" `invalid`,
    naming the largest field), not a retry's."""
    sizes = {key: len(json.dumps(value, default=_json_default, ensure_ascii=False).encode(errors="replace"))
             for key, value in body.items()}
    field = max(sizes, key=sizes.__getitem__) if sizes else None
    return Invalid(f"{name} is too large to send: its request would be {size:,} bytes; the server's max payload is "
                   f"{limit:,} bytes", field=field)


def parse_reply(data: bytes, subject: str) -> Reply:
    """The `Reply` of a success envelope; raises the typed error of an error envelope."""
    try:
        envelope = json.loads(data)
    except ValueError:
        raise ProtocolError(f"reply on {subject} is not JSON: {data[:200]!r}") from None
    if not isinstance(envelope, dict) or not isinstance(envelope.get("ok"), bool):
        raise ProtocolError(f"reply on {subject} is not a runledger envelope: {data[:200]!r}")
    if not envelope["ok"]:
        raise error_from_reply(envelope.get("error"))
    seq = envelope.get("seq")
    created = envelope.get("created")
    if not (seq is None or (isinstance(seq, int) and not isinstance(seq, bool))):
        raise ProtocolError(f"reply on {subject} has a non-integer seq: {seq!r}")
    next_offset = envelope.get("next_offset") if envelope.get("truncated") is True else None
    if not (next_offset is None or (isinstance(next_offset, int) and not isinstance(next_offset, bool))):
        raise ProtocolError(f"reply on {subject} has a non-integer next_offset: {next_offset!r}")
    orchestration = envelope.get("orchestration")
    if not (orchestration is None or isinstance(orchestration, dict)):
        raise ProtocolError(f"reply on {subject} has an orchestration that is not an object: {orchestration!r}")
    stalled = envelope.get("stalled")
    if not (stalled is None or (isinstance(stalled, list) and all(isinstance(s, dict) for s in stalled))):
        raise ProtocolError(f"reply on {subject} has a stalled that is not a list of objects: {stalled!r}")
    return Reply(result=envelope.get("result"), seq=seq, created=created if isinstance(created, bool) else None,
                 next_offset=next_offset, orchestration=orchestration, stalled=stalled or None)
