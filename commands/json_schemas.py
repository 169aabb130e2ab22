"""JSON Schemas as Prefect checks values against them: a deployment's parameters and a work
pool's job variables. Validation resolves references inside the schema only (nothing is
fetched), keeps one validator per schema, and, where Prefect preprocesses a schema written
by Pydantic v1 (`preprocess_schema`), does the same, so the same values pass or fail on both.
"""

from __future__ import annotations

import copy
import json
from functools import lru_cache
from typing import Any

import jsonschema
from jsonschema.exceptions import SchemaError


def _without_required(schema: Any) -> Any:
    """A schema with every `required` removed, at any depth: DP-4 and DP-5 accept partial
    values (a deployment may leave a parameter to each run)."""
    if isinstance(schema, dict):
        return {k: _without_required(v) for k, v in schema.items() if k != "required"}
    if isinstance(schema, list):
        return [_without_required(v) for v in schema]
    return schema


def _no_remote_refs(uri: str) -> Any:
    raise ValueError(f"references outside the schema are not fetched: {uri}")


def schema_problem(schema: dict[str, Any]) -> str | None:
    """Why `schema` is not a valid JSON Schema (draft 2020-12), or None."""
    try:
        jsonschema.Draft202012Validator.check_schema(schema)
    except SchemaError as e:
        return f"Invalid schema: {e.message}"
    except RecursionError:
        return "Invalid schema: it is circular"
    return None


def validation_problem(value: dict[str, Any], schema: dict[str, Any], *, ignore_required: bool,
                       preprocess: bool = False, allow_none_with_default: bool = False) -> str | None:
    """Why `value` does not conform to `schema`, in Prefect's words ("Validation failed for
    field 'x'. Failure reason: ..."), or None. References are resolved inside the schema only.
    `preprocess`: Prefect's newer checks (a run's parameters and job variables, an update's
    parameters) fix the schema first (`preprocess_schema`), so that null is accepted where
    Pydantic v1 schemas meant it; the create-time check (DP-5) does not."""
    try:
        validator = _validator(json.dumps(schema, sort_keys=True), ignore_required, preprocess,
                               allow_none_with_default)
        errors = sorted(validator.iter_errors(value), key=lambda e: list(map(str, e.path)))
    except RecursionError:
        return CIRCULAR_SCHEMA
    except Exception as e:  # an unresolvable $ref
        return f"Validation failed: {type(e).__name__}: {e}"
    if not errors:
        return None
    first = errors[0]
    where = ".".join(str(p) for p in first.path)
    if where:
        return f"Validation failed for field {where!r}. Failure reason: {first.message}"
    return f"Validation failed. Failure reason: {first.message}"


CIRCULAR_SCHEMA = "Invalid schema: Unable to validate schema with circular references."


@lru_cache(maxsize=256)
def _validator(schema_json: str, ignore_required: bool, preprocess: bool, allow_none_with_default: bool) -> Any:
    """One validator per schema, kept: building one costs more than validating with it, and a
    deployment's runs all use its schema. Keyed by the schema's JSON text (dicts do not hash)."""
    from referencing import Registry

    schema = json.loads(schema_json)
    if preprocess:  # before `required` goes: it says which properties may be null
        schema = preprocess_schema(schema, allow_none_with_default)
    checked = _without_required(schema) if ignore_required else schema
    return jsonschema.Draft202012Validator(checked, registry=Registry(retrieve=_no_remote_refs))  # type: ignore[call-arg]


def _fix_null_typing(key: str, schema: dict[str, Any], required_fields: list[str],
                     allow_none_with_default: bool) -> None:
    """Pydantic v1 wrote an optional field as its type alone: a property that is not required
    and has no default (or any, with `allow_none_with_default`) accepts null too."""
    if (key not in required_fields and "type" in schema and schema.get("type") != "null"
            and ("default" not in schema or allow_none_with_default)):
        schema["anyOf"] = [{"type": schema["type"]}, {"type": "null"}]
        del schema["type"]


def _fix_tuple_items(schema: dict[str, Any]) -> None:
    """Pydantic v1 wrote a tuple's items as a list, which draft 2020-12 spells `prefixItems`."""
    if schema.get("items") and isinstance(schema["items"], list) and not schema.get("prefixItems"):
        schema["prefixItems"] = copy.deepcopy(schema["items"])
        del schema["items"]


def _process_properties(properties: dict[str, Any], required_fields: list[str],
                        allow_none_with_default: bool = False) -> None:
    """Prefect's `process_properties`, quirks kept so that the same values pass: nested
    properties are fixed without `allow_none_with_default`, and once a property with nested
    properties is met, its `required` list is used for the siblings that follow it."""
    for key, schema in properties.items():
        if not isinstance(schema, dict):
            continue
        _fix_null_typing(key, schema, required_fields, allow_none_with_default)
        _fix_tuple_items(schema)
        if isinstance(schema.get("properties"), dict):
            required_fields = schema.get("required", [])
            _process_properties(schema["properties"], required_fields)


def preprocess_schema(schema: dict[str, Any], allow_none_with_default: bool = False) -> dict[str, Any]:
    """Prefect's `preprocess_schema` (`prefect.utilities.schema_tools.validation`), ported
    as it is: a parameter schema written by Pydantic v1 is made a valid draft 2020-12 schema
    that accepts what the flow accepts (null for an optional field, tuples), and a block type
    in `definitions` may also be given as a reference to a block document."""
    schema = copy.deepcopy(schema)
    if isinstance(schema.get("properties"), dict):
        _process_properties(schema["properties"], schema.get("required", []), allow_none_with_default)
    definitions = schema.get("definitions")
    if isinstance(definitions, dict):
        for definition in list(definitions.values()):
            if not isinstance(definition, dict):
                continue
            if isinstance(definition.get("properties"), dict):
                _process_properties(definition["properties"], definition.get("required", []),
                                    allow_none_with_default)
            if "block_type_slug" in definition:
                definitions[definition["title"]] = {"oneOf": [definition, {
                    "type": "object",
                    "properties": {"$ref": {"oneOf": [
                        {"type": "string", "format": "uuid"},
                        {"type": "object", "additionalProperties": {"type": "string"}, "minProperties": 1},
                    ]}},
                    "required": ["$ref"],
                }]}
    return schema
