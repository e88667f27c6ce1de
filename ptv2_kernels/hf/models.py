"""P-Tuning v2 task models: a frozen backbone, a trained prefix, a small trained head.

Four tasks, one shape::

    model = PrefixModelForSequenceClassification.from_pretrained(
        "roberta-large", num_labels=2, prefix_len=8, projection=False)
    out = model(input_ids, attention_mask, labels=labels)   # out.loss, out.logits
    model.save_pretrained("ckpt")                              # prefix + head, safetensors + JSON
    model = PrefixModelForSequenceClassification.load_pretrained("ckpt")

- ``method`` names a record of ``ptv2_kernels.methods``, which attaches what trains and says what is
  saved: ``"prefix"`` (default, P-Tuning v2: every backbone weight has ``requires_grad=False``, the
  backbone still follows ``train()``/``eval()`` so its dropouts run during training, as in the authors'
  recipe; the prefix encoder and the head train), ``"prompt"`` and ``"ptuning"`` (input-only prompts),
  ``"lora"`` (PEFT's LoRA layers) and ``"finetune"`` (the same head on a trainable backbone).
- ``prefix_layers``: a prefix on those layers only; below the first, the frozen trunk runs in eval mode
  without autograd and can be replayed from cached hidden states (``trunk_hidden=``).
- ``attention="reference"``: the materializing PEFT-style formulation through the same patch.

Heads follow the authors' repository: sequence classification and multiple choice read the pooled
output when the backbone has a pooler (BERT, RoBERTa, ...), the first token through a trained
``pooler`` where the architecture's heads have one (DeBERTa's ``ContextPooler``), else the first token
(encoders) or the last real token (decoders); then dropout (the backbone's hidden dropout) and a linear ``classifier``.
``pooling="mean"`` reads the mean of the real tokens' last hidden states instead, which is what
sentence-embedding backbones (all-MiniLM-L6-v2 and the other sentence-transformers) were trained to
produce; their first token and pooler carry little.
Token classification and QA read every token (``classifier``, ``qa_outputs``).

Outputs are transformers' own ``ModelOutput`` classes (``SequenceClassifierOutput``, ...): attribute,
key and index access, ``outputs[0]`` the loss when labels are given, as transformers' ``Trainer`` reads
them. transformers is imported when a model runs, so ``import ptv2_kernels`` does not need it.
"""

from __future__ import annotations

import importlib
import inspect
import json
import os
from pathlib import Path
from typing import Optional, Sequence

import torch
from torch import nn
from torch.nn import functional as F

from .._version import __version__
from ..methods import METHODS, get_method
from ..methods.prefix import TRUNKS
from ..prefix import PrefixEncoder
from .arch import arch_of, model_dims
from .location import model_location
from .patch import apply_prefix_attention
from .pooling import POOLINGS
from .trunk import Trunk

__all__ = ["PrefixModelForSequenceClassification", "PrefixModelForTokenClassification",
           "PrefixModelForQuestionAnswering", "PrefixModelForMultipleChoice", "PrefixModelForGeneration",
           "load_pretrained",
           "load_prefix_attention", "trained_pooling"]

CONFIG_NAME = "ptv2_config.json"
WEIGHTS_NAME = "model.safetensors"


def _load_backbone(backbone, backbone_kwargs):
    from transformers import AutoModel, PreTrainedModel

    if isinstance(backbone, (str, os.PathLike)):
        model = AutoModel.from_pretrained(str(backbone), **backbone_kwargs)
        name = str(backbone)
    elif isinstance(backbone, PreTrainedModel):
        model = backbone.base_model if isinstance(getattr(backbone, "base_model", None), nn.Module) else backbone
        name = getattr(backbone.config, "_name_or_path", None) or getattr(backbone, "name_or_path", None) or None
    else:
        raise TypeError(f"backbone must be a name, a path or a transformers PreTrainedModel, got {type(backbone)}")
    arch_of(model)  # raises for unsupported types, naming the supported ones
    return model, name


