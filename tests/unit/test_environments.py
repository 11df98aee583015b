"""Environments: reward functions in a process pool with a per-call timeout (a hung call is cut
off within timeout + 1 s and counted; one that raises is one line naming the row, or 0 and a
count), metadata aligned, exact rewards of the tiny task and the math checker, the config rules,
and the environment hosted in a Ray actor."""

import json
import re
import sys
import threading
import time
import types
from pathlib import Path

import pytest

from rl_toolkit.config_schema import EnvConfig, PromptDataConfig, check_rollout_config
from rl_toolkit.environments.pool import PoolStartError, TimeoutPool
from rl_toolkit.environments.reward_fn import (
    RewardError,
    RewardFunctionEnvironment,
    load_reward_fn,
)
from rl_toolkit.environments.tasks import math_checker
from rl_toolkit.environments.tasks.math_checker import extract_answer, math_answer
from rl_toolkit.environments.worker import EnvironmentWorker, RayEnvironment
from rl_toolkit.utils.config import ConfigError, ReportedError, validate_config
from tests.unit import reward_functions

REPO = Path(__file__).resolve().parents[2]
FUNCTIONS = "tests.unit.reward_functions"


def env_config(name: str, **overrides) -> dict:
    config = {"name": name, "kwargs": {}, "timeout_s": 5.0, "on_error": "zero", "num_processes": 2}
    return config | overrides


@pytest.fixture(scope="module")
def misbehaving():
    """An environment of misbehave_on_request: 2 processes, 1 s timeout, on_error zero."""
    environment = RewardFunctionEnvironment(
        reward_functions.misbehave_on_request,
        name="misbehave",
        timeout_s=1.0,
        on_error="zero",
        num_processes=2,
    )
    yield environment
    environment.close()


def score(environment, completions: list[str]):
    return environment.score(["prompt"] * len(completions), completions, [{}] * len(completions))


# ---------------------------------------------------------------------------------------------
# Timeouts and errors


def test_a_hung_call_is_cut_off_within_the_timeout_and_the_pool_goes_on(misbehaving) -> None:
    start = time.monotonic()
    result = score(misbehaving, ["ok", "sleep", "ok", "ok", "ok"])
    elapsed = time.monotonic() - start
    assert elapsed < 1.0 + 1.0, f"scoring took {elapsed:.2f} s with a 1 s timeout"
    assert result.rewards == [1.0, 0.0, 1.0, 1.0, 1.0]
    assert result.metrics == {"env/timeouts": 1.0, "env/errors": 0.0}
    # The killed process was replaced: the pool scores the next batches, hung calls again too.
    assert score(misbehaving, ["ok"] * 4).rewards == [1.0] * 4
    start = time.monotonic()
    result = score(misbehaving, ["sleep", "sleep", "ok"])
    assert time.monotonic() - start < 1.0 + 1.0 + 1.0  # two hung calls in parallel, then one
    assert result.rewards == [0.0, 0.0, 1.0] and result.metrics["env/timeouts"] == 2.0


def test_errors_score_zero_and_are_counted(misbehaving) -> None:
    result = score(misbehaving, ["raise", "ok", "exit", "string", "two", "nan", "ok"])
    assert result.rewards == [0.0, 1.0, 0.0, 0.0, 0.0, 0.0, 1.0]
    assert result.metrics == {"env/timeouts": 0.0, "env/errors": 5.0}
    assert score(misbehaving, ["ok", "ok"]).rewards == [1.0, 1.0]  # the exited one was replaced


@pytest.mark.parametrize(
    ("completion", "error"),
    [
        ("raise", "ValueError: cannot score this"),
        ("exit", "the scoring process died (exit code 3)"),
        ("string", "returned '1'; expected a finite number"),
        ("two", "returned [1.0, 2.0]; expected a list of one number per completion"),
        ("nan", "returned nan; expected a finite number"),
    ],
)
def test_on_error_raise_is_one_line_naming_the_row(completion: str, error: str) -> None:
    environment = RewardFunctionEnvironment(
        reward_functions.misbehave_on_request,
        name="misbehave",
        timeout_s=5.0,
        on_error="raise",
        num_processes=1,
    )
    try:
        with pytest.raises(RewardError) as raised:
            environment.score(["p0", "p1", "copy: a"], ["ok", "ok", completion], [{}] * 3)
        message = str(raised.value)
        assert "\n" not in message and isinstance(raised.value, ReportedError)
        assert message.startswith(
            f"env misbehave: scoring row 2 of 3 (prompt 'copy: a', completion {completion!r}) "
            f"failed: "
        )
        assert error in message
    finally:
        environment.close()


