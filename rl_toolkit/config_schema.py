"""The config schema: every section's TypedDict, and the rules a valid config follows.

This module imports neither torch nor Ray nor transformers, so that a driver loads and checks
its config in about a second, before the ~15 s of imports a run needs (examples/run_dpo.py,
examples/run_sft.py).
Value ranges are part of the types (``Annotated[int, Ge(1)]``) and are checked with the types
by ``rl_toolkit.utils.config.validate_config``; the rules that relate several keys are in
``check_master_config`` (DPO), ``check_sft_config`` (SFT) and ``check_rollout_config`` (the
prompt data and environment of RL). Every default lives in configs/dpo.yaml (DPO) or
configs/sft.yaml (SFT); the RL sections get theirs with the GRPO config.

Batch sizes count sequences (rows of the batch), never pairs: a DPO global batch of 8 pairs is
``train_global_batch_size: 16``; an SFT global batch of 16 sequences is the same number.
"""

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal, NotRequired

from annotated_types import Ge, Gt, Le, Lt

# pydantic (config validation) checks list[SchedulerConfig] only with typing_extensions'
# TypedDict on Python < 3.12.
from typing_extensions import TypedDict

from rl_toolkit.utils.config import ConfigError

PositiveInt = Annotated[int, Ge(1)]
NonNegativeInt = Annotated[int, Ge(0)]
PositiveFloat = Annotated[float, Gt(0)]
Fraction = Annotated[float, Ge(0), Le(1)]


# ---------------------------------------------------------------------------------------------
# policy


class TokenizerConfig(TypedDict):
    name: str  # HF hub id or local path
    chat_template: str | None  # Jinja template overriding the tokenizer's own; None keeps it


class FSDPConfig(TypedDict):
    activation_checkpointing: bool  # recompute each decoder layer's activations in backward
    cpu_offload: bool  # keep sharded parameters, gradients and optimizer state in host memory
    reshard_after_forward: bool  # free gathered layer weights after forward (ZeRO-3) or keep them


class MicroBatchConfig(TypedDict):
    """How each worker cuts its share of a batch (docs/guides/dpo.md, "Micro-batches").

    unit: "tokens": whole groups (pairs) packed into one row of at most `train` / `logprob`
        real tokens, with attention within each sequence (no padding); "rows": padded
        micro-batches of `train` / `logprob` sequences.
    train: per training micro-batch (forward and backward).
    logprob: per forward without backward (reference log-probs, validation).
    """

    unit: Literal["tokens", "rows"]
    train: PositiveInt
    logprob: PositiveInt


@dataclass(frozen=True)
class MicroBatches:
    """One resolved micro-batch size, as the driver passes it to the workers.

    packed: pack whole groups into one row of at most `size` real tokens; else `size` rows.
    size: tokens per packed micro-batch, or rows per padded one.
    """

    packed: bool
    size: int


def micro_batches(config: MicroBatchConfig, purpose: Literal["train", "logprob"]) -> MicroBatches:
    """The micro-batches of a training step ("train") or of a forward alone ("logprob")."""
    return MicroBatches(packed=config["unit"] == "tokens", size=config[purpose])


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


class VllmConfig(TypedDict):
    """The `policy.generation.vllm` section: the vLLM engines of backend "vllm" (GPU only;
    docs/design.md, "Backend vllm"). Read only when `backend` is "vllm".

    tensor_parallel_size: GPUs of one engine (its weights split over them).
    gpu_memory_utilization: the fraction of each GPU's memory an engine may take for weights,
        activations and KV cache; colocated with the policy, the rest is training's.
    enforce_eager: no CUDA graphs: a faster start, slower decoding.
    colocated: true: one engine per tensor_parallel_size of the policy's own GPUs, asleep
        while the policy trains, its weights handed over by CUDA IPC; false: one engine on
        tensor_parallel_size GPUs of its own, its weights broadcast (NCCL) from policy rank 0.
    refit_bucket_mib: the policy sends its weights in buckets of at most this many MiB (a
        tensor larger than that goes alone).
    refit_check_threshold: after the first refit of a run, the mean over generated tokens of
        exp(|generator log-prob - policy log-prob|) above this is an error (1.0: identical).
    """

    tensor_parallel_size: PositiveInt
    gpu_memory_utilization: Annotated[float, Gt(0), Le(1)]
    enforce_eager: bool
    colocated: bool
    refit_bucket_mib: PositiveInt
    refit_check_threshold: Annotated[float, Ge(1)]


class SamplingConfig(TypedDict):
    """The `policy.generation` section: how the policy samples responses (docs/design.md,
    "Generation"). Only algorithms that generate (RL) read it; DPO and SFT configs leave it out.

    backend: "hf": the policy workers sample themselves (KV cache, CPU or GPU); "vllm": vLLM
        engines sample (GPU), set up by the `vllm` section.
    temperature: logits are divided by it before sampling (> 0; greedy decoding is an argument
        of `generate`, not a temperature).
    top_p: nucleus sampling: the smallest set of most likely tokens whose probability reaches
        top_p (1.0: off).
    top_k: sample among the top_k most likely tokens only (0: off).
    max_new_tokens: at most this many generated tokens per response (fewer where the prompt
        plus the response would exceed policy.max_total_sequence_length).
    stop_token_ids: token ids that end a response besides the tokenizer's EOS, which always
        does; the stop token is part of the response.
    """

    backend: Literal["hf", "vllm"]
    temperature: PositiveFloat
    top_p: Annotated[float, Gt(0), Le(1)]
    top_k: NonNegativeInt
    max_new_tokens: PositiveInt
    stop_token_ids: list[NonNegativeInt]
    vllm: NotRequired[VllmConfig]  # required with backend "vllm"; ignored with "hf"


class LoraConfig(TypedDict):
    """The `policy.lora` section: LoRA adapters (Hu et al. 2021, built by peft) on the policy,
    which then trains the adapters only, its reference being the same model with the adapters
    off (docs/guides/dpo.md, "LoRA"). null in policy: full fine-tuning.

    rank: r, the inner dimension of each adapter: W x + (alpha / r) B A x, A [r, in], B [out, r].
    alpha: the adapters' scale is alpha / rank.
    dropout: dropout on each adapter's input in training forwards (0: none); log-probs for the
        reference, validation and generation never drop anything.
    target_modules: "all-linear" (every linear layer of the decoder, the output layer excepted)
        or the names of the linear layers to adapt, e.g. [q_proj, v_proj]; a name matches every
        layer whose dotted name ends with it.
    """

    rank: PositiveInt
    alpha: PositiveInt
    dropout: Annotated[float, Ge(0), Lt(1)]
    target_modules: Literal["all-linear"] | list[str]


