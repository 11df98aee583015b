"""examples/run_dpo.py end to end on the embedded tiny model, two CPU workers.

The runs attach to one Ray head started for the test session (`ray_head`, conftest.py), as on a
cluster, so each pays for its own workers but not for a Ray start. Every assertion reads what a
user would: the exit status, the console, metrics.jsonl and the checkpoint folders.
"""

import contextlib
import json
import os
import pickle
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from rl_toolkit.distributed.ray_watchdog import process_table
from rl_toolkit.utils.checkpoint import is_complete_checkpoint, write_manifest
from rl_toolkit.utils.logger import read_metrics
from tests.process_testing import cmdline, environ, kill_all, tree, wait_until_gone
from tests.unit.malicious import RunsCode

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
CRASH_HARNESS = REPO / "tests" / "functional" / "crash_at_checkpoint.py"
LN2 = 0.6931471805599453
TINY = [
    "dpo.max_num_steps=8",
    "dpo.val_period=4",
    "dpo.val_batches=1",
    "dpo.val_at_start=true",
    "policy.train_global_batch_size=32",
    "checkpointing.save_period=4",
    "checkpointing.keep_top_k=null",
    "checkpointing.save_hf=true",
    "cluster.gpus_per_node=2",
]


def dpo_args(out: Path, *overrides: str) -> list[str]:
    return [
        f"checkpointing.checkpoint_dir={out / 'ckpt'}",
        f"logger.log_dir={out / 'logs'}",
        *TINY,
        *overrides,
    ]


