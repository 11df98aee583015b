"""Reward functions for the environment tests, at module level so that the spawned scoring
processes (and a Ray actor) import them by name: `tests.unit.reward_functions.<name>`."""

import os
import time
from typing import Any

# A module attribute that is not a function (for load_reward_fn's check).
NOT_A_FUNCTION = 3

# A function that pickle cannot find by its name (`<lambda>`), so no scoring process could load it.
UNNAMED = lambda prompts, completions, **columns: [1.0]  # noqa: E731


def answer_as_reward(prompts: list, completions: list[str], answer: list, **columns: Any) -> list:
    """The row's `answer` column as its reward: shows which row's metadata each call got."""
    return [float(value) for value in answer]


def scaled_length(prompts: list, completions: list[str], *, scale: float, **columns: Any) -> list:
    """`scale` times the completion's length (a bound env.kwargs)."""
    return [scale * len(completion) for completion in completions]


def misbehave_on_request(prompts: list, completions: list[str], **columns: Any) -> list:
    """1.0, unless the completion asks for something else: sleep 10 s, raise, exit the process,
    or return a malformed result."""
    (completion,) = completions
    if completion == "sleep":
        time.sleep(10)
    elif completion == "raise":
        raise ValueError("cannot score\nthis")
    elif completion == "exit":
        os._exit(3)
    elif completion == "string":
        return ["1"]
    elif completion == "two":
        return [1.0, 2.0]
    elif completion == "nan":
        return [float("nan")]
    return [1.0]


def completions_only(completions: list[str]) -> list:
    """Not TRL's form: it takes no prompts= (and no **kwargs)."""
    return [0.0 for _ in completions]


def exact_match(prompts: list, completions: list[str], answer: list) -> list:
    """1.0 where the completion is the answer; takes no other keyword (no **kwargs)."""
    return [float(c == a) for c, a in zip(completions, answer, strict=True)]
