import subprocess
import sys

from ptv2_kernels import info


def test_info_names_every_backend_and_reason():
    text = info.report()
    for name in ("cuda", "triton", "torch"):
        assert f"  {name} " in text
    assert "torch   available" in text
    assert "torch        " in text and "triton       " in text


def test_info_runs_as_module():
    done = subprocess.run([sys.executable, "-m", "ptv2_kernels.info"], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    assert "backends" in done.stdout


def test_aot_rejects_bad_target():
    done = subprocess.run([sys.executable, "-m", "ptv2_kernels.info", "--aot", "hopper"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode != 0 and "sm_80,sm_90" in done.stderr
