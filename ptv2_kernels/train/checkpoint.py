"""Training checkpoints: safetensors (tensors) + JSON (everything else), never pickle.

A checkpoint directory holds ``state.safetensors`` (trainable parameters, optimizer moments, torch RNG
states), ``state.json`` (position in the data, optimizer hyperparameters, scheduler, python and
numpy RNG states, history) and, written last, ``manifest.json`` (each file's size and SHA-256). It is
written into a temporary directory and moved into place with ``os.replace``, so a run killed at any
moment leaves only complete checkpoints behind; a file damaged afterwards (a full disk, a copy cut
short) fails :func:`verify_checkpoint`, which names it.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import shutil
from pathlib import Path
from typing import Dict, List, Optional

import numpy as np
import torch
from safetensors.torch import load_file, save_file

NAME_RE = re.compile(r"^checkpoint-(\d{8})(-epoch(\d+))?$")
MANIFEST = "manifest.json"
FILES = ("state.safetensors", "state.json")


class CheckpointError(ValueError):
    """A checkpoint that is incomplete or damaged; the message names the file."""


def write_json_atomic(path, obj):
    _write_atomic(path, json.dumps(obj, indent=2, default=_json_default))


def write_jsonl_atomic(path, rows):
    """One JSON object per line; the folder is made when missing."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    _write_atomic(path, "".join(json.dumps(r, default=_json_default) + "\n" for r in rows))


def _write_atomic(path, text: str):
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _json_default(o):
    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return float(o)
    if isinstance(o, (Path,)):
        return str(o)
    if isinstance(o, tuple):
        return list(o)
    raise TypeError(f"not JSON serializable: {type(o).__name__}")


# ----------------------------------------------------------------------------------------- RNG
def rng_state() -> (Dict[str, torch.Tensor], dict):
    tensors = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"cuda.{i}"] = s
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    version, pystate, gauss = random.getstate()
    meta = {"numpy": [kind, keys.tolist(), int(pos), int(has_gauss), float(cached)],
            "python": [version, list(pystate), gauss]}
    return tensors, meta


