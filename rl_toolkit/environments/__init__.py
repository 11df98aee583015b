"""Environments: what scores the completions of an RL rollout.

`Environment` is the interface (`score(prompts, completions, metadata) -> EnvironmentResult`);
`reward_fn.RewardFunctionEnvironment` runs a TRL-style reward function on it, one completion per
call, in a pool of processes with a per-call timeout (`pool.TimeoutPool`); `tasks` holds the
built-in reward functions; `worker.EnvironmentWorker` builds all that from the `env` config
section, and `worker.RayEnvironment` hosts it in a Ray actor.

This package's `__init__` and `pool`, `interfaces` and `tasks` import only the standard library:
every scoring process imports them when it starts.
"""

from rl_toolkit.environments.interfaces import Environment, EnvironmentResult, Prompt

__all__ = ["Environment", "EnvironmentResult", "Prompt"]
