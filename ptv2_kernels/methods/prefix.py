"""P-Tuning v2 and Prefix-Tuning: trained key/value vectors in front of the keys and values of every
layer (or of ``prefix_layers`` only), read in place by the fused op; the backbone is frozen."""

from __future__ import annotations

import re
from typing import List, Optional

from .base import Method

TRUNKS = ("frozen", "train")  # below the first prefix layer: eval mode without autograd, or as the rest


class PrefixMethod(Method):
    name = "prefix"
    summary = "P-Tuning v2 / Prefix-Tuning: a prefix of keys and values at every layer (or --prefix-layers)"
    default_lr = 3e-2
    options = frozenset({"prefix_len", "projection", "prefix_hidden", "prefix_dropout", "prefix_layers",
                         "position_offset", "attention", "backend", "trunk"})
    bank = True
    # the prefix is read inside each attention call, from an encoder outside the backbone
    shards_backbone = True
    peft_type = "PREFIX_TUNING"
    encoder_attr = "prefix_encoder"

    def attach(self, model, dims):
        from ..hf.patch import patch_attention
        from ..prefix import PrefixEncoder

        o = model.options
        model.prefix_encoder = PrefixEncoder(
            dims["num_layers"], dims["num_kv_heads"], dims["head_dim"], o["prefix_len"],
            projection=o["projection"], prefix_hidden=o["prefix_hidden"], hidden_size=dims["hidden_size"],
            num_tasks=o.get("num_tasks"), prefix_dropout=o["prefix_dropout"], layers=o.get("prefix_layers"),
            groups=dims["stacks"] if o["projection"] else None)  # Li and Liang's MLP per attention kind
        model.prefix_encoder.to(next(model.backbone.parameters()).device)
        model.backbone.requires_grad_(False)
        # the encoder is the task model's own child (saved as "prefix_encoder.*"), so the backbone is
        # patched without taking it as a submodule as well
        patch_attention(model.backbone, model.prefix_encoder, backend=o["backend"],
                        position_offset=o["position_offset"], attention=o["attention"])

    def first_layer(self, options):
        layers = options.get("prefix_layers")
        return min(layers) if layers else 0

    def detach(self, model):
        from ..hf.patch import remove_prefix_attention

        remove_prefix_attention(model.backbone)

    def backbone_kwargs(self, model, kw, prefix_index):
        if prefix_index is not None:
            kw["prefix_index"] = prefix_index  # the patch picks each row's bank entry
        return kw

    def options_from_peft(self, peft_config):
        return dict(prefix_len=peft_config.num_virtual_tokens, projection=bool(peft_config.prefix_projection),
                    prefix_hidden=peft_config.encoder_hidden_size, position_offset="shifted", prefix_dropout=0.0)

    def state_from_peft(self, peft_model, adapter_name):
        sd = peft_model.prompt_encoder[adapter_name].state_dict()
        return {"prefix_encoder." + k.replace("transform.", "trans."): v for k, v in sd.items()}


def parse_prefix_layers(spec: str, num_layers: Optional[int] = None) -> Optional[List[int]]:
    """``--prefix-layers`` as 0-based layer indices: ``all``, 1-based numbers and inclusive ranges
    (``4-6``, ``1,3,5-6``), or the top k layers (``top2``). Without ``num_layers`` only the syntax is
    checked (``top``-k and ranges are resolved against the model later); raises ``ValueError`` saying
    what was expected."""
    text = spec.strip().lower()
    if text == "all":
        return None if num_layers is None else list(range(num_layers))
    top = re.fullmatch(r"top(\d+)", text)
    if top:
        k = int(top.group(1))
        if k < 1 or (num_layers is not None and k > num_layers):
            raise ValueError(f"must name 1 to {num_layers or 'the model'}'s layers, got {spec!r}")
        return None if num_layers is None else list(range(num_layers - k, num_layers))
    layers = set()
    for part in text.split(","):
        m = re.fullmatch(r"(\d+)(?:-(\d+))?", part.strip())
        if not m:
            raise ValueError(f"must be all, topK, or 1-based layers and ranges such as 4-6 or 1,3,5-6, got {spec!r}")
        lo, hi = int(m.group(1)), int(m.group(2) or m.group(1))
        if lo < 1 or hi < lo or (num_layers is not None and hi > num_layers):
            raise ValueError(f"must name layers 1 to {num_layers or 'L'} with ranges low-high, got {spec!r}")
        layers.update(range(lo - 1, hi))
    return sorted(layers)
