"""Process group, device mesh, and the few collectives every role needs."""

import os

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

# The mesh's data-parallel (sharding) dimension. Tensor and context parallelism would add
# dimensions beside it ("tp", "cp") without changing the roles that shard over this one.
DP_SHARD = "dp_shard"


def init_distributed() -> torch.device:
    """Join (or, for a single process, create) the process group; return this process's device.

    Reads RANK and WORLD_SIZE (and MASTER_ADDR, MASTER_PORT) as torchrun sets them; without
    WORLD_SIZE it is a group of one. GPU workers use NCCL, plus gloo for host-memory tensors
    (CPU offload); CPU workers use gloo.
    """
    if torch.cuda.is_available():
        # A Ray actor sees only its own GPU; torchrun shows every GPU of the node.
        local_rank = int(os.environ.get("LOCAL_RANK", "0")) if torch.cuda.device_count() > 1 else 0
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
        backend = "cpu:gloo,cuda:nccl"
    else:
        device, backend = torch.device("cpu"), "gloo"
    if dist.is_initialized():
        return device
    if "WORLD_SIZE" in os.environ:
        dist.init_process_group(
            backend, rank=int(os.environ["RANK"]), world_size=int(os.environ["WORLD_SIZE"])
        )
    else:
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
    return device


def build_mesh(device: torch.device) -> DeviceMesh:
    """A mesh whose one dimension, ``dp_shard``, spans every process (FSDP shards over it)."""
    return init_device_mesh(device.type, (dist.get_world_size(),), mesh_dim_names=(DP_SHARD,))


def max_over_ranks(value: int, device: torch.device) -> int:
    """The largest ``value`` of all ranks (e.g. the most micro-batches any worker has)."""
    tensor = torch.tensor(value, device=device)
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return int(tensor)


def all_reduce_sum(values: dict[str, torch.Tensor], device: torch.device) -> dict[str, float]:
    """Sum each named scalar over all ranks, in one collective; the same dict on every rank."""
    keys = sorted(values)  # the same order on every rank
    if not keys:
        return {}
    stacked = torch.stack([values[key] for key in keys]).to(device)
    dist.all_reduce(stacked)
    return {key: float(value) for key, value in zip(keys, stacked.tolist(), strict=True)}