def trained_pooling(location) -> str:
    """``"mean"`` when ``location`` is a sentence-transformers folder whose pooling module averages the
    token embeddings (all-MiniLM-L6-v2 and most sentence-embedding models), else ``"auto"``: the
    pooling the backbone was trained to give, where its files say it."""
    folder = Path(str(location))
    try:
        modules = json.loads((folder / "modules.json").read_text())
        pooling = next(m["path"] for m in modules if m.get("type", "").endswith(".Pooling"))
        config = json.loads((folder / pooling / "config.json").read_text())
    except (OSError, ValueError, StopIteration, KeyError, TypeError):
        return "auto"  # not a local sentence-transformers folder, or one without a pooling module
    return "mean" if config.get("pooling_mode_mean_tokens") else "auto"


def _jsonable(d):
    out = {}
    for k, v in d.items():
        if isinstance(v, torch.dtype):
            v = str(v).replace("torch.", "")
        try:
            json.dumps(v)
        except TypeError:
            continue
        out[k] = v
    return out


class _PrefixTaskModel(nn.Module):
    task = ""
    pools = False  # reads one vector per sequence (``pooling`` applies)
    frozen_trunk = True  # the layers below prefix_layers can run as a frozen trunk

    @staticmethod
    def load_backbone(backbone, backbone_kwargs):
        """``(model, name)``: the backbone this task model runs under its head, loaded from a name or
        path (``backbone_kwargs`` go to ``from_pretrained``) or taken from a model; its type checked."""
        return _load_backbone(backbone, backbone_kwargs)

    def __init__(self, backbone: nn.Module, options: dict, backbone_name: Optional[str] = None):
        super().__init__()
        self.backbone = backbone
        self.options = dict(options)
        self.backbone_name = backbone_name
        arch = arch_of(backbone)
        self.model_type = arch.model_type
        self.is_decoder = arch.is_decoder
        dims = model_dims(backbone)
        self.hidden_size = dims["hidden_size"]
        # the backbone's hidden dropout, as the authors' heads; 0.1 (theirs) where it has none
        self.dropout = nn.Dropout(getattr(backbone.config, arch.head_dropout) if arch.head_dropout else 0.1)
        self._fwd_params = set(inspect.signature(backbone.forward).parameters)
        self.method = get_method(options["method"])
        if options.get("pooling", "auto") not in POOLINGS:
            raise ValueError(f"pooling must be one of {POOLINGS}, got {options['pooling']!r}")
        if options.get("pooling", "auto") != "auto" and not self.pools:
            raise ValueError(f"pooling applies to sequence and multiple-choice heads; a {type(self).__name__} "
                             f"reads every token, got pooling={options['pooling']!r}")
        if options.get("num_tasks") is not None and not self.method.bank:
            raise ValueError(f"num_tasks (a bank of several tasks) needs a method with a bank "
                             f"({', '.join(m for m, r in METHODS.items() if r.bank)}), got method={self.method.name!r}")
        self.method.attach(self, dims)
        if options.get("trunk", "frozen") not in TRUNKS:
            raise ValueError(f"trunk must be one of {TRUNKS}, got {options['trunk']!r}")
        first = self.method.first_layer(options)
        frozen = options.get("trunk", "frozen") == "frozen" and self.frozen_trunk
        self.trunk = Trunk(backbone, first) if first > 0 and frozen else None
        self._build_head()

    # -- construction -------------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, backbone, *, num_labels: int = 2, method: str = "prefix", prefix_len: int = 16,
                        projection: bool = False, prefix_hidden: Optional[int] = None, prefix_dropout: float = 0.0,
                        prefix_layers: Optional[Sequence[int]] = None, backend: Optional[str] = None,
                        position_offset: str = "zero", attention: str = "prefix", num_tasks: Optional[int] = None,
                        pooling: str = "auto", prompt_init: str = "random", prompt_init_text: Optional[str] = None,
                        reparameterization: str = "lstm", lora_r: int = 8, lora_alpha: int = 16,
                        lora_dropout: float = 0.0, lora_targets: Optional[Sequence[str]] = None,
                        trunk: str = "frozen", **backbone_kwargs):
        """Build the task model on ``backbone`` (a hub name, a local path, or a built PreTrainedModel;
        a model with a head contributes its base model). ``backbone_kwargs`` go to
        ``AutoModel.from_pretrained``.

        ``method`` (``ptv2_kernels.methods``): ``"prefix"`` (P-Tuning v2; ``prefix_len``, ``projection``
        and ``prefix_hidden`` (the MLP reparameterization, width 512 by default), ``prefix_dropout``,
        ``prefix_layers`` (0-based indices of the layers that hold a prefix; None: all), ``backend``,
        ``position_offset``, ``attention``); ``"prompt"`` (prompt tuning; ``prefix_len`` input positions,
        ``prompt_init`` random, vocab or text with ``prompt_init_text``); ``"ptuning"`` (P-Tuning v1;
        ``reparameterization`` lstm or mlp of width ``prefix_hidden``, the hidden size by default);
        ``"lora"`` (``lora_r``, ``lora_alpha``, ``lora_dropout``, ``lora_targets``: PEFT's LoraConfig);
        ``"finetune"``. ``trunk``: with a prefix above the first layer only, the embeddings and the
        layers below it (the frozen trunk) run in eval mode without autograd (``"frozen"``: no dropout
        there, nothing kept for backward; ``forward(trunk_hidden=...)`` replays cached hidden states
        entering the first prefix layer) or as the rest of the backbone (``"train"``). ``num_tasks``
        makes the prefix or prompt a bank (forward takes ``prefix_index=``). ``prefix_dropout`` (the authors' recipes use 0.1) is off by default: on
        MiniLM SST-2, 0.1 learned 1.0 point less (bench/results/cpu/quality). ``pooling``: what sequence
        heads read, ``"auto"`` (the authors' rule) or ``"mean"`` (the mean of the real tokens, for
        sentence-embedding backbones)."""
        model, name = cls.load_backbone(backbone, backbone_kwargs)
        default_hidden = 512 if method == "prefix" else None  # the authors' prefix MLP; P-Tuning: H
        options = dict(num_labels=int(num_labels), method=method, prefix_len=int(prefix_len),
                       projection=bool(projection),
                       prefix_hidden=int(prefix_hidden) if prefix_hidden is not None else default_hidden,
                       prefix_dropout=float(prefix_dropout),
                       prefix_layers=None if prefix_layers is None else [int(i) for i in prefix_layers],
                       backend=backend, position_offset=position_offset, attention=attention, num_tasks=num_tasks,
                       pooling=pooling, prompt_init=prompt_init, prompt_init_text=prompt_init_text,
                       reparameterization=reparameterization, lora_r=int(lora_r), lora_alpha=int(lora_alpha),
                       lora_dropout=float(lora_dropout),
                       lora_targets=None if lora_targets is None else list(lora_targets), trunk=trunk,
                       backbone_kwargs=_jsonable(backbone_kwargs))
        return cls(model, options, backbone_name=name)

    @classmethod
    def from_peft(cls, peft_model, adapter_name: Optional[str] = None):
        """This task model holding what a PEFT prompt-learning model holds (prefix tuning, prompt tuning or
        P-tuning over one of transformers' task models, such as ``BertForSequenceClassification``): the
        same backbone modules (shared, not copied), the adapter's weights under this project's names
        (``ptv2_kernels.methods`` converts them), and the task head copied where its shape is this
        model's. Outputs and gradients are PEFT's (prefix tuning with ``position_offset="shifted"``)."""
        from ..methods import method_for_peft

        name = adapter_name or peft_model.active_adapter
        config = peft_model.peft_config[name]
        method = method_for_peft(config.peft_type)
        hf_model = peft_model.get_base_model()
        options = method.options_from_peft(config)
        num_labels = getattr(hf_model.config, "num_labels", 2)
        model = cls.from_pretrained(hf_model, method=method.name, num_labels=num_labels, **options)
        state = method.state_from_peft(peft_model, name)
        state.update(_peft_head_state(model, hf_model, name))
        unexpected = model.load_state_dict(state, strict=False).unexpected_keys
        if unexpected:  # e.g. PEFT's one prefix MLP for an encoder-decoder, where ours has one per attention kind
            raise ValueError(f"the PEFT adapter's {', '.join(unexpected[:3])} have no place in {cls.__name__} "
                             f"({model.method.name}); train it here instead")
        return model

    def _build_head(self):
        raise NotImplementedError

    @property
    def num_labels(self) -> int:
        return self.options["num_labels"]

    # -- parts ----------------------------------------------------------------------------------
    def trainable_state_dict(self) -> dict:
        """What trained (the method's record says): the prefix or prompt encoder, LoRA's adapters or the
        whole backbone, and the head."""
        return self.method.trainable_state_dict(self)

    def parameter_counts(self, verbose: bool = False) -> dict:
        """``{"trainable", "total", "percent"}``; with ``verbose`` also prints one line."""
        trainable = sum(p.numel() for p in self.parameters() if p.requires_grad)
        total = sum(p.numel() for p in self.parameters())
        res = dict(trainable=trainable, total=total, percent=100.0 * trainable / max(total, 1))
        if verbose:
            print(f"trainable params: {trainable:,} || all params: {total:,} || trainable%: {res['percent']:.4f}")
        return res

    def print_trainable_parameters(self) -> dict:
        return self.parameter_counts(verbose=True)

    def gradient_checkpointing_enable(self, **kwargs):
        """Checkpoint the backbone's layers (reentrant or not: the prefix gradient is exact either way)."""
        fn = getattr(self.backbone, "activation_checkpointing_enable", None)
        if fn is not None:
            if "gradient_checkpointing_kwargs" in kwargs:
                kwargs["activation_checkpointing_kwargs"] = kwargs.pop("gradient_checkpointing_kwargs")
            return fn(**kwargs)
        return self.backbone.gradient_checkpointing_enable(**kwargs)

    def gradient_checkpointing_disable(self):
        fn = getattr(self.backbone, "activation_checkpointing_disable", None)
        return fn() if fn is not None else self.backbone.gradient_checkpointing_disable()

    def unpatch(self):
        """Remove what the method patched into the backbone (the prefix attention, the trunk's hook), so it
        runs as it came."""
        self.method.detach(self)
        if self.trunk is not None:
            self.trunk.remove()
            self.trunk = None

    # -- save / load ---------------------------------------------------------------------------
    def save_pretrained(self, save_directory: str) -> None:
        from safetensors.torch import save_file

        os.makedirs(save_directory, exist_ok=True)
        tensors = {k: v.detach().contiguous().cpu() for k, v in _without_aliases(self.trainable_state_dict()).items()}
        save_file(tensors, os.path.join(save_directory, WEIGHTS_NAME), metadata={"format": "pt"})
        cfg = dict(task=self.task, model_class=type(self).__name__, backbone=self.backbone_name,
                   model_type=self.model_type, ptv2_kernels_version=__version__, **self.options)
        cfg.update(self.method.config_record(self))
        with open(os.path.join(save_directory, CONFIG_NAME), "w") as f:
            json.dump(cfg, f, indent=2, sort_keys=True)

    @classmethod
    def load_pretrained(cls, save_directory: str, backbone=None, **overrides):
        """Rebuild from ``save_directory`` on a fresh backbone (the saved name, or ``backbone``)."""
        from safetensors.torch import load_file

        with open(os.path.join(save_directory, CONFIG_NAME)) as f:
            cfg = json.load(f)
        if cls is not _PrefixTaskModel and cfg["model_class"] != cls.__name__:
            raise ValueError(f"{save_directory} holds a {cfg['model_class']}, not a {cls.__name__}")
        klass = _CLASSES[cfg["model_class"]]
        if backbone is None:
            if not cfg.get("backbone"):
                raise ValueError("the checkpoint does not name its backbone; pass backbone=")
            backbone = model_location(cfg["backbone"])
        keys = set(inspect.signature(_PrefixTaskModel.from_pretrained).parameters) - {"backbone", "backbone_kwargs"}
        kwargs = {k: cfg[k] for k in keys if k in cfg}
        kwargs.update(cfg.get("backbone_kwargs") or {})
        for key in ("dtype", "torch_dtype"):
            if isinstance(kwargs.get(key), str) and kwargs[key] != "auto":
                kwargs[key] = getattr(torch, kwargs[key])
        kwargs.update(overrides)
        model = klass.from_pretrained(backbone, **kwargs)
        sd = load_file(os.path.join(save_directory, WEIGHTS_NAME))
        missing, unexpected = model.load_state_dict(sd, strict=False)
        saved = set(_without_aliases(model.trainable_state_dict()))  # a tied weight is saved under one name
        missing = [k for k in missing if k in saved]
        if missing or unexpected:
            raise KeyError(f"checkpoint mismatch: missing {missing}, unexpected {unexpected}")
        return model

    # -- forward helpers ---------------------------------------------------------------------------
    def _backbone_forward(self, input_ids, attention_mask, token_type_ids, prefix_index, **kwargs):
        kw = dict(input_ids=input_ids, attention_mask=attention_mask)
        if token_type_ids is not None and "token_type_ids" in self._fwd_params:
            kw["token_type_ids"] = token_type_ids
        if self.is_decoder:
            kw["use_cache"] = False
        trunk_hidden = kwargs.pop("trunk_hidden", None)
        kw.update(kwargs)
        kw = self.method.backbone_kwargs(self, kw, prefix_index)
        if self.trunk is None:
            if trunk_hidden is not None:
                raise ValueError("trunk_hidden needs a frozen trunk (a prefix above the first layer, trunk='frozen')")
            return self.method.backbone_output(self, self.backbone(**kw))
        with self.trunk.running(trunk_hidden):
            return self.method.backbone_output(self, self.backbone(**kw))

    def train(self, mode: bool = True):
        super().train(mode)
        if getattr(self, "trunk", None) is not None:
            self.trunk.set_train_mode(mode)  # the frozen trunk stays in eval mode
        return self

    def trunk_hidden_states(self, input_ids, attention_mask=None, token_type_ids=None) -> torch.Tensor:
        """The frozen trunk's output for a batch ``(B, N, H)``: the hidden states entering the first layer
        with a prefix, computed without the layers above (what ``forward(trunk_hidden=...)`` replays)."""
        if self.trunk is None:
            raise ValueError("trunk_hidden_states needs a frozen trunk (a prefix above the first layer)")
        kw = dict(input_ids=input_ids, attention_mask=attention_mask)
        if token_type_ids is not None and "token_type_ids" in self._fwd_params:
            kw["token_type_ids"] = token_type_ids
        return self.trunk.capture(**kw)

    def _sequence_pooler(self):
        """The architecture's trainable first-token pooler for sequence heads (``Arch.head_pooler``)."""
        name = arch_of(self.backbone).head_pooler
        if name is None or self.pooling == "mean":
            return None
        module, cls = name.rsplit(".", 1)
        return getattr(importlib.import_module(f"transformers.models.{module}"), cls)(self.backbone.config)

    @property
    def pooling(self) -> str:
        return self.options.get("pooling", "auto")  # checkpoints from before the option pooled "auto"

    def _pool(self, out, attention_mask):
        if self.pooling == "mean":
            return _mean_of_real_tokens(out.last_hidden_state, attention_mask)
        pooled = getattr(out, "pooler_output", None)
        if pooled is not None:
            return pooled
        h = out.last_hidden_state
        if self.pooler is not None:
            return self.pooler(h)
        if self.is_decoder:
            if attention_mask is None:
                return h[:, -1]
            # last real token of each row (right or left padding)
            pos = torch.arange(h.shape[1], device=h.device)
            last = (attention_mask.to(torch.long) * pos).argmax(dim=1)
            return h[torch.arange(h.shape[0], device=h.device), last]
        return h[:, 0]


