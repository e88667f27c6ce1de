"""PrefixEncoder: layout (the authors'/PEFT's), MLP, export, banks, dropout hand-off, save/load, import."""

import pytest
import torch

from ptv2_kernels.prefix import PrefixEncoder

L, H, D, P = 3, 2, 4, 5


def _peft_layout(flat, B, L, H, D):
    """The authors'/PEFT's get_prompt: (B, P, 2L*H*D) -> view, permute, split into (K, V) per layer."""
    P = flat.shape[-2]
    x = flat.expand(B, P, -1).reshape(B, P, 2 * L, H, D).permute(2, 0, 3, 1, 4).split(2)
    return [(t[0], t[1]) for t in x]


@pytest.mark.parametrize("projection", [False, True])
def test_layout_matches_authors_and_peft(projection):
    torch.manual_seed(0)
    enc = PrefixEncoder(L, H, D, P, projection=projection, prefix_hidden=16, hidden_size=8)
    kv = enc()
    assert len(kv) == L
    ref = _peft_layout(enc.flat().unsqueeze(0), 2, L, H, D)
    for (k, v), (rk, rv) in zip(kv, ref):
        assert k.shape == v.shape == (H, P, D)
        torch.testing.assert_close(k, rk[0], rtol=0, atol=0)
        torch.testing.assert_close(v, rv[1], rtol=0, atol=0)


def test_computed_once_and_grads_flow():
    enc = PrefixEncoder(L, H, D, P, projection=True, prefix_hidden=16)
    kv = enc()
    loss = sum((k * 1.5).sum() + (v ** 2).sum() for k, v in kv)
    loss.backward()
    assert all(p.grad is not None for p in enc.parameters())
    assert enc.embedding.weight.shape == (P, H * D)
    assert enc.trans[0].weight.shape == (16, H * D) and enc.trans[2].weight.shape == (2 * L * H * D, 16)


def test_init_std_and_dropout_handoff():
    torch.manual_seed(0)
    enc = PrefixEncoder(L, H, D, 64, init_std=0.02, prefix_dropout=0.1)
    assert 0.01 < enc.embedding.weight.std().item() < 0.03
    enc.train()
    assert enc.prefix_dropout_p == 0.1
    enc.eval()
    assert enc.prefix_dropout_p == 0.0
    with pytest.raises(ValueError):
        PrefixEncoder(L, H, D, P, prefix_dropout=1.0)


def test_export_gives_same_prefix():
    torch.manual_seed(0)
    enc = PrefixEncoder(L, H, D, P, projection=True, prefix_hidden=16)
    flat = enc.export()
    assert not flat.projection and flat.trans is None
    for (k1, v1), (k2, v2) in zip(enc(), flat()):
        torch.testing.assert_close(k1, k2)
        torch.testing.assert_close(v1, v2)


def test_bank_and_stack():
    torch.manual_seed(0)
    a, b = PrefixEncoder(L, H, D, P), PrefixEncoder(L, H, D, P, projection=True, prefix_hidden=8)
    bank = PrefixEncoder.stack([a, b])
    assert bank.is_bank and bank.num_tasks == 2
    for (bk, bv), (ak, av), (ck, cv) in zip(bank(), a(), b()):
        assert bk.shape == (2, H, P, D)
        torch.testing.assert_close(bk[0], ak)
        torch.testing.assert_close(bv[1], cv)
    trained_bank = PrefixEncoder(L, H, D, P, num_tasks=3, projection=True, prefix_hidden=8)
    assert trained_bank()[0][0].shape == (3, H, P, D)


@pytest.mark.parametrize("projection,tasks", [(False, None), (True, None), (False, 2)])
def test_save_load_roundtrip(tmp_path, projection, tasks):
    torch.manual_seed(0)
    enc = PrefixEncoder(L, H, D, P, projection=projection, prefix_hidden=8, num_tasks=tasks, prefix_dropout=0.2)
    enc.save(tmp_path / "p.safetensors")
    back = PrefixEncoder.load(tmp_path / "p.safetensors")
    assert back.config_dict() == enc.config_dict()
    for (k1, v1), (k2, v2) in zip(enc(), back()):
        assert torch.equal(k1, k2) and torch.equal(v1, v2)


