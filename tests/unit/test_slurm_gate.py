"""The Slurm tests submit jobs only when RL_TOOLKIT_SLURM_TESTS=1, whatever Slurm is reachable.

Each test runs pytest on tests/functional/test_slurm.py in a subprocess with stand-in Slurm tools
first on PATH: they log each call, `sinfo` reports an idle node and `sbatch` refuses the job.
"""

import os
import subprocess
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
SLURM_TOOLS = ("sinfo", "sbatch", "squeue", "scontrol", "scancel")


def _run_slurm_tests(tmp_path: Path, *, enabled: bool) -> tuple[subprocess.CompletedProcess, str]:
    """pytest on test_slurm.py's exit status test with stand-in Slurm tools: (result, tool calls)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    calls = tmp_path / "calls.log"
    for tool in SLURM_TOOLS:
        script = bin_dir / tool
        body = 'echo "fakenode idle"' if tool == "sinfo" else "exit 1"
        script.write_text(f'#!/bin/sh\necho "{tool} $*" >> {calls}\n{body}\n')
        script.chmod(0o755)
    env = {key: value for key, value in os.environ.items() if key != "RL_TOOLKIT_SLURM_TESTS"}
    env["PATH"] = f"{bin_dir}{os.pathsep}{env['PATH']}"
    if enabled:
        env["RL_TOOLKIT_SLURM_TESTS"] = "1"
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "tests/functional/test_slurm.py",
            "-rs",
            "-p",
            "no:cacheprovider",
            "-n",
            "0",  # one test: no second test process
            "-k",
            "exit_status",
        ],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
    )
    return result, calls.read_text() if calls.exists() else ""


def test_slurm_tests_skip_without_the_variable_even_with_slurm_on_path(tmp_path: Path) -> None:
    result, calls = _run_slurm_tests(tmp_path, enabled=False)

    assert result.returncode == 0, result.stdout + result.stderr
    assert "1 skipped" in result.stdout
    assert "set RL_TOOLKIT_SLURM_TESTS=1 to run it" in result.stdout
    assert calls == ""  # not even sinfo was asked


def test_slurm_tests_submit_with_the_variable(tmp_path: Path) -> None:
    result, calls = _run_slurm_tests(tmp_path, enabled=True)

    # The stand-in sbatch refuses the job, so the test fails after submitting it.
    assert result.returncode == 1, result.stdout + result.stderr
    assert "1 failed" in result.stdout
    assert calls.splitlines()[0] == "sinfo --noheader --format=%n %T"
    assert any(line.startswith("sbatch --parsable") for line in calls.splitlines()), calls
