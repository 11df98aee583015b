"""A pickle payload for the tests that a checkpoint never runs code when it is read."""

import os
import shlex
from pathlib import Path


class RunsCode:
    """Pickles to a call of os.system that creates `marker`: what a malicious file would do."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {shlex.quote(str(self.marker))}",))
