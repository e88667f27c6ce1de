"""Prefix attention inside Hugging Face transformers models.

How it plugs in (transformers >= ``MIN_TRANSFORMERS_VERSION``):

- ``prefix_attention_forward`` is registered with ``transformers.AttentionInterface`` under the name
  ``ATTN_IMPLEMENTATION`` ("ptv2_prefix"); every supported model calls its attention through that
  interface with ``(module, q, k, v, attention_mask, scaling=, dropout=, **kwargs)``.
- ``prefix_attention_mask`` is registered under the same name with ``AttentionMaskInterface``, so
  ``create_bidirectional_mask`` / ``create_causal_mask`` hand the attention function the 2-D
  ``(B, N)`` bool key padding mask (True = real token) instead of a 4-D bias. Without this
  registration transformers would skip mask creation for an unknown implementation and the padding
  would be silently dropped. Causality comes from the attention module (``module.is_causal``, or an
  ``is_causal`` kwarg), and mask patterns the op cannot express (sliding windows shorter than the
  sequence, packed sequences, custom overlays, 4-D masks) raise instead of being ignored.
- ``apply_prefix_attention`` marks each attention module with its layer number and a shared patch
  state, switches ``config._attn_implementation``, and adds a forward pre-hook on the patched model
  that runs the ``PrefixEncoder`` once per forward (and takes an optional ``prefix_index=`` kwarg for
  banks). ``remove_prefix_attention`` undoes all of it.
"""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Optional

import torch
from torch import nn

from .. import ops
from ..prefix import PrefixEncoder

__all__ = [
    "ATTN_IMPLEMENTATION", "MIN_TRANSFORMERS_VERSION", "SUPPORTED_MODEL_TYPES",
    "apply_prefix_attention", "remove_prefix_attention", "load_prefix_attention", "patch_attention",
    "is_patched", "model_dims",
    "register_prefix_attention", "prefix_attention_forward", "prefix_attention_mask",
    "capture_key_values", "UnsupportedModelError",
]

ATTN_IMPLEMENTATION = "ptv2_prefix"
#: Oldest transformers this module is written and tested against (attention and mask interfaces,
#: ``cache`` keyword, BERT-family through the attention interface).
MIN_TRANSFORMERS_VERSION = "5.24.0"

# model_type -> (attention module class names, how "shifted" positions are applied)
#   "embeddings": absolute positions, set position_ids on the embeddings module
#   "roberta": like "embeddings", positions derived from input ids past the padding index
#   "decoder": position_ids on the base model (absolute or rotary: rotation of tokens shifts by P)
_ARCH = {
    "bert": (("BertSelfAttention",), "embeddings"),
    "electra": (("ElectraSelfAttention",), "embeddings"),
    "roberta": (("RobertaSelfAttention",), "roberta"),
    "xlm-roberta": (("XLMRobertaSelfAttention",), "roberta"),
    "distilbert": (("DistilBertSelfAttention", "MultiHeadSelfAttention"), "embeddings"),
    "llama": (("LlamaAttention",), "decoder"),
    "qwen2": (("Qwen2Attention",), "decoder"),
    "mistral": (("MistralAttention",), "decoder"),
    "gpt2": (("GPT2Attention",), "decoder"),
}
SUPPORTED_MODEL_TYPES = tuple(_ARCH)


class UnsupportedModelError(ValueError):
    pass


# ------------------------------------------------------------------------------------------------
# registration

_REGISTERED = False


def register_prefix_attention() -> str:
    """Register the attention and mask functions with transformers (idempotent); returns the name."""
    global _REGISTERED
    if not _REGISTERED:
        import transformers
        from packaging.version import Version
        from transformers import AttentionInterface
        from transformers.masking_utils import AttentionMaskInterface

        if Version(transformers.__version__.split("+")[0]) < Version(MIN_TRANSFORMERS_VERSION):
            raise RuntimeError(f"ptv2_kernels.hf needs transformers >= {MIN_TRANSFORMERS_VERSION}, "
                               f"found {transformers.__version__}")
        AttentionInterface.register(ATTN_IMPLEMENTATION, prefix_attention_forward)
        AttentionMaskInterface.register(ATTN_IMPLEMENTATION, prefix_attention_mask)
        _REGISTERED = True
    return ATTN_IMPLEMENTATION


