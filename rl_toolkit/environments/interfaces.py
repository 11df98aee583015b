"""The environment interface: score a batch of completions, each with its prompt and metadata.

One call per rollout batch, single-turn: the rewards of N completions and the batch's metrics.
NeMo RL's `EnvironmentInterface.step(message_logs, metadata)` also returns observations, stop
strings and `terminated` for multi-turn rollouts; rl_toolkit's rollouts are single-turn, so the
interface is the reward function's shape (TRL's) on whole batches, and a multi-turn `step` can
be added beside `score` when multi-turn rollouts come.
"""

import math
import numbers
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

# A prompt as the data gave it: a string or chat messages (rl_toolkit.data.interfaces.Text,
# named here without importing the data stack into the scoring processes).
Prompt = str | list[dict[str, Any]]


@dataclass(frozen=True)
class EnvironmentResult:
    """What an environment returns for a batch of N completions.

    rewards: one float per completion, in the order given.
    metrics: the batch's counts and values, e.g. {"env/timeouts": 1.0, "env/errors": 0.0}.
    """

    rewards: list[float]
    metrics: dict[str, float]


class Environment(Protocol):
    """What the RL recipe scores completions with (in-process, or in a Ray actor)."""

    def score(
        self, prompts: list[Prompt], completions: list[str], metadata: list[dict[str, Any]]
    ) -> EnvironmentResult:
        """Rewards of N completions.

        Args:
            prompts: [N] the prompt of each completion, as the data gave it.
            completions: [N] the generated text (special tokens removed).
            metadata: [N] each row's metadata columns (data.metadata_keys), e.g. the answer.

        Returns:
            N rewards, in order, and the batch's metrics.
        """
        ...


def score_one(
    reward_fn: Callable[..., Any], prompt: Prompt, completion: str, metadata: dict[str, Any]
) -> float:
    """The reward of one completion: a TRL-style `reward_fn` called on a batch of one, with
    keyword arguments (reward_fn.RewardFunctionEnvironment runs it in its scoring processes).

    Raises:
        ValueError: the function did not return one finite number for the one completion.
    """
    columns = {key: [value] for key, value in metadata.items()}
    rewards = reward_fn(prompts=[prompt], completions=[completion], **columns)
    try:
        (reward,) = rewards
    except (TypeError, ValueError):
        raise ValueError(
            f"the reward function returned {rewards!r}; expected a list of one number per "
            "completion"
        ) from None
    if not isinstance(reward, numbers.Real) or not math.isfinite(reward):
        raise ValueError(f"the reward function returned {reward!r}; expected a finite number")
    return float(reward)