def _peft_head_state(model, hf_model, adapter_name) -> dict:
    """The head of a (PEFT-wrapped) transformers task model under ``model``'s names: each head module of
    ``model`` (``classifier``, ``qa_outputs``) from the attribute of the same name, unwrapped from PEFT's
    ``modules_to_save``; raises naming a head whose shape differs (RoBERTa's two-layer classifier)."""
    out = {}
    for attr, ours in model.named_children():
        if attr in ("backbone", model.method.encoder_attr) or not any(True for _ in ours.parameters()):
            continue
        theirs = getattr(hf_model, attr, None)
        saved = getattr(theirs, "modules_to_save", None)  # PEFT's trained copy of the head
        if saved is not None and adapter_name in saved:
            theirs = saved[adapter_name]
        have = theirs.state_dict() if isinstance(theirs, nn.Module) else {}
        if {k: v.shape for k, v in have.items()} != {k: v.shape for k, v in ours.state_dict().items()}:
            raise ValueError(f"{type(hf_model).__name__}.{attr} is not shaped as {type(model).__name__}.{attr} "
                             f"({type(ours).__name__}); only the adapter converts, train the head again")
        out.update({f"{attr}.{k}": v for k, v in have.items()})
    return out


def _without_aliases(state: dict) -> dict:
    """``state`` with each tensor once: a weight tied to another (an LM head to the input embeddings,
    BART's encoder and decoder embeddings to ``shared``) under its first name only, as safetensors
    stores shared memory; loading that name fills every tied name."""
    seen, out = set(), {}
    for name, t in state.items():
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), tuple(t.stride()))
        if key not in seen:
            seen.add(key)
            out[name] = t
    return out


