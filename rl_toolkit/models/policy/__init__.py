"""The policy: its config schema, the driver-side facade and the FSDP2 workers.

Batch sizes in ``PolicyConfig`` count sequences (rows of the batch), never pairs: a DPO global
batch of 8 pairs is ``train_global_batch_size: 16``. Every default lives in ``configs/dpo.yaml``.
"""

from typing import Any, Literal, NotRequired

# pydantic (config validation) checks list[SchedulerConfig] only with typing_extensions'
# TypedDict on Python < 3.12.
from typing_extensions import TypedDict


class TokenizerConfig(TypedDict):
    name: str  # HF hub id or local path
    chat_template: str | None  # Jinja template overriding the tokenizer's own; None keeps it


class FSDPConfig(TypedDict):
    activation_checkpointing: bool  # recompute each decoder layer's activations in backward
    cpu_offload: bool  # keep sharded parameters, gradients and optimizer state in host memory
    reshard_after_forward: bool  # free gathered layer weights after forward (ZeRO-3) or keep them


class SequencePackingConfig(TypedDict):
    """Padding-free micro-batches (docs/guides/dpo.md, "Sequence packing")."""

    enabled: bool  # pack whole pairs into one row per micro-batch, cut by the token budgets
    train_mb_tokens: int  # real tokens per training micro-batch (replaces train_micro_batch_size)
    logprob_mb_tokens: int  # real tokens per log-prob forward (replaces logprob_batch_size)


class OptimizerConfig(TypedDict):
    name: str  # class path, e.g. "torch.optim.AdamW"
    kwargs: dict[str, Any]  # passed to the constructor, e.g. {lr: 1.0e-6, weight_decay: 0.01}


class SchedulerConfig(TypedDict):
    """One entry of ``PolicyConfig.scheduler``.

    An entry is either a scheduler (``name`` and ``kwargs``) or, last in a list of several
    schedulers, ``milestones`` alone: the steps at which ``SequentialLR`` moves to the next one.
    """

    name: NotRequired[str]  # class path, e.g. "torch.optim.lr_scheduler.LinearLR"
    kwargs: NotRequired[dict[str, Any]]
    milestones: NotRequired[list[int]]


class PolicyConfig(TypedDict):
    model_name: str  # HF hub id or local path (its config.json is always needed)
    tokenizer: TokenizerConfig
    precision: Literal["float32", "bfloat16"]  # compute dtype; bfloat16 needs a GPU
    random_init: bool  # True: random weights seeded by `seed` from model_name's config
    seed: int
    train_global_batch_size: int  # sequences per optimizer step, over all workers
    train_micro_batch_size: int  # sequences per forward/backward on one worker
    logprob_batch_size: int  # sequences per forward when computing log-probs
    max_total_sequence_length: int  # longest row (prompt + response) accepted
    logprob_chunk_size: int  # tokens whose full-vocabulary logits exist at once
    # "varlen": rl_toolkit's attention, computed within each sequence only (attention.py); or a
    # Hugging Face attn_implementation ("sdpa", "eager", "flash_attention_2", ...)
    attn_implementation: str
    sequence_packing: SequencePackingConfig
    fsdp: FSDPConfig
    optimizer: OptimizerConfig
    scheduler: list[SchedulerConfig]
    max_grad_norm: float | None  # clip the global gradient norm to this; None: no clipping
