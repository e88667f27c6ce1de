"""Interop: speed up a PEFT prefix-tuning model in place; import the authors' checkpoints.

``from_peft(peft_model)`` keeps PEFT's parameters (names, shapes, the module tree) and replaces only
how the prefix reaches attention: PEFT's forward builds ``past_key_values`` (B copies of the prefix, a
``[prefix; tokens]`` concatenation per layer, a widened mask); the patched model runs the fused op on
the prefix computed once. Positions are "shifted" as PEFT shifts them, so outputs and gradients are
the ones PEFT computes, and ``peft_model.save_pretrained`` writes the same adapter.
"""

from __future__ import annotations

import types
from typing import Optional

import torch

from .arch import model_dims
from .patch import patch_attention, remove_prefix_attention

__all__ = ["from_peft", "undo_from_peft", "load_authors_checkpoint"]


class _PeftPrefixView:
    """The PrefixEncoder interface over a PEFT ``PrefixEncoder`` module (owns no parameters)."""

    is_bank = False
    num_tasks = None
    dropout_p = 0.0

    def __init__(self, peft_model, adapter_name, num_layers, num_kv_heads, head_dim):
        self.peft_model = peft_model
        self.adapter_name = adapter_name
        cfg = peft_model.peft_config[adapter_name]
        self.config = cfg
        self.prefix_len = cfg.num_virtual_tokens
        self.num_layers, self.num_kv_heads, self.head_dim = num_layers, num_kv_heads, head_dim
        heads = cfg.num_attention_heads
        d = cfg.token_dim // heads
        if (cfg.num_layers, heads, d) != (num_layers, num_kv_heads, head_dim):
            raise ValueError(f"PEFT prefix (layers, heads, head dim) {(cfg.num_layers, heads, d)} does not match "
                             f"the model {(num_layers, num_kv_heads, head_dim)}")
        if getattr(cfg, "num_transformer_submodules", 1) not in (1, None):
            raise NotImplementedError("from_peft supports single-stack (encoder or decoder) models")

    @property
    def prefix_dropout_p(self):
        return 0.0  # PEFT applies no dropout to the prefix

    def __call__(self):
        pm, name = self.peft_model, self.adapter_name
        enc = pm.prompt_encoder[name]
        tokens = pm.prompt_tokens[name][: self.prefix_len].unsqueeze(0).to(enc.embedding.weight.device)
        if self.config.inference_mode:
            flat = enc.embedding.weight.unsqueeze(0)
        else:
            flat = enc(tokens)  # (1, P, 2L * H * D): once, not per row
        if getattr(pm, "base_model_torch_dtype", None) is not None:
            flat = flat.to(pm.base_model_torch_dtype)
        x = flat.view(self.prefix_len, 2 * self.num_layers, self.num_kv_heads, self.head_dim)
        x = x.permute(1, 2, 0, 3).contiguous()  # (2L, H, P, D), the key of layer l at 2l as in PEFT
        return [(x[2 * i], x[2 * i + 1]) for i in range(self.num_layers)]


