"""Task interface, tokenized feature store with dynamic padding, and data-directory resolution."""

from __future__ import annotations

import os
from collections import Counter
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import numpy as np
import torch
from torch.nn import functional as F

from .io import DataError

SPLITS = ("train", "dev")

# the project's shared data sit beside the repository (…/main and …/shared/datasets)
_REPO_ROOT = Path(__file__).resolve().parents[2]


def default_data_dirs() -> List[Path]:
    """Where a task's files are looked for without ``--data-dir``, in order: ``$PTV2_DATA_DIR``, then
    the workspace's ``../shared/datasets`` next to the repository or the working directory (unless
    ``PTV2_NO_WORKSPACE_DATA=1``: how CI runs the tests as on a fresh clone without it). A task found
    in none of them comes from the Hugging Face hub."""
    dirs = [Path(os.environ["PTV2_DATA_DIR"])] if os.environ.get("PTV2_DATA_DIR") else []
    if os.environ.get("PTV2_NO_WORKSPACE_DATA", "") not in ("", "0"):
        return dirs
    for base in (_REPO_ROOT, Path.cwd()):
        cand = (base / ".." / "shared" / "datasets").resolve()
        if cand.is_dir() and cand not in dirs:
            dirs.append(cand)
    return dirs


def data_dir_label(path: Path) -> str:
    """How a run's first line names a folder of :func:`default_data_dirs`: ``$PTV2_DATA_DIR`` with its
    value as given, the workspace's folder by its place beside the repository (a log or a README shows
    no path of one machine)."""
    given = os.environ.get("PTV2_DATA_DIR")
    if given and path == Path(given):
        return f"$PTV2_DATA_DIR ({given})"
    return "the workspace's ../shared/datasets"


class Features:
    """Tokenized features: ``columns`` maps a model input name (``input_ids``, ``attention_mask``,
    ``token_type_ids``, ``labels``, ``start_positions``, ...) to one entry per feature; ``meta`` holds
    per-feature data for evaluation (offsets, example ids). Batches are padded to their longest row."""

    PAD = {"input_ids": None, "attention_mask": 0, "token_type_ids": 0, "labels": -100}

    def __init__(self, columns: Dict[str, list], meta: Optional[Dict[str, list]] = None):
        n = {len(v) for v in columns.values()}
        assert len(n) == 1, f"columns differ in length: { {k: len(v) for k, v in columns.items()} }"
        self.columns = columns
        self.meta = meta or {}

    def __len__(self):
        return len(self.columns["input_ids"])

    def length(self, i: int) -> int:
        """Feature ``i``'s token count (its longest choice for multiple choice): what a batch pads to."""
        ids = self.columns["input_ids"][i]
        return max(map(len, ids)) if ids and isinstance(ids[0], (list, tuple)) else len(ids)

    def select(self, indices: Sequence[int]) -> "Features":
        return Features({k: [v[i] for i in indices] for k, v in self.columns.items()},
                        {k: [v[i] for i in indices] for k, v in self.meta.items()})

    def batch(self, indices: Sequence[int], pad_token_id: int) -> Dict[str, torch.Tensor]:
        out = {}
        for name, col in self.columns.items():
            rows = [col[i] for i in indices]
            first = rows[0]
            if not isinstance(first, (list, tuple)):  # one scalar per feature
                dtype = torch.float32 if isinstance(first, float) else torch.long
                out[name] = torch.tensor(rows, dtype=dtype)
                continue
            pad = pad_token_id if name == "input_ids" else self.PAD.get(name, 0)
            if first and isinstance(first[0], (list, tuple)):  # multiple choice: (B, C, L)
                L = max(len(r) for row in rows for r in row)
                data = [[list(r) + [pad] * (L - len(r)) for r in row] for row in rows]
            else:
                L = max(len(r) for r in rows)
                data = [list(r) + [pad] * (L - len(r)) for r in rows]
            out[name] = torch.tensor(data, dtype=torch.long)
        return out