def _mean_of_real_tokens(h, attention_mask):
    if attention_mask is None:
        return h.mean(dim=1)
    mask = attention_mask.to(h.dtype).unsqueeze(-1)
    return (h * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1)


def _extras(backbone_out) -> dict:
    """The backbone's per-layer outputs, when asked for (``output_hidden_states=True``, ...)."""
    return dict(hidden_states=getattr(backbone_out, "hidden_states", None),
                attentions=getattr(backbone_out, "attentions", None))


class PrefixModelForSequenceClassification(_PrefixTaskModel):
    task = "sequence_classification"
    reads_every_token = False  # token classification: no pooled vector, no pooler
    pools = True

    def _build_head(self):
        self.pooler = None if self.reads_every_token else self._sequence_pooler()
        self.classifier = nn.Linear(self.hidden_size, self.num_labels)
        self._to_backbone()

    def _to_backbone(self):
        p = next(self.backbone.parameters())
        for name, mod in self.named_children():
            if name != "backbone":
                mod.to(device=p.device)

    def head(self, out, attention_mask=None):
        """The head over the backbone's output ``out``: what :meth:`forward` returns without labels
        (a server runs the backbone once for rows of several tasks, then each task's head)."""
        from transformers.modeling_outputs import SequenceClassifierOutput

        pooled = self.dropout(self._pool(out, attention_mask))
        return SequenceClassifierOutput(logits=self.classifier(pooled.to(self.classifier.weight.dtype)))

    def forward(self, input_ids=None, attention_mask=None, token_type_ids=None, labels=None, prefix_index=None,
                **kwargs):
        out = self._backbone_forward(input_ids, attention_mask, token_type_ids, prefix_index, **kwargs)
        logits = self.head(out, attention_mask).logits
        loss = None
        if labels is not None:
            if self.num_labels == 1:
                loss = F.mse_loss(logits.squeeze(-1).float(), labels.float())
            else:
                loss = F.cross_entropy(logits.float().view(-1, self.num_labels), labels.view(-1))
        from transformers.modeling_outputs import SequenceClassifierOutput

        return SequenceClassifierOutput(loss=loss, logits=logits, **_extras(out))


