"""Runs trained separately on one backbone, stacked into one prefix bank and answered in mixed batches.

:func:`load_bank` reads each run the way ``ptv2 predict`` does (its ``best/`` model and ``task.json``),
builds every run's task model on one shared backbone, exports each prefix (a plain one: an MLP
reparameterization is only needed for training) and stacks them into one bank, bank entries in the
order the runs were named (a bank run ``--task a,b`` contributes all its entries). The backbone is then
patched with the bank, so :meth:`Bank.run` answers rows of any mix of tasks with one backbone forward
(``prefix_index`` per row) and one head call per run over that run's rows; each task's own
:meth:`~ptv2_kernels.tasks.Task.predictions` turns the outputs into what ``ptv2 predict`` writes.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import torch

from ..heap import release_freed_memory
from ..prefix import PrefixEncoder
from ..tasks import Features, MultiTask, Task
from ..train.config import ConfigError, model_location
from ..train.predict import MODEL_CONFIG, load_task, model_dir
from .requests import RequestError


class RunError(ConfigError):
    """A run refused at start; the command line names runs by position (``RUN``), not by a flag."""

    def __init__(self, message: str):
        super().__init__("run", message)

    def for_cli(self) -> str:
        return f"RUN {self.message}"


@dataclass
class Run:
    """One saved run on the shared backbone: its task model (used for its head), its task (a
    :class:`MultiTask` for a bank run), the maximum length it was trained with, and its first bank entry."""

    path: str
    model: torch.nn.Module
    task: Task
    max_length: int
    offset: int


@dataclass
class Entry:
    """One served task: its run and, for a bank run, the task's index in it."""

    name: str
    run: Run
    index: Optional[int]

    @property
    def task(self) -> Task:
        return self.run.task if self.index is None else self.run.task.tasks[self.index]

    @property
    def bank_index(self) -> int:
        return self.run.offset + (self.index or 0)

    def example(self, text: str, text_pair: Optional[str]) -> dict:
        """The example the run's task encodes and predicts (a bank run's names its task)."""
        try:
            example = self.task.input_example(text, text_pair)
        except ValueError as e:
            raise RequestError(422, str(e)) from None
        return example if self.index is None else {"task": self.index, "example": example}


class ComputedPrefix:
    """A plain bank's per-layer K/V as strided views of its weights: what the patched attention reads of
    a PrefixEncoder (``patch_attention`` takes anything with its interface). Serving never changes the
    bank, while :meth:`PrefixEncoder.forward` lays out every entry of every layer again at each forward
    (19 MB for 64 tasks at P = 16 on MiniLM), which glibc's allocator keeps as resident memory
    afterwards; the attention op reads each row's entry through ``prefix_index`` whatever the strides."""

    is_bank = True
    prefix_dropout_p = 0.0

    def __init__(self, encoder: PrefixEncoder):
        self.num_layers, self.num_kv_heads = encoder.num_layers, encoder.num_kv_heads
        self.head_dim, self.prefix_len = encoder.head_dim, encoder.prefix_len
        # the flat layout (see prefix.py): row t * P + p, columns (2L, Hkv, D) over the L layers that hold
        # a prefix -> per layer (T, Hkv, P, D); the other layers read a zero-length prefix
        x = encoder.embedding.weight.detach().view(encoder.num_tasks, self.prefix_len, 2 * len(encoder.layers),
                                                   self.num_kv_heads, self.head_dim)
        held = {layer: (x[:, :, 2 * i].transpose(1, 2), x[:, :, 2 * i + 1].transpose(1, 2))
                for i, layer in enumerate(encoder.layers)}
        empty = x.new_empty(self.num_kv_heads, 0, self.head_dim)
        self.layers = [held.get(i, (empty, empty)) for i in range(self.num_layers)]

    def __call__(self):
        return self.layers


@dataclass
class Prepared:
    """A request checked and encoded, ready to join a batch."""

    entry: Entry
    example: dict
    features: Features


def _run_specs(specs: Sequence[str]) -> List[tuple]:
    """``RUN`` or ``NAME=RUN`` -> ``(name or None, path)``; a path that exists is never split."""
    out = []
    for spec in specs:
        name, sep, path = spec.partition("=")
        out.append((name, path) if sep and name and not Path(spec).exists() else (None, spec))
    return out


