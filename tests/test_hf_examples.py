"""The runnable examples in python/ (in-process, with few steps, to keep the suite fast)."""

import importlib.util
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _load(name):
    spec = importlib.util.spec_from_file_location(f"example_{name}", os.path.join(ROOT, "python", f"{name}.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_patch_and_train(capsys):
    loss = _load("patch_and_train").main(["--steps", "2"])
    out = capsys.readouterr().out
    assert "step 1" in out and "backbone restored" in out and loss == loss


def test_speed_up_peft(capsys):
    _load("speed_up_peft").main(["--steps", "1"])
    out = capsys.readouterr().out
    assert "adapter_model.safetensors" in out and "reloaded adapter" in out


def test_serve_prefix_bank(capsys):
    _load("serve_prefix_bank").main()
    assert "every row matches its single-task model" in capsys.readouterr().out


def test_generation_toy_writes_data_and_models_that_train_and_generate(tmp_path, capsys):
    """The README's generation run, shortened: the toy's files load in ptv2 train, which generates."""
    import json

    from ptv2_kernels.train.cli import main

    _load("generation_toy").main([str(tmp_path / "toy")])
    toy = tmp_path / "toy"
    assert len((toy / "dev.jsonl").read_text().splitlines()) == 60
    assert main(["train", "--task", "custom", "--train-file", str(toy / "train.jsonl"), "--dev-file",
                 str(toy / "dev.jsonl"), "--model", str(toy / "bart"), "--max-steps", "2", "--max-new-tokens", "8",
                 "--output-dir", str(tmp_path / "run"), "--threads", "1", "--no-progress"]) == 0
    rows = [json.loads(line) for line in (tmp_path / "run" / "best" / "dev_outputs.jsonl").read_text().splitlines()]
    assert len(rows) == 60 and all(isinstance(r["generation"], str) for r in rows)


@pytest.mark.parametrize("name", ["patch_and_train", "speed_up_peft", "serve_prefix_bank", "generation_toy"])
def test_example_has_docstring_and_main(name):
    mod = _load(name)
    assert mod.__doc__ and callable(mod.main)
