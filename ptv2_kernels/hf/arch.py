"""What ptv2_kernels knows about each transformers architecture: one :class:`Arch` record per
``model_type``, read by the patch, the task models, ``from_peft``, the test helpers and the benchmarks.

Adding an architecture is adding a record here (and, when its attention does not call transformers'
attention interface, a forward in ``attention.py``). This module imports nothing from the package.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, Optional, Tuple

from torch import nn

__all__ = ["Arch", "ARCHS", "SUPPORTED_MODEL_TYPES", "UnsupportedModelError", "arch_of", "attention_modules",
           "base_model", "model_dims", "stack_sizes"]


class UnsupportedModelError(ValueError):
    pass


@dataclass(frozen=True)
class Arch:
    """One architecture.

    - ``attention``: class names of its attention modules (one per layer, in layer order).
    - ``stacks``: encoder-decoders only: where the attention modules lie, in the order the prefix
      encoder's layers follow, as ``(stack, attribute)`` pairs matched against each module's name in the
      base model (``"decoder.layers.0.encoder_attn"`` is in ``("decoder", "encoder_attn")``); Li and
      Liang's three prefixes: encoder self-attention, decoder self-attention, then cross-attention
      (whose prefix goes in front of the encoder's keys and values that the decoder reads). A pair that
      matches nothing (an encoder-only ``T5EncoderModel``) contributes no layers.
    - ``positions``: how ``position_offset="shifted"`` starts token positions at P:
      "embeddings" (absolute positions: ``position_ids`` on the embeddings module), "roberta" (the
      same, positions counted past the padding index from the input ids), "decoder" (``position_ids``
      on the base model; rotary models rotate tokens from P, the prefix is never rotated), "relative"
      (DeBERTa: tokens keep their positions in both modes and the prefix keys get no relative-position
      term, as in the authors' P-tuning v2 DeBERTa), "seq2seq" (encoder-decoders: tokens keep their
      positions, ``position_offset="shifted"`` is refused).
    - ``dropouts``: config attributes holding its dropout probabilities (tests zero them all).
    - ``head_dropout``: the config attribute of the hidden dropout the task heads reuse; None where the
      architecture has none (its task heads then use the authors' 0.1).
    - ``head``: the attribute of ``AutoModelForSequenceClassification``'s head ("classifier", "score").
    - ``head_pooler``: a trainable pooler (``module.Class`` under ``transformers.models``) that heads
      reading one vector per sequence put on the first token, as transformers' and the authors' heads
      do for an architecture whose base model has no pooler (DeBERTa's ``ContextPooler``).
    - ``takes_cache``: the base model accepts a KV cache (PEFT's ``past_key_values`` route runs on it).
    - ``prefix_space``: a byte-level BPE tokenizer that needs ``add_prefix_space=True`` for
      pre-split words (token classification).
    - ``module_forward``: for attention modules that do not call transformers' attention interface,
      the name of the forward in ``attention.MODULE_FORWARDS`` that replaces theirs while patched.
    - ``token_bias``: the attention keyword carrying a bias added to the token scores (T5's relative
      position bias); the token part is then materialized with it and the prefix keys get no bias.
    - ``tiny``: config keywords of a 2-layer model (hidden 32, 4 heads of 8, vocab 128) for tests
      (encoder-decoders: 2 encoder layers and 1 decoder layer).
    """

    model_type: str
    attention: Tuple[str, ...]
    positions: str
    dropouts: Tuple[str, ...]
    head_dropout: Optional[str]
    head: str
    takes_cache: bool = True
    prefix_space: bool = False
    module_forward: Optional[str] = None
    head_pooler: Optional[str] = None
    stacks: Tuple[Tuple[str, str], ...] = ()
    token_bias: Optional[str] = None
    tiny: Dict = field(default_factory=dict)

    @property
    def is_decoder(self) -> bool:
        return self.positions == "decoder"

    @property
    def is_encoder_decoder(self) -> bool:
        return bool(self.stacks)


_BERT_DROPOUTS = ("hidden_dropout_prob", "attention_probs_dropout_prob")
_BERT_TINY = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                  max_position_embeddings=80, type_vocab_size=2, vocab_size=128, pad_token_id=0)
_ROBERTA_TINY = dict(_BERT_TINY, pad_token_id=1)
_DECODER_TINY = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                     intermediate_size=64, max_position_embeddings=128, vocab_size=128, pad_token_id=0)


def _encoder(model_type, attention, positions="embeddings", tiny=_BERT_TINY, **kw):
    return Arch(model_type, attention, positions, _BERT_DROPOUTS, "hidden_dropout_prob", "classifier",
                tiny=tiny, **kw)


def _decoder(model_type, attention, tiny=_DECODER_TINY):
    return Arch(model_type, attention, "decoder", ("attention_dropout",), None, "score", tiny=tiny)


ARCHS: Dict[str, Arch] = {a.model_type: a for a in (
    _encoder("bert", ("BertSelfAttention",)),
    _encoder("electra", ("ElectraSelfAttention",), tiny=dict(_BERT_TINY, embedding_size=32)),
    _encoder("roberta", ("RobertaSelfAttention",), "roberta", _ROBERTA_TINY, prefix_space=True),
    _encoder("xlm-roberta", ("XLMRobertaSelfAttention",), "roberta", _ROBERTA_TINY, prefix_space=True),
    Arch("distilbert", ("DistilBertSelfAttention", "MultiHeadSelfAttention"), "embeddings",
         ("dropout", "attention_dropout", "seq_classif_dropout"), "dropout", "classifier", takes_cache=False,
         tiny=dict(dim=32, n_layers=2, n_heads=4, hidden_dim=64, max_position_embeddings=80, vocab_size=128,
                   pad_token_id=0)),
    _decoder("llama", ("LlamaAttention",)),
    _decoder("qwen2", ("Qwen2Attention",)),
    _decoder("qwen3", ("Qwen3Attention",), tiny=dict(_DECODER_TINY, head_dim=8)),  # head_dim is explicit
    _decoder("mistral", ("MistralAttention",)),
    # DeBERTa-v3 is model_type "deberta-v2" too (position buckets, shared attention keys, no conv layer)
    _encoder("deberta-v2", ("DisentangledSelfAttention",), "relative", takes_cache=False, module_forward="disentangled",
             head_pooler="deberta_v2.modeling_deberta_v2.ContextPooler",
             tiny=dict(_BERT_TINY, type_vocab_size=0, relative_attention=True, pos_att_type=["p2c", "c2p"],
                       position_biased_input=False, position_buckets=8, share_att_key=True,
                       norm_rel_ebd="layer_norm")),
    # encoder-decoders: prefix layers are the encoder's self-attention, the decoder's, then cross-attention;
    # their tiny configs init weights larger than the default so that random models generate varied tokens
    Arch("bart", ("BartAttention",), "seq2seq", ("dropout", "attention_dropout", "activation_dropout"), "dropout",
         "classification_head", prefix_space=True,
         stacks=(("encoder", "self_attn"), ("decoder", "self_attn"), ("decoder", "encoder_attn")),
         tiny=dict(d_model=32, encoder_layers=2, decoder_layers=1, encoder_attention_heads=4,
                   decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64, max_position_embeddings=80,
                   vocab_size=128, pad_token_id=1, bos_token_id=0, eos_token_id=2, decoder_start_token_id=2,
                   forced_eos_token_id=None, init_std=0.2)),
    Arch("t5", ("T5Attention",), "seq2seq", ("dropout_rate",), "dropout_rate", "classification_head",
         stacks=(("encoder", "SelfAttention"), ("decoder", "SelfAttention"), ("decoder", "EncDecAttention")),
         token_bias="position_bias",
         tiny=dict(d_model=32, d_kv=8, num_heads=4, num_layers=2, num_decoder_layers=1, d_ff=64, vocab_size=128,
                   relative_attention_num_buckets=8, relative_attention_max_distance=16, pad_token_id=0,
                   eos_token_id=1, decoder_start_token_id=0, initializer_factor=5.0)),
    Arch("gpt2", ("GPT2Attention",), "decoder", ("resid_pdrop", "embd_pdrop", "attn_pdrop"), "resid_pdrop",
         "score", prefix_space=True,
         tiny=dict(n_embd=32, n_layer=2, n_head=4, n_positions=80, vocab_size=128, pad_token_id=0,
                   bos_token_id=2, eos_token_id=2)),
)}
SUPPORTED_MODEL_TYPES = tuple(ARCHS)


def base_model(model: nn.Module) -> nn.Module:
    """The model without its head (``model.base_model``), or ``model`` itself."""
    base = getattr(model, "base_model", model)
    return base if isinstance(base, nn.Module) else model


def arch_of(model: nn.Module) -> Arch:
    """The record of ``model``'s ``config.model_type``; raises naming the supported types."""
    mt = getattr(getattr(model, "config", None), "model_type", None)
    if mt not in ARCHS:
        raise UnsupportedModelError(
            f"prefix attention does not support model type {mt!r} ({type(model).__name__}); supported: "
            f"{', '.join(SUPPORTED_MODEL_TYPES)}")
    return ARCHS[mt]


def attention_modules(model: nn.Module) -> list:
    """The attention modules of ``model``, in the order of the prefix encoder's layers (layer order;
    encoder-decoders: grouped as ``Arch.stacks`` says)."""
    arch = arch_of(model)
    named = [(n, m) for n, m in base_model(model).named_modules() if type(m).__name__ in arch.attention]
    if arch.stacks:
        named = [(n, m) for stack, attr in arch.stacks for n, m in named
                 if n.startswith(stack + ".") and n.endswith("." + attr)]
    if not named:
        raise UnsupportedModelError(f"found no attention modules ({', '.join(arch.attention)}) in {type(model).__name__}")
    return [m for _, m in named]


def stack_sizes(model: nn.Module) -> Optional[list]:
    """An encoder-decoder's attention modules per ``Arch.stacks`` entry, in the prefix encoder's layer
    order (encoder self-attention, decoder self-attention, cross-attention); None for other models."""
    arch = arch_of(model)
    if not arch.stacks:
        return None
    names = [n for n, m in base_model(model).named_modules() if type(m).__name__ in arch.attention]
    sizes = [sum(n.startswith(stack + ".") and n.endswith("." + attr) for n in names) for stack, attr in arch.stacks]
    return [n for n in sizes if n]


def model_dims(model: nn.Module) -> dict:
    """Layers, kv heads, head dim, heads and hidden size of a supported model (config names go through
    transformers' ``attribute_map``: ``hidden_size`` is GPT-2's ``n_embd``, DistilBERT's ``dim``)."""
    cfg = model.config
    heads = cfg.num_attention_heads
    decoder_heads = getattr(cfg, "decoder_attention_heads", heads)  # BART's may differ from its encoder's
    if decoder_heads != heads:
        raise UnsupportedModelError(f"one prefix encoder needs as many heads in the decoder as in the encoder; "
                                    f"{cfg.model_type} has {heads} and {decoder_heads}")
    return dict(num_layers=len(attention_modules(model)), stacks=stack_sizes(model),
                num_kv_heads=getattr(cfg, "num_key_value_heads", None) or heads,
                head_dim=getattr(cfg, "head_dim", None) or cfg.hidden_size // heads,
                hidden_size=cfg.hidden_size, num_heads=heads)
