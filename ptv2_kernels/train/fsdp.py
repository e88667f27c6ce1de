"""``ptv2 train --fsdp`` under torchrun: the frozen backbone sharded over the processes with FSDP2
(``torch.distributed.fsdp.fully_shard``), the trained parts (prefix encoder, task head) replicated.

- Groups: the input embeddings, each transformer layer, then the rest of the backbone (its final
  norm; a generation model's LM head, and the embeddings when the head is tied to them) are one
  ``fully_shard`` group each. A process stores 1/N of every backbone weight and gathers a
  group's full weights only while it runs (FSDP2 gathers the next group ahead); the embeddings are
  gathered once per forward and never in backward, where nothing below them needs a gradient.
- The trained parts are not sharded. They are small (a prefix of P positions over L layers is
  ``2 * L * Hkv * D * P`` floats: 2.6 M for Llama-3-70B at P = 16, 10 MB in float32), so sharding would
  save little and cost a gather per forward. Kept whole, they keep their own dtype (float32 beside a
  bf16 backbone, where one FSDP group would need one dtype), the prefix encoder runs once per forward
  as it does without FSDP, every process holds their full tensors and optimizer state (so rank 0 writes
  checkpoints in the format of a one-process run), and their gradients are averaged over the processes
  by :func:`average_gradients`, one all-reduce per optimizer step, as DDP averages them.
- Every group, the root included, reshards after its forward. FSDP2 keeps the root's parameters
  gathered from forward to backward by default, so after an evaluation (no backward) they would stay
  gathered, and rank 0 alone reading the model's ``state_dict`` (saving ``best/``) would reshard its
  copy but not the others', after which the processes would disagree on what the next forward gathers.
"""

from __future__ import annotations

import math
from typing import List

import torch
import torch.distributed as dist
from torch import nn

from ..hf.trunk import transformer_layers


def shard_backbone(backbone: nn.Module, device: torch.device, world_size: int) -> None:
    """Shard ``backbone`` in place over ``world_size`` processes (the default process group); the
    shards move to ``device``."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh(device.type, (world_size,))
    embeddings, head = backbone.get_input_embeddings(), backbone.get_output_embeddings()
    # an LM head tied to the input embeddings (GPT-2, BART, T5) shares their weight: both stay in the root
    tied = head is not None and head.weight is embeddings.weight
    for group in ([] if tied else [embeddings]) + transformer_layers(backbone):
        fully_shard(group, mesh=mesh, reshard_after_forward=True)
    fully_shard(backbone, mesh=mesh, reshard_after_forward=True)


def is_sharded(model: nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return any(isinstance(m, FSDPModule) for m in model.modules())


def spare_batches(n_features: int, n_mine: int, world_size: int, batch_size: int) -> int:
    """How many batches a process taking ``n_mine`` of ``n_features`` features (every ``world_size``-th)
    runs fewer than the busiest (rank 0). With a sharded backbone every process must run as many
    forwards: each forward gathers the layers from all of them."""
    return math.ceil(math.ceil(n_features / world_size) / batch_size) - math.ceil(n_mine / batch_size)


def average_gradients(params: List[nn.Parameter], world_size: int) -> None:
    """Replace each parameter's gradient by its mean over the processes. A parameter that got no
    gradient on any process keeps none (as in a one-process run, the optimizer skips it); one that got a
    gradient on some processes only counts zeros for the others. One all-reduce: the gradients and a
    has-gradient flag per parameter in one flat buffer."""
    ref = params[0]
    flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1).to(torch.float32)
                      for p in params]
                     + [torch.tensor([float(p.grad is not None) for p in params], device=ref.device)])
    dist.all_reduce(flat)
    flags = flat[-len(params):]
    offset = 0
    for p, present in zip(params, flags.tolist()):
        n = p.numel()
        if present:
            p.grad = (flat[offset:offset + n] / world_size).view_as(p).to(p.dtype)
        offset += n