def _saved_config(saved: Path) -> dict:
    return json.loads((saved / MODEL_CONFIG).read_text())


def _served_names(name: Optional[str], task: Task) -> List[str]:
    """The task names a run serves: a bank run its tasks', a single-task run ``NAME`` or its task's."""
    return [t.name for t in task.tasks] if isinstance(task, MultiTask) else [name or task.name]


def _check_runs(found: List[tuple]) -> None:
    """One-line refusals, before any weight loads: every run a prefix run on the first run's backbone,
    positions, prefix length and prefix layers (one bank holds one P on one set of layers; a row's
    positions are the backbone's, not the task's), and no task name served twice."""
    _, first_path, first_task, _, first = found[0]
    served = {}
    for name, path, task, _, cfg in found:
        if (task.model_kind == "generation") != (first_task.model_kind == "generation"):
            raise RunError(f"{path} {'generates' if task.model_kind == 'generation' else 'does not generate'} but "
                           f"{first_path} {'does' if first_task.model_kind == 'generation' else 'does not'}: one "
                           "server runs its backbone with its LM head (generation runs) or without (the others)")
        if cfg.get("method", "prefix") != "prefix":
            raise RunError(f"{path} was trained with method {cfg.get('method')!r}: serve stacks prefix runs, "
                           "which share one frozen backbone")
        if isinstance(task, MultiTask) and name is not None:
            raise RunError(f"NAME={path} names a single-task run; {path} is a bank of {task.name}, "
                           "served under its tasks' names")
        for key in ("backbone", "position_offset", "prefix_len", "prefix_layers"):
            if cfg.get(key) != first.get(key):
                raise RunError(f"{path} has {key} {cfg.get(key)!r} but {first_path} has "
                               f"{first.get(key)!r}: one server stacks runs of one backbone, with one "
                               "position offset, prefix length and set of prefix layers")
        for task_name in _served_names(name, task):
            if task_name in served:
                raise RunError(f"{path} serves task {task_name!r}, as {served[task_name]} does: name one of them "
                               "NAME=RUN")
            served[task_name] = path


def load_bank(specs: Sequence[str], device: Optional[str] = None) -> "Bank":
    """Load the runs ``specs`` (``RUN`` or ``NAME=RUN``, a run folder of ``ptv2 train`` or its ``best/``)
    into one :class:`Bank` on ``device``. Refuses, with one line naming the run, a run that is not a
    prefix run, holds multiple choice, or differs from the first in backbone, position offset, prefix
    length or prefix layers, and two runs serving the same task name. Weights load from safetensors only."""
    from transformers import AutoModel, AutoTokenizer
    from ..hf import PrefixModelForGeneration, load_pretrained
    from ..hf.patch import patch_attention

    if not specs:
        raise RunError("must name at least one run folder written by ptv2 train")
    found = []
    for name, path in _run_specs(specs):
        try:
            saved = model_dir(path)
            task, max_length = load_task(saved)
        except ConfigError as e:
            raise RunError(e.message) from None
        found.append((name, path, task, max_length, _saved_config(saved)))
    _check_runs(found)
    first = found[0][-1]
    location = model_location(first["backbone"])
    generates = found[0][2].model_kind == "generation"
    try:  # safetensors only: a backbone folder holding only a pickle (pytorch_model.bin) is refused
        kwargs = dict(use_safetensors=True, **first.get("backbone_kwargs", {}))
        backbone = (PrefixModelForGeneration.load_backbone(location, kwargs)[0] if generates
                    else AutoModel.from_pretrained(location, **kwargs))
        tokenizer = AutoTokenizer.from_pretrained(location)
    except (OSError, ValueError) as e:
        line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise RunError(f"{found[0][1]}'s backbone {first['backbone']!r} must load from safetensors files ({line})") from None

    runs, entries, prefixes, offset = [], {}, [], 0
    for name, path, task, max_length, _ in found:
        # each run's model is built on the shared backbone (patched with its own prefix while loading)
        model = load_pretrained(str(model_dir(path)), backbone=backbone)
        model.unpatch()
        prefixes.append(model.prefix_encoder.export())  # plain: the MLP is only needed for training
        model.prefix_encoder = None  # freed now, not after every run has loaded: the bank replaces it
        run = Run(path, model.eval(), task, max_length, offset)
        runs.append(run)
        names = _served_names(name, task)
        for i, task_name in enumerate(names):
            entries[task_name] = Entry(task_name, run, i if isinstance(task, MultiTask) else None)
        offset += len(names)
    bank = PrefixEncoder.stack(prefixes).eval()
    device = torch.device(device or "cpu")
    for module in [backbone, bank] + [r.model for r in runs]:
        module.to(device)
    patch_attention(backbone, ComputedPrefix(bank), position_offset=first.get("position_offset", "zero"))
    for run in runs:  # every run's model holds the shared backbone, which now reads the bank
        run.model.prefix_encoder = bank
    del prefixes, model
    release_freed_memory()  # each run's own prefix and its exported copy, now stacked into the bank
    return Bank(backbone, bank, tokenizer, runs, entries, first["backbone"], device, generates)