class PrefixModelForTokenClassification(PrefixModelForSequenceClassification):
    task = "token_classification"
    reads_every_token = True
    pools = False

    def head(self, out, attention_mask=None):
        from transformers.modeling_outputs import TokenClassifierOutput

        h = self.dropout(out.last_hidden_state)
        return TokenClassifierOutput(logits=self.classifier(h.to(self.classifier.weight.dtype)))

    def forward(self, input_ids=None, attention_mask=None, token_type_ids=None, labels=None, prefix_index=None,
                **kwargs):
        out = self._backbone_forward(input_ids, attention_mask, token_type_ids, prefix_index, **kwargs)
        logits = self.head(out, attention_mask).logits
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits.float().view(-1, self.num_labels), labels.view(-1), ignore_index=-100)
        from transformers.modeling_outputs import TokenClassifierOutput

        return TokenClassifierOutput(loss=loss, logits=logits, **_extras(out))


class PrefixModelForQuestionAnswering(PrefixModelForSequenceClassification):
    """Extractive QA: ``num_labels`` is 2 (start, end), as in transformers' QA heads."""

    task = "question_answering"
    pools = False

    @classmethod
    def from_pretrained(cls, backbone, *, num_labels: int = 2, **kwargs):
        return super().from_pretrained(backbone, num_labels=num_labels, **kwargs)

    def _build_head(self):
        self.qa_outputs = nn.Linear(self.hidden_size, self.num_labels)
        self._to_backbone()

    def head(self, out, attention_mask=None):
        from transformers.modeling_outputs import QuestionAnsweringModelOutput

        logits = self.qa_outputs(out.last_hidden_state.to(self.qa_outputs.weight.dtype))
        start_logits, end_logits = logits.split(1, dim=-1)
        return QuestionAnsweringModelOutput(start_logits=start_logits.squeeze(-1).contiguous(),
                                            end_logits=end_logits.squeeze(-1).contiguous())

    def forward(self, input_ids=None, attention_mask=None, token_type_ids=None, start_positions=None,
                end_positions=None, prefix_index=None, **kwargs):
        out = self._backbone_forward(input_ids, attention_mask, token_type_ids, prefix_index, **kwargs)
        spans = self.head(out, attention_mask)
        start_logits, end_logits = spans.start_logits, spans.end_logits
        loss = None
        if start_positions is not None and end_positions is not None:
            ignored = start_logits.size(1)
            s = start_positions.view(-1).clamp(0, ignored)
            e = end_positions.view(-1).clamp(0, ignored)
            loss = (F.cross_entropy(start_logits.float(), s, ignore_index=ignored)
                    + F.cross_entropy(end_logits.float(), e, ignore_index=ignored)) / 2
        from transformers.modeling_outputs import QuestionAnsweringModelOutput

        return QuestionAnsweringModelOutput(loss=loss, start_logits=start_logits, end_logits=end_logits,
                                            **_extras(out))


