"""Self-contained schemas: schemas/standalone/<name>.avsc, one per record type, every named type
it uses defined inline (first use in full, later uses by name, as Avro allows within one
document), so any Avro library can read a topic from the files alone, without knowing the load
order of the per-type files. Generated from the per-type files; tests/test_schemas.py checks that
they are up to date. Regenerate with ``python -m schemas.standalone``.

Which topic carries which records (each value: 10-byte single-object header C3 01 + the writer
schema's CRC-64-AVRO fingerprint, then the Avro binary body):
tokens: TokenizedEvent; windows: WindowedEvent, WindowComplete; scores: ScoredEvent,
WindowComplete; models: ModelAnnouncement; late: LateEvent; alerts: Alert; dead letters: DeadLetter;
sessions: SessionScore.
"""

from __future__ import annotations

import json
from pathlib import Path

from schemas import SCHEMA_DIR

STANDALONE_DIR = SCHEMA_DIR / "standalone"
PRIMITIVES = {"null", "boolean", "int", "long", "float", "double", "bytes", "string"}


def _per_type() -> dict[str, dict]:
    return {p.stem: json.loads(p.read_text()) for p in sorted(SCHEMA_DIR.glob("*.avsc"))}


def _full_name(schema: dict) -> str:
    name = schema["name"]
    return name if "." in name or "namespace" not in schema else f"{schema['namespace']}.{name}"


def _inline(schema, types: dict[str, dict], defined: set[str], namespace: str | None):
    """``schema`` with every reference to a type not defined yet replaced by its definition."""
    if isinstance(schema, str):
        full = schema if "." in schema or namespace is None else f"{namespace}.{schema}"
        if schema in PRIMITIVES or full in defined:
            return schema
        if full not in types:
            raise KeyError(f"unknown type {schema!r}")
        return _inline(types[full], types, defined, namespace)
    if isinstance(schema, list):
        return [_inline(s, types, defined, namespace) for s in schema]
    schema = dict(schema)
    if schema.get("type") in ("record", "error", "enum", "fixed"):
        defined.add(_full_name(schema))
        namespace = schema.get("namespace", namespace)
    if schema.get("type") in ("record", "error"):
        schema["fields"] = [{**f, "type": _inline(f["type"], types, defined, namespace)}
                            for f in schema["fields"]]
    elif schema.get("type") == "array":
        schema["items"] = _inline(schema["items"], types, defined, namespace)
    elif schema.get("type") == "map":
        schema["values"] = _inline(schema["values"], types, defined, namespace)
    return schema


def standalone_schemas() -> dict[str, str]:
    """File name -> text of each self-contained schema."""
    per_type = _per_type()
    types = {_full_name(s): s for s in per_type.values()}
    return {f"{name}.avsc": json.dumps(_inline(schema, types, set(), None), indent=2) + "\n"
            for name, schema in per_type.items()}


def write(directory: Path = STANDALONE_DIR) -> list[Path]:
    directory.mkdir(exist_ok=True)
    written = []
    for name, text in standalone_schemas().items():
        (directory / name).write_text(text)
        written.append(directory / name)
    return written


if __name__ == "__main__":
    for path in write():
        print(path)
