"""P-Tuning v2 task models: a frozen backbone, a trained prefix, a small trained head.

Four tasks, one shape::

    model = PrefixModelForSequenceClassification.from_pretrained(
        "roberta-large", num_labels=2, prefix_len=8, projection=False)
    out = model(input_ids, attention_mask, labels=labels)   # out.loss, out.logits
    model.save_pretrained("ckpt")                              # prefix + head, safetensors + JSON
    model = PrefixModelForSequenceClassification.load_pretrained("ckpt")

- ``method="prefix"`` (default): every backbone weight has ``requires_grad=False`` (the backbone still
  follows ``train()``/``eval()``: its dropouts run during training, as in the authors' recipe); the
  prefix encoder and the head train.
- ``method="finetune"``: the same head on a trainable backbone and no prefix (the baseline).
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
from typing import Optional

import torch
from torch import nn
from torch.nn import functional as F

from .._version import __version__
from ..prefix import PrefixEncoder
from .arch import arch_of, model_dims
from .location import model_location
from .patch import apply_prefix_attention, patch_attention, remove_prefix_attention

__all__ = ["PrefixModelForSequenceClassification", "PrefixModelForTokenClassification",
           "PrefixModelForQuestionAnswering", "PrefixModelForMultipleChoice", "load_pretrained",
           "load_prefix_attention", "trained_pooling"]

CONFIG_NAME = "ptv2_config.json"
POOLINGS = ("auto", "mean")  # sequence heads: the authors' rule, or the mean of the real tokens
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
        method = options["method"]
        if method not in ("prefix", "finetune"):
            raise ValueError(f"method must be 'prefix' or 'finetune', got {method!r}")
        if options.get("pooling", "auto") not in POOLINGS:
            raise ValueError(f"pooling must be one of {POOLINGS}, got {options['pooling']!r}")
        if options.get("pooling", "auto") != "auto" and not self.pools:
            raise ValueError(f"pooling applies to sequence and multiple-choice heads; a {type(self).__name__} "
                             f"reads every token, got pooling={options['pooling']!r}")
        if method == "prefix":
            self.prefix_encoder = PrefixEncoder(
                dims["num_layers"], dims["num_kv_heads"], dims["head_dim"], options["prefix_len"],
                projection=options["projection"], prefix_hidden=options["prefix_hidden"],
                hidden_size=dims["hidden_size"], num_tasks=options.get("num_tasks"),
                prefix_dropout=options["prefix_dropout"])
            p = next(backbone.parameters())
            self.prefix_encoder.to(p.device)
            backbone.requires_grad_(False)
            # the encoder is this model's own child (saved as "prefix_encoder.*"), so the backbone is
            # patched without taking it as a submodule as well
            patch_attention(backbone, self.prefix_encoder, backend=options["backend"],
                            position_offset=options["position_offset"], attention=options["attention"])
        else:
            self.prefix_encoder = None
            backbone.requires_grad_(True)
        self._build_head()

    # -- construction -------------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, backbone, *, num_labels: int = 2, prefix_len: int = 16, projection: bool = False,
                        prefix_hidden: int = 512, prefix_dropout: float = 0.0, backend: Optional[str] = None,
                        position_offset: str = "zero", attention: str = "prefix", method: str = "prefix",
                        num_tasks: Optional[int] = None, pooling: str = "auto", **backbone_kwargs):
        """Build the task model on ``backbone`` (a hub name, a local path, or a built PreTrainedModel;
        a model with a head contributes its base model). ``backbone_kwargs`` go to
        ``AutoModel.from_pretrained``. ``num_tasks`` makes the prefix a bank (forward takes
        ``prefix_index=``). ``prefix_dropout`` (the authors' recipes use 0.1) is off by default: on
        MiniLM SST-2, 0.1 learned 1.0 point less (bench/results/cpu/quality). ``pooling``: what sequence heads read, ``"auto"`` (the authors' rule) or
        ``"mean"`` (the mean of the real tokens, for sentence-embedding backbones)."""
        model, name = _load_backbone(backbone, backbone_kwargs)
        options = dict(num_labels=int(num_labels), prefix_len=int(prefix_len), projection=bool(projection),
                       prefix_hidden=int(prefix_hidden), prefix_dropout=float(prefix_dropout), backend=backend,
                       position_offset=position_offset, attention=attention, method=method,
                       num_tasks=num_tasks, pooling=pooling, backbone_kwargs=_jsonable(backbone_kwargs))
        return cls(model, options, backbone_name=name)

    def _build_head(self):
        raise NotImplementedError

    @property
    def num_labels(self) -> int:
        return self.options["num_labels"]

    # -- parts ----------------------------------------------------------------------------------
    def trainable_state_dict(self) -> dict:
        """What trained: the prefix encoder and the head (everything for ``method='finetune'``)."""
        sd = self.state_dict()
        if self.options["method"] == "finetune":
            return sd
        return {k: v for k, v in sd.items() if not k.startswith("backbone.")}

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
        """Remove the prefix attention from the backbone (it runs as it came)."""
        if self.prefix_encoder is not None:
            remove_prefix_attention(self.backbone)

    # -- save / load ---------------------------------------------------------------------------
    def save_pretrained(self, save_directory: str) -> None:
        from safetensors.torch import save_file

        os.makedirs(save_directory, exist_ok=True)
        tensors = {k: v.detach().contiguous().cpu() for k, v in self.trainable_state_dict().items()}
        save_file(tensors, os.path.join(save_directory, WEIGHTS_NAME), metadata={"format": "pt"})
        cfg = dict(task=self.task, model_class=type(self).__name__, backbone=self.backbone_name,
                   model_type=self.model_type, ptv2_kernels_version=__version__, **self.options)
        if self.prefix_encoder is not None:
            cfg["prefix_encoder"] = self.prefix_encoder.config_dict()
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
        keys = ("num_labels", "prefix_len", "projection", "prefix_hidden", "prefix_dropout", "backend",
                "position_offset", "attention", "method", "num_tasks", "pooling")
        kwargs = {k: cfg[k] for k in keys if k in cfg}
        kwargs.update(cfg.get("backbone_kwargs") or {})
        for key in ("dtype", "torch_dtype"):
            if isinstance(kwargs.get(key), str) and kwargs[key] != "auto":
                kwargs[key] = getattr(torch, kwargs[key])
        kwargs.update(overrides)
        model = klass.from_pretrained(backbone, **kwargs)
        sd = load_file(os.path.join(save_directory, WEIGHTS_NAME))
        missing, unexpected = model.load_state_dict(sd, strict=False)
        missing = [k for k in missing if k in model.trainable_state_dict()]
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
        if prefix_index is not None:
            if self.prefix_encoder is None:
                raise ValueError("prefix_index needs a prefix (method='prefix')")
            kw["prefix_index"] = prefix_index
        kw.update(kwargs)
        return self.backbone(**kw)

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
            if name not in ("backbone", "prefix_encoder"):
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


_CLASSES = {c.__name__: c for c in (PrefixModelForSequenceClassification, PrefixModelForTokenClassification,
                                    PrefixModelForQuestionAnswering, PrefixModelForMultipleChoice)}


def load_pretrained(save_directory: str, backbone=None, **overrides):
    """Load any task model saved by ``save_pretrained`` (the class is read from its config)."""
    return _PrefixTaskModel.load_pretrained(save_directory, backbone=backbone, **overrides)


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
    return apply_prefix_attention(model, encoder, backend, record["position_offset"], attention=record["attention"])
