"""WP-6: a work pool's `base_job_template` is `{}` or a job configuration whose `{{ placeholders }}`
are all declared in its `variables` schema, and whose defaults reference no block."""

from __future__ import annotations

import re
from typing import Any

from .json_schemas import schema_problem, validation_problem

PLACEHOLDER = re.compile(r"\{\{\s*([\w\.\-\[\]$]+)\s*\}\}")


def _placeholders(value: Any) -> set[str]:
    if isinstance(value, str):
        return set(PLACEHOLDER.findall(value))
    if isinstance(value, dict):  # nested keys count too: Prefect scans each value's JSON text
        return set().union(*(_placeholders(k) | _placeholders(v) for k, v in value.items())) if value else set()
    if isinstance(value, list):
        return set().union(*(_placeholders(v) for v in value)) if value else set()
    return set()


def base_job_template_problem(template: dict[str, Any]) -> str | None:
    """The reason a template is invalid, or None. Every placeholder in the values of
    `job_configuration` counts, `prefect.*` ones included (as in Prefect)."""
    if template == {}:
        return None
    job_configuration = template.get("job_configuration")
    variables = template.get("variables")
    if not job_configuration or not variables:
        return "The `base_job_template` must contain both a `job_configuration` key and a `variables` key."
    if not isinstance(job_configuration, dict) or not isinstance(variables, dict):
        return "`job_configuration` and `variables` must be objects."
    properties = variables.get("properties") or {}
    if not isinstance(properties, dict):
        return "`variables.properties` must be an object."
    used = set().union(*(_placeholders(v) for v in job_configuration.values()))
    missing = sorted(used - set(properties))
    if missing:
        return (
            "The variables specified in the job configuration template must be present as "
            "properties in the variables schema. Your job configuration uses the following "
            f"undeclared variable(s): {', '.join(missing)}."
        )
    return None


def references_a_block(template: dict[str, Any]) -> bool:
    """Whether a variable's default is a reference to a block document
    (`{"$ref": {"block_document_id": ...}}`). Prefect answers 404 when that block does not
    exist; runledger has no blocks, so no such block can."""
    variables = template.get("variables")
    properties = variables.get("properties") if isinstance(variables, dict) else None
    if not isinstance(properties, dict):
        return False
    for attrs in properties.values():
        default = attrs.get("default") if isinstance(attrs, dict) else None
        ref = default.get("$ref") if isinstance(default, dict) else None
        if isinstance(ref, dict) and ref.get("block_document_id") is not None:
            return True
    return False


def variables_schema_problem(template: dict[str, Any]) -> str | None:
    """Why a template's `variables` is not a valid JSON Schema ("Invalid schema: ..."), or
    None; Prefect refuses such a pool at creation, before reading its defaults."""
    variables = template.get("variables")
    return schema_problem(variables) if isinstance(variables, dict) and variables else None


def variable_defaults_problem(template: dict[str, Any]) -> str | None:
    """Why the variables' own defaults do not fit their schema, in Prefect's words, or None:
    checked at a pool's creation, `required` aside (a deployment or run may give the rest) and
    null accepted for an optional variable, as Prefect checks them."""
    variables = template.get("variables")
    if not isinstance(variables, dict) or not isinstance(properties := variables.get("properties"), dict):
        return None
    # A reference (`{"$ref": ...}`) stands for a block's value, not checked here (Prefect
    # checks the block it resolves to; runledger has none, see `references_a_block`).
    defaults = {name: attrs["default"] for name, attrs in properties.items()
                if isinstance(attrs, dict) and "default" in attrs
                and not (isinstance(attrs["default"], dict) and "$ref" in attrs["default"])}
    if not defaults:
        return None
    problem = validation_problem(defaults, variables, ignore_required=True, preprocess=True,
                                 allow_none_with_default=True)
    return f"Validation failed for work pool's job variable defaults: {problem}" if problem else None

