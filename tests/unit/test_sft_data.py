"""SFT data: the three formats and their loss masks (checked against hand-derived masks), bad rows
named by file and row, the length policy, hub and parquet sources, and the collate contract."""

import json
import logging
from pathlib import Path
from types import SimpleNamespace

import datasets
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from rl_toolkit.data import DataError, build_sft_dataloader, pad_batch_to, processes, sft_collate_fn
from rl_toolkit.data.sft import (
    SFTDataset,
    SFTSequenceDataset,
    tokenize_sft_dataset,
    tokenize_sft_row,
)
from rl_toolkit.data.sft import dataset as sft_dataset
from rl_toolkit.utils.config import ConfigError
from tests.unit.test_data_tokenization import make_tokenizer

REPO = Path(__file__).resolve().parents[2]
TINY = AutoTokenizer.from_pretrained(REPO / "assets" / "tiny_llama")


def user(text: str) -> dict:
    return {"role": "user", "content": text}


def assistant(text: str) -> dict:
    return {"role": "assistant", "content": text}


def learned(tokenizer, ids: list[int], mask: list[bool]) -> list[tuple[str, int]]:
    """(token, 1 if learned) for every token: the mask written out, to compare by eye."""
    tokens = tokenizer.convert_ids_to_tokens(ids)
    return [(token, int(bit)) for token, bit in zip(tokens, mask, strict=True)]


def marked(text: str) -> list[tuple[str, int]]:
    """The hand-derived mask: "a [b c]" -> [("a", 0), ("b", 1), ("c", 1)]."""
    out, inside = [], False
    for token in text.split():
        start, end = token.startswith("["), token.endswith("]")
        inside |= start
        out.append((token.strip("[]") or token, int(inside)))
        inside &= not end
    return out


def chatml_tokenizer() -> PreTrainedTokenizerFast:
    """A word-level tokenizer with ChatML's template: turns end with `<|im_end|>\\n`."""
    special = ["<pad>", "<|im_start|>", "<|im_end|>", "\n"]
    words = ["system", "user", "assistant", "hi", "a", "b", "c", "be", "nice", "old"]
    vocab = {token: index for index, token in enumerate(special + words)}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.add_special_tokens([AddedToken(token, normalized=False) for token in special])
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", eos_token="<|im_end|>"
    )
    tokenizer.chat_template = (
        "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + "
        "'<|im_end|>\n' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
    )
    return tokenizer


# ---------------------------------------------------------------------------------------------
# Loss masks


def test_chat_mask_covers_every_assistant_turn_and_nothing_else() -> None:
    messages = [
        {"role": "system", "content": "copy"},
        user("copy: cat dog"),
        assistant("cat dog"),
        user("copy: owl"),
        assistant("owl"),
    ]
    ids, mask = tokenize_sft_row(TINY, {"messages": messages}, "chat", "row 1")
    # The header <|assistant|> is the generation prompt, not learned; each turn's </s> is.
    assert learned(TINY, ids, mask) == marked(
        "<s> <|system|> copy </s> <|user|> copy : cat dog </s> <|assistant|> [cat dog </s>] "
        "<|user|> copy : owl </s> <|assistant|> [owl </s>]"
    )


def test_chatml_mask_includes_the_end_of_turn_line() -> None:
    tokenizer = chatml_tokenizer()
    messages = [
        {"role": "system", "content": "be nice"},
        user("hi"),
        assistant("a b"),
        user("c"),
        assistant("a"),
        user("hi"),  # a trailing user turn: not learned
    ]
    ids, mask = tokenize_sft_row(tokenizer, {"messages": messages}, "chat", "row 1")
    expected = marked(
        "<|im_start|> system NL be nice <|im_end|> NL <|im_start|> user NL hi <|im_end|> NL "
        "<|im_start|> assistant NL [a b <|im_end|> NL] <|im_start|> user NL c <|im_end|> NL "
        "<|im_start|> assistant NL [a <|im_end|> NL] <|im_start|> user NL hi <|im_end|> NL"
    )
    assert learned(tokenizer, ids, mask) == [(t.replace("NL", "\n"), b) for t, b in expected]


