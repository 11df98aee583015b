"""RayVirtualCluster and init_ray: placement groups, CPU mode, errors, two nodes, attaching.

The two-node and attach tests each run a driver in a subprocess: a process holds one Ray
connection, and this one is connected to the session cluster of `ray_session`.
"""

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import ray

from rl_toolkit.distributed.ray_watchdog import process_table
from rl_toolkit.distributed.virtual_cluster import (
    InsufficientResourcesError,
    RayVirtualCluster,
    init_ray,
    worker_env,
)
from tests.process_testing import kill_all, wait_until_gone

REPO_ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.usefixtures("ray_session")
def test_cpu_fallback_bundles_and_shutdown() -> None:
    cluster = RayVirtualCluster([2], use_gpus=True, max_colocated_worker_groups=2, name="vc")
    try:
        assert not cluster.use_gpus  # the test cluster has no GPUs
        assert cluster.world_size() == 2
        assert len(cluster.get_placement_groups()) == 1  # SPREAD: one group
        # Colocated groups share the one CPU of a CPU bundle (they take turns on it).
        assert cluster.get_placement_groups()[0].bundle_specs == [{"CPU": 1.0}] * 2
        bundles = cluster.get_bundles()
        assert [b.bundle_index for b in bundles] == [0, 1]
        assert bundles[0].node_id == ray.get_runtime_context().get_node_id()
    finally:
        cluster.shutdown()
        cluster.shutdown()  # idempotent
    # The same CPUs can be reserved again once the first cluster is gone.
    again = RayVirtualCluster([1, 1], placement_group_strategy="STRICT_PACK", name="vc2")
    assert len(again.get_placement_groups()) == 2  # one group per node entry
    assert again.world_size() == 2
    again.shutdown()


@pytest.mark.usefixtures("ray_session")
def test_init_ray_reuses_an_initialized_ray() -> None:
    node_id, num_cpus = ray.get_runtime_context().get_node_id(), ray.cluster_resources()["CPU"]
    init_ray(num_cpus=1)  # no error, no new cluster
    assert ray.get_runtime_context().get_node_id() == node_id
    assert ray.cluster_resources()["CPU"] == num_cpus


@pytest.mark.usefixtures("ray_session")
def test_bad_arguments_are_value_errors() -> None:
    with pytest.raises(ValueError, match="placement_group_strategy='BEST'"):
        RayVirtualCluster([1], placement_group_strategy="BEST")
    with pytest.raises(ValueError, match="bundle_ct_per_node_list"):
        RayVirtualCluster([])


@pytest.mark.usefixtures("ray_session")
def test_too_small_cluster_fails_at_once() -> None:
    start = time.monotonic()
    with pytest.raises(InsufficientResourcesError, match="too small") as info:
        RayVirtualCluster([50], use_gpus=False, name="huge")
    assert time.monotonic() - start < 5
    assert "requested: {'CPU': 50.0}" in str(info.value)


@pytest.mark.usefixtures("ray_session")
def test_busy_cluster_times_out_with_resources_listed() -> None:
    holder = RayVirtualCluster([3], use_gpus=False, name="holder")
    try:
        with pytest.raises(InsufficientResourcesError, match="not ready after 1 s") as info:
            RayVirtualCluster([2], use_gpus=False, name="waiter", ready_timeout_s=1)
        message = str(info.value)
        assert "'waiter'" in message and "requested: {'CPU': 2.0}" in message
        assert "available now: {'CPU': 1.0}" in message
    finally:
        holder.shutdown()


def test_worker_env_allow_list_names_and_credentials(monkeypatch) -> None:
    for name in list(os.environ):
        monkeypatch.delenv(name)
    driver_env = {
        "PATH": "/bin",
        "HF_HOME": "/hf",
        "NCCL_SOCKET_IFNAME": "eth0",
        "CUDA_VISIBLE_DEVICES": "2,3",  # Ray sets each worker's
        "RANK": "0",
        "HF_TOKEN": "hf-token",
        "WANDB_API_KEY": "wandb-key",
        "AWS_SECRET_ACCESS_KEY": "aws-secret",
        "MY_FLAG": "1",
        "MY_BUCKET_KEY": "bucket-key",
        "UNNAMED": "x",
    }
    for name, value in driver_env.items():
        monkeypatch.setenv(name, value)
    env = worker_env(["MY_FLAG", "MY_BUCKET_KEY", "NOT_SET"])
    assert env.plain == {
        "PATH": "/bin",
        "HF_HOME": "/hf",
        "NCCL_SOCKET_IFNAME": "eth0",
        "MY_FLAG": "1",
    }
    assert env.credentials == {"HF_TOKEN": "hf-token", "MY_BUCKET_KEY": "bucket-key"}
    with pytest.raises(ValueError, match="cluster.worker_env_vars: 'RANK' is set for each worker"):
        worker_env(["RANK"])


