"""Sharded checkpoints of a role's model and optimizer, and the Hugging Face export.

Weights and optimizer state are written with torch.distributed.checkpoint (DCP): each rank
writes its own shards, and any number of ranks can read them back. Everything is read through
``rl_toolkit.utils.safe_load``, which never runs code from a checkpoint. State dict names are
the Hugging Face model's, so a checkpoint does not depend on the role's wrapper module.

A checkpoint holds what training changes: the parameters that require gradients (all of them,
or only the LoRA adapters, whose frozen base model is rebuilt from the model's own weights on
resume) and the persistent buffers.
"""

import os
from typing import TYPE_CHECKING, cast

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

from rl_toolkit.models.lora import ADAPTER_NAME, lora_scalings, merged_state_dict
from rl_toolkit.utils.hf_export import (
    load_generation_config,
    save_hf_model,
    save_lora_adapter,
    tied_parameter_names,
)
from rl_toolkit.utils.safe_load import load_dcp, load_weights_only

if TYPE_CHECKING:
    import peft

SCHEDULER_FILE = "scheduler.pt"  # torch.save of plain numbers and lists: weights_only loadable


# Frozen parameters (a LoRA model's base) are left out: they are the initial weights.
_TRAINED = StateDictOptions(ignore_frozen_params=True)


def save_model(hf_model: PreTrainedModel, path: str) -> None:
    """Write this rank's shards of the trained weights into the DCP folder ``path``
    (collective)."""
    dcp.save({"model": get_model_state_dict(hf_model, options=_TRAINED)}, checkpoint_id=path)


def load_model(hf_model: PreTrainedModel, path: str) -> None:
    """Read the weights written by ``save_model``, with any number of ranks (collective)."""
    state = get_model_state_dict(hf_model, options=_TRAINED)
    load_dcp({"model": state}, path)
    # Not strict: the frozen parameters are not in `state` (every trained one is: DCP checked).
    set_model_state_dict(hf_model, state, options=StateDictOptions(strict=False))


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
    weights with tied ones stored once, sharded above ``max_shard_size`` bytes, tokenizer). LoRA
    adapters are merged into their layers' weights, under the base model's names.
    """
    state = _full_state_dict(hf_model)  # empty off rank 0
    if dist.get_rank() == 0:
        save_hf_model(
            path,
            state_dict=merged_state_dict(state, lora_scalings(hf_model)),
            tied_names=tied_parameter_names(hf_model),
            hf_config=hf_config,
            generation_config=load_generation_config(model_name, hf_config),
            tokenizer=tokenizer,
            dtype=dtype,
            max_shard_size=max_shard_size,
        )
    dist.barrier()


def export_lora_adapter(
    hf_model: PreTrainedModel,
    path: str,
    *,
    base_model: str,
    tokenizer: PreTrainedTokenizerBase,
    dtype: torch.dtype,
) -> None:
    """Gather the LoRA adapters on rank 0 and write a PEFT adapter folder over ``base_model``
    (``rl_toolkit.utils.hf_export.save_lora_adapter``)."""
    state = _full_state_dict(hf_model)  # empty off rank 0
    if dist.get_rank() == 0:
        # transformers types it as a protocol of its own; add_lora added a peft.LoraConfig.
        lora_config = cast("peft.LoraConfig", hf_model.peft_config[ADAPTER_NAME])
        save_lora_adapter(
            path,
            adapter_state=hf_model.get_adapter_state_dict(state_dict=state),
            lora_config=lora_config,
            base_model=base_model,
            tokenizer=tokenizer,
            dtype=dtype,
        )
    dist.barrier()


def _full_state_dict(hf_model: PreTrainedModel) -> dict[str, torch.Tensor]:
    """The whole state dict in host memory on rank 0, empty elsewhere (collective)."""
    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    # full_state_dict: plain tensors
    return cast(dict[str, torch.Tensor], get_model_state_dict(hf_model, options=options))
