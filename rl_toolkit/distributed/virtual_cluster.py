"""Ray start-up and the virtual cluster: placement groups that reserve one bundle per worker.

A bundle is the slice of the cluster one worker runs in: `{"GPU": 1, "CPU": k}` with
`k = max_colocated_worker_groups`, so that that many worker groups (one actor each) can share a
bundle, or `{"CPU": 1}` in CPU mode, which the colocated groups' actors share (they take turns). The worker group (`worker_groups.py`) starts one actor per bundle and
uses `get_bundles()` to learn which node each bundle landed on.
"""

import contextlib
import logging
import os
import re
import socket
import subprocess
import sys
from collections.abc import Iterator, Sequence
from typing import NamedTuple

import ray
from ray._private import ray_constants
from ray._private.services import find_bootstrap_address
from ray.util.placement_group import PlacementGroup, placement_group, placement_group_table

from rl_toolkit.config_schema import ClusterConfig, ShardedModelConfig, num_workers
from rl_toolkit.distributed import ray_watchdog
from rl_toolkit.utils.config import ConfigError

logger = logging.getLogger(__name__)

# What workers get of the driver's environment: these names and prefixes, plus the names a
# caller asks for (cluster.worker_env_vars). The rest stays in the driver: its environment
# holds credentials that workers do not need (WANDB_API_KEY, cloud keys), and Ray writes the
# variables it passes to workers into its logs and into every worker process.
_WORKER_ENV_NAMES = frozenset(
    {
        # the process basics
        "PATH", "HOME", "USER", "LOGNAME", "LANG", "LANGUAGE", "TZ", "TMPDIR", "TEMP", "TMP",
        "LD_LIBRARY_PATH", "VIRTUAL_ENV", "CONDA_PREFIX", "XDG_CACHE_HOME", "CC", "CXX",
        # hub downloads: certificate bundles, proxies, Hugging Face caches and switches
        "SSL_CERT_FILE", "SSL_CERT_DIR", "REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE",
        "HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "NO_PROXY",
        "http_proxy", "https_proxy", "all_proxy", "no_proxy",
        "HF_HOME", "HF_ENDPOINT", "HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "TOKENIZERS_PARALLELISM",
    }
)  # fmt: skip
_WORKER_ENV_PREFIXES = (
    "LC_", "PYTHON", "HF_HUB_", "HF_DATASETS_", "TRANSFORMERS_",
    # torch, compilers and the collective libraries' tuning
    "TORCH_", "TORCHINDUCTOR_", "TORCHDYNAMO_", "PYTORCH_", "TRITON_",
    "CUDA_", "CUDNN_", "CUBLAS", "NCCL_", "GLOO_", "TP_SOCKET_", "UCX_", "FI_",
)  # fmt: skip
# Set for each worker by the worker group (RANK & co., OMP_NUM_THREADS) or by Ray (the device
# lists): the driver's values would be wrong there.
_PER_WORKER_ENV_VARS = frozenset(
    {
        "RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "NODE_RANK", "MASTER_ADDR",
        "MASTER_PORT", "OMP_NUM_THREADS", "CUDA_VISIBLE_DEVICES", "HIP_VISIBLE_DEVICES",
        "ROCR_VISIBLE_DEVICES",
    }
)  # fmt: skip
# Names of credentials (HF_TOKEN, AWS_SECRET_ACCESS_KEY, a proxy URL with a password): a worker
# gets these in the call that builds it, never through Ray's runtime_env, which Ray logs.
_CREDENTIAL_NAME = re.compile(r"TOKEN|SECRET|PASSW|CREDENTIAL|KEY|AUTH|PROXY", re.IGNORECASE)


class WorkerEnv(NamedTuple):
    """The driver's environment variables that workers get, split by how they travel."""

    plain: dict[str, str]  # set when the worker process starts (Ray's runtime_env: logged)
    credentials: dict[str, str]  # put into os.environ before the worker is built (not logged)


def worker_env(extra_names: Sequence[str]) -> WorkerEnv:
    """What workers get of the driver's environment (`os.environ`).

    Args:
        extra_names: variables to pass on top of the built-in allow-list
            (`cluster.worker_env_vars`); names the driver does not have are skipped.

    Returns:
        The allow-listed and the named variables the driver has; those whose name marks a
        credential (TOKEN, KEY, SECRET, PASSWORD, ..., proxies) in `credentials`.

    Raises:
        ValueError: a name in `extra_names` is one that is set for each worker (RANK,
            CUDA_VISIBLE_DEVICES, ...).
    """
    check_worker_env_vars(extra_names)
    plain: dict[str, str] = {}
    credentials: dict[str, str] = {}
    for name, value in os.environ.items():
        if name in extra_names or _is_worker_var(name):
            target = credentials if _CREDENTIAL_NAME.search(name) else plain
            target[name] = value
    return WorkerEnv(plain, credentials)


