"""A user's own sentence(-pair) data: CSV, TSV or JSONL with columns ``text``, optional ``text_pair``
and ``label``.

Labels that are strings or integers make a classification task (classes in sorted order); floats
make a regression. The training file decides; the dev file must use the same labels.
"""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Iterator, List, Optional, Sequence

from .classification import SentenceTask
from .io import DataError, read_jsonl, where

FORMATS = {".csv": ",", ".tsv": "\t", ".jsonl": None, ".json": None}  # suffix -> delimiter (None: JSON lines)


def read_rows(path, need_label: bool = True, need_task: bool = False) -> Iterator[tuple]:
    """Yield ``(line_number, {"text", "text_pair" or None, and "label" / "task" (raw) when needed})``."""
    path = Path(path)
    if path.suffix.lower() not in FORMATS:
        raise DataError(f"{path}: expected a .csv, .tsv or .jsonl file, got {path.suffix or 'no suffix'}")
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    wanted = [c for c, need in (("label", need_label), ("task", need_task)) if need]
    required = ("text", *wanted)
    delimiter = FORMATS[path.suffix.lower()]
    rows = read_jsonl(path, required) if delimiter is None else _read_delimited(path, delimiter, required)
    for lineno, rec in rows:
        for col in ("text", "text_pair") + (("task",) if need_task else ()):
            if rec.get(col) is not None and not isinstance(rec[col], str):
                raise DataError(f"{where(path, lineno)}: {col} must be a string, got {type(rec[col]).__name__}")
        row = {"text": rec["text"], "text_pair": rec.get("text_pair") or None}
        row.update((c, rec[c]) for c in wanted)
        yield lineno, row


def _read_delimited(path: Path, delimiter: str, required: Sequence[str]) -> Iterator[tuple]:
    with open(path, encoding="utf-8", newline="") as f:
        reader = csv.DictReader(f, delimiter=delimiter)
        missing = [c for c in required if c not in (reader.fieldnames or [])]
        if missing:
            raise DataError(f"{where(path, 1)}: header {reader.fieldnames} lacks column(s) {missing}")
        for rec in reader:
            if None in rec or any(rec[c] is None for c in required):  # more or fewer fields than the header
                raise DataError(f"{where(path, reader.line_num)}: expected {len(reader.fieldnames)} fields")
            yield reader.line_num, rec


def _typed(value):
    """A label as the file means it: CSV/TSV cells that read as numbers become numbers."""
    if isinstance(value, str):
        for kind in (int, float):
            try:
                return kind(value)
            except ValueError:
                pass
    return value


def infer_labels(path) -> tuple:
    """``(labels, regression)`` of a training file: floats -> regression; else the sorted classes."""
    values = [_typed(r["label"]) for _, r in read_rows(path)]
    if not values:
        raise DataError(f"{path}: no rows")
    if any(isinstance(v, str) or isinstance(v, bool) for v in values):
        return sorted({str(v) for v in values}), False
    if any(isinstance(v, float) for v in values):
        return None, True
    return sorted(set(values)), False


class CustomTask(SentenceTask):
    """Sentence(-pair) classification or regression on the user's files (``--task custom``)."""

    name = "custom"

    def __init__(self, labels: Optional[List] = None, regression: bool = False, train_file=None):
        if train_file is not None:
            labels, regression = infer_labels(train_file)
        if not regression and not labels:
            raise ValueError("a custom classification task needs its labels (or train_file)")
        self.labels, self.regression = (None if regression else list(labels)), bool(regression)
        self.main_metric = "pearson" if regression else "accuracy"
        self.extra_metrics = () if regression else ("f1_macro",)

    def options(self) -> dict:
        return {"labels": self.labels, "regression": self.regression}

    def label_id(self, value, path=None, line=None):
        value = _typed(value)
        if self.regression:
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                return float(value)
            raise DataError(f"{where(path, line)}: label {value!r} is not a number")
        if isinstance(self.labels[0], str):
            value = str(value)
        if value not in self.labels:
            raise DataError(f"{where(path, line)}: label {value!r} is not one of the training file's {self.labels}")
        return self.labels.index(value)

    def read_file(self, path):
        return [dict(e, label=self.label_id(e["label"], path, e.pop("line"))) for e in _examples(path, True)]


def read_inputs(path, tasks: Optional[Sequence[str]] = None) -> List[dict]:
    """Examples of a CSV, TSV or JSONL file without labels (what ``ptv2 predict`` reads). With
    ``tasks`` (a prefix bank's task names) every row names its task in a ``task`` column and becomes
    ``{"task": index, "example": ...}``."""
    if tasks is None:
        return [{k: v for k, v in e.items() if k != "line"} for e in _examples(path, False)]
    out = []
    for e in _examples(path, False, need_task=True):
        if e["task"] not in tasks:
            raise DataError(f"{where(path, e['line'])}: task {e['task']!r} is not one of the run's {list(tasks)}")
        out.append({"task": list(tasks).index(e["task"]), "example": {"text_a": e["text_a"], "text_b": e["text_b"]}})
    return out


def _examples(path, need_label: bool, need_task: bool = False) -> List[dict]:
    """``{"text_a", "text_b", "line"(, "label")(, "task")}`` per row; ``text_pair`` on every row of a
    task or on none."""
    out, pairs = [], {}
    for lineno, r in read_rows(path, need_label, need_task):
        e = {"text_a": r["text"], "text_b": r["text_pair"], "line": lineno}
        e.update((c, r[c]) for c in ("label", "task") if c in r)
        if pairs.setdefault(e.get("task"), e["text_b"] is not None) != (e["text_b"] is not None):
            raise DataError(f"{where(path, lineno)}: text_pair must be given on every row or on none")
        out.append(e)
    return out
