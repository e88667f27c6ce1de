"""Text generation on the user's files (``--task custom`` with ``source`` and ``target`` columns), the job
Prefix-Tuning was made for: table-to-text, summarization.

A row is ``{"source": str, "target": str or [str, ...]}`` (JSONL; CSV and TSV with those two columns);
several targets are several references. Training sees one feature per (source, reference); evaluation
generates once per source and scores it against all of its references: BLEU by sacrebleu (corpus BLEU,
reported / 100 like every other metric here) and ROUGE-L F by rouge-score (the best reference per
source, averaged).

How a pair becomes model input depends on the backbone (:meth:`GenerationTask.fit_backbone`):

- a decoder reads ``source <sep> target <eos>`` with the loss on the target tokens only (labels -100 on
  the source, as Li and Liang train GPT-2); ``<sep>`` is the tokenizer's BOS (GPT-2's ``<|endoftext|>``,
  Li and Liang's separator) or else its EOS; it generates after ``source <sep>``. The source keeps
  ``max_length - max_new_tokens - 1`` tokens, so prompt and answer always fit ``max_length``.
- an encoder-decoder reads the source (``max_length`` tokens) and is taught the target
  (``max_new_tokens`` tokens) by its own teacher forcing.
"""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

from .base import Features, Task
from .io import DataError, read_jsonl, where

LAYOUTS = ("decoder", "encoder_decoder")


def is_generation_file(path) -> bool:
    """Whether a custom task's training file holds generation pairs (a ``source`` column) rather than
    labelled text."""
    return "source" in _columns(Path(path))


def _columns(path: Path) -> set:
    """The column names of a data file's header or first JSON record (none for a file of another kind,
    which the custom task's reader names)."""
    suffix = path.suffix.lower()
    if suffix in (".csv", ".tsv"):
        import csv

        with open(path, encoding="utf-8", newline="") as f:
            return set(next(csv.reader(f, delimiter="\t" if suffix == ".tsv" else ","), []))
    if suffix in (".jsonl", ".json"):
        for _, rec in read_jsonl(path):
            return set(rec)
    return set()


def _rows(path: Path, need_target: bool):
    """``(line, record)`` of a JSONL, CSV or TSV file with ``source`` (and ``target``)."""
    required = ("source", "target") if need_target else ("source",)
    if path.suffix.lower() in (".jsonl", ".json"):
        yield from read_jsonl(path, required)
        return
    from .custom import FORMATS, _read_delimited

    if path.suffix.lower() not in FORMATS:
        raise DataError(f"{path}: expected a .jsonl, .csv or .tsv file, got {path.suffix or 'no suffix'}")
    yield from _read_delimited(path, FORMATS[path.suffix.lower()], required)


