"""ray.sub on a real Slurm: the local single-node cluster that .ci/slurm_setup.sh starts.

Each test submits ray.sub with sbatch, waits for the job, and checks its exit code, the logs in
`<BASE_LOG_DIR>/<job id>-logs/` (as docs/cluster.md describes them) and that no Ray process of
the job is left. They submit real jobs, so they run only with RL_TOOLKIT_SLURM_TESTS=1 (.ci/run
sets it); then a Slurm that does not answer fails them. Nothing is installed here.
"""

import os
import re
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from rl_toolkit.utils.checkpoint import is_complete_checkpoint

JOB_TIMEOUT_S = 480  # a job's own limit here; pytest's per-test limit leaves room for it

pytestmark = [
    pytest.mark.slurm,
    pytest.mark.slow,
    pytest.mark.timeout(JOB_TIMEOUT_S + 120),
    pytest.mark.usefixtures("require_slurm"),
]

REPO_ROOT = Path(__file__).resolve().parents[2]
RAY_SUB = REPO_ROOT / "ray.sub"

DPO_NUM_STEPS = 3

# ray.sub's settings (docs/cluster.md): the tests set their own, none comes from the caller's
# environment.
RAY_SUB_SETTINGS = (
    "COMMAND",
    "CONTAINER",
    "MOUNTS",
    "BASE_LOG_DIR",
    "PYTHON",
    "NODE_TMP_DIR",
    "JOIN_TIMEOUT_S",
    "DASHBOARD",
    "PORT_BASE",
    "GCS_PORT",
    "NODE_MANAGER_PORT",
    "OBJECT_MANAGER_PORT",
    "CLIENT_SERVER_PORT",
    "DASHBOARD_PORT",
    "MIN_WORKER_PORT",
    "MAX_WORKER_PORT",
)
FINISHED_STATES = {
    "COMPLETED",
    "FAILED",
    "CANCELLED",
    "TIMEOUT",
    "NODE_FAIL",
    "OUT_OF_MEMORY",
    "PREEMPTED",
    "BOOT_FAIL",
    "DEADLINE",
}

# A driver that attaches like run_dpo.py (init_ray), runs a task on the cluster and exits with the
# status it is given: the exit status test is quicker with it than with a DPO run made to fail.
STANDIN_DRIVER = """\
import sys

import ray

from rl_toolkit.distributed.virtual_cluster import init_ray

init_ray()
print("standin driver: task result", ray.get(ray.remote(lambda: 42).remote()), flush=True)
sys.exit(int(sys.argv[1]))
"""


@pytest.fixture(scope="module")
def require_slurm() -> None:
    """Fails the tests unless a Slurm controller answers and has a node up.

    These tests run only when asked for (RL_TOOLKIT_SLURM_TESTS=1, see tests/conftest.py), so a
    Slurm that is missing then is an error of the set-up, not a reason to skip.
    """
    for tool in ("sinfo", "sbatch", "squeue", "scontrol", "scancel"):
        if shutil.which(tool) is None:
            pytest.fail(f"no Slurm here: `{tool}` is not on PATH (start one: .ci/slurm_setup.sh)")
    try:
        result = subprocess.run(
            ["sinfo", "--noheader", "--format=%n %T"], capture_output=True, text=True, timeout=30
        )
    except subprocess.TimeoutExpired:
        pytest.fail("the Slurm controller does not answer (`sinfo` timed out after 30 s)")
    if result.returncode != 0:
        pytest.fail(f"the Slurm controller does not answer: sinfo: {result.stderr.strip()}")
    nodes = dict(line.split() for line in result.stdout.splitlines() if line.strip())
    if not any(state in ("idle", "mixed", "allocated") for state in nodes.values()):
        pytest.fail(f"no usable Slurm node (sinfo: {nodes}); start one with .ci/slurm_setup.sh")


