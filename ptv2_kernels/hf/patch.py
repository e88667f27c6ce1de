"""Patching a transformers model so its attention reads a prefix: hooks and markers in place, undone
exactly by ``remove_prefix_attention``.

- ``patch_attention`` marks each attention module (``arch.attention_modules``) with its layer number
  and a shared ``_PatchState``, switches ``config._attn_implementation`` to the function of
  ``attention.py``, and adds forward pre-hooks: on the base model, run the prefix encoder once per
  forward (and take an optional ``prefix_index=`` kwarg for banks); on the embeddings or the base
  model, start positions at P in "shifted" mode (``Arch.positions``).
- Encoder-decoders: ``generate()`` runs the encoder on its own before the decoding steps, so the
  encoder gets the same pre-hook (skipped when the encoder runs inside the model's forward, which has
  refreshed the prefix already).
- ``generate()`` takes ``prefix_index=`` (a ``(B,)`` tensor) through to every forward: the patch lets
  it past generate's check of model keywords, and generate repeats it with the rows for beams and
  returned sequences as it repeats every tensor keyword.
- ``apply_prefix_attention`` is that plus ownership: the encoder becomes ``model.prefix_encoder`` and
  the base model is frozen.
"""

from __future__ import annotations

import functools
import inspect
from typing import Optional

import torch
from torch import nn

from .arch import arch_of, attention_modules, base_model, model_dims
from .attention import ATTN_IMPLEMENTATION, MODULE_FORWARDS, register_prefix_attention

__all__ = ["apply_prefix_attention", "patch_attention", "remove_prefix_attention", "set_prefix_encoder",
           "is_patched"]


# ------------------------------------------------------------------------------------------------
# patching

class _PatchState:
    """What the patched attention modules share (kept off the module tree: not a submodule)."""

    def __init__(self, arch, encoder, backend, attention, position_offset, prefix_len):
        self.arch = arch
        self.encoder = encoder
        self.backend = backend
        self.attention = attention
        self.position_offset = position_offset
        self.prefix_len = prefix_len
        self.current = None  # per-layer (K, V) of the running forward
        self.prefix_index = None
        self.modules = []
        self.handles = []
        self.orig_impls = []  # (config, its attention implementation before the patch)
        self.model = None
        self.pending_bridge = None
        self.next_index = None
        self.owns_encoder = False  # apply_prefix_attention registered it as model.prefix_encoder
        self.unfrozen = []  # base-model parameters it froze (trainable again after removal)
        self.capture = None  # capture_key_values: {layer: (keys, values)} of the running forward
        self.in_model = False  # inside the base model's forward (its pre-hook refreshed the prefix)

    def refresh(self, prefix_index=None):
        kv = self.encoder()
        self.prefix_index = prefix_index
        self.pending_bridge = None
        if _reentrant_checkpointing(self.model) and any(t.requires_grad for pair in kv for t in pair):
            # Reentrant checkpointing recomputes each layer inside its own backward call, which would
            # run (and free) the shared encoder graph once per layer. The layers get leaf copies
            # instead; their gradients reach the encoder through _PrefixGradBridge, placed before the
            # first layer (so its backward runs after every layer's).
            flat = [t for pair in kv for t in pair]
            leaves = [t.detach().requires_grad_(t.requires_grad) for t in flat]
            self.pending_bridge = (flat, leaves)
            kv = [(leaves[2 * i], leaves[2 * i + 1]) for i in range(len(kv))]
        self.current = kv

    def layer_prefix(self, layer):
        if self.current is None:
            self.refresh()
        return self.current[layer]

    def prefix_dropout_p(self):
        return self.encoder.prefix_dropout_p

    def prefix_index_for(self, B, prefix_k):
        """The op's ``prefix_index`` for a layer reading ``prefix_k`` (None for a layer without a prefix:
        its zero-length prefix is not a bank)."""
        if self.encoder.is_bank and prefix_k.dim() == 3:
            return None
        if not self.encoder.is_bank:
            if self.prefix_index is not None:
                raise ValueError("prefix_index given but the prefix encoder is not a bank")
            return None
        if self.prefix_index is None:
            raise ValueError("the prefix encoder is a bank: call the model with prefix_index=(B,) task ids")
        idx = torch.as_tensor(self.prefix_index, dtype=torch.long, device=self.current[0][0].device)
        return idx.reshape(-1).expand(B) if idx.numel() == 1 else idx


