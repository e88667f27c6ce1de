"""Encoder-decoders (BART, T5) with Li and Liang's three prefixes, against their formulation written out
below; generation with a KV cache; mixed-task generation from a prefix bank on decoders and
encoder-decoders.

Li and Liang's Prefix-Tuning puts a prefix in front of the keys and values of every encoder
self-attention, decoder self-attention and cross-attention (there, in front of the encoder's keys and
values that the decoder reads), as per-row copies in ``past_key_values``: the prefix is always visible,
gets no position bias (T5's relative bias covers the tokens only) and shifts no token position."""

import pytest
import torch

from ptv2_kernels import PrefixEncoder, apply_prefix_attention, remove_prefix_attention
from ptv2_kernels.hf import ARCHS, UnsupportedModelError
from ptv2_kernels.hf.testing import tiny_config

TOL = dict(rtol=1e-7, atol=1e-9)  # float64
STEPS = 4
REFERENCE = "ptv2_test_li_liang"
_PREFIX = {}  # attention module -> its (K, V) prefix (H, P, D), read by the reference below


def _li_liang_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, position_bias=None,
                        **kwargs):
    """Transformers' eager attention with the module's prefix copied per row in front of its keys and
    values, its columns always visible and without position bias."""
    pk, pv = _PREFIX[module]
    B, P = query.shape[0], pk.shape[-2]
    keys = torch.cat([pk.expand(B, -1, -1, -1), key], 2)
    values = torch.cat([pv.expand(B, -1, -1, -1), value], 2)
    token_terms = torch.zeros(B, query.shape[1], query.shape[2], key.shape[2], dtype=query.dtype)
    for term in (position_bias, attention_mask):
        if term is not None:
            token_terms = token_terms + term
    scores = query @ keys.transpose(-1, -2) * scaling + torch.nn.functional.pad(token_terms, (P, 0))
    return (scores.softmax(-1) @ values).transpose(1, 2), None


def _register_reference():
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, eager_mask

    AttentionInterface.register(REFERENCE, _li_liang_attention)
    AttentionMaskInterface.register(REFERENCE, eager_mask)


def _set_attention(model, name):
    for m in model.modules():
        cfg = getattr(m, "config", None)
        if cfg is not None and hasattr(cfg, "_attn_implementation"):
            cfg._attn_implementation = name


def _model(model_type, seed=0, dtype=torch.float64, **overrides):
    from transformers import AutoModelForSeq2SeqLM

    torch.manual_seed(seed)
    no_dropout = {name: 0.0 for name in ARCHS[model_type].dropouts}
    cfg = tiny_config(model_type, **{**no_dropout, **overrides})
    return AutoModelForSeq2SeqLM.from_config(cfg, attn_implementation="eager").to(dtype).eval()


def _li_liang_groups(model):
    """The prefix layers as the docstring of ``Arch.stacks`` says: encoder self-attention, decoder
    self-attention, cross-attention."""
    if model.config.model_type == "bart":
        enc, dec = model.model.encoder.layers, model.model.decoder.layers
        return [l.self_attn for l in enc], [l.self_attn for l in dec], [l.encoder_attn for l in dec]
    enc, dec = model.encoder.block, model.decoder.block
    return ([b.layer[0].SelfAttention for b in enc], [b.layer[0].SelfAttention for b in dec],
            [b.layer[1].EncDecAttention for b in dec])