# What one backbone forward costs beyond its rows, in padded token rows: on the CPU, MiniLM at 1 thread
# took 4.5 ms per forward plus 0.27 ms per token row (process time, fitted over batches of 1x8 to 32x32:
# bench/serve_split_cost.py, results/cpu/serve/split_cost.json), 17 token rows. No such figure for a
# GPU, where one batch stays one forward until one is measured there.
FORWARD_COST_ROWS = {"cpu": 17}


def split_by_length(sizes: Sequence[tuple], overhead: Optional[float]) -> List[tuple]:
    """Cut requests sorted by length into contiguous sub-batches ``(start, stop)`` minimizing what they
    cost: each sub-batch ``overhead`` plus its rows times its longest length (a batch pads every row to
    its longest). ``sizes``: ``(rows, length)`` per request in that order; ``overhead`` None: one batch.
    On SST-2 sentences, 32 mixed requests cut so took 273 ms of CPU against 427 ms as one batch (MiniLM,
    1 thread, medians of 8 batches: bench/serve_split_cost.py)."""
    n = len(sizes)
    if overhead is None or n < 2:
        return [(0, n)] if n else []
    best, cut = [0.0] + [float("inf")] * n, [0] * (n + 1)
    for stop in range(1, n + 1):
        rows = 0
        for start in range(stop - 1, -1, -1):  # sub-batch start..stop-1: its longest is the last
            rows += sizes[start][0]
            cost = best[start] + overhead + rows * sizes[stop - 1][1]
            if cost < best[stop]:
                best[stop], cut[stop] = cost, start
    out, stop = [], n
    while stop:
        out.append((cut[stop], stop))
        stop = cut[stop]
    return out[::-1]


