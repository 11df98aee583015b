"""RL prompt data: the prompt and chat formats, metadata kept aligned from file to batch, bad rows
named by file and row, overlong prompts dropped and counted, the collate contract, groups of G,
and a loader that resumes with the next batch."""

import json
import logging
from pathlib import Path

import datasets
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from transformers import AutoTokenizer

from rl_toolkit.data import (
    DataError,
    PromptDataset,
    TokenizedPromptDataset,
    build_prompt_dataloader,
    prompt_collate_fn,
    repeat_prompts,
    tokenize_prompt_dataset,
)
from rl_toolkit.data import prompts as prompt_data
from rl_toolkit.utils.config import ConfigError
from tests.unit.test_data_tokenization import make_tokenizer

REPO = Path(__file__).resolve().parents[2]
TINY = AutoTokenizer.from_pretrained(REPO / "assets" / "tiny_llama")
TASK = {"task_name": "prompts"}


def user(text: str) -> dict:
    return {"role": "user", "content": text}


def data_config(tmp_path: Path, data_format: str = "prompt", **overrides) -> dict:
    config = {
        "format": data_format,
        "train_data_path": str(tmp_path / "train.jsonl"),
        "val_data_path": str(tmp_path / "val.jsonl"),
        "train_split": None,
        "val_split": None,
        "prompt_key": "prompt",
        "messages_key": "messages",
        "metadata_keys": ["answer"],
        "shuffle": True,
        "num_workers": 0,
        "tokenize_num_proc": 1,
    }
    return config | overrides


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def tokens(tokenizer, ids: torch.Tensor) -> str:
    return " ".join(tokenizer.convert_ids_to_tokens(ids.tolist()))


def tokenized(config: dict, split: str = "train", **kwargs) -> TokenizedPromptDataset:
    dataset = PromptDataset(config)
    return tokenize_prompt_dataset(
        dataset.formatted_ds[split], kwargs.pop("tokenizer", TINY), dataset.task_spec, config,
        max_prompt_length=kwargs.pop("max_prompt_length", 32),
    )  # fmt: skip


# ---------------------------------------------------------------------------------------------
# Formats


def test_a_prompt_string_is_the_users_turn_or_plain_text(tmp_path: Path) -> None:
    write_jsonl(tmp_path / "train.jsonl", [{"prompt": "copy: cat dog", "answer": "cat"}])
    write_jsonl(tmp_path / "val.jsonl", [{"prompt": "what is two", "answer": 2}])
    config = data_config(tmp_path)
    item = tokenized(config)[0]
    assert tokens(TINY, item["input_ids"]) == "<s> <|user|> copy : cat dog </s> <|assistant|>"
    assert (item["prompt"], item["metadata"], item["prompt_id"]) == (
        "copy: cat dog",
        {"answer": "cat"},
        0,
    )
    # Without a chat template the prompt is plain text with the tokenizer's own BOS.
    plain = tokenized(config, "validation", tokenizer=make_tokenizer(chat_template=None))[0]
    assert tokens(make_tokenizer(), plain["input_ids"]) == "<s> what is two"
    assert plain["metadata"] == {"answer": 2}  # the column's own type


def test_chat_prompts_keep_role_and_content_and_end_with_the_generation_prompt(
    tmp_path: Path,
) -> None:
    messages = [{"role": "system", "content": "copy", "name": "x"}, user("copy: owl")]
    write_jsonl(tmp_path / "train.jsonl", [{"dialog": messages, "answer": "owl", "level": 3}])
    write_jsonl(tmp_path / "val.jsonl", [{"dialog": messages, "answer": "owl", "level": 3}])
    config = data_config(tmp_path, "chat", messages_key="dialog", metadata_keys=["level", "answer"])
    item = tokenized(config)[0]
    assert tokens(TINY, item["input_ids"]) == (
        "<s> <|system|> copy </s> <|user|> copy : owl </s> <|assistant|>"
    )
    assert item["prompt"] == [{"role": "system", "content": "copy"}, user("copy: owl")]
    assert item["metadata"] == {"level": 3, "answer": "owl"}
    with pytest.raises(DataError, match=r"^prompts\[train\] .*: chat prompts need a chat template"):
        tokenized(config, tokenizer=make_tokenizer(chat_template=None))