class Task:
    """One data set: how to read it, turn it into features, and score predictions."""

    name: str = ""
    model_kind: str = "sequence_classification"  # | token_classification | question_answering | multiple_choice | generation
    labels: Optional[List[str]] = None
    main_metric: str = "accuracy"
    regression: bool = False
    hub: tuple = ()                 # (path, config)
    hub_splits = {"train": "train", "dev": "validation"}
    subdirs: Sequence[str] = ()     # where the files sit under a data root
    files: Dict[str, Sequence[str]] = {}
    default_max_length = 128

    def __init__(self, **options):
        if options:
            raise TypeError(f"task {self.name} takes no options {sorted(options)}")

    def options(self) -> dict:
        """The options that rebuild this task: ``get_task(task.name, **task.options())``."""
        return {}

    @property
    def num_labels(self) -> int:
        return 1 if self.regression else len(self.labels or ())

    def fit_backbone(self, config) -> None:
        """Adapt to the backbone's transformers ``config`` before encoding (generation lays its inputs out
        for decoders or encoder-decoders); raises ``ValueError`` for a backbone the task cannot use."""

    # -------------------------------------------------------------------------------- loading
    def find_file(self, split: str, data_dir) -> Optional[Path]:
        """The file of ``split`` in ``data_dir`` (a folder, or a list of folders tried in order)."""
        for root in ([data_dir] if isinstance(data_dir, (str, os.PathLike)) else data_dir):
            for sub in list(self.subdirs) + [""]:
                for fname in self.files.get(split, ()):
                    p = Path(root) / sub / fname if sub else Path(root) / fname
                    if p.is_file():
                        return p
        return None

    def load(self, split: str, data_dir=None, file=None, max_samples: Optional[int] = None,
             explicit_dir: bool = False) -> List[dict]:
        """Examples of ``split`` ("train" or "dev") from ``file``, else from ``data_dir`` (a folder or a
        list of folders), else from the hub. With ``explicit_dir`` a missing file is an error rather
        than a fall-back to the hub."""
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        if file is None and data_dir is not None:
            file = self.find_file(split, data_dir)
            if file is None and explicit_dir:
                wanted = [str(Path(s) / f) for s in list(self.subdirs) + [""] for f in self.files.get(split, ())]
                raise DataError(f"{data_dir}: no {split} file for task {self.name} (looked for {', '.join(wanted)})")
        if file is not None:
            examples = self.read_file(Path(file))
        else:
            from .io import load_hub
            path, config = (tuple(self.hub) + (None,))[:2]
            examples = [self.from_hub(r) for r in load_hub(path, config, self.hub_splits[split])]
        if max_samples is not None:
            examples = examples[:max_samples]
        return examples

    def read_file(self, path: Path) -> List[dict]:
        raise NotImplementedError

    def from_hub(self, row: dict) -> dict:
        raise NotImplementedError

    def label_id(self, value, path=None, line=None) -> int:
        """Label index of a file's label value: a name in ``labels``, a bool (False/True order), or
        an integer index."""
        if self.regression:
            try:
                return float(value)
            except (TypeError, ValueError):
                raise DataError(f"{path}:{line}: label {value!r} is not a number") from None
        labels = self.labels
        if isinstance(value, bool):
            s = str(value)
            if s in labels:
                return labels.index(s)
        elif isinstance(value, str) and value in labels:
            return labels.index(value)
        elif isinstance(value, int) or (isinstance(value, str) and value.strip().lstrip("-").isdigit()):
            i = int(value)
            if 0 <= i < len(labels):
                return i
        raise DataError(f"{path}:{line}: unknown label {value!r} for task {self.name} (labels: {labels})")

    # ------------------------------------------------------------------------------ features
    def encode(self, examples: List[dict], tokenizer, max_length: int, split: str) -> Features:
        raise NotImplementedError

    def infer(self, model, batch: dict, **kwargs) -> list:
        """Per-row outputs of ``model`` on ``batch`` (``kwargs`` go to its forward), kept for
        :meth:`evaluate` and :meth:`predictions`: by default :meth:`outputs_from` of one forward."""
        return self.outputs_from(model(**batch, **kwargs), batch)

    def outputs_from(self, out, batch) -> list:
        """Per-row numpy outputs of a model forward, kept for :meth:`evaluate`."""
        return list(out.logits.detach().float().cpu().numpy())

    def evaluate(self, examples: List[dict], features: Features, outputs: list) -> Dict[str, float]:
        raise NotImplementedError

    # ---------------------------------------------------------------------------- prediction
    def input_limit(self, max_length: int) -> int:
        """The most tokens an input may have when the run's sequences hold ``max_length``."""
        return max_length

    def read_inputs(self, path) -> List[dict]:
        """The examples of a file of inputs to predict (``ptv2 predict --input``): CSV, TSV or JSONL rows
        with ``text`` (and ``text_pair``), a ``label`` column ignored."""
        from .custom import read_inputs

        return [self.input_example(e["text_a"], e["text_b"]) for e in read_inputs(path)]

    def input_example(self, text: str, text_pair: Optional[str] = None) -> dict:
        """The example :meth:`encode` takes for an input row to predict: ``text`` and ``text_pair``."""
        return {"text_a": text, "text_b": text_pair}

    def predictions(self, examples: List[dict], features: Features, outputs: list) -> List[dict]:
        """One answer per example from its features' :meth:`outputs_from`: ``{"label", "scores"}``, what
        ``ptv2 predict`` writes and ``ptv2 serve`` answers."""
        raise ValueError(f"task {self.name} ({self.model_kind}) has no predictions from text rows")

    def output_rows(self, examples: List[dict], features: Features, outputs: list) -> Optional[List[dict]]:
        """What a run writes beside its metrics at each evaluation, one row per dev example (generation:
        source, references and the generated text); None: nothing."""
        return None

    def trivial_baseline(self, train: List[dict], dev: List[dict], dev_features: Features) -> Optional[Dict[str, float]]:
        """What always answering the most frequent training label scores on ``dev``, by this task's own
        metrics; None where one label does not answer a whole example (tags, spans, regression)."""
        labels = [e.get("label") for e in train]
        if (self.model_kind not in ("sequence_classification", "multiple_choice") or not labels
                or not all(isinstance(y, int) and not isinstance(y, bool) for y in labels)):
            return None
        answer = np.zeros(self.num_labels, dtype=np.float32)
        answer[Counter(labels).most_common(1)[0][0]] = 1.0
        return self.evaluate(dev, dev_features, [answer] * len(dev_features))

    def describe(self) -> str:
        return f"{self.name} ({self.model_kind}, {self.num_labels} labels, metric {self.main_metric})"


def class_scores(labels: Sequence, logits) -> dict:
    """``{label: probability}`` of one row of class logits."""
    probs = F.softmax(torch.as_tensor(logits, dtype=torch.float32), -1).tolist()
    return {str(c): p for c, p in zip(labels, probs)}


def as_array(rows) -> np.ndarray:
    return np.stack([np.asarray(r) for r in rows]) if len(rows) else np.zeros((0,))
