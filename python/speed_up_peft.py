"""Speed up an existing PEFT prefix-tuning model in place with ``from_peft`` (CPU, seconds).

    python python/speed_up_peft.py [--steps 3]

Same parameters (names and shapes), same outputs and gradients as PEFT computes (positions shifted as
PEFT shifts them), and ``save_pretrained`` still writes an adapter PEFT loads. The check below runs
PEFT's materializing computation side by side.
"""

import argparse
import os
import tempfile
import time

import torch

from ptv2_kernels.hf import from_peft
from ptv2_kernels.hf.testing import minilm_path


def peft_computation(pm, batch, labels):
    """What PEFT computes (its ``past_key_values`` path; its own forward's signature check does not
    recognize transformers 5.x's ``cache`` argument, so call the base model as it would)."""
    P = pm.active_peft_config.num_virtual_tokens
    B = batch["input_ids"].shape[0]
    mask = torch.cat([torch.ones(B, P, dtype=batch["attention_mask"].dtype), batch["attention_mask"]], 1)
    return pm.base_model(**{**batch, "attention_mask": mask}, past_key_values=pm.get_prompt(B), labels=labels)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=3)
    args = ap.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from peft import PeftModel, PrefixTuningConfig, get_peft_model
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    torch.manual_seed(0)
    tok = AutoTokenizer.from_pretrained(minilm_path())
    base = AutoModelForSequenceClassification.from_pretrained(minilm_path(), num_labels=2)
    pm = get_peft_model(base, PrefixTuningConfig(task_type="SEQ_CLS", num_virtual_tokens=16))
    pm.print_trainable_parameters()
    batch = dict(tok(["a great movie", "not good at all, really", "fine", "terrible"] * 2, padding=True,
                     return_tensors="pt"))
    labels = torch.tensor([1, 0, 1, 0] * 2)

    pm.eval()
    with torch.no_grad():
        ref = peft_computation(pm, batch, labels).logits
    t = time.perf_counter()
    pm.train()
    for _ in range(args.steps):
        peft_computation(pm, batch, labels).loss.backward()
    t_peft = (time.perf_counter() - t) / args.steps
    pm.zero_grad()

    from_peft(pm)  # in place: the prefix now reaches attention through the fused op
    pm.eval()
    with torch.no_grad():
        ours = pm(**batch).logits
    print(f"max |logits - PEFT logits| = {(ours - ref).abs().max().item():.2e}")
    assert torch.allclose(ours, ref, atol=1e-4)

    pm.train()
    opt = torch.optim.AdamW([p for p in pm.parameters() if p.requires_grad], lr=1e-2)
    t = time.perf_counter()
    for step in range(args.steps):
        loss = pm(**batch, labels=labels).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        print(f"step {step}: loss {loss.item():.4f}")
    t_ours = (time.perf_counter() - t) / args.steps
    print(f"train step: PEFT path {1e3 * t_peft:.0f} ms, from_peft {1e3 * t_ours:.0f} ms (CPU, incl. optimizer)")

    with tempfile.TemporaryDirectory() as d:
        pm.save_pretrained(d)  # a regular PEFT adapter
        again = PeftModel.from_pretrained(AutoModelForSequenceClassification.from_pretrained(minilm_path(),
                                                                                            num_labels=2), d)
        print("adapter files:", sorted(os.listdir(d)))
        from_peft(again)
        again.eval()
        pm.eval()
        with torch.no_grad():
            diff = (again(**batch).logits - pm(**batch).logits).abs().max().item()
        print(f"reloaded adapter max |diff| = {diff:.2e}")
        assert diff < 1e-4


if __name__ == "__main__":
    main()
