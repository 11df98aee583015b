"""Tests for reading preference data: file formats, bad input errors, the dataset classes and
load_preference_dataset. Everything is written in the test; the hub is replaced by local rows."""

import json
import re
from pathlib import Path

import datasets
import pytest

from rl_toolkit.data import PreferenceDataError, TaskDataSpec, load_preference_dataset
from rl_toolkit.data.hf_datasets import (
    BinaryPreferenceDataset,
    DPODataset,
    HelpSteer3Dataset,
    format_helpsteer3,
)
from rl_toolkit.utils.config import ConfigError

GOOD = {"prompt": "2 + 2 =", "chosen_response": "4", "rejected_response": "5"}
CHAT = [{"role": "user", "content": "hi"}]


def write_jsonl(path: Path, rows: list) -> str:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return str(path)


def data_config(**overrides) -> dict:
    cfg = {
        "dataset_name": "DPODataset",
        "overlong_policy": "drop",
        "pad_to_multiple_of": 1,
        "shuffle": True,
        "num_workers": 0,
        "tokenize_num_proc": 1,
        "train_data_path": None,
        "val_data_path": None,
        "train_split": None,
        "val_split": None,
        "prompt_key": "prompt",
        "chosen_key": "chosen",
        "rejected_key": "rejected",
    }
    cfg.update(overrides)
    return cfg


def test_dpo_dataset_reads_strings_and_messages(tmp_path: Path) -> None:
    chat_row = {"prompt": CHAT, "chosen_response": "hello", "rejected_response": "go away"}
    train = write_jsonl(tmp_path / "train.jsonl", [GOOD, GOOD])
    val = write_jsonl(tmp_path / "val.jsonl", [chat_row])
    dataset = DPODataset(train, val)
    assert dataset.formatted_ds["train"].num_rows == 2
    assert dataset.formatted_ds["train"][0] == GOOD
    assert dataset.formatted_ds["validation"][0]["prompt"] == CHAT
    assert dataset.task_spec == TaskDataSpec(task_name="dpo")


# (file content, expected message): each names the file, the 1-based line and the problem.
BAD_JSONL = [
    ('{"prompt": "a", "chosen_response": "b"}\n', r"row 1: missing key 'rejected_response'"),
    (
        json.dumps(GOOD) + "\n" + '{"prompt": 3, "chosen_response": "b", "rejected_response": "c"}',
        r"row 2: 'prompt' must be a string or a list of chat messages, got int",
    ),
    (
        '{"prompt": "a", "chosen_response": "  ", "rejected_response": "c"}',
        r"row 1: 'chosen_response' is an empty response",
    ),
    (
        '{"prompt": "a", "chosen_response": [], "rejected_response": "c"}',
        r"row 1: 'chosen_response' is an empty message list",
    ),
    (
        '{"prompt": [{"role": "user"}], "chosen_response": "b", "rejected_response": "c"}',
        r"row 1: 'prompt' message 0 must be a dict with string 'role' and 'content'",
    ),
    (
        json.dumps(GOOD) + "\n\n" + '{"prompt": "a", "chosen_response": "b",\n',
        r"row 3: malformed JSON",
    ),
    ("[1, 2]\n", r"row 1: expected a JSON object, got list"),
    ("", r"the file holds no rows"),
    (
        json.dumps(GOOD) + "\n" + json.dumps({**GOOD, "prompt": CHAT}) + "\n",
        r"row 2: 'prompt' is a message list but the first row's is a string",
    ),
]


@pytest.mark.parametrize(("content", "message"), BAD_JSONL)
def test_bad_jsonl_names_file_and_row(tmp_path: Path, content: str, message: str) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_text(content)
    good = write_jsonl(tmp_path / "good.jsonl", [GOOD])
    with pytest.raises(PreferenceDataError, match=re.escape(str(bad)) + "(, |: )" + message):
        DPODataset(good, str(bad))


