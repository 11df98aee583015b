"""Hugging Face loading helpers used by the driver before any worker starts."""

from __future__ import annotations

import logging
from pathlib import Path

from transformers import AutoConfig, AutoTokenizer, PreTrainedTokenizerBase

from rl_toolkit.config_schema import PolicyConfig, TokenizerConfig
from rl_toolkit.utils.config import ConfigError

_log = logging.getLogger(__name__)


def looks_local(name: str) -> bool:
    """True when `name` is meant as a local path rather than a hub id.

    A hub id is `org/name`; a name that exists on disk, starts with `.`, `/` or `~`, or whose
    first path component is an existing local folder (`assets/tiny_llama`) is a local path.
    """
    path = Path(name).expanduser()
    return path.exists() or name.startswith((".", "/", "~")) or Path(path.parts[0]).is_dir()


def check_model_path(model_name: str, key: str = "policy.model_name") -> None:
    """Fail fast, in the driver, when the model cannot be found.

    Raises:
        ConfigError: a local path that does not exist, or a hub id whose config cannot be loaded.
    """
    if looks_local(model_name):
        path = Path(model_name).expanduser()
        if not (path / "config.json").is_file():
            raise ConfigError(
                f"{key}: {model_name!r} looks like a local path, but "
                f"{path / 'config.json'} does not exist"
            )
        return
    try:
        AutoConfig.from_pretrained(model_name)
    except OSError as e:
        raise ConfigError(f"{key}: cannot load the config of {model_name!r}: {e}") from None


# What from_pretrained loads weights from; a folder with none of them holds a config only.
WEIGHT_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)


def has_weights(model_name: str) -> bool:
    """Whether the model comes with trained weights: a hub model, or a folder holding them."""
    if not looks_local(model_name):
        return True
    folder = Path(model_name).expanduser()
    return any((folder / name).is_file() for name in WEIGHT_FILES)


def check_policy_model(config: PolicyConfig) -> None:
    """The model exists and, unless random_init, has weights to load (checked on the driver).

    Raises:
        ConfigError: naming policy.model_name and what is missing.
    """
    check_trained_model(config["model_name"], random_init=config["random_init"], section="policy")


def check_trained_model(model_name: str, *, random_init: bool, section: str) -> None:
    """`<section>.model_name` exists and, unless random_init, has weights to load.

    Raises:
        ConfigError: naming the key and what is missing.
    """
    check_model_path(model_name, key=f"{section}.model_name")
    if not random_init and not has_weights(model_name):
        raise ConfigError(
            f"{section}.model_name: {model_name!r} holds a config but no weights (none of "
            f"{', '.join(WEIGHT_FILES)}); set {section}.random_init=true to start from random "
            f"weights seeded by {section}.seed"
        )


def check_reward_model(model_name: str, key: str) -> None:
    """The model exists and is a reward model: one label, a sequence classifier when its config
    names its architecture (a causal LM's config also says one label is not its head's).

    Raises:
        ConfigError: naming `key` and what the model is.
    """
    check_model_path(model_name, key=key)
    config = AutoConfig.from_pretrained(model_name)
    architectures = config.architectures or []
    classifier = all(name.endswith("ForSequenceClassification") for name in architectures)
    if config.num_labels != 1 or not classifier:
        raise ConfigError(
            f"{key}: {model_name!r} is not a reward model (architectures {architectures}, "
            f"num_labels {config.num_labels}); expected a sequence classifier with one label, "
            "e.g. an export of examples/run_rm.py"
        )
    if not has_weights(model_name):
        raise ConfigError(f"{key}: {model_name!r} holds a config but no weights")


def warn_if_random_init_of_trained_model(config: PolicyConfig) -> None:
    """Say loudly when random_init throws away the trained weights of policy.model_name."""
    if config["random_init"] and has_weights(config["model_name"]):
        _log.warning(
            "policy.random_init=true: %s has trained weights, but training starts from RANDOM "
            "weights built from its config.json; set policy.random_init=false to fine-tune it",
            config["model_name"],
        )


def get_tokenizer(config: TokenizerConfig, *, section: str = "policy") -> PreTrainedTokenizerBase:
    """Load the tokenizer; apply the configured chat template; make sure it has a pad token.

    Args:
        config: the `tokenizer` key of `section` (whose name the errors give).

    Raises:
        ConfigError: the tokenizer cannot be found.
    """
    key = f"{section}.tokenizer.name"
    check_model_path(config["name"], key=key)
    try:
        tokenizer = AutoTokenizer.from_pretrained(config["name"])
    except OSError as e:  # e.g. a folder with a config.json but no tokenizer files
        raise ConfigError(f"{key}: cannot load {config['name']!r}: {e}") from None
    if config["chat_template"] is not None:
        tokenizer.chat_template = config["chat_template"]
    if tokenizer.pad_token is None:
        # Padding positions are masked everywhere, so any token serves; EOS is the convention.
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer
