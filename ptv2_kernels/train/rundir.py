"""The output folder of a run: never silently reused or overwritten.

A folder that already holds files is a run; a new one goes there only with ``--resume`` (continue it)
or ``--overwrite`` (replace it). An overwritten run is moved aside, not deleted, until the new one has
written its first checkpoint, so a new run that fails early loses nothing.
"""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path
from typing import Optional

from .config import ConfigError


def check_output_dir(path: Path, resume: Optional[str], overwrite: bool) -> None:
    """Refuse a non-empty ``path`` unless the run resumes or overwrites it. Reads, never writes."""
    if resume or overwrite or not path.is_dir():
        return
    entries = sorted(p.name for p in path.iterdir())
    if entries:
        shown = ", ".join(entries[:3]) + (", ..." if len(entries) > 3 else "")
        raise ConfigError("output_dir", f"must be empty or new (pass --resume to continue the run there or "
                                        f"--overwrite to replace it), got {str(path)!r} holding {shown}")


def move_aside(path: Path) -> Optional[Path]:
    """Rename a non-empty ``path`` to a hidden sibling and return it (None when there was nothing)."""
    if not path.is_dir() or not any(path.iterdir()):
        return None
    aside = path.with_name(f".{path.name}.replaced-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}")
    os.replace(path, aside)
    return aside


def drop_aside(aside: Optional[Path]) -> None:
    """Delete the replaced run once the new one has a checkpoint."""
    if aside is not None and aside.exists():
        shutil.rmtree(aside)
