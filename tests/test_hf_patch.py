"""apply_prefix_attention / remove_prefix_attention on real MiniLM and on every supported architecture."""

import pytest
import torch

from ptv2_kernels.hf import (ARCHS, SUPPORTED_MODEL_TYPES, UnsupportedModelError, apply_prefix_attention,
                             remove_prefix_attention)
from ptv2_kernels.hf.testing import minilm_path, peft_style_forward, tiny_model
from ptv2_kernels.prefix import PrefixEncoder

TOL = dict(rtol=1e-4, atol=2e-5)


@pytest.fixture(scope="module")
def minilm():
    from transformers import AutoModel, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(minilm_path())
    model = AutoModel.from_pretrained(minilm_path(), attn_implementation="sdpa").eval()
    batch = tok(["hello world", "a much longer sentence here that needs padding", "short one"],
                padding=True, return_tensors="pt")
    return model, batch


def _batch(B=3, N=9, vocab=100, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (B, N), generator=g)
    mask = torch.ones(B, N, dtype=torch.long)
    mask[1, N - 3:] = 0
    if B > 2:
        mask[2, N - 1:] = 0
    return ids, mask


def _loss(hidden, mask, seed=1):
    w = torch.randn(hidden.shape[-1], generator=torch.Generator().manual_seed(seed))
    return ((hidden * w).sum(-1) * mask).sum()


def _run(model, enc, ids, mask, **kw):
    enc.zero_grad(set_to_none=True)
    out = model(input_ids=ids, attention_mask=mask, **kw).last_hidden_state
    _loss(out, mask).backward()
    return out.detach(), {n: p.grad.clone() for n, p in enc.named_parameters()}


def _compare(a, b, mask):
    real = mask.bool()
    torch.testing.assert_close(a[0][real], b[0][real], **TOL)
    for n in a[1]:
        torch.testing.assert_close(a[1][n], b[1][n], **TOL)
    return max((a[0][real] - b[0][real]).abs().max().item(), *[(a[1][n] - b[1][n]).abs().max().item() for n in a[1]])


def test_zero_length_prefix_is_the_original_model(minilm):
    model, batch = minilm
    with torch.no_grad():
        ref = model(**batch).last_hidden_state
        apply_prefix_attention(model, PrefixEncoder.for_model(model, 0))
        try:
            out = model(**batch).last_hidden_state
        finally:
            remove_prefix_attention(model)
    real = batch["attention_mask"].bool()
    torch.testing.assert_close(out[real], ref[real], **TOL)


@pytest.mark.parametrize("projection", [False, True])
def test_minilm_shifted_matches_peft_style_and_reference(minilm, projection):
    model, batch = minilm
    torch.manual_seed(0)
    enc = PrefixEncoder.for_model(model, 6, projection=projection, prefix_hidden=32, init_std=0.5)
    ids, mask, tt = batch["input_ids"], batch["attention_mask"], batch["token_type_ids"]
    enc.zero_grad()
    out = peft_style_forward(model, enc(), ids, mask, token_type_ids=tt).last_hidden_state
    _loss(out, mask).backward()
    peft = (out.detach(), {n: p.grad.clone() for n, p in enc.named_parameters()})
    for attention in ("prefix", "reference"):
        apply_prefix_attention(model, enc, position_offset="shifted", attention=attention)
        try:
            got = _run(model, enc, ids, mask, token_type_ids=tt)
        finally:
            remove_prefix_attention(model)
        err = _compare(got, peft, mask)
        print(f"MiniLM projection={projection} {attention} vs PEFT-style: max err {err:.2e}")


