"""FSDP2 and activation checkpointing, applied to a model from outside it."""

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import (
    CPUOffloadPolicy,
    FSDPModule,
    MixedPrecisionPolicy,
    OffloadPolicy,
    fully_shard,
)
from torch.distributed.tensor import DTensor
from transformers import PreTrainedModel


def apply_fsdp(
    root: nn.Module,
    mesh: DeviceMesh,
    *,
    layer_classes: set[str],
    param_dtype: torch.dtype | None,
    reduce_dtype: torch.dtype | None,
    offload: bool,
    reshard_after_forward: bool,
) -> None:
    """``fully_shard`` every module whose class is in ``layer_classes``, then ``root``.

    Gradients are summed over ranks, not averaged: the losses divide by global counts already
    (docs/design.md, "Global normalisation").

    Args:
        root: the module whose forward the role calls (its parameters are sharded too).
        mesh: shard over its ``dp_shard`` dimension.
        layer_classes: class names of the decoder layers, each its own FSDP unit.
        param_dtype: compute dtype of the gathered parameters (None: as stored, float32).
        reduce_dtype: dtype of the gradient reduction (None: the parameters').
        offload: keep parameters, gradients and optimizer state in host memory.
        reshard_after_forward: free each layer's gathered weights after its forward.
    """
    if not layer_classes:
        raise ValueError(f"{type(root).__name__} names no decoder layer class to shard")
    kwargs: dict[str, Any] = {
        "mesh": mesh,
        "mp_policy": MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=reduce_dtype),
        "offload_policy": CPUOffloadPolicy() if offload else OffloadPolicy(),
    }
    for module in root.modules():
        if type(module).__name__ in layer_classes:
            fully_shard(module, reshard_after_forward=reshard_after_forward, **kwargs)
    fully_shard(root, **kwargs)
    for module in root.modules():
        if isinstance(module, FSDPModule):
            # A plain SUM (not NCCL's PREMUL_SUM) is what gloo supports.
            module.set_gradient_divide_factor(1.0)
            module.set_force_sum_reduction_for_comms(True)


def apply_activation_checkpointing(model: PreTrainedModel) -> None:
    """Recompute each decoder layer in backward (a Hugging Face model's own switch)."""
    model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})


def reshard_all(model: nn.Module) -> None:
    """Free every gathered parameter, so that the next forward gathers the shards afresh.

    A no-grad forward leaves the root's gathered weights in place (FSDP2 keeps the root
    unsharded after forward); in-place writes to the shards are seen only after this.
    """
    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.reshard()


@contextlib.contextmanager
def weights_kept_gathered(root: nn.Module, *, reshard_after_forward: bool) -> Iterator[None]:
    """Inside the block, each FSDP unit keeps its weights once a forward has gathered them.

    The first forward through ``root`` in the block gathers every unit (a collective on every
    rank); after it, forwards of ``root`` or of any module inside it run without collectives, so
    ranks may run different numbers of them (a decoding loop). On exit every unit is resharded
    and resharding after forward is as ``apply_fsdp`` left it: ``reshard_after_forward`` for the
    decoder layers, never for the root (FSDP2's choice for a root).

    Args:
        root: the module ``apply_fsdp`` sharded.
        reshard_after_forward: the value ``apply_fsdp`` was given.
    """
    assert isinstance(root, FSDPModule), "apply_fsdp shards the root too"
    root.set_reshard_after_forward(False)
    try:
        yield
    finally:
        root.set_reshard_after_forward(reshard_after_forward)
        root.set_reshard_after_forward(False, recurse=False)
        reshard_all(root)


def local_shards(model: nn.Module) -> list[torch.Tensor]:
    """This rank's shard of every parameter (views: writing them writes the parameters)."""
    reshard_all(model)
    return [p.to_local() if isinstance(p, DTensor) else p for p in model.parameters()]