def test_from_authors_and_peft_state_dicts():
    torch.manual_seed(0)
    enc = PrefixEncoder(L, H, D, P, projection=True, prefix_hidden=8)
    authors = {"prefix_encoder." + k: v for k, v in enc.state_dict().items()}
    authors["bert.embeddings.word_embeddings.weight"] = torch.zeros(3, 3)
    back = PrefixEncoder.from_state_dict(authors, L, H, D)
    peft = {k.replace("trans.", "transform."): v for k, v in enc.state_dict().items()}
    back2 = PrefixEncoder.from_state_dict(peft, L, H, D, prefix="")
    for (k1, v1), (k2, v2), (k3, v3) in zip(enc(), back(), back2()):
        assert torch.equal(k1, k2) and torch.equal(v1, v3)


def test_load_prefix_roundtrip():
    torch.manual_seed(0)
    enc = PrefixEncoder(L, H, D, P)
    kv = enc()
    other = PrefixEncoder(L, H, D, P).load_prefix_([k for k, _ in kv], [v for _, v in kv])
    assert torch.equal(other.embedding.weight, enc.embedding.weight)


def test_init_from_word_embeddings():
    from ptv2_kernels.hf.testing import tiny_model

    model = tiny_model("bert")
    enc = PrefixEncoder.for_model(model, 3, projection=True, prefix_hidden=8)
    ids = torch.tensor([4, 5, 6])
    enc.init_from_embeddings_(model, ids)
    assert torch.equal(enc.embedding.weight, model.embeddings.word_embeddings.weight[ids])
    with pytest.raises(ValueError):
        PrefixEncoder.for_model(model, 3).init_from_embeddings_(model, ids)


def test_groups_give_each_run_of_layers_its_own_mlp_in_layer_order():
    """Li and Liang's encoder-decoder MLPs: layers 0-1, 2, 3 reparameterized apart; each group's columns
    are its MLP's output, in the flat layout of a one-MLP encoder; a group without a held layer has no MLP."""
    torch.manual_seed(0)
    enc = PrefixEncoder(4, 2, 3, 5, projection=True, prefix_hidden=7, hidden_size=6, groups=[2, 1, 1])
    x = enc.embedding.weight
    want = torch.cat([mlp(x) for mlp in enc.trans], dim=1)
    assert len(enc.trans) == 3 and [m[2].out_features for m in enc.trans] == [2 * 2 * 6, 2 * 6, 2 * 6]
    assert torch.equal(enc.flat(), want) and enc.flat().shape == (5, enc.out_features)
    k3 = enc()[3][0]  # layer 3's key: the last group's first half, as (Hkv, P, D)
    assert torch.equal(k3, enc.trans[2](x)[:, :6].view(5, 2, 3).transpose(0, 1))
    some = PrefixEncoder(4, 2, 3, 5, projection=True, prefix_hidden=7, groups=[2, 1, 1], layers=[0, 3])
    assert len(some.trans) == 2 and torch.equal(some.export().flat(), some.flat())
    assert PrefixEncoder(**some.config_dict()).groups == (2, 1, 1)
    for bad in ([2, 1], [4, 0]):
        with pytest.raises(ValueError, match="groups must be positive layer counts summing to num_layers"):
            PrefixEncoder(4, 2, 3, 5, projection=True, groups=bad)
    with pytest.raises(ValueError, match="with projection=True"):
        PrefixEncoder(4, 2, 3, 5, groups=[4])


@pytest.mark.parametrize("model_type,groups", [("bart", (2, 1, 1)), ("t5", (2, 1, 1)), ("llama", None)])
def test_encoder_decoders_get_an_mlp_per_attention_kind(model_type, groups):
    pytest.importorskip("transformers")
    from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM

    from ptv2_kernels.hf import ARCHS
    from ptv2_kernels.hf.testing import tiny_config

    auto = AutoModelForSeq2SeqLM if ARCHS[model_type].is_encoder_decoder else AutoModelForCausalLM
    model = auto.from_config(tiny_config(model_type))
    assert PrefixEncoder.for_model(model, 4, projection=True).groups == groups
    assert PrefixEncoder.for_model(model, 4).groups is None  # a plain prefix has nothing to group
