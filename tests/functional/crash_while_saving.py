"""Run examples/run_dpo.py, but die abruptly (os._exit, like SIGKILL) at the checkpoint of step 8.

CRASH_POINT selects the moment:
- "saving" (the default): while step 8 is being saved. The policy's weights and optimizer are
  already written: the checkpoint is half-written, as after a kill at the worst moment.
- "after_finalize": right after `step_8` is finalized (complete and renamed into place), before
  the recipe does anything else.
"""

import os
import runpy
import sys
from pathlib import Path

import rl_toolkit.algorithms.dpo as dpo
from rl_toolkit.utils.checkpoint import CheckpointManager

_save_rng_state = dpo.save_rng_state
_finalize = CheckpointManager.finalize


def _die_while_saving_step_8(directory: Path) -> None:
    if directory.name.endswith("step_8"):
        os._exit(137)
    _save_rng_state(directory)


def _die_after_finalizing_step_8(self, tmp, step, training_info):
    path = _finalize(self, tmp, step, training_info)
    if step == 8:
        os._exit(137)
    return path


crash_point = os.environ.get("CRASH_POINT", "saving")
assert crash_point in ("saving", "after_finalize"), f"unknown CRASH_POINT {crash_point!r}"
if crash_point == "saving":
    dpo.save_rng_state = _die_while_saving_step_8
else:
    CheckpointManager.finalize = _die_after_finalizing_step_8
sys.argv = ["examples/run_dpo.py", *sys.argv[1:]]
runpy.run_path("examples/run_dpo.py", run_name="__main__")