class PrefixModelForMultipleChoice(PrefixModelForSequenceClassification):
    """Inputs ``(B, C, L)``; logits ``(B, C)``; ``labels`` ``(B,)`` the right choice."""

    task = "multiple_choice"

    @classmethod
    def from_pretrained(cls, backbone, *, num_labels: int = 1, **kwargs):
        return super().from_pretrained(backbone, num_labels=num_labels, **kwargs)

    def _build_head(self):
        self.pooler = self._sequence_pooler()
        self.classifier = nn.Linear(self.hidden_size, 1)
        self._to_backbone()

    def forward(self, input_ids=None, attention_mask=None, token_type_ids=None, labels=None, prefix_index=None,
                **kwargs):
        B, C = input_ids.shape[:2]
        flat = lambda t: None if t is None else t.reshape(B * C, *t.shape[2:])  # noqa: E731
        if prefix_index is not None:
            prefix_index = torch.as_tensor(prefix_index, device=input_ids.device).reshape(-1)
            prefix_index = prefix_index.expand(B) if prefix_index.numel() == 1 else prefix_index
            prefix_index = prefix_index.repeat_interleave(C)
        mask = flat(attention_mask)
        out = self._backbone_forward(flat(input_ids), mask, flat(token_type_ids), prefix_index, **kwargs)
        logits = self.head(out, mask).logits.view(B, C)  # the head scores each (row, choice) alone
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits.float(), labels.view(-1))
        from transformers.modeling_outputs import MultipleChoiceModelOutput

        return MultipleChoiceModelOutput(loss=loss, logits=logits, **_extras(out))