def _batch(B=3, N=7, M=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids, dec = torch.randint(3, 100, (B, N), generator=g), torch.randint(3, 100, (B, M), generator=g)
    mask, dec_mask = torch.ones(B, N, dtype=torch.long), torch.ones(B, M, dtype=torch.long)
    mask[1, N - 3:] = 0  # source padding: masks cross-attention keys as well as encoder keys
    dec_mask[2, M - 2:] = 0  # target padding (right, as in teacher forcing)
    return dict(input_ids=ids, attention_mask=mask, decoder_input_ids=dec, decoder_attention_mask=dec_mask)


def _run(model, enc, batch, grad=True):
    """Logits at the real target positions and the prefix encoder's gradients of a random loss."""
    enc.zero_grad(set_to_none=True)
    with torch.set_grad_enabled(grad):
        logits = model(**batch).logits
    real = batch["decoder_attention_mask"].bool()
    if not grad:
        return logits[real], {}
    w = torch.randn(logits.shape[-1], generator=torch.Generator().manual_seed(1), dtype=logits.dtype)
    ((logits * w).sum(-1) * real).sum().backward()
    return logits.detach()[real], {n: p.grad.clone() for n, p in enc.named_parameters()}


@pytest.mark.parametrize("model_type,target_len,prefix", [
    ("bart", 5, "all"), ("bart", 9, "all"), ("bart", 7, "projection"), ("bart", 5, "encoder"),
    ("t5", 5, "all"), ("t5", 9, "projection"), ("t5", 7, "all"), ("t5", 5, "decoder")])
def test_encoder_decoder_matches_li_and_liang(model_type, target_len, prefix):
    """Forward (with and without autograd: the trained and the generating paths) and the prefix
    gradients, in float64, against the formulation above; targets shorter than, as long as and longer
    than the 7 source tokens; the prefix on every layer, through the MLP, or on the encoder's or the
    decoder's layers only (the others get none, as ``PrefixEncoder(layers=...)`` defines)."""
    _register_reference()
    model = _model(model_type)
    groups = _li_liang_groups(model)
    order = [m for group in groups for m in group]
    n_enc = len(groups[0])
    layers = {"encoder": range(n_enc), "decoder": range(n_enc, len(order))}.get(prefix)
    torch.manual_seed(2)
    enc = PrefixEncoder.for_model(model, 3, projection=prefix == "projection", prefix_hidden=16, init_std=0.5,
                                  layers=layers).double()
    assert enc.num_layers == len(order)
    batch = _batch(M=target_len)
    _PREFIX.clear()
    _PREFIX.update(zip(order, enc()))
    _set_attention(model, REFERENCE)
    try:
        ref = _run(model, enc, batch)
    finally:
        _set_attention(model, "eager")
    apply_prefix_attention(model, enc)
    try:
        ours, ours_eval = _run(model, enc, batch), _run(model, enc, batch, grad=False)
    finally:
        remove_prefix_attention(model)
    torch.testing.assert_close(ours[0], ref[0], **TOL)
    torch.testing.assert_close(ours_eval[0], ref[0], **TOL)
    for name in ref[1]:
        torch.testing.assert_close(ours[1][name], ref[1][name], **TOL)
    errs = [(ours[0] - ref[0]).abs().max().item()] + [(ours[1][n] - ref[1][n]).abs().max().item() for n in ref[1]]
    print(f"{model_type} target {target_len} prefix {prefix}: max err {max(errs):.2e}")


def _generate(model, batch, **kw):
    with torch.no_grad():
        return model.generate(**batch, max_new_tokens=STEPS, do_sample=False, output_logits=True,
                              return_dict_in_generate=True, **kw)


@pytest.mark.parametrize("model_type", ["bart", "t5"])
def test_cached_generation_matches_uncached_and_keeps_prefix_out_of_the_cache(model_type):
    model = _model(model_type, dtype=torch.float32)
    enc = PrefixEncoder.for_model(model, 3)
    batch = {k: v for k, v in _batch().items() if not k.startswith("decoder")}
    apply_prefix_attention(model, enc)
    try:
        cached, plain = _generate(model, batch), _generate(model, batch, use_cache=False)
    finally:
        remove_prefix_attention(model)
    assert torch.equal(cached.sequences, plain.sequences)
    for a, b in zip(cached.logits, plain.logits):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=2e-5)
    cache = cached.cache  # keys of the tokens alone: self-attention over the target, cross over the source
    assert cache.self_attention_cache.get_seq_length() == cached.sequences.shape[1] - 1
    assert cache.cross_attention_cache.get_seq_length() == batch["input_ids"].shape[1]


def _decoder(model_type):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(tiny_config(model_type), attn_implementation="sdpa").eval()


def _single_and_bank(model, tasks=3):
    torch.manual_seed(4)
    singles = [PrefixEncoder.for_model(model, 3, init_std=2.0) for _ in range(tasks)]
    return singles, PrefixEncoder.stack(singles)


def _each_row_alone(model, singles, batch, index, **kw):
    """What each row's task model generates for that row alone."""
    rows = []
    for row, task in enumerate(index.tolist()):
        apply_prefix_attention(model, singles[task])
        try:
            rows.append(_generate(model, {k: v[row:row + 1] for k, v in batch.items()}, **kw).sequences)
        finally:
            remove_prefix_attention(model)
    return rows


@pytest.mark.parametrize("model_type", ["llama", "gpt2", "bart", "t5"])
def test_mixed_task_generation_equals_each_task_model(model_type):
    """One generate() call over rows of different tasks (a bank and prefix_index) gives each row what its
    own task's model gives it, greedy and with beam search (prefix_index follows the rows generate
    repeats for the beams); decoders with left padding."""
    encdec = ARCHS[model_type].is_encoder_decoder
    model = _model(model_type, dtype=torch.float32) if encdec else _decoder(model_type)
    singles, bank = _single_and_bank(model)
    batch = {k: v for k, v in _batch(B=4, N=6).items() if not k.startswith("decoder")}
    if not encdec:
        batch["attention_mask"] = batch["attention_mask"].flip(1)
    index = torch.tensor([2, 0, 1, 0])
    pad = dict(pad_token_id=model.config.pad_token_id)
    apply_prefix_attention(model, bank)
    try:
        mixed = _generate(model, batch, prefix_index=index, **pad).sequences
        beams = _generate(model, batch, prefix_index=index, num_beams=2, num_return_sequences=2, **pad).sequences
        with pytest.raises(ValueError, match="prefix encoder is a bank"):
            _generate(model, batch, **pad)
    finally:
        remove_prefix_attention(model)
    alone = _each_row_alone(model, singles, batch, index, **pad)
    for row, seq in enumerate(alone):
        assert torch.equal(mixed[row], seq[0]), f"row {row}: {mixed[row].tolist()} != {seq[0].tolist()}"
    assert len({tuple(s[0, -STEPS:].tolist()) for s in alone[:3]}) > 1  # the tasks generate differently
    alone_beams = _each_row_alone(model, singles, batch, index, num_beams=2, num_return_sequences=2, **pad)
    assert beams.shape[0] == 8
    for row, seq in enumerate(alone_beams):
        assert torch.equal(beams[2 * row:2 * row + 2], seq)


