"""The engine API: user-defined modules run by DPOEngine, GRPOEngine, RLHFEngine or an Engine
with its own flow (ChatLearn's names and signatures; docs/guides/engine.md)."""

from rl_toolkit.engine.engine import Engine, EngineSaveState, get_args, init
from rl_toolkit.engine.engines import DPOEngine, GRPOEngine, RLHFEngine
from rl_toolkit.engine.module import BaseModule, EngineError, MegatronModule, TorchModule

__all__ = [
    "BaseModule",
    "DPOEngine",
    "Engine",
    "EngineError",
    "EngineSaveState",
    "GRPOEngine",
    "MegatronModule",
    "RLHFEngine",
    "TorchModule",
    "get_args",
    "init",
]
