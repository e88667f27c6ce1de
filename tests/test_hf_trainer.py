"""Where Hugging Face users train: transformers' Trainer (task model, drop-in, from_peft), accelerate,
and a Trainer save/load round trip, on the real MiniLM (few steps, batches of 2, 16 tokens)."""

import copy

import pytest
import torch

from ptv2_kernels import PrefixEncoder, apply_prefix_attention, from_peft, load_prefix_attention
from ptv2_kernels.hf.models import PrefixModelForSequenceClassification
from ptv2_kernels.hf.testing import minilm_path

STEPS = 5
TEXTS = ["a wonderful, moving film", "dull and far too long", "i loved every minute", "the plot makes no sense",
         "brilliant acting throughout", "a waste of time", "charming and funny", "painfully boring"]


@pytest.fixture(scope="module")
def data():
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(minilm_path())
    enc = tok(TEXTS, padding="max_length", truncation=True, max_length=16)
    return [{"input_ids": enc["input_ids"][i], "attention_mask": enc["attention_mask"][i],
             "token_type_ids": enc["token_type_ids"][i], "labels": i % 2} for i in range(len(TEXTS))]


@pytest.fixture(scope="module")
def classifier():
    from transformers import AutoModelForSequenceClassification

    torch.manual_seed(0)
    return AutoModelForSequenceClassification.from_pretrained(minilm_path(), num_labels=2)


def _trainer(model, data, out_dir, **kw):
    from transformers import Trainer, TrainingArguments

    args = TrainingArguments(output_dir=str(out_dir), max_steps=STEPS, per_device_train_batch_size=2,
                             per_device_eval_batch_size=4, learning_rate=1e-2, use_cpu=True, report_to="none",
                             save_strategy="no", logging_strategy="no", disable_tqdm=True, seed=0, **kw)
    return Trainer(model=model, args=args, train_dataset=data, eval_dataset=data[:4])


def _snapshot(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def _changed(before, model, is_prefix):
    """(prefix parameters that changed, of all; other frozen parameters that changed)."""
    after = dict(model.named_parameters())
    prefix = [n for n in before if is_prefix(n)]
    frozen = [n for n in before if not is_prefix(n) and not after[n].requires_grad]
    moved = lambda names: [n for n in names if not torch.equal(before[n], after[n].detach())]  # noqa: E731
    assert prefix and frozen
    return moved(prefix), prefix, moved(frozen)


def _train_and_check(model, data, tmp_path, is_prefix):
    before = _snapshot(model)
    trainer = _trainer(model, data, tmp_path)
    trainer.train()
    moved, prefix, frozen_moved = _changed(before, model, is_prefix)
    assert moved == prefix, "every prefix parameter trains"
    assert frozen_moved == [], "the backbone stays frozen"
    pred = trainer.predict(data[:4])  # outputs read by index, as Trainer does
    assert pred.predictions.shape == (4, 2)
    return trainer


def test_trainer_task_model(data, tmp_path, classifier):
    model = PrefixModelForSequenceClassification.from_pretrained(copy.deepcopy(classifier), num_labels=2,
                                                                 prefix_len=4, prefix_dropout=0.1)
    out = model(**{k: torch.tensor([v]) for k, v in data[0].items()})
    assert out[0] is out.loss and out["logits"] is out.logits and out.to_tuple()[1] is out.logits
    _train_and_check(model, data, tmp_path, lambda n: n.startswith("prefix_encoder."))


@pytest.mark.parametrize("method,trained", [("prompt", "prompt_encoder."), ("ptuning", "prompt_encoder."),
                                            ("lora", "lora_")])
def test_trainer_trains_every_methods_task_model(data, tmp_path, classifier, method, trained):
    model = PrefixModelForSequenceClassification.from_pretrained(copy.deepcopy(classifier), num_labels=2,
                                                                 method=method, prefix_len=4)
    _train_and_check(model, data, tmp_path, lambda n: trained in n)


def test_trainer_drop_in_on_auto_model(data, tmp_path, classifier):
    model = copy.deepcopy(classifier)
    apply_prefix_attention(model, PrefixEncoder.for_model(model, 4, projection=True, prefix_hidden=32))
    assert any(p is model.prefix_encoder.embedding.weight for p in model.parameters())
    _train_and_check(model, data, tmp_path, lambda n: n.startswith("prefix_encoder."))
    assert model.classifier.weight.requires_grad  # the head is the user's: left trainable


def test_trainer_from_peft(data, tmp_path, classifier):
    from peft import PrefixTuningConfig, get_peft_model

    pm = get_peft_model(copy.deepcopy(classifier), PrefixTuningConfig(task_type="SEQ_CLS", num_virtual_tokens=4))
    from_peft(pm)
    _train_and_check(pm, data, tmp_path, lambda n: n.startswith("prompt_encoder."))


def test_trainer_save_load_round_trip(data, tmp_path, classifier):
    from transformers import AutoModelForSequenceClassification

    model = copy.deepcopy(classifier)
    apply_prefix_attention(model, PrefixEncoder.for_model(model, 4), position_offset="shifted")
    trainer = _trainer(model, data, tmp_path / "run")
    trainer.train()
    trainer.save_model(str(tmp_path / "saved"))
    back = load_prefix_attention(AutoModelForSequenceClassification.from_pretrained(str(tmp_path / "saved")))
    assert back.prefix_encoder.config_dict() == model.prefix_encoder.config_dict()
    assert back._ptv2_patch.position_offset == "shifted"
    batch = {k: torch.tensor([row[k] for row in data[:3]]) for k in ("input_ids", "attention_mask")}
    model.eval(), back.eval()
    with torch.no_grad():
        torch.testing.assert_close(back(**batch).logits, model(**batch).logits, rtol=0, atol=0)


def test_accelerate_prepare_trains_the_prefix(data, classifier):
    from accelerate import Accelerator
    from transformers import default_data_collator

    model = copy.deepcopy(classifier)
    apply_prefix_attention(model, PrefixEncoder.for_model(model, 4))
    acc = Accelerator(cpu=True)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    loader = torch.utils.data.DataLoader(data, batch_size=2, collate_fn=default_data_collator)
    before = _snapshot(model)
    prepared, opt, loader = acc.prepare(model, opt, loader)
    prepared.train()
    for batch in loader:
        opt.zero_grad()
        acc.backward(prepared(**batch).loss)
        opt.step()
    moved, prefix, frozen_moved = _changed(before, acc.unwrap_model(prepared),
                                           lambda n: n.startswith("prefix_encoder."))
    assert moved == prefix and frozen_moved == []