@pytest.mark.parametrize("model_type", ["bart", "t5"])
def test_remove_restores_exactly(model_type):
    model = _model(model_type, dtype=torch.float32)
    batch = _batch()
    before_sd = {k: v.clone() for k, v in model.state_dict().items()}
    configs = [(m, m.config._attn_implementation) for m in model.modules() if hasattr(m, "config")]
    attrs = [sorted(m.__dict__) for m in model.modules()]
    hooks = [(len(m._forward_pre_hooks), len(m._forward_hooks)) for m in model.modules()]
    with torch.no_grad():
        before = model(**batch).logits
    apply_prefix_attention(model, PrefixEncoder.for_model(model, 4))
    assert all(m.config._attn_implementation == "ptv2_prefix" for m, _ in configs)
    with torch.no_grad():
        model(**batch)
    remove_prefix_attention(model)
    assert [(m, m.config._attn_implementation) for m, _ in configs] == configs
    assert [sorted(m.__dict__) for m in model.modules()] == attrs
    assert [(len(m._forward_pre_hooks), len(m._forward_hooks)) for m in model.modules()] == hooks
    assert all(p.requires_grad for p in model.parameters())
    assert all(torch.equal(before_sd[k], v) for k, v in model.state_dict().items())
    with torch.no_grad():
        assert torch.equal(model(**batch).logits, before)


def test_encoder_only_t5_reads_encoder_prefixes():
    from transformers import T5EncoderModel

    model = T5EncoderModel(tiny_config("t5"))
    enc = PrefixEncoder.for_model(model, 2)
    assert enc.num_layers == model.config.num_layers
    apply_prefix_attention(model, enc)
    try:
        out = model(input_ids=_batch()["input_ids"]).last_hidden_state
    finally:
        remove_prefix_attention(model)
    assert out.shape == (3, 7, 32)


def test_unsupported_encoder_decoder_settings_raise_one_line():
    model = _model("bart", dtype=torch.float32)
    enc = PrefixEncoder.for_model(model, 2)
    errors = []
    with pytest.raises(ValueError, match="position_offset must be 'zero' for the encoder-decoder bart.*got 'shifted'") as e:
        apply_prefix_attention(model, enc, position_offset="shifted")
    errors.append(e)
    apply_prefix_attention(model, enc)
    try:
        with pytest.raises(NotImplementedError, match="'output_attentions'") as e:
            model(**_batch(), output_attentions=True)
        errors.append(e)
    finally:
        remove_prefix_attention(model)
    uneven = _model("bart", dtype=torch.float32, decoder_attention_heads=2)
    with pytest.raises(UnsupportedModelError, match="bart has 4 and 2") as e:
        PrefixEncoder.for_model(uneven, 2)
    errors.append(e)
    assert all("\n" not in str(e.value) for e in errors)


@pytest.mark.parametrize("model_type", ["bart", "t5"])
def test_training_with_attention_and_prefix_dropout(model_type):
    """Train mode (the backbone's attention dropout, prefix dropout in the op) runs every path and
    trains the prefix of every layer."""
    dropout = "attention_dropout" if model_type == "bart" else "dropout_rate"
    model = _model(model_type, dtype=torch.float32, **{dropout: 0.1})
    enc = PrefixEncoder.for_model(model, 3, prefix_dropout=0.1)
    apply_prefix_attention(model, enc)
    try:
        model.train()
        batch = _batch()
        model(**batch, labels=batch["decoder_input_ids"]).loss.backward()
    finally:
        remove_prefix_attention(model)
    grad = enc.embedding.weight.grad.view(3, enc.num_layers, 2, -1)
    assert torch.isfinite(grad).all() and (grad.abs().sum((0, 2, 3)) > 0).all()


@pytest.mark.parametrize("model_type,reentrant", [("bart", True), ("t5", False)])
def test_gradient_checkpointing_same_gradients(model_type, reentrant):
    """The prefix gradients of every layer (encoder, decoder, cross-attention) survive checkpointing:
    with reentrant checkpointing they reach the encoder through the bridge before the encoder's first
    layer, whose backward runs after every decoder layer's."""
    model = _model(model_type, dtype=torch.float32)
    enc = PrefixEncoder.for_model(model, 3, projection=True, prefix_hidden=16)
    batch = _batch()
    apply_prefix_attention(model, enc)
    try:
        model.train()
        plain = _run(model, enc, batch)
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
        ckpt = _run(model, enc, batch)
    finally:
        remove_prefix_attention(model)
    torch.testing.assert_close(ckpt[0], plain[0], rtol=1e-5, atol=1e-6)
    for name in plain[1]:
        torch.testing.assert_close(ckpt[1][name], plain[1][name], rtol=1e-5, atol=1e-6)
