"""The chart's values as the README documents them.

A key is documented with its dotted path (`leaderElection.enabled`). Objects whose schema
lists their properties and forbids others (`additionalProperties: false`) are documented
key by key; free-form objects (`resources.requests`, `nodeSelector`, `podSecurityContext`)
and lists are documented as one key.

    python charts/tests/values_table.py    # prints the README's "### Chart values" table
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Iterator

import yaml

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "charts" / "machinist"
README = REPO / "README.md"
SECTION = "### Chart values"


def load_values() -> dict[str, Any]:
    return yaml.safe_load((CHART / "values.yaml").read_text())


def load_schema() -> dict[str, Any]:
    return json.loads((CHART / "values.schema.json").read_text())


def _resolve(schema: dict[str, Any], node: dict[str, Any]) -> dict[str, Any]:
    while "$ref" in node:
        ref = node["$ref"]
        assert ref.startswith("#/"), ref
        target: Any = schema
        for part in ref[2:].split("/"):
            target = target[part]
        node = {**target, **{k: v for k, v in node.items() if k != "$ref"}}
    return node


def value_keys(values: dict[str, Any] | None = None, schema: dict[str, Any] | None = None) -> Iterator[tuple[str, Any, dict[str, Any]]]:
    """(dotted key, default, schema node) for every documented key, in values.yaml order."""
    values = load_values() if values is None else values
    schema = load_schema() if schema is None else schema

    def walk(prefix: str, value: Any, node: dict[str, Any]) -> Iterator[tuple[str, Any, dict[str, Any]]]:
        for key, default in value.items():
            path = f"{prefix}{key}"
            child = _resolve(schema, node.get("properties", {}).get(key, {}))
            structured = child.get("additionalProperties") is False and "properties" in child
            if isinstance(default, dict) and structured:
                yield from walk(f"{path}.", default, child)
            else:
                yield path, default, child

    yield from walk("", values, schema)


def format_default(value: Any) -> str:
    if value == "":
        return '`""`'
    if isinstance(value, str):
        return f"`{value}`"
    if isinstance(value, (dict, list)):
        return "`" + yaml.safe_dump(value, default_flow_style=True, width=10_000, sort_keys=False).strip() + "`"
    return f"`{json.dumps(value)}`"


def table() -> str:
    lines = ["| key | default | description |", "|---|---|---|"]
    for key, default, node in value_keys():
        description = node.get("description", "")
        lines.append(f"| `{key}` | {format_default(default)} | {description} |")
    return "\n".join(lines)


def readme_keys(text: str | None = None) -> list[str]:
    """The dotted keys in the first column of the table under `### Chart values`."""
    text = README.read_text() if text is None else text
    lines = text.splitlines()
    try:
        start = next(i for i, line in enumerate(lines) if line.strip() == SECTION)
    except StopIteration:
        raise AssertionError(f"README.md has no section {SECTION!r}") from None
    rows: list[str] = []
    for line in lines[start + 1 :]:
        stripped = line.strip()
        if stripped.startswith("#"):
            break
        if stripped.startswith("|"):
            rows.append(stripped)
        elif rows:
            break
    assert len(rows) > 2, f"no table under {SECTION!r} in README.md"
    keys = []
    for row in rows[2:]:  # header and separator
        first = row.strip("|").split("|")[0].strip()
        match = re.fullmatch(r"`([^`]+)`", first)
        assert match, f"the first column of {row!r} is not a `dotted.key`"
        keys.append(match.group(1))
    return keys


if __name__ == "__main__":
    print(table())