def check_worker_env_vars(names: Sequence[str]) -> None:
    """Raise ConfigError if `names` (`cluster.worker_env_vars`) holds a variable that is set for
    each worker (RANK, CUDA_VISIBLE_DEVICES, ...): the driver's value would be wrong there."""
    for name in names:
        if name in _PER_WORKER_ENV_VARS:
            raise ConfigError(
                f"cluster.worker_env_vars: {name!r} is set for each worker by Ray or the worker "
                "group; it cannot be passed from the driver"
            )


def _is_worker_var(name: str) -> bool:
    return name not in _PER_WORKER_ENV_VARS and (
        name in _WORKER_ENV_NAMES or name.startswith(_WORKER_ENV_PREFIXES)
    )


def _local_ray_env() -> dict[str, str]:
    """The environment of the processes a local Ray start spawns (GCS, raylet and, through the
    raylet, every worker): what workers get plus Ray's own settings (RAY_*) and the device lists
    (CUDA_VISIBLE_DEVICES, ...) that tell Ray which accelerators it may use."""
    ray_vars = {
        name: value
        for name, value in os.environ.items()
        if name.startswith("RAY_") or "_VISIBLE_" in name
    }
    return {**worker_env(()).plain, **ray_vars}


@contextlib.contextmanager
def _environ(values: dict[str, str]) -> Iterator[None]:
    """Run the block with `os.environ` replaced by `values`: Ray starts its processes with a
    copy of it. Restored afterwards (the driver keeps its credentials, e.g. for wandb)."""
    saved = dict(os.environ)
    os.environ.clear()
    os.environ.update(values)
    try:
        yield
    finally:
        os.environ.clear()
        os.environ.update(saved)


# The watchdogs of the local Ray instances this process started: referenced until it exits,
# since closing a watchdog's stdin tells it to kill (see ray_watchdog).
_watchdogs: list[subprocess.Popen] = []

_PER_NODE_STRATEGY = "STRICT_PACK"
_ONE_GROUP_STRATEGIES = ("PACK", "SPREAD", "STRICT_SPREAD")


def _disable_uv_run_worker_env() -> None:
    # When the driver runs under `uv run`, Ray (2.60) by default ships a copy of the current
    # directory as working_dir and starts every worker as `uv run ... python` inside it: uv
    # then builds a second .venv in that copy (about 140 packages for this project) and the
    # worker runs from there, with the copy as its cwd. Our workers need nothing but the
    # driver's interpreter: a local start uses it (sys.executable), and a cluster started
    # with `uv run ray start` runs the same .venv. Ray read the flag when it was
    # imported, so the module constant is reset too; the environment variable covers the Ray
    # processes started from here (a local head and its workers).
    os.environ["RAY_ENABLE_UV_RUN_RUNTIME_ENV"] = "0"
    ray_constants.RAY_ENABLE_UV_RUN_RUNTIME_ENV = False


def init_ray(log_dir: str | None = None, *, num_cpus: int | None = None) -> None:
    """Connect to Ray: attach to a running cluster if there is one, else start a local one.

    A running cluster is the one in RAY_ADDRESS, or else the last head started on this machine
    with `ray start --head` (what `ray.init()` finds). Does nothing if this process is already
    connected to Ray. Workers get the driver's Python interpreter and an allow-list of its
    environment variables (`worker_env`; the worker group adds what the caller names); the
    dashboard is off.

    A local cluster is started with only what workers need of the driver's environment (its
    processes, and through the raylet every worker, would inherit all of it) and, on Linux, a
    watchdog (`ray_watchdog`) that kills all of its processes as soon as the driver dies.

    Args:
        log_dir: directory for the session files and logs of a newly started local cluster
            (Ray's temp dir; keep it short, Ray puts unix sockets there); when attaching, the
            cluster's own directory is used and this is ignored.
        num_cpus: CPUs of a newly started local cluster (default: all cores; tests ask for more
            than the machine has to oversubscribe it); must be None when attaching.
    """
    if ray.is_initialized():
        # E.g. a test session's cluster, or a user's own ray.init before calling a recipe.
        logger.info("Ray is already initialized in this process; init_ray reuses it")
        return
    _disable_uv_run_worker_env()
    runtime_env = {"env_vars": worker_env(()).plain}
    address = os.environ.get("RAY_ADDRESS") or find_bootstrap_address(None)
    if address:
        if num_cpus is not None:
            raise ValueError(
                f"init_ray: num_cpus={num_cpus} only applies to a new local cluster, but a "
                f"running cluster was found at {address} (RAY_ADDRESS or `ray start --head`)"
            )
        logger.info("Attaching to the running Ray cluster at %s", address)
        _check_reachable(address)
        # address=None makes Ray read RAY_ADDRESS or the recorded head itself; only then does it
        # pick up the token of a token-auth cluster (~/.ray/auth_token), as `ray start` made it.
        with _one_line_ray_errors(f"cannot attach to the Ray cluster at {address}"):
            ray.init(address=None, runtime_env=runtime_env)
        return
    logger.info("No running Ray cluster found; starting a local one")
    with _one_line_ray_errors("cannot start a local Ray cluster"):
        _start_local_ray(
            num_cpus=num_cpus,
            runtime_env=runtime_env,
            temp_dir=os.path.abspath(log_dir) if log_dir else None,
        )


