"""What a ``POST /predict`` body may hold, checked before the request joins a batch.

A body is a JSON object ``{"task": str, "text": str, "text_pair": str | null}`` and nothing else. Every
problem is a :class:`RequestError` whose status and one-line message name the field that was wrong, so
a bad request is answered alone and never fails the batch it would have joined.
"""

from __future__ import annotations

import json
from typing import Optional, Sequence, Tuple

FIELDS = ("task", "text", "text_pair")


class RequestError(ValueError):
    """A request the server refuses: ``status`` (4xx) and a one-line message naming what was wrong."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


def _names(tasks: Sequence[str], shown: int = 8) -> str:
    more = f" and {len(tasks) - shown} more (GET /health lists them)" if len(tasks) > shown else ""
    return ", ".join(tasks[:shown]) + more


def parse_request(body: bytes, tasks: Sequence[str]) -> Tuple[str, str, Optional[str]]:
    """``(task, text, text_pair)`` of a body, or a :class:`RequestError`: 400 for a body that is not a
    JSON object, 422 for a field that is missing, of the wrong type, empty, unknown, or a task the
    server does not serve."""
    try:
        obj = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise RequestError(400, f"body must be a JSON object, got invalid JSON ({e})") from None
    if not isinstance(obj, dict):
        raise RequestError(400, f"body must be a JSON object, got a JSON {type(obj).__name__}")
    unknown = sorted(set(obj) - set(FIELDS))
    if unknown:
        raise RequestError(422, f"unknown field(s) {unknown}: a request holds {', '.join(FIELDS)}")
    task = obj.get("task")
    if not isinstance(task, str):
        raise RequestError(422, f"task must be a string naming a served task, got {_kind(task)}")
    if task not in tasks:
        raise RequestError(422, f"task must be one of the served tasks ({_names(list(tasks))}), got {task[:80]!r}")
    text = obj.get("text")
    if not isinstance(text, str) or not text.strip():
        raise RequestError(422, f"text must be a non-empty string, got {_kind(text)}")
    pair = obj.get("text_pair")
    if pair is not None and (not isinstance(pair, str) or not pair.strip()):
        raise RequestError(422, f"text_pair must be a non-empty string or null, got {_kind(pair)}")
    return task, text, pair


_JSON_TYPES = {dict: "object", list: "array", int: "number", float: "number", bool: "boolean"}


def _kind(value) -> str:
    """What a JSON value is, for an error message (never the value itself)."""
    if value is None:
        return "nothing"
    if isinstance(value, str):
        return "an empty string" if not value.strip() else "a string"
    return f"a JSON {_JSON_TYPES.get(type(value), type(value).__name__)}"