def prefix_attention_mask(batch_size, q_length, kv_length, q_offset=0, kv_offset=0, mask_function=None,
                          attention_mask=None, local_size=None, **kwargs):
    """Mask interface: returns the ``(B, kv_length)`` bool padding mask (or None) for the op."""
    from transformers import masking_utils as mu

    plain = (mu.causal_mask_function, mu.bidirectional_mask_function)
    if mask_function is not None and mask_function not in plain:
        # A sliding window is the plain causal mask while the whole sequence fits in it.
        if local_size is None or kv_length > local_size:
            raise NotImplementedError(
                "ptv2 prefix attention supports plain causal or bidirectional masks with padding; got a "
                "custom mask pattern (packed sequences, a sliding window shorter than the sequence, or a "
                "mask overlay)")
    if attention_mask is None:
        return None
    mask = mu.prepare_padding_mask(attention_mask, kv_length, kv_offset)
    return mask[:, kv_offset:kv_offset + kv_length].to(torch.bool)


def _key_padding_mask(mask, B, N, P):
    """The op's ``(B, N)`` bool mask over the N keys (tokens, cached ones included)."""
    if mask is None:
        return None
    if not isinstance(mask, torch.Tensor) or mask.dim() != 2:
        shape = tuple(mask.shape) if isinstance(mask, torch.Tensor) else type(mask).__name__
        raise ValueError(
            f"ptv2 prefix attention needs a 2-D (batch, seq) padding mask; got {shape}. Pass the usual "
            "attention_mask of 0/1 per token (4-D or custom masks are not supported).")
    if mask.shape[-1] == N + P and P > 0:  # a PEFT-style mask widened with ones for the prefix
        mask = mask[:, P:]
    if mask.shape[-1] != N:
        raise ValueError(f"padding mask has {mask.shape[-1]} columns for {N} tokens (prefix {P})")
    if mask.dtype != torch.bool:
        mask = mask.to(torch.bool)
    if mask.shape[0] != B:
        mask = mask.expand(B, N)
    return mask


def prefix_attention_forward(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                             attention_mask, scaling: Optional[float] = None, dropout: float = 0.0, **kwargs):
    """The transformers attention function: returns ``(out (B, N, Hq, D), None)``."""
    state = getattr(module, "_ptv2_state", None)
    if state is None:
        raise RuntimeError(
            f"{type(module).__name__} runs with attn_implementation={ATTN_IMPLEMENTATION!r} but was not "
            "patched by ptv2_kernels.apply_prefix_attention (cross-attention is not supported)")
    B, Hq, N, D = query.shape
    Nk = key.shape[2]
    if Nk < N:
        raise ValueError(f"ptv2 prefix attention got {Nk} keys for {N} queries (expected at least as many)")
    layer = module._ptv2_layer
    pk, pv = state.layer_prefix(layer)
    P = pk.shape[-2]
    mask = _key_padding_mask(attention_mask, B, Nk, P)
    causal = kwargs.get("is_causal", None)
    if causal is None:
        causal = bool(getattr(module, "is_causal", False))
    window = kwargs.get("sliding_window", None)
    if window is not None and N > window:
        raise NotImplementedError(f"sliding window {window} shorter than the sequence ({N}) is not supported")
    common = dict(causal=causal, softmax_scale=scaling, dropout_p=float(dropout),
                  prefix_dropout_p=state.prefix_dropout_p(), prefix_index=state.prefix_index_for(B))
    # Under autocast everything runs in the autocast dtype (the same cast the op makes); without it a
    # low-precision backbone reads the (fp32-trained) prefix in its own dtype, as PEFT does.
    q, k, v, pk, pv = ops.autocast_inputs([query, key, value, pk, pv])
    if pk.dtype != q.dtype:
        pk, pv = pk.to(q.dtype), pv.to(q.dtype)
    if Nk > N:  # cached decoding: the queries are the last N of the Nk positions
        out = _cached_attention(q, k, v, pk, pv, mask, **common)
    elif state.attention == "reference":
        from ..reference import prefix_attention_reference

        out = prefix_attention_reference(q, k, v, pk, pv, mask, **common)
    else:
        out = ops.prefix_attention(q, k, v, pk, pv, mask, backend=state.backend, **common)
    return out.transpose(1, 2), None