class RayStartError(ConfigError):
    """Ray could not be started or attached to; the message says what to do (exit status 2)."""


def _check_reachable(address: str, timeout_s: float = 5.0) -> None:
    """Fail in seconds, not after Ray's minutes of retries, when no head answers at `address`."""
    host, _, port = address.removeprefix("ray://").rpartition(":")
    if not host or not port.isdigit():
        return  # a form Ray resolves itself (e.g. "auto"); it reports its own errors
    try:
        socket.create_connection((host, int(port)), timeout=timeout_s).close()
    except OSError as error:
        source = (
            "RAY_ADDRESS" if os.environ.get("RAY_ADDRESS") else "the head recorded by `ray start`"
        )
        raise RayStartError(
            f"no Ray head answers at {address} ({source}): {error.strerror or error}; start one "
            "with `ray start --head`, or unset RAY_ADDRESS (and run `ray stop` for a stale "
            "head) to start a local cluster"
        ) from None


@contextlib.contextmanager
def _one_line_ray_errors(what: str) -> Iterator[None]:
    """Ray's start-up failures as one line with the likely fix, not a page of traceback."""
    try:
        yield
    except (ConnectionError, RuntimeError, TimeoutError) as error:
        first_line = str(error).strip().partition("\n")[0]
        raise RayStartError(
            f"{what}: {first_line} (see Ray's logs under its temp dir, RAY_TMPDIR or /tmp/ray; "
            "`ray stop` clears stale Ray processes)"
        ) from None


def _start_local_ray(*, num_cpus: int | None, runtime_env: dict, temp_dir: str | None) -> None:
    env = _local_ray_env()
    watch = sys.platform.startswith("linux")  # the watchdog reads /proc
    children_before = ray_watchdog.own_child_pids() if watch else set()
    with _environ(env):
        ray.init(
            num_cpus=num_cpus,
            include_dashboard=False,
            dashboard_host="127.0.0.1",
            runtime_env=runtime_env,
            _temp_dir=temp_dir,
        )
    if watch:
        # What ray.init started: the GCS, the raylet and Ray's other helpers.
        ray_processes = ray_watchdog.own_child_pids() - children_before
        _watchdogs.append(ray_watchdog.start(ray_processes, env))


class BundleInfo(NamedTuple):
    """Where one bundle of the virtual cluster lives."""

    placement_group: PlacementGroup
    bundle_index: int  # index inside its placement group
    node_id: str  # Ray node id (hex)
    node_ip: str


class InsufficientResourcesError(RuntimeError):
    """The cluster cannot provide the requested bundles: too small, or busy past the timeout."""


