"""Tests for the pair-aware collate, pad_batch_to and the resumable StatefulDataLoader."""

import json
import math
from types import SimpleNamespace

import datasets
import pytest
import torch

from rl_toolkit.algorithms.loss_functions import DPOLossFn
from rl_toolkit.data import (
    PreferencePairDataset,
    build_dataloader,
    pad_batch_to,
    preference_collate_fn,
    tokenize_preference_dataset,
)
from rl_toolkit.data.hf_datasets import DPODataset
from tests.unit.test_data_tokenization import make_tokenizer

PAD = 0


def item(pair_id: int, prompt: list[int], chosen: list[int], rejected: list[int]) -> dict:
    return {
        "pair_id": pair_id,
        "prompt_length": len(prompt),
        "chosen_input_ids": torch.tensor(prompt + chosen),
        "rejected_input_ids": torch.tensor(prompt + rejected),
    }


def test_collate_interleaves_pads_and_masks() -> None:
    items = [item(7, [1, 2], [3, 4, 9], [5, 9]), item(3, [1], [6, 9], [7, 8, 8, 9])]
    batch = preference_collate_fn(items, pad_token_id=PAD, pad_to_multiple_of=4)
    assert batch.group_size == 2
    assert set(batch) == {"input_ids", "input_lengths", "token_mask", "sample_mask", "pair_ids"}
    # longest row has 5 tokens, rounded up to 8
    assert batch["input_ids"].tolist() == [
        [1, 2, 3, 4, 9, 0, 0, 0],  # c0
        [1, 2, 5, 9, 0, 0, 0, 0],  # r0
        [1, 6, 9, 0, 0, 0, 0, 0],  # c1
        [1, 7, 8, 8, 9, 0, 0, 0],  # r1
    ]
    assert batch["token_mask"].tolist() == [
        [0, 0, 1, 1, 1, 0, 0, 0],
        [0, 0, 1, 1, 0, 0, 0, 0],
        [0, 1, 1, 0, 0, 0, 0, 0],
        [0, 1, 1, 1, 1, 0, 0, 0],
    ]
    assert batch["input_lengths"].tolist() == [5, 4, 3, 5]
    assert batch["sample_mask"].tolist() == [1.0] * 4
    assert batch["pair_ids"].tolist() == [7, 7, 3, 3]
    assert batch["input_ids"].dtype == torch.int64 and batch["input_lengths"].dtype == torch.int64
    assert batch["token_mask"].dtype == torch.float32
    assert batch["sample_mask"].dtype == torch.float32
    assert batch["pair_ids"].dtype == torch.int64


def test_pad_batch_to_adds_rows_without_loss() -> None:
    batch = preference_collate_fn(
        [item(5, [1], [2, 9], [3, 9])], pad_token_id=PAD, pad_to_multiple_of=1
    )
    padded = pad_batch_to(batch, 3)
    assert padded.size == 6 and padded.group_size == 2
    assert padded["sample_mask"].tolist() == [1, 1, 0, 0, 0, 0]
    assert padded["pair_ids"].tolist() == [5, 5, -1, -1, -1, -1]
    assert padded["token_mask"][2:].sum() == 0
    # the filler rows are well-formed copies of the first pair
    assert padded["input_ids"][2:].tolist() == batch["input_ids"].tolist() * 2
    assert padded["input_lengths"].tolist() == [3, 3] * 3
    assert pad_batch_to(batch, 1) is batch


def make_dataset(num_pairs: int) -> PreferencePairDataset:
    """Pairs tokenised by a character-level stand-in for a tokenizer."""

    class CharTokenizer:
        bos_token_id = 1
        eos_token_id = 2
        chat_template = None

        def __call__(self, text: str, add_special_tokens: bool) -> dict:
            body = [3 + ord(char) % 50 for char in text]
            return {"input_ids": ([1] if add_special_tokens else []) + body}

    rows = [
        {"prompt": f"q{i}" * (1 + i % 3), "chosen_response": "yes" * (1 + i % 2),
         "rejected_response": "no"}
        for i in range(num_pairs)
    ]  # fmt: skip
    return PreferencePairDataset(
        datasets.Dataset.from_list(rows),
        CharTokenizer(),
        max_total_sequence_length=64,
        overlong_policy="drop",
        source="train",
    )


def loader(dataset: PreferencePairDataset, num_workers: int, **kwargs):
    args = {"shuffle": True, "drop_last": True}
    args.update(kwargs)
    tokenizer = SimpleNamespace(pad_token_id=PAD)
    data_config = {"num_workers": num_workers, "pad_to_multiple_of": 8}
    return build_dataloader(dataset, tokenizer, data_config, num_pairs=3, seed=1234, **args)