def test_parquet_and_hub_sources(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    rows = [{"question": "copy: cat", "answer": "cat"}, {"question": "copy: egg", "answer": "egg"}]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "train.parquet")
    calls = []

    def fake_load_dataset(name: str, split: str) -> datasets.Dataset:
        calls.append((name, split))
        return datasets.Dataset.from_list(rows[1:])

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    config = data_config(
        tmp_path, train_data_path=str(tmp_path / "train.parquet"), val_data_path="org/math",
        val_split="test[:10%]", prompt_key="question",
    )  # fmt: skip
    dataset = PromptDataset(config)
    assert calls == [("org/math", "test[:10%]")]
    assert dataset.formatted_ds["train"].to_list() == [
        {"prompt": "copy: cat", "metadata": '{"answer": "cat"}'},
        {"prompt": "copy: egg", "metadata": '{"answer": "egg"}'},
    ]
    assert dataset.formatted_ds["validation"]["prompt"] == ["copy: egg"]
    assert dataset.task_spec == {"task_name": "prompts"}


@pytest.mark.parametrize(
    ("data_format", "row", "message"),
    [
        ("prompt", {"question": "q", "answer": 1}, "missing key 'prompt'; the row has keys"),
        ("prompt", {"prompt": [user("q")], "answer": 1}, "'prompt' must be a string"),
        ("prompt", {"prompt": "q"}, "missing metadata column (data.metadata_keys) 'answer'"),
        ("prompt", [1], "expected a JSON object, got list"),
        ("chat", {"messages": "hi", "answer": 1}, "'messages' must be a list of chat messages"),
        ("chat", {"messages": [], "answer": 1}, "'messages' is an empty message list"),
        ("chat", {"messages": [{"role": "user"}], "answer": 1}, "message 0 must be a dict"),
        (
            "chat",
            {"messages": [user("q"), {"role": "assistant", "content": "a"}], "answer": 1},
            "'messages' ends with an assistant message",
        ),
    ],
)
def test_bad_rows_are_one_line_naming_file_and_row(
    tmp_path: Path, data_format: str, row, message: str
) -> None:
    good = {"prompt": "q", "messages": [user("q")], "answer": 1}
    write_jsonl(tmp_path / "train.jsonl", [good, good, row])
    write_jsonl(tmp_path / "val.jsonl", [good])
    with pytest.raises(DataError) as error:
        PromptDataset(data_config(tmp_path, data_format))
    text = str(error.value)
    assert text.startswith(f"{tmp_path / 'train.jsonl'}, row 3: ") and message in text
    assert "\n" not in text and isinstance(error.value, ConfigError)


def test_file_errors_name_the_file(tmp_path: Path) -> None:
    (tmp_path / "train.jsonl").write_text('{"prompt": }\n')
    with pytest.raises(DataError, match=r"train\.jsonl, row 1: malformed JSON"):
        PromptDataset(data_config(tmp_path))
    with pytest.raises(DataError, match=r"nope\.jsonl: no such data file"):
        PromptDataset(data_config(tmp_path, train_data_path=str(tmp_path / "nope.jsonl")))


# ---------------------------------------------------------------------------------------------
# Length, batches, loader


def numbered_rows(num_rows: int, long_rows: tuple[int, ...] = ()) -> list[dict]:
    """Row n asks to copy one noun and has `answer` n; the 1-based `long_rows` list 16 nouns."""
    words = ["cat", "dog", "owl", "egg"]
    rows = []
    for number in range(1, num_rows + 1):
        listed = " ".join(words * 4) if number in long_rows else words[number % 4]
        rows.append({"prompt": f"copy: {listed}", "answer": number})
    return rows


