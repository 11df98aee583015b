"""EnvironmentWorker: the `env` section's environment as a plain class, and the thin Ray actor
that hosts it for the driver (RayEnvironment).

The worker owns the scoring processes (a TimeoutPool); in a Ray actor they run next to it, off
the driver, which only sends the batch's strings and gets N floats back.
"""

from typing import Any

import ray

from rl_toolkit.config_schema import EnvConfig
from rl_toolkit.environments.interfaces import EnvironmentResult, Prompt
from rl_toolkit.environments.reward_fn import RewardError, RewardFunctionEnvironment, load_reward_fn


class EnvironmentWorker:
    """The environment `env_config` describes: its reward function in a pool of processes.

    Args:
        env_config: the `env` section (name, kwargs, timeout_s, on_error, num_processes).

    Raises:
        ConfigError: env.name or env.kwargs do not give a reward function (load_reward_fn).
        PoolStartError: the scoring processes could not load it.
    """

    def __init__(self, env_config: EnvConfig) -> None:
        self.environment = RewardFunctionEnvironment(
            load_reward_fn(env_config["name"], env_config["kwargs"]),
            name=env_config["name"],
            timeout_s=env_config["timeout_s"],
            on_error=env_config["on_error"],
            num_processes=env_config["num_processes"],
        )

    def score(
        self, prompts: list[Prompt], completions: list[str], metadata: list[dict[str, Any]]
    ) -> EnvironmentResult:
        """Rewards and metrics of N completions (Environment.score)."""
        return self.environment.score(prompts, completions, metadata)

    def shutdown(self) -> None:
        """Stop the scoring processes."""
        self.environment.close()


class RayEnvironment:
    """The driver's handle on an EnvironmentWorker in a Ray actor; an Environment.

    The reward function is loaded on the driver first, so that a wrong env.name or env.kwargs
    is one ConfigError line before any actor starts; a RewardError raised in the actor is
    raised here again with its one line (without Ray's remote traceback).

    Args:
        env_config: the `env` section.
    """

    def __init__(self, env_config: EnvConfig) -> None:
        load_reward_fn(env_config["name"], env_config["kwargs"])
        # Ray types the handle as "the handle or the class" (worker_groups.py), so it is Any
        # here, and ignored below where mypy still sees the assigned type.
        # num_cpus=0: the actor reserves none of Ray's CPUs. On a CPU-only machine the policy's
        # bundles hold every core, so an actor asking for one would wait forever; and the
        # scoring itself runs in the pool's own processes, which Ray does not count anyway.
        self._actor: Any = ray.remote(num_cpus=0)(EnvironmentWorker).remote(env_config)
        # Wait until the worker is built, so that its error is raised here.
        ray.get(self._actor.__ray_ready__.remote())  # type: ignore[union-attr]

    def score(
        self, prompts: list[Prompt], completions: list[str], metadata: list[dict[str, Any]]
    ) -> EnvironmentResult:
        """Rewards and metrics of N completions, computed in the actor (Environment.score)."""
        try:
            return ray.get(self._actor.score.remote(prompts, completions, metadata))
        except ray.exceptions.RayTaskError as error:
            if isinstance(error.cause, RewardError):
                raise RewardError(str(error.cause)) from None
            raise

    def shutdown(self) -> None:
        """Stop the scoring processes and the actor (idempotent)."""
        if self._actor is None:
            return
        ray.get(self._actor.shutdown.remote())
        ray.kill(self._actor)
        self._actor = None
