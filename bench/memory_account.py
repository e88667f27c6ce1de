"""What autograd keeps for backward, tensor by tensor and layer by layer (CPU-runnable).

``account(fn, model=None)`` runs ``fn()`` under ``torch.autograd.graph.saved_tensors_hooks`` and
records every tensor saved for backward: its shape, dtype and the bytes of the storage it keeps
alive. Storages are counted once (the first layer that saves one owns it), and parameters are not
activations: a saved weight is listed but not counted. With ``model``, a forward pre-hook on each
transformer layer attributes what is saved to ``layer{i}`` ("embeddings" before the first layer,
"head" after the last).

``flag_prefix_copies(records, B, N, P)`` finds what prefix tuning should never keep: a
``[prefix; tokens]`` concatenation (a dim of size ``P + N``) or a per-row copy of the prefix (a
tensor with a batch dim B and a prefix dim P and at least ``B * P * D`` elements). Choose B, N, P so
that ``P``, ``N``, ``P + N`` and ``B`` differ from every model dimension.

``python bench/memory_account.py`` prints the account for a MiniLM-shaped BERT (ptv2, PEFT, the
authors' formulation, full fine-tuning).
"""

from __future__ import annotations

import sys
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import torch

REPO = Path(__file__).resolve().parents[1]
for p in (str(REPO), str(REPO / "bench")):
    if p not in sys.path:
        sys.path.insert(0, p)


@dataclass
class Saved:
    layer: str
    shape: tuple
    dtype: str
    nbytes: int  # bytes this record adds (0 when its storage was already counted, or a parameter)
    storage_bytes: int
    is_param: bool


@dataclass
class Account:
    records: list = field(default_factory=list)

    @property
    def total_bytes(self) -> int:
        return sum(r.nbytes for r in self.records)

    def per_layer(self) -> "OrderedDict[str, int]":
        out: OrderedDict = OrderedDict()
        for r in self.records:
            out[r.layer] = out.get(r.layer, 0) + r.nbytes
        return out

    def layer_bytes(self, prefix: str = "layer") -> list:
        return [b for name, b in self.per_layer().items() if name.startswith(prefix)]

    def table(self, limit: Optional[int] = None) -> str:
        lines = [f"{'layer':>10s} {'bytes':>10s} {'storage':>10s} {'dtype':>9s}  shape"]
        for r in self.records[:limit]:
            tag = " (parameter or input)" if r.is_param else ("" if r.nbytes else " (storage already counted)")
            lines.append(f"{r.layer:>10s} {r.nbytes:>10d} {r.storage_bytes:>10d} {r.dtype:>9s}  "
                         f"{tuple(r.shape)}{tag}")
        return "\n".join(lines)


def _layers(model) -> Optional[torch.nn.ModuleList]:
    """The model's list of transformer layers: the longest ModuleList of identical blocks."""
    best = None
    for m in model.modules():
        if isinstance(m, torch.nn.ModuleList) and len(m) and len({type(x) for x in m}) == 1:
            if best is None or len(m) > len(best):
                best = m
    return best


def _storage(t: torch.Tensor):
    try:
        s = t.untyped_storage()
        return (s.data_ptr(), t.device.type), s.nbytes()
    except Exception:  # tensors without a plain storage (subclasses): count their own bytes
        return (id(t), t.device.type), t.numel() * t.element_size()


def account(fn: Callable, model: Optional[torch.nn.Module] = None, exclude=()) -> tuple:
    """Run ``fn()`` recording what autograd saves; returns ``(fn's result, Account)``. Storages of
    ``model``'s parameters and of the tensors in ``exclude`` are listed but not counted."""
    acc = Account()
    where = {"layer": "embeddings"}
    seen = set()
    params = {_storage(t)[0] for t in exclude}
    handles = []
    if model is not None:
        for p in model.parameters():
            params.add(_storage(p)[0])
        layers = _layers(model)
        if layers is not None:
            for i, layer in enumerate(layers):
                handles.append(layer.register_forward_pre_hook(
                    lambda mod, args, i=i: where.__setitem__("layer", f"layer{i}")))
            handles.append(layers[len(layers) - 1].register_forward_hook(
                lambda mod, args, out: where.__setitem__("layer", "head")))

    def pack(t):
        key, nbytes = _storage(t)
        is_param = key in params or isinstance(t, torch.nn.Parameter)
        new = not is_param and key not in seen
        if new:
            seen.add(key)
        acc.records.append(Saved(where["layer"], tuple(t.shape), str(t.dtype).replace("torch.", ""),
                                 nbytes if new else 0, nbytes, is_param))
        return t

    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            result = fn()
    finally:
        for h in handles:
            h.remove()
    return result, acc


