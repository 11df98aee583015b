"""Build a Hugging Face model sharded with FSDP2, without any rank holding all of it but rank 0.

The model is built on the meta device, wrapped in the role's root module, sharded, and then
filled: rank 0 loads the weights (or initialises them randomly from a seed) in host memory and
broadcasts them shard by shard, so the weights do not depend on the number of workers.
"""

import copy
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
from torch.distributed.device_mesh import DeviceMesh
from transformers import PretrainedConfig, PreTrainedModel

from rl_toolkit.models.fsdp.parallelize import apply_activation_checkpointing, apply_fsdp

PRECISIONS = {"float32": torch.float32, "bfloat16": torch.bfloat16}

RootT = TypeVar("RootT", bound=nn.Module)  # the role's root module, e.g. LogprobModel


@dataclass(frozen=True)
class FSDPOptions:
    """How a role's model is sharded and computed.

    compute_dtype: the dtype of the forward (bfloat16: fp32 master weights and reductions).
    offload: parameters, gradients and optimizer state in host memory.
    reshard_after_forward: free each layer's gathered weights after its forward (ZeRO-3).
    activation_checkpointing: recompute each decoder layer in backward.
    """

    compute_dtype: torch.dtype
    offload: bool
    reshard_after_forward: bool
    activation_checkpointing: bool


class AutoModelClass(Protocol):
    """What ModelSource needs of a Hugging Face auto class such as ``AutoModelForCausalLM``."""

    def from_config(self, config: PretrainedConfig, **kwargs: Any) -> PreTrainedModel: ...

    def from_pretrained(
        self, pretrained_model_name_or_path: str, **kwargs: Any
    ) -> PreTrainedModel: ...


@dataclass(frozen=True)
class ModelSource:
    """Where the initial weights come from.

    model_class: the Hugging Face auto class, e.g. ``AutoModelForCausalLM``.
    model_name: hub id or local folder.
    hf_config: its config (dropout already off where the role wants it).
    attn_implementation: the name transformers builds the attention with.
    random_init: build from ``hf_config`` with random weights seeded by ``seed`` instead.
    seed: the seed of ``random_init``, and of the weights ``model_name`` lacks (a new head).
    section: the config section these come from ("policy"), for error messages.
    """

    model_class: AutoModelClass
    model_name: str
    hf_config: PretrainedConfig
    attn_implementation: str
    random_init: bool
    seed: int
    section: str


def build_sharded_model(
    source: ModelSource,
    wrap: Callable[[PreTrainedModel], RootT],
    *,
    mesh: DeviceMesh,
    device: torch.device,
    options: FSDPOptions,
    adapt: Callable[[PreTrainedModel], None] | None,
) -> tuple[RootT, PreTrainedModel]:
    """The role's root module, sharded over ``mesh`` and filled with the initial weights.

    Args:
        source: the model and where its weights come from.
        wrap: builds the role's root module around the Hugging Face model (e.g. a module whose
            forward returns log-probs); its own parameters, if any, are sharded with it.
        mesh: the device mesh (``dp_shard``).
        device: this rank's device.
        options: dtype, offload, resharding, activation checkpointing.
        adapt: changes the Hugging Face model in place before it is sharded (e.g. adds LoRA
            adapters, whose parameters are then sharded with their layers); applied to rank 0's
            initial model too, after seeding torch with ``source.seed``, so that every rank
            gets rank 0's initial values of what it adds. None: nothing.

    Returns:
        (root, hf_model): the sharded root and the Hugging Face model inside it, whose state
        dict names are the checkpoint's and the export's.

    Raises:
        ValueError: the attention implementation cannot be built, or rank 0 could not load the
            weights (the same error on every rank).
    """
    hf_model = _meta_model(source)
    if adapt is not None:
        adapt(hf_model)
    if options.activation_checkpointing:
        apply_activation_checkpointing(hf_model)
    root = wrap(hf_model)
    half = options.compute_dtype != torch.float32
    apply_fsdp(
        root,
        mesh,
        layer_classes=set(hf_model._no_split_modules or []),
        param_dtype=options.compute_dtype if half else None,
        reduce_dtype=torch.float32 if half else None,
        offload=options.offload,
        reshard_after_forward=options.reshard_after_forward,
    )
    root.to_empty(device="cpu" if options.offload else device)
    full = _initial_model_on_rank0(source, adapt)
    state_options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True)
    set_model_state_dict(
        hf_model, full.state_dict() if full is not None else {}, options=state_options
    )
    _broadcast_buffers(hf_model, full, device)
    return root, hf_model


def without_dropout(hf_config: PretrainedConfig) -> PretrainedConfig:
    """A copy of ``hf_config`` with every dropout probability 0.

    Preference and RL losses compare log-probs of the same sequences under two sets of weights;
    dropout would add noise to both.
    """
    config = copy.deepcopy(hf_config)
    for key, value in config.to_dict().items():
        if "dropout" in key and isinstance(value, float):
            setattr(config, key, 0.0)
    return config


def _meta_model(source: ModelSource) -> PreTrainedModel:
    """The model without storage, with its attention implementation."""
    try:
        with torch.device("meta"):
            # A copy: from_config sets the attention implementation on the config it gets.
            return source.model_class.from_config(
                copy.deepcopy(source.hf_config),
                dtype=torch.float32,
                attn_implementation=source.attn_implementation,
            )
    except (ValueError, ImportError) as exc:
        raise ValueError(
            f"{source.section}.attn_implementation={source.attn_implementation!r}: {exc}"
        ) from exc


def _initial_model_on_rank0(
    source: ModelSource, adapt: Callable[[PreTrainedModel], None] | None
) -> PreTrainedModel | None:
    """The full initial model in host memory on rank 0 (None elsewhere); errors reach all ranks."""
    model, error = None, None
    if dist.get_rank() == 0:
        try:
            model = _load_initial_model(source)
        except (OSError, ValueError) as exc:
            error = str(exc)
        if model is not None and adapt is not None:
            torch.manual_seed(source.seed)
            adapt(model)
    errors = [error]
    dist.broadcast_object_list(errors, src=0)
    if errors[0] is not None:
        raise ValueError(f"{source.section}.model_name={source.model_name!r}: {errors[0]}")
    return model


def _load_initial_model(source: ModelSource) -> PreTrainedModel:
    # Seeds random_init, and the weights a checkpoint lacks (a critic's new head on a policy).
    torch.manual_seed(source.seed)
    if source.random_init:
        return source.model_class.from_config(source.hf_config, dtype=torch.float32)
    try:
        return source.model_class.from_pretrained(
            source.model_name, config=source.hf_config, dtype=torch.float32
        )
    except OSError as exc:
        raise ValueError(
            f"no weights could be loaded ({exc}); set {source.section}.random_init: true to "
            f"start from random weights seeded by {source.section}.seed"
        ) from exc


def _broadcast_buffers(
    hf_model: PreTrainedModel, full: PreTrainedModel | None, device: torch.device
) -> None:
    # Buffers left out of the state dict (e.g. rotary inv_freq) are still empty after
    # to_empty(): copy rank 0's values to every rank.
    full_buffers = dict(full.named_buffers()) if full is not None else {}
    for module_name, module in hf_model.named_modules():
        for name, buffer in list(module.named_buffers(recurse=False)):
            fqn = f"{module_name}.{name}" if module_name else name
            value = torch.empty_like(buffer, device=device)
            if dist.get_rank() == 0:
                value.copy_(full_buffers[fqn])
            dist.broadcast(value, src=0)
            setattr(module, name, value)