@pytest.mark.parametrize("offset", ["zero", "shifted"])
@pytest.mark.parametrize("model_type", [t for t in SUPPORTED_MODEL_TYPES if not ARCHS[t].is_encoder_decoder])
def test_every_architecture_matches_reference(model_type, offset):  # encoder-decoders: test_hf_encdec.py
    model = tiny_model(model_type)
    torch.manual_seed(1)
    enc = PrefixEncoder.for_model(model, 3, init_std=0.5)
    ids, mask = _batch()
    results = {}
    for attention in ("prefix", "reference"):
        apply_prefix_attention(model, enc, position_offset=offset, attention=attention)
        try:
            results[attention] = _run(model, enc, ids, mask)
        finally:
            remove_prefix_attention(model)
    _compare(results["prefix"], results["reference"], mask)
    if offset == "shifted" and ARCHS[model_type].takes_cache:  # PEFT's route needs a cache
        enc.zero_grad()
        out = peft_style_forward(model, enc(), ids, mask).last_hidden_state
        _loss(out, mask).backward()
        _compare(results["prefix"], (out.detach(), {n: p.grad.clone() for n, p in enc.named_parameters()}), mask)
    if offset == "zero" and ARCHS[model_type].positions != "relative":
        # positions really start at 0 in "zero" and at P in "shifted": the outputs differ
        apply_prefix_attention(model, enc, position_offset="shifted")
        try:
            with torch.no_grad():
                shifted = model(input_ids=ids, attention_mask=mask).last_hidden_state
        finally:
            remove_prefix_attention(model)
        assert (shifted - results["prefix"][0]).abs().max() > 1e-4


@pytest.mark.parametrize("model_type", ["bert", "llama"])
def test_padding_mask_reaches_the_op(model_type):
    model = tiny_model(model_type)
    enc = PrefixEncoder.for_model(model, 2)
    ids, mask = _batch()
    if model_type == "llama":  # causal: pad on the left so real tokens could see the padding
        mask = mask.flip(1)
    apply_prefix_attention(model, enc)
    try:
        with torch.no_grad():
            a = model(input_ids=ids, attention_mask=mask).last_hidden_state
            ids2 = ids.masked_fill(mask == 0, 7)  # other pad ids: real tokens must not notice
            b = model(input_ids=ids2, attention_mask=mask).last_hidden_state
            c = model(input_ids=ids2).last_hidden_state  # no mask: padding is attended
    finally:
        remove_prefix_attention(model)
    real = mask.bool()
    torch.testing.assert_close(a[real], b[real], **TOL)
    assert (c[1][real[1]] - b[1][real[1]]).abs().max() > 1e-4


def test_four_d_mask_is_refused():
    model = tiny_model("bert")
    apply_prefix_attention(model, PrefixEncoder.for_model(model, 2))
    ids, mask = _batch()
    try:
        with pytest.raises(ValueError, match="2-D"):
            model(input_ids=ids, attention_mask=torch.ones(3, 1, 9, 9, dtype=torch.bool))
    finally:
        remove_prefix_attention(model)


@pytest.mark.parametrize("model_type", ["bert", "roberta", "llama", "gpt2", "deberta-v2"])
def test_remove_restores_exactly(model_type):
    model = tiny_model(model_type)
    ids, mask = _batch()
    before_sd = {k: v.clone() for k, v in model.state_dict().items()}
    impl = model.config._attn_implementation
    with torch.no_grad():
        before = model(input_ids=ids, attention_mask=mask).last_hidden_state
    hooks = [len(m._forward_pre_hooks) for m in model.modules()]
    attrs = [sorted(m.__dict__) for m in model.modules()]
    enc = PrefixEncoder.for_model(model, 4)
    apply_prefix_attention(model, enc, position_offset="shifted")
    assert model.config._attn_implementation == "ptv2_prefix"
    assert set(model.state_dict()) == set(before_sd) | {f"prefix_encoder.{k}" for k in enc.state_dict()}
    assert not any(p.requires_grad for p in model.parameters() if all(p is not q for q in enc.parameters()))
    with torch.no_grad():
        model(input_ids=ids, attention_mask=mask)
    remove_prefix_attention(model)
    assert model.config._attn_implementation == impl
    assert [len(m._forward_pre_hooks) for m in model.modules()] == hooks
    assert [sorted(m.__dict__) for m in model.modules()] == attrs
    assert all(p.requires_grad for p in model.parameters()) and not hasattr(model.config, "ptv2_prefix")
    after_sd = model.state_dict()
    assert all(torch.equal(before_sd[k], after_sd[k]) for k in before_sd)
    with torch.no_grad():
        after = model(input_ids=ids, attention_mask=mask).last_hidden_state
    assert torch.equal(before, after)


def test_unsupported_model_names_type_and_supported():
    from transformers import AutoModel, GPTNeoXConfig

    model = AutoModel.from_config(GPTNeoXConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                                                intermediate_size=64, vocab_size=64))
    with pytest.raises(UnsupportedModelError) as err:
        apply_prefix_attention(model, PrefixEncoder(1, 4, 8, 2))
    assert "gpt_neox" in str(err.value) and all(t in str(err.value) for t in SUPPORTED_MODEL_TYPES)


