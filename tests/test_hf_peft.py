"""from_peft: a PEFT prefix-tuning model sped up in place; the authors' checkpoint import."""

import copy

import pytest
import torch

from ptv2_kernels.hf.peft import from_peft, load_authors_checkpoint, undo_from_peft
from ptv2_kernels.hf.testing import minilm_path, tiny_model

TOL = dict(rtol=1e-4, atol=2e-5)


@pytest.fixture(scope="module")
def tok():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(minilm_path())


@pytest.fixture(scope="module")
def base():
    from transformers import AutoModel

    return AutoModel.from_pretrained(minilm_path())


def _seq_cls(base, num_labels=3):
    from transformers import AutoModelForSequenceClassification

    cfg = copy.deepcopy(base.config)
    cfg.num_labels = num_labels
    torch.manual_seed(0)
    m = AutoModelForSequenceClassification.from_config(cfg)
    m.bert.load_state_dict(base.state_dict(), strict=False)
    return m.eval()


def _peft_forward(pm, batch, labels):
    """PEFT's own computation. Its forward's signature check fails on transformers 5.24 (the
    ``past_key_values`` argument became ``cache``), so call the base model exactly as it would."""
    P = pm.active_peft_config.num_virtual_tokens
    B = batch["input_ids"].shape[0]
    mask = torch.cat([torch.ones(B, P, dtype=batch["attention_mask"].dtype), batch["attention_mask"]], 1)
    return pm.base_model(**{**batch, "attention_mask": mask}, past_key_values=pm.get_prompt(B), labels=labels)


def _grads(pm):
    return {n: p.grad.clone() for n, p in pm.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("projection", [False, True])
def test_from_peft_same_outputs_gradients_and_adapter(tmp_path, base, tok, projection):
    from peft import PeftModel, PrefixTuningConfig, get_peft_model

    cfg = PrefixTuningConfig(task_type="SEQ_CLS", num_virtual_tokens=5, prefix_projection=projection,
                             encoder_hidden_size=32)
    pm = get_peft_model(_seq_cls(base), cfg).eval()
    batch = dict(tok(["hello world", "a longer sentence with padding here", "x"], padding=True,
                     return_tensors="pt"))
    labels = torch.tensor([0, 2, 1])
    names = {n: tuple(p.shape) for n, p in pm.named_parameters()}
    trainable = sorted(n for n, p in pm.named_parameters() if p.requires_grad)

    ref = _peft_forward(pm, batch, labels)
    ref.loss.backward()
    ref_grads = _grads(pm)
    pm.zero_grad(set_to_none=True)

    from_peft(pm)
    assert {n: tuple(p.shape) for n, p in pm.named_parameters()} == names
    assert sorted(n for n, p in pm.named_parameters() if p.requires_grad) == trainable
    out = pm(**batch, labels=labels)
    out.loss.backward()
    torch.testing.assert_close(out.logits, ref.logits, **TOL)
    grads = _grads(pm)
    assert set(grads) == set(ref_grads)
    errs = [(grads[n] - ref_grads[n]).abs().max().item() for n in grads]
    for n in grads:
        torch.testing.assert_close(grads[n], ref_grads[n], **TOL)
    print(f"from_peft projection={projection}: logits max err {(out.logits - ref.logits).abs().max().item():.2e}, "
          f"grads max err {max(errs):.2e}")

    # the adapter PEFT writes still loads with PEFT, and gives the same outputs
    pm.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(_seq_cls(base), tmp_path).eval()
    loaded.base_model.classifier.load_state_dict(pm.base_model.classifier.state_dict())
    with torch.no_grad():
        again = _peft_forward(loaded, batch, labels)
        torch.testing.assert_close(again.logits, out.logits, **TOL)
        from_peft(loaded)
        torch.testing.assert_close(loaded(**batch).logits, out.logits, **TOL)

    undo_from_peft(pm)
    assert "forward" not in pm.__dict__
    assert pm.get_base_model().config._attn_implementation == "sdpa"


def test_from_peft_causal_lm_decoder():
    from peft import PrefixTuningConfig, get_peft_model
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    lm = LlamaForCausalLM(tiny_model("llama").config).eval()
    pm = get_peft_model(lm, PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3)).eval()
    ids = torch.randint(3, 100, (2, 7))
    mask = torch.ones(2, 7, dtype=torch.long)
    mask[1, :2] = 0  # left padding
    ref = pm(input_ids=ids, attention_mask=mask, labels=ids)  # PEFT's own forward works for causal LMs
    ref.loss.backward()
    ref_grads = _grads(pm)
    pm.zero_grad(set_to_none=True)
    from_peft(pm)
    out = pm(input_ids=ids, attention_mask=mask, labels=ids)
    out.loss.backward()
    real = mask.bool()
    torch.testing.assert_close(out.logits[real], ref.logits[real], **TOL)
    for n, g in _grads(pm).items():
        torch.testing.assert_close(g, ref_grads[n], **TOL)


