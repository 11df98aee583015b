"""The embedded default assets: they load offline, fit the DPO, SFT and RL data contracts, and
regenerate exactly."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

REPO_ROOT = Path(__file__).resolve().parents[2]
ASSETS = REPO_ROOT / "assets"
MODEL_DIR = ASSETS / "tiny_llama"
DATA_DIR = ASSETS / "tiny_prefs"
ROW_KEYS = {"prompt", "chosen_response", "rejected_response"}
MAX_FILE_BYTES = 1 << 20


@pytest.fixture(autouse=True)
def offline(monkeypatch: pytest.MonkeyPatch) -> None:
    # Any attempt to reach the hub fails instead of silently downloading.
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")


def read_rows(split: str) -> list[dict]:
    with open(DATA_DIR / f"{split}.jsonl", encoding="ascii") as f:
        return [json.loads(line) for line in f]


def asset_files(root: Path) -> dict[str, bytes]:
    """Relative path -> content of every file under root's tiny_llama/, tiny_prefs/, tiny_sft/,
    tiny_rl/."""
    files = {}
    for sub in ("tiny_llama", "tiny_prefs", "tiny_sft", "tiny_rl"):
        for path in sorted((root / sub).rglob("*")):
            if path.is_file():
                files[str(path.relative_to(root))] = path.read_bytes()
    return files


def test_model_builds_from_config_with_random_weights() -> None:
    config = AutoConfig.from_pretrained(MODEL_DIR)
    tokenizer = AutoTokenizer.from_pretrained(MODEL_DIR)
    assert config.model_type == "llama"
    assert config.vocab_size == len(tokenizer)
    assert (config.pad_token_id, config.bos_token_id, config.eos_token_id) == (
        tokenizer.pad_token_id,
        tokenizer.bos_token_id,
        tokenizer.eos_token_id,
    )

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    assert model.dtype == torch.float32
    messages = [{"role": "user", "content": "copy: cat dog"}]
    input_ids = tokenizer.apply_chat_template(messages, return_tensors="pt")["input_ids"]  # (1, T)
    logits = model(input_ids=input_ids).logits
    assert logits.shape == (1, input_ids.shape[1], config.vocab_size)


def test_chat_template_prompt_is_prefix_with_one_bos() -> None:
    tokenizer = AutoTokenizer.from_pretrained(MODEL_DIR)
    row = read_rows("val")[0]
    messages = [{"role": "user", "content": row["prompt"]}]
    prompt_text = tokenizer.apply_chat_template(
        messages, add_generation_prompt=True, tokenize=False
    )
    prompt_ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True)["input_ids"]
    full_ids = tokenizer(prompt_text + row["chosen_response"] + tokenizer.eos_token)["input_ids"]
    response_ids = tokenizer(row["chosen_response"], add_special_tokens=False)["input_ids"]

    assert prompt_text.endswith("<|assistant|> ")
    assert full_ids == prompt_ids + response_ids + [tokenizer.eos_token_id]
    assert full_ids.count(tokenizer.bos_token_id) == 1 and full_ids[0] == tokenizer.bos_token_id
    assert tokenizer.decode(response_ids) == row["chosen_response"]


def test_preference_rows_follow_the_copy_rule() -> None:
    tokenizer = AutoTokenizer.from_pretrained(MODEL_DIR)
    train, val = read_rows("train"), read_rows("val")
    assert (len(train), len(val)) == (1024, 128)
    assert not {r["prompt"] for r in train} & {r["prompt"] for r in val}
    for row in train + val:
        assert set(row) == ROW_KEYS
        instruction, words = row["prompt"].split(": ")
        prompt_words = set(words.split())
        chosen, rejected = row["chosen_response"].split(), row["rejected_response"].split()
        assert instruction == "copy" and chosen == words.split()
        assert len(rejected) == len(chosen) and not prompt_words & set(rejected)
        texts = [row["prompt"], row["chosen_response"], row["rejected_response"]]
        ids = tokenizer(texts, add_special_tokens=False)["input_ids"]
        assert tokenizer.unk_token_id not in sum(ids, [])


def test_regenerating_gives_identical_small_files(tmp_path: Path) -> None:
    script = REPO_ROOT / "scripts" / "make_tiny_assets.py"
    subprocess.run([sys.executable, str(script), "--out-dir", str(tmp_path)], check=True)
    committed, regenerated = asset_files(ASSETS), asset_files(tmp_path)
    assert len(committed) == 10 and sorted(committed) == sorted(regenerated)
    for name, content in committed.items():
        assert content == regenerated[name], f"{name} differs from a fresh generation"
        assert len(content) < MAX_FILE_BYTES, f"{name} is over 1 MB"


def test_sft_rows_follow_the_copy_rule() -> None:
    tokenizer = AutoTokenizer.from_pretrained(MODEL_DIR)
    train, val = (
        [json.loads(line) for line in (ASSETS / "tiny_sft" / f"{split}.jsonl").open()]
        for split in ("train", "val")
    )
    assert (len(train), len(val)) == (1024, 128)

    def user_turns(rows: list[dict]) -> set[str]:
        return {m["content"] for row in rows for m in row["messages"] if m["role"] == "user"}

    assert not user_turns(train) & user_turns(val)  # validation asks what training never did
    for row in train + val:
        messages = row["messages"]
        assert len(messages) in (2, 4)
        assert [m["role"] for m in messages] == ["user", "assistant"] * (len(messages) // 2)
        for user, assistant in zip(messages[0::2], messages[1::2], strict=True):
            instruction, words = user["content"].split(": ")
            assert instruction == "copy" and len(words.split()) == 4
            assert assistant["content"] == words
        nouns = " ".join(m["content"] for m in messages[1::2]).split()
        assert len(set(nouns)) == len(nouns)  # no noun twice in a conversation
        ids = tokenizer.apply_chat_template(messages)["input_ids"]
        assert tokenizer.unk_token_id not in ids and len(ids) <= 29


def test_rl_prompts_ask_for_the_first_of_a_pool_of_eight_words() -> None:
    tokenizer = AutoTokenizer.from_pretrained(MODEL_DIR)
    train, val = (
        [json.loads(line) for line in (ASSETS / "tiny_rl" / f"{split}.jsonl").open()]
        for split in ("train", "val")
    )
    assert (len(train), len(val)) == (1024, 128)
    assert not {r["prompt"] for r in train} & {r["prompt"] for r in val}
    pool: set[str] = set()
    for row in train + val:
        assert set(row) == {"prompt", "answer"}
        instruction, words = row["prompt"].split(": ")
        listed = words.split()
        assert instruction == "copy" and 2 <= len(listed) <= 4 and len(set(listed)) == len(listed)
        assert row["answer"] == listed[0]
        pool |= set(listed)
        ids = tokenizer(row["prompt"], add_special_tokens=False)["input_ids"]
        assert tokenizer.unk_token_id not in ids
    assert len(pool) == 8
    first_words = {row["answer"] for row in train}
    assert first_words == pool  # every word of the pool is the answer of some prompts