def run_dpo(env: dict, out: Path, *overrides: str, crash: str | None = None, cwd: Path = REPO):
    """examples/run_dpo.py on the tiny settings; with `crash` ("saving", "after_finalize") it
    dies at step 8's checkpoint (tests/functional/crash_at_checkpoint.py)."""
    command = [sys.executable, str(REPO / "examples" / "run_dpo.py")]
    if crash is not None:
        command = [sys.executable, str(CRASH_HARNESS), "examples/run_dpo.py"]
        env = {**env, "CRASH_POINT": crash, "CRASH_STEP": "8"}
    return subprocess.run(
        [*command, *dpo_args(out, *overrides)],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def start_dpo(env: dict, out: Path, *overrides: str) -> subprocess.Popen:
    """Start examples/run_dpo.py for 1000 steps; its stdout and stderr go to files in `out`."""
    with open(out / "stdout.txt", "w") as stdout, open(out / "stderr.txt", "w") as stderr:
        return subprocess.Popen(
            [
                sys.executable,
                "examples/run_dpo.py",
                *dpo_args(out, "dpo.max_num_steps=1000", *overrides),
            ],
            cwd=REPO,
            env=env,
            stdout=stdout,
            stderr=stderr,
        )


def wait_for_first_step(driver: subprocess.Popen, out: Path) -> None:
    """Wait until the run has logged its first training step: its workers are at work."""
    metrics, deadline = out / "logs" / "metrics.jsonl", time.monotonic() + 300
    while not (metrics.exists() and read_metrics(metrics, "train")):
        assert driver.poll() is None, (out / "stderr.txt").read_text()[-3000:]
        assert time.monotonic() < deadline, "no training step after 300 s"
        time.sleep(0.5)


def files_containing(directories: list[Path], values: list[str]) -> dict[str, list[str]]:
    """For each value, the files under `directories` that contain it."""
    found = {value: [] for value in values}
    for directory in directories:
        for path in directory.rglob("*"):
            if path.is_file() and not path.is_symlink():
                content = path.read_bytes()
                for value in values:
                    if value.encode() in content:
                        found[value].append(str(path))
    return {value: paths for value, paths in found.items() if paths}


def policy_workers(ray_tmp_dir: str) -> dict[int, int]:
    """The policy worker processes (pid -> start time) of the Ray head in `ray_tmp_dir`."""
    table = process_table()
    raylets = [
        pid
        for pid in table
        if cmdline(pid).split(" ")[0].endswith("/raylet") and ray_tmp_dir in cmdline(pid)
    ]
    assert len(raylets) == 1, raylets
    return {pid: start for pid, start in tree(raylets[0]).items() if "_WorkerActor" in cmdline(pid)}


def hf_weights(checkpoint: Path) -> dict[str, torch.Tensor]:
    return load_file(checkpoint / "hf" / "model.safetensors")


# Credentials in the driver's environment: the embedded run needs none of them, but a real one
# may (HF_TOKEN for a gated model on the workers, WANDB_API_KEY on the driver).
FAKE_SECRETS = {
    "WANDB_API_KEY": "fake-wandb-key-2f9c41",
    "HF_TOKEN": "hf_fake-token-8d03aa",
    "AWS_SECRET_ACCESS_KEY": "fake-aws-secret-57e1b0",
    "RLT_BUCKET_TOKEN": "fake-bucket-token-c6e27d",  # named in cluster.worker_env_vars
}
NAMED_CREDENTIAL = "cluster.worker_env_vars=[RLT_BUCKET_TOKEN]"


@pytest.fixture(scope="module")
def straight_run(ray_head, tmp_path_factory):
    out = tmp_path_factory.mktemp("straight")
    result = run_dpo({**ray_head, **FAKE_SECRETS}, out, NAMED_CREDENTIAL)
    assert result.returncode == 0, result.stdout + result.stderr
    return out, result


def test_training_learns_validates_and_checkpoints(straight_run) -> None:
    out, result = straight_run
    train = read_metrics(out / "logs" / "metrics.jsonl", "train")
    validation = read_metrics(out / "logs" / "metrics.jsonl", "validation")
    assert sorted(train) == list(range(1, 9))
    assert train[1]["loss"] == pytest.approx(LN2, abs=1e-4)  # policy == reference at step 1
    assert train[8]["loss"] < train[1]["loss"] - 0.02
    assert sorted(validation) == [0, 4, 8]  # at start, every val_period, at the end
    assert validation[0]["accuracy"] == 0.0 and validation[8]["accuracy"] > 0.5
    assert validation[8]["loss"] < validation[0]["loss"]
    assert "[validation] step 8" in result.stdout and "step 8/8" in result.stdout

    for step in (4, 8):
        checkpoint = out / "ckpt" / f"step_{step}"
        info = json.loads((checkpoint / "training_info.json").read_text())
        assert info["total_steps"] == step and info["val_loss"] == validation[step]["loss"]
        for name in ("config.yaml", "dataloader_state.pt", "rng_state.pt", "hf/config.json"):
            assert (checkpoint / name).is_file(), name
        for part in ("weights", "optimizer"):  # sharded: one file per worker
            assert len(list((checkpoint / "policy" / part).glob("*.distcp"))) == 2, part
    model = AutoModelForCausalLM.from_pretrained(out / "ckpt" / "step_8" / "hf")
    assert sum(p.numel() for p in model.parameters()) == 136_640


def test_no_credential_in_any_file_of_the_run_or_of_ray(ray_head, straight_run) -> None:
    out, result = straight_run
    directories = [out, Path(ray_head["RAY_TMPDIR"])]
    assert files_containing(directories, list(FAKE_SECRETS.values())) == {}
    assert not any(secret in result.stdout + result.stderr for secret in FAKE_SECRETS.values())


def test_killed_while_saving_resumes_exactly_from_last_complete_checkpoint(
    ray_head, straight_run, tmp_path
) -> None:
    straight, _ = straight_run
    # The process dies (os._exit, like SIGKILL: no cleanup) in the middle of saving step 8.
    crashed = run_dpo(ray_head, tmp_path, crash="saving")
    assert crashed.returncode == 137, crashed.stdout + crashed.stderr
    assert (tmp_path / "ckpt" / "tmp_step_8").is_dir()  # the half-written checkpoint
    assert not (tmp_path / "ckpt" / "step_8").exists()

    resumed = run_dpo(ray_head, tmp_path)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert "Resuming from" in resumed.stdout and "step_4" in resumed.stdout
    assert not (tmp_path / "ckpt" / "tmp_step_8").exists()

    # Steps 5-7, logged before the kill, are redone: their old lines are gone, none twice.
    rows = [json.loads(line) for line in (tmp_path / "logs" / "metrics.jsonl").open()]
    keys = [(row["step"], row["prefix"]) for row in rows]
    assert len(keys) == len(set(keys)), sorted(k for k in keys if keys.count(k) > 1)
    assert sorted(k for k in keys if k[1] == "train") == [(s, "train") for s in range(1, 9)]
    expected = read_metrics(straight / "logs" / "metrics.jsonl", "train")
    got = read_metrics(tmp_path / "logs" / "metrics.jsonl", "train")
    for step in range(5, 9):
        for key in ("loss", "accuracy", "reward_margin_mean", "grad_norm", "lr"):
            assert got[step][key] == pytest.approx(expected[step][key], abs=1e-5), (step, key)
    # A reference re-anchored to the resumed weights would give exactly ln 2 at step 5.
    assert abs(got[5]["loss"] - LN2) > 1e-3
    expected_weights = hf_weights(straight / "ckpt" / "step_8")
    for name, tensor in hf_weights(tmp_path / "ckpt" / "step_8").items():
        torch.testing.assert_close(tensor, expected_weights[name], atol=1e-5, rtol=0)


def test_killed_right_after_a_checkpoint_keeps_the_metrics_of_its_step(ray_head, tmp_path) -> None:
    crashed = run_dpo(ray_head, tmp_path, crash="after_finalize")
    assert crashed.returncode == 137, crashed.stdout + crashed.stderr
    assert is_complete_checkpoint(tmp_path / "ckpt" / "step_8")
    # A resume from step_8 does not redo step 8: its metrics must be in the file already.
    train = read_metrics(tmp_path / "logs" / "metrics.jsonl", "train")
    assert sorted(train) == list(range(1, 9))


def zero_4k_in_the_middle(path: Path) -> None:
    data = bytearray(path.read_bytes())
    middle = len(data) // 2
    data[middle - 2048 : middle + 2048] = bytes(4096)
    path.write_bytes(bytes(data))


def test_damaged_latest_checkpoint_falls_back_to_the_previous_one(
    ray_head, straight_run, tmp_path
) -> None:
    straight, _ = straight_run
    shutil.copytree(straight / "ckpt", tmp_path / "ckpt")
    shard = tmp_path / "ckpt" / "step_8" / "policy" / "weights" / "__1_0.distcp"
    zero_4k_in_the_middle(shard)

    resumed = run_dpo(ray_head, tmp_path)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert f"Not resuming from {tmp_path / 'ckpt' / 'step_8'}: {shard}: sha256" in resumed.stderr
    assert "Traceback" not in resumed.stderr
    assert f"Resuming from {tmp_path / 'ckpt' / 'step_4'}" in resumed.stdout
    assert (tmp_path / "ckpt" / "damaged_step_8").is_dir()
    expected_weights = hf_weights(straight / "ckpt" / "step_8")
    for name, tensor in hf_weights(tmp_path / "ckpt" / "step_8").items():
        torch.testing.assert_close(tensor, expected_weights[name], atol=1e-5, rtol=0)


def plant_code_in_metadata(checkpoint: Path, marker: Path) -> Path:
    metadata = checkpoint / "policy" / "optimizer" / ".metadata"
    metadata.write_bytes(pickle.dumps(RunsCode(marker)))
    write_manifest(checkpoint)  # a valid-looking manifest: the files match it
    return metadata


def plant_zeros_in_weights(checkpoint: Path, marker: Path) -> Path:
    shard = checkpoint / "policy" / "weights" / "__0_0.distcp"
    zero_4k_in_the_middle(shard)
    return shard


@pytest.mark.parametrize("plant", [plant_code_in_metadata, plant_zeros_in_weights])
def test_bad_resume_path_fails_in_one_line_before_any_worker_starts(
    ray_head, straight_run, tmp_path, plant
) -> None:
    straight, _ = straight_run
    checkpoint = tmp_path / "old" / "step_4"
    shutil.copytree(straight / "ckpt" / "step_4", checkpoint)
    marker = tmp_path / "code_ran"
    bad_file = plant(checkpoint, marker)

    result = run_dpo(ray_head, tmp_path, f"checkpointing.resume={checkpoint}")
    assert result.returncode == 2, result.stdout + result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in result.stderr, result.stderr
    assert errors[0].startswith(f"error: checkpointing.resume: {bad_file}: ")
    assert result.stderr.endswith(errors[0] + "\n")  # the last line: nothing after it
    assert "RayVirtualCluster" not in result.stdout + result.stderr  # no cluster, no workers
    assert not marker.exists()


def test_resume_never_starts_a_fresh_folder(ray_head, straight_run, tmp_path) -> None:
    straight, _ = straight_run
    shutil.copytree(straight / "ckpt", tmp_path / "ckpt")
    before = sorted(p.name for p in (tmp_path / "ckpt").iterdir())
    # From another working directory: the embedded config and its assets are found all the same.
    result = run_dpo(
        ray_head, tmp_path, "checkpointing.resume=never", "dpo.max_num_steps=1", cwd=tmp_path
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == before
    assert (tmp_path / "ckpt-1" / "step_1" / "training_info.json").is_file()
    assert (tmp_path / "logs-1" / "metrics.jsonl").is_file()  # the new run's logs apart too
    assert not (tmp_path / "logs").exists()


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("dpo.sft_los_weight=0.1", "did you mean 'dpo.sft_loss_weight'"),
        ("data.train_data_path=assets/tiny_prefs/nope.jsonl", "assets/tiny_prefs/nope.jsonl"),
        ("dpo.reference_policy_kl_penalty=-1", "dpo.reference_policy_kl_penalty"),
        ("policy.max_grad_norm=-1", "'policy.max_grad_norm': input should be greater than 0"),
        ("dpo.val_global_batch_size=6", "dpo.val_global_batch_size=6 must split into whole pairs"),
        # Found once Ray is up (the head has 4 CPUs), before any placement group or worker.
        ("cluster.gpus_per_node=8", "8 workers, one CPU each, but the Ray cluster has 4 CPUs"),
    ],
)
def test_bad_input_fails_before_any_worker_starts(ray_head, tmp_path, override, message) -> None:
    # Each kind of mistake is one line (tests/unit/test_config_checks.py has them all); these
    # show it end to end: before the imports, after them (the data file) and once Ray is up.
    result = run_dpo(ray_head, tmp_path, override)
    assert result.returncode == 2, result.stderr
    assert message in result.stderr
    assert "Traceback" not in result.stderr
    # One line, the last (Ray's own start-up lines may come before it).
    assert result.stderr.strip().splitlines()[-1].startswith("error: "), result.stderr
    assert message in result.stderr.strip().splitlines()[-1]
    assert "RayVirtualCluster" not in result.stdout + result.stderr  # no cluster, no workers
    assert not (tmp_path / "ckpt").exists()


