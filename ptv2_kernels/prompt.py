"""Input-only soft prompts: prompt tuning (Lester et al.) and P-Tuning v1 (Liu et al.).

:class:`PromptEncoder` produces P vectors of the backbone's embedding width that are placed in front of
the input embeddings (the prompt occupies the first P input positions, as in PEFT). Without a
reparameterization the vectors *are* the parameter ``embedding.weight`` (prompt tuning); P-Tuning v1
passes them through a prompt encoder first: a 2-layer bidirectional LSTM and a 2-layer MLP, or a
3-layer MLP. Parameter names and initialization are PEFT's (``PromptEmbedding``, ``PromptEncoder``), so
PEFT adapters load unchanged. A bank (``num_tasks=T``) holds one prompt per task; the reparameterization
is shared by the tasks, as the MLP of a prefix bank is.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
from torch import nn

from .methods.ptuning import REPARAMETERIZATIONS

__all__ = ["PromptEncoder"]


class PromptEncoder(nn.Module):
    """Trainable input prompt ``(P, H)`` (or ``(T, P, H)`` for a bank).

    Args:
        prompt_len: P, prompt positions.
        hidden_size: H, the backbone's embedding width.
        reparameterization: None (prompt tuning), ``"lstm"`` or ``"mlp"`` (P-Tuning v1).
        encoder_hidden: the LSTM/MLP width (PEFT's ``encoder_hidden_size``; default H).
        encoder_dropout: dropout between the LSTM's layers (PEFT's ``encoder_dropout``).
        num_tasks: T; when given, the encoder is a bank and ``forward`` returns ``(T, P, H)``.
    """

    def __init__(self, prompt_len: int, hidden_size: int, *, reparameterization: Optional[str] = None,
                 encoder_hidden: Optional[int] = None, encoder_dropout: float = 0.0,
                 num_tasks: Optional[int] = None):
        super().__init__()
        if prompt_len < 1 or hidden_size < 1:
            raise ValueError(f"prompt_len and hidden_size must be >= 1, got {prompt_len} and {hidden_size}")
        if reparameterization not in (None, *REPARAMETERIZATIONS):
            raise ValueError(f"reparameterization must be None or one of {REPARAMETERIZATIONS}, "
                             f"got {reparameterization!r}")
        if num_tasks is not None and num_tasks < 1:
            raise ValueError(f"num_tasks must be >= 1, got {num_tasks}")
        self.prompt_len, self.hidden_size = int(prompt_len), int(hidden_size)
        self.reparameterization = reparameterization
        self.encoder_hidden = int(encoder_hidden or hidden_size)
        self.encoder_dropout = float(encoder_dropout)
        self.num_tasks = None if num_tasks is None else int(num_tasks)
        self.embedding = nn.Embedding((self.num_tasks or 1) * self.prompt_len, self.hidden_size)
        h = self.encoder_hidden
        if reparameterization == "lstm":
            self.lstm_head = nn.LSTM(self.hidden_size, h, num_layers=2, dropout=self.encoder_dropout,
                                     bidirectional=True, batch_first=True)
            self.mlp_head = nn.Sequential(nn.Linear(2 * h, 2 * h), nn.ReLU(), nn.Linear(2 * h, self.hidden_size))
        elif reparameterization == "mlp":
            self.mlp_head = nn.Sequential(nn.Linear(self.hidden_size, h), nn.ReLU(), nn.Linear(h, h), nn.ReLU(),
                                          nn.Linear(h, self.hidden_size))

    @property
    def is_bank(self) -> bool:
        return self.num_tasks is not None

    def config_dict(self) -> dict:
        return dict(prompt_len=self.prompt_len, hidden_size=self.hidden_size,
                    reparameterization=self.reparameterization, encoder_hidden=self.encoder_hidden,
                    encoder_dropout=self.encoder_dropout, num_tasks=self.num_tasks)

    def extra_repr(self) -> str:
        return (f"prompt_len={self.prompt_len}, hidden={self.hidden_size}, "
                f"reparameterization={self.reparameterization}, tasks={self.num_tasks}")

    def forward(self) -> torch.Tensor:
        """The prompt ``(P, H)``, or ``(T, P, H)`` for a bank: computed once per model forward, never
        per batch row (PEFT runs its LSTM on one row and repeats the result, the same values)."""
        x = self.embedding.weight.view(self.num_tasks or 1, self.prompt_len, self.hidden_size)
        if self.reparameterization == "lstm":
            x = self.mlp_head(self.lstm_head(x)[0])
        elif self.reparameterization == "mlp":
            x = self.mlp_head(x)
        return x if self.is_bank else x[0]

    def rows(self, batch_size: int, prefix_index=None) -> torch.Tensor:
        """``(B, P, H)``: the prompt of each row (its task's entry for a bank)."""
        x = self()
        if not self.is_bank:
            if prefix_index is not None:
                raise ValueError("prefix_index given but the prompt encoder is not a bank")
            return x.unsqueeze(0).expand(batch_size, -1, -1)
        if prefix_index is None:
            raise ValueError("the prompt encoder is a bank: call the model with prefix_index=(B,) task ids")
        idx = torch.as_tensor(prefix_index, dtype=torch.long, device=x.device).reshape(-1)
        return x[idx.expand(batch_size) if idx.numel() == 1 else idx]

    # ------------------------------------------------------------------------------ initialization
    @torch.no_grad()
    def init_from_token_ids_(self, word_embeddings: nn.Embedding, token_ids: Sequence[int]) -> "PromptEncoder":
        """Start every task's prompt from the word embeddings of ``token_ids``, cycled or cut to P (PEFT's
        ``PromptTuningInit.TEXT``)."""
        ids = list(token_ids)
        if not ids:
            raise ValueError("token_ids must name at least one token, got none")
        ids = (ids * math.ceil(self.prompt_len / len(ids)))[: self.prompt_len]
        return self._init_from(word_embeddings, torch.tensor(ids))

    @torch.no_grad()
    def init_from_vocab_(self, word_embeddings: nn.Embedding, generator: Optional[torch.Generator] = None):
        """Start each prompt position from a uniformly drawn vocabulary entry (PEFT's ``SAMPLE_VOCAB``)."""
        ids = torch.randint(0, word_embeddings.num_embeddings, (self.prompt_len,), generator=generator)
        return self._init_from(word_embeddings, ids)

    def _init_from(self, word_embeddings, ids):
        emb = word_embeddings(ids.to(word_embeddings.weight.device)).float()
        if emb.shape[-1] != self.hidden_size:
            raise ValueError(f"word embeddings have width {emb.shape[-1]}, the prompt has {self.hidden_size}")
        self.embedding.weight.copy_(emb.repeat(self.num_tasks or 1, 1))
        return self