@pytest.fixture
def private_ray_tmpdir() -> Iterator[dict[str, str]]:
    """Environment for a subprocess whose Ray files (and recorded head address) are private."""
    tmp_dir = tempfile.mkdtemp(prefix="rlt-sub-", dir="/tmp")  # short: Ray's unix sockets
    env = {key: value for key, value in os.environ.items() if key != "RAY_ADDRESS"}
    env["RAY_TMPDIR"] = tmp_dir
    env["PYTHONPATH"] = str(REPO_ROOT)
    yield env
    shutil.rmtree(tmp_dir, ignore_errors=True)


def run_driver(code: str, env: dict[str, str], timeout: float = 90) -> dict:
    """Run `code` in a fresh Python; it must print one JSON object as its last line."""
    result = subprocess.run(
        [sys.executable, "-c", code],
        env=env,
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


TWO_NODE_DRIVER = """
import json, os
import ray
from ray.cluster_utils import Cluster
from rl_toolkit.distributed.virtual_cluster import RayVirtualCluster, init_ray
from rl_toolkit.distributed.worker_groups import RayWorkerGroup
from tests.unit.test_worker_groups import GlooWorker

nodes = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
nodes.add_node(num_cpus=1)
nodes.wait_for_nodes()
os.environ["RAY_ADDRESS"] = nodes.address
init_ray()
cluster = RayVirtualCluster([1, 1], placement_group_strategy="STRICT_SPREAD", name="two")
group = RayWorkerGroup(
    cluster, GlooWorker, name_prefix="two", worker_kwargs={"scale": 1}, timeout_s=600, env_vars=[]
)
out = {
    "node_ids": [b.node_id for b in group.bundles],
    "envs": group.all(GlooWorker.env),
    "sums": group.all(GlooWorker.all_reduce, value=5),
}
group.shutdown()
cluster.shutdown()
ray.shutdown()
nodes.shutdown()
print(json.dumps(out))
"""


@pytest.mark.slow  # starts a two-node Ray cluster: 20-60 s on the shared 2-core machine
def test_two_nodes_one_worker_each_and_gloo_all_reduce(private_ray_tmpdir: dict) -> None:
    out = run_driver(TWO_NODE_DRIVER, private_ray_tmpdir)
    assert len(set(out["node_ids"])) == 2  # STRICT_SPREAD: one bundle per node
    envs = out["envs"]
    assert [env["RANK"] for env in envs] == ["0", "1"]
    assert [env["NODE_RANK"] for env in envs] == ["0", "1"]
    assert [env["LOCAL_RANK"] for env in envs] == ["0", "0"]
    assert {env["WORLD_SIZE"] for env in envs} == {"2"}
    assert len({(env["MASTER_ADDR"], env["MASTER_PORT"]) for env in envs}) == 1
    assert out["sums"] == [15, 15]  # 5 * 1 + 5 * 2


ATTACH_DRIVER = """
import json, os
import ray
from rl_toolkit.distributed.virtual_cluster import init_ray

@ray.remote(num_cpus=0)
class View:
    def env(self):
        return [os.environ.get(name) for name in ("NCCL_DEBUG", "RLT_ATTACH_VAR", "OWN")]

def worker_view():
    # An actor with env vars of its own (as the worker group's) still gets the driver's
    # allow-listed ones.
    view = View.options(runtime_env={"env_vars": {"OWN": "own"}}).remote()
    return ray.get(view.env.remote())

out = {}
init_ray()  # no RAY_ADDRESS: finds the head recorded by `ray start --head`
out["recorded"] = [ray.get_runtime_context().gcs_address, ray.cluster_resources()["CPU"]]
out["env"] = worker_view()
ray.shutdown()
try:
    init_ray(num_cpus=2)
except ValueError as error:
    out["error"] = str(error)
os.environ["RAY_ADDRESS"] = out["recorded"][0]
init_ray()
out["explicit"] = [ray.get_runtime_context().gcs_address, ray.cluster_resources()["CPU"]]
print(json.dumps(out))
"""


@pytest.mark.slow  # `ray start --head` alone takes 15-30 s on the shared 2-core machine
def test_init_ray_attaches_to_running_head(private_ray_tmpdir: dict, free_port: int) -> None:
    env = private_ray_tmpdir
    # --block keeps the head in the foreground: terminating this process stops exactly this
    # head (`ray stop` would stop every Ray instance on the machine).
    head = subprocess.Popen(
        [Path(sys.executable).parent / "ray", "start", "--head", "--block", f"--port={free_port}"]
        + ["--num-cpus=1", "--include-dashboard=false"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        address_file = Path(env["RAY_TMPDIR"]) / "ray" / "ray_current_cluster"
        deadline = time.monotonic() + 60
        while not address_file.exists():
            assert head.poll() is None and time.monotonic() < deadline, "ray start --head failed"
            time.sleep(0.2)
        out = run_driver(ATTACH_DRIVER, {**env, "NCCL_DEBUG": "WARN", "RLT_ATTACH_VAR": "x"})
        left_behind = _kill_driver_with_a_worker(env)
    finally:
        head.terminate()
        head.wait(timeout=30)
    assert out["recorded"][0].endswith(f":{free_port}")
    assert out["recorded"][1] == 1.0  # the head's CPU, not a new local cluster
    # The head was started without either: NCCL_DEBUG is allow-listed, RLT_ATTACH_VAR is not.
    assert out["env"] == ["WARN", None, "own"]
    assert "only applies to a new local cluster" in out["error"]
    assert out["explicit"] == out["recorded"]
    assert left_behind == {}  # the worker of a killed driver dies with it


DRIVER_WITH_A_WORKER = """
import time
from rl_toolkit.distributed.virtual_cluster import RayVirtualCluster, init_ray
from rl_toolkit.distributed.worker_groups import RayWorkerGroup
from tests.unit.test_worker_groups import EnvWorker

init_ray()
cluster = RayVirtualCluster([1], use_gpus=False, name="doomed")
group = RayWorkerGroup(cluster, EnvWorker, name_prefix="doomed", timeout_s=600, env_vars=[])
print(group.worker_pids[0], flush=True)
time.sleep(600)
"""


def _kill_driver_with_a_worker(env: dict[str, str]) -> dict[int, int]:
    """SIGKILL a driver attached to the running head once its worker runs; the worker process
    (pid -> start time) if it is still running 60 s later."""
    driver = subprocess.Popen(
        [sys.executable, "-c", DRIVER_WITH_A_WORKER],
        env=env,
        cwd=REPO_ROOT,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        worker = int(driver.stdout.readline())
        worker_process = {worker: process_table()[worker][1]}
        driver.send_signal(signal.SIGKILL)
        driver.wait(timeout=30)
        left = wait_until_gone(worker_process, timeout_s=60)
    finally:
        driver.kill()
    kill_all(left)
    return left


def test_no_head_at_ray_address_is_one_line_in_seconds(free_port: int) -> None:
    # Ray itself retries for minutes before it gives up on an address where nothing listens.
    env = {**os.environ, "RAY_ADDRESS": f"127.0.0.1:{free_port}"}
    code = (
        "from rl_toolkit.distributed.virtual_cluster import RayStartError, init_ray\n"
        "try:\n    init_ray()\nexcept RayStartError as error:\n    print(error)\n"
    )
    start = time.monotonic()
    result = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120
    )
    assert time.monotonic() - start < 60
    assert result.stdout.strip().splitlines() == [
        f"no Ray head answers at 127.0.0.1:{free_port} (RAY_ADDRESS): Connection refused; start "
        "one with `ray start --head`, or unset RAY_ADDRESS (and run `ray stop` for a stale head) "
        "to start a local cluster"
    ], result.stderr[-2000:]
