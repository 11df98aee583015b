"""A module's workers as seen from the driver: how a step call becomes per-rank calls.

Data between modules is a dict of per-row values (tensors `[N, ...]` or lists of N), kept as a
`BatchedDataDict` whose `group_size` says which consecutive rows stay together (2 for a
preference pair, G for the completions of one prompt).
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from typing import Any

import torch

from rl_toolkit.distributed.batched_data_dict import BatchedDataDict
from rl_toolkit.distributed.virtual_cluster import RayVirtualCluster
from rl_toolkit.distributed.worker_groups import RayWorkerGroup
from rl_toolkit.engine.module import BaseModule, ModuleWorker


def as_batch(data: Mapping[str, Any], group_size: int = 1) -> BatchedDataDict:
    """`data` as a BatchedDataDict (its own group_size when it is one)."""
    if isinstance(data, BatchedDataDict):
        return data
    return BatchedDataDict(dict(data), group_size=group_size)


def merge_inputs(inputs: tuple[Mapping[str, Any], ...]) -> BatchedDataDict:
    """The dicts a step was called with, as one batch: the union of their keys (a later dict
    wins), the largest group_size. All must have the same number of rows."""
    batches = [as_batch(data) for data in inputs]
    sizes = {batch.size for batch in batches}
    if len(sizes) > 1:
        raise ValueError(f"a step was called with dicts of different numbers of rows: {sizes}")
    merged: dict[str, Any] = {}
    for batch in batches:
        merged.update(batch)
    return BatchedDataDict(merged, group_size=max(batch.group_size for batch in batches))


def merge_outputs(
    inputs: BatchedDataDict, outputs: list[Any], pad_values: dict[str, int | float]
) -> BatchedDataDict:
    """The ranks' outputs in rank order, as one batch added to the inputs; when the step made
    other rows (generation: G per prompt) its output replaces the inputs."""
    shards = [as_batch(output or {}, inputs.group_size) for output in outputs]
    shards = [shard for shard in shards if shard]
    if not shards:
        return inputs
    result = BatchedDataDict.from_batches(shards, pad_value_dict=pad_values)
    if result.size != inputs.size:
        return result
    return BatchedDataDict({**inputs, **result}, group_size=inputs.group_size)


def micro_batches(shard: BatchedDataDict, size: int) -> list[BatchedDataDict]:
    """`shard` cut into consecutive micro-batches of `size` rows (the last may be smaller)."""
    return [
        shard.slice(start, min(start + size, shard.size)) for start in range(0, shard.size, size)
    ]


class ModuleGroup:
    """The workers of one module (one per bundle of its cluster) and the calls on them.

    Args:
        module: the driver's spec of the module; its steps called in a flow come here.
        cluster: the bundles it runs on (shared with the modules colocated with it).
        config: the whole config, for the workers.
        timeout_s: the longest any call may take (cluster.worker_timeout_s).
        env_vars: driver variables its workers get (cluster.worker_env_vars).
    """

    def __init__(
        self,
        module: BaseModule,
        cluster: RayVirtualCluster,
        config: Mapping[str, Any],
        *,
        timeout_s: float | None,
        env_vars: list[str],
    ) -> None:
        self.module = module
        self.workers: RayWorkerGroup[ModuleWorker] = RayWorkerGroup(
            cluster,
            ModuleWorker,
            name_prefix=module.name,
            worker_kwargs={"module": module, "config": dict(config)},
            timeout_s=timeout_s,
            env_vars=env_vars,
        )
        self.pad_values = self.workers.all(ModuleWorker.pad_values)[0]
        self.iteration = 0  # passed to steps that take it: the engine's episode
        self.onloaded = True
        self.peers: list[ModuleGroup] = []  # the modules colocated with this one
        module._group = self

    @property
    def world_size(self) -> int:
        return self.workers.world_size

    def dispatch(self, method: str, args: tuple, kwargs: dict[str, Any]) -> BatchedDataDict:
        """`module.<method>(*dicts)` called in a flow: merged, sharded, run, merged back."""
        inputs = merge_inputs(args)
        step = getattr(type(self.module), method)
        if "iteration" in inspect.signature(step).parameters and "iteration" not in kwargs:
            kwargs = {**kwargs, "iteration": self.iteration}
        self.activate()
        shards = inputs.shard_by_batch_size(self.world_size)
        outputs = self.workers.per_rank(ModuleWorker.step, shards, method, kwargs)
        return merge_outputs(inputs, outputs, self.pad_values)

    def train(
        self, batch: BatchedDataDict, micro_batch_size: int, *, iteration: int, episode: int
    ) -> list[Any]:
        """One `train_step` on every rank: each gets its shard of the global batch `batch` as a
        list of micro-batch dicts of `micro_batch_size` rows. Returns the ranks' results."""
        shards = batch.shard_by_batch_size(self.world_size)
        lists: list[list[dict[str, Any]]] = [
            list(micro_batches(shard, micro_batch_size)) for shard in shards
        ]
        return self.workers.per_rank(
            ModuleWorker.train_step, lists, iteration=iteration, episode=episode
        )

    def activate(self) -> None:
        """Offload the colocated modules that are on the device, then onload this one."""
        for peer in self.peers:
            peer.set_onloaded(False)
        self.set_onloaded(True)

    def set_onloaded(self, onloaded: bool) -> None:
        """onload() or offload() the module on every rank, if it is not there already."""
        if onloaded != self.onloaded:
            method = ModuleWorker.onload if onloaded else ModuleWorker.offload
            self.workers.all(method)
            self.onloaded = onloaded

    def metrics(self) -> dict[str, float]:
        """The metrics the ranks recorded since the last call, averaged over the ranks."""
        per_rank = self.workers.all(ModuleWorker.get_and_clear_metrics)
        keys = sorted({key for metrics in per_rank for key in metrics})
        return {
            key: float(torch.tensor([m[key] for m in per_rank if key in m]).double().mean())
            for key in keys
        }

    def shutdown(self) -> None:
        self.module._group = None
        try:
            if not self.workers.broken:
                self.workers.all(ModuleWorker.shutdown)
        finally:
            self.workers.shutdown()