class _PrefixGradBridge(torch.autograd.Function):
    """Identity on the hidden states; in backward, hands the per-layer leaf gradients to the prefix."""

    @staticmethod
    def forward(ctx, hidden, leaves, *flat):
        ctx.leaves = leaves
        return hidden.view_as(hidden)

    @staticmethod
    def backward(ctx, grad):
        grads = [leaf.grad for leaf in ctx.leaves]
        return (grad if ctx.needs_input_grad[0] else None, None, *grads)


def _reentrant_checkpointing(model) -> bool:
    if model is None or not model.training or not torch.is_grad_enabled():
        return False
    for m in model.modules():
        if getattr(m, "gradient_checkpointing", False):
            fn = getattr(m, "_gradient_checkpointing_func", None)
            kw = getattr(fn, "keywords", None) or {}
            if kw.get("use_reentrant", False):
                return True
    return False


def _bridge_hook(state):
    def hook(mod, args, kwargs):
        if state.pending_bridge is None:
            return None
        flat, leaves = state.pending_bridge
        state.pending_bridge = None
        if args:
            return (_PrefixGradBridge.apply(args[0], leaves, *flat),) + tuple(args[1:]), kwargs
        key = "hidden_states" if "hidden_states" in kwargs else next(iter(kwargs))
        return args, {**kwargs, key: _PrefixGradBridge.apply(kwargs[key], leaves, *flat)}

    return hook


def _first_layer(model, first_attention):
    from transformers.modeling_layers import GradientCheckpointingLayer

    for m in base_model(model).modules():
        if isinstance(m, GradientCheckpointingLayer) and any(x is first_attention for x in m.modules()):
            return m
    return None


def _configs(model):
    """The model's config and any other its modules read their attention implementation from (T5's
    encoder and decoder stacks hold copies of it)."""
    from transformers import PretrainedConfig

    configs = {id(model.config): model.config}
    for m in model.modules():
        cfg = getattr(m, "config", None)
        if isinstance(cfg, PretrainedConfig):
            configs.setdefault(id(cfg), cfg)
    return list(configs.values())


def is_patched(model) -> bool:
    return getattr(model, "_ptv2_patch", None) is not None


def _positions_hook(state, kind, module):
    """A pre-hook that starts token positions at P when they were not given explicitly."""
    sig = inspect.signature(module.forward)
    pos_index = list(sig.parameters).index("position_ids")

    def hook(mod, args, kwargs):
        if state.position_offset != "shifted" or state.prefix_len == 0:
            return None
        bound = sig.bind_partial(*args, **kwargs)
        a = bound.arguments
        if a.get("position_ids") is not None:
            return None
        ids, emb = a.get("input_ids"), a.get("inputs_embeds")
        ref = ids if ids is not None else emb
        B, N = ref.shape[0], ref.shape[1]
        P = state.prefix_len
        if kind == "roberta" and ids is not None:
            pos = mod.create_position_ids_from_input_ids(ids, mod.padding_idx, P)
        elif kind == "roberta":
            start = mod.padding_idx + 1 + P
            pos = torch.arange(start, start + N, device=ref.device).unsqueeze(0).expand(B, N)
        else:
            past = 0
            cache = a.get("cache", None) or a.get("past_key_values", None)
            if kind == "decoder" and cache is not None and hasattr(cache, "get_seq_length"):
                past = cache.get_seq_length()
            pos = (torch.arange(N, device=ref.device) + P + past).unsqueeze(0).expand(B, N)
        if len(args) > pos_index:  # given positionally (as None)
            args = args[:pos_index] + (pos,) + args[pos_index + 1:]
        else:
            kwargs = {**kwargs, "position_ids": pos}
        return args, kwargs

    return hook


def _generation_positions(state, model):
    """``generate()`` derives position ids from the attention mask (counting real tokens from 0) and
    passes them explicitly, which would bypass the positions hook: shift them by P here, as PEFT's
    widened mask does."""
    original = model._prepare_position_ids_for_generation

    def prepare(*args, **kwargs):
        pos = original(*args, **kwargs)
        if state.position_offset == "shifted" and pos is not None:
            pos = pos + state.prefix_len
        return pos

    return prepare


def _generation_kwargs_check(model):
    """generate() refuses keywords that no forward signature names; ``prefix_index`` is taken by the
    patch's pre-hooks, so it is left out of that check (and stays in the keywords generate expands
    with the rows and hands to every forward)."""
    original = model._validate_model_kwargs

    def validate(model_kwargs):
        return original({k: v for k, v in model_kwargs.items() if k != "prefix_index"})

    return validate


