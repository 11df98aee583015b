"""RayWorkerGroup on a local CPU cluster: env, gloo collectives, dispatch and failure reports."""

import os
import sys
import time
from collections.abc import Iterator

import pytest
import torch
import torch.distributed as dist

from rl_toolkit.distributed.batched_data_dict import BatchedDataDict
from rl_toolkit.distributed.virtual_cluster import RayVirtualCluster
from rl_toolkit.distributed.worker_groups import RayWorkerGroup, WorkerError

pytestmark = pytest.mark.usefixtures("ray_session")

ENV_KEYS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "NODE_RANK", "MASTER_ADDR", "MASTER_PORT")


class GlooWorker:
    """A plain worker that joins a gloo process group from the env, as policy workers do."""

    def __init__(self, *, scale: int) -> None:
        dist.init_process_group(backend="gloo", init_method="env://")
        self.scale = scale

    def env(self) -> dict[str, str | int]:
        env = {key: os.environ[key] for key in (*ENV_KEYS, "OMP_NUM_THREADS")}
        env["torch_threads"] = torch.get_num_threads()
        env["python"] = sys.executable
        return env

    def all_reduce(self, *, value: int) -> int:
        tensor = torch.tensor([value * (dist.get_rank() + 1)])
        dist.all_reduce(tensor)
        return int(tensor.item())

    def describe(self, *, data: BatchedDataDict, offset: int) -> tuple[int, list[int], int]:
        return dist.get_rank(), data["row"].tolist(), data.group_size + offset

    def fail_or_all_reduce(self, *, fail_rank: int, how: str) -> int:
        # The failing rank leaves its peer blocked in the collective forever.
        if dist.get_rank() == fail_rank:
            if how == "exit":
                os._exit(3)
            raise RuntimeError("boom from the worker")
        return self.all_reduce(value=1)


class BrokenWorker:
    def __init__(self) -> None:
        raise ValueError("bad worker config")


@pytest.fixture(scope="module")
def gloo_group() -> Iterator[RayWorkerGroup]:
    cluster = RayVirtualCluster([2], name="wg-test")
    group = RayWorkerGroup(cluster, GlooWorker, name_prefix="gloo", worker_kwargs={"scale": 1})
    yield group
    group.shutdown()
    cluster.shutdown()


def test_env_threads_and_cpu_mode(gloo_group: RayWorkerGroup) -> None:
    envs = gloo_group.run_all_workers_single_data("env")
    assert [env["RANK"] for env in envs] == ["0", "1"]
    for env in envs:
        assert env["WORLD_SIZE"] == "2"
        assert env["NODE_RANK"] == "0"
        assert env["MASTER_ADDR"] == gloo_group.bundles[0].node_ip
        assert env["OMP_NUM_THREADS"] == "1" and env["torch_threads"] == 1
    assert [env["LOCAL_RANK"] for env in envs] == ["0", "1"]
    # The driver's interpreter, not one Ray's `uv run` hook would build (see init_ray).
    assert {env["python"] for env in envs} == {sys.executable}
    assert envs[0]["MASTER_PORT"] == envs[1]["MASTER_PORT"]


def test_all_reduce(gloo_group: RayWorkerGroup) -> None:
    # rank r contributes 10 * (r + 1): 10 + 20.
    assert gloo_group.run_all_workers_single_data("all_reduce", value=10) == [30, 30]
    assert gloo_group.run_single_worker("env", worker_idx=1)["RANK"] == "1"


def test_sharded_dispatch_gives_each_rank_its_slice(gloo_group: RayWorkerGroup) -> None:
    data = BatchedDataDict(row=torch.arange(10), group_size=2)
    results = gloo_group.run_all_workers_sharded_data(
        "describe", data=data, common_kwargs={"offset": 100}
    )
    assert results == [(0, [0, 1, 2, 3, 4, 5], 102), (1, [6, 7, 8, 9], 102)]
    chunked = gloo_group.run_all_workers_sharded_data(
        "describe", data=data.slice(0, 8), batch_size=4, common_kwargs={"offset": 0}
    )
    assert [rows for _, rows, _ in chunked] == [[0, 1, 4, 5], [2, 3, 6, 7]]


def test_bad_dispatch_is_a_value_error(gloo_group: RayWorkerGroup) -> None:
    with pytest.raises(ValueError, match="no method 'nope'"):
        gloo_group.run_all_workers_single_data("nope")
    with pytest.raises(ValueError, match="worker_idx=2"):
        gloo_group.run_single_worker("env", worker_idx=2)


@pytest.mark.parametrize(("how", "expected"), [("raise", "boom from the worker"), ("exit", "died")])
def test_failure_surfaces_fast_while_peer_is_blocked(how: str, expected: str) -> None:
    cluster = RayVirtualCluster([2], use_gpus=False, name=f"fail-{how}")
    group = RayWorkerGroup(cluster, GlooWorker, name_prefix="victim", worker_kwargs={"scale": 1})
    try:
        start = time.monotonic()
        futures = group.run_all_workers_single_data_async(
            "fail_or_all_reduce", fail_rank=1, how=how
        )
        with pytest.raises(WorkerError) as info:
            group.get_results(futures)
        assert time.monotonic() - start < 30
        # The dead or raising rank is named first, even if its blocked peer failed too.
        message = str(info.value)
        assert message.startswith("Worker victim-1 (rank 1 of 2)")
        assert group.bundles[1].node_ip in message and "fail_or_all_reduce" in message
        assert expected in message
    finally:
        group.shutdown()
        group.shutdown()  # idempotent
        cluster.shutdown()


def test_shut_down_cluster_is_a_value_error() -> None:
    cluster = RayVirtualCluster([1], use_gpus=False, name="gone")
    cluster.shutdown()
    with pytest.raises(ValueError, match="'late': the cluster has been shut down"):
        RayWorkerGroup(cluster, GlooWorker, name_prefix="late")


def test_init_failure_is_a_worker_error() -> None:
    cluster = RayVirtualCluster([1], use_gpus=False, name="broken")
    try:
        with pytest.raises(WorkerError, match="bad worker config"):
            RayWorkerGroup(cluster, BrokenWorker, name_prefix="broken")
    finally:
        cluster.shutdown()


class NcclWorker:
    """Ray restricts CUDA_VISIBLE_DEVICES to the actor's GPU, so it is always cuda:0."""

    def __init__(self) -> None:
        torch.cuda.set_device(0)
        dist.init_process_group(backend="nccl", init_method="env://")

    def all_reduce_ones(self) -> tuple[float, str]:
        tensor = torch.ones(1, device="cuda")
        dist.all_reduce(tensor)
        return tensor.item(), os.environ["CUDA_VISIBLE_DEVICES"]


@pytest.mark.gpu
def test_gpu_workers_one_gpu_each_with_nccl() -> None:
    num_workers = min(torch.cuda.device_count(), 2)  # the session cluster has 4 CPUs
    cluster = RayVirtualCluster([num_workers], num_gpus_per_node=num_workers, name="gpu")
    assert cluster.use_gpus
    group = RayWorkerGroup(cluster, NcclWorker, name_prefix="nccl")
    try:
        results = group.run_all_workers_single_data("all_reduce_ones")
        assert [total for total, _ in results] == [float(num_workers)] * num_workers
        assert len({devices for _, devices in results}) == num_workers  # a GPU each
    finally:
        group.shutdown()
        cluster.shutdown()
