"""Datasets, preprocessing and metrics for the P-Tuning v2 tasks.

``get_task(name, **options)`` returns a :class:`Task`; ``TASKS`` lists the names. Each task loads its
examples from local files (``--data-dir``) or from the Hugging Face hub (``datasets``, imported only
then), turns them into :class:`Features` and scores model outputs.
"""

from __future__ import annotations

from typing import Optional

from .base import Features, Task, data_dir_label, default_data_dirs
from .classification import BoolQ, CB, COPA, GLUE_TABLE, GlueTask, RTE, WiC
from .custom import CustomTask, read_inputs
from .generation import E2ENLG, GenerationTask, XSum, is_generation_file, read_pairs
from .io import DataError
from .multi import MultiTask
from .ner import CONLL2003_LABELS, CoNLL2003
from .qa import SQuAD, SQuADv2


def custom_task(generation: Optional[bool] = None, train_file=None, **options) -> Task:
    """The user's own data: generation pairs (``generation=True``, or a training file with a ``source``
    column) or labelled text (:class:`CustomTask`)."""
    if generation is None:
        generation = train_file is not None and is_generation_file(train_file)
    if generation:
        return GenerationTask(**options)
    return CustomTask(train_file=train_file, **options)


_CLASSES = {"boolq": BoolQ, "cb": CB, "copa": COPA, "rte": RTE, "wic": WiC,
            "conll2003": CoNLL2003, "squad": SQuAD, "squad_v2": SQuADv2, "e2e_nlg": E2ENLG, "xsum": XSum,
            "custom": custom_task}
ALIASES = {"sst-2": "sst2", "sts-b": "stsb", "squad2": "squad_v2", "squad_v1": "squad", "conll03": "conll2003", "e2e": "e2e_nlg",
           "ner": "conll2003", "super_glue/rte": "rte", "glue/rte": "glue-rte"}
TASKS = tuple(sorted(set(_CLASSES) - {"custom"} | set(GLUE_TABLE)))  # custom needs its files


def task_names(name: str) -> list:
    """``"rte,cb"`` -> ``["rte", "cb"]`` (several names: one model with a prefix bank)."""
    return [n.strip() for n in name.split(",")]


def get_task(name: str, **options) -> Task:
    """The task called ``name`` (case-insensitive; see ``TASKS``), built with its options (WiC:
    ``template``; SQuAD: ``doc_stride``, ``n_best``, ``max_answer_length``,
    ``null_score_diff_threshold``; custom: ``train_file``, or ``labels`` and ``regression``, or
    ``generation=True`` with ``num_beams`` and ``max_new_tokens``, which E2E NLG and XSum take too).
    Comma-separated names make a :class:`MultiTask` (one prefix bank; each task with its default
    options)."""
    if "," in name:
        return MultiTask([get_task(n) for n in task_names(name)])
    key = ALIASES.get(name.lower(), name.lower())
    if key in _CLASSES:
        return _CLASSES[key](**options)
    if key in GLUE_TABLE:
        if options:
            raise TypeError(f"task {key} takes no options {sorted(options)}")
        return GlueTask(key)
    raise ValueError(f"unknown task {name!r}; known: {', '.join(TASKS)}")


__all__ = ["Task", "Features", "DataError", "get_task", "TASKS", "default_data_dirs", "data_dir_label", "CONLL2003_LABELS", "CustomTask",
           "GenerationTask", "MultiTask", "read_pairs", "read_inputs", "task_names"]
