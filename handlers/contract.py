"""The broker contract as data: every command and query subject with its payload schema, and
the AsyncAPI 3.0 document generated from the same pydantic models the service validates with
(`runledger asyncapi > docs/asyncapi.json`)."""

from __future__ import annotations

from typing import Any

from runledger.commands.events import EVENT_TYPES
from runledger.commands.queries import GetTaskRunResult, ListTaskWorkers, ReadEvents
from runledger.projections.health import GetServiceHealth

from .registry import QUERIES, command_specs

STALLED_SCHEMA: dict[str, Any] = {
    "type": "array",
    "description": "On a query whose `min_seq` a read model cannot reach: it is stopped at an event it cannot apply at or before it; the answer comes from it as it stands, without that event and what followed.",
    "items": {"type": "object", "required": ["projection", "seq", "event_type"], "properties": {
        "projection": {"type": "string"}, "seq": {"type": "integer"}, "event_type": {"type": "string"}}},
}

REPLY_SCHEMA: dict[str, Any] = {
    "oneOf": [
        {
            "type": "object",
            "required": ["ok", "result"],
            "properties": {
                "ok": {"const": True},
                "result": {"description": "The command's or query's result (object, list, integer or null)."},
                "seq": {"type": ["integer", "null"], "description": "Stream sequence of the last event this command appended (or the read model's position for a query); pass it as `min_seq` to read your writes."},
                "created": {"type": ["boolean", "null"], "description": "true when a create made a new object, false when it returned an existing one."},
                "repeat": {"type": "boolean", "description": "Present and true when an idempotency key was seen before: the first reply, nothing appended."},
                "truncated": {"type": "boolean", "description": "Present and true when the reply was cut to fit the broker's max payload: a list query's shorter page (ask again from `next_offset`), or a command's reply without its result."},
                "next_offset": {"type": "integer", "description": "With `truncated` on a list query: the `offset` to ask for the rest from."},
                "orchestration": {
                    "type": "object", "required": ["status", "details"],
                    "description": "On commands that propose a state transition: the orchestration outcome; the command's events were appended whatever the status.",
                    "properties": {
                        "status": {"enum": ["ACCEPT", "REJECT", "WAIT", "ABORT"]},
                        "details": {"type": "object", "properties": {
                            "reason": {"type": "string"}, "delay_seconds": {"type": "integer"}}},
                    },
                },
                "stalled": STALLED_SCHEMA,
            },
        },
        {
            "type": "object",
            "required": ["ok", "error"],
            "properties": {
                "ok": {"const": False},
                "error": {
                    "type": "object",
                    "required": ["code", "message"],
                    "properties": {
                        "code": {"enum": ["not_found", "conflict", "invalid", "forbidden", "unavailable"]},
                        "message": {"type": "string"},
                        "field": {"type": ["string", "null"]},
                        "details": {},
                    },
                },
                "stalled": STALLED_SCHEMA,
            },
        },
    ]
}


def asyncapi_document(namespace: str = "runledger") -> dict[str, Any]:
    channels: dict[str, Any] = {}
    operations: dict[str, Any] = {}
    messages: dict[str, Any] = {"Reply": {"name": "Reply", "payload": REPLY_SCHEMA}}
    kinds = [("cmd", {n: s.model for n, s in command_specs(None).items()}),
             # The queries answered beside the read models too (handlers/task_worker_queries.py).
             ("qry", {**{n: m for n, (m, _) in QUERIES.items()}, "GetServiceHealth": GetServiceHealth,
                     "ReadEvents": ReadEvents, "GetTaskRunResult": GetTaskRunResult,
                     "ListTaskWorkers": ListTaskWorkers})]
    for kind, models in kinds:
        for name, model in sorted(models.items()):
            address = f"{namespace}.{kind}.{name}"
            messages[name] = {"name": name, "title": name, "summary": (model.__doc__ or "").strip().split("\n")[0] or name,
                              "payload": model.model_json_schema()}
            channels[name] = {"address": address, "messages": {name: {"$ref": f"#/components/messages/{name}"}}}
            channels[f"{name}.reply"] = {"address": None, "messages": {"Reply": {"$ref": "#/components/messages/Reply"}}}
            operations[name] = {
                "action": "receive",
                "channel": {"$ref": f"#/channels/{name}"},
                "summary": f"{'command' if kind == 'cmd' else 'query'} {name} (request/reply, queue group runledger-{'commands' if kind == 'cmd' else 'queries'})",
                "reply": {"channel": {"$ref": f"#/channels/{name}.reply"}},
            }
    for name, event in sorted(EVENT_TYPES.items()):
        address = f"{namespace}.evt.{event.aggregate_type}.{{id}}.{name}"
        messages[f"event.{name}"] = {"name": name, "summary": (event.__doc__ or name).strip().split("\n")[0],
                                     "payload": event.model_json_schema()}
        channels[f"event.{name}"] = {"address": address, "messages": {name: {"$ref": f"#/components/messages/event.{name}"}}}
    return {
        "asyncapi": "3.0.0",
        "info": {"title": "runledger broker contract", "version": "0.1.0",
                 "description": "Commands and queries are NATS request/reply; events are JetStream messages (payload shown; each is wrapped in the event envelope, see docs/events.md)."},
        "defaultContentType": "application/json",
        "channels": channels,
        "operations": operations,
        "components": {"messages": messages},
    }
