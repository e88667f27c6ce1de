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


@pytest.mark.parametrize("name", ["patch_and_train", "speed_up_peft", "serve_prefix_bank"])
def test_example_has_docstring_and_main(name):
    mod = _load(name)
    assert mod.__doc__ and callable(mod.main)
