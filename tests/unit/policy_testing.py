"""Shared pieces of the policy tests: a tiny Llama on disk, its config, batches and losses."""

import copy
from pathlib import Path
from typing import Any

import torch
from tokenizers import Tokenizer, models
from transformers import (
    AutoModelForSequenceClassification,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
)

from rl_toolkit.config_schema import MicroBatches, PolicyConfig, RewardModelConfig
from rl_toolkit.distributed.batched_data_dict import BatchedDataDict
from rl_toolkit.models.policy.worker import PolicyWorker

VOCAB_SIZE = 64
PAD_ID = 0


def make_tokenizer() -> PreTrainedTokenizerFast:
    """A word-level tokenizer over the tokens "t0" .. "t63" (t0 pads, t1 ends)."""
    vocab = {f"t{i}": i for i in range(VOCAB_SIZE)}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="t0"))
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="t0", eos_token="t1")


def save_tiny_llama(path: Path, *, tie_word_embeddings: bool = False) -> LlamaForCausalLM:
    """Save a 2-layer Llama (hidden 32, vocab 64) and its tokenizer to ``path``; return it."""
    config = LlamaConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=VOCAB_SIZE,
        max_position_embeddings=64,
        tie_word_embeddings=tie_word_embeddings,
        pad_token_id=PAD_ID,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).eval()
    model.save_pretrained(path)
    make_tokenizer().save_pretrained(path)
    return model


def make_config(model_dir: Path, **overrides: Any) -> PolicyConfig:
    """A complete policy config for the tiny model; batch sizes in rows (4 pairs per step)."""
    config: PolicyConfig = {
        "model_name": str(model_dir),
        "tokenizer": {"name": str(model_dir), "chat_template": None},
        "precision": "float32",
        "random_init": False,
        "seed": 7,
        "train_global_batch_size": 8,
        "micro_batch": {"unit": "rows", "train": 2, "logprob": 4},
        "max_total_sequence_length": 32,
        "logprob_chunk_size": 7,
        "attn_implementation": "varlen",
        "fsdp": {
            "activation_checkpointing": False,
            "cpu_offload": False,
            "reshard_after_forward": True,
        },
        "optimizer": {"name": "torch.optim.AdamW", "kwargs": {"lr": 1.0e-2, "weight_decay": 0.0}},
        "scheduler": [{"name": "torch.optim.lr_scheduler.ConstantLR", "kwargs": {"factor": 1.0}}],
        "max_grad_norm": 1.0,
        "lora": None,
    }
    config = copy.deepcopy(config)
    config.update(overrides)
    return config


def make_batch(seed: int, num_pairs: int = 4, seq_len: int = 12) -> BatchedDataDict:
    """A preference batch (docs/design.md) with right padding, prompts and one padding pair."""
    generator = torch.Generator().manual_seed(seed)
    num_rows = 2 * num_pairs
    lengths = torch.randint(seq_len // 2, seq_len + 1, (num_rows,), generator=generator)
    input_ids = torch.randint(2, VOCAB_SIZE, (num_rows, seq_len), generator=generator)
    positions = torch.arange(seq_len)[None, :]
    input_ids[positions >= lengths[:, None]] = PAD_ID
    prompt_len = 3
    token_mask = ((positions >= prompt_len) & (positions < lengths[:, None])).float()
    sample_mask = torch.ones(num_rows)
    sample_mask[-2:] = 0.0  # the last pair fills a partial batch
    return BatchedDataDict(
        input_ids=input_ids,
        input_lengths=lengths,
        token_mask=token_mask,
        sample_mask=sample_mask,
        group_size=2,
    )


def token_nll_loss(
    logprobs: torch.Tensor,
    data: BatchedDataDict,
    global_valid_seqs: torch.Tensor,
    global_valid_toks: torch.Tensor,
) -> tuple[torch.Tensor, dict[str, Any]]:
    """Token-level NLL over response tokens, divided by the global valid token count."""
    mask = data["token_mask"] * data["sample_mask"][:, None]  # (b, T)
    loss = -(logprobs * mask).sum() / global_valid_toks
    return loss, {"nll": loss.detach(), "num_tokens": mask.sum()}


def sequence_margin_loss(
    logprobs: torch.Tensor,
    data: BatchedDataDict,
    global_valid_seqs: torch.Tensor,
    global_valid_toks: torch.Tensor,
) -> tuple[torch.Tensor, dict[str, Any]]:
    """A pair-level loss -logsigmoid(logp_chosen - logp_rejected), mean over global pairs."""
    seq_logprobs = (logprobs * data["token_mask"]).sum(-1)  # (b,)
    margins = seq_logprobs[0::2] - seq_logprobs[1::2]  # (b / 2,)
    pair_mask = data["sample_mask"][0::2]
    num_pairs = global_valid_seqs / 2
    loss = -(torch.nn.functional.logsigmoid(margins) * pair_mask).sum() / num_pairs
    accuracy = ((margins > 0).float() * pair_mask).sum() / num_pairs
    return loss, {"accuracy": accuracy}


def naive_logprobs(model: torch.nn.Module, data: BatchedDataDict) -> torch.Tensor:
    """log_softmax over the full logits, in the docs/design.md convention, ``[N, T]``."""
    input_ids, lengths = data["input_ids"], data["input_lengths"]
    positions = torch.arange(input_ids.shape[1])[None, :]
    with torch.no_grad():
        logits = model(input_ids, attention_mask=(positions < lengths[:, None]).long()).logits
    logprobs = torch.log_softmax(logits.float(), -1)[:, :-1]
    logprobs = logprobs.gather(2, input_ids[:, 1:, None]).squeeze(2)
    logprobs = torch.nn.functional.pad(logprobs, (1, 0))
    return logprobs * ((positions >= 1) & (positions < lengths[:, None]))


# The micro-batches of make_config (rows), and packed ones (tokens) for the packing tests.
TRAIN_MBS = MicroBatches(packed=False, size=2)
LOGPROB_MBS = MicroBatches(packed=False, size=4)
PACKED_TRAIN_MBS = MicroBatches(packed=True, size=24)
PACKED_LOGPROB_MBS = MicroBatches(packed=True, size=40)


def new_worker(config: PolicyConfig, **kwargs: Any) -> PolicyWorker:
    """A policy worker with optimizer and reference, in this process."""
    return PolicyWorker(
        config=config,
        tokenizer=make_tokenizer(),
        init_optimizer=True,
        init_reference_model=True,
        **kwargs,
    )


def reward_config(model_dir: Path) -> RewardModelConfig:
    """A `reward_model` section for a reward model saved in `model_dir` (with its tokenizer)."""
    return {
        "model_name": str(model_dir),
        "tokenizer": {"name": str(model_dir), "chat_template": None},
        "precision": "float32",
        "micro_batch": {"unit": "tokens", "size": 40},
        "max_total_sequence_length": 32,
        "attn_implementation": "varlen",
        "fsdp": {"activation_checkpointing": False, "cpu_offload": False, "reshard_after_forward": True},
    }  # fmt: skip


def save_reward_model(path: Path, causal_lm_dir: Path) -> Path:
    """A reward model saved by Hugging Face in `path`: the backbone of the causal LM in
    `causal_lm_dir` and a random head (seed 3), with make_tokenizer()."""
    torch.manual_seed(3)
    model = AutoModelForSequenceClassification.from_pretrained(causal_lm_dir, num_labels=1)
    model.save_pretrained(path)
    make_tokenizer().save_pretrained(path)
    return path
