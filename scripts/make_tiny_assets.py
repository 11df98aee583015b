"""Generate the embedded default model config, tokenizer, preference data and SFT data.

The default configs (`configs/dpo_tiny.yaml`, `configs/sft_tiny.yaml`) train a randomly
initialised tiny Llama on small synthetic tasks so that `uv run examples/run_dpo.py` and
`uv run examples/run_sft.py` run offline on a CPU. Everything
here comes from a fixed seed and is written in a fixed key order, so running the script again
gives byte-identical files. No weights are shipped: the model is built from `config.json` with
random weights (`AutoModelForCausalLM.from_config` under the run's seed).

The task ("copy the words"): the prompt is `copy: ` and 3 to 6 distinct nouns; the chosen
response repeats them, the rejected response is as long but made only of nouns that are not in the
prompt. Every noun is chosen in some pairs and rejected in others, so no word is good or bad in
itself: the model has to read the prompt and learn to raise the probability of the words it
contains (attention from the response back to the prompt). From random weights a 2-layer,
0.14 M-parameter Llama learns this with plain DPO in a few dozen steps.

The SFT task is the same rule as a chat: a conversation of 1 or 2 turns, each user turn `copy: `
and 4 nouns, each assistant turn those nouns in the same order, and no noun twice in a
conversation. The loss is on the assistant turns only: the user's nouns are random and cannot
be learned, the assistant's are fully determined. Every list has 4 nouns, so the noun to write
is always the same distance back, which the 2-layer model finds in a few dozen steps: the
validation loss per assistant token falls from about 3.7 (ln 41) to about 0.01 in 128 steps of
32 conversations, over every seed tried. (With 3 to 6 nouns it needs an induction head, which
forms much later and after a seed-dependent plateau.)

The RL task (`env.name: tiny_first`, rl-design 3.8 task A) asks for the first word of the list:
a prompt `copy: w1 .. wk` of 2 to 4 distinct words from a pool of 8, its `answer` column `w1`
(the metadata the reward reads, and the reference answer of a warm start), the reward 1 when the
first generated word is w1. A pool of 8 keeps the reward dense enough (chance 1/8) for a few
dozen GRPO steps; the whole vocabulary (chance 1/32) is too sparse.

Usage:
    uv run python scripts/make_tiny_assets.py [--out-dir DIR]

writes DIR/tiny_llama/{config.json, tokenizer.json, tokenizer_config.json,
special_tokens_map.json}, DIR/tiny_prefs/{train.jsonl, val.jsonl},
DIR/tiny_sft/{train.jsonl, val.jsonl} and DIR/tiny_rl/{train.jsonl, val.jsonl}; DIR defaults to
the repository's `assets/`.
"""

import argparse
import json
import random
from pathlib import Path

from tokenizers import Tokenizer, models, pre_tokenizers

SEED = 20240601
NUM_TRAIN_PAIRS = 1024
NUM_VAL_PAIRS = 128
MIN_WORDS = 3
MAX_WORDS = 6
SFT_SEED = 20250101
NUM_TRAIN_CONVERSATIONS = 1024
NUM_VAL_CONVERSATIONS = 128
SFT_WORDS = 4  # nouns per turn
MAX_TURNS = 2  # 1 + 2 * (2 * SFT_WORDS + 6) = 29 tokens at most
RL_SEED = 20260101
NUM_TRAIN_PROMPTS = 1024
NUM_VAL_PROMPTS = 128
RL_MIN_WORDS = 2
RL_MAX_WORDS = 4  # 8 * 7 + 8 * 7 * 6 + 8 * 7 * 6 * 5 = 2072 distinct prompts

PAD, BOS, EOS, UNK = "<pad>", "<s>", "</s>", "<unk>"
ROLE_TOKENS = ("<|system|>", "<|user|>", "<|assistant|>")
# Distinct, easy-to-read nouns; the prompt draws its words from these.
CONTENT_WORDS = (
    "apple", "bird", "boat", "book", "cake", "cat", "cloud", "coin",
    "cup", "desk", "dog", "door", "drum", "egg", "fish", "flag",
    "frog", "hat", "key", "kite", "lamp", "leaf", "moon", "nest",
    "owl", "pen", "ring", "rock", "rose", "ship", "star", "tree",
)  # fmt: skip

# The 8 words of the RL task's prompts: every 4th noun, so they spread over the vocabulary.
RL_WORDS = ("apple", "cake", "cup", "drum", "frog", "kite", "nest", "ring")