def read_pairs(path, need_target: bool = True) -> List[dict]:
    """``{"source": str, "targets": [str, ...]}`` per row (``targets`` empty without ``need_target``)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    out = []
    for lineno, rec in _rows(path, need_target):
        if not isinstance(rec["source"], str) or not rec["source"].strip():
            raise DataError(f"{where(path, lineno)}: source must be a non-empty string, got {rec['source']!r}")
        targets = rec.get("target") if need_target else None
        if need_target:
            targets = [targets] if isinstance(targets, str) else targets
            if not isinstance(targets, list) or not targets or not all(isinstance(t, str) and t.strip() for t in targets):
                raise DataError(f"{where(path, lineno)}: target must be a non-empty string or a list of them, "
                                f"got {rec['target']!r}")
        out.append({"source": rec["source"], "targets": list(targets or [])})
    return out


class GenerationTask(Task):
    """``--task custom`` with ``source``/``target`` files: train on the target tokens, score by generating
    (greedy, or beam search with ``num_beams``) up to ``max_new_tokens`` tokens."""

    name = "custom"
    model_kind = "generation"
    main_metric = "bleu"
    default_max_length = 256

    def __init__(self, num_beams: int = 1, max_new_tokens: int = 64, layout: Optional[str] = None):
        if int(num_beams) < 1 or int(max_new_tokens) < 1:
            raise ValueError(f"num_beams and max_new_tokens must be >= 1, got {num_beams} and {max_new_tokens}")
        if layout is not None and layout not in LAYOUTS:
            raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
        self.num_beams, self.max_new_tokens, self.layout = int(num_beams), int(max_new_tokens), layout
        self.tokenizer = None  # the one that encoded: decoding the generations needs it

    def options(self) -> dict:
        return {"generation": True, "num_beams": self.num_beams, "max_new_tokens": self.max_new_tokens,
                "layout": self.layout}

    def describe(self) -> str:
        beams = "greedy" if self.num_beams == 1 else f"beam search of {self.num_beams}"
        return f"{self.name} (generation, {beams} up to {self.max_new_tokens} new tokens, metrics bleu and rougeL)"

    def fit_backbone(self, config) -> None:
        from ..hf.arch import ARCHS

        arch = ARCHS.get(config.model_type)
        if arch is None or not (arch.is_decoder or arch.is_encoder_decoder):
            kinds = ", ".join(t for t, a in ARCHS.items() if a.is_decoder or a.is_encoder_decoder)
            raise ValueError(f"must be a decoder or an encoder-decoder to generate ({kinds}), got {config.model_type}")
        self.layout = "encoder_decoder" if arch.is_encoder_decoder else "decoder"

    # -------------------------------------------------------------------------------- loading
    def read_file(self, path):
        return read_pairs(path)

    def read_inputs(self, path) -> List[dict]:
        """Sources to generate for: the training files' format, ``target`` not needed (ignored)."""
        return read_pairs(path, need_target=False)

    def input_example(self, text: str, text_pair: Optional[str] = None) -> dict:
        if text_pair is not None:
            raise ValueError("text_pair must be null for a generation task: the source is the text")
        return {"source": text, "targets": []}

    def input_limit(self, max_length: int) -> int:
        """A decoder's source shares ``max_length`` with the answer and the separator."""
        return max_length - self.max_new_tokens - 1 if self.layout == "decoder" else max_length

    # ------------------------------------------------------------------------------ features
    def encode(self, examples, tokenizer, max_length, split):
        if self.layout is None:
            raise ValueError("the generation task needs its backbone first (fit_backbone)")
        self.tokenizer = tokenizer
        if self.layout == "decoder" and max_length <= self.max_new_tokens + 1:
            raise ValueError(f"max_length must exceed max_new_tokens + 1 = {self.max_new_tokens + 1} for a decoder "
                             f"(the source and the answer share it), got {max_length}")
        teach = split == "train"
        cols = {"input_ids": [], "attention_mask": []}
        if teach:
            cols["labels"] = []
        refs = []
        for e in examples:
            for target in (e["targets"] if teach else [None]):
                ids, labels = self._pair(tokenizer, e["source"], target, max_length)
                cols["input_ids"].append(ids)
                cols["attention_mask"].append([1] * len(ids))
                if teach:
                    cols["labels"].append(labels)
                refs.append(e["targets"])
        return Features(cols, {"references": refs})

    def _pair(self, tok, source: str, target: Optional[str], max_length: int):
        eos = tok.eos_token_id
        if self.layout == "encoder_decoder":
            ids = tok(source, truncation=True, max_length=max_length)["input_ids"]
            if target is None:
                return ids, None
            return ids, tok(text_target=target, truncation=True, max_length=self.max_new_tokens)["input_ids"]
        sep = tok.bos_token_id if tok.bos_token_id is not None else eos
        src = tok(source)["input_ids"][:self.input_limit(max_length)] + [sep]
        if target is None:
            return src, None
        tgt = (tok(target, add_special_tokens=False)["input_ids"] + [eos])[:self.max_new_tokens]
        return src + tgt, [-100] * len(src) + tgt

    # ---------------------------------------------------------------------------- generating
    def infer(self, model, batch, **kwargs) -> list:
        """Each row's generated text (its new tokens up to the first EOS, decoded once here)."""
        import torch.distributed as dist

        ids, mask = batch["input_ids"], batch["attention_mask"]
        if self.layout == "decoder":
            ids, mask = _left_padded(ids, mask, self._pad_id())
        extra = {"prefix_index": batch["prefix_index"]} if "prefix_index" in batch else {}
        # under several processes they generate in step (a sharded backbone gathers at every token)
        synced = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
        out = model.generate(input_ids=ids, attention_mask=mask, num_beams=self.num_beams,
                             max_new_tokens=self.max_new_tokens, do_sample=False, pad_token_id=self._pad_id(),
                             synced_gpus=synced, **extra)
        eos = self.tokenizer.eos_token_id
        rows = [row[:row.index(eos)] if eos in row else row for row in out.tolist()]
        return [self.tokenizer.decode(row, skip_special_tokens=True).strip() for row in rows]

    def _pad_id(self) -> int:
        tok = self.tokenizer
        return tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id

    def evaluate(self, examples, features, outputs):
        from . import metrics as M

        refs = features.meta["references"]
        return {"bleu": M.bleu(outputs, refs), "rougeL": M.rouge_l(outputs, refs)}

    def predictions(self, examples, features, outputs):
        return [{"generation": text} for text in outputs]

    def output_rows(self, examples, features, outputs) -> List[dict]:
        return [{"source": e["source"], "references": e["targets"], "generation": text}
                for e, text in zip(examples, outputs)]