def test_local_ray_keeps_credentials_in_the_driver_and_dies_with_it(tmp_path) -> None:
    # No RAY_ADDRESS and a private temp dir: the driver starts its own Ray, whose processes
    # (GCS, raylet, agents, workers) are its descendants and would inherit its environment.
    ray_dir = tempfile.mkdtemp(prefix="rlt-loc-", dir="/tmp")  # short: Ray's unix sockets
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env.update(RAY_TMPDIR=ray_dir, RAY_AUTH_MODE="disabled", PYTHONUNBUFFERED="1", **FAKE_SECRETS)
    driver = start_dpo(env, tmp_path, NAMED_CREDENTIAL)
    session = {}
    try:
        wait_for_first_step(driver, tmp_path)
        session = tree(driver.pid)
        assert sum("_WorkerActor" in cmdline(pid) for pid in session) == 2
        environments = [environ(pid) for pid in session]
        assert any(f"RAY_TMPDIR={ray_dir}" in e for e in environments)  # they can be read
        for secret in FAKE_SECRETS.values():
            assert not any(secret in e for e in environments), secret

        driver.send_signal(signal.SIGKILL)
        driver.wait(timeout=30)
        left = wait_until_gone(session, timeout_s=20)
        assert left == {}, [cmdline(pid) for pid in left]
        directories = [tmp_path, Path(ray_dir)]
        assert files_containing(directories, list(FAKE_SECRETS.values())) == {}
    finally:
        driver.kill()
        kill_all(session)
        shutil.rmtree(ray_dir, ignore_errors=True)