def test_metadata_reaches_the_call_of_its_own_row() -> None:
    environment = EnvironmentWorker(env_config(f"{FUNCTIONS}.answer_as_reward", num_processes=3))
    try:
        answers = list(range(20))
        result = environment.score(
            [f"p{i}" for i in answers], ["c"] * 20, [{"answer": i} for i in answers]
        )
        assert result.rewards == [float(i) for i in answers]
    finally:
        environment.shutdown()


def test_a_process_that_died_while_idle_is_replaced() -> None:
    pool = TimeoutPool(abs, num_processes=2, timeout_s=5.0)
    try:
        assert [outcome.value for outcome in pool.map([(-1,), (2,), (-3,)])] == [1, 2, 3]
        for slot in pool._slots:  # e.g. killed for memory between two batches
            slot.process.kill()
            slot.process.join()
        outcomes = pool.map([(-4,), (5,), (-6,)])
        assert outcomes == [("ok", 4), ("ok", 5), ("ok", 6)]
    finally:
        pool.close()
        pool.close()  # idempotent


def test_a_value_that_cannot_be_sent_back_is_an_error() -> None:
    pool = TimeoutPool(threading.Lock, num_processes=1, timeout_s=5.0)
    try:
        (outcome,) = pool.map([()])
        assert outcome.status == "error" and "returned a value that cannot be sent" in outcome.value
        assert pool.map([()] * 0) == []
    finally:
        pool.close()


