"""Metrics: accuracy/F1/MCC/correlations, entity-level F1 (seqeval-equivalent) and SQuAD EM/F1
(the official v1.1/v2.0 evaluation scripts' normalization and scoring)."""

from __future__ import annotations

import collections
import math
import re
import string
from typing import Dict, List, Sequence

import numpy as np


# ----------------------------------------------------------------------------------- classification
def accuracy(preds, labels) -> float:
    preds, labels = np.asarray(preds), np.asarray(labels)
    return float((preds == labels).mean()) if len(labels) else 0.0


def f1_binary(preds, labels, positive: int = 1) -> float:
    preds, labels = np.asarray(preds), np.asarray(labels)
    tp = int(((preds == positive) & (labels == positive)).sum())
    fp = int(((preds == positive) & (labels != positive)).sum())
    fn = int(((preds != positive) & (labels == positive)).sum())
    return 2 * tp / (2 * tp + fp + fn) if tp else 0.0


def f1_macro(preds, labels, num_labels: int) -> float:
    return float(np.mean([f1_binary(preds, labels, c) for c in range(num_labels)]))


def matthews(preds, labels) -> float:
    preds, labels = np.asarray(preds), np.asarray(labels)
    classes = np.union1d(preds, labels)
    idx = {c: i for i, c in enumerate(classes)}
    C = np.zeros((len(classes), len(classes)))
    for p, t in zip(preds, labels):
        C[idx[t], idx[p]] += 1
    t_sum, p_sum, n = C.sum(1), C.sum(0), C.sum()
    cov_ytyp = np.trace(C) * n - t_sum @ p_sum
    cov_ypyp = n * n - p_sum @ p_sum
    cov_ytyt = n * n - t_sum @ t_sum
    denom = math.sqrt(cov_ytyt * cov_ypyp)
    return float(cov_ytyp / denom) if denom else 0.0


def pearson(x, y) -> float:
    x, y = np.asarray(x, float), np.asarray(y, float)
    if len(x) < 2 or x.std() == 0 or y.std() == 0:
        return 0.0
    return float(np.corrcoef(x, y)[0, 1])


def _rank(a):
    a = np.asarray(a, float)
    order = a.argsort(kind="mergesort")
    ranks = np.empty(len(a))
    ranks[order] = np.arange(len(a))
    # average ties
    sa = a[order]
    i = 0
    while i < len(a):
        j = i
        while j + 1 < len(a) and sa[j + 1] == sa[i]:
            j += 1
        ranks[order[i:j + 1]] = (i + j) / 2
        i = j + 1
    return ranks


def spearman(x, y) -> float:
    return pearson(_rank(x), _rank(y))


# ------------------------------------------------------------------- entity-level F1 (seqeval rules)
def _end_of_chunk(prev_tag, tag, prev_type, type_):
    return (prev_tag in ("E", "S")
            or (prev_tag in ("B", "I") and tag in ("B", "S", "O"))
            or (prev_tag not in ("O", ".") and prev_type != type_))


def _start_of_chunk(prev_tag, tag, prev_type, type_):
    return (tag in ("B", "S")
            or (prev_tag in ("E", "S") and tag in ("E", "I"))
            or (prev_tag == "O" and tag in ("E", "I"))
            or (tag not in ("O", ".") and prev_type != type_))


def get_entities(seq) -> List[tuple]:
    """``(type, start, end)`` chunks (end inclusive) of an IOB1/IOB2/IOBES tag sequence, or of a list
    of sequences joined with 'O' between them, with the chunking rules of conlleval/seqeval's default
    mode (an I- without a B- starts an entity; a type change ends one)."""
    if any(isinstance(s, (list, tuple)) for s in seq):
        seq = [t for sub in seq for t in list(sub) + ["O"]]
    prev_tag, prev_type, begin, chunks = "O", "", 0, []
    for i, chunk in enumerate(list(seq) + ["O"]):
        tag = chunk[0]
        type_ = chunk[1:].split("-", maxsplit=1)[-1] or "_"
        if _end_of_chunk(prev_tag, tag, prev_type, type_):
            chunks.append((prev_type, begin, i - 1))
        if _start_of_chunk(prev_tag, tag, prev_type, type_):
            begin = i
        prev_tag, prev_type = tag, type_
    return chunks