class PolicyConfig(TypedDict):
    model_name: str  # HF hub id or local path (its config.json is always needed)
    tokenizer: TokenizerConfig
    precision: Literal["float32", "bfloat16"]  # compute dtype; bfloat16 needs a GPU
    random_init: bool  # True: random weights seeded by `seed` from model_name's config
    seed: int
    train_global_batch_size: PositiveInt  # sequences per optimizer step, over all workers
    micro_batch: MicroBatchConfig  # how each worker cuts its share (tokens or rows)
    max_total_sequence_length: Annotated[int, Ge(2)]  # longest row (prompt + response)
    logprob_chunk_size: PositiveInt  # tokens whose full-vocabulary logits exist at once
    # "varlen": rl_toolkit's attention, computed within each sequence only (attention.py); or a
    # Hugging Face attn_implementation ("sdpa", "eager", "flash_attention_2", ...)
    attn_implementation: str
    fsdp: FSDPConfig
    optimizer: OptimizerConfig
    scheduler: list[SchedulerConfig]
    max_grad_norm: PositiveFloat | None  # clip the global gradient norm to this; None: no clipping
    lora: LoraConfig | None  # LoRA adapters on the model (trained alone); None: full fine-tuning
    # Sampling settings of algorithms that generate (GRPO); absent from DPO and SFT configs.
    generation: NotRequired[SamplingConfig]


class ShardedModelConfig(TypedDict):
    """The keys every FSDP2 role's section has (`policy`, `critic`, `reward_model`), which the
    runtime reads to build the role's model (rl_toolkit/models/role_config.py)."""

    model_name: str  # HF hub id or local path
    precision: Literal["float32", "bfloat16"]  # compute dtype; bfloat16 needs a GPU
    attn_implementation: str  # "varlen" or a Hugging Face attn_implementation
    fsdp: FSDPConfig


# ---------------------------------------------------------------------------------------------
# data


class DataConfig(TypedDict):
    """The `data` section of the config. configs/dpo.yaml sets every key; see docs/guides/dpo.md.

    dataset_name: a built-in dataset ("DPODataset", "BinaryPreferenceDataset", "HelpSteer3") or
        the dotted path of a user class ("my_pkg.module.MyDataset") built as `cls(data_config)`.
    overlong_policy: what to do with a pair longer than policy.max_total_sequence_length:
        "drop" it, or "truncate_prompt" from the left (pairs whose response alone does not fit
        are dropped).
    pad_to_multiple_of: round the padded length T of every batch up to a multiple of this.
    shuffle: shuffle the training data each epoch (seeded by dpo.seed).
    num_workers: dataloader worker processes (0: load in the main process).
    tokenize_num_proc: processes that tokenise each split up front (1: in this process; small
        splits are always tokenised in this process).

    Keys only some datasets use (set them to null where unused):
    train_data_path, val_data_path: local .jsonl / .json / .parquet files, or (for
        BinaryPreferenceDataset) a HF hub dataset name.
    train_split, val_split: the split of a hub dataset (BinaryPreferenceDataset with a hub name),
        e.g. "train" or "train[:95%]".
    prompt_key, chosen_key, rejected_key: the column names of BinaryPreferenceDataset;
        prompt_key null means the prompt is implicit (shared leading messages of chosen and
        rejected conversations).
    """

    dataset_name: str
    overlong_policy: Literal["drop", "truncate_prompt"]
    pad_to_multiple_of: PositiveInt
    shuffle: bool
    num_workers: NonNegativeInt
    tokenize_num_proc: PositiveInt
    train_data_path: NotRequired[str | None]
    val_data_path: NotRequired[str | None]
    train_split: NotRequired[str | None]
    val_split: NotRequired[str | None]
    prompt_key: NotRequired[str | None]
    chosen_key: NotRequired[str | None]
    rejected_key: NotRequired[str | None]


# ---------------------------------------------------------------------------------------------
# dpo


class DPOLossConfig(TypedDict):
    """The loss-related keys of the `dpo` config section (DPOConfig inherits them).

    reference_policy_kl_penalty: beta, the inverse temperature of the implicit reward (> 0).
    preference_loss_weight: weight of the preference term.
    sft_loss_weight: weight of the SFT (negative log-likelihood) term on the chosen responses.
    preference_average_log_probs: average log-probs over response tokens in the preference
        term instead of summing them.
    sft_average_log_probs: average log-probs over response tokens in the SFT term.
    loss_type: a key of loss_functions.PREFERENCE_LOSSES.
    label_smoothing: eps, the assumed fraction of flipped labels (sigmoid, robust, aot,
        aot_pair, simpo: [0, 0.5); exo_pair: (0, 0.5); the other losses require 0).
    reference_free: use a reference log-prob of 0 (no reference model).
    simpo_gamma: SimPO's target reward margin gamma (used by loss_type simpo only).
    discopop_tau: DiscoPOP's modulation temperature tau > 0 (used by loss_type discopop only).
    """

    reference_policy_kl_penalty: PositiveFloat
    preference_loss_weight: float
    sft_loss_weight: float
    preference_average_log_probs: bool
    sft_average_log_probs: bool
    loss_type: Literal[
        "sigmoid",
        "robust",
        "hinge",
        "ipo",
        "exo_pair",
        "nca_pair",
        "bco_pair",
        "sppo_hard",
        "aot",
        "aot_pair",
        "apo_zero",
        "apo_down",
        "discopop",
        "simpo",
    ]
    label_smoothing: float
    reference_free: bool
    simpo_gamma: float
    discopop_tau: PositiveFloat


class DPOConfig(DPOLossConfig):
    """The `dpo` section: the loop (below) plus the loss keys of DPOLossConfig.

    max_num_epochs / max_num_steps: training stops at whichever comes first.
    val_period: validate every this many steps (0: never, except at start and end).
    val_batches: validation batches per validation (0: the whole validation set).
    val_global_batch_size: sequences (2 per pair) per validation batch; its micro-batches are
        policy.micro_batch's `logprob` ones (no backward).
    val_at_start: validate before the first step.
    seed: seeds Python, NumPy, torch and the data order.
    reference_cache_mib: driver memory (MiB) in which each pair's reference log-probs are kept
        and reused while the reference does not change (later epochs, validation); 0: none.
    sync_ref_model / ref_model_sync_steps / ref_model_mixup_alpha: TR-DPO; every
        ref_model_sync_steps steps, reference <- alpha * policy + (1 - alpha) * reference.
    """

    max_num_epochs: PositiveInt
    max_num_steps: NonNegativeInt
    val_period: NonNegativeInt
    val_batches: NonNegativeInt
    val_global_batch_size: PositiveInt
    val_at_start: bool
    seed: int
    reference_cache_mib: NonNegativeInt
    sync_ref_model: bool
    ref_model_sync_steps: PositiveInt
    ref_model_mixup_alpha: Fraction


