"""Running a recipe's script as a user does, optionally dying at a checkpoint."""

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def run_recipe(
    script: str,
    env: dict,
    out: Path,
    *overrides: str,
    crash_point: str | None = None,
    crash_at_step: int | None = None,
) -> subprocess.CompletedProcess:
    """`examples/<script>` with checkpoints and logs under `out` (also its working directory:
    the shipped config and assets are found from anywhere).

    With `crash_at_step` it dies like SIGKILL at that step's checkpoint, at `crash_point`
    ("saving" or "after_finalize"; tests/functional/crash_at_checkpoint.py).
    """
    args = [f"checkpointing.checkpoint_dir={out / 'ckpt'}", f"logger.log_dir={out / 'logs'}"]
    command = [sys.executable, str(REPO / "examples" / script)]
    if crash_at_step is not None:
        assert crash_point is not None, "say where to die: saving or after_finalize"
        harness = REPO / "tests" / "functional" / "crash_at_checkpoint.py"
        command = [sys.executable, str(harness), f"examples/{script}"]
        env = {**env, "CRASH_POINT": crash_point, "CRASH_STEP": str(crash_at_step)}
    return subprocess.run(
        [*command, *args, *overrides],
        cwd=out,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