def set_rng_state(tensors: Dict[str, torch.Tensor], meta: dict):
    torch.set_rng_state(tensors["torch"].cpu())
    cuda = sorted(k for k in tensors if k.startswith("cuda."))
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([tensors[k].cpu() for k in cuda][:torch.cuda.device_count()])
    kind, keys, pos, has_gauss, cached = meta["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    version, pystate, gauss = meta["python"]
    random.setstate((version, tuple(pystate), gauss))


# ----------------------------------------------------------------------------------- optimizer
def optimizer_to_flat(opt: torch.optim.Optimizer):
    sd = opt.state_dict()
    tensors, state_meta = {}, {}
    for idx, st in sd["state"].items():
        meta = {}
        for k, v in st.items():
            if torch.is_tensor(v):
                tensors[f"optim.{idx}.{k}"] = v.detach().cpu().contiguous()
            else:
                meta[k] = v
        state_meta[str(idx)] = meta
    return tensors, {"param_groups": sd["param_groups"], "state": state_meta}


def optimizer_from_flat(opt: torch.optim.Optimizer, tensors, meta):
    state = {}
    for idx, m in meta["state"].items():
        state[int(idx)] = dict(m)
    for key, t in tensors.items():
        if key.startswith("optim."):
            _, idx, k = key.split(".", 2)
            state.setdefault(int(idx), {})[k] = t
    groups = meta["param_groups"]
    for g in groups:
        if "betas" in g and isinstance(g["betas"], list):
            g["betas"] = tuple(g["betas"])
    opt.load_state_dict({"state": state, "param_groups": groups})


# ---------------------------------------------------------------------------------- save / load
def trainable_state(model: torch.nn.Module) -> Dict[str, torch.Tensor]:
    return {n: p.detach().cpu().contiguous() for n, p in model.named_parameters() if p.requires_grad}


def checkpoint_name(global_step: int, epoch_end: Optional[int] = None) -> str:
    return f"checkpoint-{global_step:08d}" + (f"-epoch{epoch_end}" if epoch_end is not None else "")


def list_checkpoints(ckpt_dir) -> List[Path]:
    """Checkpoint directories in ``ckpt_dir`` (complete or not: see :func:`verify_checkpoint`), oldest
    first."""
    ckpt_dir = Path(ckpt_dir)
    if not ckpt_dir.is_dir():
        return []
    found = []
    for p in ckpt_dir.iterdir():
        m = NAME_RE.match(p.name)
        if m and p.is_dir():
            found.append(((int(m.group(1)), 1 if m.group(2) else 0), p))
    return [p for _, p in sorted(found)]


def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def write_manifest(ckpt: Path) -> None:
    write_json_atomic(ckpt / MANIFEST, {name: {"bytes": (ckpt / name).stat().st_size, "sha256": sha256_of(ckpt / name)}
                                        for name in FILES})


def verify_checkpoint(ckpt) -> None:
    """Raise :class:`CheckpointError` naming the first file of ``ckpt`` that is missing or differs
    from the manifest in size or SHA-256."""
    ckpt = Path(ckpt)
    try:
        manifest = json.loads((ckpt / MANIFEST).read_text())
        entries = {name: (int(manifest[name]["bytes"]), str(manifest[name]["sha256"])) for name in FILES}
    except FileNotFoundError:
        raise CheckpointError(f"{ckpt / MANIFEST}: missing (the checkpoint is incomplete)") from None
    except (ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"{ckpt / MANIFEST}: unreadable ({type(e).__name__}: {e})") from None
    for name, (size, digest) in entries.items():
        path = ckpt / name
        if not path.is_file():
            raise CheckpointError(f"{path}: missing")
        actual = path.stat().st_size
        if actual != size:
            raise CheckpointError(f"{path}: {actual} bytes, the manifest says {size} (truncated or overwritten)")
        if sha256_of(path) != digest:
            raise CheckpointError(f"{path}: SHA-256 differs from the manifest (damaged)")


def newest_complete(ckpt_dir, warn) -> Optional[Path]:
    """The newest checkpoint in ``ckpt_dir`` that verifies; each damaged newer one is named through
    ``warn``. None when there is none (raises when every one found is damaged)."""
    found = list_checkpoints(ckpt_dir)
    damaged = []
    for ckpt in reversed(found):
        try:
            verify_checkpoint(ckpt)
        except CheckpointError as e:
            warn(f"skipping damaged checkpoint: {e}")
            damaged.append(ckpt.name)
            continue
        if damaged:
            warn(f"resuming from {ckpt.name}, the newest complete checkpoint")
        return ckpt
    if damaged:
        raise CheckpointError(f"{ckpt_dir}: no complete checkpoint to resume from ({', '.join(damaged)} damaged)")
    return None


def save_checkpoint(ckpt_dir, name: str, model, optimizer, scheduler, scaler, rng_per_rank: list,
                    meta: dict, keep: int) -> Path:
    """Write checkpoint ``name`` atomically and delete all but the last ``keep`` checkpoints.
    ``rng_per_rank`` is one ``rng_state()`` pair per process."""
    ckpt_dir = Path(ckpt_dir)
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    tensors = {f"model.{k}": v for k, v in trainable_state(model).items()}
    opt_tensors, opt_meta = optimizer_to_flat(optimizer)
    tensors.update(opt_tensors)
    rng_meta = []
    for r, (rt, rm) in enumerate(rng_per_rank):
        for k, v in rt.items():
            tensors[f"rng.{r}.{k}"] = v.cpu().contiguous()
        rng_meta.append(rm)
    if scaler is not None and scaler.is_enabled():
        meta = dict(meta, grad_scaler={k: (v.item() if torch.is_tensor(v) else v)
                                       for k, v in scaler.state_dict().items()})
    meta = dict(meta, optimizer=opt_meta, scheduler=scheduler.state_dict(), rng=rng_meta, format=1)
    tmp = ckpt_dir / f".tmp-{name}-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    save_file(tensors, str(tmp / "state.safetensors"))
    write_json_atomic(tmp / "state.json", meta)
    write_manifest(tmp)  # last: a checkpoint without it is incomplete
    final = ckpt_dir / name
    if final.exists():  # the same step saved again (e.g. a step checkpoint at an epoch's end)
        shutil.rmtree(final)
    os.replace(tmp, final)
    for old in list_checkpoints(ckpt_dir)[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return final


def load_checkpoint(path, model, optimizer, scheduler, scaler, rank: int = 0) -> dict:
    """Restore a checkpoint (verified by the caller) into the given objects; returns its JSON metadata
    (position, history)."""
    path = Path(path)
    with open(path / "state.json") as f:
        meta = json.load(f)
    tensors = load_file(str(path / "state.safetensors"))
    params = dict(model.named_parameters())
    missing = [n for n, p in params.items() if p.requires_grad and f"model.{n}" not in tensors]
    if missing:
        raise ValueError(f"{path}: checkpoint lacks trainable parameter(s) {missing[:5]} "
                         "(was it written for another model or method?)")
    with torch.no_grad():
        for n, p in params.items():
            if p.requires_grad:
                p.copy_(tensors[f"model.{n}"])
    optimizer_from_flat(optimizer, {k: v for k, v in tensors.items() if k.startswith("optim.")}, meta["optimizer"])
    scheduler.load_state_dict(meta["scheduler"])
    if scaler is not None and "grad_scaler" in meta:
        scaler.load_state_dict(meta["grad_scaler"])
    r = rank if rank < len(meta["rng"]) else 0
    rt = {k.split(".", 2)[2]: v for k, v in tensors.items() if k.startswith(f"rng.{r}.")}
    set_rng_state(rt, meta["rng"][r])
    return meta
