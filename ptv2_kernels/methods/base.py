"""The record every training method fills in: what it attaches to a task model's frozen (or not)
backbone, which options it reads, what trains and is saved, how the backbone is called, and how a PEFT
adapter of its kind converts. The task models (``hf/models.py``), the trainer and the CLI ask the record;
none of them branches on a method's name. Importing the records is light (no torch): the CLI checks
flags against them before anything heavy loads."""

from __future__ import annotations

from typing import Dict, FrozenSet, Optional, Tuple


class Method:
    """One method of the family. Subclasses set the class attributes and override the hooks they need.

    - ``name``: what ``--method`` and the saved config call it.
    - ``summary``: one line for ``--help`` and the README.
    - ``default_lr``: the learning rate ``ptv2 train`` uses when none is given.
    - ``options``: the task-model options (``TrainConfig`` fields of the same names) that only this
      method reads; giving one of another method's options is an error.
    - ``bank``: several tasks can share one backbone through a bank chosen per row (``prefix_index``).
    - ``trains_backbone``: backbone weights (all, or adapters inside them) receive gradients.
    - ``input_positions``: the method's vectors take the first input positions (so ``max_length`` plus
      the prompt must fit the position table).
    - ``shards_backbone``: the backbone can be sharded with FSDP2 (``ptv2 train --fsdp``): nothing inside it
      trains and nothing reads its weights outside its forward.
    - ``peft_type``: PEFT's ``PeftType`` name of the same method (for ``from_peft``), or None.
    - ``encoder_attr``: the task model's attribute holding what trains besides the head, when it is one
      module that ``--init-from`` can copy.
    """

    name: str = ""
    summary: str = ""
    default_lr: float = 1e-2
    options: FrozenSet[str] = frozenset()
    bank: bool = False
    trains_backbone: bool = False
    input_positions: bool = False
    shards_backbone: bool = False
    peft_type: Optional[str] = None
    encoder_attr: Optional[str] = None

    # -- building -------------------------------------------------------------------------------
    def attach(self, model, dims: dict) -> None:
        """Add what trains to ``model`` (a task model whose ``backbone`` and ``options`` are set) and set
        the backbone's trainable flags."""
        raise NotImplementedError

    def detach(self, model) -> None:
        """Undo what :meth:`attach` did to the backbone (hooks, patches); the default has none."""

    def first_layer(self, options: dict) -> int:
        """The first layer (0-based) whose computation depends on what trains: the layers below it and
        the embeddings are a frozen trunk (``hf/trunk.py``). 0 for methods that train at the input or
        inside every layer."""
        return 0

    def encoder(self, model):
        return getattr(model, self.encoder_attr) if self.encoder_attr else None

    def trainable_state_dict(self, model) -> Dict:
        """What trained, by the task model's parameter names (saved by ``save_pretrained``): by default
        everything outside the backbone (the method's module and the head)."""
        return {k: v for k, v in model.state_dict().items() if not k.startswith("backbone.")}

    def config_record(self, model) -> dict:
        """Extra entries for the saved ``ptv2_config.json`` (the encoder's own configuration)."""
        enc = self.encoder(model)
        return {self.encoder_attr: enc.config_dict()} if enc is not None and hasattr(enc, "config_dict") else {}

    # -- running --------------------------------------------------------------------------------
    def backbone_kwargs(self, model, kw: dict, prefix_index) -> dict:
        """The keyword arguments of the backbone call (``input_ids``, ``attention_mask``, ...)."""
        if prefix_index is not None:
            raise ValueError(f"prefix_index needs a bank (several tasks), which --method {self.name} "
                             f"{'does not have' if not self.bank else 'was not built with (num_tasks)'}")
        return kw

    def backbone_output(self, model, out):
        """The backbone's output as the heads read it (token positions only)."""
        return out

    # -- PEFT -----------------------------------------------------------------------------------
    def options_from_peft(self, peft_config) -> dict:
        """Task-model options equivalent to a PEFT config of this method's kind."""
        raise NotImplementedError(f"--method {self.name} has no PEFT counterpart")

    def state_from_peft(self, peft_model, adapter_name: str) -> Dict:
        """The adapter's weights under this project's task-model names."""
        raise NotImplementedError(f"--method {self.name} has no PEFT counterpart")


def encoder_entry(state: Dict, rows_key: str, rows: int, entry: Optional[int]) -> Dict:
    """One task's slice of a bank's state dict: the ``rows`` rows of entry ``entry`` in ``rows_key``
    (the per-task table), every other tensor (a shared reparameterization) as it is."""
    if entry is None:
        return dict(state)
    out = dict(state)
    out[rows_key] = state[rows_key][entry * rows:(entry + 1) * rows]
    return out


def shape_mismatch(have: Dict, want: Dict) -> Tuple[str, ...]:
    """Names whose presence or shape differ between two state dicts."""
    names = sorted(set(have) | set(want))
    return tuple(n for n in names if n not in have or n not in want or have[n].shape != want[n].shape)