def test_a_function_the_processes_cannot_load_fails_at_start(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Picklable here (its module is in sys.modules), not importable in a fresh process.
    module = types.ModuleType("only_in_this_process")
    exec("def reward(prompts, completions, **kw):\n    return [1.0]", module.__dict__)
    monkeypatch.setitem(sys.modules, "only_in_this_process", module)
    with pytest.raises(PoolStartError, match="could not load its function: ModuleNotFoundError"):
        TimeoutPool(module.reward, num_processes=1, timeout_s=1.0)


# ---------------------------------------------------------------------------------------------
# Loading the function, and the config rules


def test_load_reward_fn_builtins_paths_and_kwargs() -> None:
    assert load_reward_fn("tiny_first", {}).__name__ == "tiny_first"
    assert load_reward_fn("math", {}) is math_answer
    scaled = load_reward_fn(f"{FUNCTIONS}.scaled_length", {"scale": 2.0})
    assert scaled(prompts=["p"], completions=["abc"]) == [6.0]


@pytest.mark.parametrize(
    ("name", "kwargs", "message"),
    [
        ("no_such_pkg.reward", {}, "env.name='no_such_pkg.reward': cannot import"),
        (f"{FUNCTIONS}.missing", {}, "cannot import 'tests.unit.reward_functions.missing'"),
        (f"{FUNCTIONS}.NOT_A_FUNCTION", {}, "is a int, not a function"),
        (f"{FUNCTIONS}.completions_only", {}, "must take prompts=, completions= and env.kwargs"),
        (f"{FUNCTIONS}.exact_match", {"scale": 2}, "unexpected keyword argument 'scale'"),
        (f"{FUNCTIONS}.UNNAMED", {}, "cannot be sent to the scoring processes, which import it"),
    ],
)
def test_load_reward_fn_errors_are_one_line(name: str, kwargs: dict, message: str) -> None:
    with pytest.raises(ConfigError) as error:
        load_reward_fn(name, kwargs)
    assert message in str(error.value) and "\n" not in str(error.value)


@pytest.mark.parametrize(
    ("schema", "override", "message"),
    [
        (EnvConfig, {"timeout_s": 0}, "'timeout_s': input should be greater than 0"),
        (EnvConfig, {"on_error": "ignore"}, "'on_error': input should be 'raise' or 'zero'"),
        (EnvConfig, {"num_processes": 0}, "'num_processes': input should be greater than or equal"),
        (EnvConfig, {"kwargs": None}, "'kwargs': input should be a valid dictionary"),
        (EnvConfig, {"timeout": 1}, "unknown key 'timeout'"),
        (PromptDataConfig, {"format": "text"}, "'format': input should be 'prompt' or 'chat'"),
        (
            PromptDataConfig,
            {"metadata_keys": "answer"},
            "'metadata_keys': input should be a valid list",
        ),
        (
            PromptDataConfig,
            {"train_split": None, "num_workers": -1},
            "'num_workers': input should be",
        ),
    ],
)
def test_the_sections_types_and_ranges(schema, override: dict, message: str) -> None:
    good = {
        EnvConfig: env_config("tiny_first"),
        PromptDataConfig: {
            "format": "prompt", "train_data_path": "t.jsonl", "val_data_path": "v.jsonl",
            "train_split": None, "val_split": None, "prompt_key": "prompt",
            "messages_key": "messages", "metadata_keys": ["answer"], "shuffle": True,
            "num_workers": 0, "tokenize_num_proc": 1,
        },
    }[schema]  # fmt: skip
    validate_config(good, schema, {})
    with pytest.raises(ConfigError, match=re.escape(message)):
        validate_config(good | override, schema, {})


@pytest.mark.parametrize(
    ("metadata_keys", "env", "message"),
    [
        (["answer", "answer"], {}, "data.metadata_keys=['answer', 'answer'] names ['answer'] more"),
        (["completions"], {}, "data.metadata_keys names 'completions', which is the reward"),
        (["answer"], {"name": "maths"}, "env.name='maths' is unknown; expected one of ['math',"),
        (["answer"], {"name": "my_pkg."}, "env.name='my_pkg.' is unknown"),
        (["answer"], {"kwargs": {"answer": 1}}, "env.kwargs.answer would shadow"),
        (["answer"], {"kwargs": {"prompts": 1}}, "env.kwargs.prompts would shadow"),
    ],
)
def test_rollout_config_rules(metadata_keys: list[str], env: dict, message: str) -> None:
    data = {"metadata_keys": metadata_keys}
    with pytest.raises(ConfigError) as error:
        check_rollout_config(data, env_config("tiny_first") | env)
    assert message in str(error.value) and "\n" not in str(error.value)
    check_rollout_config({"metadata_keys": ["answer"]}, env_config("my_pkg.rewards.f"))


# ---------------------------------------------------------------------------------------------
# The built-in tasks


def test_tiny_first_rewards_are_exact_on_the_shipped_prompts() -> None:
    rows = [json.loads(line) for line in (REPO / "assets" / "tiny_rl" / "val.jsonl").open()]
    prompts, metadata, completions, expected = [], [], [], []
    for number, row in enumerate(rows):
        words = row["prompt"].split(": ")[1].split()
        # Row by row: the first word, the first word and more, the second word first, nothing.
        completion, reward = [
            (words[0], 1.0),
            (" ".join(words), 1.0),
            (" ".join(words[1:]), 0.0),
            ("", 0.0),
        ][number % 4]
        prompts.append(row["prompt"])
        metadata.append({"answer": row["answer"]})
        completions.append(completion)
        expected.append(reward)
    environment = EnvironmentWorker(env_config("tiny_first"))
    try:
        result = environment.score(prompts, completions, metadata)
    finally:
        environment.shutdown()
    assert result.rewards == expected and sum(expected) == 64
    assert result.metrics == {"env/timeouts": 0.0, "env/errors": 0.0}


@pytest.mark.parametrize(
    ("completion", "answer", "reward"),
    [
        ("so the answer is \\boxed{42}.", "42", 1.0),
        ("\\boxed{42} is wrong, it is \\boxed{43}", 43, 1.0),  # the last box; an int column
        ("The total is 1,000 apples.", "1000", 1.0),  # the last number; thousands separator
        ("It costs $18.50 in total", "18.5", 1.0),
        ("so x = 0.5", "\\frac{1}{2}", 1.0),
        ("\\boxed{\\dfrac{3}{4}}", "0.75", 1.0),
        ("\\boxed{\\frac12}", "1/2", 1.0),
        ("\\boxed{x = -3}", "-3", 1.0),
        ("\\boxed{90^\\circ}", "90", 1.0),
        ("\\boxed{25\\%}", "25", 1.0),
        ("\\boxed{5 \\text{ cm}}", "5cm", 1.0),
        ("\\boxed{\\left(1, 2\\right)}", "(1,2)", 1.0),
        ("\\boxed{\\frac{\\sqrt{2}}{2}}", "\\frac{\\sqrt{2}}{2}", 1.0),  # equal as strings
        ("He has 3 + 4 = 7 marbles", "Natalia sold 48/2 = 24 clips ... #### 7", 1.0),  # GSM8K
        ("the answer is \\boxed{7}", "\\boxed{7}", 1.0),
        ("answer: 0.3333", "1/3", 0.0),  # not within 1e-6
        ("\\boxed{41}", "42", 0.0),
        ("no number here", "42", 0.0),
        ("\\boxed{", "42", 0.0),
        ("", "", 0.0),
    ],
)
def test_math_answer_cases(completion: str, answer, reward: float) -> None:
    assert math_answer(["q"], [completion], [answer]) == [reward]


def test_extract_answer() -> None:
    assert extract_answer("a \\boxed{\\frac{1}{\\sqrt{2}}} b") == "\\frac{1}{\\sqrt{2}}"
    assert extract_answer("\\fbox{3} and later 5") == "3"
    assert extract_answer("\\boxed 12 done") == "12"
    assert extract_answer("1, 2 and -3.5 then") == "-3.5"
    assert extract_answer("nothing") is None


def test_math_verify_is_a_second_opinion_when_installed(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []

    def verify(gold, predicted) -> bool:
        calls.append((gold, predicted))
        return gold == ("parsed", "$\\sqrt{2}/2$") and "sqrt" in predicted[1]

    standin = types.SimpleNamespace(parse=lambda text: ("parsed", text), verify=verify)
    math_checker._math_verify.cache_clear()
    monkeypatch.setitem(sys.modules, "math_verify", standin)
    try:
        assert math_answer(["q"] * 3, ["\\boxed{\\frac{\\sqrt{2}}{2}}", "\\boxed{2}", "\\boxed{1}"],
                           ["\\sqrt{2}/2", "2", "3"]) == [1.0, 1.0, 0.0]  # fmt: skip
        # asked only where the rules said no
        assert [gold[1] for gold, _ in calls] == ["$\\sqrt{2}/2$", "$3$"]
    finally:
        math_checker._math_verify.cache_clear()


# ---------------------------------------------------------------------------------------------
# Hosted in a Ray actor


def test_the_environment_in_a_ray_actor(ray_session) -> None:
    with pytest.raises(ConfigError, match="env.name='tiny_firs': cannot import"):
        RayEnvironment(env_config("tiny_firs"))  # on the driver, before any actor
    environment = RayEnvironment(env_config("tiny_first", timeout_s=2.0))
    try:
        result = environment.score(
            ["copy: cat dog", "copy: owl egg"],
            ["cat", "egg"],
            [{"answer": "cat"}, {"answer": "owl"}],
        )
        assert result.rewards == [1.0, 0.0]
        assert result.metrics == {"env/timeouts": 0.0, "env/errors": 0.0}
    finally:
        environment.shutdown()
    environment = RayEnvironment(
        env_config(f"{FUNCTIONS}.misbehave_on_request", timeout_s=1.0, on_error="raise")
    )
    try:
        start = time.monotonic()
        result = environment.score(["p", "p"], ["sleep", "ok"], [{}, {}])
        assert time.monotonic() - start < 1.0 + 1.0
        assert result.rewards == [0.0, 1.0] and result.metrics["env/timeouts"] == 1.0
        with pytest.raises(RewardError) as raised:
            environment.score(["p", "p"], ["ok", "raise"], [{}, {}])
        assert str(raised.value).startswith("env tests.unit.reward_functions.misbehave_on_request:"
                                            " scoring row 1 of 2")  # fmt: skip
        assert "\n" not in str(raised.value)
    finally:
        environment.shutdown()
        environment.shutdown()  # idempotent