# ---------------------------------------------------------------------------------------------
# sft (the data section and the loop of an SFT config)


class SFTDataConfig(TypedDict):
    """The `data` section of an SFT config. configs/sft.yaml sets every key; see
    docs/guides/sft.md.

    format: how a row is read: "chat" (a list of messages; the loss is on the assistant turns),
        "prompt_completion" (the loss is on the completion) or "text" (on every token).
    train_data_path, val_data_path: local .jsonl / .json / .parquet files, or HF hub dataset
        names.
    train_split, val_split: the split of a hub dataset, e.g. "train" or "train[:95%]" (null for
        local files).
    messages_key: the column of the conversations (format chat).
    prompt_key, completion_key: the columns of the prompt and the completion (format
        prompt_completion).
    text_key: the column of the text (format text).
    overlong_policy: what to do with a sequence longer than policy.max_total_sequence_length:
        "drop" it, or "truncate" it to its first max_total_sequence_length tokens (a row left
        with no token to learn is dropped).
    pad_to_multiple_of: round the padded length T of every batch up to a multiple of this.
    shuffle: shuffle the training data each epoch (seeded by sft.seed).
    num_workers: dataloader worker processes (0: load in the main process).
    tokenize_num_proc: processes that tokenise each split up front (1: in this process; small
        splits are always tokenised in this process).
    """

    format: Literal["chat", "prompt_completion", "text"]
    train_data_path: str
    val_data_path: str
    train_split: str | None
    val_split: str | None
    messages_key: str
    prompt_key: str
    completion_key: str
    text_key: str
    overlong_policy: Literal["drop", "truncate"]
    pad_to_multiple_of: PositiveInt
    shuffle: bool
    num_workers: NonNegativeInt
    tokenize_num_proc: PositiveInt


class SFTConfig(TypedDict):
    """The `sft` section: the training loop (NeMo RL's keys).

    max_num_epochs / max_num_steps: training stops at whichever comes first.
    val_period: validate every this many steps (0: never, except at start and end).
    val_batches: validation batches per validation (0: the whole validation set).
    val_global_batch_size: sequences per validation batch; its micro-batches are
        policy.micro_batch's `logprob` ones (no backward).
    val_at_start: validate before the first step.
    seed: seeds Python, NumPy, torch and the data order.
    """

    max_num_epochs: PositiveInt
    max_num_steps: NonNegativeInt
    val_period: NonNegativeInt
    val_batches: NonNegativeInt
    val_global_batch_size: PositiveInt
    val_at_start: bool
    seed: int


# ---------------------------------------------------------------------------------------------
# policy-gradient loss (GRPO, PPO's actor)


class PGLossConfig(TypedDict):
    """The policy-gradient loss of RL with generation (rl_toolkit.algorithms.loss_functions).

    policy_loss: "ppo_clip" (the clipped ratio objective), "cispo" (the clipped ratio as a
        detached weight of REINFORCE) or "reinforce" (no ratio).
    ratio_level: "token" (PPO, GRPO) or "sequence" (GSPO: one ratio per completion, the
        exponentiated mean of its tokens' log-ratios).
    ratio_clip_min / ratio_clip_max: epsilon_low / epsilon_high of the clip range
        [1 - min, 1 + max] (DAPO's clip-higher: max > min).
    ratio_clip_c: dual clip (Ye et al. 2020): with a negative advantage the loss is at most
        -c * A; None: off. Needs c > 1.
    reference_policy_kl_penalty: beta of the KL to the reference (0: none).
    kl_estimator: "k1", "k2" or "k3" (Schulman 2020), per token, clamped.
    kl_in_reward: subtract beta * KL from the reward (PPO-style) instead of adding it to the
        loss (GRPO-style).
    aggregation: "token_mean" (over every generated token of the global batch),
        "seq_mean_token_mean" (per completion, then over completions) or
        "seq_mean_token_sum_norm" (Dr. GRPO: token sums over completions x sum_norm_length).
    sum_norm_length: the constant of seq_mean_token_sum_norm (the generation budget); None
        with the other aggregations.
    importance_correction: "none", "tis" (truncated importance sampling: tokens weighted by
        min(pi_train / pi_gen, importance_max)) or "icepop" (tokens whose ratio leaves
        [importance_min, importance_max] are dropped), for the gap between the generator's and
        the trainer's log-probs.
    importance_min / importance_max: the bounds of that correction.
    entropy_coef: weight of the entropy bonus: the loss subtracts entropy_coef times the
        policy's per-token entropy, aggregated as the policy loss (0: off, and the entropy is
        not computed).
    """

    policy_loss: Literal["ppo_clip", "cispo", "reinforce"]
    ratio_level: Literal["token", "sequence"]
    ratio_clip_min: Annotated[float, Ge(0)]
    ratio_clip_max: Annotated[float, Ge(0)]
    ratio_clip_c: Annotated[float, Gt(1)] | None
    reference_policy_kl_penalty: Annotated[float, Ge(0)]
    kl_estimator: Literal["k1", "k2", "k3"]
    kl_in_reward: bool
    aggregation: Literal["token_mean", "seq_mean_token_mean", "seq_mean_token_sum_norm"]
    sum_norm_length: PositiveInt | None
    importance_correction: Literal["none", "tis", "icepop"]
    importance_min: Annotated[float, Ge(0)]
    importance_max: PositiveFloat
    entropy_coef: Annotated[float, Ge(0)]


def check_pg_loss_config(config: PGLossConfig, section: str) -> None:
    """The rules between the policy-gradient loss's keys.

    Raises:
        ConfigError: one line naming the `<section>.*` key and what would be right.
    """
    sum_norm = config["aggregation"] == "seq_mean_token_sum_norm"
    if sum_norm != (config["sum_norm_length"] is not None):
        raise ConfigError(
            f"{section}.sum_norm_length must be set (the generation budget) with "
            f"{section}.aggregation=seq_mean_token_sum_norm, and null otherwise"
        )
    if config["ratio_level"] == "sequence" and sum_norm:
        raise ConfigError(
            f"{section}.ratio_level=sequence (GSPO) weights whole completions: use "
            f"{section}.aggregation=seq_mean_token_mean or token_mean, not seq_mean_token_sum_norm"
        )
    if config["ratio_clip_c"] is not None and config["policy_loss"] != "ppo_clip":
        raise ConfigError(
            f"{section}.ratio_clip_c (dual clip) applies to policy_loss=ppo_clip only; set it "
            "to null"
        )
    if config["importance_min"] >= config["importance_max"]:
        raise ConfigError(
            f"{section}.importance_min={config['importance_min']} must be below "
            f"{section}.importance_max={config['importance_max']}"
        )