def entity_f1(true_seqs: Sequence[Sequence[str]], pred_seqs: Sequence[Sequence[str]]) -> Dict[str, float]:
    """Micro precision/recall/F1 over entities (as ``seqeval.metrics`` reports them), token accuracy,
    and an F1 per entity type (``f1_PER``...)."""
    if len(true_seqs) != len(pred_seqs) or any(len(t) != len(p) for t, p in zip(true_seqs, pred_seqs)):
        raise ValueError("true and predicted tag sequences differ in length")
    true_ents = set(get_entities([list(s) for s in true_seqs]))
    pred_ents = set(get_entities([list(s) for s in pred_seqs]))
    out = _prf(len(true_ents & pred_ents), len(pred_ents), len(true_ents))
    flat_t = [t for s in true_seqs for t in s]
    flat_p = [p for s in pred_seqs for p in s]
    out["accuracy"] = accuracy(flat_p, flat_t) if flat_t else 0.0
    for typ in sorted({e[0] for e in true_ents | pred_ents}):
        te = {e for e in true_ents if e[0] == typ}
        pe = {e for e in pred_ents if e[0] == typ}
        out[f"f1_{typ}"] = _prf(len(te & pe), len(pe), len(te))["f1"]
    return out


def _prf(correct, n_pred, n_true):
    p = correct / n_pred if n_pred else 0.0
    r = correct / n_true if n_true else 0.0
    f = 2 * p * r / (p + r) if p + r else 0.0
    return {"precision": p, "recall": r, "f1": f}


# ------------------------------------------------------------------------------------ SQuAD EM / F1
def normalize_answer(s: str) -> str:
    """Lower text and remove punctuation, articles and extra whitespace (official SQuAD script)."""
    s = s.lower()
    s = "".join(ch for ch in s if ch not in set(string.punctuation))
    s = re.sub(r"\b(a|an|the)\b", " ", s)
    return " ".join(s.split())


def squad_exact(prediction: str, truth: str) -> int:
    return int(normalize_answer(prediction) == normalize_answer(truth))


def squad_f1(prediction: str, truth: str) -> float:
    pred_toks = normalize_answer(prediction).split()
    true_toks = normalize_answer(truth).split()
    if not pred_toks or not true_toks:  # v2.0 rule: no-answer scores 1 only against no-answer
        return float(pred_toks == true_toks)
    common = collections.Counter(pred_toks) & collections.Counter(true_toks)
    same = sum(common.values())
    if same == 0:
        return 0.0
    p, r = same / len(pred_toks), same / len(true_toks)
    return 2 * p * r / (p + r)


def squad_scores(predictions: Dict[str, str], references: Dict[str, List[str]]) -> Dict[str, float]:
    """EM and F1 in percent, max over the gold answers; a question whose gold list is empty (or has
    only empty answers) is a no-answer question, answered correctly only by the empty string. For
    SQuAD v1.1 data (every question answerable) this equals the v1.1 script; with no-answer questions
    it is the v2.0 script, and ``HasAns_*``/``NoAns_*`` are reported too."""
    em, f1, has = {}, {}, {}
    for qid, golds in references.items():
        golds = [a for a in golds if normalize_answer(a)] or [""]
        pred = predictions.get(qid, "")
        em[qid] = max(squad_exact(pred, g) for g in golds)
        f1[qid] = max(squad_f1(pred, g) for g in golds)
        has[qid] = golds != [""]
    n = len(references)
    out = {"exact": 100.0 * sum(em.values()) / n if n else 0.0,
           "f1": 100.0 * sum(f1.values()) / n if n else 0.0, "total": n}
    if not all(has.values()):
        for name, want in (("HasAns", True), ("NoAns", False)):
            ids = [q for q in references if has[q] == want]
            out[f"{name}_total"] = len(ids)
            if ids:
                out[f"{name}_exact"] = 100.0 * sum(em[q] for q in ids) / len(ids)
                out[f"{name}_f1"] = 100.0 * sum(f1[q] for q in ids) / len(ids)
    return out