def _cached_attention(q, k, v, pk, pv, mask, *, causal, softmax_scale, dropout_p, prefix_dropout_p,
                      prefix_index):
    """Attention of N new queries over ``[prefix; Nk cached and new tokens]`` (generation with a KV
    cache; the prefix stays out of the cache and is read from the encoder at every step).

    Decoding steps are small and bound by reading the cache, so this path simply joins the prefix to
    the keys (one ``(B, Hkv, P, D)`` copy per step) and calls SDPA; query i sits at key position
    ``Nk - N + i`` for the causal mask."""
    if dropout_p > 0 or prefix_dropout_p > 0:
        raise NotImplementedError("cached decoding with attention or prefix dropout: call model.eval() "
                                  "before generating")
    B, Hkv, Nk, _ = k.shape
    N = q.shape[2]
    if pk.dim() == 4:  # a bank: each row's entry
        pk, pv = pk[prefix_index], pv[prefix_index]
    else:
        pk, pv = pk.unsqueeze(0).expand(B, -1, -1, -1), pv.unsqueeze(0).expand(B, -1, -1, -1)
    P = pk.shape[2]
    visible = torch.ones(B, 1, N, P + Nk, dtype=torch.bool, device=q.device)
    if mask is not None:
        visible[..., P:] &= mask[:, None, None, :]
    if causal:
        rows = torch.arange(Nk - N, Nk, device=q.device)[:, None]
        visible[..., P:] &= torch.arange(Nk, device=q.device)[None, :] <= rows
    out = torch.nn.functional.scaled_dot_product_attention(
        q, torch.cat([pk, k], 2), torch.cat([pv, v], 2), attn_mask=visible, scale=softmax_scale,
        enable_gqa=q.shape[1] != Hkv)
    # a row that sees nothing (no prefix, every key masked) gives zeros, as the op does
    return torch.where(visible.any(-1, keepdim=True), out, torch.zeros((), dtype=out.dtype, device=out.device))


# ------------------------------------------------------------------------------------------------
# patching

class _PatchState:
    """What the patched attention modules share (kept off the module tree: not a submodule)."""

    def __init__(self, encoder, backend, attention, position_offset, model_type, prefix_len):
        self.encoder = encoder
        self.backend = backend
        self.attention = attention
        self.position_offset = position_offset
        self.model_type = model_type
        self.prefix_len = prefix_len
        self.current = None  # per-layer (K, V) of the running forward
        self.prefix_index = None
        self.modules = []
        self.handles = []
        self.orig_impl = None
        self.model = None
        self.pending_bridge = None
        self.next_index = None
        self.owns_encoder = False  # apply_prefix_attention registered it as model.prefix_encoder
        self.unfrozen = []  # base-model parameters it froze (trainable again after removal)

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

    def prefix_index_for(self, B):
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

    for m in _base_model(model).modules():
        if isinstance(m, GradientCheckpointingLayer) and any(x is first_attention for x in m.modules()):
            return m
    return None


def _base_model(model):
    base = getattr(model, "base_model", model)
    return base if isinstance(base, nn.Module) else model


def _model_type(model) -> str:
    cfg = getattr(model, "config", None)
    mt = getattr(cfg, "model_type", None)
    if mt not in _ARCH:
        raise UnsupportedModelError(
            f"prefix attention does not support model type {mt!r} ({type(model).__name__}); supported: "
            f"{', '.join(SUPPORTED_MODEL_TYPES)}")
    return mt