class _InstanceOverride:
    """Sets an attribute on one object; ``remove()`` restores the class's (a hook-handle lookalike)."""

    def __init__(self, obj, name, value):
        self.obj, self.name = obj, name
        setattr(obj, name, value)

    def remove(self):
        self.obj.__dict__.pop(self.name, None)


def apply_prefix_attention(model: nn.Module, prefix_encoder, backend: Optional[str] = None,
                           position_offset: str = "zero", *, attention: str = "prefix"):
    """Make ``model`` attend over ``prefix_encoder``'s per-layer prefix with the fused op, in place.

    Args:
        model: a transformers model of a supported type (``SUPPORTED_MODEL_TYPES``), base or with a head.
        prefix_encoder: a :class:`~ptv2_kernels.PrefixEncoder` sized for it (``PrefixEncoder.for_model``).
            It becomes the submodule ``model.prefix_encoder``: its parameters are in
            ``model.parameters()`` (so transformers' ``Trainer``, accelerate and any optimizer train it),
            ``model.save_pretrained`` writes it (its configuration goes into ``config.ptv2_prefix``) and
            :func:`load_prefix_attention` restores it after ``from_pretrained``.
        backend: passed to :func:`ptv2_kernels.prefix_attention` (None: the default for the device).
        position_offset: "zero" (tokens keep positions 0..N-1) or "shifted" (positions start at P, as
            the authors' code and PEFT do; rotary decoders rotate tokens from P, the prefix is never
            rotated). Explicit ``position_ids`` passed to the model are used as given.
        attention: "prefix" (the op) or "reference" (the materializing formulation, for baselines).

    The base model's weights are frozen (``requires_grad=False``, P-Tuning v2's frozen backbone, as the
    authors freeze it); what lies outside it (a task head such as ``classifier``, an untied ``lm_head``)
    is left as it is. The patched model accepts an extra ``prefix_index=``
    keyword (``(B,)`` task ids) when the encoder is a bank. :func:`remove_prefix_attention` undoes all
    of it. Returns ``model``.
    """
    if not isinstance(prefix_encoder, nn.Module):
        raise TypeError(f"prefix_encoder must be a ptv2_kernels.PrefixEncoder, got {type(prefix_encoder).__name__}")
    if "prefix_encoder" in model._modules or hasattr(model, "prefix_encoder"):
        raise ValueError(f"{type(model).__name__} already has an attribute 'prefix_encoder'; the prefix "
                         "encoder is registered under that name")
    state = patch_attention(model, prefix_encoder, backend, position_offset, attention=attention)
    state.unfrozen = [p for p in base_model(model).parameters() if p.requires_grad]
    for p in state.unfrozen:
        p.requires_grad_(False)
    model.add_module("prefix_encoder", prefix_encoder)  # after freezing: a base model is also `model`
    state.owns_encoder = True
    model.config.ptv2_prefix = dict(prefix_encoder=prefix_encoder.config_dict(), position_offset=position_offset,
                                    attention=attention)
    return model


