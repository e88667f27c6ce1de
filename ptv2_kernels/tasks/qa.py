"""SQuAD v1.1 / v2.0: features with a document stride and offsets, the standard n-best post-processing
(max answer length, null answers for v2) and the official EM/F1."""

from __future__ import annotations

import collections
from typing import Dict, List

import numpy as np

from . import metrics as M
from .base import Features, Task
from .io import DataError, json_line_of, read_json


class SQuAD(Task):
    name = "squad"
    model_kind = "question_answering"
    labels = None
    main_metric = "f1"
    version_2 = False
    hub = ("rajpurkar/squad",)
    subdirs = ("squad", "SQuAD", "squad1.1", "squad_v1")
    files = {"train": ("train-v1.1.json", "train.json"), "dev": ("dev-v1.1.json", "dev.json")}
    default_max_length = 384

    def __init__(self, doc_stride: int = 128, n_best: int = 20, max_answer_length: int = 30,
                 null_score_diff_threshold: float = 0.0):
        self.doc_stride, self.n_best, self.max_answer_length = doc_stride, n_best, max_answer_length
        self.null_threshold = null_score_diff_threshold

    def options(self):
        return dict(doc_stride=self.doc_stride, n_best=self.n_best, max_answer_length=self.max_answer_length,
                    null_score_diff_threshold=self.null_threshold)

    @property
    def num_labels(self):
        return 2

    # --------------------------------------------------------------------------------- loading
    def read_file(self, path):
        text, obj = read_json(path)

        def bad(msg, needle=None):
            line = json_line_of(text, needle) if needle else None
            raise DataError(f"{path}{':' + str(line) if line else ''}: {msg}")

        if not isinstance(obj, dict) or not isinstance(obj.get("data"), list):
            bad("expected a SQuAD object with a 'data' list")
        out = []
        for a, article in enumerate(obj["data"]):
            for p, para in enumerate(article.get("paragraphs", []) if isinstance(article, dict) else bad(f"data[{a}] is not an object")):
                ctx = para.get("context") if isinstance(para, dict) else None
                if not isinstance(ctx, str):
                    bad(f"data[{a}].paragraphs[{p}] has no string 'context'")
                for q, qa in enumerate(para.get("qas", [])):
                    loc = f"data[{a}].paragraphs[{p}].qas[{q}]"
                    qid = qa.get("id") if isinstance(qa, dict) else None
                    needle = f'"{qid}"' if qid is not None else None
                    if not isinstance(qid, (str, int)) or not isinstance(qa.get("question"), str):
                        bad(f"{loc} lacks an 'id' or a string 'question'", needle)
                    answers = qa.get("answers", [])
                    impossible = bool(qa.get("is_impossible", False))
                    if not isinstance(answers, list) or any(
                            not isinstance(x, dict) or not isinstance(x.get("text"), str)
                            or not isinstance(x.get("answer_start"), int) for x in answers):
                        bad(f"{loc} (id {qid}): answers must be a list of {{'text': str, 'answer_start': int}}", needle)
                    for x in answers:
                        if not 0 <= x["answer_start"] <= len(ctx) - len(x["text"]):
                            bad(f"{loc} (id {qid}): answer_start {x['answer_start']} outside the context", needle)
                    if impossible:
                        answers = []
                    elif not answers and not self.version_2:
                        bad(f"{loc} (id {qid}): no answers (SQuAD v1.1 needs one; use task squad_v2)", needle)
                    out.append({"id": str(qid), "question": qa["question"], "context": ctx,
                                "answers": {"text": [x["text"] for x in answers],
                                            "answer_start": [x["answer_start"] for x in answers]}})
        return out

    def from_hub(self, row):
        return {"id": str(row["id"]), "question": row["question"], "context": row["context"],
                "answers": {"text": list(row["answers"]["text"]),
                            "answer_start": list(row["answers"]["answer_start"])}}

    # -------------------------------------------------------------------------------- features
    def encode(self, examples, tokenizer, max_length, split):
        if not getattr(tokenizer, "is_fast", False):
            raise ValueError("SQuAD needs a fast tokenizer (offset mappings)")
        pad_right = tokenizer.padding_side == "right"
        qs = [e["question"].lstrip() for e in examples]
        cs = [e["context"] for e in examples]
        enc = tokenizer(qs if pad_right else cs, cs if pad_right else qs,
                        truncation="only_second" if pad_right else "only_first",
                        max_length=max_length, stride=min(self.doc_stride, max_length // 2),
                        return_overflowing_tokens=True, return_offsets_mapping=True)
        sample_map = enc["overflow_to_sample_mapping"]
        ctx_id = 1 if pad_right else 0
        cols = {k: list(enc[k]) for k in ("input_ids", "attention_mask", "token_type_ids") if k in enc}
        starts, ends, ex_ids, offsets = [], [], [], []
        for i, offs in enumerate(enc["offset_mapping"]):
            ids = enc["input_ids"][i]
            cls = ids.index(tokenizer.cls_token_id) if tokenizer.cls_token_id in ids else 0
            seq = enc.sequence_ids(i)
            ex = examples[sample_map[i]]
            ex_ids.append(sample_map[i])
            offsets.append([o if seq[k] == ctx_id else None for k, o in enumerate(offs)])
            ans = ex["answers"]
            if not ans["answer_start"]:
                starts.append(cls), ends.append(cls)
                continue
            s_char = ans["answer_start"][0]
            e_char = s_char + len(ans["text"][0])
            ts = 0
            while seq[ts] != ctx_id:
                ts += 1
            te = len(ids) - 1
            while seq[te] != ctx_id:
                te -= 1
            if not (offs[ts][0] <= s_char and offs[te][1] >= e_char):
                starts.append(cls), ends.append(cls)
                continue
            while ts < len(offs) and seq[ts] == ctx_id and offs[ts][0] <= s_char:
                ts += 1
            while te >= 0 and seq[te] == ctx_id and offs[te][1] >= e_char:
                te -= 1
            starts.append(ts - 1), ends.append(te + 1)
        if split == "train":
            cols["start_positions"], cols["end_positions"] = starts, ends
        return Features(cols, {"example_index": ex_ids, "offsets": offsets})

    def outputs_from(self, out, batch):
        s = out.start_logits.detach().float().cpu().numpy()
        e = out.end_logits.detach().float().cpu().numpy()
        lens = batch["attention_mask"].sum(-1).tolist()
        return [(s[i, :n], e[i, :n]) for i, n in enumerate(lens)]

    # -------------------------------------------------------------------------- post-processing
    def postprocess(self, examples, features, outputs) -> Dict[str, str]:
        """Best answer text per example id (:meth:`best_answers`)."""
        return {ex["id"]: a[0] for ex, a in zip(examples, self.best_answers(examples, features, outputs))}

    def best_answers(self, examples, features, outputs) -> List[tuple]:
        """``(text, span score, null score)`` per example: the n-best start/end pairs over all of an
        example's features, spans inside the context and at most ``max_answer_length`` tokens (the span
        score is the start plus end logit; None when no span qualifies); for v2 the empty answer wins
        when the null score beats the best span by more than the threshold."""
        by_example = collections.defaultdict(list)
        for f, ex in enumerate(features.meta["example_index"]):
            by_example[ex].append(f)
        answers = []
        for ei, ex in enumerate(examples):
            best_text, best_score, null_score = "", None, None
            for f in by_example.get(ei, []):
                start_logits, end_logits = outputs[f]
                offs = features.meta["offsets"][f]
                cls = 0
                fnull = float(start_logits[cls] + end_logits[cls])
                null_score = fnull if null_score is None or fnull < null_score else null_score
                s_idx = np.argsort(start_logits)[-1:-self.n_best - 1:-1]
                e_idx = np.argsort(end_logits)[-1:-self.n_best - 1:-1]
                for s in s_idx:
                    for e in e_idx:
                        if s >= len(offs) or e >= len(offs) or offs[s] is None or offs[e] is None:
                            continue
                        if e < s or e - s + 1 > self.max_answer_length:
                            continue
                        score = float(start_logits[s] + end_logits[e])
                        if best_score is None or score > best_score:
                            best_score = score
                            best_text = ex["context"][offs[s][0]:offs[e][1]]
            if self.version_2 and null_score is not None and (
                    best_score is None or null_score - best_score > self.null_threshold):
                best_text = ""
            answers.append((best_text, best_score, null_score))
        return answers

    def input_example(self, text, text_pair=None):
        if text_pair is None:
            raise ValueError(f"text_pair must be the context for task {self.name} (text is the question)")
        return {"id": "", "question": text, "context": text_pair, "answers": {"text": [], "answer_start": []}}

    def predictions(self, examples, features, outputs):
        """The answer text (``label``; empty: no answer) and the logit scores of the best span and of
        no answer (``scores``)."""
        return [{"label": text, "scores": {"answer": score, "null": null}}
                for text, score, null in self.best_answers(examples, features, outputs)]

    def evaluate(self, examples, features, outputs):
        preds = self.postprocess(examples, features, outputs)
        refs = {ex["id"]: list(ex["answers"]["text"]) for ex in examples}
        return M.squad_scores(preds, refs)


class SQuADv2(SQuAD):
    name = "squad_v2"
    version_2 = True
    hub = ("rajpurkar/squad_v2",)
    subdirs = ("squad_v2", "squad2", "SQuAD2.0", "squad2.0")
    files = {"train": ("train-v2.0.json", "train.json"), "dev": ("dev-v2.0.json", "dev.json")}
