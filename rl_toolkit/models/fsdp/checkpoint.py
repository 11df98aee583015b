"""Sharded checkpoints of a role's model and optimizer, and the Hugging Face export.

Weights and optimizer state are written with torch.distributed.checkpoint (DCP): each rank
writes its own shards, and any number of ranks can read them back. Everything is read through
``rl_toolkit.utils.safe_load``, which never runs code from a checkpoint. State dict names are
the Hugging Face model's, so a checkpoint does not depend on the role's wrapper module.
"""

import os
from typing import cast

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from transformers import PretrainedConfig, PreTrainedModel
from transformers.tokenization_utils_base import PreTrainedTokenizerBase

from rl_toolkit.utils.hf_export import load_generation_config, save_hf_model, tied_parameter_names
from rl_toolkit.utils.safe_load import load_dcp, load_weights_only

SCHEDULER_FILE = "scheduler.pt"  # torch.save of plain numbers and lists: weights_only loadable


def save_model(hf_model: PreTrainedModel, path: str) -> None:
    """Write this rank's weight shards into the DCP folder ``path`` (collective)."""
    dcp.save({"model": get_model_state_dict(hf_model)}, checkpoint_id=path)


def load_model(hf_model: PreTrainedModel, path: str) -> None:
    """Read the weights written by ``save_model``, with any number of ranks (collective)."""
    state = get_model_state_dict(hf_model)
    load_dcp({"model": state}, path)
    set_model_state_dict(hf_model, state)


def save_optimizer(
    hf_model: PreTrainedModel,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    path: str,
) -> None:
    """Write the optimizer's shards (DCP) and, from rank 0, the scheduler (collective)."""
    dcp.save({"optimizer": get_optimizer_state_dict(hf_model, optimizer)}, checkpoint_id=path)
    if dist.get_rank() == 0:
        torch.save(scheduler.state_dict(), os.path.join(path, SCHEDULER_FILE))


def load_optimizer(
    hf_model: PreTrainedModel,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    path: str,
) -> None:
    """Read what ``save_optimizer`` wrote (collective)."""
    state = get_optimizer_state_dict(hf_model, optimizer)
    load_dcp({"optimizer": state}, path)
    set_optimizer_state_dict(hf_model, optimizer, state)
    scheduler.load_state_dict(load_weights_only(os.path.join(path, SCHEDULER_FILE)))


def export_hf(
    hf_model: PreTrainedModel,
    path: str,
    *,
    model_name: str,
    hf_config: PretrainedConfig,
    tokenizer: PreTrainedTokenizerBase,
    dtype: torch.dtype,
    max_shard_size: int | None,
) -> None:
    """Gather the full weights on rank 0 and write a folder ``from_pretrained`` loads.

    See ``rl_toolkit.utils.hf_export.save_hf_model`` for the files (config, generation config,
    weights with tied ones stored once, sharded above ``max_shard_size`` bytes, tokenizer).
    """
    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    state = get_model_state_dict(hf_model, options=options)  # empty off rank 0
    if dist.get_rank() == 0:
        save_hf_model(
            path,
            state_dict=cast(dict[str, torch.Tensor], state),  # full_state_dict: plain tensors
            tied_names=tied_parameter_names(hf_model),
            hf_config=hf_config,
            generation_config=load_generation_config(model_name, hf_config),
            tokenizer=tokenizer,
            dtype=dtype,
            max_shard_size=max_shard_size,
        )
    dist.barrier()
