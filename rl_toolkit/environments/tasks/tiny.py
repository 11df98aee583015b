"""tiny_first: the embedded RL task of `assets/tiny_rl/` (scripts/make_tiny_assets.py).

A prompt is `copy: w1 .. wk` (2 to 4 distinct words of a pool of 8), its `answer` column is
`w1`, and the reward is 1 when the first word generated is w1, else 0: one decision a sample,
chance 1/8, that a model can only learn by reading the prompt (rl-design 3.8, task A).
"""

from typing import Any

from rl_toolkit.environments.interfaces import Prompt


def tiny_first(
    prompts: list[Prompt], completions: list[str], answer: list[str], **columns: Any
) -> list[float]:
    """1.0 for each completion whose first word is its row's answer, else 0.0.

    Args:
        prompts: the prompts (unused: the answer says what is right).
        completions: the generated texts.
        answer: the expected first word of each completion (the `answer` metadata column).
        **columns: other metadata columns (unused).
    """
    return [
        1.0 if completion.split()[:1] == [expected] else 0.0
        for completion, expected in zip(completions, answer, strict=True)
    ]
