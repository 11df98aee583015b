"""Hugging Face loading helpers used by the driver before any worker starts."""

from __future__ import annotations

from pathlib import Path

from transformers import AutoConfig, AutoTokenizer, PreTrainedTokenizerBase

from rl_toolkit.models.policy import TokenizerConfig


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
        ValueError: a local path that does not exist, or a hub id whose config cannot be loaded.
    """
    if looks_local(model_name):
        path = Path(model_name).expanduser()
        if not (path / "config.json").is_file():
            raise ValueError(
                f"{key}: {model_name!r} looks like a local path, but "
                f"{path / 'config.json'} does not exist"
            )
        return
    try:
        AutoConfig.from_pretrained(model_name)
    except OSError as e:
        raise ValueError(f"{key}: cannot load the config of {model_name!r}: {e}") from None


def get_tokenizer(config: TokenizerConfig) -> PreTrainedTokenizerBase:
    """Load the tokenizer; apply the configured chat template; make sure it has a pad token.

    Raises:
        ValueError: the tokenizer cannot be found.
    """
    check_model_path(config["name"], key="policy.tokenizer.name")
    tokenizer = AutoTokenizer.from_pretrained(config["name"])
    if config["chat_template"] is not None:
        tokenizer.chat_template = config["chat_template"]
    if tokenizer.pad_token is None:
        # Padding positions are masked everywhere, so any token serves; EOS is the convention.
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer
