"""Several sentence classification tasks trained together into one prefix bank (``--task rte,cb``).

Task ``t``'s rows carry ``prefix_index`` ``t`` (its entry of the bank) and its classes occupy their
own slice of one output layer: label ``j`` of task ``t`` is output ``offsets[t] + j``. A linear
layer's outputs are independent, so the slices are exactly one head per task.
"""

from __future__ import annotations

from typing import List, Sequence

import numpy as np

from .base import Features, Task, as_array


class MultiTask(Task):
    model_kind = "sequence_classification"
    main_metric = "mean"  # of the tasks' main metrics

    def __init__(self, tasks: Sequence[Task]):
        self.tasks = list(tasks)
        self.name = ",".join(t.name for t in self.tasks)
        self.offsets = list(np.cumsum([0] + [t.num_labels for t in self.tasks[:-1]]).tolist())
        self.labels = [f"{t.name}/{label}" for t in self.tasks for label in t.labels]
        self.default_max_length = max(t.default_max_length for t in self.tasks)

    def segments(self) -> List[range]:
        """The output slice of each task."""
        return [range(o, o + t.num_labels) for o, t in zip(self.offsets, self.tasks)]

    def load(self, split, data_dir=None, file=None, max_samples=None, explicit_dir=False) -> List[dict]:
        """Every task's examples (``max_samples`` each), tagged with the task's index."""
        return [{"task": i, "example": e} for i, t in enumerate(self.tasks)
                for e in t.load(split, data_dir, file, max_samples, explicit_dir)]

    def read_inputs(self, path) -> List[dict]:
        """Rows naming their task in a ``task`` column (one of this bank's)."""
        from .custom import read_inputs

        return read_inputs(path, [t.name for t in self.tasks])

    def encode(self, examples, tokenizer, max_length, split) -> Features:
        """Each task's rows encoded by the task, kept in the order of ``examples``."""
        columns = {}
        for i, (t, offset) in enumerate(zip(self.tasks, self.offsets)):
            rows = [r for r, e in enumerate(examples) if e["task"] == i]
            if not rows:
                continue
            part = t.encode([examples[r]["example"] for r in rows], tokenizer, max_length, split)
            if "labels" in part.columns:  # inputs to serve have none
                part.columns["labels"] = [label + offset for label in part.columns["labels"]]
            part.columns["prefix_index"] = [i] * len(part)
            for name, values in part.columns.items():
                column = columns.setdefault(name, [None] * len(examples))
                for r, value in zip(rows, values):
                    column[r] = value
        return Features(columns)

    def predictions(self, examples, features, outputs):
        """Each row answered by its own task from its own output slice, naming the task."""
        out = []
        for e, row in zip(examples, outputs):
            own, seg = self.tasks[e["task"]], self.segments()[e["task"]]
            out.append({"task": own.name, **own.predictions([e["example"]], None, [row[seg.start:seg.stop]])[0]})
        return out

    def evaluate(self, examples, features, outputs):
        """Each task scored on its own rows and output slice; ``mean`` of their main metrics."""
        index = np.asarray(features.columns["prefix_index"])
        logits = as_array(outputs)
        out = {}
        for i, (t, seg) in enumerate(zip(self.tasks, self.segments())):
            rows = np.flatnonzero(index == i).tolist()
            own = features.select(rows)
            own.columns["labels"] = [label - seg.start for label in own.columns["labels"]]
            scores = t.evaluate([examples[r]["example"] for r in rows], own, list(logits[rows][:, seg.start:seg.stop]))
            out.update({f"{t.name}/{k}": v for k, v in scores.items()})
        out["mean"] = float(np.mean([out[f"{t.name}/{t.main_metric}"] for t in self.tasks]))
        return out

    def describe(self) -> str:
        return f"{self.name} (one prefix bank: " + "; ".join(t.describe() for t in self.tasks) + ")"