def patch_attention(model: nn.Module, prefix, backend: Optional[str] = None, position_offset: str = "zero", *,
                    attention: str = "prefix"):
    """The patch without ownership: ``model`` reads ``prefix`` (a PrefixEncoder, or anything with its
    interface) but neither registers it nor freezes anything. For owners that hold the prefix
    themselves (the task models, a PEFT model); returns the patch state."""
    if position_offset not in ("zero", "shifted"):
        raise ValueError(f"position_offset must be 'zero' or 'shifted', got {position_offset!r}")
    if attention not in ("prefix", "reference"):
        raise ValueError(f"attention must be 'prefix' or 'reference', got {attention!r}")
    if is_patched(model):
        raise RuntimeError("model is already patched; call remove_prefix_attention first")
    arch = arch_of(model)
    if arch.positions == "seq2seq" and position_offset == "shifted":
        raise ValueError(f"position_offset must be 'zero' for the encoder-decoder {arch.model_type} (its tokens "
                         "keep their positions, as in Li and Liang's BART), got 'shifted'")
    mods = attention_modules(model)
    dims = model_dims(model)
    enc = prefix
    want = (dims["num_layers"], dims["num_kv_heads"], dims["head_dim"])
    have = (enc.num_layers, enc.num_kv_heads, enc.head_dim)
    if want != have:
        raise ValueError(f"prefix encoder (layers, kv heads, head dim) {have} does not match the model {want}")
    register_prefix_attention()

    state = _PatchState(arch, enc, backend, attention, position_offset, enc.prefix_len)
    state.modules = mods
    for i, m in enumerate(mods):
        m._ptv2_state = state
        m._ptv2_layer = i
    for cfg in _configs(model):
        state.orig_impls.append((cfg, cfg._attn_implementation))
        cfg._attn_implementation = ATTN_IMPLEMENTATION

    base = base_model(model)

    def index_hook(mod, args, kwargs):  # on a model with a head: take prefix_index before its forward
        state.next_index = kwargs.pop("prefix_index", None)
        return args, kwargs

    def refresh_hook(mod, args, kwargs):  # on the base model: the prefix, once per forward
        idx = kwargs.pop("prefix_index", None)
        if idx is None:
            idx, state.next_index = state.next_index, None
        state.refresh(idx)
        state.in_model = True
        return args, kwargs

    def leave_hook(mod, args, kwargs, output):
        state.in_model = False

    def encoder_hook(mod, args, kwargs):  # an encoder run on its own (generate): its prefix, once
        idx = kwargs.pop("prefix_index", None)
        if not state.in_model:
            state.refresh(idx)
        return args, kwargs

    state.model = model
    if base is not model:
        state.handles.append(model.register_forward_pre_hook(index_hook, with_kwargs=True))
    state.handles += [base.register_forward_pre_hook(refresh_hook, with_kwargs=True),
                      base.register_forward_hook(leave_hook, with_kwargs=True, always_call=True)]
    if arch.is_encoder_decoder and getattr(base, "encoder", None) is not None:
        state.handles.append(base.encoder.register_forward_pre_hook(encoder_hook, with_kwargs=True))
    first = _first_layer(model, mods[0])
    if first is not None:
        state.handles.append(first.register_forward_pre_hook(_bridge_hook(state), with_kwargs=True))
    if arch.module_forward is not None:  # attention that does not call transformers' interface
        forward = MODULE_FORWARDS[arch.module_forward]
        state.handles += [_InstanceOverride(m, "forward", functools.partial(forward, m)) for m in mods]
    kind = arch.positions
    if kind in ("embeddings", "roberta", "decoder"):
        target = base if kind == "decoder" else base.embeddings
        state.handles.append(target.register_forward_pre_hook(_positions_hook(state, kind, target),
                                                              with_kwargs=True))
    if kind == "decoder" and hasattr(model, "_prepare_position_ids_for_generation"):
        state.handles.append(_InstanceOverride(model, "_prepare_position_ids_for_generation",
                                               _generation_positions(state, model)))
    if hasattr(model, "_validate_model_kwargs"):
        state.handles.append(_InstanceOverride(model, "_validate_model_kwargs", _generation_kwargs_check(model)))
    model._ptv2_patch = state
    return state


def remove_prefix_attention(model: nn.Module) -> nn.Module:
    """Undo :func:`apply_prefix_attention` (or :func:`patch_attention`): hooks, markers, the attention
    implementation, the ``prefix_encoder`` submodule and the frozen flags."""
    state = getattr(model, "_ptv2_patch", None)
    if state is None:
        raise RuntimeError("model is not patched by apply_prefix_attention")
    for h in state.handles:
        h.remove()
    for m in state.modules:
        for name in ("_ptv2_state", "_ptv2_layer"):
            if name in m.__dict__:
                delattr(m, name)
    for cfg, impl in state.orig_impls:
        cfg._attn_implementation = impl
    if state.owns_encoder:
        del model.prefix_encoder
        del model.config.ptv2_prefix
        for p in state.unfrozen:
            p.requires_grad_(True)
    state.current = state.pending_bridge = state.model = None
    del model._ptv2_patch
    return model


def set_prefix_encoder(model, prefix_encoder):
    """Swap the prefix encoder of a patched model (same dims), e.g. for an exported or stacked one."""
    state = getattr(model, "_ptv2_patch", None)
    if state is None:
        raise RuntimeError("model is not patched by apply_prefix_attention")
    dims = lambda e: (e.num_layers, e.num_kv_heads, e.head_dim)  # noqa: E731
    if dims(prefix_encoder) != dims(state.encoder):
        raise ValueError(f"prefix_encoder (layers, kv heads, head dim) must be {dims(state.encoder)} as the "
                         f"patched one, got {dims(prefix_encoder)}")
    if state.owns_encoder:
        model.prefix_encoder = prefix_encoder
        model.config.ptv2_prefix["prefix_encoder"] = prefix_encoder.config_dict()
    state.encoder = prefix_encoder
    state.prefix_len = prefix_encoder.prefix_len
    state.current = None