def test_chat_mask_with_a_template_that_adds_an_end_token() -> None:
    # "<|role|> content <|end|>": the turn ends with <|end|>; nothing (no EOS) is appended.
    tokenizer = make_tokenizer()
    messages = [user("what is two"), assistant("four"), user("hi"), assistant("bye")]
    ids, mask = tokenize_sft_row(tokenizer, {"messages": messages}, "chat", "row 1")
    assert learned(tokenizer, ids, mask) == marked(
        "<s> <|user|> what is two <|end|> <|assistant|> [four <|end|>] "
        "<|user|> hi <|end|> <|assistant|> [bye <|end|>]"
    )


def test_a_template_that_rewrites_earlier_turns_is_refused() -> None:
    # Like Qwen3's, which drops the reasoning of earlier assistant turns: a prefix rendered alone
    # is not a prefix of the whole conversation, so the turns cannot be told apart.
    tokenizer = chatml_tokenizer()
    tokenizer.chat_template = tokenizer.chat_template.replace(
        "m['content']", "('old' if m['role'] == 'assistant' and not loop.last else m['content'])"
    )
    messages = [user("hi"), assistant("a"), user("c"), assistant("b")]
    with pytest.raises(DataError, match=r"^f\.jsonl, row 3: the chat template renders the first 2"):
        tokenize_sft_row(tokenizer, {"messages": messages}, "chat", "f.jsonl, row 3")


def test_chat_rows_need_a_chat_template() -> None:
    tokenizer = make_tokenizer(chat_template=None)
    with pytest.raises(DataError, match="row 2: chat rows need a chat template"):
        tokenize_sft_row(tokenizer, {"messages": [user("hi"), assistant("a")]}, "chat", "row 2")


def test_prompt_completion_masks() -> None:
    row = {"prompt": "copy: cat", "completion": "cat"}
    ids, mask = tokenize_sft_row(TINY, row, "prompt_completion", "row 1")
    assert learned(TINY, ids, mask) == marked(
        "<s> <|user|> copy : cat </s> <|assistant|> [cat </s>]"
    )
    # Conversational prompt and completion (TRL's layout): the same tokens.
    row = {"prompt": [user("copy: cat")], "completion": [assistant("cat")]}
    assert tokenize_sft_row(TINY, row, "prompt_completion", "row 1") == (ids, mask)
    # Without a template: the prompt with the tokenizer's BOS, the completion and EOS learned.
    plain = make_tokenizer(chat_template=None)
    ids, mask = tokenize_sft_row(
        plain, {"prompt": "what is", "completion": "two"}, "prompt_completion", "r"
    )
    assert learned(plain, ids, mask) == marked("<s> what is [two </s>]")


def test_text_is_learned_from_the_second_token_with_one_eos() -> None:
    plain = make_tokenizer(chat_template=None)
    ids, mask = tokenize_sft_row(plain, {"text": "hi a b"}, "text", "row 1")
    assert learned(plain, ids, mask) == marked("<s> [hi a b </s>]")
    # A text already ending with EOS (or a tokenizer appending it) gets no second one.
    ids, _ = tokenize_sft_row(plain, {"text": "hi </s>"}, "text", "row 1")
    assert plain.convert_ids_to_tokens(ids) == ["<s>", "hi", "</s>"]
    ids, mask = tokenize_sft_row(TINY, {"text": "copy: cat"}, "text", "row 1")  # no BOS
    assert learned(TINY, ids, mask) == marked("copy [: cat </s>]")


# ---------------------------------------------------------------------------------------------
# Rows from files and the hub


def data_config(tmp_path: Path, data_format: str = "chat", **overrides) -> dict:
    config = {
        "format": data_format,
        "train_data_path": str(tmp_path / "train.jsonl"),
        "val_data_path": str(tmp_path / "val.jsonl"),
        "train_split": None,
        "val_split": None,
        "messages_key": "messages",
        "prompt_key": "prompt",
        "completion_key": "completion",
        "text_key": "text",
        "overlong_policy": "drop",
        "pad_to_multiple_of": 8,
        "shuffle": True,
        "num_workers": 0,
        "tokenize_num_proc": 1,
    }
    return config | overrides


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


