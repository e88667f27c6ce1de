"""Metrics: classification and correlation scores from scikit-learn and scipy, entity-level scores
from seqeval (what the authors' code and the GLUE/SuperGLUE/CoNLL metrics use), and SQuAD EM/F1 (the
official v1.1/v2.0 evaluation scripts' normalization and scoring, which no installed package ships).

Degenerate inputs (no examples, a constant series) score 0.0 instead of NaN, so picking the best
checkpoint by a metric never compares against NaN."""

from __future__ import annotations

import collections
import re
import string
from typing import Dict, List, Sequence

import numpy as np
from seqeval.metrics import accuracy_score as _token_accuracy
from seqeval.metrics import classification_report as _entity_report
from seqeval.metrics.sequence_labeling import get_entities  # noqa: F401  (re-exported: chunking rules)
from sklearn import metrics as _sk


# ----------------------------------------------------------------------------------- classification
def accuracy(preds, labels) -> float:
    return float(_sk.accuracy_score(labels, preds)) if len(labels) else 0.0


def f1_binary(preds, labels, positive: int = 1) -> float:
    """F1 of the class ``positive`` (0 when it is neither predicted nor present)."""
    return float(_sk.f1_score(labels, preds, labels=[positive], average=None, zero_division=0)[0])


def f1_macro(preds, labels, num_labels: int) -> float:
    """Unweighted mean of the per-class F1 over the classes present in ``labels`` or ``preds`` (scikit-
    learn's ``average="macro"``, as the SuperGLUE CB metric computes it); both must lie in
    ``range(num_labels)``."""
    seen = np.union1d(np.asarray(preds), np.asarray(labels))
    if len(seen) and (seen.min() < 0 or seen.max() >= num_labels):
        raise ValueError(f"f1_macro: labels must be in range({num_labels}), got {seen.tolist()}")
    return float(_sk.f1_score(labels, preds, average="macro", zero_division=0)) if len(labels) else 0.0


def matthews(preds, labels) -> float:
    return float(_sk.matthews_corrcoef(labels, preds)) if len(labels) else 0.0


def _correlation(fn, x, y) -> float:
    x, y = np.asarray(x, float), np.asarray(y, float)
    if len(x) < 2 or x.std() == 0 or y.std() == 0:  # undefined: scipy returns NaN and warns
        return 0.0
    return float(fn(x, y)[0])


def pearson(x, y) -> float:
    from scipy.stats import pearsonr

    return _correlation(pearsonr, x, y)


def spearman(x, y) -> float:
    from scipy.stats import spearmanr

    return _correlation(spearmanr, x, y)


# --------------------------------------------------------------------------- entity-level (seqeval)
def entity_f1(true_seqs: Sequence[Sequence[str]], pred_seqs: Sequence[Sequence[str]]) -> Dict[str, float]:
    """seqeval's micro precision/recall/F1 over entities (default mode: conlleval's chunking, an I-
    without a B- starts an entity), token accuracy, and an F1 per entity type (``f1_PER``...)."""
    if len(true_seqs) != len(pred_seqs) or any(len(t) != len(p) for t, p in zip(true_seqs, pred_seqs)):
        raise ValueError("entity_f1: true and predicted tag sequences differ in length")
    true_seqs, pred_seqs = [list(s) for s in true_seqs], [list(s) for s in pred_seqs]
    out = {"precision": 0.0, "recall": 0.0, "f1": 0.0}
    # with no entity on either side seqeval averages over zero types (NaN and a numpy warning)
    has_entities = bool(get_entities(true_seqs) or get_entities(pred_seqs))
    report = _entity_report(true_seqs, pred_seqs, output_dict=True, zero_division=0) if has_entities else {}
    if report:
        micro = report.pop("micro avg")
        out.update(precision=float(micro["precision"]), recall=float(micro["recall"]), f1=float(micro["f1-score"]))
    out["accuracy"] = float(_token_accuracy(true_seqs, pred_seqs)) if any(true_seqs) else 0.0
    for typ, row in sorted(report.items()):
        if not typ.endswith(" avg"):
            out[f"f1_{typ}"] = float(row["f1-score"])
    return out


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


# --------------------------------------------------------------------------------------- generation
def _references(refs: List[List[str]]) -> List[List[str]]:
    """Reference streams as sacrebleu reads them (one list per reference position); a source with fewer
    references repeats its first, which changes no BLEU count (clipping takes the maximum over references)."""
    k = max((len(r) for r in refs), default=1)
    return [[r[i] if i < len(r) else r[0] for r in refs] for i in range(k)]


def bleu(hypotheses: List[str], references: List[List[str]]) -> float:
    """sacrebleu's corpus BLEU (its default 13a tokenization) over every source's references, / 100."""
    import sacrebleu

    if not hypotheses:
        return 0.0
    return float(sacrebleu.corpus_bleu(hypotheses, _references(references)).score) / 100


def rouge_l(hypotheses: List[str], references: List[List[str]]) -> float:
    """rouge-score's ROUGE-L F-measure (stemmed) against each source's best reference, averaged."""
    from rouge_score import rouge_scorer

    if not hypotheses:
        return 0.0
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    return float(np.mean([scorer.score_multi(refs, hyp)["rougeL"].fmeasure for hyp, refs in zip(hypotheses, references)]))