# ---------------------------------------------------------------------------------------------
# rollouts: the prompt data and the environment of an RL config (GRPO)


class PromptDataConfig(TypedDict):
    """The `data` section of an RL config: the prompts to sample from (docs/guides/environments.md).

    format: how a row's prompt is read: "prompt" (a string, rendered as the user's turn through
        the chat template when the tokenizer has one, else as plain text) or "chat" (a list of
        messages ending with a non-assistant turn, rendered with the generation prompt).
    train_data_path, val_data_path: local .jsonl / .json / .parquet files, or HF hub dataset
        names.
    train_split, val_split: the split of a hub dataset, e.g. "train" or "train[:95%]" (null for
        local files).
    prompt_key: the column of the prompt string (format prompt).
    messages_key: the column of the messages (format chat).
    metadata_keys: further columns kept with every prompt and handed to the environment with
        its completions, in the same row order (e.g. ["answer"] for a verifier).
    shuffle: shuffle the training prompts each epoch (seeded by the recipe's seed).
    num_workers: dataloader worker processes (0: load in the main process).
    tokenize_num_proc: processes that tokenise each split up front (1: in this process; small
        splits are always tokenised in this process).

    A prompt longer than the recipe's prompt budget (policy.max_total_sequence_length minus the
    tokens generated) is dropped and counted, with its row number in the log.
    """

    format: Literal["prompt", "chat"]
    train_data_path: str
    val_data_path: str
    train_split: str | None
    val_split: str | None
    prompt_key: str
    messages_key: str
    metadata_keys: list[str]
    shuffle: bool
    num_workers: NonNegativeInt
    tokenize_num_proc: PositiveInt


# The built-in environments: env.name -> the dotted path of the reward function it runs.
BUILTIN_ENVIRONMENTS = {
    "tiny_first": "rl_toolkit.environments.tasks.tiny_first",
    "math": "rl_toolkit.environments.tasks.math_answer",
}


class EnvConfig(TypedDict):
    """The `env` section: what scores the completions (docs/guides/environments.md).

    name: a built-in environment (a key of BUILTIN_ENVIRONMENTS: "tiny_first", "math") or the
        dotted path of a reward function `f(prompts, completions, **columns) -> list[float]`
        (TRL's form, e.g. "my_pkg.rewards.exact_match"), called once per completion.
    kwargs: keyword arguments bound to the reward function (e.g. {scale: 2.0}).
    timeout_s: how long one completion may take to score; past it the call is abandoned (its
        process killed and replaced), the completion scores 0 and env/timeouts counts it.
    on_error: a reward function that raises (or returns no number, or whose process dies):
        "raise" stops the run with one line naming the row and the error; "zero" scores the
        completion 0 and env/errors counts it.
    num_processes: processes that score completions in parallel.
    """

    name: str
    kwargs: dict[str, Any]
    timeout_s: PositiveFloat
    on_error: Literal["raise", "zero"]
    num_processes: PositiveInt


class DynamicSamplingConfig(TypedDict):
    """`grpo.dynamic_sampling` (DAPO): train only on groups whose rewards differ.

    enabled: drop the groups whose G rewards are all equal (their advantages are 0) and refill
        the step with the groups of further prompt batches.
    max_gen_batches: at most this many prompt batches generated for one step; a step still
        short of num_prompts_per_step groups then trains on the dropped groups too, with
        sample_mask 0 (they count for nothing).
    """

    enabled: bool
    max_gen_batches: PositiveInt


class GRPOConfig(TypedDict):
    """The `grpo` section: the loop of GRPO (docs/guides/grpo.md; NeMo RL's keys where it has them).

    num_prompts_per_step: prompts sampled per step; each gives a group of
        num_generations_per_prompt completions, so a step has their product of rows.
    num_generations_per_prompt: G, the group size (GRPO: >= 2, the advantage compares a
        completion with the others of its group; PPO: >= 1, its critic is the baseline).
    max_num_steps / max_num_epochs: training stops at whichever comes first.
    adv_estimator: "grpo" (group mean and std), "dr_grpo" (group mean), "rloo" (leave-one-out
        mean) or "reinforce_pp" (group mean, then whitened over the batch).
    dynamic_sampling: DAPO's filter of zero-variance groups (DynamicSamplingConfig).
    overlong_filtering: completions cut at their token budget (truncated) count for nothing
        (sample_mask 0), as in DAPO.
    sft_warmup_steps: supervised steps (NLL on `sft_warmup_answer_key`'s reference answers)
        before the first GRPO step; 0: none.
    sft_warmup_answer_key: the metadata column (data.metadata_keys) holding each prompt's
        reference answer, for the warm-up.
    val_period: validate every this many steps (0: never, except at start and end).
    val_at_start: validate before the first step.
    max_val_samples: validation prompts (the first ones of the validation split).
    val_num_generations: k completions per validation prompt: 1 decodes greedily; k > 1
        samples as in training and adds pass@k (the mean over prompts of the best reward).
    val_global_batch_size: validation prompts per generation call.
    num_val_samples_to_log: completions shown per validation (console, samples.jsonl, wandb).
    seed: seeds Python, NumPy, torch, the data order and (with policy.seed) sampling.
    """

    num_prompts_per_step: PositiveInt
    num_generations_per_prompt: PositiveInt
    max_num_steps: NonNegativeInt
    max_num_epochs: PositiveInt
    adv_estimator: Literal["grpo", "dr_grpo", "rloo", "reinforce_pp"]
    dynamic_sampling: DynamicSamplingConfig
    overlong_filtering: bool
    sft_warmup_steps: NonNegativeInt
    sft_warmup_answer_key: str
    val_period: NonNegativeInt
    val_at_start: bool
    max_val_samples: PositiveInt
    val_num_generations: PositiveInt
    val_global_batch_size: PositiveInt
    num_val_samples_to_log: NonNegativeInt
    seed: int


# ---------------------------------------------------------------------------------------------
# ppo: a critic, GAE and optionally a reward model, on top of the GRPO sections


class CriticConfig(TypedDict):
    """The `critic` section of a PPO config: the value model (rl_toolkit/models/value/), a
    sequence-classification model with one label whose head is applied to every position.

    model_name: where its weights come from: a policy (causal LM) checkpoint, whose backbone
        it takes (the head then starts random), or a reward model's, head included.
    random_init: random weights seeded by `seed` from model_name's config instead.
    train_global_batch_size: rows per critic optimizer step; like the policy's, a multiple of
        G that divides a step's rows.
    micro_batch, attn_implementation, precision, fsdp, optimizer, scheduler, max_grad_norm:
        as the policy's keys of the same names.
    """

    model_name: str
    precision: Literal["float32", "bfloat16"]
    random_init: bool
    seed: int
    train_global_batch_size: PositiveInt
    micro_batch: MicroBatchConfig
    attn_implementation: str
    fsdp: FSDPConfig
    optimizer: OptimizerConfig
    scheduler: list[SchedulerConfig]
    max_grad_norm: PositiveFloat | None