# Renders each turn as `<|role|> content </s>`; the generation prompt is the assistant header, so
# the prompt's tokens are a prefix of prompt + response tokens. BOS comes from here only (the
# tokenizer itself adds no special tokens).
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|> ' + message['content'] + ' ' + eos_token + ' ' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|> ' }}{% endif %}"
)

# A 2-layer Llama of 0.14 M parameters: big enough to learn to copy by attention, small
# enough that a DPO step on 32 pairs (64 sequences of 19 tokens) takes about 20 ms on one CPU
# thread.
MODEL_CONFIG = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "hidden_size": 64,
    "intermediate_size": 256,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 4,
    "head_dim": 16,
    "hidden_act": "silu",
    "max_position_embeddings": 64,
    "rms_norm_eps": 1e-06,
    "rope_theta": 10000.0,
    "initializer_range": 0.02,
    "attention_bias": False,
    "mlp_bias": False,
    "tie_word_embeddings": False,
    "use_cache": True,
    "dtype": "float32",
}


def build_vocab() -> dict[str, int]:
    """Token-to-id map: special tokens first (pad is id 0), then punctuation and words."""
    tokens = [PAD, BOS, EOS, UNK, *ROLE_TOKENS, ":", "copy", *CONTENT_WORDS]
    return {token: i for i, token in enumerate(tokens)}


def build_tokenizer() -> Tokenizer:
    """Word-level tokenizer: split on whitespace and punctuation, unknown words map to `<unk>`."""
    vocab = build_vocab()
    tokenizer = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    # Special tokens are matched before pre-tokenization, so `<|user|>` stays one token.
    tokenizer.add_special_tokens([PAD, BOS, EOS, UNK, *ROLE_TOKENS])
    return tokenizer


def tokenizer_config() -> dict:
    """The `tokenizer_config.json` that `AutoTokenizer.from_pretrained` reads."""
    return {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": BOS,
        "eos_token": EOS,
        "pad_token": PAD,
        "unk_token": UNK,
        "additional_special_tokens": list(ROLE_TOKENS),
        "add_bos_token": False,
        "add_eos_token": False,
        "model_max_length": MODEL_CONFIG["max_position_embeddings"],
        "padding_side": "right",
        "clean_up_tokenization_spaces": False,
        "chat_template": CHAT_TEMPLATE,
    }


def special_tokens_map() -> dict:
    """The legacy `special_tokens_map.json`, for tools that still read it."""
    return {
        "bos_token": BOS,
        "eos_token": EOS,
        "pad_token": PAD,
        "unk_token": UNK,
        "additional_special_tokens": list(ROLE_TOKENS),
    }


def off_prompt_response(rng: random.Random, words: list[str]) -> list[str]:
    """A response as long as the prompt's list but made only of words that are not in it."""
    unused = [w for w in CONTENT_WORDS if w not in words]
    return rng.sample(unused, len(words))


def make_pair(rng: random.Random) -> dict[str, str]:
    """One preference row {"prompt", "chosen_response", "rejected_response"}."""
    words = rng.sample(CONTENT_WORDS, rng.randint(MIN_WORDS, MAX_WORDS))
    return {
        "prompt": f"copy: {' '.join(words)}",
        "chosen_response": " ".join(words),
        "rejected_response": " ".join(off_prompt_response(rng, words)),
    }


def make_splits(rng: random.Random) -> tuple[list[dict], list[dict]]:
    """Train and validation rows whose prompts are all distinct (validation prompts are unseen)."""
    rows: list[dict] = []
    seen: set[str] = set()
    while len(rows) < NUM_TRAIN_PAIRS + NUM_VAL_PAIRS:
        row = make_pair(rng)
        if row["prompt"] not in seen:
            seen.add(row["prompt"])
            rows.append(row)
    return rows[:NUM_TRAIN_PAIRS], rows[NUM_TRAIN_PAIRS:]


def make_conversation(rng: random.Random) -> dict[str, list[dict[str, str]]]:
    """One SFT row {"messages": [...]}: 1 to MAX_TURNS copy turns, no noun used twice."""
    num_turns = rng.randint(1, MAX_TURNS)
    words = rng.sample(CONTENT_WORDS, num_turns * SFT_WORDS)
    messages = []
    for start in range(0, len(words), SFT_WORDS):
        turn = words[start : start + SFT_WORDS]
        messages.append({"role": "user", "content": f"copy: {' '.join(turn)}"})
        messages.append({"role": "assistant", "content": " ".join(turn)})
    return {"messages": messages}


