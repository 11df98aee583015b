"""RayWorkerGroup on a local CPU cluster: env, gloo collectives, dispatch and failure reports."""

import contextlib
import os
import signal
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import ray
import torch
import torch.distributed as dist

from rl_toolkit.distributed.batched_data_dict import BatchedDataDict
from rl_toolkit.distributed.ray_watchdog import process_table
from rl_toolkit.distributed.virtual_cluster import RayVirtualCluster
from rl_toolkit.distributed.worker_groups import (
    MAX_CAUSE_LINES,
    MAX_WORKERS_LISTED,
    RayWorkerGroup,
    WorkerError,
    _cause_lines,
    _listed,
)
from tests.conftest import WORKER_TIMEOUT_S
from tests.process_testing import environ, wait_until_gone

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

    def describe(self, data: BatchedDataDict, *, offset: int) -> tuple[int, list[int], int]:
        return dist.get_rank(), data["row"].tolist(), data.group_size + offset

    def fail_or_all_reduce(self, *, fail_rank: int, how: str) -> int:
        # The failing rank leaves its peer blocked in the collective forever.
        if dist.get_rank() == fail_rank:
            if how == "exit":
                os._exit(3)
            raise RuntimeError("boom from the worker")
        return self.all_reduce(value=1)


def make_group(
    cluster: RayVirtualCluster, worker_cls: type, name_prefix: str, **kwargs
) -> RayWorkerGroup:
    """A worker group with the tests' generous timeout and no extra environment variables."""
    kwargs = {"timeout_s": WORKER_TIMEOUT_S, "env_vars": [], **kwargs}
    return RayWorkerGroup(cluster, worker_cls, name_prefix=name_prefix, **kwargs)


class BrokenWorker:
    def __init__(self) -> None:
        raise ValueError("bad worker config")


@pytest.fixture(scope="module")
def gloo_group() -> Iterator[RayWorkerGroup]:
    cluster = RayVirtualCluster([2], name="wg-test")
    group = make_group(cluster, GlooWorker, "gloo", worker_kwargs={"scale": 1})
    yield group
    group.shutdown()
    cluster.shutdown()


def test_env_threads_and_cpu_mode(gloo_group: RayWorkerGroup) -> None:
    envs = gloo_group.all(GlooWorker.env)
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
    assert gloo_group.all(GlooWorker.all_reduce, value=10) == [30, 30]


def test_sharded_dispatch_gives_each_rank_its_slice(gloo_group: RayWorkerGroup) -> None:
    data = BatchedDataDict(row=torch.arange(10), group_size=2)
    results = gloo_group.sharded(GlooWorker.describe, data, offset=100)
    assert results == [(0, [0, 1, 2, 3, 4, 5], 102), (1, [6, 7, 8, 9], 102)]


def test_per_rank_dispatch_gives_each_rank_its_value(gloo_group: RayWorkerGroup) -> None:
    values = [BatchedDataDict(row=torch.tensor([7])), BatchedDataDict(row=torch.tensor([8, 9]))]
    results = gloo_group.per_rank(GlooWorker.describe, values, offset=10)
    assert results == [(0, [7], 11), (1, [8, 9], 11)]
    with pytest.raises(ValueError, match="per_rank: 1 values for 2 workers"):
        gloo_group.per_rank(GlooWorker.describe, values[:1], offset=10)
    host, port = gloo_group.free_port(1)
    assert host == gloo_group.bundles[1].node_ip and 0 < port < 65536


def test_dispatch_takes_only_the_worker_classs_own_methods(gloo_group: RayWorkerGroup) -> None:
    with pytest.raises(ValueError, match="is not a method of GlooWorker"):
        gloo_group.all(EnvWorker.getenv, names=[])  # another class's method of the same shape
    with pytest.raises(ValueError, match="is not a method of GlooWorker"):
        gloo_group.all(print)


@pytest.mark.parametrize(("how", "expected"), [("raise", "boom from the worker"), ("exit", "died")])
def test_failure_surfaces_fast_while_peer_is_blocked(how: str, expected: str) -> None:
    cluster = RayVirtualCluster([2], use_gpus=False, name=f"fail-{how}")
    group = make_group(cluster, GlooWorker, "victim", worker_kwargs={"scale": 1})
    try:
        start = time.monotonic()
        futures = group.all_async(GlooWorker.fail_or_all_reduce, fail_rank=1, how=how)
        with pytest.raises(WorkerError) as info:
            group.get_results(futures)
        assert time.monotonic() - start < 30
        # The dead or raising rank is named first, even if its blocked peer failed too.
        message = str(info.value)
        assert message.startswith(f"Worker victim-1 (rank 1 of 2, pid {group.worker_pids[1]})")
        assert group.bundles[1].node_ip in message and "fail_or_all_reduce" in message
        assert expected in message
        assert len(message.splitlines()) < 20
        assert group.broken  # only shutdown() is safe now
    finally:
        group.shutdown()
        group.shutdown()  # idempotent
        cluster.shutdown()