def pair_ids(batches) -> list[list[int]]:
    return [batch["pair_ids"][0::2].tolist() for batch in batches]


def take(iterator, count: int) -> list:
    return [next(iterator) for _ in range(count)]


def test_shuffle_is_seeded_and_independent_of_num_workers() -> None:
    dataset = make_dataset(12)
    order0 = pair_ids(loader(dataset, num_workers=0))
    order1 = pair_ids(loader(dataset, num_workers=1))
    assert order0 == order1
    assert sorted(sum(order0, [])) == list(range(12))
    assert sum(order0, []) != list(range(12))  # shuffled
    assert order0 == pair_ids(loader(dataset, num_workers=0))  # same seed, same order


@pytest.mark.parametrize("num_workers", [0, 1])
def test_state_dict_mid_epoch_resumes_with_the_next_batch(num_workers: int) -> None:
    dataset = make_dataset(12)  # 4 batches of 3 pairs per epoch
    reference = loader(dataset, num_workers)
    stream = iter(reference)
    take(stream, 2)
    state = reference.state_dict()
    # the rest of this epoch and the next epoch
    expected = take(stream, 2) + list(reference)

    resumed = loader(dataset, num_workers)
    resumed.load_state_dict(state)
    got = list(resumed) + list(resumed)
    assert pair_ids(got) == pair_ids(expected)
    for got_batch, expected_batch in zip(got, expected, strict=True):
        assert torch.equal(got_batch["input_ids"], expected_batch["input_ids"])
    assert pair_ids(expected[2:]) != pair_ids(loader(dataset, 0))  # epochs differ in order


def test_validation_loader_keeps_the_partial_last_batch() -> None:
    dataset = make_dataset(7)
    batches = list(loader(dataset, 0, shuffle=False, drop_last=False))
    assert pair_ids(batches) == [[0, 1, 2], [3, 4, 5], [6]]
    padded = pad_batch_to(batches[-1], 3)
    assert padded["sample_mask"].sum() == 2
    assert all(batch["input_ids"].shape[1] % 8 == 0 for batch in batches)


def test_file_to_loss_pipeline(tmp_path) -> None:
    """jsonl -> DPODataset -> tokenised pairs -> loader batch -> DPOLossFn."""
    rows = [
        {"prompt": "what is two plus two", "chosen_response": "four", "rejected_response": "five"},
        {"prompt": [{"role": "user", "content": "hi"}], "chosen_response": "hello",
         "rejected_response": "bye bye"},
    ]  # fmt: skip
    train = tmp_path / "train.jsonl"
    train.write_text(json.dumps(rows[0]) + "\n")
    val = tmp_path / "val.jsonl"
    val.write_text(json.dumps(rows[1]) + "\n")
    tokenizer = make_tokenizer()
    data_config = {
        "overlong_policy": "drop",
        "num_workers": 0,
        "pad_to_multiple_of": 4,
        "tokenize_num_proc": 1,
    }
    dataset = DPODataset(str(train), str(val))
    pairs = tokenize_preference_dataset(
        dataset.formatted_ds["validation"],
        tokenizer,
        dataset.task_spec,
        data_config,
        max_total_sequence_length=64,
    )
    batch = next(iter(build_dataloader(pairs, tokenizer, data_config, num_pairs=1, shuffle=False,
                                       seed=0, drop_last=False)))  # fmt: skip
    # "<s> <|user|> hi <|end|> <|assistant|>" then "hello <|end|> </s>" / "bye bye <|end|> </s>"
    assert batch["input_lengths"].tolist() == [8, 9]
    assert batch["token_mask"].sum(-1).tolist() == [3.0, 4.0]
    assert batch["input_ids"].shape == (2, 12)
    batch = pad_batch_to(batch, 2)
    # policy == reference: the sigmoid loss of the one valid pair is ln 2
    logprobs = -torch.ones(batch["input_ids"].shape) * batch["token_mask"]
    batch["reference_policy_logprobs"] = logprobs.clone()
    cfg = {
        "reference_policy_kl_penalty": 0.1, "preference_loss_weight": 1.0, "sft_loss_weight": 0.0,
        "preference_average_log_probs": False, "sft_average_log_probs": False,
        "loss_type": "sigmoid", "label_smoothing": 0.0, "reference_free": False,
        "simpo_gamma": 0.0, "discopop_tau": 0.05,
    }  # fmt: skip
    loss, metrics = DPOLossFn(cfg)(logprobs, batch, batch["sample_mask"].sum(), torch.tensor(7.0))
    assert loss.item() == pytest.approx(math.log(2))
    assert metrics["num_valid_samples"] == 1
