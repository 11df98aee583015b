"""Run a recipe's script, but die abruptly (os._exit, like SIGKILL) at the checkpoint of a step.

    python tests/functional/crash_at_checkpoint.py examples/run_dpo.py [overrides...]

CRASH_STEP (default 8) is the step; CRASH_POINT selects the moment:
- "saving" (the default): while that step is being saved. The policy's weights and optimizer are
  already written: the checkpoint is half-written, as after a kill at the worst moment.
- "after_finalize": right after `step_N` is finalized (complete and renamed into place), before
  the recipe does anything else.
"""

import os
import runpy
import sys
from pathlib import Path

import rl_toolkit.algorithms.utils as recipe_utils
from rl_toolkit.utils.checkpoint import CheckpointManager

REPO = Path(__file__).resolve().parents[2]
STEP = int(os.environ.get("CRASH_STEP", "8"))
_save_rng_state = recipe_utils.save_rng_state
_finalize = CheckpointManager.finalize


def _die_while_saving(directory: Path) -> None:
    if directory.name == f"tmp_step_{STEP}":
        os._exit(137)
    _save_rng_state(directory)


def _die_after_finalizing(self, tmp, step, training_info):
    path = _finalize(self, tmp, step, training_info)
    if step == STEP:
        os._exit(137)
    return path


crash_point = os.environ.get("CRASH_POINT", "saving")
assert crash_point in ("saving", "after_finalize"), f"unknown CRASH_POINT {crash_point!r}"
if crash_point == "saving":
    recipe_utils.save_rng_state = _die_while_saving
else:
    CheckpointManager.finalize = _die_after_finalizing
script, *overrides = sys.argv[1:]
sys.argv = [script, *overrides]
runpy.run_path(str(REPO / script), run_name="__main__")
