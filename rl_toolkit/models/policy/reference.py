"""The reference policy as a host-memory copy of the policy worker's own parameter shards."""

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

from rl_toolkit.models.fsdp.checkpoint import load_model
from rl_toolkit.models.fsdp.parallelize import local_shards
from rl_toolkit.models.policy.logprobs import LogprobModel


class ReferenceWeights:
    """The reference policy's weights: a host-memory copy of this worker's parameter shards.

    Costs ``4 * num_params / world_size`` bytes of host memory per worker for the copy, plus as
    much again for a staging buffer that holds the policy's shards while the reference ones are
    swapped in. Both are allocated once (pinned on GPU machines) and reused on every call.

    Args:
        model: the sharded model, holding the weights the reference starts from.
    """

    def __init__(self, model: nn.Module) -> None:
        pin = torch.cuda.is_available()
        shards = local_shards(model)
        self.weights = [torch.empty(t.shape, dtype=t.dtype, pin_memory=pin) for t in shards]
        self.staging = [torch.empty(t.shape, dtype=t.dtype, pin_memory=pin) for t in shards]
        self.synced = False  # True once the reference differs from the initial weights
        with torch.no_grad():
            for weight, shard in zip(self.weights, shards, strict=True):
                weight.copy_(shard)

    @contextmanager
    def in_model(self, model: nn.Module) -> Iterator[None]:
        """Swap the reference shards into ``model``'s parameters for the duration of the block."""
        shards = local_shards(model)
        with torch.no_grad():
            for shard, weight, staging in zip(shards, self.weights, self.staging, strict=True):
                staging.copy_(shard)
                shard.copy_(weight)
        try:
            yield
        finally:
            with torch.no_grad():
                for shard, staging in zip(shards, self.staging, strict=True):
                    shard.copy_(staging)

    def mix_in(self, model: nn.Module, alpha: float) -> None:
        """``reference <- alpha * policy + (1 - alpha) * reference``, shard by shard."""
        with torch.no_grad():
            shards = local_shards(model)
            for shard, weight, staging in zip(shards, self.weights, self.staging, strict=True):
                staging.copy_(shard)
                weight.mul_(1.0 - alpha).add_(staging, alpha=alpha)
        self.synced = True

    def load(self, model: LogprobModel, path: str) -> None:
        """Load reference weights saved by ``PolicyWorker.save_checkpoint``."""
        with self.in_model(model):
            load_model(model.causal_lm, path)
            with torch.no_grad():
                for weight, shard in zip(self.weights, local_shards(model), strict=True):
                    weight.copy_(shard)
        self.synced = True
