"""LoRA adapters on the policy's Hugging Face model, built by peft.

The adapters go into the model in place, through transformers' PEFT integration
(``add_adapter``), before the model is sharded: each adapted ``nn.Linear`` ``<name>`` becomes a
peft ``lora.Linear`` holding the frozen layer (``<name>.base_layer``) and the adapter
(``<name>.lora_A.default``, ``<name>.lora_B.default``), and only the adapters require gradients.
The model keeps its class, so the chunked log-prob kernel reaches ``base_model`` and the output
layer as it does without LoRA. The output layer is never adapted: the kernel reads its weight
directly (``LogprobModel``).

The reference policy is the same model with its adapters off (``adapters_disabled``). Exports
and the weight refit of a generation engine turn the adapted layers back into plain Hugging Face
weights, merged: ``W + scaling * B @ A`` (``merge_lora``), peft's own merge.
"""

import re
import sys
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import TYPE_CHECKING, NamedTuple, TypeVar

import torch
from torch import nn
from torch.distributed.tensor import DTensor
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedModel

from rl_toolkit.config_schema import LoraConfig, PolicyConfig
from rl_toolkit.utils.config import ConfigError
from rl_toolkit.utils.hf import check_model_path

if TYPE_CHECKING:
    import peft  # imported where adapters are made: a model without LoRA never needs it

ADAPTER_NAME = "default"  # peft's name for a model's only adapter
ALL_LINEAR = "all-linear"  # peft's shorthand for every linear layer but the output layer


def peft_lora_config(config: LoraConfig) -> "peft.LoraConfig":
    """peft's config of ``policy.lora``. B starts at zero (peft's default initialisation), so
    the adapted model starts as the base model."""
    import peft

    return peft.LoraConfig(
        r=config["rank"],
        lora_alpha=config["alpha"],
        lora_dropout=config["dropout"],
        target_modules=config["target_modules"],
        bias="none",
    )


def add_lora(model: PreTrainedModel, config: LoraConfig) -> None:
    """Add LoRA adapters to ``model`` in place and freeze everything else.

    On the meta device the adapters have no values yet (the sharded model gets rank 0's); on
    a real device A is drawn from the global torch generator (the caller seeds it).
    """
    model.add_adapter(peft_lora_config(config))


@contextmanager
def adapters_disabled(model: PreTrainedModel) -> Iterator[None]:
    """Inside the block the model computes as its base model (the reference policy)."""
    model.disable_adapters()
    try:
        yield
    finally:
        model.enable_adapters()


def lora_scalings(model: nn.Module) -> dict[str, float]:
    """``alpha / rank`` of every LoRA layer of ``model``, by module name (empty without LoRA)."""
    if "peft" not in sys.modules:
        return {}  # no LoRA layer exists before peft is imported (nor is it imported for this)
    from peft.tuners.lora import LoraLayer

    return {
        name: module.scaling[ADAPTER_NAME]
        for name, module in model.named_modules()
        if isinstance(module, LoraLayer)
    }


def _full(tensor: torch.Tensor) -> torch.Tensor:
    # Collective for a DTensor (an all-gather); a plain tensor is already whole.
    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor


class LoraWeight(NamedTuple):
    """An adapted linear layer's weight, merged when asked: ``W + scaling * B @ A``.

    The parts may be DTensor shards: ``full_tensor()`` then gathers each of them (collective, in
    the same order on every rank) and merges in their dtype (float32 master weights).
    """

    base: torch.Tensor  # W [out, in]
    lora_a: torch.Tensor  # A [r, in]
    lora_b: torch.Tensor  # B [out, r]
    scaling: float  # alpha / r

    @property
    def shape(self) -> torch.Size:
        return self.base.shape

    @property
    def dtype(self) -> torch.dtype:
        return self.base.dtype

    def is_floating_point(self) -> bool:
        return self.base.is_floating_point()

    def full_tensor(self) -> torch.Tensor:
        """The merged weight, whole (peft's ``merge``: the delta ``(B @ A) * scaling`` first)."""
        base, lora_a, lora_b = _full(self.base), _full(self.lora_a), _full(self.lora_b)
        return base + (lora_b @ lora_a) * self.scaling


T = TypeVar("T", bound=torch.Tensor)


