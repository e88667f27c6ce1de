"""One frozen backbone serving a batch that mixes rows of several tasks through a prefix bank.

    python python/serve_prefix_bank.py

Three P-Tuning v2 task models share MiniLM (here with freshly initialized prefixes and heads; in
practice each comes from ``load_pretrained``). Their prefixes are stacked into a bank ``(T, Hkv, P,
D)`` per layer, one backbone is patched with it, and every row of a mixed batch reads its own task's
prefix (``prefix_index``) in the same kernel call; each row then goes to its task's head.
"""

import os

import torch

from ptv2_kernels.hf import apply_prefix_attention
from ptv2_kernels.prefix import PrefixEncoder
from ptv2_kernels.hf import PrefixModelForSequenceClassification
from ptv2_kernels.hf.testing import minilm_path


def main(argv=None):
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoModel, AutoTokenizer

    torch.manual_seed(0)
    tok = AutoTokenizer.from_pretrained(minilm_path())
    shared = AutoModel.from_pretrained(minilm_path()).eval()
    tasks = {"sentiment": 2, "topic": 4, "nli": 3}
    models = {}
    for name, n in tasks.items():  # stand-ins for trained checkpoints (load_pretrained(dir, backbone=...))
        import copy

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


if __name__ == "__main__":
    main()
