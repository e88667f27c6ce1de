"""Task models on the real MiniLM: against PEFT's computation, save/load, frozen backbone, baselines."""

import pytest
import torch

from ptv2_kernels.hf.models import (PrefixModelForMultipleChoice, PrefixModelForQuestionAnswering,
                                    PrefixModelForSequenceClassification, PrefixModelForTokenClassification,
                                    load_pretrained)
from ptv2_kernels.hf.testing import minilm_path, tiny_model

TOL = dict(rtol=1e-4, atol=2e-5)


@pytest.fixture(scope="module")
def base():
    from transformers import AutoModel

    return AutoModel.from_pretrained(minilm_path())


def _backbone(base):
    """A fresh copy of the loaded MiniLM (loading from disk for every model is slow)."""
    import copy

    return copy.deepcopy(base)


@pytest.fixture(scope="module")
def tok():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(minilm_path())


def _inputs(tok, task):
    a = ["the cat sat on the mat", "hello", "a rather longer sentence that will need no padding at all"]
    b = ["where did it sit", "world", "short"]
    if task == "mc":
        enc = tok([x for x in a for _ in range(2)], [y for y in b for _ in range(2)], padding=True,
                  return_tensors="pt")
        batch = {k: v.view(3, 2, -1) for k, v in enc.items()}
        return batch, dict(labels=torch.tensor([1, 0, 1]))
    batch = dict(tok(a, b, padding=True, return_tensors="pt"))
    N = batch["input_ids"].shape[1]
    if task == "seq":
        return batch, dict(labels=torch.tensor([0, 2, 1]))
    if task == "tok":
        labels = torch.randint(0, 3, (3, N), generator=torch.Generator().manual_seed(0))
        return batch, dict(labels=labels.masked_fill(batch["attention_mask"] == 0, -100))
    return batch, dict(start_positions=torch.tensor([1, 2, 3]), end_positions=torch.tensor([2, 2, 5]))


CASES = {
    "seq": (PrefixModelForSequenceClassification, "AutoModelForSequenceClassification", "classifier", 3),
    "tok": (PrefixModelForTokenClassification, "AutoModelForTokenClassification", "classifier", 3),
    "qa": (PrefixModelForQuestionAnswering, "AutoModelForQuestionAnswering", "qa_outputs", 2),
    "mc": (PrefixModelForMultipleChoice, "AutoModelForMultipleChoice", "classifier", 1),
}


def _grads(named):
    return {n: p.grad.clone() for n, p in named if p.grad is not None}


@pytest.mark.parametrize("task,projection", [("seq", False), ("seq", True), ("tok", False), ("qa", False),
                                             ("mc", False)])
def test_head_matches_peft_and_reference(base, tok, task, projection):
    import transformers
    from peft import PeftModel, PrefixTuningConfig

    cls, auto, head, num_labels = CASES[task]
    torch.manual_seed(0)
    kw = dict(prefix_len=4, projection=projection, prefix_hidden=32, prefix_dropout=0.0,
              position_offset="shifted")
    if task in ("seq", "tok"):
        kw["num_labels"] = num_labels
    ours = cls.from_pretrained(_backbone(base), **kw).eval()
    with torch.no_grad():
        ours.prefix_encoder.embedding.weight.mul_(0.3)
    batch, labels = _inputs(tok, task)

    # PEFT's computation (PeftModel + PrefixTuningConfig, its get_prompt / past_key_values path), same weights
    import copy

    hf_cfg = copy.deepcopy(base.config)
    if task in ("seq", "tok"):
        hf_cfg.num_labels = num_labels
    hf = getattr(transformers, auto).from_config(hf_cfg).eval()
    hf.bert.load_state_dict(base.state_dict(), strict=False)
    getattr(hf, head).load_state_dict(getattr(ours, head).state_dict())
    cfg = PrefixTuningConfig(num_virtual_tokens=4, prefix_projection=projection, encoder_hidden_size=32)
    pm = PeftModel(hf, cfg).eval()
    enc = pm.prompt_encoder["default"]
    sd = {k.replace("trans.", "transform."): v for k, v in ours.prefix_encoder.state_dict().items()}
    enc.load_state_dict(sd)
    getattr(hf, head).requires_grad_(True)
    B = batch["input_ids"].numel() // batch["input_ids"].shape[-1]
    mask = batch["attention_mask"]
    widened = torch.cat([torch.ones(*mask.shape[:-1], 4, dtype=mask.dtype), mask], -1)
    out = hf(**{**batch, "attention_mask": widened}, past_key_values=pm.get_prompt(B), **labels)
    out.loss.backward()
    peft_logits = out.logits if task != "qa" else torch.stack([out.start_logits, out.end_logits], -1)
    peft_grads = _grads(enc.named_parameters())
    peft_grads.update({"head." + n: p.grad.clone() for n, p in getattr(hf, head).named_parameters()})

    for attention in ("prefix", "reference"):
        model = ours if attention == "prefix" else cls.from_pretrained(_backbone(base), **kw, attention=attention).eval()
        if model is not ours:
            model.load_state_dict(ours.state_dict())
        model.zero_grad()
        res = model(**batch, **labels)
        res.loss.backward()
        logits = res.logits if task != "qa" else torch.stack([res.start_logits, res.end_logits], -1)
        torch.testing.assert_close(logits, peft_logits, **TOL)
        torch.testing.assert_close(res.loss, out.loss, **TOL)
        grads = {k.replace("trans.", "transform."): v for k, v in _grads(model.prefix_encoder.named_parameters()).items()}
        grads.update({"head." + n: p.grad for n, p in getattr(model, head).named_parameters()})
        assert set(grads) == set(peft_grads)
        errs = []
        for n in grads:
            torch.testing.assert_close(grads[n], peft_grads[n], **TOL)
            errs.append((grads[n] - peft_grads[n]).abs().max().item())
        print(f"{task} projection={projection} {attention} vs PEFT: logits max err "
              f"{(logits - peft_logits).abs().max().item():.2e}, grads max err {max(errs):.2e}")
        assert all(p.grad is None for p in model.backbone.parameters())


