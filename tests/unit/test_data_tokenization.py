"""Tests for tokenising pairs: chat template and plain text, BOS once, response-only mask,
the template prefix check, and the length policy with its counts."""

import json
from pathlib import Path

import datasets
import pytest
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

from rl_toolkit.data import PreferencePairDataset, tokenize_preference_dataset
from rl_toolkit.data.hf_datasets import DPODataset
from rl_toolkit.data.tokenization import fit_prompt, tokenize_pair

WORDS = [
    "hi",
    "hello",
    "bye",
    "a",
    "b",
    "c",
    "d",
    "e",
    "f",
    "g",
    "h",
    "what",
    "is",
    "two",
    "plus",
    "four",
    "five",
    "be",
    "nice",
]
SPECIAL = ["<pad>", "<unk>", "<s>", "</s>", "<|user|>", "<|assistant|>", "<|system|>", "<|end|>"]
# "<|role|> content <|end|>" per message; the generation prompt opens an assistant turn.
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|> {{ m['content'] }} <|end|> "
    "{% endfor %}{% if add_generation_prompt %}<|assistant|> {% endif %}"
)


def make_tokenizer(chat_template: str | None = CHAT_TEMPLATE) -> PreTrainedTokenizerFast:
    """A word-level tokenizer whose post-processor adds BOS, like Llama's."""
    vocab = {token: index for index, token in enumerate(SPECIAL + WORDS)}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.post_processor = processors.TemplateProcessing(
        single="<s> $A", special_tokens=[("<s>", vocab["<s>"])]
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        unk_token="<unk>",
        additional_special_tokens=SPECIAL[4:],
    )
    tokenizer.chat_template = chat_template
    return tokenizer


def ids(tokenizer: PreTrainedTokenizerFast, text: str) -> list[int]:
    return tokenizer.convert_tokens_to_ids(text.split())


def test_chat_template_pair() -> None:
    tokenizer = make_tokenizer()
    prompt, chosen, rejected = tokenize_pair(tokenizer, "what is two", "four", "five", "row 1")
    assert prompt == ids(tokenizer, "<s> <|user|> what is two <|end|> <|assistant|>")
    # the assistant turn as the template renders it, then EOS
    assert chosen == ids(tokenizer, "four <|end|> </s>")
    assert rejected == ids(tokenizer, "five <|end|> </s>")
    # BOS once although the template writes it and the tokenizer would add one
    assert (prompt + chosen).count(tokenizer.bos_token_id) == 1


def test_chat_messages_with_system_prompt() -> None:
    tokenizer = make_tokenizer()
    messages = [{"role": "system", "content": "be nice"}, {"role": "user", "content": "hi"}]
    answer = [{"role": "assistant", "content": "hello"}]
    prompt, chosen, _ = tokenize_pair(tokenizer, messages, answer, "bye", "row 1")
    assert prompt == ids(
        tokenizer, "<s> <|system|> be nice <|end|> <|user|> hi <|end|> <|assistant|>"
    )
    assert chosen == ids(tokenizer, "hello <|end|> </s>")


def test_template_that_ends_turns_with_eos_gets_no_second_eos() -> None:
    template = CHAT_TEMPLATE.replace("<|end|>", "{{ eos_token }}")
    tokenizer = make_tokenizer(template)
    _, chosen, _ = tokenize_pair(tokenizer, "hi", "hello", "bye", "row 1")
    assert chosen == ids(tokenizer, "hello </s>")


def test_plain_text_pair() -> None:
    tokenizer = make_tokenizer(chat_template=None)
    prompt, chosen, rejected = tokenize_pair(tokenizer, "two plus two", "four", "five", "row 1")
    assert prompt == ids(tokenizer, "<s> two plus two")  # the tokenizer adds BOS
    assert chosen == ids(tokenizer, "four </s>")  # no BOS before a response
    assert rejected == ids(tokenizer, "five </s>")


def test_messages_without_template_raise() -> None:
    tokenizer = make_tokenizer(chat_template=None)
    with pytest.raises(ValueError, match="t.jsonl, row 4: 'prompt' is a list of chat messages"):
        tokenize_pair(tokenizer, [{"role": "user", "content": "hi"}], "a", "b", "t.jsonl, row 4")


def test_template_breaking_the_prefix_raises() -> None:
    # the generation prompt opens "<|assistant|>" but an assistant turn renders as "<|system|>"
    template = (
        "{% for m in messages %}{% if m['role'] == 'assistant' %}<|system|> {% else %}"
        "<|user|> {% endif %}{{ m['content'] }} {% endfor %}"
        "{% if add_generation_prompt %}<|assistant|> {% endif %}"
    )
    tokenizer = make_tokenizer(template)
    with pytest.raises(ValueError, match="train, row 7: the chat template renders the prompt"):
        tokenize_pair(tokenizer, "hi", "hello", "bye", "train, row 7")


@pytest.mark.parametrize(
    ("policy", "max_length", "expected"),
    [
        ("drop", 10, [9, 1, 2, 3, 4]),  # fits: unchanged
        ("drop", 9, None),
        ("truncate_prompt", 8, [9, 3, 4]),  # keeps BOS (9) and the end of the prompt
        ("truncate_prompt", 7, [9, 4]),
        ("truncate_prompt", 6, None),  # room for BOS only: no prompt token would be left
    ],
)
def test_fit_prompt(policy: str, max_length: int, expected: list[int] | None) -> None:
    # prompt of 5 tokens (BOS = 9), longest response 5 tokens
    fitted = fit_prompt(
        [9, 1, 2, 3, 4],
        5,
        max_total_sequence_length=max_length,
        overlong_policy=policy,
        bos_id=9,
    )
    assert fitted == expected