def test_missing_file_and_unknown_suffix(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="no such data file"):
        DPODataset(str(tmp_path / "nope.jsonl"), str(tmp_path / "nope.jsonl"))
    csv = tmp_path / "data.csv"
    csv.write_text("a,b\n")
    with pytest.raises(ValueError, match="unknown data file type '.csv'"):
        DPODataset(str(csv), str(csv))


def binary(train: str, val: str, **keys) -> BinaryPreferenceDataset:
    args = {"prompt_key": "prompt", "chosen_key": "chosen", "rejected_key": "rejected"}
    args.update(keys)
    return BinaryPreferenceDataset(train, val, train_split=None, val_split=None, **args)


def test_binary_preference_jsonl_and_parquet_with_custom_keys(tmp_path: Path) -> None:
    rows = [{"question": "q", "good": "yes", "bad": "no"}]
    jsonl = write_jsonl(tmp_path / "t.jsonl", rows)
    parquet = str(tmp_path / "v.parquet")
    datasets.Dataset.from_list(rows).to_parquet(parquet)
    dataset = binary(jsonl, parquet, prompt_key="question", chosen_key="good", rejected_key="bad")
    expected = {"prompt": "q", "chosen_response": "yes", "rejected_response": "no"}
    assert dataset.formatted_ds["train"][0] == expected
    assert dataset.formatted_ds["validation"][0] == expected


def test_parquet_bad_row_is_named(tmp_path: Path) -> None:
    parquet = str(tmp_path / "v.parquet")
    datasets.Dataset.from_list([{"prompt": "q", "chosen": "a", "rejected": ""}]).to_parquet(parquet)
    with pytest.raises(ValueError, match=r"v.parquet, row 1: 'rejected' is an empty response"):
        binary(parquet, parquet)


def test_binary_preference_implicit_prompt(tmp_path: Path) -> None:
    system = {"role": "system", "content": "be nice"}
    row = {
        "chosen": [system, *CHAT, {"role": "assistant", "content": "hello"}],
        "rejected": [system, *CHAT, {"role": "assistant", "content": "bye"}],
    }
    path = write_jsonl(tmp_path / "t.jsonl", [row])
    formatted = binary(path, path, prompt_key=None).formatted_ds["train"][0]
    assert formatted["prompt"] == [system, *CHAT]
    assert formatted["chosen_response"] == [{"role": "assistant", "content": "hello"}]
    assert formatted["rejected_response"] == [{"role": "assistant", "content": "bye"}]


@pytest.mark.parametrize(
    ("row", "message"),
    [
        ({"chosen": "a b", "rejected": "a c"}, "must be conversations"),
        ({"chosen": [{"role": "user", "content": "x"}], "rejected": CHAT}, "share no leading"),
        (
            {"chosen": CHAT, "rejected": CHAT + [{"role": "assistant", "content": "y"}]},
            "a response is empty",
        ),
    ],
)
def test_implicit_prompt_errors(tmp_path: Path, row: dict, message: str) -> None:
    path = write_jsonl(tmp_path / "t.jsonl", [row])
    with pytest.raises(ValueError, match="t.jsonl, row 1: .*" + message):
        binary(path, path, prompt_key=None)


