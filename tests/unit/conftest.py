"""Fixtures shared by the policy tests."""

from collections.abc import Iterator

import pytest
import torch

from tests.unit.policy_testing import save_tiny_llama


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
