"""ray_watchdog: when the driver dies, the process trees it watches die too, and nothing else."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.process_testing import kill_all, running, tree, wait_until_gone

REPO_ROOT = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")

# A process that starts a child at once and another after 3 s (after the watchdog's first
# scans), then sleeps; neither notices its parent's death, like Ray's agents waiting on a dead GCS.
HELPER = """
import subprocess, sys, time
sleeper = [sys.executable, "-c", "import time; time.sleep(300)"]
subprocess.Popen(sleeper)
time.sleep(3)
subprocess.Popen(sleeper)
time.sleep(300)
"""

# The driver: a bystander child it does not hand to the watchdog, the helper tree it does.
DRIVER = f"""
import json, os, subprocess, sys, time
from rl_toolkit.distributed import ray_watchdog
bystander = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(300)"])
helper = subprocess.Popen([sys.executable, "-c", {HELPER!r}])
watchdog = ray_watchdog.start({{helper.pid}}, env=dict(os.environ))
print(json.dumps([bystander.pid, helper.pid, watchdog.pid]), flush=True)
time.sleep(300)
"""


def test_driver_death_kills_the_watched_trees_only() -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    driver = subprocess.Popen(
        [sys.executable, "-c", DRIVER], env=env, stdout=subprocess.PIPE, text=True
    )
    everything = {}
    try:
        bystander, helper, watchdog = json.loads(driver.stdout.readline())
        deadline = time.monotonic() + 60
        while len(tree(helper)) < 2:  # the second child starts after the watchdog's scans
            assert time.monotonic() < deadline, "the helper did not start its children"
            time.sleep(0.2)
        everything = tree(driver.pid)
        helper_tree = {helper: everything[helper], **tree(helper)}

        driver.send_signal(signal.SIGKILL)
        driver.wait(timeout=30)
        assert wait_until_gone(helper_tree, timeout_s=15) == {}
        assert wait_until_gone({watchdog: everything[watchdog]}, timeout_s=15) == {}
        assert running(bystander, everything[bystander])  # not handed to the watchdog
    finally:
        driver.kill()
        kill_all(everything)
