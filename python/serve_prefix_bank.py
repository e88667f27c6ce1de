"""One frozen backbone serving a batch that mixes rows of several tasks through a prefix bank.

    python python/serve_prefix_bank.py                 # a demo with three untrained stand-in tasks
    ptv2 train --task rte,cb --output-dir runs/bank    # train a bank, then serve it:
    python python/serve_prefix_bank.py --run runs/bank \\
        --request rte "A man plays a guitar." "Someone makes music." \\
        --request cb "It is raining." "The ground is dry."

Demo: three P-Tuning v2 task models share MiniLM (freshly initialized prefixes and heads; in practice
each comes from ``load_pretrained``). Their prefixes are stacked into a bank ``(T, Hkv, P, D)`` per
layer, one backbone is patched with it, and every row of a mixed batch reads its own task's prefix
(``prefix_index``) in the same kernel call; each row then goes to its task's head.

``--run``: a bank trained by ``ptv2 train --task a,b,...`` already is such a model (one bank entry and
one output slice per task); every request is one row of a single mixed batch.

To serve runs over HTTP, with requests of many clients batched together: ``ptv2 serve RUN [RUN ...]``
(runs trained separately on one backbone are stacked into one bank; see the README's Serving section).
"""

import argparse
import copy
import os
from pathlib import Path

import torch

from ptv2_kernels.hf import PrefixModelForSequenceClassification, apply_prefix_attention
from ptv2_kernels.hf.testing import minilm_path
from ptv2_kernels.prefix import PrefixEncoder


def demo():
    from transformers import AutoModel, AutoTokenizer

    torch.manual_seed(0)
    tok = AutoTokenizer.from_pretrained(minilm_path())
    shared = AutoModel.from_pretrained(minilm_path()).eval()
    tasks = {"sentiment": 2, "topic": 4, "nli": 3}
    models = {}
    for name, n in tasks.items():  # stand-ins for trained checkpoints (load_pretrained(dir, backbone=...))
        m = PrefixModelForSequenceClassification.from_pretrained(copy.deepcopy(shared), num_labels=n,
                                                                 prefix_len=8, projection=True).eval()
        models[name] = m

    # one bank of plain prefixes (the MLPs are only needed for training)
    bank = PrefixEncoder.stack([m.prefix_encoder.export() for m in models.values()]).eval()
    server = apply_prefix_attention(shared, bank)
    print("bank per layer:", tuple(bank()[0][0].shape), "(tasks, kv heads, prefix, head dim)")

    requests = [("sentiment", "what a lovely day"), ("topic", "the striker scored twice"),
                ("nli", "a man plays guitar [SEP] someone makes music"), ("sentiment", "awful service"),
                ("topic", "stocks fell sharply on monday")]
    names = list(tasks)
    index = torch.tensor([names.index(t) for t, _ in requests])
    batch = tok([text for _, text in requests], padding=True, return_tensors="pt")
    with torch.no_grad():
        pooled = server(**batch, prefix_index=index).pooler_output  # one pass, mixed tasks
        for row, (task, text) in enumerate(requests):
            logits = models[task].classifier(pooled[row])
            # the same row through its own task model gives the same answer
            alone = models[task](**{k: v[row:row + 1] for k, v in batch.items()}).logits[0]
            assert torch.allclose(logits, alone, atol=1e-5), (logits, alone)
            print(f"{task:9s} | {text:45s} -> class {int(logits.argmax())}")
    print("every row matches its single-task model")


def serve_run(run, requests):
    """Answer ``requests`` (task, text[, text_pair]) with a bank trained by ``ptv2 train --task a,b``
    in one mixed batch; one ``{"task", "label", "scores"}`` per request."""
    from ptv2_kernels.train.predict import load_model, load_task, model_dir, predictions

    saved = model_dir(run)
    bank, max_length = load_task(saved)
    model, tok = load_model(saved, bank)
    names = [t.name for t in bank.tasks]
    examples = [{"task": names.index(r[0]), "example": {"text_a": r[1], "text_b": r[2] if len(r) > 2 else None}}
                for r in requests]
    return predictions(bank, model, tok, max_length, examples, batch_size=len(examples))


def main(argv=None):
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", type=Path, help="a run of `ptv2 train --task a,b,...`")
    p.add_argument("--request", nargs="+", action="append", metavar=("TASK", "TEXT"), default=[],
                   help="TASK TEXT [TEXT_PAIR]; repeat for a mixed batch")
    args = p.parse_args(argv or [])
    if args.run is None:
        return demo()
    if not args.request:
        p.error("--run needs at least one --request TASK TEXT [TEXT_PAIR]")
    answers = serve_run(args.run, args.request)
    for req, a in zip(args.request, answers):
        print(f"{a['task']:6s} | {' / '.join(req[1:]):60s} -> {a['label']} ({a['scores'][str(a['label'])]:.2f})")
    return answers


if __name__ == "__main__":
    import sys
    main(sys.argv[1:])