def is_probabilities(r: Saved, N: int, P: int) -> bool:
    """Attention probabilities (..., N queries, keys) over [prefix; tokens] or over the prefix keys
    alone: what a materialized softmax keeps for backward (SDPA's math path, and ptv2's CPU path with
    attention dropout), not a copy of the prefix."""
    return len(r.shape) >= 2 and r.shape[-2] == N and r.shape[-1] in (P, P + N)


def flag_prefix_copies(acc: Account, B: int, N: int, P: int, D: int) -> list:
    """Saved tensors that hold the prefix per row or a [prefix; tokens] concatenation of keys or
    values (attention probabilities over those keys are neither)."""
    flagged = []
    for r in acc.records:
        if r.is_param or is_probabilities(r, N, P):
            continue
        shape = list(r.shape)
        numel = 1
        for s in shape:
            numel *= s
        concat = (P + N) in shape
        per_row = B in shape and P in shape and shape.index(B) != shape.index(P) and numel >= B * P * D
        if concat or per_row:
            flagged.append((r, "[prefix; tokens] concatenation" if concat else "per-row prefix copy"))
    return flagged


# --------------------------------------------------------------------------------------------------
# the model account: a MiniLM-shaped BERT, one training forward per method


def minilm_config(max_positions: int = 512):
    """all-MiniLM-L6-v2's architecture (BERT, 6 layers, hidden 384, 12 heads, head dim 32)."""
    from transformers import BertConfig

    return BertConfig(vocab_size=30522, hidden_size=384, num_hidden_layers=6, num_attention_heads=12,
                      intermediate_size=1536, max_position_embeddings=max(512, max_positions), num_labels=2)


def model_account(method: str, B: int = 3, N: int = 23, P: int = 11, config=None, seed: int = 0,
                  backend: Optional[str] = None) -> Account:
    """Saved-for-backward account of one training forward of ``method`` (see bench/train_methods.py)."""
    import train_methods as M

    torch.manual_seed(seed)
    config = config if config is not None else minilm_config()
    model = M.build_backbone(config, "cpu")
    model.train()
    m = M.setup_method(method, model, P, backend=backend)
    batch = M.make_batch(config, B, N, "cpu", seed=seed, padding=0.3)
    root = m.model.get_base_model() if method == "peft" else m.model
    out, acc = account(lambda: m.loss(batch), root)
    out.backward()  # the graph is complete and usable
    return acc


def op_account(B=3, Hq=4, Hkv=2, N=23, P=11, D=16, causal=False, mask=True, backend="torch",
               reference=False) -> Account:
    """Saved-for-backward account of the op alone (or the reference formulation), every input trainable."""
    from ptv2_kernels import prefix_attention, prefix_attention_reference

    g = torch.Generator().manual_seed(0)
    q = torch.randn(B, Hq, N, D, generator=g, requires_grad=True)
    k = torch.randn(B, Hkv, N, D, generator=g, requires_grad=True)
    v = torch.randn(B, Hkv, N, D, generator=g, requires_grad=True)
    pk = torch.randn(Hkv, P, D, generator=g, requires_grad=True)
    pv = torch.randn(Hkv, P, D, generator=g, requires_grad=True)
    kpm = None
    if mask:
        kpm = torch.ones(B, N, dtype=torch.bool)
        kpm[1:, N // 2:] = False
    if reference:
        fn = lambda: prefix_attention_reference(q, k, v, pk, pv, kpm, causal=causal)  # noqa: E731
    else:
        fn = lambda: prefix_attention(q, k, v, pk, pv, kpm, causal=causal, backend=backend)  # noqa: E731
    # The inputs are leaves the caller owns (not counted): what matters is what is kept beyond them.
    out, acc = account(fn, exclude=(q, k, v, pk, pv))
    out.sum().backward()
    return acc


def summary(B: int = 3, N: int = 23, P: int = 11) -> str:
    lines = [f"Saved for backward per layer, MiniLM-shaped BERT (random weights), B={B} N={N} P={P}, "
             f"train mode, fp32, CPU"]
    accs = {m: model_account(m, B, N, P) for m in ("ptv2", "peft", "reference", "finetune")}
    layers = list(accs["ptv2"].per_layer())
    for m in accs:
        for name in accs[m].per_layer():
            if name not in layers:
                layers.append(name)
    lines.append(f"{'layer':>10s} " + " ".join(f"{m:>12s}" for m in accs))
    for name in layers:
        lines.append(f"{name:>10s} " + " ".join(f"{accs[m].per_layer().get(name, 0):>12d}" for m in accs))
    lines.append(f"{'total':>10s} " + " ".join(f"{accs[m].total_bytes:>12d}" for m in accs))
    for m, acc in accs.items():
        flagged = flag_prefix_copies(acc, B, N, P, 32)
        kinds = sorted({why for _, why in flagged})
        lines.append(f"{m}: {len(flagged)} saved tensors hold the prefix per row or [prefix; tokens]"
                     + (f" ({', '.join(kinds)})" if kinds else ""))
    return "\n".join(lines)


if __name__ == "__main__":
    print(summary())