class InferenceMicroBatchConfig(TypedDict):
    """Micro-batches of a model that only runs forwards: `size` tokens packed into one row
    (`unit: tokens`) or `size` padded rows (`unit: rows`)."""

    unit: Literal["tokens", "rows"]
    size: PositiveInt


class RewardModelConfig(TypedDict):
    """The `reward_model` section of a PPO config: a trained reward model that scores the
    completions instead of `env` (rl_toolkit/models/reward/), inference only.

    model_name: a sequence-classification model with one label (what examples/run_rm.py
        exports, or any `AutoModelForSequenceClassification` checkpoint).
    tokenizer: its tokenizer; it reads the prompt and completion as text, tokenised as its
        training pairs were (the chat template with the completion as the assistant's turn,
        then EOS).
    max_total_sequence_length: longer sequences lose prompt tokens from the left.
    micro_batch, precision, attn_implementation, fsdp: as the policy's keys.
    """

    model_name: str
    tokenizer: TokenizerConfig
    precision: Literal["float32", "bfloat16"]
    micro_batch: InferenceMicroBatchConfig
    max_total_sequence_length: Annotated[int, Ge(2)]
    attn_implementation: str
    fsdp: FSDPConfig


class PPOConfig(TypedDict):
    """The `ppo` section: what PPO adds to the GRPO loop (docs/guides/ppo.md).

    gae_gamma: the discount gamma of GAE, per token.
    gae_lambda: GAE's lambda (1: Monte-Carlo returns; 0: one-step TD).
    whiten_advantages: normalise the advantages to mean 0 and std 1 over the step's tokens.
    critic_warmup_steps: the first this many steps train the critic only (the policy is not
        updated), so that the first policy updates see a critic that has learnt something.
    critic_epochs: passes of the critic over each rollout (each pass one optimizer step per
        critic.train_global_batch_size rows): a value function learns more slowly than the
        policy it follows.
    """

    gae_gamma: Fraction
    gae_lambda: Fraction
    whiten_advantages: bool
    critic_warmup_steps: NonNegativeInt
    critic_epochs: PositiveInt


class ValueLossConfig(TypedDict):
    """The `value_loss_fn` section: the critic's loss (loss_functions.ValueLossFn).

    value_clip: eps_v: the new value is clipped to the rollout's value +- eps_v in the second
        term of the loss (PPO's value clipping); None: the plain squared error.
    """

    value_clip: PositiveFloat | None


# ---------------------------------------------------------------------------------------------
# rm: reward-model training on preference pairs


class RMPolicyConfig(CriticConfig):
    """The `policy` section of a reward-model config (NeMo RL's name): the model trained, a
    sequence-classification model with one label (the `critic` keys), with its tokenizer and
    the longest sequence of a pair."""

    tokenizer: TokenizerConfig
    max_total_sequence_length: Annotated[int, Ge(2)]


class RMConfig(SFTConfig):
    """The `rm` section: the loop of reward-model training, with the `sft` section's keys
    (max_num_epochs, max_num_steps, val_period, val_batches, val_global_batch_size (2 per
    pair), val_at_start, seed)."""


# ---------------------------------------------------------------------------------------------
# cluster, checkpointing, logger


class ClusterConfig(TypedDict):
    """The `cluster` section of the config.

    gpus_per_node: workers (bundles) per node: GPUs per node, or CPU workers per node in CPU
        mode.
    num_nodes: number of nodes.
    worker_env_vars: environment variables of the driver that workers get on top of the
        built-in allow-list (see distributed.virtual_cluster.worker_env).
    worker_timeout_s: how long the driver waits for any one call on the workers (building
        them, a training step, a checkpoint save) before it fails naming the workers that did
        not answer; None waits forever.
    """

    gpus_per_node: PositiveInt
    num_nodes: PositiveInt
    worker_env_vars: list[str]
    worker_timeout_s: PositiveFloat | None


class CheckpointingConfig(TypedDict):
    """The `checkpointing` section of the config (defaults in configs/dpo.yaml).

    enabled: save checkpoints and resume from them; when False the manager touches no file.
    checkpoint_dir: the run folder that holds the `step_N` checkpoints.
    save_period: save every this many training steps (the recipe also saves at the end).
    keep_top_k: how many of the best checkpoints by `metric_name` to keep besides the latest
        (the latest `keep_top_k` by step when `metric_name` is None); None keeps all.
    metric_name: key of `training_info` that ranks checkpoints, e.g. "val_loss".
    higher_is_better: whether a larger `metric_name` value is better.
    resume: "auto" (the latest complete checkpoint of `checkpoint_dir` that verifies against its
        manifest, if any), "never" (start fresh, in a new folder if `checkpoint_dir` is not
        empty), or the path of a `step_N`.
    save_hf: also write a Hugging Face export (`hf/`) that `from_pretrained` loads.
    hf_max_shard_size: the largest weights file of that export, like Hugging Face's
        max_shard_size ("5GB"); above it the weights are sharded with an index file.
    push_to_hub: a Hub repo id ("org/name") that the final checkpoint's export is uploaded to
        (needs save_hf), or None.
    hub_private: whether push_to_hub creates the repo private (an existing repo keeps its own).
    export_lora: with policy.lora, what the export holds: "adapter" (a PEFT adapter folder on
        top of policy.model_name) or "merged" (the model with the adapters merged into its
        weights); ignored without LoRA.
    """

    enabled: bool
    checkpoint_dir: str
    save_period: PositiveInt
    keep_top_k: PositiveInt | None
    metric_name: str | None
    higher_is_better: bool
    resume: Literal["auto", "never"] | str
    save_hf: bool
    hf_max_shard_size: str
    push_to_hub: str | None
    hub_private: bool
    export_lora: Literal["adapter", "merged"]


class WandbConfig(TypedDict):
    """wandb run identity; the run files go to `<log_dir>/wandb`."""

    project: str
    name: str


class LoggerConfig(TypedDict):
    """The `logger` section of the config (defaults in configs/dpo.yaml).

    log_dir: folder for metrics.jsonl, `tensorboard/` and `wandb/`.
    wandb_enabled: log to wandb (set WANDB_MODE=offline to keep the run local).
    tensorboard_enabled: write TensorBoard event files to `<log_dir>/tensorboard`.
    wandb: project and run name.
    """

    log_dir: str
    wandb_enabled: bool
    tensorboard_enabled: bool
    wandb: WandbConfig


