"""Fixtures shared by the whole test suite."""

import os
import shutil
import socket
import tempfile
from collections.abc import Iterator

import pytest
import ray
import torch

from rl_toolkit.distributed.virtual_cluster import init_ray

# Ray is told there are more CPUs than the 2-core CI machine has: the tests' workers mostly
# wait on each other, and a two-worker group plus a few helper tasks must fit at once.
NUM_TEST_CPUS = 4

# The worker timeout of the tests' worker groups: far above any call on the loaded CI machine,
# so that it only turns a hung worker into a failed test instead of a stuck suite.
WORKER_TIMEOUT_S = 600.0


@pytest.fixture(scope="session")
def ray_session() -> Iterator[None]:
    """A local Ray cluster with NUM_TEST_CPUS CPUs for the whole session, started by init_ray.

    Its files live in a private RAY_TMPDIR, so the tests neither attach to nor get attached by
    another Ray instance on the machine (another test session, or a `ray start --head`), and
    RAY_ADDRESS is ignored for the same reason.
    """
    saved = {key: os.environ.pop(key, None) for key in ("RAY_ADDRESS", "RAY_TMPDIR")}
    # Short path: Ray puts unix sockets under it (limit about 107 characters).
    tmp_dir = tempfile.mkdtemp(prefix="rlt-ray-", dir="/tmp")
    os.environ["RAY_TMPDIR"] = tmp_dir
    init_ray(num_cpus=NUM_TEST_CPUS)
    yield
    ray.shutdown()
    shutil.rmtree(tmp_dir, ignore_errors=True)
    for key, value in saved.items():
        os.environ.pop(key, None)
        if value is not None:
            os.environ[key] = value


@pytest.fixture
def free_port() -> int:
    """A TCP port that is free on this machine right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("", 0))
        return sock.getsockname()[1]


# Tests marked `slurm` submit real jobs (whole nodes on a real cluster), so they run only when
# asked for: .ci/run sets it after starting its single-node Slurm.
SLURM_TESTS_ENV = "RL_TOOLKIT_SLURM_TESTS"


# The fixtures that start Ray or run recipes on it: the modules that use them hold most of the
# suite's time (a few to several minutes each, where most others take seconds).
RAY_FIXTURES = frozenset({"ray_session", "ray_head"})


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Run the modules that use Ray first, and skip tests marked `gpu` without a CUDA GPU and
    tests marked `slurm` unless RL_TOOLKIT_SLURM_TESTS=1 (the markers' promises in pyproject).

    The order is what the two test processes take whole files in (pyproject's addopts keep it):
    with the long modules first, the short ones left at the end let both processes finish
    together, instead of one running a long module alone while the other has nothing left.
    """
    ray_modules = {
        item.path for item in items if RAY_FIXTURES & set(getattr(item, "fixturenames", ()))
    }
    items.sort(key=lambda item: item.path not in ray_modules)  # stable: file order otherwise
    skips = {}
    if not torch.cuda.is_available():
        skips["gpu"] = pytest.mark.skip(reason="needs a CUDA GPU")
    if os.environ.get(SLURM_TESTS_ENV) != "1":
        skips["slurm"] = pytest.mark.skip(
            reason=f"submits real Slurm jobs: set {SLURM_TESTS_ENV}=1 to run it (.ci/run does)"
        )
    for item in items:
        for marker, skip in skips.items():
            if item.get_closest_marker(marker) is not None:
                item.add_marker(skip)