class Bank:
    """The shared backbone patched with the stacked prefixes, the runs' heads, and the served tasks."""

    def __init__(self, backbone, prefixes: PrefixEncoder, tokenizer, runs: List[Run], entries: Dict[str, Entry],
                 backbone_name: str, device: torch.device, generates: bool = False):
        self.backbone = backbone.eval()
        self.generates = generates  # generation runs: POST /generate, answered by generate()
        self.prefixes = prefixes
        self.tokenizer = tokenizer
        self.runs = runs
        self.entries = entries
        self.backbone_name = backbone_name
        self.device = device
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0

    @property
    def tasks(self) -> List[str]:
        return list(self.entries)

    def prepare(self, task: str, text: str, text_pair: Optional[str]) -> Prepared:
        """Encode one request as its run encodes its inputs. Input longer than the run's maximum length
        is refused (422), never truncated, so every answer is the answer to the whole input; question
        answering reads a long context in strided windows, as in training, and only needs the question
        to leave room for them. Called on the event loop's thread only: the tokenizer is used nowhere
        else, as a fast tokenizer used from two threads at once fails ("Already borrowed")."""
        entry = self.entries[task]
        example = entry.example(text, text_pair)
        limit = entry.run.max_length
        if entry.task.model_kind != "question_answering":
            n = len(self.tokenizer(text, text_pair)["input_ids"])
            limit = entry.task.input_limit(limit)
            if n > limit:
                what = "text and text_pair are" if text_pair is not None else "text is"
                raise RequestError(422, f"{what} {n} tokens, over task {task}'s max length {limit} "
                                        "(the server refuses rather than truncates)")
        try:
            features = entry.run.task.encode([example], self.tokenizer, entry.run.max_length, "predict")
        except Exception as e:  # the tokenizer's own refusal: a question leaving no room for the context
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise RequestError(422, f"text does not fit task {task}'s max length {limit} ({first})") from None
        return Prepared(entry, example, features)

    @torch.no_grad()
    def run(self, requests: Sequence[Prepared]) -> List[dict]:
        """Answer ``requests`` (any mix of tasks): sorted by length and cut into the sub-batches that
        :func:`split_by_length` finds cheapest, each one backbone forward for all its tasks (generation
        runs: one ``generate()`` per setting of beams and length); each answer is what ``ptv2 predict``
        writes for that input with the task's own run, plus ``"task"``."""
        if self.generates:
            return self._generate(requests)
        sizes = [(len(r.features), max(map(r.features.length, range(len(r.features))))) for r in requests]
        order = sorted(range(len(requests)), key=lambda i: sizes[i][1])
        answers: List[Optional[dict]] = [None] * len(requests)
        for start, stop in split_by_length([sizes[i] for i in order], FORWARD_COST_ROWS.get(self.device.type)):
            mine = order[start:stop]
            for i, answer in zip(mine, self._forward([requests[i] for i in mine])):
                answers[i] = answer
        return answers

    def _forward(self, requests: Sequence[Prepared]) -> List[dict]:
        """One backbone forward over ``requests``' rows, then each run's head over its rows."""
        spans, columns, by_run = [], {}, {}
        for req in requests:
            start = len(columns.get("input_ids", ()))
            spans.append(range(start, start + len(req.features)))  # a QA request may have several windows
            by_run.setdefault(id(req.entry.run), (req.entry.run, []))[1].extend(spans[-1])
            for key in ("input_ids", "attention_mask", "token_type_ids"):
                if key in req.features.columns:
                    columns.setdefault(key, []).extend(req.features.columns[key])
            columns.setdefault("prefix_index", []).extend([req.entry.bank_index] * len(req.features))
        n = len(columns["input_ids"])
        batch = {k: v.to(self.device) for k, v in Features(columns).batch(range(n), self.pad_id).items()}
        # every run's model holds the shared backbone and the bank; the first builds their arguments
        out = self.runs[0].model._backbone_forward(batch["input_ids"], batch["attention_mask"],
                                                   batch.get("token_type_ids"), batch["prefix_index"])
        outputs = [None] * n
        for run, mine in by_run.values():  # each run's head over its rows
            own, mask = out, batch["attention_mask"]
            if len(mine) < n:
                index = torch.tensor(mine, device=self.device)
                own, mask = type(out)(**{k: v[index] for k, v in out.items() if torch.is_tensor(v)}), mask[index]
            for i, o in zip(mine, run.task.outputs_from(run.model.head(own, mask), {"attention_mask": mask})):
                outputs[i] = o
        answers = []
        for req, span in zip(requests, spans):
            (answer,) = req.entry.run.task.predictions([req.example], req.features, [outputs[i] for i in span])
            answers.append({**answer, "task": req.entry.name})
        return answers

    def _generate(self, requests: Sequence[Prepared]) -> List[dict]:
        """Rows of every task with the same beams and length generate together, each reading its own bank
        entry (``prefix_index``) at every step."""
        groups: Dict[tuple, List[int]] = {}
        for i, req in enumerate(requests):
            groups.setdefault((req.entry.task.num_beams, req.entry.task.max_new_tokens), []).append(i)
        answers: List[Optional[dict]] = [None] * len(requests)
        for rows in groups.values():
            columns = {"input_ids": [], "attention_mask": [], "prefix_index": []}
            for i in rows:
                feats = requests[i].features
                columns["input_ids"] += feats.columns["input_ids"]
                columns["attention_mask"] += feats.columns["attention_mask"]
                columns["prefix_index"].append(requests[i].entry.bank_index)
            batch = {k: v.to(self.device) for k, v in Features(columns).batch(range(len(rows)), self.pad_id).items()}
            # every run's model wraps the shared backbone and the bank; the first's task has these settings
            outputs = requests[rows[0]].entry.task.infer(self.runs[0].model, batch)
            for i, out in zip(rows, outputs):
                req = requests[i]
                (answer,) = req.entry.task.predictions([req.example], req.features, [out])
                answers[i] = {**answer, "task": req.entry.name}
        return answers
