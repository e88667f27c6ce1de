"""The project's shared datasets, for the tests that need them, found where ``ptv2 train`` looks:
``$PTV2_DATA_DIR``, then the workspace's ``../shared/datasets`` beside the repository (which
``PTV2_NO_WORKSPACE_DATA=1`` hides). A test that needs them is marked ``needs_data``; where they are
missing it skips with :data:`MISSING` as its reason (tests/conftest.py)."""

from pathlib import Path
from typing import Optional

from ptv2_kernels.tasks.base import default_data_dirs

# a file every copy of the shared datasets holds (its SOURCES.md lists the rest)
_PROBE = Path("superglue") / "cb" / "train.jsonl"

MISSING = ("needs the project's shared datasets (superglue/, glue/, conll2003/): set PTV2_DATA_DIR to a "
           "folder holding them, or put them at ../shared/datasets beside the repository")


def find_data() -> Optional[Path]:
    """The first data folder that holds the shared datasets, else None."""
    return next((d.resolve() for d in default_data_dirs() if (d / _PROBE).is_file()), None)


DATA = find_data()
