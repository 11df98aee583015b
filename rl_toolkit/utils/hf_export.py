"""Hugging Face exports: the model folder `save_pretrained` would write, and its upload to the Hub.

The policy worker gathers the full state dict on rank 0 and hands it to `save_hf_model`, which
writes what `AutoModelForCausalLM.from_pretrained` reads: `config.json`, `generation_config.json`,
the weights as `model.safetensors` (or shards plus `model.safetensors.index.json`) and the
tokenizer. A LoRA policy may instead write its adapters alone (`save_lora_adapter`), as PEFT
does. `push_to_hub` uploads such a folder with huggingface_hub. Nothing here imports
torch.distributed: the driver calls `check_hf_export_config` and `push_to_hub` too.
"""

from __future__ import annotations

import copy
import os
import re
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from huggingface_hub import HfApi, get_token, save_torch_state_dict
from huggingface_hub.utils import HFValidationError, validate_repo_id
from safetensors.torch import save_file
from torch import nn
from transformers import GenerationConfig, PretrainedConfig
from transformers.tokenization_utils_base import PreTrainedTokenizerBase

from rl_toolkit.config_schema import CheckpointingConfig
from rl_toolkit.utils.config import ConfigError

if TYPE_CHECKING:
    import peft  # for LoRA exports only

# PEFT's file of adapter weights (peft.utils.SAFETENSORS_WEIGHTS_NAME).
ADAPTER_WEIGHTS_FILE = "adapter_model.safetensors"

