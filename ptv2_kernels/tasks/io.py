"""Readers for local data files and the (lazy) Hugging Face hub loader.

Every reader raises :class:`DataError` naming the file and the line of the first malformed record.
"""

from __future__ import annotations

import functools
import json
import os
import threading
import urllib.error
import urllib.request
from pathlib import Path
from typing import Iterator, List, Optional, Sequence

# A reachable hub answers one HEAD well within this; unreachable, `datasets` itself would retry with
# back-off for about 25 s before failing.
HUB_PROBE_TIMEOUT_S = 2.0


class DataError(ValueError):
    """Malformed or missing data; the message names the file and, where there is one, the line."""


def where(path, line: Optional[int] = None) -> str:
    return f"{path}:{line}" if line is not None else str(path)


def read_jsonl(path, required: Sequence[str] = ()) -> Iterator[tuple]:
    """Yield ``(line_number, record)`` for each non-blank line of a jsonl file."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{where(path, lineno)}: invalid JSON ({e.msg} at column {e.colno})") from None
            if not isinstance(rec, dict):
                raise DataError(f"{where(path, lineno)}: expected a JSON object, got {type(rec).__name__}")
            missing = [k for k in required if k not in rec]
            if missing:
                raise DataError(f"{where(path, lineno)}: missing field(s) {', '.join(missing)}")
            yield lineno, rec


def read_tsv(path, columns: Sequence, header: bool = True) -> Iterator[tuple]:
    """Yield ``(line_number, {column: value})`` from a tab-separated file.

    With ``header=True`` the first line names the columns and ``columns`` are names that must appear
    in it; with ``header=False`` ``columns`` are ``(name, index)`` pairs.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    with open(path, encoding="utf-8") as f:
        lines = f.read().split("\n")
    start = 1
    if header:
        if not lines or not lines[0].strip():
            raise DataError(f"{where(path, 1)}: empty file, expected a header line")
        names = lines[0].rstrip("\r").split("\t")
        missing = [c for c in columns if c not in names]
        if missing:
            raise DataError(f"{where(path, 1)}: header {names} lacks column(s) {missing}")
        index = {c: names.index(c) for c in columns}
        width = len(names)
        start = 2
    else:
        index = dict(columns)
        width = max(index.values()) + 1
    for lineno, line in enumerate(lines[start - 1:], start):
        line = line.rstrip("\r")
        if not line.strip():
            continue
        fields = line.split("\t")
        if (header and len(fields) != width) or len(fields) < width:
            raise DataError(f"{where(path, lineno)}: expected {width} tab-separated fields, got {len(fields)}")
        yield lineno, {c: fields[i] for c, i in index.items()}


def read_conll(path, tag_column: int = -1, labels: Optional[Sequence[str]] = None) -> List[dict]:
    """Sentences of a CoNLL file (``token ... tag`` per line, blank line between sentences,
    ``-DOCSTART-`` lines skipped) as ``{"tokens", "tags", "line"}``."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    label_set = set(labels) if labels is not None else None
    sents, tokens, tags, first = [], [], [], None
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            line = line.rstrip("\r\n")
            if not line.strip() or line.startswith("-DOCSTART-"):
                if tokens:
                    sents.append({"tokens": tokens, "tags": tags, "line": first})
                tokens, tags, first = [], [], None
                continue
            fields = line.split()
            if len(fields) < 2:
                raise DataError(f"{where(path, lineno)}: expected 'token ... tag' (at least 2 columns), got {line!r}")
            tag = fields[tag_column]
            if label_set is not None and tag not in label_set:
                raise DataError(f"{where(path, lineno)}: unknown tag {tag!r} (expected one of {list(labels)})")
            if first is None:
                first = lineno
            tokens.append(fields[0])
            tags.append(tag)
    if tokens:
        sents.append({"tokens": tokens, "tags": tags, "line": first})
    return sents


def json_line_of(text: str, needle: str) -> Optional[int]:
    """1-based line of the first occurrence of ``needle`` in ``text`` (for errors in JSON files)."""
    pos = text.find(needle)
    return None if pos < 0 else text.count("\n", 0, pos) + 1


def read_json(path):
    """``(text, object)`` of a JSON file; a syntax error names the file and line."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    text = path.read_text(encoding="utf-8")
    try:
        return text, json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(f"{where(path, e.lineno)}: invalid JSON ({e.msg} at column {e.colno})") from None


def offline_flag() -> Optional[str]:
    """The flag that keeps the Hugging Face hub offline (``datasets`` then reads only its cache), if set."""
    for flag in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):
        if os.environ.get(flag, "").strip().upper() in ("1", "ON", "YES", "TRUE"):  # as huggingface_hub reads it
            return flag
    return None


def hub_unreachable() -> Optional[str]:
    """Why the hub cannot be reached, or None; asked once per process with one short request."""
    return _probe(os.environ.get("HF_ENDPOINT", "https://huggingface.co").rstrip("/"))


@functools.lru_cache(maxsize=None)
def _probe(endpoint: str) -> Optional[str]:
    """One HEAD request to ``endpoint`` per process (the train and dev splits ask once between them);
    any HTTP answer means reachable. It runs in a thread so that a name lookup, which ignores socket
    timeouts, is bounded by the same timeout."""
    answer = []

    def ask():
        try:
            urllib.request.urlopen(urllib.request.Request(endpoint, method="HEAD"), timeout=HUB_PROBE_TIMEOUT_S)
            answer.append(None)
        except urllib.error.HTTPError:
            answer.append(None)
        except (OSError, ValueError) as e:
            answer.append(f"{endpoint} unreachable: {getattr(e, 'reason', None) or e}")

    asker = threading.Thread(target=ask, daemon=True)
    asker.start()
    asker.join(HUB_PROBE_TIMEOUT_S)
    return answer[0] if answer else f"{endpoint} did not answer within {HUB_PROBE_TIMEOUT_S:g} s"


def load_hub(path: str, config: Optional[str], split: str) -> List[dict]:
    """Rows of a Hugging Face hub dataset split, with a clear error when it cannot be had: offline
    (``HF_HUB_OFFLINE``), only ``datasets``' cache is read, which answers at once; otherwise an
    unreachable hub is found by one short request rather than ``datasets``' retries (25 s)."""
    name = f"{path}{'/' + config if config else ''}"
    flag = offline_flag()
    unreachable = None if flag else hub_unreachable()
    if unreachable:
        raise DataError(
            f"cannot load {name} split {split!r} from the Hugging Face hub ({unreachable}) and found no local "
            "copy. Pass --data-dir DIR (or set PTV2_DATA_DIR) with the task's files instead (HF_HUB_OFFLINE=1 "
            "reads a copy datasets has cached).")
    try:
        import datasets  # lazy: only needed for hub data
    except ImportError:
        raise DataError(
            f"loading {path}{'/' + config if config else ''} from the Hugging Face hub needs the "
            "`datasets` package (pip install datasets); or pass --data-dir DIR (or set PTV2_DATA_DIR) with the "
            "task's files") from None
    try:
        ds = datasets.load_dataset(path, config, split=split)
    except Exception as e:  # not cached while offline, an unknown name, the hub failing mid-way, ...
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        hint = f" ({flag} is set: only datasets' cache was read)" if flag else ""
        raise DataError(
            f"cannot load {name} split {split!r} from the Hugging Face hub{hint}: {type(e).__name__}: {first}. "
            "Pass --data-dir DIR (or set PTV2_DATA_DIR) with the task's files instead.") from None
    return [dict(r) for r in ds]