def test_binary_preference_from_hub(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []

    def fake_load_dataset(name: str, split: str) -> datasets.Dataset:
        calls.append((name, split))
        rows = [{"prompt": "q", "chosen": "a", "rejected": "b" if split == "train" else ""}]
        return datasets.Dataset.from_list(rows)

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    with pytest.raises(ValueError, match=r"org/prefs\[test\], row 1: 'rejected' is an empty"):
        BinaryPreferenceDataset(
            "org/prefs", "org/prefs", prompt_key="prompt", chosen_key="chosen",
            rejected_key="rejected", train_split="train", val_split="test",
        )  # fmt: skip
    assert calls == [("org/prefs", "train"), ("org/prefs", "test")]
    with pytest.raises(ValueError, match="needs data.train_split / data.val_split"):
        binary("org/prefs", "org/prefs")


def helpsteer_row(preference: int) -> dict:
    return {
        "context": CHAT,
        "response1": "one",
        "response2": "two",
        "overall_preference": preference,
    }


def test_format_helpsteer3() -> None:
    assert format_helpsteer3(helpsteer_row(-2)) == {
        "prompt": CHAT,
        "chosen_response": "one",
        "rejected_response": "two",
    }
    assert format_helpsteer3(helpsteer_row(3))["chosen_response"] == "two"
    assert format_helpsteer3(helpsteer_row(0)) is None


def test_helpsteer3_dataset_drops_and_counts_ties(monkeypatch: pytest.MonkeyPatch) -> None:
    def fake_load_dataset(name: str, subset: str) -> datasets.DatasetDict:
        assert (name, subset) == ("nvidia/HelpSteer3", "preference")
        train = [helpsteer_row(p) for p in (-1, 0, 2, 0)]
        return datasets.DatasetDict(
            train=datasets.Dataset.from_list(train),
            validation=datasets.Dataset.from_list([helpsteer_row(1)]),
        )

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    dataset = HelpSteer3Dataset()
    assert dataset.num_ties == {"train": 2, "validation": 0}
    train = dataset.formatted_ds["train"]
    assert [row["chosen_response"] for row in train] == ["one", "two"]
    assert dataset.task_spec["task_name"] == "HelpSteer3"


class MyDataset:
    """A user dataset class, found by load_preference_dataset through its dotted path."""

    def __init__(self, data_config: dict) -> None:
        rows = [GOOD] if data_config["train_data_path"] != "bad" else [{**GOOD, "prompt": 1}]
        self.formatted_ds = {
            "train": datasets.Dataset.from_list(rows),
            "validation": datasets.Dataset.from_list([GOOD]),
        }
        self.task_spec = TaskDataSpec(task_name="mine")


def test_load_preference_dataset_by_name(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "t.jsonl", [GOOD])
    dpo = load_preference_dataset(data_config(train_data_path=path, val_data_path=path))
    assert isinstance(dpo, DPODataset)
    user = load_preference_dataset(data_config(dataset_name=f"{__name__}.MyDataset"))
    assert user.task_spec["task_name"] == "mine"


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"dataset_name": "NoSuch"}, r"unknown; expected one of \['BinaryPreferenceDataset'"),
        ({"dataset_name": "no_such_pkg.Data"}, "cannot import it as module.Class"),
        ({"dataset_name": f"{__name__}.MyDataset", "train_data_path": "bad"},
         r"MyDataset\[train\], row 1: 'prompt' must be a string"),
        ({"dataset_name": "DPODataset"}, "data.train_data_path must be set"),
        ({"dataset_name": "BinaryPreferenceDataset", "train_data_path": "a.jsonl",
          "val_data_path": "b.jsonl", "chosen_key": None}, "data.chosen_key must be set"),
    ],
)  # fmt: skip
def test_load_preference_dataset_errors(overrides: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        load_preference_dataset(data_config(**overrides))


def test_bytes_that_are_not_utf8_name_file_and_line(tmp_path: Path) -> None:
    good = json.dumps({"prompt": "hi", "chosen_response": "a", "rejected_response": "b"})
    bad = tmp_path / "t.jsonl"
    bad.write_bytes(f"{good}\n{good}\n".encode() + b'{"prompt": "caf\xe9"}\n')
    with pytest.raises(PreferenceDataError) as error:
        DPODataset(str(bad), str(bad))
    assert str(error.value) == (
        f"{bad}, row 3: byte 0xe9 at column 16 is not UTF-8; save the file as UTF-8"
    )


def test_unreadable_parquet_names_the_file(tmp_path: Path) -> None:
    bad = tmp_path / "t.parquet"
    bad.write_bytes(b"not parquet at all")
    with pytest.raises(PreferenceDataError, match=f"{re.escape(str(bad))}: not a readable parquet"):
        DPODataset(str(bad), str(bad))


def test_data_errors_are_config_errors() -> None:
    # A user's data mistake exits with status 2 and one line (run_cli_with_config).
    assert issubclass(PreferenceDataError, ConfigError)
