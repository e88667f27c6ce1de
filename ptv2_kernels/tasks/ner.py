"""CoNLL-2003 English NER: first-subword labelling (-100 elsewhere), entity-level F1."""

from __future__ import annotations


from . import metrics as M
from .base import Features, Task
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
        labels = []
        for i, ex in enumerate(examples):
            prev, row = None, []
            for w in enc.word_ids(i):
                row.append(-100 if w is None or w == prev else ex["tags"][w])
                prev = w
            labels.append(row)
        cols = {k: list(enc[k]) for k in ("input_ids", "attention_mask", "token_type_ids") if k in enc}
        cols["labels"] = labels
        return Features(cols)

    def outputs_from(self, out, batch):
        pred = out.logits.argmax(-1).cpu().numpy()
        lens = batch["attention_mask"].sum(-1).tolist()
        return [pred[i, :n] for i, n in enumerate(lens)]

    def evaluate(self, examples, features, outputs):
        """Entity F1 over the words kept after truncation (as HF's run_ner scores)."""
        true_seqs, pred_seqs = [], []
        for labels, pred in zip(features.columns["labels"], outputs):
            keep = [j for j, l in enumerate(labels) if l != -100]
            true_seqs.append([self.labels[labels[j]] for j in keep])
            pred_seqs.append([self.labels[int(pred[j])] for j in keep])
        return M.entity_f1(true_seqs, pred_seqs)