def test_from_peft_generate_matches_peft_forward():
    """After from_peft, generate() with a KV cache gives at every step the logits of PEFT's own forward
    (prefix in the cache, shifted positions) over the sequence so far. PEFT 0.21.2's own generate
    disagrees with its own forward on transformers 5.24 (logits differ by up to 0.16 at the first step
    of this model), so its forward, the formulation an adapter is trained with, is the reference."""
    from peft import PrefixTuningConfig, get_peft_model
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    lm = LlamaForCausalLM(tiny_model("llama").config).eval()
    pm = get_peft_model(lm, PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3)).eval()
    with torch.no_grad():
        for p in pm.prompt_encoder.parameters():
            p.normal_(0, 0.5)
    ids = torch.randint(3, 100, (2, 6))
    mask = torch.ones(2, 6, dtype=torch.long)  # no padding: PEFT's forward ignores position_ids
    steps = 4
    from_peft(pm)
    with torch.no_grad():
        gen = pm.generate(input_ids=ids, attention_mask=mask, max_new_tokens=steps, do_sample=False,
                          output_logits=True, return_dict_in_generate=True, pad_token_id=0)
    undo_from_peft(pm)
    assert "generate" not in pm.__dict__
    seq = gen.sequences
    full_mask = torch.cat([mask, torch.ones(2, steps, dtype=mask.dtype)], 1)
    with torch.no_grad():
        for t in range(steps):
            ref = pm(input_ids=seq[:, :6 + t], attention_mask=full_mask[:, :6 + t]).logits[:, -1]
            torch.testing.assert_close(gen.logits[t], ref, **TOL)


def test_authors_checkpoint_import(tmp_path, base, tok):
    from ptv2_kernels.hf.models import PrefixModelForSequenceClassification

    model = PrefixModelForSequenceClassification.from_pretrained(
        copy.deepcopy(base), num_labels=2, prefix_len=4, projection=True, prefix_hidden=16,
        position_offset="shifted").eval()
    # the authors' BertPrefixForSequenceClassification state dict: bert.*, classifier.*, prefix_encoder.*
    sd = {"bert." + k: v for k, v in model.backbone.state_dict().items()}
    sd.update({k: v for k, v in model.state_dict().items() if k.startswith(("classifier.", "prefix_encoder."))})
    assert "prefix_encoder.trans.0.weight" in sd and "prefix_encoder.embedding.weight" in sd
    torch.save(sd, tmp_path / "pytorch_model.bin")
    back = load_authors_checkpoint(PrefixModelForSequenceClassification, str(tmp_path / "pytorch_model.bin"),
                                   copy.deepcopy(base)).eval()
    assert back.options["position_offset"] == "shifted" and back.options["projection"]
    batch = dict(tok(["hello world", "a longer sentence with padding"], padding=True, return_tensors="pt"))
    with torch.no_grad():
        torch.testing.assert_close(back(**batch).logits, model(**batch).logits, rtol=0, atol=0)