def make_sft_splits(rng: random.Random) -> tuple[list[dict], list[dict]]:
    """Train and validation conversations; no validation user turn occurs in the training set."""
    train: list[dict] = []
    seen: set[str] = set()
    while len(train) < NUM_TRAIN_CONVERSATIONS:
        row = make_conversation(rng)
        turns = {m["content"] for m in row["messages"] if m["role"] == "user"}
        if not turns & seen:
            seen |= turns
            train.append(row)
    val: list[dict] = []
    while len(val) < NUM_VAL_CONVERSATIONS:
        row = make_conversation(rng)
        turns = {m["content"] for m in row["messages"] if m["role"] == "user"}
        if not turns & seen:
            seen |= turns
            val.append(row)
    return train, val


def make_rl_prompt(rng: random.Random) -> dict[str, str]:
    """One RL row {"prompt": "copy: w1 .. wk", "answer": "w1"} (the task tiny_first)."""
    words = rng.sample(RL_WORDS, rng.randint(RL_MIN_WORDS, RL_MAX_WORDS))
    return {"prompt": f"copy: {' '.join(words)}", "answer": words[0]}


def make_rl_splits(rng: random.Random) -> tuple[list[dict], list[dict]]:
    """Train and validation prompts, all distinct (validation prompts are unseen)."""
    rows: list[dict] = []
    seen: set[str] = set()
    while len(rows) < NUM_TRAIN_PROMPTS + NUM_VAL_PROMPTS:
        row = make_rl_prompt(rng)
        if row["prompt"] not in seen:
            seen.add(row["prompt"])
            rows.append(row)
    return rows[:NUM_TRAIN_PROMPTS], rows[NUM_TRAIN_PROMPTS:]


def write_json(path: Path, obj: dict) -> None:
    """Write `obj` as indented JSON with sorted keys (stable across runs)."""
    path.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n", encoding="ascii")


def write_jsonl(path: Path, rows: list[dict]) -> None:
    """Write one JSON object per line."""
    # Key order is the insertion order of make_pair (prompt, chosen, rejected): fixed, and readable.
    lines = [json.dumps(row) + "\n" for row in rows]
    path.write_text("".join(lines), encoding="ascii")


def write_assets(out_dir: Path) -> None:
    """Write the model, tokenizer and data files (preference and SFT) under `out_dir`."""
    model_dir = out_dir / "tiny_llama"
    data_dir = out_dir / "tiny_prefs"
    model_dir.mkdir(parents=True, exist_ok=True)
    data_dir.mkdir(parents=True, exist_ok=True)

    vocab = build_vocab()
    token_ids = {
        "vocab_size": len(vocab),
        "bos_token_id": vocab[BOS],
        "eos_token_id": vocab[EOS],
        "pad_token_id": vocab[PAD],
    }
    write_json(model_dir / "config.json", {**MODEL_CONFIG, **token_ids})
    (model_dir / "tokenizer.json").write_text(
        build_tokenizer().to_str(pretty=True) + "\n", encoding="ascii"
    )
    write_json(model_dir / "tokenizer_config.json", tokenizer_config())
    write_json(model_dir / "special_tokens_map.json", special_tokens_map())

    train, val = make_splits(random.Random(SEED))
    write_jsonl(data_dir / "train.jsonl", train)
    write_jsonl(data_dir / "val.jsonl", val)

    sft_dir = out_dir / "tiny_sft"
    sft_dir.mkdir(parents=True, exist_ok=True)
    train, val = make_sft_splits(random.Random(SFT_SEED))
    write_jsonl(sft_dir / "train.jsonl", train)
    write_jsonl(sft_dir / "val.jsonl", val)

    rl_dir = out_dir / "tiny_rl"
    rl_dir.mkdir(parents=True, exist_ok=True)
    train, val = make_rl_splits(random.Random(RL_SEED))
    write_jsonl(rl_dir / "train.jsonl", train)
    write_jsonl(rl_dir / "val.jsonl", val)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    default_out = Path(__file__).resolve().parent.parent / "assets"
    parser.add_argument("--out-dir", type=Path, default=default_out, help="where to write")
    args = parser.parse_args()
    write_assets(args.out_dir)
    written = ", ".join(
        str(args.out_dir / name) for name in ("tiny_llama", "tiny_prefs", "tiny_sft", "tiny_rl")
    )
    print(f"wrote {written}")


if __name__ == "__main__":
    main()
