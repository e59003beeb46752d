"""JSON Lines files: one JSON object per line, read with errors that name the file and the line.

    rows = read_jsonl("data.jsonl", required={"prompt": str}, allow_empty=False)

Blank lines are skipped (they still count for line numbers). Every problem is a `DataError`:

    data.jsonl:7: not valid JSON (Expecting value at column 1): 'oops'
    data.jsonl:7: expected a JSON object, got list
    data.jsonl:7: missing key 'prompt'
    data.jsonl:7: key 'prompt' must be str, got int
    data.jsonl:7: not valid UTF-8 (...)
    dataset not found: data.jsonl
    data.jsonl: empty dataset
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from model.errors import DataError


def parse_jsonl_line(text: str, where: str, required: Mapping[str, type] | None = None) -> dict[str, Any]:
    """One line's object; `where` ("file:line") starts every error message. `required` maps each key
    that must be present to its type (`object` for any type)."""
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(f"{where}: not valid JSON ({e.msg} at column {e.colno}): {text.strip()[:80]!r}") from None
    if not isinstance(obj, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    for key, typ in (required or {}).items():
        if key not in obj:
            raise DataError(f"{where}: missing key {key!r}")
        if not isinstance(obj[key], typ):
            raise DataError(f"{where}: key {key!r} must be {typ.__name__}, got {type(obj[key]).__name__}")
    return obj


def iter_jsonl(path: str | Path, required: Mapping[str, type] | None = None) -> Iterator[dict[str, Any]]:
    """The object of each non-blank line of `path`, in file order (see `parse_jsonl_line`)."""
    p = Path(path)
    if not p.is_file():
        raise DataError(f"dataset not found: {p}")
    with open(p, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise DataError(f"{p}:{lineno}: not valid UTF-8 ({e.reason} at byte {e.start})") from None
            if text.strip():
                yield parse_jsonl_line(text, f"{p}:{lineno}", required)


def read_jsonl(path: str | Path, required: Mapping[str, type] | None = None,
               allow_empty: bool = True) -> list[dict[str, Any]]:
    """Every object of `path` (see `iter_jsonl`); with allow_empty=False a file without one is an error."""
    rows = list(iter_jsonl(path, required))
    if not rows and not allow_empty:
        raise DataError(f"{path}: empty dataset")
    return rows
