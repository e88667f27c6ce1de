"""P-Tuning v2's prefix: per-layer key/value vectors, plain or reparameterized by an MLP, and banks.

Layout (the same as the authors' repository and PEFT, so their weights load unchanged): the encoder
produces one flat matrix ``(T * P, 2 * L * Hkv * D)``; row ``t * P + p`` is position ``p`` of task
``t``; its columns viewed as ``(2L, Hkv, D)`` hold layer ``l``'s key at ``2l`` and value at ``2l + 1``.
With ``layers`` (the paper's depth ablation: a prefix on some layers only) ``L`` counts the held layers
alone, in ascending order; the other layers get a zero-length prefix and run plain attention.

- plain (``projection=False``): the flat matrix *is* the parameter ``embedding.weight``.
- MLP (``projection=True``): ``embedding.weight`` ``(T * P, hidden)`` goes through
  ``trans = Linear(hidden, prefix_hidden) -> Tanh -> Linear(prefix_hidden, 2 * L * Hkv * D)``.
  With ``groups`` (Li and Liang's encoder-decoders: the encoder self-attention, the decoder
  self-attention and the cross-attention each reparameterized apart) ``trans`` holds one such MLP per
  group of consecutive layers, each producing its own layers' columns, all reading the one embedding.

:meth:`PrefixEncoder.forward` runs once per model forward (never per batch row) and returns, for each
layer, ``(K, V)`` of shape ``(Hkv, P, D)`` (or ``(T, Hkv, P, D)`` for a bank). The per-row prefix
dropout of the authors' recipe is *not* applied here: :attr:`PrefixEncoder.dropout_p` is handed to the
attention op as ``prefix_dropout_p`` (drawn inside the kernels, never materialized).
"""

from __future__ import annotations

import json
from typing import List, Optional, Sequence, Tuple

import torch
from torch import nn

__all__ = ["PrefixEncoder"]

_FORMAT = "ptv2_kernels.PrefixEncoder/1"


def check_layers(layers: Optional[Sequence[int]], num_layers: int) -> Tuple[int, ...]:
    """``layers`` as a tuple of distinct ascending indices below ``num_layers`` (None: all of them)."""
    if layers is None:
        return tuple(range(num_layers))
    out = tuple(int(i) for i in layers)
    if not out or list(out) != sorted(set(out)) or out[0] < 0 or out[-1] >= num_layers:
        raise ValueError(f"layers must be distinct ascending layer indices in [0, {num_layers}), got {list(layers)}")
    return out