class PrefixModelForGeneration(_PrefixTaskModel):
    """Prefix-Tuning's own job: a causal LM (GPT-2, LLaMA, Qwen, Mistral) or an encoder-decoder (BART, T5)
    with its own LM head, frozen; the prefix trains (on an encoder-decoder Li and Liang's three: encoder
    self-attention, decoder self-attention, cross-attention), or LoRA, or everything (finetune).

    ``forward(input_ids, attention_mask, labels)``: the backbone's own loss, on the tokens whose label is
    not -100 (a decoder's labels mark the target part of ``source <sep> target``; an encoder-decoder's
    are the target, which it shifts into its decoder inputs). :meth:`generate` returns the new tokens
    only, for a bank per row with ``prefix_index``. Every layer runs live (no frozen trunk: a decoder's
    cached generation runs its layers on the new tokens), and the input-only prompt methods are refused
    (their prompt would shift the labels)."""

    task = "generation"
    frozen_trunk = False

    @staticmethod
    def load_backbone(backbone, backbone_kwargs):
        from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSeq2SeqLM, PreTrainedModel

        if isinstance(backbone, PreTrainedModel):
            if not backbone.can_generate():
                raise TypeError(f"backbone must be a model with an LM head that can generate, got "
                                f"{type(backbone).__name__}")
            arch_of(backbone)
            return backbone, getattr(backbone.config, "_name_or_path", None) or None
        if not isinstance(backbone, (str, os.PathLike)):
            raise TypeError(f"backbone must be a name, a path or a transformers PreTrainedModel, got {type(backbone)}")
        config = AutoConfig.from_pretrained(str(backbone))
        auto = AutoModelForSeq2SeqLM if getattr(config, "is_encoder_decoder", False) else AutoModelForCausalLM
        model = auto.from_pretrained(str(backbone), **backbone_kwargs)
        arch_of(model)
        return model, str(backbone)

    def _build_head(self):
        if self.method.input_positions:
            raise ValueError(f"method {self.method.name!r} puts its prompt in the input, which would shift a "
                             "generation model's labels; use prefix, lora or finetune")

    def forward(self, input_ids=None, attention_mask=None, labels=None, prefix_index=None, **kwargs):
        kw = dict(input_ids=input_ids, attention_mask=attention_mask, labels=labels, use_cache=False, **kwargs)
        return self.backbone(**self.method.backbone_kwargs(self, kw, prefix_index))

    @torch.no_grad()
    def generate(self, input_ids, attention_mask=None, prefix_index=None, **generate_kwargs):
        """The backbone's ``generate`` (KV cache on; the prefix stays out of the cache), new tokens only."""
        kw = self.method.backbone_kwargs(self, dict(generate_kwargs), prefix_index)
        out = self.backbone.generate(input_ids=input_ids, attention_mask=attention_mask, **kw)
        # an encoder-decoder's output starts with its decoder start token (BART's is its EOS), a decoder's
        # with the prompt
        return out[:, 1:] if self.backbone.config.is_encoder_decoder else out[:, input_ids.shape[1]:]


