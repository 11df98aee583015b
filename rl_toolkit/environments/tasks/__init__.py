"""The built-in reward functions, in TRL's form (config_schema.BUILTIN_ENVIRONMENTS names them)."""

from rl_toolkit.environments.tasks.math_checker import math_answer
from rl_toolkit.environments.tasks.tiny import tiny_first

__all__ = ["math_answer", "tiny_first"]
