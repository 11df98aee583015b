"""TRL-style reward functions as an Environment, one completion per call, in a TimeoutPool.

A reward function has TRL's form: `f(prompts, completions, **columns) -> list[float]`, called
with keyword arguments (`prompts=`, `completions=`, one keyword per metadata column, each a list
with one entry per completion), so TRL's reward functions run unchanged (those that read TRL's
`completion_ids` or `trainer_state` do not: nothing passes them). Each completion gets a call
of its own, so that a timeout or an error belongs to one row: a call past `timeout_s` is cut
off and scores 0 (counted in `env/timeouts`); a call that raises, returns anything but one
number, or whose process dies, stops the run with one line naming the row (`on_error: raise`)
or scores 0 (counted in `env/errors`; `on_error: zero`).
"""

import importlib
import inspect
import pickle
from collections.abc import Callable
from functools import partial
from typing import Any, Literal

from rl_toolkit.config_schema import BUILTIN_ENVIRONMENTS
from rl_toolkit.environments.interfaces import EnvironmentResult, Prompt, score_one
from rl_toolkit.environments.pool import TimeoutPool
from rl_toolkit.utils.config import ConfigError, ReportedError

# How much of a prompt and a completion an error message quotes.
QUOTE_CHARS = 60


class RewardError(RuntimeError, ReportedError):
    """A reward function failed on a row (on_error: raise); the message is one line naming the
    row, its prompt and completion, and the error."""


def load_reward_fn(name: str, kwargs: dict[str, Any]) -> Callable[..., Any]:
    """The reward function `env.name` names, with `env.kwargs` bound to it.

    Args:
        name: a key of BUILTIN_ENVIRONMENTS or the dotted path of a function.
        kwargs: keyword arguments bound with functools.partial.

    Raises:
        ConfigError: the function does not import, is not callable, does not take `prompts=`,
            `completions=` and `kwargs` as keyword arguments, or cannot be pickled by name (the
            scoring processes import it).
    """
    path = BUILTIN_ENVIRONMENTS.get(name, name)
    module_name, _, attribute = path.rpartition(".")
    try:
        reward_fn = getattr(importlib.import_module(module_name), attribute)
    except (ImportError, AttributeError, ValueError) as error:
        raise ConfigError(f"env.name={name!r}: cannot import {path!r} ({error})") from None
    if not callable(reward_fn):
        raise ConfigError(
            f"env.name={name!r}: {path} is a {type(reward_fn).__name__}, not a function"
        )
    try:
        inspect.signature(reward_fn).bind_partial(prompts=[], completions=[], **kwargs)
    except TypeError as error:
        raise ConfigError(
            f"env.name={name!r}: {path} must take prompts=, completions= and env.kwargs "
            f"{sorted(kwargs)} as keyword arguments (TRL's form, f(prompts, completions, "
            f"**kwargs)): {error}"
        ) from None
    bound = partial(reward_fn, **kwargs) if kwargs else reward_fn
    try:
        pickle.dumps(bound)  # what the scoring processes receive
    except (pickle.PicklingError, AttributeError, TypeError) as error:
        raise ConfigError(
            f"env.name={name!r}: {path} cannot be sent to the scoring processes, which import it "
            f"by name; make it a module-level function ({error})"
        ) from None
    return bound


def _quote(text: Prompt) -> str:
    text = text if isinstance(text, str) else text[-1]["content"]
    return repr(text if len(text) <= QUOTE_CHARS else text[:QUOTE_CHARS] + "...")


class RewardFunctionEnvironment:
    """An Environment that scores every completion with one call of a reward function.

    Args:
        reward_fn: a picklable TRL-style function (load_reward_fn's result).
        name: names the function in error messages (env.name).
        timeout_s: per call (env.timeout_s).
        on_error: "raise" or "zero" (env.on_error).
        num_processes: calls in parallel (env.num_processes).
    """

    def __init__(
        self,
        reward_fn: Callable[..., Any],
        *,
        name: str,
        timeout_s: float,
        on_error: Literal["raise", "zero"],
        num_processes: int,
    ) -> None:
        self.name, self.on_error = name, on_error
        self.pool = TimeoutPool(
            partial(score_one, reward_fn), num_processes=num_processes, timeout_s=timeout_s
        )

    def score(
        self, prompts: list[Prompt], completions: list[str], metadata: list[dict[str, Any]]
    ) -> EnvironmentResult:
        """Rewards of N completions (see Environment.score).

        Returns:
            The rewards, with 0.0 for every timed-out or (on_error: zero) failed call, and the
            metrics `env/timeouts` and `env/errors`: how many of the N calls did so.

        Raises:
            RewardError: on_error is "raise" and a call failed: names the first such row.
        """
        assert len(prompts) == len(completions) == len(metadata), "rows are not aligned"
        outcomes = self.pool.map(list(zip(prompts, completions, metadata, strict=True)))
        errors = [row for row, outcome in enumerate(outcomes) if outcome.status == "error"]
        if errors and self.on_error == "raise":
            row = errors[0]
            raise RewardError(
                f"env {self.name}: scoring row {row} of {len(outcomes)} (prompt "
                f"{_quote(prompts[row])}, completion {_quote(completions[row])}) failed: "
                f"{' '.join(str(outcomes[row].value).split())} (env.on_error=zero scores such "
                "rows 0 instead)"
            )
        rewards = [outcome.value if outcome.status == "ok" else 0.0 for outcome in outcomes]
        num_timeouts = sum(outcome.status == "timeout" for outcome in outcomes)
        return EnvironmentResult(
            rewards, {"env/timeouts": float(num_timeouts), "env/errors": float(len(errors))}
        )

    def close(self) -> None:
        """Stop the scoring processes."""
        self.pool.close()
