"""Run examples/run_dpo.py, but die abruptly (os._exit, like SIGKILL) while saving step 8.

The policy's weights and optimizer of step 8 are already written when the process dies: the
checkpoint is half-written, as after a kill at the worst moment.
"""

import os
import runpy
import sys
from pathlib import Path

import rl_toolkit.algorithms.dpo as dpo

_save_rng_state = dpo.save_rng_state


def _die_at_step_8(directory: Path) -> None:
    if directory.name.endswith("step_8"):
        os._exit(137)
    _save_rng_state(directory)


dpo.save_rng_state = _die_at_step_8
sys.argv = ["examples/run_dpo.py", *sys.argv[1:]]
runpy.run_path("examples/run_dpo.py", run_name="__main__")
