"""Fixtures of the functional tests: a private Ray head the runs attach to."""

import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def ray_head():
    """A `ray start --head` with 4 CPUs in a private temp dir; yields the runs' environment.

    One for the whole session (in each test process), as a cluster outlives its jobs: a head
    takes 10 to 20 s of a loaded 2-core machine to start, and each run ends its own workers.
    """
    tmp_dir = tempfile.mkdtemp(prefix="rlt-fn-", dir="/tmp")
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    # A private head on loopback for these tests only: no token, so that no other head on the
    # machine (they share ~/.ray/auth_token) can get in the way.
    env.update(RAY_TMPDIR=tmp_dir, RAY_AUTH_MODE="disabled", PYTHONUNBUFFERED="1")
    ray = Path(sys.executable).parent / "ray"
    head = subprocess.Popen(
        [
            ray,
            "start",
            "--head",
            "--block",
            "--port=0",
            "--num-cpus=4",
            "--include-dashboard=false",
        ],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    address_file = Path(tmp_dir) / "ray" / "ray_current_cluster"
    deadline = time.monotonic() + 120
    while not address_file.exists():
        assert head.poll() is None and time.monotonic() < deadline, "ray start --head failed"
        time.sleep(0.2)
    env["RAY_ADDRESS"] = address_file.read_text().strip()
    yield env
    head.terminate()
    head.wait(timeout=60)
    shutil.rmtree(tmp_dir, ignore_errors=True)
