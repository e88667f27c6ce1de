"""Prompt tuning (``prompt``), and what every input-only prompt method shares (``InputPromptMethod``,
P-Tuning v1's base too). The prompt (:class:`~ptv2_kernels.prompt.PromptEncoder`) is placed in front
of the input embeddings, the attention mask and token types grow by P in front, the backbone is
frozen; the heads read the token positions only, so token labels, QA offsets and pooling over real
tokens are those of the input as given. The backbone's own pooler (BERT's) still reads the first
position, which is now the prompt's, as in PEFT."""

from __future__ import annotations

from .base import Method

PROMPT_INITS = ("random", "vocab", "text")  # PEFT's PromptTuningInit: RANDOM, SAMPLE_VOCAB, TEXT


class InputPromptMethod(Method):
    trains_backbone = False
    input_positions = True
    encoder_attr = "prompt_encoder"

    def _encoder(self, model, dims):
        raise NotImplementedError

    def attach(self, model, dims):
        model.prompt_encoder = self._encoder(model, dims).to(next(model.backbone.parameters()).device)
        model.backbone.requires_grad_(False)

    def backbone_kwargs(self, model, kw, prefix_index):
        import torch

        ids = kw.pop("input_ids")
        embed = model.backbone.get_input_embeddings()
        tokens = embed(ids)
        B = tokens.shape[0]
        prompt = model.prompt_encoder.rows(B, prefix_index).to(tokens.dtype)
        P = prompt.shape[1]
        kw["inputs_embeds"] = torch.cat([prompt, tokens], dim=1)
        mask = kw.get("attention_mask")
        if mask is not None:
            kw["attention_mask"] = torch.cat([mask.new_ones(B, P), mask], dim=1)
        if kw.get("token_type_ids") is not None:
            types = kw["token_type_ids"]
            kw["token_type_ids"] = torch.cat([types.new_zeros(B, P), types], dim=1)
        return kw

    def backbone_output(self, model, out):
        out.last_hidden_state = out.last_hidden_state[:, model.prompt_encoder.prompt_len:]
        return out

    def state_from_peft(self, peft_model, adapter_name):
        sd = peft_model.prompt_encoder[adapter_name].state_dict()
        return {"prompt_encoder." + k: v for k, v in sd.items()}


class PromptMethod(InputPromptMethod):
    name = "prompt"
    summary = "prompt tuning: P trained input embeddings in front of the input (Lester et al.)"
    # Lester et al. use 0.3 with Adafactor on T5; with AdamW on MiniLM, bench/paper_study.py's sweep
    # (SST-2, 1,000 sentences, 2 epochs): 3e-2 77.3, 1e-2 76.6, 1e-1 76.3
    default_lr = 3e-2
    options = frozenset({"prefix_len", "prompt_init", "prompt_init_text"})
    bank = True
    peft_type = "PROMPT_TUNING"

    def _encoder(self, model, dims):
        from ..prompt import PromptEncoder

        o = model.options
        enc = PromptEncoder(o["prefix_len"], dims["hidden_size"], num_tasks=o.get("num_tasks"))
        init = o.get("prompt_init") or "random"
        if init == "vocab":
            enc.init_from_vocab_(model.backbone.get_input_embeddings())
        elif init == "text":
            enc.init_from_token_ids_(model.backbone.get_input_embeddings(), _token_ids(model, o["prompt_init_text"]))
        return enc

    def options_from_peft(self, peft_config):
        return dict(prefix_len=peft_config.num_virtual_tokens)


def _token_ids(model, text):
    """``text`` tokenized as PEFT's TEXT init does (special tokens included), by the backbone's tokenizer."""
    from transformers import AutoTokenizer

    if not text:
        raise ValueError("prompt_init='text' needs prompt_init_text, got none")
    return AutoTokenizer.from_pretrained(model.backbone.name_or_path)(text)["input_ids"]