def test_wrong_encoder_dims_raise():
    model = tiny_model("llama")
    with pytest.raises(ValueError, match="does not match"):
        apply_prefix_attention(model, PrefixEncoder(2, 4, 8, 3))  # llama tiny has 2 kv heads


@pytest.mark.parametrize("model_type,reentrant", [("bert", False), ("llama", False), ("bert", True),
                                                  ("llama", True)])
def test_gradient_checkpointing_same_gradients(model_type, reentrant):
    model = tiny_model(model_type, **{name: 0.0 for name in ARCHS[model_type].dropouts})  # to compare
    enc = PrefixEncoder.for_model(model, 3, projection=True, prefix_hidden=16)
    ids, mask = _batch()
    apply_prefix_attention(model, enc)
    try:
        model.train()  # checkpointing runs only in train mode
        plain = _run(model, enc, ids, mask)
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
        ckpt = _run(model, enc, ids, mask)
        model.gradient_checkpointing_disable()
    finally:
        remove_prefix_attention(model)
    _compare(plain, ckpt, mask)


def test_autocast_runs_in_low_precision():
    model = tiny_model("bert")
    enc = PrefixEncoder.for_model(model, 3)
    ids, mask = _batch()
    seen = {}
    import ptv2_kernels.ops as ops

    orig = ops.prefix_attention

    def spy(q, k, v, pk, pv, *a, **kw):
        out = orig(q, k, v, pk, pv, *a, **kw)
        seen["dtype"] = out.dtype
        return out

    apply_prefix_attention(model, enc)
    try:
        with torch.no_grad():
            ref = model(input_ids=ids, attention_mask=mask).last_hidden_state
        ops.prefix_attention = spy
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(input_ids=ids, attention_mask=mask).last_hidden_state
        _loss(out.float(), mask).backward()
    finally:
        ops.prefix_attention = orig
        remove_prefix_attention(model)
    assert seen["dtype"] == torch.bfloat16
    assert enc.embedding.weight.grad is not None and enc.embedding.weight.grad.dtype == torch.float32
    real = mask.bool()
    assert (out.float()[real] - ref[real]).abs().max() < 0.1


def test_prefix_dropout_handed_to_the_op():
    model = tiny_model("bert")
    enc = PrefixEncoder.for_model(model, 3, prefix_dropout=0.25)
    ids, mask = _batch()
    import ptv2_kernels.ops as ops

    seen = []
    orig = ops.prefix_attention
    ops.prefix_attention = lambda *a, **kw: (seen.append(kw["prefix_dropout_p"]), orig(*a, **kw))[1]
    apply_prefix_attention(model, enc)
    try:
        enc.train()
        model(input_ids=ids, attention_mask=mask)
        enc.eval()
        model(input_ids=ids, attention_mask=mask)
    finally:
        ops.prefix_attention = orig
        remove_prefix_attention(model)
    assert seen == [0.25, 0.25, 0.0, 0.0]


def test_bank_rows_read_their_task():
    model = tiny_model("roberta")
    torch.manual_seed(3)
    encs = [PrefixEncoder.for_model(model, 3, init_std=0.5) for _ in range(3)]
    bank = PrefixEncoder.stack(encs)
    ids, mask = _batch()
    index = torch.tensor([2, 0, 1])
    with torch.no_grad():
        apply_prefix_attention(model, bank)
        try:
            out = model(input_ids=ids, attention_mask=mask, prefix_index=index).last_hidden_state
            with pytest.raises(ValueError, match="bank"):
                model(input_ids=ids, attention_mask=mask)
        finally:
            remove_prefix_attention(model)
        for row, t in enumerate(index.tolist()):
            apply_prefix_attention(model, encs[t])
            try:
                single = model(input_ids=ids[row:row + 1], attention_mask=mask[row:row + 1]).last_hidden_state
            finally:
                remove_prefix_attention(model)
            real = mask[row].bool()
            torch.testing.assert_close(out[row][real], single[0][real], **TOL)