def merge_lora(state: Mapping[str, T], scalings: Mapping[str, float]) -> dict[str, T | LoraWeight]:
    """A state dict of an adapted model under the base model's names, adapted weights merged.

    ``<layer>.base_layer.weight`` becomes ``<layer>.weight``, a ``LoraWeight`` that merges the
    layer's adapter into it; other ``<layer>.base_layer.*`` entries (a bias) lose the
    ``base_layer``; the adapters' own entries go. Names keep the order of ``state``.

    Args:
        state: the adapted model's state dict (plain tensors or DTensor shards).
        scalings: ``lora_scalings`` of the model; empty: ``state`` is returned as it is.
    """
    merged: dict[str, T | LoraWeight] = {}
    for name, value in state.items():
        layer, part, leaf = _lora_parts(name, scalings)
        if layer is None:
            merged[name] = value
        elif part == "base_layer" and leaf == "weight":
            adapter = f"{layer}.lora_{{}}.{ADAPTER_NAME}.weight"
            lora_a, lora_b = state[adapter.format("A")], state[adapter.format("B")]
            merged[f"{layer}.weight"] = LoraWeight(value, lora_a, lora_b, scalings[layer])
        elif part == "base_layer":
            merged[f"{layer}.{leaf}"] = value
    return merged


# A name inside a LoRA layer: <layer>.base_layer.<leaf> or <layer>.lora_A.default.<leaf> (or B).
_LORA_NAME = re.compile(
    rf"^(.+)\.(base_layer|lora_A\.{ADAPTER_NAME}|lora_B\.{ADAPTER_NAME})\.(\w+)$"
)


def _lora_parts(name: str, scalings: Mapping[str, float]) -> tuple[str | None, str, str]:
    """``(layer, part, leaf)`` of a name inside a LoRA layer (part: base_layer, lora_A.default
    or lora_B.default); ``(None, "", "")`` for a name outside every LoRA layer."""
    match = _LORA_NAME.match(name)
    if match is None or match[1] not in scalings:
        assert not any(name.startswith(f"{layer}.") for layer in scalings), (
            f"{name}: not a part of a plain LoRA layer"
        )
        return None, "", ""
    return match[1], match[2], match[3]


def merged_state_dict(
    state: Mapping[str, torch.Tensor], scalings: Mapping[str, float]
) -> dict[str, torch.Tensor]:
    """``merge_lora`` with every merged weight computed (for an export of full tensors)."""
    return {
        name: value.full_tensor() if isinstance(value, LoraWeight) else value
        for name, value in merge_lora(state, scalings).items()
    }


def check_lora_config(policy: PolicyConfig) -> None:
    """Check ``policy.lora`` against the model, on the driver, before any worker starts.

    The model is built on the meta device from its config (no weights are read): every name of
    ``target_modules`` must match a linear layer other than the output layer (peft adapts any
    ``nn.Linear``; "all-linear" is peft's own choice of them).

    Raises:
        ConfigError: one line naming ``policy.lora.target_modules`` and what would be right.
    """
    lora = policy["lora"]
    if lora is None or lora["target_modules"] == ALL_LINEAR:
        return
    check_model_path(policy["model_name"])
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(policy["model_name"]))
    output = model.get_output_embeddings()
    linear = [
        name
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear) and module is not output
    ]
    key, names = "policy.lora.target_modules", sorted({n.rpartition(".")[2] for n in linear})
    for target in lora["target_modules"]:
        if output is not None and _matches(_module_name(model, output), target):
            raise ConfigError(
                f"{key}: {target!r} is the output layer, which LoRA cannot adapt here (the "
                f"log-prob kernel reads its weight); adapt some of {names}"
            )
        if not any(_matches(name, target) for name in linear):
            raise ConfigError(
                f"{key}: {target!r} names no linear layer of {policy['model_name']}; its linear "
                f"layers are {names} (or use {ALL_LINEAR!r})"
            )


def _matches(name: str, target: str) -> bool:
    """peft's rule for a name in target_modules: the layer's name or its dotted suffix."""
    return name == target or name.endswith(f".{target}")


def _module_name(model: nn.Module, module: nn.Module) -> str:
    return next(name for name, candidate in model.named_modules() if candidate is module)