_CLASSES = {c.__name__: c for c in (PrefixModelForSequenceClassification, PrefixModelForTokenClassification,
                                    PrefixModelForQuestionAnswering, PrefixModelForMultipleChoice,
                                    PrefixModelForGeneration)}


def load_pretrained(save_directory: str, backbone=None, **overrides):
    """Load any task model saved by ``save_pretrained`` (the class is read from its config)."""
    return _PrefixTaskModel.load_pretrained(save_directory, backbone=backbone, **overrides)


def load_prefix_attention(model, directory: Optional[str] = None, backend: Optional[str] = None, *,
                          model_class=None, **from_pretrained_kwargs):
    """Re-apply the prefix a patched model was saved with (its ``config.ptv2_prefix`` says how it was
    patched); returns the model, patched.

    ``model`` is either a ``save_pretrained`` folder, loaded here with ``model_class`` (a transformers
    class such as ``AutoModelForSequenceClassification``; ``from_pretrained_kwargs`` go to its
    ``from_pretrained``), or a model already loaded from one with ``from_pretrained``, which then
    reports the ``prefix_encoder.*`` weights as UNEXPECTED: the class it builds has no such module; they
    are restored here all the same. The encoder's weights are read from ``directory`` (default: the
    folder, or ``model.name_or_path``)."""
    from safetensors import safe_open

    if isinstance(model, (str, os.PathLike)):
        if model_class is None:
            raise TypeError("load_prefix_attention(folder) needs model_class, the transformers class to load it "
                            "with (e.g. AutoModelForSequenceClassification)")
        directory = directory or str(model)
        model = _load_expecting_prefix(model_class, directory, **from_pretrained_kwargs)
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
    return apply_prefix_attention(model, encoder, backend, record["position_offset"], attention=record["attention"])


def _load_expecting_prefix(model_class, directory: str, **kwargs):
    """``model_class.from_pretrained(directory)`` without transformers calling the saved
    ``prefix_encoder.*`` weights UNEXPECTED ("not ok if you expect identical arch"): the class it builds
    has no prefix module yet, and :func:`load_prefix_attention` restores them right after. A subclass
    made for this one load ignores exactly those keys; the model returned is of the class asked for."""
    from transformers import AutoConfig

    config = kwargs.pop("config", None) or AutoConfig.from_pretrained(directory)
    mapping = getattr(model_class, "_model_mapping", None)  # an Auto class: the class it would build
    concrete = mapping[type(config)] if mapping is not None else model_class
    ignored = [*(concrete._keys_to_ignore_on_load_unexpected or ()), r"^prefix_encoder\."]
    loader = type(concrete.__name__, (concrete,), {"_keys_to_ignore_on_load_unexpected": ignored,
                                                    "__module__": concrete.__module__})
    model = loader.from_pretrained(directory, config=config, **kwargs)
    model.__class__ = concrete
    return model
