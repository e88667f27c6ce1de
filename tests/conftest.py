import os

import pytest
import torch

# Without a GPU the Triton backend runs through the interpreter; it must be chosen before triton loads.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from shared_data import DATA, MISSING  # noqa: E402

HAS_GPU = torch.cuda.is_available()
NO_GPU_REASON = "no CUDA GPU on this machine (torch.cuda.is_available() is False)"


def pytest_collection_modifyitems(config, items):
    skips = {"gpu": None if HAS_GPU else pytest.mark.skip(reason=NO_GPU_REASON),
             "needs_data": None if DATA is not None else pytest.mark.skip(reason=MISSING)}
    for item in items:
        for keyword, skip in skips.items():
            if skip is not None and keyword in item.keywords:
                item.add_marker(skip)
        if "needs_data" in item.keywords:  # in --junitxml's report, for CI's run without the data (.ci/run)
            item.user_properties.append(("needs_data", "true"))


def pytest_report_header(config):
    return [f"GPU: {torch.cuda.get_device_name() if HAS_GPU else NO_GPU_REASON}",
            f"shared datasets: {DATA or 'not found (tests marked needs_data skip; set PTV2_DATA_DIR)'}"]
