"""Fixtures shared by the policy and export tests."""

from collections.abc import Iterator

import huggingface_hub
import pytest
import torch

from tests.unit.hub_standin import HubStandIn
from tests.unit.policy_testing import save_reward_model, save_tiny_llama


@pytest.fixture(autouse=True)
def _leave_process_group() -> Iterator[None]:
    # In-process workers join (or create) this process's group; leave none behind for other tests.
    yield
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny Llama saved to disk: (its directory, the HF model of its initial weights)."""
    path = tmp_path_factory.mktemp("tiny_llama")
    return path, save_tiny_llama(path)


@pytest.fixture(scope="module")
def reward_checkpoint(tiny, tmp_path_factory):
    """A reward model saved by Hugging Face: the tiny policy's backbone and a random head."""
    return save_reward_model(tmp_path_factory.mktemp("reward_model"), tiny[0])


@pytest.fixture
def hub(monkeypatch) -> Iterator[HubStandIn]:
    """The Hub stand-in as huggingface_hub's endpoint (what HF_ENDPOINT sets), a token in HF_TOKEN.

    Xet uploads are off (the stand-in speaks the LFS protocol) and offline mode too, in case the
    environment sets HF_HUB_OFFLINE: nothing reaches beyond 127.0.0.1 either way.
    """
    standin = HubStandIn()
    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", standin.url)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_DISABLE_XET", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setenv("HF_TOKEN", "hf_standin_token")
    yield standin
    standin.close()
