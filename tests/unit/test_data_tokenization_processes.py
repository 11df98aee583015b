"""Tokenising a split in worker processes (data.tokenize_num_proc) gives the in-process result:
the same items, counts, log line and bad-row error."""

import logging
import random

import datasets
import pytest
import torch

from rl_toolkit.data import PreferencePairDataset, processes, tokenize_preference_dataset
from rl_toolkit.data import datasets as pair_datasets
from tests.unit.test_data_tokenization import CHAT_TEMPLATE, WORDS, make_tokenizer

NUM_ROWS = 64
MAX_LENGTH = 16


def make_rows(bad_rows: tuple[int, ...] = ()) -> datasets.Dataset:
    """NUM_ROWS pairs of random lengths; under MAX_LENGTH=16 and the chat template some fit,
    some need their prompt truncated and some have a response too long even alone."""
    rng = random.Random(0)
    words = WORDS[:11]  # plain words, none of them a role name

    def text(low: int, high: int) -> str:
        return " ".join(rng.choices(words, k=rng.randint(low, high)))

    rows = [
        {"prompt": text(1, 8), "chosen_response": text(1, 14), "rejected_response": text(1, 4)}
        for _ in range(NUM_ROWS)
    ]
    for number in bad_rows:  # 1-based, as errors count rows
        rows[number - 1]["chosen_response"] = "nice"
    return datasets.Dataset.from_list(rows)


def bad_row_tokenizer():
    # An assistant turn saying "nice" renders with the system role, so for those rows the
    # prompt's generation prompt is not a prefix of the conversation: tokenize_pair rejects them.
    template = CHAT_TEMPLATE.replace(
        "<|{{ m['role'] }}|>", "<|{{ 'system' if m['content'] == 'nice' else m['role'] }}|>"
    )
    return make_tokenizer(template)


@pytest.fixture
def spied_processes(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Splits of 16+ rows per process use processes; the list gets each call's process count."""
    monkeypatch.setattr(processes, "MIN_ROWS_PER_PROCESS", 16)
    calls = []
    original = processes._tokenize_in_processes

    def spy(rows, num_proc, kwargs, **features):
        calls.append(num_proc)
        return original(rows, num_proc, kwargs, **features)

    monkeypatch.setattr(processes, "_tokenize_in_processes", spy)
    return calls


def tokenize(rows: datasets.Dataset, tokenizer, num_proc: int) -> PreferencePairDataset:
    return PreferencePairDataset(
        rows,
        tokenizer,
        max_total_sequence_length=MAX_LENGTH,
        overlong_policy="truncate_prompt",
        source="train",
        num_proc=num_proc,
    )


def test_two_processes_give_the_in_process_result(
    spied_processes: list[int], caplog: pytest.LogCaptureFixture
) -> None:
    rows = make_rows()
    tokenizer = make_tokenizer()
    caplog.set_level(logging.INFO, logger=pair_datasets.__name__)
    expected = tokenize(rows, tokenizer, num_proc=1)
    expected_log = caplog.messages[-1]
    data_config = {"overlong_policy": "truncate_prompt", "tokenize_num_proc": 2}
    got = tokenize_preference_dataset(
        rows, tokenizer, {"task_name": "train"}, data_config, max_total_sequence_length=MAX_LENGTH
    )
    assert spied_processes == [2]  # only the second run used processes
    assert caplog.messages[-1] == expected_log
    assert got.counts == expected.counts
    # the data exercises every branch: kept as is, truncated, dropped
    counts = expected.counts
    assert counts["num_dropped"] > 0 and 0 < counts["num_truncated"] < counts["num_pairs"]
    assert len(got) == len(expected)
    for got_item, expected_item in zip(got, expected, strict=True):
        assert got_item.keys() == expected_item.keys()
        assert got_item["pair_id"] == expected_item["pair_id"]
        assert got_item["prompt_length"] == expected_item["prompt_length"]
        for key in ("chosen_input_ids", "rejected_input_ids"):
            assert got_item[key].dtype == torch.int64
            assert torch.equal(got_item[key], expected_item[key])


def test_bad_row_error_is_the_in_process_one(spied_processes: list[int]) -> None:
    # rows 30 and 34 are bad, at the end of the first 32-row shard and the start of the second:
    # the first bad row is named, although the second worker reaches its bad row much sooner
    rows = make_rows(bad_rows=(30, 34))
    tokenizer = bad_row_tokenizer()
    with pytest.raises(ValueError) as in_process:
        tokenize(rows, tokenizer, num_proc=1)
    with pytest.raises(ValueError) as in_workers:
        tokenize(rows, tokenizer, num_proc=2)
    assert spied_processes == [2]
    assert str(in_process.value).startswith("train, row 30: the chat template renders the prompt")
    assert str(in_workers.value) == str(in_process.value)
    assert type(in_workers.value) is type(in_process.value)
    assert in_workers.value.__cause__ is None  # no remote traceback from the pool


def test_small_splits_stay_in_process(spied_processes: list[int]) -> None:
    # 64 rows at 16 per process: 8 processes asked, 4 used; 15 rows: none
    assert len(tokenize(make_rows(), make_tokenizer(), num_proc=8)) > 0
    tokenize(make_rows().select(range(15)), make_tokenizer(), num_proc=8)
    assert spied_processes == [4]


def test_num_proc_below_one_is_rejected() -> None:
    with pytest.raises(ValueError, match=r"data.tokenize_num_proc=0; expected an integer >= 1"):
        tokenize(make_rows(), make_tokenizer(), num_proc=0)