GOOD = {"messages": [user("copy: cat"), assistant("cat")]}


@pytest.mark.parametrize(
    ("data_format", "row", "message"),
    [
        ("chat", {"msgs": []}, "missing key 'messages'; the row has keys ['msgs']"),
        ("chat", {"messages": "hi"}, "'messages' must be a list of chat messages, got str"),
        ("chat", {"messages": []}, "'messages' is an empty message list"),
        ("chat", {"messages": [{"role": "user"}]}, "'messages' message 0 must be a dict"),
        ("chat", {"messages": [user("hi")]}, "'messages' has no assistant message"),
        ("chat", {"messages": [assistant("a"), user("b")]}, "opens with an assistant message"),
        ("prompt_completion", {"prompt": "q", "completion": " "}, "'completion' is an empty"),
        ("prompt_completion", {"prompt": 3, "completion": "a"}, "'prompt' must be a string or"),
        ("text", {"text": ["a"]}, "'text' must be a string, got list"),
        ("text", {"text": ""}, "'text' is an empty response"),
        ("text", [1, 2], "expected a JSON object, got list"),
    ],
)
def test_bad_rows_are_one_line_naming_file_and_row(
    tmp_path: Path, data_format: str, row, message: str
) -> None:
    good = {"chat": GOOD, "prompt_completion": {"prompt": "q", "completion": "a"}}.get(
        data_format, {"text": "a"}
    )
    write_jsonl(tmp_path / "train.jsonl", [good, good, row])
    write_jsonl(tmp_path / "val.jsonl", [good])
    with pytest.raises(DataError) as error:
        SFTDataset(data_config(tmp_path, data_format))
    text = str(error.value)
    assert text.startswith(f"{tmp_path / 'train.jsonl'}, row 3: ") and message in text
    assert "\n" not in text and isinstance(error.value, ConfigError)


def test_file_errors_name_the_file(tmp_path: Path) -> None:
    (tmp_path / "train.jsonl").write_text('{"messages": [}\n')
    with pytest.raises(DataError, match=r"train\.jsonl, row 1: malformed JSON"):
        SFTDataset(data_config(tmp_path))
    with pytest.raises(DataError, match=r"nope\.jsonl: no such data file"):
        SFTDataset(data_config(tmp_path, train_data_path=str(tmp_path / "nope.jsonl")))


def test_column_names_are_configurable_and_parquet_is_read(tmp_path: Path) -> None:
    rows = [{"q": "copy: cat", "a": "cat"}, {"q": [user("copy: owl")], "a": "owl"}]
    pq.write_table(pa.Table.from_pylist([rows[0]]), tmp_path / "train.parquet")
    write_jsonl(tmp_path / "val.jsonl", rows)
    config = data_config(
        tmp_path,
        "prompt_completion",
        train_data_path=str(tmp_path / "train.parquet"),
        prompt_key="q",
        completion_key="a",
    )
    with pytest.raises(DataError, match=r"val\.jsonl, row 2: 'prompt' is a message list but"):
        SFTDataset(config)  # Arrow holds one kind per column
    write_jsonl(tmp_path / "val.jsonl", rows[:1])
    dataset = SFTDataset(config)
    assert dataset.formatted_ds["train"].to_list() == [{"prompt": "copy: cat", "completion": "cat"}]
    assert dataset.task_spec == {"task_name": "sft"}