def _left_padded(ids, mask, pad_id: int):
    """Right-padded rows moved to the right end (a decoder continues each row from its last token)."""
    import torch

    lengths = mask.sum(1)
    out_ids = torch.full_like(ids, pad_id)
    out_mask = torch.zeros_like(mask)
    N = ids.shape[1]
    for r, n in enumerate(lengths.tolist()):
        out_ids[r, N - n:] = ids[r, :n]
        out_mask[r, N - n:] = 1
    return out_ids, out_mask


class NamedGenerationTask(GenerationTask):
    """A published generation data set, from its own files (``--data-dir``) or the hub. ``columns``: the
    source's and the target's column names, in the order they are looked for (the official files',
    the hub's, then ``source``/``target``). Rows that share a source are one example with all their
    references, as these sets are scored (E2E has about eight per meaning representation); training
    still sees every pair."""

    columns: tuple = ()

    def options(self) -> dict:
        return {k: v for k, v in super().options().items() if k != "generation"}

    def load(self, split, data_dir=None, file=None, max_samples=None, explicit_dir=False):
        rows = super().load(split, data_dir, file, max_samples, explicit_dir)
        grouped = {}
        for r in rows:
            grouped.setdefault(r["source"], []).extend(r["targets"])
        return [{"source": src, "targets": refs} for src, refs in grouped.items()]

    def read_file(self, path):
        from .custom import FORMATS, _read_delimited

        path = Path(path)
        suffix = path.suffix.lower()
        if suffix in (".jsonl", ".json"):
            records = read_jsonl(path)
        elif suffix in FORMATS:
            records = _read_delimited(path, FORMATS[suffix], ())
        else:
            raise DataError(f"{path}: expected a .jsonl, .csv or .tsv file, got {suffix or 'no suffix'}")
        out = []
        for lineno, rec in records:
            source, target = (self._field(rec, names, path, lineno) for names in self.columns)
            out.append({"source": source, "targets": [target]})
        return out

    def from_hub(self, row):
        return {"source": self._field(row, self.columns[0]), "targets": [self._field(row, self.columns[1])]}

    @staticmethod
    def _field(rec: dict, names: tuple, path=None, lineno=None) -> str:
        value = next((rec[n] for n in names if n in rec), None)
        if not isinstance(value, str) or not value.strip():
            raise DataError(f"{where(path, lineno) if path else 'a hub row'}: needs a non-empty string in one of "
                            f"the columns {', '.join(names)}")
        return value


class E2ENLG(NamedGenerationTask):
    """The E2E NLG Challenge (restaurant meaning representations to text), Li and Liang's GPT-2 task: the
    official ``trainset.csv``/``devset.csv`` (columns ``mr``, ``ref``), or the hub's."""

    name = "e2e_nlg"
    hub = ("tuetschek/e2e_nlg",)
    subdirs = ("e2e_nlg", "e2e", "E2E")
    files = {"train": ("trainset.csv", "train.csv", "train.jsonl"),
             "dev": ("devset.csv", "dev.csv", "validation.jsonl", "dev.jsonl")}
    columns = (("mr", "meaning_representation", "source"), ("ref", "human_reference", "target"))
    default_max_length = 128


class XSum(NamedGenerationTask):
    """XSum (a BBC article to its one-sentence summary), Li and Liang's BART task: JSONL files with
    ``document`` and ``summary`` (the hub's columns), or the hub's."""

    name = "xsum"
    hub = ("EdinburghNLP/xsum",)
    subdirs = ("xsum", "XSum")
    files = {"train": ("train.jsonl",), "dev": ("validation.jsonl", "dev.jsonl")}
    columns = (("document", "source"), ("summary", "target"))
    default_max_length = 512
