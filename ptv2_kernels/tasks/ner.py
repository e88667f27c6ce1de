"""CoNLL-2003 English NER: first-subword labelling (-100 elsewhere), entity-level F1; a text to predict
is its whitespace-separated words, each tagged at its first subword."""

from __future__ import annotations


from . import metrics as M
from .base import Features, Task, class_scores
from .io import read_conll

# label order of the HF ``conll2003`` dataset's ner_tags
CONLL2003_LABELS = ["O", "B-PER", "I-PER", "B-ORG", "I-ORG", "B-LOC", "I-LOC", "B-MISC", "I-MISC"]


class CoNLL2003(Task):
    name = "conll2003"
    model_kind = "token_classification"
    labels = CONLL2003_LABELS
    main_metric = "f1"
    hub = ("eriktks/conll2003",)
    subdirs = ("conll2003", "CoNLL2003", "conll03")
    files = {"train": ("train.txt",), "dev": ("valid.txt", "dev.txt", "testa.txt")}
    default_max_length = 152  # the authors' CoNLL-2003 recipe

    def read_file(self, path):
        return [{"tokens": s["tokens"], "tags": [self.labels.index(t) for t in s["tags"]]}
                for s in read_conll(path, labels=self.labels)]

    def from_hub(self, row):
        return {"tokens": list(row["tokens"]), "tags": [int(t) for t in row["ner_tags"]]}

    def encode(self, examples, tokenizer, max_length, split):
        if not getattr(tokenizer, "is_fast", False):
            raise ValueError("NER needs a fast tokenizer (word_ids)")
        enc = tokenizer([e["tokens"] for e in examples], is_split_into_words=True, truncation=True,
                        max_length=max_length)
        starts = []  # per feature: at each word's first subword the word's index, None elsewhere
        for i in range(len(examples)):
            prev, row = None, []
            for w in enc.word_ids(i):
                row.append(None if w is None or w == prev else w)
                prev = w
            starts.append(row)
        cols = {k: list(enc[k]) for k in ("input_ids", "attention_mask", "token_type_ids") if k in enc}
        if examples and "tags" in examples[0]:  # inputs to predict have none
            cols["labels"] = [[-100 if w is None else ex["tags"][w] for w in row] for ex, row in zip(examples, starts)]
        return Features(cols, {"word_starts": starts})

    def outputs_from(self, out, batch):
        logits = out.logits.detach().float().cpu().numpy()
        lens = batch["attention_mask"].sum(-1).tolist()
        return [logits[i, :n] for i, n in enumerate(lens)]

    def input_example(self, text, text_pair=None):
        if text_pair is not None:
            raise ValueError(f"text_pair must be absent for task {self.name} (it tags the words of text)")
        return {"tokens": text.split()}

    def predictions(self, examples, features, outputs):
        """The words of each example with one tag per word (``label``) and every tag's probability
        per word (``scores``); words cut off by the maximum length get none."""
        out = []
        for ex, starts, logits in zip(examples, features.meta["word_starts"], outputs):
            rows = [logits[j] for j, w in enumerate(starts[:len(logits)]) if w is not None]
            out.append({"words": ex["tokens"], "label": [self.labels[int(r.argmax())] for r in rows],
                        "scores": [class_scores(self.labels, r) for r in rows]})
        return out

    def evaluate(self, examples, features, outputs):
        """Entity F1 over the words kept after truncation (as HF's run_ner scores)."""
        true_seqs, pred_seqs = [], []
        for labels, pred in zip(features.columns["labels"], outputs):
            keep = [j for j, l in enumerate(labels) if l != -100]
            true_seqs.append([self.labels[labels[j]] for j in keep])
            pred_seqs.append([self.labels[int(pred[j].argmax())] for j in keep])
        return M.entity_f1(true_seqs, pred_seqs)