def test_hub_datasets_are_read_with_their_split(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []

    def fake_load_dataset(name: str, split: str) -> datasets.Dataset:
        calls.append((name, split))
        return datasets.Dataset.from_list([{"dialog": GOOD["messages"], "other": 1}])

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    config = data_config(
        Path("."),
        train_data_path="org/chats",
        val_data_path="org/chats",
        train_split="train_sft",
        val_split="test_sft[:10%]",
        messages_key="dialog",
    )
    dataset = SFTDataset(config)
    assert calls == [("org/chats", "train_sft"), ("org/chats", "test_sft[:10%]")]
    assert dataset.formatted_ds["validation"].to_list() == [{"messages": GOOD["messages"]}]
    with pytest.raises(ConfigError, match="needs data.train_split / data.val_split"):
        SFTDataset(config | {"train_split": None})


# ---------------------------------------------------------------------------------------------
# Tokenised splits: the length policy, processes


def split(rows: list[dict], name: str = "train") -> datasets.Dataset:
    return datasets.Dataset.from_list(rows, split=name)


def chats(num_rows: int, long_rows: tuple[int, ...] = ()) -> list[dict]:
    """Conversations of one turn; the 1-based `long_rows` have a long first user turn."""
    words = ["cat", "dog", "owl", "egg"]
    rows = []
    for number in range(1, num_rows + 1):
        prompt = " ".join(words * 4) if number in long_rows else words[number % 4]
        rows.append({"messages": [user(f"copy: {prompt}"), assistant(words[number % 4])]})
    return rows


def test_overlong_rows_are_dropped_or_truncated_and_counted(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # A long row has 24 tokens: "<s> <|user|> copy : " + 16 nouns + "</s> <|assistant|> w </s>".
    rows = chats(8, long_rows=(2, 5))
    caplog.set_level(logging.INFO, logger=sft_dataset.__name__)
    config = data_config(tmp_path, overlong_policy="drop")
    dropped = tokenize_sft_dataset(
        split(rows), TINY, {"task_name": "sft"}, config, max_total_sequence_length=20
    )
    # A kept row: "<s> <|user|> copy : w </s> <|assistant|> [w </s>]", 9 tokens, 2 learned.
    assert dropped.counts == {
        "num_rows": 8, "num_sequences": 6, "num_dropped": 2, "num_truncated": 0,
        "num_tokens": 54, "num_loss_tokens": 12,
    }  # fmt: skip
    assert [item["sample_id"] for item in dropped] == [0, 2, 3, 5, 6, 7]
    assert caplog.messages[-1] == (
        f"sft[train] ({tmp_path / 'train.jsonl'}): 6 sequences from 8 rows, 54 tokens of which "
        "12 are learned; dropped 2 longer than 20 tokens (rows 2, 5); 0 truncated "
        "(data.overlong_policy=drop)"
    )
    # Truncating keeps the first 20 tokens: the long rows lose their answer, so they are dropped
    # too; at 23 tokens they keep their answer's noun and lose the final </s>.
    config = data_config(tmp_path, overlong_policy="truncate")
    args = (split(rows), TINY, {"task_name": "sft"}, config)
    assert tokenize_sft_dataset(*args, max_total_sequence_length=20).counts["num_dropped"] == 2
    kept = tokenize_sft_dataset(*args, max_total_sequence_length=23)
    assert (kept.counts["num_dropped"], kept.counts["num_truncated"]) == (0, 2)
    assert learned(TINY, kept[1]["input_ids"].tolist(), kept[1]["token_mask"].tolist())[-3:] == [
        ("</s>", 0), ("<|assistant|>", 0), ("owl", 1),
    ]  # fmt: skip
    with pytest.raises(DataError, match=r"^sft\[train\].*: no sequence fits in 5 tokens"):
        tokenize_sft_dataset(*args, max_total_sequence_length=5)


def test_processes_give_the_in_process_items_and_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(processes, "MIN_ROWS_PER_PROCESS", 8)
    calls = []
    original = processes._tokenize_in_processes

    def spy(rows, num_proc, kwargs, **features):
        calls.append(num_proc)
        return original(rows, num_proc, kwargs, **features)

    monkeypatch.setattr(processes, "_tokenize_in_processes", spy)
    rows = chats(32, long_rows=(3, 17))

    def tokenize(rows: list[dict], num_proc: int) -> SFTSequenceDataset:
        return SFTSequenceDataset(
            split(rows), TINY, data_format="chat", max_total_sequence_length=20,
            overlong_policy="drop", source="train", num_proc=num_proc,
        )  # fmt: skip

    expected, got = tokenize(rows, 1), tokenize(rows, 2)
    assert calls == [2]  # the second split only
    assert got.counts == expected.counts and got.dropped_rows == [3, 17]
    for got_item, expected_item in zip(got, expected, strict=True):
        assert got_item["sample_id"] == expected_item["sample_id"]
        assert torch.equal(got_item["input_ids"], expected_item["input_ids"])
        assert torch.equal(got_item["token_mask"], expected_item["token_mask"])
    # A template that rewrites an earlier turn "copy: moon" breaks rows 20 and 30 (both in the
    # second process's shard): row 20 is named either way.
    bad = [dict(row) for row in rows]
    for number in (20, 30):
        bad[number - 1] = {"messages": [user("copy: moon"), assistant("moon")] * 2}
    tokenizer = AutoTokenizer.from_pretrained(REPO / "assets" / "tiny_llama")
    tokenizer.chat_template = tokenizer.chat_template.replace(
        "message['content']",
        "(message['content'] if loop.last or message['content'] != 'copy: moon' else 'cat')",
    )
    for num_proc in (1, 2):
        with pytest.raises(DataError, match=r"^train, row 20: the chat template renders"):
            SFTSequenceDataset(
                split(bad), tokenizer, data_format="chat", max_total_sequence_length=20,
                overlong_policy="drop", source="train", num_proc=num_proc,
            )  # fmt: skip


# ---------------------------------------------------------------------------------------------
# The batch


def test_collate_builds_the_sft_batch() -> None:
    items = [
        {"sample_id": 4, "input_ids": torch.tensor([1, 5, 6, 2]),
         "token_mask": torch.tensor([0.0, 0.0, 1.0, 1.0])},
        {"sample_id": 9, "input_ids": torch.tensor([1, 7]), "token_mask": torch.tensor([0.0, 1.0])},
    ]  # fmt: skip
    batch = sft_collate_fn(items, pad_token_id=0, pad_to_multiple_of=8)
    assert batch.group_size == 1 and batch.size == 2
    assert batch["input_ids"].tolist() == [[1, 5, 6, 2, 0, 0, 0, 0], [1, 7, 0, 0, 0, 0, 0, 0]]
    assert batch["input_lengths"].tolist() == [4, 2]
    assert batch["token_mask"].tolist() == [[0, 0, 1, 1, 0, 0, 0, 0], [0, 1, 0, 0, 0, 0, 0, 0]]
    assert batch["sample_mask"].tolist() == [1.0, 1.0]
    assert batch["sample_ids"].tolist() == [4, 9]
    for key, dtype in (
        ("input_ids", torch.int64), ("input_lengths", torch.int64), ("token_mask", torch.float32),
        ("sample_mask", torch.float32), ("sample_ids", torch.int64),
    ):  # fmt: skip
        assert batch[key].dtype == dtype, key

    padded = pad_batch_to(batch, 5)
    assert padded.size == 5 and padded.group_size == 1
    assert padded["sample_mask"].tolist() == [1, 1, 0, 0, 0]
    assert padded["sample_ids"].tolist() == [4, 9, -1, -1, -1]
    assert padded["token_mask"][2:].sum() == 0
    assert padded["input_ids"][2:].tolist() == [batch["input_ids"][0].tolist()] * 3


def test_the_loader_resumes_with_the_next_batch(tmp_path: Path) -> None:
    dataset = tokenize_sft_dataset(
        split(chats(20)), TINY, {"task_name": "sft"}, data_config(tmp_path),
        max_total_sequence_length=64,
    )  # fmt: skip

    def loader(num_workers: int = 0):
        return build_sft_dataloader(
            dataset, SimpleNamespace(pad_token_id=TINY.pad_token_id),
            data_config(tmp_path, num_workers=num_workers), batch_size=3, shuffle=True, seed=7,
            drop_last=True,
        )  # fmt: skip

    straight = loader()
    epochs = [[batch["sample_ids"].tolist() for batch in straight] for _ in range(2)]
    assert len(epochs[0]) == 6 and epochs[0] != epochs[1]  # 18 of 20 rows, reshuffled
    first = loader()
    batches = iter(first)
    seen = [next(batches)["sample_ids"].tolist() for _ in range(4)]
    resumed = loader()
    resumed.load_state_dict(first.state_dict())
    rest = [batch["sample_ids"].tolist() for batch in resumed]
    assert seen + rest == epochs[0]
    # The order does not depend on data.num_workers.
    assert [batch["sample_ids"].tolist() for batch in loader(num_workers=2)] == epochs[0]
