"""Run examples/run_sft.py, but die abruptly (os._exit, like SIGKILL) while saving step 64.

The policy's weights and optimizer of step 64 are already written when the process dies: the
checkpoint is half-written, as after a kill at the worst moment. (crash_while_saving.py does the
same to examples/run_dpo.py at step 8.)
"""

import os
import runpy
import sys
from pathlib import Path

import rl_toolkit.algorithms.sft as sft

_save_rng_state = sft.save_rng_state


def _die_at_step_64(directory: Path) -> None:
    if directory.name.endswith("step_64"):
        os._exit(137)
    _save_rng_state(directory)


sft.save_rng_state = _die_at_step_64
sys.argv = ["examples/run_sft.py", *sys.argv[1:]]
runpy.run_path(
    str(Path(__file__).resolve().parents[2] / "examples" / "run_sft.py"), run_name="__main__"
)