def _submit(tmp_path: Path, command: str | None) -> str:
    """sbatch ray.sub from the repo root with COMMAND (None: keep the cluster up); its job id."""
    env = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith("RAY_") and key not in RAY_SUB_SETTINGS
    }
    env["BASE_LOG_DIR"] = str(tmp_path)
    if command is not None:
        env["COMMAND"] = command
    result = subprocess.run(
        ["sbatch", "--parsable", f"--output={tmp_path}/slurm-%j.out", str(RAY_SUB)],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    return result.stdout.strip().split(";")[0]


def _job_fields(job_id: str) -> dict[str, str]:
    """`scontrol show job` as a dict (JobState, ExitCode, BatchHost, ...)."""
    result = subprocess.run(
        ["scontrol", "show", "job", "--oneliner", job_id],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    )
    return dict(field.split("=", 1) for field in result.stdout.split() if "=" in field)


def _job_output(tmp_path: Path, job_id: str) -> str:
    """The job's Slurm output and its driver log, for failure messages."""
    texts = []
    for path in (tmp_path / f"slurm-{job_id}.out", tmp_path / f"{job_id}-logs" / "driver.log"):
        if path.exists():
            texts.append(f"--- {path.name}\n{path.read_text()[-6000:]}")
    return "\n".join(texts)


def _wait_for_job(tmp_path: Path, job_id: str, timeout_s: float = JOB_TIMEOUT_S) -> dict[str, str]:
    """Polls the job until it has ended, completing phase included (until then a cancelled job's
    steps may still be stopping); cancels it and fails the test after timeout_s."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        # squeue lists pending, running and completing jobs only.
        listed = subprocess.run(
            ["squeue", "--noheader", f"--jobs={job_id}", "--format=%T"],
            capture_output=True,
            text=True,
            timeout=30,
        ).stdout.strip()
        if not listed:
            fields = _job_fields(job_id)
            assert fields["JobState"] in FINISHED_STATES, fields
            return fields
        time.sleep(2)
    subprocess.run(["scancel", job_id], timeout=30)
    pytest.fail(f"job {job_id} not done after {timeout_s} s\n{_job_output(tmp_path, job_id)}")


def _ray_processes_of_job(job_id: str) -> list[str]:
    """Command lines of live processes that use the job's Ray temp dir (ray.sub's NODE_TMP_DIR)."""
    marker = f"/tmp/ray-{job_id}/"
    found = []
    for cmdline_file in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            cmdline = cmdline_file.read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:  # the process ended meanwhile
            continue
        if marker in cmdline:
            found.append(cmdline[:200])
    return found


def _check_torn_down(job_id: str) -> None:
    """No Ray process of the job left and its node-local temp dir removed."""
    assert _ray_processes_of_job(job_id) == []
    assert not Path(f"/tmp/ray-{job_id}").exists()


def _check_logs(tmp_path: Path, job_id: str, node: str) -> Path:
    """The layout of docs/cluster.md: driver.log, ray-<node>.log and ray-<node>/; returns it."""
    log_dir = tmp_path / f"{job_id}-logs"
    assert (log_dir / f"ray-{node}.log").is_file()
    assert "Ray runtime started" in (log_dir / f"ray-{node}.log").read_text()
    assert (log_dir / f"ray-{node}" / "raylet.out").is_file()
    assert (log_dir / f"ray-{node}" / "gcs_server.out").is_file()
    assert not (log_dir / "ray-auth-token").exists()
    return log_dir


def _standin_command(tmp_path: Path, exit_code: int) -> str:
    """COMMAND running STANDIN_DRIVER, which exits with exit_code."""
    script = tmp_path / "standin_driver.py"
    script.write_text(STANDIN_DRIVER)
    return f"uv run python {script} {exit_code}"


def test_ray_sub_runs_the_dpo_recipe_and_tears_down(tmp_path: Path) -> None:
    checkpoint_dir = tmp_path / "checkpoints"
    overrides = [
        f"dpo.max_num_steps={DPO_NUM_STEPS}",
        f"checkpointing.checkpoint_dir={checkpoint_dir}",
        f"logger.log_dir={tmp_path / 'run_logs'}",
        "cluster.num_nodes=1",
        "cluster.gpus_per_node=2",
    ]
    job_id = _submit(tmp_path, "uv run examples/run_dpo.py " + " ".join(overrides))
    fields = _wait_for_job(tmp_path, job_id)

    output = _job_output(tmp_path, job_id)
    assert (fields["JobState"], fields["ExitCode"]) == ("COMPLETED", "0:0"), output
    log_dir = _check_logs(tmp_path, job_id, fields["BatchHost"])
    # The driver attached to the job's cluster instead of starting a Ray of its own.
    address = re.search(r"Ray head is up at (\S+)", output)[1]
    driver_log = (log_dir / "driver.log").read_text()
    assert f"Connecting to existing Ray cluster at address: {address}" in driver_log
    assert f"step {DPO_NUM_STEPS}/{DPO_NUM_STEPS}" in driver_log
    final = checkpoint_dir / f"step_{DPO_NUM_STEPS}"
    assert is_complete_checkpoint(final), f"no complete checkpoint {final}\n{output}"
    assert (tmp_path / "run_logs" / "metrics.jsonl").is_file()
    _check_torn_down(job_id)


def test_ray_sub_passes_the_exit_status_through(tmp_path: Path) -> None:
    job_id = _submit(tmp_path, _standin_command(tmp_path, exit_code=3))
    fields = _wait_for_job(tmp_path, job_id)

    output = _job_output(tmp_path, job_id)
    assert (fields["JobState"], fields["ExitCode"]) == ("FAILED", "3:0"), output
    assert "standin driver: task result 42" in output  # it ran on the cluster, then failed
    assert "COMMAND exited with status 3" in output
    _check_logs(tmp_path, job_id, fields["BatchHost"])
    _check_torn_down(job_id)


def test_ray_sub_without_command_keeps_the_cluster_up_for_attach(tmp_path: Path) -> None:
    job_id = _submit(tmp_path, None)
    attach_script = tmp_path / f"{job_id}-attach.sh"
    deadline = time.monotonic() + JOB_TIMEOUT_S
    while not attach_script.exists():
        state = _job_fields(job_id)["JobState"]
        assert state in ("PENDING", "RUNNING"), f"{state}\n{_job_output(tmp_path, job_id)}"
        assert time.monotonic() < deadline, _job_output(tmp_path, job_id)
        time.sleep(2)

    probe = "import ray; ray.init(); print('alive nodes:', len(ray.nodes()))"
    attached = subprocess.run(
        ["bash", str(attach_script), ".venv/bin/python", "-c", probe],
        capture_output=True,
        text=True,
        timeout=180,
    )
    subprocess.run(["scancel", job_id], timeout=30, check=True)
    fields = _wait_for_job(tmp_path, job_id)

    assert attached.returncode == 0, attached.stderr + _job_output(tmp_path, job_id)
    assert "alive nodes: 1" in attached.stdout
    assert fields["JobState"] == "CANCELLED"
    _check_logs(tmp_path, job_id, fields["BatchHost"])
    _check_torn_down(job_id)
