"""DeBERTa-v2/v3 with a prefix, against the authors' formulation (THUDM/P-tuning-v2, model/debertaV2.py)
written out below: per-row prefix copies in front of every layer's keys and values, zero relative-
position terms in the prefix columns, DeBERTa's common scale, the mask widened with ones."""

import functools
import math

import pytest
import torch

from ptv2_kernels import PrefixEncoder, apply_prefix_attention, remove_prefix_attention
from ptv2_kernels.hf.testing import tiny_model

TOL = dict(rtol=1e-4, atol=2e-5)
# v3's layout (the tiny default: position buckets, shared attention keys, no absolute positions) and
# v2-xlarge's (a convolution after the first layer, separate position projections, absolute positions)
VARIANTS = {"v3": {}, "v2": dict(position_biased_input=True, position_buckets=-1, share_att_key=False,
                                 conv_kernel_size=3, conv_act="gelu", norm_rel_ebd="none")}


def _authors_attention(module, prefix, hidden_states, attention_mask, output_attentions=False, query_states=None,
                       relative_pos=None, rel_embeddings=None):
    pk, pv = prefix  # (H, P, D)
    H, (P, D) = module.num_attention_heads, pk.shape[1:]
    B, N = hidden_states.shape[:2]
    q, k, v = (module.transpose_for_scores(proj(hidden_states), H)
               for proj in (module.query_proj, module.key_proj, module.value_proj))
    copies = lambda t: t.expand(B, H, P, D).reshape(B * H, P, D)  # noqa: E731  (the per-row past_key_value)
    k_all, v_all = torch.cat([copies(pk), k], 1), torch.cat([copies(pv), v], 1)
    scale_factor = 1 + sum(kind in module.pos_att_type for kind in ("c2p", "p2c"))
    scores = torch.bmm(q, k_all.transpose(-1, -2)) / math.sqrt(D * scale_factor)
    rel = module.disentangled_attention_bias(q, k, relative_pos, module.pos_dropout(rel_embeddings), scale_factor)
    scores = scores + torch.cat([torch.zeros(B * H, N, P), rel], -1)  # no relative term for the prefix
    tokens = attention_mask[:, 0].diagonal(dim1=-2, dim2=-1).float()  # the 2-D mask back from the pairwise one
    wide = torch.cat([torch.ones(B, P), tokens], 1)
    pairwise = (wide[:, None, :, None] * wide[:, None, None, :])[:, :, P:].bool()  # (B, 1, N, P + N)
    scores = scores.view(B, H, N, P + N).masked_fill(~pairwise, float("-inf"))
    probs = scores.softmax(-1).masked_fill(~pairwise, 0.0)  # their XSoftmax
    context = module.dropout(probs).view(B * H, N, P + N) @ v_all
    return context.view(B, H, N, D).permute(0, 2, 1, 3).reshape(B, N, H * D), None


def _batch():
    ids = torch.randint(3, 100, (3, 11), generator=torch.Generator().manual_seed(0))
    mask = torch.ones(3, 11, dtype=torch.long)
    mask[1, 7:] = 0
    mask[2, 10:] = 0
    return ids, mask


def _run(model, enc, ids, mask):
    enc.zero_grad(set_to_none=True)
    out = model(input_ids=ids, attention_mask=mask).last_hidden_state
    w = torch.randn(out.shape[-1], generator=torch.Generator().manual_seed(1))
    ((out * w).sum(-1) * mask).sum().backward()
    return out.detach()[mask.bool()], {n: p.grad.clone() for n, p in enc.named_parameters()}


@pytest.mark.parametrize("projection", [False, True])
@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_deberta_matches_the_authors_formulation(variant, projection):
    model = tiny_model("deberta-v2", **VARIANTS[variant])
    torch.manual_seed(2)
    enc = PrefixEncoder.for_model(model, 4, projection=projection, prefix_hidden=16, init_std=0.5)
    ids, mask = _batch()
    layers = [layer.attention.self for layer in model.encoder.layer]
    kv = enc()
    for module, prefix in zip(layers, kv):
        module.forward = functools.partial(_authors_attention, module, prefix)
    try:
        authors = _run(model, enc, ids, mask)
    finally:
        for module in layers:
            del module.forward
    for offset in ("zero", "shifted"):  # DeBERTa's positions are relative: the two modes are one
        for attention in ("prefix", "reference"):
            apply_prefix_attention(model, enc, position_offset=offset, attention=attention)
            try:
                ours = _run(model, enc, ids, mask)
            finally:
                remove_prefix_attention(model)
            torch.testing.assert_close(ours[0], authors[0], **TOL)
            for name in authors[1]:
                torch.testing.assert_close(ours[1][name], authors[1][name], **TOL)
    print(f"DeBERTa {variant} projection={projection}: max err {(ours[0] - authors[0]).abs().max().item():.2e}")


def test_deberta_without_prefix_is_transformers_deberta():
    model = tiny_model("deberta-v2", **VARIANTS["v2"])
    ids, mask = _batch()
    with torch.no_grad():
        ref = model(input_ids=ids, attention_mask=mask).last_hidden_state
        apply_prefix_attention(model, PrefixEncoder.for_model(model, 0))
        try:
            out = model(input_ids=ids, attention_mask=mask).last_hidden_state
        finally:
            remove_prefix_attention(model)
    torch.testing.assert_close(out, ref, **TOL)
    assert all("forward" not in vars(layer.attention.self) for layer in model.encoder.layer)


def test_deberta_task_model_trains_only_prefix_and_head():
    from ptv2_kernels.hf.models import PrefixModelForSequenceClassification

    model = PrefixModelForSequenceClassification.from_pretrained(tiny_model("deberta-v2"), num_labels=2, prefix_len=3)
    ids, mask = _batch()
    out = model(ids, mask, labels=torch.tensor([0, 1, 1]))
    out.loss.backward()
    assert out[0] is out.loss and out.logits.shape == (3, 2)
    trained = (model.prefix_encoder.embedding.weight, model.pooler.dense.weight, model.classifier.weight)
    assert all(p.grad is not None for p in trained)
    assert all(p.grad is None for p in model.backbone.parameters())
    model.eval()  # the authors' head: ContextPooler (dense + activation of the first token), then classifier
    with torch.no_grad():
        first = model.backbone(input_ids=ids, attention_mask=mask).last_hidden_state[:, 0]
        head = model.classifier(torch.nn.functional.gelu(model.pooler.dense(first)))
        torch.testing.assert_close(model(ids, mask).logits, head, **TOL)


def test_init_from_tokens_reads_deberta_keys():
    model = tiny_model("deberta-v2")
    ids = torch.tensor([5, 6, 7, 8])
    enc = PrefixEncoder.for_model(model, 4).init_from_tokens_(model, ids)
    with torch.no_grad():
        keys = model.encoder.layer[0].attention.self.key_proj(model.embeddings(input_ids=ids[None]))
    torch.testing.assert_close(enc()[0][0], keys[0].view(4, 4, 8).transpose(0, 1), **TOL)  # (H, P, D)