def test_frozen_backbone_train_mode_and_optimizer(base, tok):
    model = PrefixModelForSequenceClassification.from_pretrained(_backbone(base), num_labels=2, prefix_len=4)
    counts = model.parameter_counts()
    n_train = sum(p.numel() for p in model.prefix_encoder.parameters()) + 384 * 2 + 2
    assert counts["trainable"] == n_train and counts["total"] > 20_000_000
    assert all(not p.requires_grad for p in model.backbone.parameters())
    model.train()
    assert model.backbone.training and model.prefix_encoder.training
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    before = {k: v.clone() for k, v in model.backbone.state_dict().items()}
    batch, labels = _inputs(tok, "seq")
    labels["labels"] = labels["labels"] % 2
    for _ in range(2):
        opt.zero_grad()
        model(**batch, **labels).loss.backward()
        opt.step()
    backbone_ids = {id(p) for p in model.backbone.parameters()}
    assert not any(id(p) in backbone_ids for p in opt.state)
    assert all(p.grad is None for p in model.backbone.parameters())
    assert all(torch.equal(before[k], v) for k, v in model.backbone.state_dict().items())


@pytest.mark.parametrize("cls,task", [(PrefixModelForSequenceClassification, "seq"),
                                      (PrefixModelForQuestionAnswering, "qa"),
                                      (PrefixModelForMultipleChoice, "mc")])
def test_save_load_reproduces(tmp_path, base, tok, cls, task):
    kw = dict(num_labels=3) if task == "seq" else {}
    model = cls.from_pretrained(_backbone(base), prefix_len=3, projection=True, prefix_hidden=16, **kw).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.01 * torch.randn_like(p))
    model.save_pretrained(tmp_path)
    import json
    import os

    cfg = json.load(open(tmp_path / "ptv2_config.json"))
    assert cfg["backbone"] == minilm_path() and cfg["projection"] and cfg["prefix_len"] == 3
    from safetensors.torch import load_file

    saved = load_file(tmp_path / "model.safetensors")
    assert not any(k.startswith("backbone.") for k in saved)
    assert os.path.getsize(tmp_path / "model.safetensors") < 2_000_000
    back = load_pretrained(str(tmp_path)).eval()
    assert type(back) is cls
    batch, _ = _inputs(tok, task)
    with torch.no_grad():
        a, b = model(**batch).to_tuple(), back(**batch).to_tuple()
    assert len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b))


@pytest.mark.parametrize("cls,task", [(PrefixModelForSequenceClassification, "seq"),
                                      (PrefixModelForMultipleChoice, "mc")])