def test_a_stopped_worker_times_out_naming_it() -> None:
    cluster = RayVirtualCluster([2], use_gpus=False, name="stopped")
    group = make_group(cluster, GlooWorker, "frozen", worker_kwargs={"scale": 1})
    stopped = group.worker_pids[1]
    stopped_process = {stopped: process_table()[stopped][1]}  # pid -> start time
    try:
        # Short for this call only: building the group takes longer on the loaded CI machine.
        group.timeout_s = 3.0
        os.kill(stopped, signal.SIGSTOP)
        start = time.monotonic()
        with pytest.raises(WorkerError) as info:
            group.all(GlooWorker.env)
        assert 3.0 <= time.monotonic() - start < 30
        message = str(info.value)
        assert message.startswith("1 worker(s) did not answer within 3 s")
        assert f"Worker frozen-1 (rank 1 of 2, pid {stopped}) on node" in message
        assert "GlooWorker.env()" in message and "rank 0" not in message  # rank 0 answered
        assert group.broken
        group.shutdown()  # kills the stopped process too
        assert wait_until_gone(stopped_process, timeout_s=60) == {}
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(stopped, signal.SIGCONT)
        group.shutdown()
        cluster.shutdown()


class EnvWorker:
    def getenv(self, *, names: list[str]) -> dict[str, str | None]:
        return {name: os.environ.get(name) for name in names}


def test_workers_get_named_variables_and_credentials_unlogged(monkeypatch) -> None:
    values = {
        "RLT_TEST_PLAIN": "plain-7f3a",  # named: set at the worker's start, logged by Ray
        "RLT_TEST_API_KEY": "named-credential-9c1e",  # named, a credential: build call only
        "HF_TOKEN": "allow-listed-credential-4b2d",  # allow-listed credential
        "WANDB_API_KEY": "driver-only-credential-8e6f",  # neither: stays in the driver
    }
    for name, value in values.items():
        monkeypatch.setenv(name, value)
    cluster = RayVirtualCluster([1], use_gpus=False, name="env")
    group = make_group(cluster, EnvWorker, "env", env_vars=["RLT_TEST_PLAIN", "RLT_TEST_API_KEY"])
    try:
        seen = group.all(EnvWorker.getenv, names=list(values))[0]
        process_env = environ(group.worker_pids[0])
    finally:
        group.shutdown()
        cluster.shutdown()
    assert seen == {**values, "WANDB_API_KEY": None}
    assert "RLT_TEST_PLAIN=plain-7f3a" in process_env
    session_dir = Path(os.environ["RAY_TMPDIR"])
    logs = [p.read_bytes() for p in session_dir.rglob("*") if p.is_file() and not p.is_socket()]
    assert any(b"plain-7f3a" in log for log in logs)  # Ray logs runtime envs: the grep sees them
    for name in ("RLT_TEST_API_KEY", "HF_TOKEN", "WANDB_API_KEY"):
        assert values[name] not in process_env
        assert not any(values[name].encode() in log for log in logs), name


def test_shut_down_cluster_is_a_value_error() -> None:
    cluster = RayVirtualCluster([1], use_gpus=False, name="gone")
    cluster.shutdown()
    with pytest.raises(ValueError, match="'late': the cluster has been shut down"):
        make_group(cluster, GlooWorker, "late")


def test_init_failure_is_a_worker_error() -> None:
    cluster = RayVirtualCluster([1], use_gpus=False, name="broken")
    try:
        with pytest.raises(WorkerError, match="bad worker config"):
            make_group(cluster, BrokenWorker, "broken")
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
    group = make_group(cluster, NcclWorker, "nccl")
    try:
        results = group.all(NcclWorker.all_reduce_ones)
        assert [total for total, _ in results] == [float(num_workers)] * num_workers
        assert len({devices for _, devices in results}) == num_workers  # a GPU each
    finally:
        group.shutdown()
        cluster.shutdown()


def test_error_text_stays_short_with_long_tracebacks_and_many_workers() -> None:
    frames = [f'  File "worker.py", line {i}, in f{i}\n    g{i}()\n    ^^^^^' for i in range(30)]
    traceback = "\n".join(["ray::_WorkerActor.call() (pid=1)", *frames, "ValueError: the cause"])
    lines = _cause_lines(ray.exceptions.RaySystemError(traceback))
    assert len(lines) == MAX_CAUSE_LINES
    assert lines[0].startswith("  ... (") and lines[-1] == "  ValueError: the cause"
    assert not any(line.strip() == "^^^^^" for line in lines)
    listed = _listed([f"worker {rank}" for rank in range(100)])
    assert listed == [
        *(f"  worker {rank}" for rank in range(MAX_WORKERS_LISTED)),
        "  ... and 96 more",
    ]