class RayVirtualCluster:
    """Placement groups that reserve one bundle per worker on a Ray cluster.

    Args:
        bundle_ct_per_node_list: bundles (workers) per node, e.g. `[8, 8]` for two 8-GPU nodes.
        use_gpus: one GPU per bundle; falls back to CPU bundles (with a warning) when the Ray
            cluster has no GPUs.
        max_colocated_worker_groups: worker groups that may share a bundle; with GPUs each
            bundle gets that many CPUs (one per actor) and each actor 1 / that of the bundle's
            GPU; without, the bundle has one CPU and each actor 1 / that of it (the groups of
            an engine take turns on it).
        num_gpus_per_node: GPUs per node; a node's bundle count may not exceed it (GPU mode).
        name: prefix of the placement group names (shows in `ray status` / `ray list`).
        placement_group_strategy: "STRICT_PACK": one placement group per node entry, its
            bundles packed on one node; "PACK", "SPREAD" or "STRICT_SPREAD": one placement
            group holding all bundles, placed with that strategy.
        ready_timeout_s: how long to wait for the placement groups before giving up.
    """

    def __init__(
        self,
        bundle_ct_per_node_list: list[int],
        use_gpus: bool = True,
        max_colocated_worker_groups: int = 1,
        num_gpus_per_node: int = 8,
        name: str = "",
        placement_group_strategy: str = "SPREAD",
        ready_timeout_s: float = 180.0,
    ) -> None:
        self._check_args(bundle_ct_per_node_list, max_colocated_worker_groups)
        if placement_group_strategy not in (_PER_NODE_STRATEGY, *_ONE_GROUP_STRATEGIES):
            raise ValueError(
                f"RayVirtualCluster: placement_group_strategy={placement_group_strategy!r}; "
                f"expected one of {[_PER_NODE_STRATEGY, *_ONE_GROUP_STRATEGIES]}"
            )
        if use_gpus and ray.cluster_resources().get("GPU", 0) == 0:
            logger.warning(
                "The Ray cluster has no GPUs: RayVirtualCluster %r uses CPU bundles", name
            )
            use_gpus = False
        if use_gpus and max(bundle_ct_per_node_list) > num_gpus_per_node:
            raise ValueError(
                f"RayVirtualCluster: bundle_ct_per_node_list={bundle_ct_per_node_list} asks for "
                f"more GPUs on a node than num_gpus_per_node={num_gpus_per_node}"
            )
        self.bundle_ct_per_node_list = list(bundle_ct_per_node_list)
        self.use_gpus = use_gpus
        self.max_colocated_worker_groups = max_colocated_worker_groups
        self.name = name
        self.placement_group_strategy = placement_group_strategy
        self._check_feasible()
        self._placement_groups = self._create_placement_groups(ready_timeout_s)

    @staticmethod
    def _check_args(bundle_ct_per_node_list: list[int], max_colocated_worker_groups: int) -> None:
        if not bundle_ct_per_node_list or min(bundle_ct_per_node_list) < 1:
            raise ValueError(
                "RayVirtualCluster: bundle_ct_per_node_list must be a non-empty list of positive "
                f"bundle counts per node, got {bundle_ct_per_node_list}"
            )
        if max_colocated_worker_groups < 1:
            raise ValueError(
                "RayVirtualCluster: max_colocated_worker_groups must be >= 1, got "
                f"{max_colocated_worker_groups}"
            )

    def _bundle(self) -> dict[str, float]:
        if not self.use_gpus:
            return {"CPU": 1.0}
        return {"CPU": float(self.max_colocated_worker_groups), "GPU": 1.0}

    def _create_placement_groups(self, ready_timeout_s: float) -> list[PlacementGroup]:
        if self.placement_group_strategy == _PER_NODE_STRATEGY:
            bundles_per_group = [[self._bundle()] * count for count in self.bundle_ct_per_node_list]
        else:
            bundles_per_group = [[self._bundle()] * self.world_size()]
        groups = [
            placement_group(
                bundles,
                strategy=self.placement_group_strategy,
                name=f"{self.name}-pg{group_idx}" if self.name else "",
            )
            for group_idx, bundles in enumerate(bundles_per_group)
        ]
        try:
            ray.get([group.ready() for group in groups], timeout=ready_timeout_s)
        except ray.exceptions.GetTimeoutError as error:
            # Describe the cluster first: the removal below takes effect asynchronously.
            message = self._missing_resources_message(f"not ready after {ready_timeout_s:.0f} s")
            for group in groups:
                ray.util.remove_placement_group(group)
            raise InsufficientResourcesError(message) from error
        return groups

    def _requested_resources(self) -> dict[str, float]:
        return {key: amount * self.world_size() for key, amount in self._bundle().items()}

    def _check_feasible(self) -> None:
        # Fail at once, rather than after the timeout, when the whole cluster is too small.
        total = ray.cluster_resources()
        if any(amount > total.get(key, 0) for key, amount in self._requested_resources().items()):
            raise InsufficientResourcesError(
                self._missing_resources_message("cannot fit: the cluster is too small")
            )

    def _missing_resources_message(self, reason: str) -> str:
        requested = self._requested_resources()
        total, available = ray.cluster_resources(), ray.available_resources()
        lines = [
            f"RayVirtualCluster {self.name!r}: placement groups {reason} "
            f"({self.placement_group_strategy}, bundles per node {self.bundle_ct_per_node_list}, "
            f"each {self._bundle()}).",
            f"  requested: {requested}",
            f"  cluster total: { {key: total.get(key, 0) for key in requested} }",
            f"  available now: { {key: available.get(key, 0) for key in requested} }",
            f"  per node: {_resources_per_node(list(requested))}",
        ]
        return "\n".join(lines)

    def world_size(self) -> int:
        """Number of bundles, i.e. of workers in a worker group on this cluster."""
        return sum(self.bundle_ct_per_node_list)

    def get_placement_groups(self) -> list[PlacementGroup]:
        """The placement groups, in creation order."""
        return list(self._placement_groups)

    def get_bundles(self) -> list[BundleInfo]:
        """Every bundle with its node, in rank order: grouped by node, nodes in order of first
        appearance, bundles of a node in placement group order.

        SPREAD strategies interleave nodes in bundle order; grouping keeps the ranks of a node
        contiguous, so LOCAL_RANK and NODE_RANK follow from the position in this list.
        """
        node_ips = {node["NodeID"]: node["NodeManagerAddress"] for node in ray.nodes()}
        bundles = []
        for group in self._placement_groups:
            bundle_nodes = placement_group_table(group)["bundles_to_node_id"]
            for bundle_index in range(group.bundle_count):
                node_id = bundle_nodes[bundle_index]
                bundles.append(BundleInfo(group, bundle_index, node_id, node_ips[node_id]))
        node_order = {
            node_id: i for i, node_id in enumerate(dict.fromkeys(b.node_id for b in bundles))
        }
        return sorted(bundles, key=lambda bundle: node_order[bundle.node_id])

    def shutdown(self) -> None:
        """Remove the placement groups (idempotent), freeing their resources for a new cluster."""
        for group in self._placement_groups:
            ray.util.remove_placement_group(group)
        self._placement_groups = []