def _attention_modules(model, model_type):
    names = _ARCH[model_type][0]
    mods = [m for m in _base_model(model).modules() if type(m).__name__ in names]
    if not mods:
        raise UnsupportedModelError(f"found no attention modules ({', '.join(names)}) in {type(model).__name__}")
    return mods


def model_dims(model) -> dict:
    """Layers, kv heads, head dim and hidden size of a supported transformers model."""
    mt = _model_type(model)
    cfg = model.config
    L = len(_attention_modules(model, mt))
    hidden = getattr(cfg, "hidden_size", None) or getattr(cfg, "dim", None) or cfg.n_embd
    heads = getattr(cfg, "num_attention_heads", None) or getattr(cfg, "n_heads", None) or cfg.n_head
    kv = getattr(cfg, "num_key_value_heads", None) or heads
    head_dim = getattr(cfg, "head_dim", None) or hidden // heads
    return dict(num_layers=L, num_kv_heads=kv, head_dim=head_dim, hidden_size=hidden, num_heads=heads)


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

    The base model's weights are frozen (``requires_grad=False``, P-Tuning v2's frozen backbone; a head
    such as ``classifier`` is left as it is). The patched model accepts an extra ``prefix_index=``
    keyword (``(B,)`` task ids) when the encoder is a bank. :func:`remove_prefix_attention` undoes all
    of it. Returns ``model``.
    """
    if not isinstance(prefix_encoder, PrefixEncoder):
        raise TypeError(f"prefix_encoder must be a ptv2_kernels.PrefixEncoder, got {type(prefix_encoder).__name__}")
    if "prefix_encoder" in model._modules or hasattr(model, "prefix_encoder"):
        raise ValueError(f"{type(model).__name__} already has an attribute 'prefix_encoder'; the prefix "
                         "encoder is registered under that name")
    state = patch_attention(model, prefix_encoder, backend, position_offset, attention=attention)
    state.unfrozen = [p for p in _base_model(model).parameters() if p.requires_grad]
    for p in state.unfrozen:
        p.requires_grad_(False)
    model.add_module("prefix_encoder", prefix_encoder)  # after freezing: a base model is also `model`
    state.owns_encoder = True
    model.config.ptv2_prefix = dict(prefix_encoder=prefix_encoder.config_dict(), position_offset=position_offset,
                                    attention=attention)
    return model


def load_prefix_attention(model: nn.Module, directory: Optional[str] = None, backend: Optional[str] = None):
    """Re-apply the prefix a patched model was saved with: ``model`` comes from ``from_pretrained`` of
    a ``save_pretrained`` directory (its ``config.ptv2_prefix`` says how it was patched; transformers
    reports the ``prefix_encoder.*`` weights as unexpected and skips them); the encoder's weights are
    read from ``directory`` (default ``model.name_or_path``). Returns ``model``, patched."""
    from safetensors import safe_open

    record = getattr(model.config, "ptv2_prefix", None)
    if not isinstance(record, dict):
        raise ValueError(f"{type(model).__name__}'s config has no ptv2_prefix entry: it was not saved patched "
                         "by apply_prefix_attention")
    directory = directory or model.name_or_path
    encoder = PrefixEncoder(**record["prefix_encoder"])
    weights = {}
    for file in sorted(Path(directory).glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as f:
            weights.update({k[len("prefix_encoder."):]: f.get_tensor(k) for k in f.keys()
                            if k.startswith("prefix_encoder.")})
    if not weights:
        raise FileNotFoundError(f"no prefix_encoder.* weights in the .safetensors files of {directory}")
    encoder.load_state_dict(weights)
    encoder.to(next(model.parameters()).device)
    del model.config.ptv2_prefix  # apply_prefix_attention writes it again
    return apply_prefix_attention(model, encoder, backend, record["position_offset"], attention=record["attention"])


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
    mt = _model_type(model)
    mods = _attention_modules(model, mt)
    dims = model_dims(model)
    enc = prefix
    want = (dims["num_layers"], dims["num_kv_heads"], dims["head_dim"])
    have = (enc.num_layers, enc.num_kv_heads, enc.head_dim)
    if want != have:
        raise ValueError(f"prefix encoder (layers, kv heads, head dim) {have} does not match the model {want}")
    register_prefix_attention()

    state = _PatchState(enc, backend, attention, position_offset, mt, enc.prefix_len)
    state.modules = mods
    for i, m in enumerate(mods):
        m._ptv2_state = state
        m._ptv2_layer = i
    cfg = model.config
    state.orig_impl = cfg._attn_implementation
    cfg._attn_implementation = ATTN_IMPLEMENTATION

    base = _base_model(model)

    def index_hook(mod, args, kwargs):  # on a model with a head: take prefix_index before its forward
        state.next_index = kwargs.pop("prefix_index", None)
        return args, kwargs

    def refresh_hook(mod, args, kwargs):  # on the base model: the prefix, once per forward
        idx = kwargs.pop("prefix_index", None)
        if idx is None:
            idx, state.next_index = state.next_index, None
        state.refresh(idx)
        return args, kwargs

    state.model = model
    if base is not model:
        state.handles.append(model.register_forward_pre_hook(index_hook, with_kwargs=True))
    state.handles.append(base.register_forward_pre_hook(refresh_hook, with_kwargs=True))
    first = _first_layer(model, mods[0])
    if first is not None:
        state.handles.append(first.register_forward_pre_hook(_bridge_hook(state), with_kwargs=True))
    kind = _ARCH[mt][1]
    target = base if kind == "decoder" else base.embeddings
    state.handles.append(target.register_forward_pre_hook(_positions_hook(state, kind, target), with_kwargs=True))
    if kind == "decoder" and hasattr(model, "_prepare_position_ids_for_generation"):
        state.handles.append(_InstanceOverride(model, "_prepare_position_ids_for_generation",
                                               _generation_positions(state, model)))
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
    model.config._attn_implementation = state.orig_impl
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
    state = model._ptv2_patch
    if state.owns_encoder:
        model.prefix_encoder = prefix_encoder
        model.config.ptv2_prefix["prefix_encoder"] = prefix_encoder.config_dict()
    enc = prefix_encoder
    if (enc.num_layers, enc.num_kv_heads, enc.head_dim) != (state.encoder.num_layers, state.encoder.num_kv_heads,
                                                            state.encoder.head_dim):
        raise ValueError("prefix encoder dims differ from the patched one")
    state.encoder = enc
    state.prefix_len = enc.prefix_len
    state.current = None


@torch.no_grad()
def capture_key_values(model, input_ids, **forward_kwargs):
    """Every layer's keys and values ``(B, Hkv, N, D)`` for ``input_ids``, run without a prefix."""
    dims = model_dims(model)
    empty = PrefixEncoder(dims["num_layers"], dims["num_kv_heads"], dims["head_dim"], 0)
    empty.to(next(model.parameters()).device)
    keys, values = {}, {}
    patch_attention(model, empty, attention="reference")
    try:
        import transformers

        def capturing(module, q, k, v, mask, scaling=None, dropout=0.0, **kw):
            keys[module._ptv2_layer] = k.detach().clone()
            values[module._ptv2_layer] = v.detach().clone()
            return prefix_attention_forward(module, q, k, v, mask, scaling=scaling, dropout=dropout, **kw)

        transformers.AttentionInterface.register(ATTN_IMPLEMENTATION, capturing)
        was = model.training
        model.eval()
        model(input_ids=input_ids, **forward_kwargs)
        model.train(was)
    finally:
        from transformers import AttentionInterface

        AttentionInterface.register(ATTN_IMPLEMENTATION, prefix_attention_forward)
        remove_prefix_attention(model)
    n = len(keys)
    return [keys[i] for i in range(n)], [values[i] for i in range(n)]
