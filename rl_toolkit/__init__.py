"""rl_toolkit: Ray-orchestrated post-training for language models."""

import warnings

# torchdata 0.11's StatefulDataLoader calls a deprecated torch API on every iterator it makes;
# the warning is about torchdata's internals, not anything a user can change.
warnings.filterwarnings("ignore", message="'set_vital' is deprecated", category=UserWarning)

# The engine API at the top level, as ChatLearn has it (`rl_toolkit.init()`, `from rl_toolkit
# import DPOEngine`); imported on first use, so that `import rl_toolkit` stays free of torch and
# Ray (the config checks run before those ~15 s of imports).
_ENGINE_NAMES = frozenset(
    {
        "BaseModule", "DPOEngine", "Engine", "EngineError", "GRPOEngine", "MegatronModule",
        "RLHFEngine", "TorchModule", "get_args", "init",
    }
)  # fmt: skip


def __getattr__(name: str) -> object:
    if name in _ENGINE_NAMES:
        from rl_toolkit import engine

        return getattr(engine, name)
    raise AttributeError(f"module 'rl_toolkit' has no attribute {name!r}")