def test_init_from_real_activations():
    model = tiny_model("bert")
    enc = PrefixEncoder.for_model(model, 4)
    ids = torch.tensor([5, 6, 7, 8])
    enc.init_from_tokens_(model, ids)
    captured = {}

    def hook(mod, args, kwargs, out):
        captured.setdefault("k", mod.key(args[0]).detach())

    h = model.encoder.layer[0].attention.self.register_forward_hook(hook, with_kwargs=True)
    with torch.no_grad():
        model(input_ids=ids[None])
    h.remove()
    k0 = captured["k"][0].view(4, 4, 8).transpose(0, 1)  # (H, P, D)
    torch.testing.assert_close(enc()[0][0], k0, **TOL)


def test_triton_backend_tiny():
    pytest.importorskip("triton")

    model = tiny_model("bert")
    enc = PrefixEncoder.for_model(model, 2, init_std=0.5)
    ids, mask = _batch(B=2, N=5)
    results = {}
    for backend in ("torch", "triton"):
        apply_prefix_attention(model, enc, backend=backend)
        try:
            results[backend] = _run(model, enc, ids, mask)
        finally:
            remove_prefix_attention(model)
    err = _compare(results["triton"], results["torch"], mask)
    print(f"triton vs torch backend (interpreter): max err {err:.2e}")


def test_model_with_head_takes_prefix_index():
    from transformers import AutoModelForSequenceClassification

    base = tiny_model("bert")
    torch.manual_seed(0)
    clf = AutoModelForSequenceClassification.from_config(base.config).eval()
    encs = [PrefixEncoder.for_model(clf, 2, init_std=0.5) for _ in range(2)]
    ids, mask = _batch()
    apply_prefix_attention(clf, PrefixEncoder.stack(encs))
    try:
        with torch.no_grad():
            mixed = clf(input_ids=ids, attention_mask=mask, prefix_index=torch.tensor([1, 0, 1])).logits
    finally:
        remove_prefix_attention(clf)
    apply_prefix_attention(clf, encs[1])
    try:
        with torch.no_grad():
            single = clf(input_ids=ids, attention_mask=mask).logits
    finally:
        remove_prefix_attention(clf)
    torch.testing.assert_close(mixed[[0, 2]], single[[0, 2]], **TOL)


@pytest.mark.parametrize("offset", ["zero", "shifted"])
@pytest.mark.parametrize("model_type", ["llama", "qwen2", "qwen3", "gpt2"])
def test_generation_with_cache_matches_uncached_steps(model_type, offset, monkeypatch):
    """generate() with a KV cache (the prefix stays out of the cache): every step's logits equal those
    of a full forward over the sequence so far without a cache, left padding included; with shifted
    positions they also equal PEFT's formulation (the prefix copied into the cache)."""
    from transformers import AutoModelForCausalLM

    from ptv2_kernels.hf import attention
    from ptv2_kernels.hf.testing import tiny_config

    cached_calls = []
    real = attention._cached_attention
    monkeypatch.setattr(attention, "_cached_attention", lambda *a, **k: cached_calls.append(1) or real(*a, **k))
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_config(model_type), attn_implementation="sdpa").eval()
    enc = PrefixEncoder.for_model(model, 3, init_std=0.5)
    ids, mask = _batch(B=2, N=6)
    mask = mask.flip(1)  # left padding, as for batched generation
    steps = 4
    apply_prefix_attention(model, enc, position_offset=offset)
    try:
        with torch.no_grad():
            gen = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=steps, do_sample=False,
                                 output_logits=True, return_dict_in_generate=True, pad_token_id=0)
            seq = gen.sequences
            assert seq.shape == (2, 6 + steps)
            full_mask = torch.cat([mask, torch.ones(2, steps, dtype=mask.dtype)], 1)
            for t in range(steps):
                n = 6 + t
                pos = (full_mask[:, :n].cumsum(-1) - 1).clamp(min=0)
                if offset == "shifted":
                    pos = pos + 3
                full = model(input_ids=seq[:, :n], attention_mask=full_mask[:, :n], position_ids=pos,
                             use_cache=False).logits[:, -1]
                torch.testing.assert_close(gen.logits[t], full, **TOL)
    finally:
        remove_prefix_attention(model)
    assert len(cached_calls) == (steps - 1) * 2  # every step after the first, in both layers
    assert "_prepare_position_ids_for_generation" not in vars(model)  # removal restores generate
    if offset == "shifted":
        with torch.no_grad():
            n = 6 + steps - 1
            pos = (full_mask[:, :n].cumsum(-1) - 1).clamp(min=0) + 3
            peft = peft_style_forward(model, enc(), seq[:, :n], full_mask[:, :n], position_ids=pos).logits[:, -1]
        torch.testing.assert_close(gen.logits[-1], peft, **TOL)