def _resources_per_node(resources: list[str]) -> list[str]:
    """Each alive node's IP and total amount of the resources named (Ray reports no per-node
    availability; the cluster-wide one is in the message above it)."""
    summary = []
    for node in ray.nodes():
        if node["Alive"]:
            totals = {key: node["Resources"].get(key, 0) for key in resources}
            summary.append(f"{node['NodeManagerAddress']} total {totals}")
    return summary


def check_cluster_fits(
    cluster: ClusterConfig,
    policy: ShardedModelConfig,
    *,
    section: str = "policy",
) -> None:
    """The Ray cluster has the GPUs (or CPUs) the workers ask for, and the precision fits.

    Called on the driver once Ray is up, before any placement group or worker exists.

    Args:
        policy: the section of the model the workers hold (the policy, a critic, ...).
        section: its name, for the errors.

    Raises:
        ConfigError: one line naming the cluster.* or <section>.* key and what the cluster has.
    """
    total = ray.cluster_resources()
    workers, num_gpus = num_workers(cluster), int(total.get("GPU", 0))
    asked = (
        f"cluster.gpus_per_node={cluster['gpus_per_node']} x "
        f"cluster.num_nodes={cluster['num_nodes']} = {workers} workers"
    )
    if num_gpus == 0:
        if policy["precision"] == "bfloat16":
            raise ConfigError(
                f"{section}.precision=bfloat16 needs GPU workers, but the Ray cluster has no "
                f"GPU; use {section}.precision=float32 on CPU"
            )
        if policy["fsdp"]["cpu_offload"]:
            raise ConfigError(
                f"{section}.fsdp.cpu_offload=true needs GPU workers (on CPU the weights are in "
                "host memory already), but the Ray cluster has no GPU; set it to false"
            )
        num_cpus = int(total.get("CPU", 0))
        if workers > num_cpus:  # colocated worker groups share a worker's CPU
            raise ConfigError(
                f"{asked}, one CPU each, but the Ray cluster has {num_cpus} CPUs and no GPU; "
                "lower cluster.gpus_per_node"
            )
        return
    if workers > num_gpus:
        raise ConfigError(
            f"{asked}, one GPU each, but the Ray cluster has {num_gpus} GPUs; lower "
            "cluster.gpus_per_node or cluster.num_nodes"
        )
    most_on_a_node = max(
        int(node["Resources"].get("GPU", 0)) for node in ray.nodes() if node["Alive"]
    )
    if cluster["gpus_per_node"] > most_on_a_node:
        raise ConfigError(
            f"cluster.gpus_per_node={cluster['gpus_per_node']}, but no node of the Ray cluster "
            f"has more than {most_on_a_node} GPUs"
        )