def from_peft(peft_model, backend: Optional[str] = None, *, adapter_name: Optional[str] = None):
    """Run an existing PEFT prefix-tuning model (``PeftModel`` with ``PrefixTuningConfig``) on the
    fused op, in place. Returns ``peft_model``; ``undo_from_peft`` restores PEFT's own path."""
    from peft import PeftType

    name = adapter_name or peft_model.active_adapter
    cfg = peft_model.peft_config[name]
    if cfg.peft_type != PeftType.PREFIX_TUNING:
        raise ValueError(f"from_peft speeds up a prefix-tuning PEFT model in place, got {cfg.peft_type}; "
                         "PrefixModelFor<Task>.from_peft converts prompt-tuning and P-tuning models")
    if getattr(peft_model, "_ptv2_peft", None) is not None:
        raise RuntimeError("from_peft was already applied to this model")
    base = peft_model.get_base_model()
    dims = model_dims(base)
    view = _PeftPrefixView(peft_model, name, dims["num_layers"], dims["num_kv_heads"], dims["head_dim"])
    patch_attention(base, view, backend=backend, position_offset="shifted")  # PEFT owns the parameters

    def forward(self, input_ids=None, attention_mask=None, inputs_embeds=None, labels=None, **kwargs):
        kwargs.pop("task_ids", None)
        kw = dict(input_ids=input_ids, attention_mask=attention_mask, inputs_embeds=inputs_embeds, **kwargs)
        if labels is not None:
            kw["labels"] = labels
        kw = {k: v for k, v in kw.items() if v is not None or k == "attention_mask"}
        return base(**kw)

    def generate(self, *args, **kwargs):
        # PEFT's generate would put the prefix into the KV cache as well; the patched base adds it
        kwargs.pop("task_ids", None)
        return base.generate(*args, **kwargs)

    peft_model.forward = types.MethodType(forward, peft_model)
    if hasattr(base, "generate"):
        peft_model.generate = types.MethodType(generate, peft_model)
    peft_model._ptv2_peft = base
    return peft_model


def undo_from_peft(peft_model):
    base = getattr(peft_model, "_ptv2_peft", None)
    if base is None:
        raise RuntimeError("from_peft was not applied to this model")
    remove_prefix_attention(base)
    del peft_model.forward
    peft_model.__dict__.pop("generate", None)
    del peft_model._ptv2_peft
    return peft_model


def _read_state_dict(source):
    if isinstance(source, dict):
        return source
    path = str(source)
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        return load_file(path)
    return torch.load(path, map_location="cpu", weights_only=True)  # tensors only, no code


def load_authors_checkpoint(model_class, source, backbone, *, load_backbone_weights: bool = True, **options):
    """A task model from a THUDM/P-tuning-v2 checkpoint (their ``*PrefixFor*`` models' state dict, a
    path to it, ``.bin`` read with ``weights_only`` or ``.safetensors``).

    Their names map unchanged: ``prefix_encoder.embedding.weight``, ``prefix_encoder.trans.{0,2}.*``
    (the MLP), ``pooler.*`` (DeBERTa's), ``classifier.*`` / ``qa_outputs.*`` (the head),
    ``<bert|roberta|deberta>.*`` (the backbone, frozen; loaded too unless ``load_backbone_weights=False``).
    Positions are "shifted" and prefix dropout is 0.1 as in their code. ``options`` go to
    ``model_class.from_pretrained`` (``prefix_dropout``, ...).
    """
    sd = _read_state_dict(source)
    emb = sd["prefix_encoder.embedding.weight"]
    projection = "prefix_encoder.trans.0.weight" in sd
    opts = dict(prefix_len=emb.shape[0], projection=projection, position_offset="shifted", prefix_dropout=0.1)
    if projection:
        opts["prefix_hidden"] = sd["prefix_encoder.trans.0.weight"].shape[0]
    head = "qa_outputs.weight" if "qa_outputs.weight" in sd else "classifier.weight"
    if head in sd and model_class.__name__ != "PrefixModelForMultipleChoice":
        opts["num_labels"] = sd[head].shape[0]
    opts.update(options)
    model = model_class.from_pretrained(backbone, **opts)
    own = {k: v for k, v in sd.items() if k.startswith(("prefix_encoder.", "pooler.", "classifier.", "qa_outputs."))}
    missing, unexpected = model.load_state_dict(own, strict=False)
    missing = [k for k in missing if not k.startswith("backbone.")]
    if missing or unexpected:
        raise KeyError(f"authors' checkpoint mismatch: missing {missing}, unexpected {unexpected}")
    if load_backbone_weights:
        prefix = model.backbone.base_model_prefix + "."
        bb = {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}
        if bb:
            model.backbone.load_state_dict(bb, strict=False)
    return model