class MasterConfig(TypedDict):
    """A whole DPO config (configs/dpo.yaml)."""

    policy: PolicyConfig
    data: DataConfig
    dpo: DPOConfig
    logger: LoggerConfig
    cluster: ClusterConfig
    checkpointing: CheckpointingConfig


class SFTMasterConfig(TypedDict):
    """A whole SFT config (configs/sft.yaml)."""

    policy: PolicyConfig
    data: SFTDataConfig
    sft: SFTConfig
    logger: LoggerConfig
    cluster: ClusterConfig
    checkpointing: CheckpointingConfig


class GRPOMasterConfig(TypedDict):
    """A whole GRPO config (configs/grpo.yaml)."""

    policy: PolicyConfig
    loss_fn: PGLossConfig
    grpo: GRPOConfig
    data: PromptDataConfig
    env: EnvConfig
    logger: LoggerConfig
    cluster: ClusterConfig
    checkpointing: CheckpointingConfig


class PPOMasterConfig(GRPOMasterConfig):
    """A whole PPO config (configs/ppo.yaml): the GRPO sections, whose `grpo` section holds the
    loop (its adv_estimator is not read: PPO's advantages are GAE's), and the PPO ones."""

    ppo: PPOConfig
    critic: CriticConfig
    value_loss_fn: ValueLossConfig
    reward_model: RewardModelConfig | None  # None: the `env` section scores the completions


class RMMasterConfig(TypedDict):
    """A whole reward-model training config (configs/rm.yaml)."""

    policy: RMPolicyConfig
    data: DataConfig
    rm: RMConfig
    logger: LoggerConfig
    cluster: ClusterConfig
    checkpointing: CheckpointingConfig


# ---------------------------------------------------------------------------------------------
# the engine (rl_toolkit.engine; defaults in configs/engine/*.yaml)


class EngineModelConfig(TypedDict):
    """One module's entry under `models` (keyed by the module's name).

    num_workers: the module's data-parallel size: one worker (process) per GPU, or per CPU
        bundle without GPUs; the module's `data_parallel_size`.
    args: the module's own arguments (`BaseModule.model_args`), free-form.
    """

    num_workers: PositiveInt
    args: dict[str, Any]


class RuntimeConfig(TypedDict):
    """The `runtime` section: the engine's schedule (ChatLearn's runtime_args).

    num_episode: episodes to run; each draws `sample_per_episode` dataset items.
    sample_per_episode: dataset items (prompts, preference pairs) per episode.
    generation_batch_size: items per call of the environment flow (the loader's batch).
    train_global_batch_size: rows per `train_step` call over all data-parallel ranks (rows:
        what the flow returns, e.g. G completions per prompt, 2 sequences per pair).
    train_micro_batch_size: rows per micro-batch dict in the list each rank's `train_step` gets.
    num_training_epoch: passes of the trainers over an episode's samples.
    save_episode_interval: checkpoint every this many episodes (and after the last); 0: never.
    eval_episode_interval: evaluate every this many episodes (and after the last); 0: never.
    eval_at_start: evaluate once before the first episode.
    colocation: groups of module names that share the same workers' devices; a module in no
        group gets devices of its own.
    shuffle: reshuffle the dataset every epoch (seeded by `seed` and the epoch).
    seed: seeds the shuffle and the driver's random generators.
    """

    num_episode: PositiveInt
    sample_per_episode: PositiveInt
    generation_batch_size: PositiveInt
    train_global_batch_size: PositiveInt
    train_micro_batch_size: PositiveInt
    num_training_epoch: PositiveInt
    save_episode_interval: NonNegativeInt
    eval_episode_interval: NonNegativeInt
    eval_at_start: bool
    colocation: list[list[str]]
    shuffle: bool
    seed: int


class EngineConfig(TypedDict):
    """The sections the engine itself reads; the rest of an engine config (`policy`, `dpo`,
    ...) is the modules' (`BaseModule.global_args`), checked by the modules that read it."""

    runtime: RuntimeConfig
    models: dict[str, EngineModelConfig]
    cluster: ClusterConfig
    checkpointing: CheckpointingConfig
    logger: LoggerConfig


def check_runtime_schedule(runtime: RuntimeConfig) -> None:
    """The rules between the `runtime` keys that need no module.

    Raises:
        ConfigError: one line naming the key and what would be right.
    """
    episode, generation = runtime["sample_per_episode"], runtime["generation_batch_size"]
    if episode % generation:
        raise ConfigError(
            f"runtime.sample_per_episode={episode} must be a multiple of "
            f"runtime.generation_batch_size={generation} (whole flow calls per episode)"
        )
    gbs, mbs = runtime["train_global_batch_size"], runtime["train_micro_batch_size"]
    if gbs % mbs:
        raise ConfigError(
            f"runtime.train_global_batch_size={gbs} must be a multiple of "
            f"runtime.train_micro_batch_size={mbs}"
        )
    seen: dict[str, int] = {}
    for index, group in enumerate(runtime["colocation"]):
        for name in group:
            if name in seen:
                raise ConfigError(
                    f"runtime.colocation: module {name!r} is in groups {seen[name]} and {index}; "
                    "a module shares devices with one group at most"
                )
            seen[name] = index


# ---------------------------------------------------------------------------------------------
# Rules between keys


def check_master_config(config: MasterConfig) -> None:
    """Check what the types cannot: batch sizes against the workers, the optimizer's rate, paths.

    Called on the driver before Ray or any worker starts (and cheap enough to call again).

    Raises:
        ConfigError: one line naming the key, its value and what would be right.
    """
    _check_batch_sizes(config, "dpo", config["dpo"], group_size=2)
    _check_lr(config["policy"]["optimizer"], "policy")
    if config["dpo"]["sync_ref_model"] and config["dpo"]["reference_free"]:
        raise ConfigError(
            "dpo.sync_ref_model=true needs a reference model, but dpo.reference_free=true has "
            "none; set one of them to false"
        )
    if config["dpo"]["sync_ref_model"] and config["policy"]["lora"] is not None:
        raise ConfigError(
            "dpo.sync_ref_model=true mixes the policy into the reference, but with policy.lora "
            "the reference is the base model (the adapters off); set one of them off"
        )
    _check_lora_export(config)
    _check_output_dirs(config)


def check_sft_config(config: SFTMasterConfig) -> None:
    """check_master_config's rules for an SFT config: batch sizes against the workers (SFT
    batches have no pairs: any whole number of sequences per worker), the rate, the folders.

    Raises:
        ConfigError: one line naming the key, its value and what would be right.
    """
    _check_batch_sizes(config, "sft", config["sft"], group_size=1)
    _check_lr(config["policy"]["optimizer"], "policy")
    _check_lora_export(config)
    _check_output_dirs(config)


