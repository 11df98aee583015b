"""math: a final-answer checker for math problems, in pure Python.

The completion's final answer is the content of its last `\\boxed{...}` (or `\\fbox{...}`),
else its last number. The row's `answer` column is reduced the same way when it holds a
`\\boxed{}` or a GSM8K-style `... #### 42` (else it is taken whole). Both are normalised (math
delimiters, LaTeX spacing, `\\left`/`\\right`, `\\text{}`, `\\dfrac`, degrees, percent and
dollar signs, thousands separators, a leading `x =`, white space) and then compared as numbers
(integers, decimals, `a/b`, `\\frac{a}{b}`; equal within a relative 1e-6) or else as strings.

When the `math_verify` package is installed, a pair these rules call different gets its
symbolic check as a second opinion (`\\frac{\\sqrt{2}}{2}` against `\\sqrt{2}/2`, sets,
intervals). It is imported at the first such pair, i.e. in the scoring processes only; a hang
there is what the pool's per-call timeout cuts off.
"""

import functools
import importlib
import re
from fractions import Fraction
from types import ModuleType
from typing import Any

from rl_toolkit.environments.interfaces import Prompt

# Two numbers are the same answer within this relative tolerance (of the expected one, or 1).
RELATIVE_TOLERANCE = 1e-6

_BOXED = re.compile(r"\\(?:boxed|fbox)\s*")
_NUMBER = re.compile(r"-?\d+(?:,\d{3})*(?:\.\d+)?(?:/\d+)?|-?\.\d+")
_TEXT_COMMAND = re.compile(r"\\(?:text|textbf|mbox|mathrm)\{([^{}]*)\}")
_SPACING_COMMAND = re.compile(r"\\[,;:! ]")
_NUMERIC_FRAC = re.compile(r"\\frac\{(-?\d+(?:\.\d+)?)\}\{(-?\d+(?:\.\d+)?)\}")
_SHORT_FRAC = re.compile(r"\\frac(\d)(\d)")
_THOUSANDS = re.compile(r"(\d),(?=\d{3}(?!\d))")
_VARIABLE_IS = re.compile(r"^[A-Za-z]\s*=\s*")


def last_boxed(text: str) -> str | None:
    """The content of the last `\\boxed{...}` / `\\fbox{...}` (braces balanced), or of a
    brace-less `\\boxed 5`; None without one, or when its braces never close."""
    matches = list(_BOXED.finditer(text))
    if not matches:
        return None
    start = matches[-1].end()
    if not text.startswith("{", start):
        token = re.match(r"[^\s$]+", text[start:])
        return token.group(0) if token else None
    depth = 0
    for position in range(start, len(text)):
        depth += {"{": 1, "}": -1}.get(text[position], 0)
        if depth == 0:
            return text[start + 1 : position]
    return None


def extract_answer(completion: str) -> str | None:
    """The final answer of a completion: its last boxed content, else its last number."""
    boxed = last_boxed(completion)
    if boxed is not None:
        return boxed
    numbers = _NUMBER.findall(completion)
    return numbers[-1] if numbers else None


def reference_answer(answer: Any) -> str:
    """The answer column as a string to compare with: after a GSM8K `####` and inside a
    `\\boxed{}` when it has them (an int or float column is written as Python writes it)."""
    text = str(answer)
    if "####" in text:
        text = text.rsplit("####", 1)[1]
    boxed = last_boxed(text)
    return boxed if boxed is not None else text


def normalize_answer(text: str) -> str:
    """The answer with what does not change its value removed (module docstring)."""
    text = text.replace("\\$", "").replace("$", "")
    for delimiter in ("\\(", "\\)", "\\[", "\\]", "\\left", "\\right", "\\displaystyle"):
        text = text.replace(delimiter, "")
    text = _TEXT_COMMAND.sub(r"\1", text)
    text = _SPACING_COMMAND.sub("", text)
    text = text.replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac")
    for unit in ("^{\\circ}", "^\\circ", "\\%", "%"):
        text = text.replace(unit, "")
    text = _VARIABLE_IS.sub("", text.strip())
    text = re.sub(r"\s+", "", text).rstrip(".")
    text = _THOUSANDS.sub(r"\1", text)
    text = _NUMERIC_FRAC.sub(r"\1/\2", text)
    return _SHORT_FRAC.sub(r"\1/\2", text)


def to_number(text: str) -> Fraction | None:
    """A normalised answer as an exact number (`3`, `-2.5`, `1/2`, `1e3`), or None."""
    try:
        return Fraction(text)
    except (ValueError, ZeroDivisionError):
        return None


def answers_match(predicted: str, expected: str) -> bool:
    """Whether two answers are the same after normalisation: as numbers, or as strings."""
    predicted, expected = normalize_answer(predicted), normalize_answer(expected)
    if not predicted or not expected:
        return False
    if predicted == expected:
        return True
    predicted_number, expected_number = to_number(predicted), to_number(expected)
    if predicted_number is None or expected_number is None:
        return False
    scale = max(Fraction(1), abs(expected_number))
    return abs(predicted_number - expected_number) <= RELATIVE_TOLERANCE * scale


@functools.cache
def _math_verify() -> ModuleType | None:
    try:
        return importlib.import_module("math_verify")
    except ImportError:
        return None


def _verified_by_math_verify(completion: str, expected: str) -> bool:
    math_verify = _math_verify()
    if math_verify is None:
        return False
    return bool(
        math_verify.verify(math_verify.parse(f"${expected}$"), math_verify.parse(completion))
    )


def math_answer(
    prompts: list[Prompt], completions: list[str], answer: list[Any], **columns: Any
) -> list[float]:
    """1.0 for each completion whose final answer equals its row's answer, else 0.0.

    Args:
        prompts: the prompts (unused).
        completions: the generated texts.
        answer: the expected answer of each row (the `answer` metadata column): a number, a
            string, a `\\boxed{}` solution or a GSM8K `#### 42` solution.
        **columns: other metadata columns (unused).
    """
    rewards = []
    for completion, expected in zip(completions, answer, strict=True):
        gold = reference_answer(expected)
        predicted = extract_answer(completion)
        correct = predicted is not None and answers_match(predicted, gold)
        rewards.append(float(correct or _verified_by_math_verify(completion, gold)))
    return rewards
