"""P-Tuning v1: input-only prompts produced by a prompt encoder (PEFT's ``PromptEncoder``: a 2-layer
bidirectional LSTM and an MLP, or a 3-layer MLP), placed in front of the input as prompt tuning's."""

from __future__ import annotations

from .prompt import InputPromptMethod

REPARAMETERIZATIONS = ("lstm", "mlp")  # the prompt encoders of P-Tuning v1 (PEFT's PromptEncoder)


class PTuningMethod(InputPromptMethod):
    name = "ptuning"
    summary = "P-Tuning v1: input prompts produced by a prompt encoder (bidirectional LSTM + MLP, or MLP)"
    # bench/paper_study.py's sweep (SST-2, 1,000 sentences, 2 epochs): 3e-3 73.5, 1e-3 67.4, 1e-4 52.9
    default_lr = 3e-3
    options = frozenset({"prefix_len", "reparameterization", "prefix_hidden"})
    peft_type = "P_TUNING"

    def _encoder(self, model, dims):
        from ..prompt import PromptEncoder

        o = model.options
        return PromptEncoder(o["prefix_len"], dims["hidden_size"], encoder_hidden=o.get("prefix_hidden"),
                             reparameterization=o.get("reparameterization") or "lstm")

    def options_from_peft(self, peft_config):
        if peft_config.encoder_num_layers != 2:
            raise ValueError(f"P-Tuning adapters with encoder_num_layers=2 convert (the LSTM PEFT builds by "
                             f"default), got {peft_config.encoder_num_layers}")
        if peft_config.encoder_dropout:
            raise ValueError(f"P-Tuning adapters with encoder_dropout=0 convert, got {peft_config.encoder_dropout}")
        kind = peft_config.encoder_reparameterization_type
        kind = getattr(kind, "value", kind)  # an enum, or its string
        return dict(prefix_len=peft_config.num_virtual_tokens, reparameterization=str(kind).lower(),
                    prefix_hidden=peft_config.encoder_hidden_size)