class PrefixEncoder(nn.Module):
    """Trainable prefix keys/values for every layer of a frozen backbone.

    Args:
        num_layers: the model's attention layers.
        num_kv_heads: Hkv, key/value heads per layer (grouped-query models: fewer than query heads).
        head_dim: D.
        prefix_len: P, prefix positions.
        projection: use the MLP reparameterization (P-Tuning v2's ``prefix_projection``).
        prefix_hidden: width of the MLP's hidden layer (authors' default 512).
        hidden_size: width of the embedding the MLP reads (default ``Hkv * D``, the authors' choice
            of the backbone's hidden size); only with ``projection``.
        num_tasks: T; when given, the encoder is a bank and each layer gets ``(T, Hkv, P, D)``.
        prefix_dropout: dropout on the prefix K/V drawn per batch row, applied by the kernel
            (``prefix_dropout_p``) while the encoder is in train mode.
        init_std: standard deviation of the normal init of ``embedding.weight``; the default 1.0 is
            ``nn.Embedding``'s own init, what the authors' code and PEFT use.
        layers: the 0-based indices of the layers that hold a prefix, ascending (None: every layer).
        groups: with ``projection``, the numbers of consecutive layers that each get an MLP of their own
            (summing to ``num_layers``; a group without a held layer gets none); None: one MLP.
    """

    def __init__(self, num_layers: int, num_kv_heads: int, head_dim: int, prefix_len: int, *,
                 projection: bool = False, prefix_hidden: int = 512, hidden_size: Optional[int] = None,
                 num_tasks: Optional[int] = None, prefix_dropout: float = 0.0, init_std: float = 1.0,
                 layers: Optional[Sequence[int]] = None, groups: Optional[Sequence[int]] = None):
        super().__init__()
        if min(num_layers, num_kv_heads, head_dim) < 1 or prefix_len < 0:
            raise ValueError("num_layers, num_kv_heads, head_dim must be >= 1 and prefix_len >= 0")
        if num_tasks is not None and num_tasks < 1:
            raise ValueError(f"num_tasks must be >= 1, got {num_tasks}")
        if not 0.0 <= prefix_dropout < 1.0:
            raise ValueError(f"prefix_dropout must be in [0, 1), got {prefix_dropout}")
        self.num_layers = int(num_layers)
        self.layers = check_layers(layers, self.num_layers)
        self.num_kv_heads = int(num_kv_heads)
        self.head_dim = int(head_dim)
        self.prefix_len = int(prefix_len)
        self.projection = bool(projection)
        self.prefix_hidden = int(prefix_hidden)
        self.hidden_size = int(hidden_size) if hidden_size is not None else self.num_kv_heads * self.head_dim
        self.num_tasks = None if num_tasks is None else int(num_tasks)
        self.dropout_p = float(prefix_dropout)
        self.init_std = float(init_std)
        if groups is not None and (not self.projection or sum(groups) != self.num_layers or min(groups) < 1):
            raise ValueError(f"groups must be positive layer counts summing to num_layers ({self.num_layers}), "
                             f"with projection=True; got {list(groups)} with projection={self.projection}")
        self.groups = None if groups is None else tuple(int(g) for g in groups)
        rows = (self.num_tasks or 1) * self.prefix_len
        if self.projection:
            self.embedding = nn.Embedding(rows, self.hidden_size)
            mlp = lambda held: nn.Sequential(  # noqa: E731
                nn.Linear(self.hidden_size, self.prefix_hidden), nn.Tanh(),
                nn.Linear(self.prefix_hidden, 2 * held * self.num_kv_heads * self.head_dim))
            if self.groups is None:
                self.trans = mlp(len(self.layers))
            else:
                self.trans = nn.ModuleList(mlp(n) for n in self._held_per_group() if n)
        else:
            self.embedding = nn.Embedding(rows, self.out_features)
            self.trans = None
        with torch.no_grad():
            self.embedding.weight.normal_(0.0, self.init_std)

    # ------------------------------------------------------------------------------------------
    def _held_per_group(self) -> List[int]:
        """How many held layers each group has."""
        bounds = [0]
        for g in self.groups:
            bounds.append(bounds[-1] + g)
        return [sum(lo <= i < hi for i in self.layers) for lo, hi in zip(bounds, bounds[1:])]

    @property
    def out_features(self) -> int:
        return 2 * len(self.layers) * self.num_kv_heads * self.head_dim

    @property
    def all_layers(self) -> bool:
        return len(self.layers) == self.num_layers

    @property
    def is_bank(self) -> bool:
        return self.num_tasks is not None

    def config_dict(self) -> dict:
        return dict(num_layers=self.num_layers, num_kv_heads=self.num_kv_heads, head_dim=self.head_dim,
                    prefix_len=self.prefix_len, projection=self.projection,
                    prefix_hidden=self.prefix_hidden, hidden_size=self.hidden_size,
                    num_tasks=self.num_tasks, prefix_dropout=self.dropout_p, init_std=self.init_std,
                    layers=None if self.all_layers else list(self.layers),
                    groups=None if self.groups is None else list(self.groups))

    @classmethod
    def for_model(cls, model, prefix_len: int, **kwargs) -> "PrefixEncoder":
        """An encoder sized for a transformers model (its layers, kv heads, head dim, hidden size); an
        encoder-decoder's MLP is one per attention kind (``groups``), as Li and Liang's."""
        from .hf.arch import model_dims

        dims = model_dims(model)
        kwargs.setdefault("hidden_size", dims["hidden_size"])
        if kwargs.get("projection") and dims["stacks"]:
            kwargs.setdefault("groups", dims["stacks"])  # Li and Liang's MLP per attention kind
        return cls(dims["num_layers"], dims["num_kv_heads"], dims["head_dim"], prefix_len, **kwargs)

    def extra_repr(self) -> str:
        return (f"layers={self.num_layers}, kv_heads={self.num_kv_heads}, head_dim={self.head_dim}, "
                f"prefix_len={self.prefix_len}, projection={self.projection}, tasks={self.num_tasks}, "
                f"prefix_dropout={self.dropout_p}" + ("" if self.all_layers else f", layers={list(self.layers)}"))

    # ------------------------------------------------------------------------------------------
    def flat(self) -> torch.Tensor:
        """The flat prefix ``(T * P, 2 * L * Hkv * D)`` (computed by the MLP when projecting)."""
        x = self.embedding.weight
        if isinstance(self.trans, nn.ModuleList):  # each group's layers from its own MLP, in layer order
            return torch.cat([mlp(x) for mlp in self.trans], dim=1)
        return x if self.trans is None else self.trans(x)

    def forward(self) -> List[Tuple[torch.Tensor, torch.Tensor]]:
        """Per layer of the model ``(K, V)``: ``(Hkv, P, D)``, or ``(T, Hkv, P, D)`` for a bank; a layer
        without a prefix gets a zero-length ``(Hkv, 0, D)``. Computed once per model forward."""
        T = self.num_tasks or 1
        x = self.flat().view(T, self.prefix_len, 2 * len(self.layers), self.num_kv_heads, self.head_dim)
        # (2L, T, Hkv, P, D): one copy of the (small) prefix, contiguous per layer.
        x = x.permute(2, 0, 3, 1, 4).contiguous()
        if not self.is_bank:
            x = x[:, 0]
        held = {layer: (x[2 * i], x[2 * i + 1]) for i, layer in enumerate(self.layers)}
        if len(held) < self.num_layers:
            empty = x.new_empty(self.num_kv_heads, 0, self.head_dim)
            return [held.get(i, (empty, empty)) for i in range(self.num_layers)]
        return [held[i] for i in range(self.num_layers)]

    @property
    def prefix_dropout_p(self) -> float:
        """What the op gets as ``prefix_dropout_p``: the dropout in train mode, 0 in eval mode."""
        return self.dropout_p if self.training else 0.0

    # ------------------------------------------------------------------------------------------
    @torch.no_grad()
    def export(self) -> "PrefixEncoder":
        """A plain encoder holding this one's current prefix (drops the MLP after training)."""
        cfg = self.config_dict()
        cfg.update(projection=False, hidden_size=None, groups=None)
        out = PrefixEncoder(**cfg)
        out.embedding.weight.copy_(self.flat().detach().to(out.embedding.weight.dtype))
        out.to(self.embedding.weight.device)
        out.train(self.training)
        return out

    @classmethod
    @torch.no_grad()
    def stack(cls, encoders: Sequence["PrefixEncoder"]) -> "PrefixEncoder":
        """A plain bank of every task of ``encoders`` in order (same L, Hkv, D, P): a single-task
        encoder adds one entry, a bank all of its entries."""
        if not encoders:
            raise ValueError("stack needs at least one encoder")
        first = encoders[0]
        key = lambda e: (e.num_layers, e.num_kv_heads, e.head_dim, e.prefix_len, e.layers)  # noqa: E731
        for e in encoders:
            if key(e) != key(first):
                raise ValueError(f"encoders differ in (layers, kv heads, head dim, prefix len, prefix layers): "
                                 f"{key(e)} vs {key(first)}")
        out = cls(first.num_layers, first.num_kv_heads, first.head_dim, first.prefix_len,
                  num_tasks=sum(e.num_tasks or 1 for e in encoders), prefix_dropout=first.dropout_p,
                  layers=first.layers)
        out.embedding.weight.copy_(torch.cat([e.flat().detach().float() for e in encoders], dim=0))
        return out.to(first.embedding.weight.device)

    @torch.no_grad()
    def load_prefix_(self, keys: Sequence[torch.Tensor], values: Sequence[torch.Tensor]) -> "PrefixEncoder":
        """Set a plain encoder's prefix from per-layer K/V tensors ``(Hkv, P, D)`` (or banks), one per
        layer of the model (those of layers without a prefix are not read) or one per held layer."""
        if self.projection:
            raise ValueError("load_prefix_ sets a plain prefix; export() the MLP encoder first")
        if len(keys) == self.num_layers and not self.all_layers:
            keys, values = [keys[i] for i in self.layers], [values[i] for i in self.layers]
        T = self.num_tasks or 1
        k = torch.stack([t.reshape(T, self.num_kv_heads, self.prefix_len, self.head_dim) for t in keys])
        v = torch.stack([t.reshape(T, self.num_kv_heads, self.prefix_len, self.head_dim) for t in values])
        x = torch.stack([k, v], dim=1).flatten(0, 1)  # (2L, T, Hkv, P, D), key of layer l at 2l
        self.embedding.weight.copy_(x.permute(1, 3, 0, 2, 4).reshape(T * self.prefix_len, -1))
        return self

    @torch.no_grad()
    def init_from_tokens_(self, model, input_ids: torch.Tensor, **forward_kwargs) -> "PrefixEncoder":
        """Initialize a plain prefix from real activations: the frozen ``model``'s own keys/values
        of ``input_ids`` (one sequence of length P; a bank copies it to every task)."""
        from .hf.capture import capture_key_values

        ids = torch.as_tensor(input_ids).reshape(1, -1)
        if ids.shape[1] != self.prefix_len:
            raise ValueError(f"need exactly prefix_len={self.prefix_len} tokens, got {ids.shape[1]}")
        keys, values = capture_key_values(model, ids, **forward_kwargs)
        T = self.num_tasks or 1
        expand = lambda t: t[0].unsqueeze(0).expand(T, -1, -1, -1) if self.is_bank else t[0]  # noqa: E731
        return self.load_prefix_([expand(k) for k in keys], [expand(v) for v in values])

    @torch.no_grad()
    def init_from_embeddings_(self, model, input_ids: torch.Tensor) -> "PrefixEncoder":
        """MLP encoders: start ``embedding.weight`` from the backbone's word embeddings of
        ``input_ids`` (P token ids; a bank copies them to every task)."""
        if not self.projection:
            raise ValueError("init_from_embeddings_ is for the MLP encoder (projection=True); "
                             "use init_from_tokens_ for a plain prefix")
        ids = torch.as_tensor(input_ids).reshape(-1)
        if ids.numel() != self.prefix_len:
            raise ValueError(f"need exactly prefix_len={self.prefix_len} tokens, got {ids.numel()}")
        table = model.get_input_embeddings()
        emb = table(ids.to(table.weight.device))
        if emb.shape[-1] != self.hidden_size:
            raise ValueError(f"word embeddings have width {emb.shape[-1]}, the encoder reads {self.hidden_size}")
        self.embedding.weight.copy_(emb.repeat(self.num_tasks or 1, 1).to(self.embedding.weight))
        return self

    # ------------------------------------------------------------------------------------------
    def save(self, path: str) -> None:
        """Write the weights and the configuration to one safetensors file."""
        from safetensors.torch import save_file

        tensors = {k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}
        save_file(tensors, str(path), metadata={"format": _FORMAT, "config": json.dumps(self.config_dict())})

    @classmethod
    def load(cls, path: str, map_location="cpu") -> "PrefixEncoder":
        from safetensors import safe_open
        from safetensors.torch import load_file

        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
        if meta.get("format") != _FORMAT:
            raise ValueError(f"{path} is not a PrefixEncoder file (format {meta.get('format')!r})")
        enc = cls(**json.loads(meta["config"]))
        enc.load_state_dict(load_file(str(path), device=str(map_location)))
        return enc

    @classmethod
    def from_state_dict(cls, state_dict: dict, num_layers: int, num_kv_heads: int, head_dim: int, *,
                        prefix: str = "prefix_encoder.", **kwargs) -> "PrefixEncoder":
        """Build from the authors' (THUDM/P-tuning-v2) or PEFT's prefix encoder state dict.

        Recognized names (after ``prefix``): ``embedding.weight`` and, with the MLP,
        ``trans.{0,2}.{weight,bias}`` (authors) or ``transform.{0,2}.{weight,bias}`` (PEFT).
        """
        sd = {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}
        if "embedding.weight" not in sd:
            raise KeyError(f"no {prefix}embedding.weight in the state dict")
        sd = {k.replace("transform.", "trans."): v for k, v in sd.items()}
        emb = sd["embedding.weight"]
        projection = "trans.0.weight" in sd
        if projection:
            kwargs.setdefault("prefix_hidden", sd["trans.0.weight"].shape[0])
            kwargs.setdefault("hidden_size", emb.shape[1])
        rows = emb.shape[0]
        enc = cls(num_layers, num_kv_heads, head_dim, rows // (kwargs.get("num_tasks") or 1),
                  projection=projection, **kwargs)
        missing, unexpected = enc.load_state_dict(sd, strict=False)
        if missing or unexpected:
            raise KeyError(f"prefix encoder state dict mismatch: missing {missing}, unexpected {unexpected}")
        return enc

