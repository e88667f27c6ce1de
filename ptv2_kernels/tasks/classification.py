"""Sentence(-pair) classification and multiple choice: SuperGLUE BoolQ, CB, COPA, RTE, WiC and the
GLUE tasks through one table-driven path."""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Tuple

import numpy as np

from . import metrics as M
from .base import Features, Task, as_array, class_scores
from .io import DataError, read_jsonl, read_tsv


class SentenceTask(Task):
    """Examples are ``{"text_a", "text_b" (or None), "label"}``."""

    extra_metrics = ()  # "f1" (binary), "f1_macro", "mcc", "pearson/spearman"

    def encode(self, examples, tokenizer, max_length, split):
        a = [e["text_a"] for e in examples]
        b = [e["text_b"] for e in examples]
        pair = b[0] is not None if examples else False
        enc = tokenizer(a, b if pair else None, truncation=True, max_length=max_length)
        cols = {k: list(enc[k]) for k in ("input_ids", "attention_mask", "token_type_ids") if k in enc}
        if examples and "label" in examples[0]:  # inputs to predict have none
            cols["labels"] = [e["label"] for e in examples]
        return Features(cols)

    def predictions(self, examples, features, outputs):
        """Classification: the most probable label and every label's probability; regression:
        ``{"label": value, "scores": {"value": value}}``."""
        if self.regression:
            return [{"label": v, "scores": {"value": v}} for v in (float(np.asarray(o).reshape(-1)[0]) for o in outputs)]
        return [{"label": self.labels[int(np.argmax(o))], "scores": class_scores(self.labels, o)} for o in outputs]

    def evaluate(self, examples, features, outputs):
        logits = as_array(outputs)
        labels = np.asarray(features.columns["labels"])
        if self.regression:
            pred = logits.reshape(-1)
            return {"pearson": M.pearson(pred, labels), "spearmanr": M.spearman(pred, labels),
                    "combined": (M.pearson(pred, labels) + M.spearman(pred, labels)) / 2}
        pred = logits.argmax(-1)
        out = {"accuracy": M.accuracy(pred, labels)}
        if "f1" in self.extra_metrics:
            out["f1"] = M.f1_binary(pred, labels)
        if "f1_macro" in self.extra_metrics:
            out["f1_macro"] = M.f1_macro(pred, labels, self.num_labels)
        if "mcc" in self.extra_metrics:
            out["mcc"] = M.matthews(pred, labels)
        return out


class JsonlSentenceTask(SentenceTask):
    fields: tuple = ()   # (text_a field, text_b field)
    label_field = "label"

    def convert(self, rec: dict, label) -> dict:
        a, b = self.fields
        return {"text_a": rec[a], "text_b": rec[b] if b else None, "label": label}

    def read_file(self, path):
        out = []
        for lineno, rec in read_jsonl(path, required=tuple(f for f in self.fields if f) + (self.label_field,)):
            for f in self.fields:
                if f and not isinstance(rec[f], str):
                    raise DataError(f"{path}:{lineno}: field {f!r} must be a string, got {type(rec[f]).__name__}")
            try:
                out.append(self.convert(rec, self.label_id(rec[self.label_field], path, lineno)))
            except (KeyError, TypeError, ValueError) as e:
                if isinstance(e, DataError):
                    raise
                raise DataError(f"{path}:{lineno}: malformed record ({type(e).__name__}: {e})") from None
        return out

    def from_hub(self, row):
        return self.convert(row, int(row[self.label_field]))


class _SuperGLUE(JsonlSentenceTask):
    files = {"train": ("train.jsonl",), "dev": ("val.jsonl", "dev.jsonl", "validation.jsonl")}

    @property
    def hub(self):
        return ("aps/super_glue", self.name)

    @property
    def subdirs(self):
        return (f"superglue/{self.name}", f"super_glue/{self.name}", self.name, self.name.upper())


class BoolQ(_SuperGLUE):
    name, labels, fields = "boolq", ["False", "True"], ("question", "passage")
    subdirs = ("superglue/boolq", "BoolQ", "boolq")


class CB(_SuperGLUE):
    name, labels, fields = "cb", ["entailment", "contradiction", "neutral"], ("premise", "hypothesis")
    extra_metrics = ("f1_macro",)


class RTE(_SuperGLUE):
    name, labels, fields = "rte", ["entailment", "not_entailment"], ("premise", "hypothesis")


class WiC(_SuperGLUE):
    """Word-in-Context as the authors feed it: template 1 (their BERT recipe) is the pair
    ``"word: sentence1"`` / ``"word: sentence2"``; template 0 (RoBERTa) is one sequence
    ``"sentence1 sentence2 Does word have the same meaning in both sentences?"``."""

    name, labels = "wic", ["False", "True"]
    fields = ("sentence1", "sentence2", "word")

    def __init__(self, template: int = 1):
        if template not in (0, 1):
            raise ValueError(f"WiC template must be 0 or 1, got {template!r}")
        self.template = template

    def options(self):
        return {"template": self.template}

    def convert(self, rec, label):
        s1, s2, w = rec["sentence1"], rec["sentence2"], rec["word"]
        if self.template == 1:
            return {"text_a": f"{w}: {s1}", "text_b": f"{w}: {s2}", "label": label}
        return {"text_a": f"{s1} {s2} Does {w} have the same meaning in both sentences?", "text_b": None,
                "label": label}