def check_grpo_config(config: GRPOMasterConfig) -> None:
    """The rules of a GRPO config: groups against the batch sizes and the workers, room for
    prompts, the loss, the prompt data and environment, the rate, the folders.

    Raises:
        ConfigError: one line naming the key, its value and what would be right.
    """
    group = config["grpo"]["num_generations_per_prompt"]
    if group < 2:
        raise ConfigError(
            f"grpo.num_generations_per_prompt={group}: GRPO compares a completion with the "
            "others of its group, so it needs at least 2"
        )
    _check_rl_loop(config)


def check_ppo_config(config: PPOMasterConfig) -> None:
    """The rules of a PPO config: GRPO's (the loop, groups against batch sizes, the loss, the
    prompt data, the folders) for the policy and for the critic.

    Raises:
        ConfigError: one line naming the key, its value and what would be right.
    """
    _check_rl_loop(config)
    critic = config["critic"]
    _check_step_batch(
        config, "critic.train_global_batch_size", critic["train_global_batch_size"],
        critic["micro_batch"], "critic",
    )  # fmt: skip
    _check_lr(critic["optimizer"], "critic")


def _check_rl_loop(config: GRPOMasterConfig) -> None:
    """The rules GRPO and PPO share: the policy's batches against the groups, the prompts' room,
    sampling, the loss, the warm-up's answers, the checkpoint metric, the data, the folders."""
    grpo, policy = config["grpo"], config["policy"]
    if "generation" not in policy:
        raise ConfigError(
            "policy.generation is missing: the completions are sampled with it "
            "(docs/configuration.md, policy.generation)"
        )
    gbs = policy["train_global_batch_size"]
    _check_step_batch(
        config, "policy.train_global_batch_size", gbs, policy["micro_batch"], "policy"
    )
    max_new = policy["generation"]["max_new_tokens"]
    if policy["max_total_sequence_length"] <= max_new:
        raise ConfigError(
            f"policy.max_total_sequence_length={policy['max_total_sequence_length']} leaves no "
            f"room for a prompt before policy.generation.max_new_tokens={max_new} tokens"
        )
    check_generation_config(policy["generation"], config["cluster"])
    check_pg_loss_config(config["loss_fn"], "loss_fn")
    answer_key = grpo["sft_warmup_answer_key"]
    if grpo["sft_warmup_steps"] > 0 and answer_key not in config["data"]["metadata_keys"]:
        raise ConfigError(
            f"grpo.sft_warmup_steps={grpo['sft_warmup_steps']} trains on the reference answers "
            f"in grpo.sft_warmup_answer_key={answer_key!r}, which data.metadata_keys="
            f"{config['data']['metadata_keys']} does not keep"
        )
    metric = config["checkpointing"]["metric_name"]
    if metric not in (None, "val_reward"):
        raise ConfigError(
            f"checkpointing.metric_name={metric!r}: RL recipes rank checkpoints by 'val_reward' "
            "(or null: the latest ones)"
        )
    check_rollout_config(config["data"], config["env"])
    _check_lr(policy["optimizer"], "policy")
    _check_lora_export(config)
    _check_output_dirs(config)


def _check_step_batch(
    config: GRPOMasterConfig,
    gbs_key: str,
    gbs: int,
    micro_batch: MicroBatchConfig,
    section: str,
) -> None:
    """A model's optimizer steps of an RL step: `gbs` rows of whole groups, whole steps, split
    over the workers and into micro-batches of whole groups."""
    group = config["grpo"]["num_generations_per_prompt"]
    if gbs % group:
        raise ConfigError(
            f"{gbs_key}={gbs} must be a multiple of grpo.num_generations_per_prompt={group}: a "
            "training batch holds whole groups"
        )
    rows = config["grpo"]["num_prompts_per_step"] * group
    if rows % gbs:
        raise ConfigError(
            f"grpo.num_prompts_per_step x grpo.num_generations_per_prompt = {rows} rows per step "
            f"must be a multiple of {gbs_key}={gbs} (whole optimizer steps)"
        )
    _check_global_batch(micro_batch, section, config["cluster"], gbs_key, gbs, "train", group)


def check_generation_config(generation: SamplingConfig, cluster: ClusterConfig) -> None:
    """The rules of `policy.generation` that relate keys: backend "vllm" needs its section, and
    colocated engines take whole groups of a node's GPUs.

    Whether vLLM is installed and recent enough is checked separately, with the imports
    (rl_toolkit.models.generation.vllm_worker.check_vllm_version).

    Raises:
        ConfigError: one line naming the key and what would be right.
    """
    if generation["backend"] != "vllm":
        return
    if "vllm" not in generation:
        raise ConfigError(
            "policy.generation.backend=vllm needs the policy.generation.vllm section "
            "(tensor_parallel_size, gpu_memory_utilization, ...; docs/configuration.md, "
            "policy.generation.vllm)"
        )
    vllm = generation["vllm"]
    tp, gpus = vllm["tensor_parallel_size"], cluster["gpus_per_node"]
    if vllm["colocated"] and gpus % tp:
        raise ConfigError(
            f"policy.generation.vllm.tensor_parallel_size={tp} must divide "
            f"cluster.gpus_per_node={gpus}: colocated engines take whole groups of a node's "
            "GPUs (or set policy.generation.vllm.colocated: false)"
        )


# The reward function's own arguments, which no metadata column or bound kwarg may shadow.
_REWARD_FN_ARGUMENTS = ("prompts", "completions")


def check_rollout_config(data: PromptDataConfig, env: EnvConfig) -> None:
    """The rules of the prompt data and the environment: the reward function is called as
    `f(prompts, completions, **env.kwargs, **metadata columns)`, so every name must be free.

    Importing the function and checking `env.kwargs` against its parameters is
    `rl_toolkit.environments.load_reward_fn`'s job (it imports user code).

    Raises:
        ConfigError: one line naming the key, its value and what would be right.
    """
    keys = data["metadata_keys"]
    repeated = sorted({key for key in keys if keys.count(key) > 1})
    if repeated:
        raise ConfigError(f"data.metadata_keys={keys} names {repeated} more than once")
    for key in keys:
        if key in _REWARD_FN_ARGUMENTS:
            raise ConfigError(
                f"data.metadata_keys names {key!r}, which is the reward function's own argument "
                f"{_REWARD_FN_ARGUMENTS}; rename that column"
            )
    name = env["name"]
    if name not in BUILTIN_ENVIRONMENTS and not _is_dotted_path(name):
        raise ConfigError(
            f"env.name={name!r} is unknown; expected one of {sorted(BUILTIN_ENVIRONMENTS)} or "
            "the dotted path of a reward function (my_pkg.rewards.my_reward)"
        )
    for key in env["kwargs"]:
        if key in keys or key in _REWARD_FN_ARGUMENTS:
            raise ConfigError(
                f"env.kwargs.{key} would shadow the reward function's argument {key!r} (a "
                "metadata column or prompts/completions); rename or remove it"
            )


