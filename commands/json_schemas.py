"""JSON Schemas as Prefect checks values against them: a deployment's parameters and a work
pool's job variables. Validation resolves references inside the schema only (nothing is
fetched), keeps one validator per schema, and, where Prefect preprocesses a schema written
by Pydantic v1 (`preprocess_schema`), does the same, so the same values pass or fail on both.

Validation runs inside a decider, on the service's event loop, and both the schema and the
value are user input; so its work is bounded (`_BoundedValidator`): keywords that are
quadratic in jsonschema are made linear, each pattern match and the whole validation have
a time limit, and past one the request is refused as invalid rather than holding every
other request.
"""

from __future__ import annotations

import contextvars
import copy
import json
import time
import types
from collections.abc import Callable, Iterable
from functools import lru_cache
from typing import Any

import jsonschema
import jsonschema._keywords
import jsonschema._utils
import regex  # type: ignore[import-untyped]
from jsonschema.exceptions import SchemaError

from .messages import invalid

# How long one validation may take (seconds): at the largest parameters allowed (512 KiB),
# a plain schema takes about half a second; a schema whose `anyOf`s branch exponentially
# would take hours.
VALIDATION_TIME_LIMIT = 3.0
# How long one pattern may take to match one string (seconds): real patterns take
# microseconds on short strings, and up to ~0.1 s on a value near the size limit (500,000
# characters), more on a busy machine; one that backtracks catastrophically (`^(a|aa)+$`)
# would take minutes. The `regex` package may overshoot the limit two or three times.
PATTERN_TIME_LIMIT = 0.5

_DEADLINE: contextvars.ContextVar[float | None] = contextvars.ContextVar("json_schema_deadline", default=None)


class _TooCostly(Exception):
    """A validation that ran out of time; `str()` says what could not be checked."""


def _remaining() -> float:
    deadline = _DEADLINE.get()
    return VALIDATION_TIME_LIMIT if deadline is None else deadline - time.monotonic()


@lru_cache(maxsize=512)
def _compiled(pattern: str) -> Any:
    return regex.compile(pattern)


class _BoundedPatterns:
    """What jsonschema's keywords use of `re` (only `search`), done by the `regex` package,
    which supports the same syntax and, unlike `re`, stops a match after a timeout."""

    @staticmethod
    def search(pattern: str, string: str) -> Any:
        remaining = _remaining()
        try:
            if remaining <= 0:
                raise TimeoutError
            return _compiled(pattern).search(string, timeout=min(remaining, PATTERN_TIME_LIMIT))
        except TimeoutError:
            raise _TooCostly(f"the pattern {pattern!r} could not be checked in time (it backtracks too "
                             "much); use a simpler pattern") from None


def _canonical(value: Any) -> Any:
    """`value` with every integral float made an int: JSON Schema's equality holds 1 == 1.0."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, dict):
        return {k: _canonical(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_canonical(v) for v in value]
    return value


def _unique(container: Iterable[Any]) -> bool:
    """jsonschema's `uniq` in linear time: two items are equal exactly when their canonical
    JSON texts are (sorted keys; 1 == 1.0 but true != 1, as `jsonschema._utils.equal` has
    it). jsonschema compares unsortable items (objects) pairwise: 5,000 of them took 36 s.
    Anything that is not plain JSON goes to jsonschema's own check."""
    seen: set[str] = set()
    items = list(container)
    try:
        for item in items:
            text = json.dumps(_canonical(item), sort_keys=True, allow_nan=False)
            if text in seen:
                return False
            seen.add(text)
    except (TypeError, ValueError):
        return bool(jsonschema._utils.uniq(items))
    return True


def _rebound(function: Any, namespace: dict[str, Any]) -> Any:
    """`function` as it is, but looking its global names up in `namespace`."""
    clone = types.FunctionType(function.__code__, namespace, function.__name__, function.__defaults__,
                               function.__closure__)
    clone.__kwdefaults__ = function.__kwdefaults__
    return clone


def _as_set(find: Callable[..., Iterable[Any]]) -> Callable[..., set[Any]]:
    """`unevaluatedItems` and `unevaluatedProperties` test each item against the list these
    return (quadratic: 30,000 keys took 8 s); a set makes it linear."""
    return lambda *args: set(find(*args))


