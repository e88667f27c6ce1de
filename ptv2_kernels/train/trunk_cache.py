"""``--trunk-cache``: the frozen trunk's output (the hidden states entering the first layer with a prefix)
computed once per feature and replayed every epoch, for the training and dev sets.

The cache is filled before the first epoch in batches of like length, in a fixed order, so a resumed
run rebuilds exactly the values the interrupted one used. It lives in memory, or in a file of the run
folder read back row by row (``disk``: ``pread``, so the kernel's page cache holds it, reclaimable, and
the process's resident set does not; memory-mapped pages would count there); a file is keyed by what determines it (the features'
token ids, which carry the tokenizer, the maximum length and the data; the trunk's weights; the
first prefix layer; the storage dtype) and verified by size and SHA-256, so a stale, truncated or
damaged file is named and rebuilt, never used.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch

from .checkpoint import sha256_of
from .config import nearest_existing


def cache_bytes(features, hidden: int, dtype: torch.dtype) -> int:
    """What caching ``features`` takes: every real token's hidden state."""
    return sum(features.length(i) for i in range(len(features))) * hidden * dtype.itemsize


def choose_mode(mode: str, need: int, folder: Path, budget: Optional[int]) -> tuple:
    """``(mode, why)``: ``auto`` picks memory when ``need`` fits the budget (a quarter of the available
    memory unless given), else disk when it fits half the free disk; a mode that does not fit is off."""
    memory = budget if budget is not None else _available_memory() // 4
    disk = budget if budget is not None else shutil.disk_usage(nearest_existing(folder) or Path(".")).free // 2
    fits = {"memory": need <= memory, "disk": need <= disk}
    if mode == "auto":
        mode = "memory" if fits["memory"] else "disk"
    if mode in fits and not fits[mode]:
        room = memory if mode == "memory" else disk
        return "off", f"{_mb(need)} does not fit the {mode} budget of {_mb(room)}: the trunk runs live, without autograd"
    return mode, ""


class FileRows:
    """Rows of ``hidden`` values of ``dtype`` in the file ``fd``, sliced as a ``(rows, hidden)`` tensor is:
    ``rows[a:b]`` reads them, ``rows[a:b] = tensor`` writes them."""

    def __init__(self, fd: int, rows: int, hidden: int, dtype: torch.dtype):
        self.fd, self.shape, self.dtype = fd, (rows, hidden), dtype
        self.row_bytes = hidden * dtype.itemsize

    def __getitem__(self, rows: slice) -> torch.Tensor:
        buf = bytearray((rows.stop - rows.start) * self.row_bytes)
        if os.preadv(self.fd, [buf], rows.start * self.row_bytes) != len(buf):
            raise OSError(f"trunk cache file ended before row {rows.stop} (was it truncated while the run read it?)")
        return torch.frombuffer(buf, dtype=self.dtype).view(-1, self.shape[1])

    def __setitem__(self, rows: slice, value: torch.Tensor) -> None:
        data = value.to(self.dtype).contiguous().view(torch.uint8).numpy()
        os.pwrite(self.fd, data, rows.start * self.row_bytes)

    def __del__(self):
        os.close(self.fd)


class TrunkCache:
    """One split's trunk outputs: ``flat`` ``(tokens, H)`` (a tensor, or :class:`FileRows`) with feature
    ``i``'s rows at ``offsets[i]:offsets[i] + lengths[i]``."""

    def __init__(self, flat, lengths: Sequence[int], dtype: torch.dtype):
        self.flat, self.lengths, self.dtype = flat, list(lengths), dtype
        self.offsets = [0]
        for n in self.lengths[:-1]:
            self.offsets.append(self.offsets[-1] + n)

    def batch(self, indices: Sequence[int], device) -> torch.Tensor:
        """``(B, N, H)`` for the features ``indices``, right-padded with zeros as their batch is."""
        N = max(self.lengths[i] for i in indices)
        out = torch.zeros(len(indices), N, self.flat.shape[1], dtype=self.dtype)
        for row, i in enumerate(indices):
            out[row, :self.lengths[i]] = self.flat[self.offsets[i]:self.offsets[i] + self.lengths[i]]
        return out.to(device, non_blocking=True)

    # ------------------------------------------------------------------------------------ building
    @classmethod
    def build(cls, model, features, pad_id: int, batch_size: int, device, storage: torch.dtype,
              path: Optional[Path] = None, say: Callable[[str], None] = print,
              autocast=contextlib.nullcontext) -> "TrunkCache":
        """Fill the cache (reading a valid file at ``path`` instead, when there is one)."""
        lengths = [features.length(i) for i in range(len(features))]
        hidden = model.hidden_size
        key = None if path is None else cache_key(model, features, storage)  # a file outlives the run
        if path is not None:
            found = _read(path, key, sum(lengths), hidden, storage, say)
            if found is not None:
                return cls(found, lengths, model_dtype(model))
        flat = (torch.empty(sum(lengths), hidden, dtype=storage) if path is None
                else _new_file(path, sum(lengths), hidden, storage))
        cache = cls(flat, lengths, model_dtype(model))
        order = sorted(range(len(features)), key=lambda i: lengths[i])  # like lengths: little padding
        was = model.training
        model.eval()
        try:
            for start in range(0, len(order), batch_size):
                chunk = order[start:start + batch_size]
                b = {k: v.to(device) for k, v in features.batch(chunk, pad_id).items()
                     if k in ("input_ids", "attention_mask", "token_type_ids")}
                with autocast():  # the precision the live trunk would run in
                    h = model.trunk_hidden_states(**b).to("cpu", storage)
                for row, i in enumerate(chunk):
                    flat[cache.offsets[i]:cache.offsets[i] + lengths[i]] = h[row, :lengths[i]]
        finally:
            model.train(was)
        if path is not None:
            _seal(path, flat, key)
        return cache