def test_mean_pooling_reads_the_real_tokens_and_survives_save_load(tmp_path, base, tok, cls, task):
    kw = dict(num_labels=3) if task == "seq" else {}
    model = cls.from_pretrained(_backbone(base), prefix_len=3, pooling="mean", **kw).eval()
    batch, _ = _inputs(tok, task)
    mask = batch["attention_mask"].reshape(-1, batch["attention_mask"].shape[-1])
    assert not mask.all()  # padded rows: the mean must leave their padding out
    with torch.no_grad():
        h = model._backbone_forward(batch["input_ids"].reshape(mask.shape), mask,
                                    batch["token_type_ids"].reshape(mask.shape), None).last_hidden_state
        want = torch.stack([h[i, mask[i].bool()].mean(0) for i in range(h.shape[0])])
        want = model.classifier(want).reshape(model(**batch).logits.shape)
        torch.testing.assert_close(model(**batch).logits, want, rtol=1e-5, atol=1e-6)
        model.save_pretrained(tmp_path)
        back = load_pretrained(str(tmp_path)).eval()
        assert back.pooling == "mean" and torch.equal(model(**batch).logits, back(**batch).logits)


def test_pooling_rejects_unknown_values_and_heads_that_read_every_token(base):
    with pytest.raises(ValueError, match="pooling must be one of"):
        PrefixModelForSequenceClassification.from_pretrained(_backbone(base), pooling="max")
    with pytest.raises(ValueError, match="reads every token, got pooling='mean'"):
        PrefixModelForTokenClassification.from_pretrained(_backbone(base), pooling="mean")


def test_finetune_baseline_has_no_prefix_and_trains_backbone(tmp_path, base, tok):
    model = PrefixModelForTokenClassification.from_pretrained(_backbone(base), num_labels=3, method="finetune")
    assert not hasattr(model, "prefix_encoder") and model.method.trains_backbone
    assert model.backbone.config._attn_implementation != "ptv2_prefix"
    assert all(p.requires_grad for p in model.backbone.parameters())
    batch, labels = _inputs(tok, "tok")
    model(**batch, **labels).loss.backward()
    assert model.backbone.embeddings.word_embeddings.weight.grad is not None
    model.eval().save_pretrained(tmp_path)
    back = load_pretrained(str(tmp_path)).eval()
    with torch.no_grad():
        assert torch.equal(model(**batch).logits, back(**batch).logits)


def test_built_backbone_with_head_and_decoder(tmp_path):
    # an already-built model (its head dropped), a decoder with GQA, a bank with per-row tasks
    llama = tiny_model("llama")
    model = PrefixModelForSequenceClassification.from_pretrained(llama, num_labels=2, prefix_len=3, num_tasks=2)
    ids = torch.randint(3, 100, (4, 6))
    mask = torch.ones(4, 6, dtype=torch.long)
    mask[0, :2] = 0
    out = model(ids, mask, labels=torch.tensor([0, 1, 1, 0]), prefix_index=torch.tensor([0, 1, 1, 0]))
    out.loss.backward()
    assert out.logits.shape == (4, 2) and model.prefix_encoder.embedding.weight.grad is not None
    with pytest.raises(ValueError, match="backbone"):
        model.save_pretrained(tmp_path)
        load_pretrained(str(tmp_path))
    back = load_pretrained(str(tmp_path), backbone=tiny_model("llama")).eval()
    model.eval()
    with torch.no_grad():
        idx = torch.tensor([1, 0, 0, 1])
        assert torch.equal(model(ids, mask, prefix_index=idx).logits, back(ids, mask, prefix_index=idx).logits)


def test_unsupported_backbone_names_supported():
    from transformers import AlbertConfig, AutoModel

    m = AutoModel.from_config(AlbertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                                           intermediate_size=32, embedding_size=16, vocab_size=50))
    with pytest.raises(ValueError, match="albert.*bert"):
        PrefixModelForSequenceClassification.from_pretrained(m, prefix_len=2)


@pytest.mark.parametrize("reentrant", [False, True])
def test_task_model_gradient_checkpointing(reentrant):
    model = PrefixModelForSequenceClassification.from_pretrained(tiny_model("bert"), num_labels=2, prefix_len=3,
                                                                 projection=True, prefix_hidden=8,
                                                                 prefix_dropout=0.0)
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    model.train()
    ids = torch.randint(3, 100, (2, 6))

    def grads():
        model.zero_grad(set_to_none=True)
        model(ids, labels=torch.tensor([0, 1])).loss.backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}

    plain = grads()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
    ckpt = grads()
    model.gradient_checkpointing_disable()
    for n in plain:
        torch.testing.assert_close(ckpt[n], plain[n], **TOL)