def test_overlong_prompts_are_dropped_and_counted(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    write_jsonl(tmp_path / "train.jsonl", numbered_rows(8, long_rows=(2, 5)))
    write_jsonl(tmp_path / "val.jsonl", numbered_rows(1))
    caplog.set_level(logging.INFO, logger=prompt_data.__name__)
    # A short prompt is 7 tokens ("<s> <|user|> copy : w </s> <|assistant|>"), a long one 22.
    dataset = tokenized(data_config(tmp_path), max_prompt_length=21)
    assert dataset.counts == {"num_rows": 8, "num_prompts": 6, "num_dropped": 2, "num_tokens": 42}
    assert [item["prompt_id"] for item in dataset] == [0, 2, 3, 5, 6, 7]
    assert [item["metadata"]["answer"] for item in dataset] == [1, 3, 4, 6, 7, 8]
    assert caplog.messages[-1] == (
        f"prompts[train] ({tmp_path / 'train.jsonl'}): 6 prompts from 8 rows, 42 tokens; "
        "dropped 2 longer than 21 tokens (rows 2, 5)"
    )
    assert caplog.records[-1].levelno == logging.WARNING
    assert tokenized(data_config(tmp_path), max_prompt_length=22).counts["num_dropped"] == 0
    with pytest.raises(
        DataError, match=r"^prompts\[train\] .*: no prompt fits in the prompt budget of 6"
    ):
        tokenized(data_config(tmp_path), max_prompt_length=6)


def test_processes_give_the_in_process_items(tmp_path: Path, monkeypatch) -> None:
    from rl_toolkit.data import processes

    monkeypatch.setattr(processes, "MIN_ROWS_PER_PROCESS", 8)
    rows = datasets.Dataset.from_list(
        [{"prompt": row["prompt"], "metadata": json.dumps({"answer": row["answer"]})}
         for row in numbered_rows(32, long_rows=(3, 17))],
        split="train",
    )  # fmt: skip

    def tokenize(num_proc: int) -> TokenizedPromptDataset:
        return TokenizedPromptDataset(
            rows, TINY, data_format="prompt", max_prompt_length=21, source="train",
            num_proc=num_proc,
        )  # fmt: skip

    expected, got = tokenize(1), tokenize(2)
    assert got.counts == expected.counts and got.dropped_rows == [3, 17]
    for got_item, expected_item in zip(got, expected, strict=True):
        assert torch.equal(got_item["input_ids"], expected_item["input_ids"])
        assert {k: v for k, v in got_item.items() if k != "input_ids"} == {
            k: v for k, v in expected_item.items() if k != "input_ids"
        }


def test_collate_builds_the_right_padded_prompt_batch() -> None:
    items = [
        {"prompt_id": 4, "input_ids": torch.tensor([1, 5, 6, 2]), "prompt": "a",
         "metadata": {"answer": "x"}},
        {"prompt_id": 9, "input_ids": torch.tensor([1, 7]), "prompt": [user("b")],
         "metadata": {"answer": 3}},
    ]  # fmt: skip
    batch = prompt_collate_fn(items, pad_token_id=0)
    assert batch.group_size == 1 and batch.size == 2
    assert batch["input_ids"].tolist() == [[1, 5, 6, 2], [1, 7, 0, 0]]
    assert batch["input_lengths"].tolist() == [4, 2]
    assert batch["prompt_ids"].tolist() == [4, 9]
    assert batch["prompts"] == ["a", [user("b")]]
    assert batch["metadata"] == [{"answer": "x"}, {"answer": 3}]
    for key in ("input_ids", "input_lengths", "prompt_ids"):
        assert batch[key].dtype == torch.int64, key

    groups = repeat_prompts(batch, 3)
    assert groups.group_size == 3 and groups.size == 6
    assert groups["prompt_ids"].tolist() == [4, 4, 4, 9, 9, 9]
    assert groups["sample_idx"].tolist() == [0, 1, 2, 0, 1, 2]
    assert groups["sample_mask"].tolist() == [1.0] * 6
    assert groups["input_ids"].tolist() == [[1, 5, 6, 2]] * 3 + [[1, 7, 0, 0]] * 3
    assert groups["input_lengths"].tolist() == [4, 4, 4, 2, 2, 2]
    assert groups["prompts"] == ["a"] * 3 + [[user("b")]] * 3
    assert groups["metadata"] == [{"answer": "x"}] * 3 + [{"answer": 3}] * 3
    groups["metadata"][0]["answer"] = "changed"  # each row owns its metadata dict
    assert groups["metadata"][1:3] == [{"answer": "x"}] * 2 and batch["metadata"][0] == {
        "answer": "x"
    }


def test_loader_batches_keep_metadata_aligned_and_resume_with_the_next_batch(
    tmp_path: Path,
) -> None:
    write_jsonl(tmp_path / "train.jsonl", numbered_rows(20))
    write_jsonl(tmp_path / "val.jsonl", numbered_rows(1))
    dataset = tokenized(data_config(tmp_path))

    def loader(num_workers: int = 0):
        return build_prompt_dataloader(
            dataset, TINY, data_config(tmp_path, num_workers=num_workers), batch_size=3,
            shuffle=True, seed=7, drop_last=True,
        )  # fmt: skip

    straight = loader()
    epochs = [[batch["prompt_ids"].tolist() for batch in straight] for _ in range(2)]
    assert len(epochs[0]) == 6 and epochs[0] != epochs[1]  # 18 of 20 rows, reshuffled
    for batch in loader():
        # Row n (prompt id n - 1) has answer n and asks for the noun of n: all aligned.
        assert [m["answer"] for m in batch["metadata"]] == [i + 1 for i in batch["prompt_ids"]]
        assert batch["prompts"] == [f"copy: {['cat', 'dog', 'owl', 'egg'][(i + 1) % 4]}"
                                    for i in batch["prompt_ids"].tolist()]  # fmt: skip
    first = loader()
    batches = iter(first)
    seen = [next(batches)["prompt_ids"].tolist() for _ in range(4)]
    resumed = loader()
    resumed.load_state_dict(first.state_dict())
    rest = [batch["prompt_ids"].tolist() for batch in resumed]
    assert seen + rest == epochs[0]
    # The order does not depend on data.num_workers.
    assert [batch["prompt_ids"].tolist() for batch in loader(num_workers=2)] == epochs[0]