def test_unsupported_attention_keywords_raise_naming_them():
    from ptv2_kernels.hf.attention import prefix_attention_forward

    model = tiny_model("llama")
    apply_prefix_attention(model, PrefixEncoder.for_model(model, 2))
    module = model.layers[0].self_attn
    q, kv = torch.randn(2, 4, 5, 8), torch.randn(2, 2, 5, 8)
    call = lambda **kw: prefix_attention_forward(module, q, kv, kv, None, **kw)  # noqa: E731
    try:
        model(input_ids=torch.randint(3, 100, (2, 5)))  # the prefix of this forward
        for name, value in (("softcap", 30.0), ("s_aux", torch.zeros(4)), ("sliding_window", 3),
                            ("output_attentions", True), ("cu_seq_lens_q", torch.tensor([0, 5]))):
            with pytest.raises(NotImplementedError, match=f"'{name}'"):
                call(**{name: value})
        # a window covering every key, unset keywords and ones that carry nothing for attention run
        out, _ = call(sliding_window=5, softcap=None, output_attentions=False, num_items_in_batch=torch.tensor(3),
                      position_ids=torch.arange(5)[None])
        assert out.shape == (2, 5, 4, 8)
    finally:
        remove_prefix_attention(model)


def test_set_prefix_encoder_swaps_the_registered_encoder():
    from ptv2_kernels.hf import set_prefix_encoder

    model = tiny_model("bert")
    enc = PrefixEncoder.for_model(model, 3, projection=True, prefix_hidden=16)
    ids, mask = _batch()
    apply_prefix_attention(model, enc)
    try:
        with torch.no_grad():
            before = model(input_ids=ids, attention_mask=mask).last_hidden_state
            flat = enc.export()
            set_prefix_encoder(model, flat)
            after = model(input_ids=ids, attention_mask=mask).last_hidden_state
        assert model.prefix_encoder is flat and not model.config.ptv2_prefix["prefix_encoder"]["projection"]
        torch.testing.assert_close(after, before, **TOL)
        with pytest.raises(ValueError, match=r"must be \(2, 4, 8\).*got \(1, 4, 8\)"):
            set_prefix_encoder(model, PrefixEncoder(1, 4, 8, 3))
    finally:
        remove_prefix_attention(model)
    assert "prefix_encoder" not in model._modules


def test_a_saved_drop_in_model_reloads_without_a_load_report(tmp_path, capfd):
    """load_prefix_attention(folder, model_class=...) loads and patches in one call, and transformers does
    not list the saved prefix weights as UNEXPECTED ("not ok if you expect identical arch"), as a plain
    from_pretrained of the same folder does although the round trip is exact."""
    import logging

    from transformers import AutoModelForSequenceClassification, BertForSequenceClassification

    from ptv2_kernels.hf import load_prefix_attention
    from ptv2_kernels.hf.testing import tiny_config

    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_config(tiny_config("bert", num_labels=3)).eval()
    apply_prefix_attention(model, PrefixEncoder.for_model(model, 4))
    model.save_pretrained(tmp_path)
    records = []
    catch = logging.Handler()
    catch.emit = records.append
    logging.getLogger("transformers").addHandler(catch)
    try:
        back = load_prefix_attention(str(tmp_path), model_class=AutoModelForSequenceClassification).eval()
        quiet = [r.getMessage() for r in records] + [capfd.readouterr().err]
        before = len(records)
        AutoModelForSequenceClassification.from_pretrained(tmp_path)
        plain = [r.getMessage() for r in records[before:]]
    finally:
        logging.getLogger("transformers").removeHandler(catch)
    assert not any("UNEXPECTED" in m or "prefix_encoder" in m for m in quiet), quiet
    assert any("prefix_encoder.embedding.weight" in m and "UNEXPECTED" in m for m in plain), plain
    assert type(back) is BertForSequenceClassification
    assert back.prefix_encoder.config_dict() == model.prefix_encoder.config_dict()
    ids = torch.randint(0, 128, (2, 7), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(back(input_ids=ids).logits, model(input_ids=ids).logits, rtol=0, atol=0)