def test_fit_prompt_without_bos() -> None:
    fitted = fit_prompt(
        [1, 2, 3], 4, max_total_sequence_length=5, overlong_policy="truncate_prompt", bos_id=None
    )
    assert fitted == [3]


ROWS = [
    {"prompt": "hi", "chosen_response": "hello", "rejected_response": "bye"},
    {"prompt": "what is two plus two", "chosen_response": "four", "rejected_response": "five"},
    {"prompt": "hi", "chosen_response": "a b c d e f g h", "rejected_response": "bye"},
]


@pytest.mark.parametrize(
    ("policy", "counts", "prompt_lengths"),
    [
        # plain text, limit 5: row 1 is "<s> hi" + "hello </s>" = 2 + 2 = 4 tokens; row 2's
        # prompt "<s> what is two plus two" is 6 tokens (8 in all); row 3's chosen response is
        # 9 tokens, too long even alone.
        (
            "drop",
            {"num_rows": 3, "num_pairs": 1, "num_dropped": 2, "num_identical": 0}
            | {"num_overlong": 2, "num_truncated": 0},
            [2],
        ),
        # row 2's prompt keeps BOS + its last 2 tokens (5 - 2 for the response - 1 for BOS)
        (
            "truncate_prompt",
            {"num_rows": 3, "num_pairs": 2, "num_dropped": 1, "num_identical": 0}
            | {"num_overlong": 1, "num_truncated": 1},
            [2, 3],
        ),
    ],
)
def test_pair_dataset_counts_and_masks(
    policy: str, counts: dict, prompt_lengths: list[int], caplog: pytest.LogCaptureFixture
) -> None:
    tokenizer = make_tokenizer(chat_template=None)
    dataset = PreferencePairDataset(
        datasets.Dataset.from_list(ROWS),
        tokenizer,
        max_total_sequence_length=5,
        overlong_policy=policy,
        source="train",
    )
    assert dataset.counts == counts
    assert [item["prompt_length"] for item in dataset] == prompt_lengths
    assert [item["pair_id"] for item in dataset] == [0, 1][: len(dataset)]
    assert f"train: {len(dataset)} pairs from 3 rows" in caplog.text
    if policy == "truncate_prompt":
        assert dataset[1]["chosen_input_ids"].tolist() == ids(tokenizer, "<s> plus two four </s>")


def test_pair_dataset_errors() -> None:
    tokenizer = make_tokenizer(chat_template=None)
    rows = datasets.Dataset.from_list(ROWS)
    with pytest.raises(ValueError, match="data.overlong_policy='cut'; expected one of"):
        PreferencePairDataset(
            rows, tokenizer, max_total_sequence_length=5, overlong_policy="cut", source="train"
        )
    with pytest.raises(ValueError, match="train: no pair fits in 2 tokens"):
        PreferencePairDataset(
            rows, tokenizer, max_total_sequence_length=2, overlong_policy="drop", source="train"
        )


def test_tokenize_preference_dataset_names_task_and_split(tmp_path) -> None:
    path = tmp_path / "val.jsonl"
    path.write_text('{"prompt": "hi", "chosen_response": "hello", "rejected_response": "bye"}\n')
    dataset = DPODataset(str(path), str(path))
    tokenizer = make_tokenizer()
    data_config = {"overlong_policy": "drop", "tokenize_num_proc": 1}
    pairs = tokenize_preference_dataset(
        dataset.formatted_ds["validation"],
        tokenizer,
        dataset.task_spec,
        data_config,
        max_total_sequence_length=32,
    )
    assert pairs[0]["chosen_input_ids"].tolist() == ids(
        tokenizer, "<s> <|user|> hi <|end|> <|assistant|> hello <|end|> </s>"
    )
    tokenizer.chat_template = "{% for m in messages %}{{ m['content'] }} {% endfor %}<|end|>"
    with pytest.raises(ValueError, match=r"dpo\[validation\], row 1: the chat template"):
        tokenize_preference_dataset(
            dataset.formatted_ds["validation"],
            tokenizer,
            dataset.task_spec,
            data_config,
            max_total_sequence_length=32,
        )


def test_identical_and_overlong_pairs_are_dropped_counted_and_named(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    rows = [
        {"prompt": "hi", "chosen_response": "hello", "rejected_response": "bye"},
        {"prompt": "hi", "chosen_response": "same", "rejected_response": "same"},  # row 2
        {"prompt": "hi", "chosen_response": "a b c d e f g h", "rejected_response": "bye"},  # 3
        {"prompt": "two", "chosen_response": "four", "rejected_response": "four"},  # row 4
    ]
    path = tmp_path / "train.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    dataset = DPODataset(str(path), str(path))
    data_config = {"overlong_policy": "drop", "tokenize_num_proc": 1, "train_data_path": str(path)}
    pairs = tokenize_preference_dataset(
        dataset.formatted_ds["train"],
        make_tokenizer(chat_template=None),
        dataset.task_spec,
        data_config,
        max_total_sequence_length=5,
    )
    assert [item["pair_id"] for item in pairs] == [0]
    assert pairs.counts == {
        "num_rows": 4,
        "num_pairs": 1,
        "num_dropped": 3,
        "num_identical": 2,
        "num_overlong": 1,
        "num_truncated": 0,
    }
    assert pairs.dropped_rows == {"chosen == rejected": [2, 4], "overlong": [3]}
    assert (
        f"dpo[train] ({path}): 1 pairs from 4 rows; dropped 2 with chosen == rejected (rows 2, "
        "4) and 1 longer than 5 tokens (rows 3)" in caplog.text
    )
