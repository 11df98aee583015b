"""From a role's config section (``policy``, ``critic``, ``reward_model``) to the arguments of
the FSDP2 runtime (rl_toolkit/models/fsdp/), which takes no config dicts itself."""

import torch
from transformers import PretrainedConfig

from rl_toolkit.config_schema import ShardedModelConfig
from rl_toolkit.models.attention import VARLEN_ATTENTION
from rl_toolkit.models.fsdp.build import PRECISIONS, AutoModelClass, FSDPOptions, ModelSource
from rl_toolkit.utils.config import ConfigError


def model_source(
    config: ShardedModelConfig,
    hf_config: PretrainedConfig,
    model_class: AutoModelClass,
    *,
    section: str,
    random_init: bool,
    seed: int,
) -> ModelSource:
    """Where the role's initial weights come from: ``model_name``'s, or random ones seeded by
    ``seed`` (``random_init``), built as ``model_class`` with the configured attention.

    Args:
        section: the config section, for error messages ("policy", "critic", ...).
    """
    name = config["attn_implementation"]
    return ModelSource(
        model_class=model_class,
        model_name=config["model_name"],
        hf_config=hf_config,
        attn_implementation=VARLEN_ATTENTION if name == "varlen" else name,
        random_init=random_init,
        seed=seed,
        section=section,
    )


def fsdp_options(config: ShardedModelConfig) -> FSDPOptions:
    """The role's compute dtype and ``fsdp`` settings."""
    return FSDPOptions(
        compute_dtype=PRECISIONS[config["precision"]],
        offload=config["fsdp"]["cpu_offload"],
        reshard_after_forward=config["fsdp"]["reshard_after_forward"],
        activation_checkpointing=config["fsdp"]["activation_checkpointing"],
    )


def check_gpu_options(config: ShardedModelConfig, section: str) -> None:
    """bfloat16 and CPU offload need a GPU (the driver checks this against the Ray cluster; a
    worker built by hand checks it here).

    Raises:
        ConfigError: naming ``<section>.precision`` or ``<section>.fsdp.cpu_offload``.
    """
    if torch.cuda.is_available():
        return
    if config["precision"] == "bfloat16":
        raise ConfigError(f"{section}.precision: bfloat16 needs a GPU; use float32 on CPU")
    if config["fsdp"]["cpu_offload"]:
        raise ConfigError(
            f"{section}.fsdp.cpu_offload: true needs a GPU (without one the weights are in host "
            "memory already); set it to false"
        )