# huggingface_hub's (and save_pretrained's) units for max_shard_size: decimal, like "5GB".
_SIZE_UNITS = {"KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12}
_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(KB|MB|GB|TB)\s*$", re.IGNORECASE)
# More bytes than any model has: huggingface_hub then writes a single model.safetensors.
_ONE_FILE = 2**62


def parse_shard_size(size: str) -> int:
    """Bytes of a size written like Hugging Face's ``max_shard_size`` ("5GB", "500MB", "0.5GB").

    Raises:
        ConfigError: not a positive number followed by KB, MB, GB or TB.
    """
    match = _SIZE_RE.match(size)
    num_bytes = int(float(match[1]) * _SIZE_UNITS[match[2].upper()]) if match else 0
    if num_bytes <= 0:
        raise ConfigError(
            "checkpointing.hf_max_shard_size: expected a size such as '5GB' or '500MB' (KB, MB, "
            f"GB, TB), got {size!r}"
        )
    return num_bytes


def check_hf_export_config(config: CheckpointingConfig) -> None:
    """Check the export and upload keys of the `checkpointing` section before training starts.

    Raises:
        ConfigError: a bad ``hf_max_shard_size``; ``push_to_hub`` without ``enabled`` and
            ``save_hf``, with a malformed repo id, or without a Hugging Face token.
    """
    parse_shard_size(config["hf_max_shard_size"])
    repo_id = config["push_to_hub"]
    if repo_id is None:
        return
    if not (config["enabled"] and config["save_hf"]):
        raise ConfigError(
            "checkpointing.push_to_hub uploads the final checkpoint's hf/ folder: it needs "
            "checkpointing.enabled: true and checkpointing.save_hf: true"
        )
    try:
        validate_repo_id(repo_id)
    except HFValidationError as exc:
        raise ConfigError(
            f"checkpointing.push_to_hub: {repo_id!r} is not a repo id: {exc}"
        ) from None
    if get_token() is None:
        raise ConfigError(
            f"checkpointing.push_to_hub={repo_id!r} needs a Hugging Face token: set HF_TOKEN or "
            "run `hf auth login`"
        )


def tied_parameter_names(model: nn.Module) -> list[str]:
    """Names under which a parameter already named earlier appears again (``lm_head.weight`` when
    the embeddings are tied).

    Found by identity in the module, not by storage in a state dict: a state dict gathered from
    several workers holds a separate copy of every name.
    """
    seen, tied = set(), []
    for name, param in model.named_parameters(remove_duplicate=False):
        if id(param) in seen:
            tied.append(name)
        seen.add(id(param))
    return tied


def load_generation_config(model_name: str, hf_config: PretrainedConfig) -> GenerationConfig:
    """The model's own generation config, else one derived from its config.

    The own one is read from the model's folder or, for a hub id, from the local Hugging Face
    cache only: an export never reaches the network.
    """
    try:
        return GenerationConfig.from_pretrained(model_name, local_files_only=True)
    except OSError:  # no generation_config.json there
        return GenerationConfig.from_model_config(hf_config)


def save_hf_model(
    path: str | Path,
    *,
    state_dict: dict[str, torch.Tensor],
    tied_names: list[str],
    hf_config: PretrainedConfig,
    generation_config: GenerationConfig,
    tokenizer: PreTrainedTokenizerBase,
    dtype: torch.dtype,
    max_shard_size: int | None,
) -> None:
    """Write a folder that ``AutoModelForCausalLM.from_pretrained(path)`` loads.

    Args:
        path: output folder (created).
        state_dict: the full (unsharded) weights, by parameter name.
        tied_names: names to leave out because they are tied to another (``tied_parameter_names``);
            ``from_pretrained`` ties them again.
        hf_config: the model config; saved with ``dtype``.
        generation_config: saved as ``generation_config.json``.
        tokenizer: saved with ``save_pretrained``.
        dtype: the dtype of the saved weights.
        max_shard_size: the largest weights file in bytes: above it the weights are split into
            ``model-0000i-of-0000n.safetensors`` plus ``model.safetensors.index.json``; None writes
            one ``model.safetensors`` whatever its size.
    """
    missing = [name for name in tied_names if name not in state_dict]
    assert not missing, f"tied parameters {missing} are not in the state dict"
    weights = {
        name: _own_storage(tensor.to(dtype))
        for name, tensor in state_dict.items()
        if name not in tied_names
    }
    os.makedirs(path, exist_ok=True)
    config = copy.deepcopy(hf_config)
    config.dtype = dtype
    config.save_pretrained(path)
    generation_config.save_pretrained(path)
    save_torch_state_dict(
        weights, path, max_shard_size=max_shard_size if max_shard_size is not None else _ONE_FILE
    )
    tokenizer.save_pretrained(path)


def save_lora_adapter(
    path: str | Path,
    *,
    adapter_state: dict[str, torch.Tensor],
    lora_config: peft.PeftConfig,
    base_model: str,
    tokenizer: PreTrainedTokenizerBase,
    dtype: torch.dtype,
) -> None:
    """Write a PEFT adapter folder: what ``PeftModel.from_pretrained(base, path)`` and
    transformers' ``AutoModelForCausalLM.from_pretrained(path)`` (base and adapters) load.

    Args:
        path: output folder (created).
        adapter_state: the full adapter weights under transformers' adapter names
            (``model.layers.0.self_attn.q_proj.lora_A.weight``, ``get_adapter_state_dict``).
        lora_config: peft's config of the adapters.
        base_model: the hub id or folder of the base model, written into adapter_config.json.
        tokenizer: saved with ``save_pretrained``.
        dtype: the dtype of the saved weights.
    """
    os.makedirs(path, exist_ok=True)
    config = copy.deepcopy(lora_config)
    config.base_model_name_or_path = base_model
    config.inference_mode = True  # as PeftModel.save_pretrained writes it
    config.save_pretrained(str(path))
    # PEFT's own file names each weight as its PeftModel does: under base_model.model.
    weights = {
        f"base_model.model.{name}": _own_storage(tensor.to(dtype))
        for name, tensor in adapter_state.items()
    }
    save_file(weights, os.path.join(path, ADAPTER_WEIGHTS_FILE), metadata={"format": "pt"})
    tokenizer.save_pretrained(path)


def _own_storage(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor``, or a copy of it when it is a view into a larger buffer.

    Gathered FSDP shards of a dimension that does not divide by the number of workers (a
    vocabulary of 41 rows over 2 workers) are views of a padded buffer; safetensors refuses a
    tensor that does not cover its whole storage.
    """
    tensor = tensor.contiguous()
    if tensor.untyped_storage().nbytes() != tensor.numel() * tensor.element_size():
        tensor = tensor.clone()
    return tensor


def push_to_hub(folder: Path, repo_id: str, *, private: bool) -> str:
    """Upload an export folder to the Hugging Face Hub model repo ``repo_id``.

    The repo is created if missing (``private`` applies then only). The endpoint and token are
    huggingface_hub's: ``HF_ENDPOINT``, ``HF_TOKEN`` or the ``hf auth login`` token.

    Returns:
        The URL of the commit.
    """
    api = HfApi()
    api.create_repo(repo_id, private=private, exist_ok=True)
    commit = api.upload_folder(
        repo_id=repo_id,
        folder_path=folder,
        commit_message=f"rl_toolkit: upload {folder.parent.name}",
    )
    return commit.commit_url