def error_report(stderr: str) -> list[str]:
    """The lines from run_dpo's `error:` line to the end of its stderr."""
    lines = stderr.splitlines()
    starts = [i for i, line in enumerate(lines) if line.startswith("error: ")]
    assert len(starts) == 1, stderr[-3000:]
    return lines[starts[0] :]


def test_a_dead_worker_is_what_the_run_reports(ray_head, tmp_path) -> None:
    driver = start_dpo(ray_head, tmp_path)
    try:
        wait_for_first_step(driver, tmp_path)
        workers = policy_workers(ray_head["RAY_TMPDIR"])
        assert len(workers) == 2
        victim = max(workers)
        os.kill(victim, signal.SIGKILL)
        assert driver.wait(timeout=120) == 1
    finally:
        driver.kill()
    stderr = (tmp_path / "stderr.txt").read_text()
    report = error_report(stderr)
    assert len(report) < 20, report
    assert re.match(
        rf"error: Worker policy-[01] \(rank [01] of 2, pid {victim}\) on node \S+ "
        rf"\(node id \w+\) died in PolicyWorker\.\w+\(\):$",
        report[0],
    ), report[0]
    assert "shutdown()" not in stderr and "Traceback" not in stderr
    assert wait_until_gone(workers, timeout_s=60) == {}


def test_a_stopped_worker_times_out_and_is_named(ray_head, tmp_path) -> None:
    # Long enough for the slowest call before the stop (building the workers, on a loaded
    # machine), short enough for the suite.
    driver = start_dpo(ray_head, tmp_path, "cluster.worker_timeout_s=30")
    workers = {}
    try:
        wait_for_first_step(driver, tmp_path)
        workers = policy_workers(ray_head["RAY_TMPDIR"])
        stopped = max(workers)
        os.kill(stopped, signal.SIGSTOP)
        start = time.monotonic()
        assert driver.wait(timeout=300) == 1
        assert time.monotonic() - start >= 25  # the timeout, not some other failure
    finally:
        driver.kill()
        for pid in workers:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)
    report = error_report((tmp_path / "stderr.txt").read_text())
    assert len(report) < 20, report
    assert report[0].startswith("error: ") and "did not answer within 30 s" in report[0]
    assert any(f"pid {stopped}) on node" in line for line in report[1:]), report
    # The stopped worker is killed with the others, not left behind.
    assert wait_until_gone(workers, timeout_s=60) == {}