class COPA(_SuperGLUE):
    """Multiple choice: ``"premise because|so"`` paired with each choice (the authors' template 0)."""

    name, labels = "copa", ["choice1", "choice2"]
    model_kind = "multiple_choice"
    fields = ("premise", "choice1", "choice2", "question")

    def convert(self, rec, label):
        q = rec["question"]
        if q not in ("cause", "effect"):
            raise ValueError(f"question must be 'cause' or 'effect', got {q!r}")
        joiner = "because" if q == "cause" else "so"
        return {"first": f"{rec['premise']} {joiner}", "choices": [rec["choice1"], rec["choice2"]], "label": label}

    def encode(self, examples, tokenizer, max_length, split):
        C = len(self.labels)
        first = [e["first"] for e in examples for _ in range(C)]
        second = [c for e in examples for c in e["choices"]]
        enc = tokenizer(first, second, truncation=True, max_length=max_length)
        cols = {k: [list(enc[k][i * C:(i + 1) * C]) for i in range(len(examples))]
                for k in ("input_ids", "attention_mask", "token_type_ids") if k in enc}
        cols["labels"] = [e["label"] for e in examples]
        return Features(cols)


# ----------------------------------------------------------------------------------------- GLUE
@dataclass(frozen=True)
class GlueSpec:
    """Where a GLUE task's fields are: in the official tsv (column names; ``(name, index)`` for the
    header-less CoLA) and in the hub's ``nyu-mll/glue`` rows."""

    official: str                  # directory name in the GLUE download
    text_a: object
    text_b: object
    label: object
    hub_text: Tuple[str, Optional[str]]
    labels: Optional[List[str]]    # None: regression
    dev_file: str = "dev.tsv"
    hub_dev: str = "validation"
    extra_metrics: tuple = ()
    main_metric: str = "accuracy"
    header: bool = True


_PAIR = ("sentence1", "sentence2")
GLUE_TABLE = {
    "cola": GlueSpec("CoLA", ("sentence", 3), None, ("label", 1), ("sentence", None),
                     ["unacceptable", "acceptable"], extra_metrics=("mcc",), main_metric="mcc", header=False),
    "sst2": GlueSpec("SST-2", "sentence", None, "label", ("sentence", None), ["negative", "positive"]),
    "mrpc": GlueSpec("MRPC", "#1 String", "#2 String", "Quality", _PAIR, ["not_equivalent", "equivalent"],
                     extra_metrics=("f1",)),
    "stsb": GlueSpec("STS-B", *_PAIR, "score", _PAIR, None, main_metric="pearson"),
    "qqp": GlueSpec("QQP", "question1", "question2", "is_duplicate", ("question1", "question2"),
                    ["not_duplicate", "duplicate"], extra_metrics=("f1",)),
    "mnli": GlueSpec("MNLI", *_PAIR, "gold_label", ("premise", "hypothesis"),
                     ["entailment", "neutral", "contradiction"], dev_file="dev_matched.tsv",
                     hub_dev="validation_matched"),
    "qnli": GlueSpec("QNLI", "question", "sentence", "label", ("question", "sentence"),
                     ["entailment", "not_entailment"]),
    "glue-rte": GlueSpec("RTE", *_PAIR, "label", _PAIR, ["entailment", "not_entailment"]),
    "wnli": GlueSpec("WNLI", *_PAIR, "label", _PAIR, ["not_entailment", "entailment"]),
}


class GlueTask(SentenceTask):
    """A GLUE task read from the canonical tsv files (header row; CoLA has none) or the hub."""

    def __init__(self, name: str):
        spec = self.spec = GLUE_TABLE[name]
        hub_name = "rte" if name == "glue-rte" else name
        self.name, self.labels, self.extra_metrics, self.main_metric = (name, spec.labels, spec.extra_metrics,
                                                                        spec.main_metric)
        self.regression = spec.labels is None
        self.hub = ("nyu-mll/glue", hub_name)
        self.hub_splits = {"train": "train", "dev": spec.hub_dev}
        self.subdirs = (f"glue/{hub_name}", f"glue/{spec.official}", spec.official, hub_name)
        self.files = {"train": ("train.tsv",), "dev": (spec.dev_file,)}

    def read_file(self, path):
        spec = self.spec
        cols = [c for c in (spec.text_a, spec.text_b, spec.label) if c is not None]
        key = (lambda c: c) if spec.header else (lambda c: c[0])
        out = []
        for lineno, row in read_tsv(path, cols, header=spec.header):
            out.append({"text_a": row[key(spec.text_a)],
                        "text_b": row[key(spec.text_b)] if spec.text_b is not None else None,
                        "label": self.label_id(row[key(spec.label)], path, lineno)})
        return out

    def from_hub(self, row):
        a, b = self.spec.hub_text
        label = float(row["label"]) if self.regression else int(row["label"])
        return {"text_a": row[a], "text_b": row[b] if b else None, "label": label}
