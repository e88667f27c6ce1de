"""Sentence(-pair) classification and multiple choice: SuperGLUE BoolQ, CB, COPA, RTE, WiC and the
GLUE tasks through one table-driven path."""

from __future__ import annotations


import numpy as np

from . import metrics as M
from .base import Features, Task, as_array
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
        cols["labels"] = [e["label"] for e in examples]
        return Features(cols)

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
# name: (hub config, official dir, header?, text_a, text_b, label column, labels, dev file,
#        hub dev split, extra metrics, main metric)
GLUE_TABLE = {
    "cola": ("cola", "CoLA", False, ("sentence", 3), None, ("label", 1), ["unacceptable", "acceptable"],
             "dev.tsv", "validation", ("mcc",), "mcc"),
    "sst2": ("sst2", "SST-2", True, "sentence", None, "label", ["negative", "positive"],
             "dev.tsv", "validation", (), "accuracy"),
    "mrpc": ("mrpc", "MRPC", True, "#1 String", "#2 String", "Quality", ["not_equivalent", "equivalent"],
             "dev.tsv", "validation", ("f1",), "accuracy"),
    "stsb": ("stsb", "STS-B", True, "sentence1", "sentence2", "score", None,
             "dev.tsv", "validation", (), "pearson"),
    "qqp": ("qqp", "QQP", True, "question1", "question2", "is_duplicate", ["not_duplicate", "duplicate"],
            "dev.tsv", "validation", ("f1",), "accuracy"),
    "mnli": ("mnli", "MNLI", True, "sentence1", "sentence2", "gold_label", ["entailment", "neutral", "contradiction"],
             "dev_matched.tsv", "validation_matched", (), "accuracy"),
    "qnli": ("qnli", "QNLI", True, "question", "sentence", "label", ["entailment", "not_entailment"],
             "dev.tsv", "validation", (), "accuracy"),
    "glue-rte": ("rte", "RTE", True, "sentence1", "sentence2", "label", ["entailment", "not_entailment"],
                 "dev.tsv", "validation", (), "accuracy"),
    "wnli": ("wnli", "WNLI", True, "sentence1", "sentence2", "label", ["not_entailment", "entailment"],
             "dev.tsv", "validation", (), "accuracy"),
}


class GlueTask(SentenceTask):
    """A GLUE task read from the canonical tsv files (header row; CoLA has none) or the hub."""

    def __init__(self, name: str):
        (cfg, official, self.header, a, b, lab, labels, dev, hub_dev, extra, main) = GLUE_TABLE[name]
        self.name, self.labels, self.extra_metrics, self.main_metric = name, labels, extra, main
        self.regression = labels is None
        self.hub = ("nyu-mll/glue", cfg)
        self.hub_splits = {"train": "train", "dev": hub_dev}
        self.subdirs = (f"glue/{cfg}", f"glue/{official}", official, cfg)
        self.files = {"train": ("train.tsv",), "dev": (dev,)}
        self.cols = {"text_a": a, "text_b": b, "label": lab}
        self.hub_cols = {"text_a": ("sentence", "sentence1", "question", "question1"),
                         "text_b": ("sentence2", "sentence", "question2")}

    def read_file(self, path):
        cols = {k: v for k, v in self.cols.items() if v is not None}
        spec = list(cols.values()) if self.header else list(cols.values())
        out = []
        for lineno, row in read_tsv(path, spec, header=self.header):
            get = (lambda c: row[c if self.header else c[0]])
            out.append({"text_a": get(self.cols["text_a"]),
                        "text_b": get(self.cols["text_b"]) if self.cols["text_b"] else None,
                        "label": self.label_id(get(self.cols["label"]), path, lineno)})
        return out

    def from_hub(self, row):
        keys = [k for k in row if k not in ("label", "idx")]
        a = keys[0]
        b = keys[1] if self.cols["text_b"] is not None else None
        label = float(row["label"]) if self.regression else int(row["label"])
        return {"text_a": row[a], "text_b": row[b] if b else None, "label": label}