def _bounded_keywords() -> dict[str, Any]:
    """jsonschema's draft 2020-12 keywords, unchanged in what they accept and say, but with the
    helpers they call replaced: patterns by `_BoundedPatterns`, `uniq` by `_unique`, the
    evaluated items and keys by sets. Each keyword also checks the time limit on entry, which
    bounds schemas that branch exponentially."""
    utils = dict(vars(jsonschema._utils), re=_BoundedPatterns)
    find_keys = _rebound(jsonschema._utils.find_evaluated_property_keys_by_schema, utils)
    utils["find_evaluated_property_keys_by_schema"] = find_keys
    keywords = dict(
        vars(jsonschema._keywords), re=_BoundedPatterns, uniq=_unique,
        find_additional_properties=_rebound(jsonschema._utils.find_additional_properties, utils),
        find_evaluated_property_keys_by_schema=_as_set(find_keys),
        find_evaluated_item_indexes_by_schema=_as_set(jsonschema._utils.find_evaluated_item_indexes_by_schema),
    )
    bounded = {}
    for name, keyword in jsonschema.Draft202012Validator.VALIDATORS.items():
        if getattr(keyword, "__module__", None) == jsonschema._keywords.__name__:
            keyword = _rebound(keyword, keywords)
        bounded[name] = _timed(keyword)
    return bounded


def _timed(keyword: Callable[..., Any]) -> Callable[..., Any]:
    """`keyword`, refused once the validation is past its time limit: every keyword runs
    through here, so a schema whose `anyOf`s (or `$ref`s) branch exponentially stops too."""

    def checked(validator: Any, value: Any, instance: Any, schema: Any) -> Any:
        if _remaining() <= 0:
            raise _TooCostly(f"the value could not be checked against the schema within {VALIDATION_TIME_LIMIT} "
                             "seconds")
        return keyword(validator, value, instance, schema)
    return checked


_BoundedValidator: Any = jsonschema.validators.extend(jsonschema.Draft202012Validator, _bounded_keywords())


def _without_required(schema: Any) -> Any:
    """A schema with every `required` removed, at any depth: DP-4 and DP-5 accept partial
    values (a deployment may leave a parameter to each run)."""
    if isinstance(schema, dict):
        return {k: _without_required(v) for k, v in schema.items() if k != "required"}
    if isinstance(schema, list):
        return [_without_required(v) for v in schema]
    return schema


def _without_dialects(schema: Any) -> Any:
    """A schema without its `$schema` declarations, at any depth: every part is checked as
    draft 2020-12 by the bounded validator. jsonschema picks the validator of a part that
    declares a dialect by that declaration, the stock one with `re` and no time limit, which
    a single pattern could then hold for minutes. (A property named `$schema` is a schema, not
    a string: it stays.)"""
    if isinstance(schema, dict):
        return {k: _without_dialects(v) for k, v in schema.items() if not (k == "$schema" and isinstance(v, str))}
    if isinstance(schema, list):
        return [_without_dialects(v) for v in schema]
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
    Pydantic v1 schemas meant it; the create-time check (DP-5) does not.
    Raises `invalid` when the value cannot be checked within `VALIDATION_TIME_LIMIT`."""
    deadline = _DEADLINE.set(time.monotonic() + VALIDATION_TIME_LIMIT)
    try:
        validator = _validator(json.dumps(schema, sort_keys=True), ignore_required, preprocess,
                               allow_none_with_default)
        errors = sorted(validator.iter_errors(value), key=lambda e: list(map(str, e.path)))
    except _TooCostly as e:
        raise invalid(f"Validation failed: {e}") from None
    except RecursionError:
        return CIRCULAR_SCHEMA
    except Exception as e:  # an unresolvable $ref
        return f"Validation failed: {type(e).__name__}: {e}"
    finally:
        _DEADLINE.reset(deadline)
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
    checked = _without_dialects(_without_required(schema) if ignore_required else schema)
    return _BoundedValidator(checked, registry=Registry(retrieve=_no_remote_refs))  # type: ignore[call-arg]


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