def model_dtype(model) -> torch.dtype:
    return next(model.backbone.parameters()).dtype


def cache_key(model, features, storage: torch.dtype) -> str:
    """SHA-256 of what determines the cache: the features' inputs, the trunk's weights, where it ends."""
    h = hashlib.sha256(f"{model.trunk.first}|{storage}|{model.model_type}".encode())
    for name in ("input_ids", "token_type_ids"):
        for row in features.columns.get(name, []):
            h.update(torch.tensor(row, dtype=torch.int32).numpy().tobytes())
    upper = {id(p) for layer in model.trunk.layers[model.trunk.first:] for p in layer.parameters()}
    for name, p in model.backbone.named_parameters():
        if id(p) not in upper:
            h.update(name.encode())
            h.update(p.detach().float().cpu().numpy().tobytes())
    return h.hexdigest()


# ---------------------------------------------------------------------------------------- files
def _manifest(path: Path) -> Path:
    return path.with_suffix(".json")


def _new_file(path: Path, rows: int, hidden: int, dtype: torch.dtype) -> FileRows:
    """An empty cache file beside ``path`` (renamed to it once whole, by :func:`_seal`)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.unlink(missing_ok=True)
    fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
    os.ftruncate(fd, rows * hidden * dtype.itemsize)
    return FileRows(fd, rows, hidden, dtype)


def _seal(path: Path, flat: FileRows, key: str) -> None:
    """Write the manifest last, after the data is on disk; both replace older files atomically."""
    os.fsync(flat.fd)
    os.replace(path.with_name(path.name + ".tmp"), path)  # the open file descriptor follows the file
    manifest = {"key": key, "dtype": str(flat.dtype).replace("torch.", ""), "numel": flat.shape[0] * flat.shape[1],
                "bytes": path.stat().st_size, "sha256": sha256_of(path)}
    tmp_m = _manifest(path).with_name(_manifest(path).name + ".tmp")
    tmp_m.write_text(json.dumps(manifest, indent=1))
    os.replace(tmp_m, _manifest(path))


def _read(path: Path, key: str, rows: int, hidden: int, dtype: torch.dtype, say) -> Optional[FileRows]:
    """The cache file at ``path`` when its manifest's key is ``key`` and the file is whole; otherwise None,
    after saying why it is rebuilt."""
    try:
        manifest = json.loads(_manifest(path).read_text())
    except (OSError, ValueError):
        return None
    why = None
    want = rows * hidden * dtype.itemsize
    if manifest.get("key") != key:
        why = "is stale (its model, data, max length, first prefix layer or dtype changed)"
    elif not path.is_file() or path.stat().st_size != want:
        have = path.stat().st_size if path.is_file() else 0
        why = f"is truncated ({have:,} of {want:,} bytes)"
    elif sha256_of(path) != manifest.get("sha256"):
        why = "is damaged (its SHA-256 differs from its manifest's)"
    if why is not None:
        say(f"trunk cache {path} {why}: rebuilding it")
        return None
    return FileRows(os.open(path, os.O_RDONLY), rows, hidden, dtype)


def _available_memory() -> int:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def _mb(n: int) -> str:
    return f"{n / 2**20:,.1f} MB"