def _is_dotted_path(name: str) -> bool:
    parts = name.split(".")
    return len(parts) >= 2 and all(part.isidentifier() for part in parts)


def check_rm_config(config: RMMasterConfig) -> None:
    """check_master_config's rules for a reward-model config: pairs whole over the workers and
    micro-batches, the rate, the folders.

    Raises:
        ConfigError: one line naming the key, its value and what would be right.
    """
    _check_batch_sizes(config, "rm", config["rm"], group_size=2)
    _check_lr(config["policy"]["optimizer"], "policy")
    _check_output_dirs(config)


def _check_lr(optimizer: OptimizerConfig, section: str) -> None:
    lr = optimizer["kwargs"].get("lr")  # optional: optimizers have defaults
    if lr is not None and not (isinstance(lr, int | float) and lr > 0):
        raise ConfigError(f"{section}.optimizer.kwargs.lr must be a number > 0, got {lr!r}")


def _check_lora_export(config: MasterConfig | SFTMasterConfig | GRPOMasterConfig) -> None:
    # Whether the target modules exist needs the model: rl_toolkit.models.lora.check_lora_config.
    policy, checkpointing = config["policy"], config["checkpointing"]
    adapter = checkpointing["save_hf"] and checkpointing["export_lora"] == "adapter"
    if policy["lora"] is not None and adapter and policy["random_init"]:
        raise ConfigError(
            "checkpointing.export_lora=adapter writes adapters on top of policy.model_name's "
            "weights, but policy.random_init=true trains on random ones; set "
            "checkpointing.export_lora=merged"
        )


def _check_output_dirs(
    config: MasterConfig | SFTMasterConfig | GRPOMasterConfig | RMMasterConfig,
) -> None:
    if config["checkpointing"]["enabled"]:
        check_writable_dir(
            config["checkpointing"]["checkpoint_dir"], "checkpointing.checkpoint_dir"
        )
    check_writable_dir(config["logger"]["log_dir"], "logger.log_dir")


def num_workers(cluster: ClusterConfig) -> int:
    """Workers of the policy: one per GPU (or CPU bundle) of every node."""
    return cluster["gpus_per_node"] * cluster["num_nodes"]


def _check_batch_sizes(
    config: MasterConfig | SFTMasterConfig | RMMasterConfig,
    algorithm: Literal["dpo", "sft", "rm"],
    section: DPOConfig | SFTConfig,
    *,
    group_size: int,
) -> None:
    """Global batches split into whole groups per worker; row micro-batches into whole groups.

    A group is the rows that stay together: 2 for a preference pair, 1 for an SFT sequence.
    ``section`` is ``config[algorithm]``, the section holding ``val_global_batch_size``.
    """
    gbs, micro_batch = config["policy"]["train_global_batch_size"], config["policy"]["micro_batch"]
    cluster = config["cluster"]
    gbs_key = "policy.train_global_batch_size"
    _check_global_batch(micro_batch, "policy", cluster, gbs_key, gbs, "train", group_size)
    val_key, val_gbs = f"{algorithm}.val_global_batch_size", section["val_global_batch_size"]
    _check_global_batch(micro_batch, "policy", cluster, val_key, val_gbs, "logprob", group_size)


def _check_global_batch(
    micro_batch: MicroBatchConfig,
    section: str,
    cluster: ClusterConfig,
    gbs_key: str,
    gbs: int,
    purpose: Literal["train", "logprob"],
    group_size: int,
) -> None:
    """`gbs` rows split into whole groups per worker, and `<section>.micro_batch.<purpose>` rows
    (when the unit is rows) into whole groups that divide a worker's share."""
    workers = num_workers(cluster)
    whole = {1: " evenly", 2: " into whole pairs (2 sequences each)"}.get(
        group_size, f" into whole groups of {group_size} rows"
    )
    if gbs % (group_size * workers):
        raise ConfigError(
            f"{gbs_key}={gbs} must split{whole} over {workers} workers "
            f"(cluster.gpus_per_node x cluster.num_nodes): use a multiple of "
            f"{group_size * workers}"
        )
    rows = micro_batch[purpose]
    if micro_batch["unit"] == "rows" and (rows % group_size or (gbs // workers) % rows):
        multiple = {1: "", 2: " be even (whole pairs) and"}.get(
            group_size, f" be a multiple of {group_size} (whole groups) and"
        )
        raise ConfigError(
            f"{section}.micro_batch.{purpose}={rows} rows must{multiple} divide the "
            f"{gbs // workers} sequences each of the {workers} workers gets of {gbs_key}={gbs}"
        )


def check_writable_dir(path: str, key: str) -> None:
    """Fail now, not at the first save after hours of training, if `path` cannot be written.

    Nothing is created: the nearest folder that exists must be a writable folder.
    """
    existing = Path(os.path.abspath(path))
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise ConfigError(f"{key}={path!r} cannot be created: {existing} is a file, not a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ConfigError(f"{key}={path!r} cannot be written: {existing} is not writable")


# The rl_toolkit checkout (the folder holding assets/ and configs/), for paths in its configs.
REPO_ROOT = Path(__file__).resolve().parents[1]

# The keys that may name a local file or folder (or else a hub name).
_PATH_KEYS = (
    ("policy", "model_name"),
    ("policy", "tokenizer", "name"),
    ("critic", "model_name"),
    ("reward_model", "model_name"),
    ("reward_model", "tokenizer", "name"),
    ("data", "train_data_path"),
    ("data", "val_data_path"),
)


def resolve_local_paths(
    config: MasterConfig | SFTMasterConfig | GRPOMasterConfig | RMMasterConfig,
) -> None:
    """Make the shipped configs work from any working directory, in place.

    A relative path in a model or data key is taken from the working directory when it exists
    there, else from the rl_toolkit checkout when it exists there (``assets/tiny_llama``);
    anything else is left as it is (a hub name, or a path whose absence is reported later).
    """
    for keys in _PATH_KEYS:
        section: Any = config
        for key in keys[:-1]:
            section = section.get(key)  # a recipe's own sections (critic, reward_model)
            if section is None:
                break
        if section is None:
            continue
        value = section.get(keys[-1])  # data paths are optional keys
        if isinstance(value, str) and value:
            section[keys[-1]] = _in_cwd_or_repo(value)


def _in_cwd_or_repo(value: str) -> str:
    path = Path(value)
    if path.is_absolute() or value.startswith("~") or path.exists():
        return value
    in_repo = REPO_ROOT / path
    return str(in_repo) if in_repo.exists() else value
