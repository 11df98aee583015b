"""Generate the embedded default model config, tokenizer and preference data.

The default config (`configs/dpo_tiny.yaml`) trains a randomly initialised tiny Llama on a small
synthetic preference task so that `uv run examples/run_dpo.py` runs offline on a CPU. Everything
here comes from a fixed seed and is written in a fixed key order, so running the script again
gives byte-identical files. No weights are shipped: the model is built from `config.json` with
random weights (`AutoModelForCausalLM.from_config` under the run's seed).

The task ("copy the words"): the prompt is `copy: ` and 3 to 6 distinct nouns; the chosen
response repeats them, the rejected response is as long but made only of nouns that are not in the
prompt. Every noun is chosen in some pairs and rejected in others, so no word is good or bad in
itself: the model has to read the prompt and learn to raise the probability of the words it
contains (attention from the response back to the prompt). From random weights a 2-layer,
0.14 M-parameter Llama learns this with plain DPO in a few dozen steps.

Usage:
    uv run python scripts/make_tiny_assets.py [--out-dir DIR]

writes DIR/tiny_llama/{config.json, tokenizer.json, tokenizer_config.json,
special_tokens_map.json} and DIR/tiny_prefs/{train.jsonl, val.jsonl}; DIR defaults to the
repository's `assets/`.
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

PAD, BOS, EOS, UNK = "<pad>", "<s>", "</s>", "<unk>"
ROLE_TOKENS = ("<|system|>", "<|user|>", "<|assistant|>")
# Distinct, easy-to-read nouns; the prompt draws its words from these.
CONTENT_WORDS = (
    "apple", "bird", "boat", "book", "cake", "cat", "cloud", "coin",
    "cup", "desk", "dog", "door", "drum", "egg", "fish", "flag",
    "frog", "hat", "key", "kite", "lamp", "leaf", "moon", "nest",
    "owl", "pen", "ring", "rock", "rose", "ship", "star", "tree",
)  # fmt: skip

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


def write_json(path: Path, obj: dict) -> None:
    """Write `obj` as indented JSON with sorted keys (stable across runs)."""
    path.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n", encoding="ascii")


def write_jsonl(path: Path, rows: list[dict]) -> None:
    """Write one JSON object per line."""
    # Key order is the insertion order of make_pair (prompt, chosen, rejected): fixed, and readable.
    lines = [json.dumps(row) + "\n" for row in rows]
    path.write_text("".join(lines), encoding="ascii")


def write_assets(out_dir: Path) -> None:
    """Write the model, tokenizer and data files under `out_dir`."""
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    default_out = Path(__file__).resolve().parent.parent / "assets"
    parser.add_argument("--out-dir", type=Path, default=default_out, help="where to write")
    args = parser.parse_args()
    write_assets(args.out_dir)
    print(f"wrote {args.out_dir / 'tiny_llama'} and {args.out_dir / 'tiny_prefs'}")


if __name__ == "__main__":
    main()
