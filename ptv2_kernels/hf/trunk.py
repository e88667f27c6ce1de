"""The frozen trunk: the embeddings and the layers below the first layer that holds a prompt.

With prompts on layers k..L only (``prefix_layers``), nothing below layer k depends on what trains, so
the trunk's output for an example is a fixed function of its tokens. :class:`Trunk` makes a backbone
run its trunk without autograd (nothing kept for backward; backward stops at layer k) and in eval mode
(no dropout there: deterministic, so the output can be cached), and can *replay* it: given the hidden
states entering layer k, the trunk's layers are skipped for that forward. What lies above layer k runs
as it always does (train mode, autograd, the prefix op).
"""

from __future__ import annotations

import contextlib
from typing import List, Optional

import torch
from torch import nn

from .arch import attention_modules, base_model

__all__ = ["Trunk", "transformer_layers"]


def transformer_layers(model: nn.Module) -> List[nn.Module]:
    """The model's transformer layers (the modules transformers checkpoints, each holding one attention
    module), in order."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    layers = []
    for attn in attention_modules(model):
        layer = next((m for m in base_model(model).modules() if isinstance(m, GradientCheckpointingLayer)
                      and any(x is attn for x in m.modules())), None)
        if layer is None:
            raise ValueError(f"{type(model).__name__}: found no transformer layer around {type(attn).__name__}")
        layers.append(layer)
    return layers


class _TrunkDone(Exception):
    """Stops a capture-only forward at the first layer above the trunk."""


class Trunk:
    """The layers of ``backbone`` below ``first`` (0-based) and its embeddings.

    - :meth:`set_train_mode` after ``backbone.train(mode)``: the trunk stays in eval mode.
    - Forwards run inside :meth:`running`: the trunk without autograd, ``replay`` (``(B, N, H)``, the
      hidden states entering layer ``first``, rows right-padded as the batch) skipping its layers.
    - :meth:`capture` returns the trunk's output for a batch without running the layers above it.
    """

    def __init__(self, backbone: nn.Module, first: int):
        self.layers = transformer_layers(backbone)
        if not 0 < first < len(self.layers):
            raise ValueError(f"a trunk needs its first trained layer in [1, {len(self.layers)}), got {first}")
        self.backbone, self.first = backbone, first
        self.upper = [m for layer in self.layers[first:] for m in layer.modules()]
        self._grad = None  # the caller's grad mode while the trunk runs without it
        self._capturing = False
        self.captured: Optional[torch.Tensor] = None
        # after the patch's own pre-hook on the backbone, which computes the prefix (with autograd)
        self._handles = [backbone.register_forward_pre_hook(self._enter_trunk),
                         self.layers[first].register_forward_pre_hook(self._leave_trunk, with_kwargs=True)]

    def remove(self):
        for h in self._handles:
            h.remove()

    def set_train_mode(self, mode: bool) -> None:
        """The backbone in ``mode`` except the trunk (eval: no dropout below the first trained layer)."""
        upper = {id(m) for m in self.upper}
        for m in self.backbone.modules():
            if id(m) not in upper and m is not self.backbone:
                m.training = False
        self.backbone.training = mode

    @contextlib.contextmanager
    def running(self, replay: Optional[torch.Tensor] = None):
        """One backbone forward with the trunk run without autograd, or replayed from ``replay``."""
        self._grad = torch.is_grad_enabled()
        overrides = self._replay(replay) if replay is not None else []
        try:
            yield
        finally:
            for layer in overrides:
                layer.__dict__.pop("forward", None)
            torch.set_grad_enabled(self._grad)
            self._grad = None

    def _replay(self, hidden: torch.Tensor) -> list:
        """Skip the trunk's layers: the first returns ``hidden``, the others pass it on."""
        trunk = self.layers[:self.first]
        trunk[0].forward = lambda *args, **kwargs: hidden
        for layer in trunk[1:]:
            layer.forward = lambda hidden_states, *args, **kwargs: hidden_states
        return trunk

    def _enter_trunk(self, module, args):
        if self._grad is not None:
            torch.set_grad_enabled(False)

    def _leave_trunk(self, module, args, kwargs):
        """At the first layer above the trunk: record its input when capturing, give autograd back."""
        hidden = args[0] if args else kwargs["hidden_states"]
        if self._capturing:
            self.captured = hidden
            raise _TrunkDone
        if self._grad is not None:
            torch.set_grad_enabled(self._grad)
        return None

    @torch.no_grad()
    def capture(self, **backbone_kwargs) -> torch.Tensor:
        """The hidden states entering layer ``first`` ``(B, N, H)``, without running what lies above."""
        self._capturing = True
        try:
            with self.running():
                self.backbone(**backbone_kwargs)
        except _TrunkDone:
            pass
        finally:
            self._capturing = False
        out, self.captured = self.captured, None
        if out is None:
            raise RuntimeError("the backbone's forward did not reach its first trained layer")
        return out
