"""PPO with a critic (and optionally a reward model): the recipe, read top to bottom.

    setup()                      as GRPO's, plus the critic (a value model on the policy's
                                 workers' bundles) and its loss; build_environment(): the
                                 reward model, or the `env` section's reward function
    ppo_train()                  GRPO's loop (grpo.rl_loop): [sft warm-up] -> for each step:
        sample_rollout()             GRPO's: prompts -> completions -> rewards
        train_on_rollout()
            values                   the critic's value of every generated token's state
            advantages               per-token rewards (the score at the last token, minus
                                     beta KL per token with kl_in_reward), GAE, whitening
            critic.train()           ppo.critic_epochs passes, one optimizer step per
                                     critic.train_global_batch_size rows
            policy.train()           GRPO's optimize_policy (after ppo.critic_warmup_steps)
        validate(), checkpoint (policy and critic), log: GRPO's

PPO (Schulman et al. 2017, "Proximal Policy Optimization Algorithms") as RLHF uses it
(Ouyang et al. 2022, InstructGPT): each completion is an episode whose actions are its tokens;
the reward arrives at the last token and the KL to the reference is paid at every token; the
critic's values give GAE advantages per token; the policy loss is GRPO's ClippedPGLossFn on
them, the critic's a clipped squared error to the returns (ValueLossFn). The config is GRPO's
(its `grpo` section is the loop) plus `ppo`, `critic`, `value_loss_fn` and `reward_model`.

Everything computed from the batch as a whole (advantages, whitening, the counts the losses
normalise by) is computed on the driver or summed over workers, so neither the policy's nor the
critic's update depends on the number of workers or the micro-batch size. This module imports
neither Ray nor torch.distributed.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torchdata.stateful_dataloader import StatefulDataLoader

from rl_toolkit.algorithms.advantages import (
    MomentsReduce,
    explained_variance,
    gae,
    masked_whiten,
    token_rewards,
)
from rl_toolkit.algorithms.grpo import (
    GRPOSaveState,
    add_reference_logprobs,
    merge_optimizer_steps,
    optimize_policy,
    rl_loop,
)
from rl_toolkit.algorithms.loss_functions import ClippedPGLossFn, ValueLossFn, kl_estimate
from rl_toolkit.algorithms.utils import (
    build_cluster,
    build_policy,
    build_value_model,
    check_runtime_config,
    open_run_folder,
    resume_loader_and_logger,
    save_policy,
    save_training_checkpoint,
    save_value_model,
    set_seed,
)
from rl_toolkit.config_schema import PPOMasterConfig, check_ppo_config, micro_batches
from rl_toolkit.data import build_prompt_dataloader
from rl_toolkit.data.prompts import TokenizedPromptDataset
from rl_toolkit.distributed.batched_data_dict import BatchedDataDict
from rl_toolkit.distributed.virtual_cluster import RayVirtualCluster, check_cluster_fits
from rl_toolkit.environments import Environment
from rl_toolkit.environments.worker import RayEnvironment
from rl_toolkit.models.attention import check_attn_implementation
from rl_toolkit.models.generation.interfaces import GenerationInterface
from rl_toolkit.models.generation.vllm_generation import VllmGeneration
from rl_toolkit.models.generation.vllm_worker import check_vllm_version
from rl_toolkit.models.optim import check_optimizer_config
from rl_toolkit.models.policy.lm_policy import Policy
from rl_toolkit.models.reward.reward_model import RewardModel
from rl_toolkit.models.value.value_model import ValueModel
from rl_toolkit.utils.checkpoint import CheckpointManager
from rl_toolkit.utils.hf import warn_if_random_init_of_trained_model
from rl_toolkit.utils.logger import Logger
from rl_toolkit.utils.timer import Timer

MasterConfig = PPOMasterConfig
PPOSaveState = GRPOSaveState  # the same loop, so the same place in it

# The counts of a step's rows and tokens (summed over its optimizer steps).
_COUNTS = ("global_num_tokens", "num_valid_samples")
# The keys a critic step sends to the workers.
CRITIC_KEYS = ("input_ids", "input_lengths", "token_mask", "sample_mask", "values", "returns")


def _default_ppo_save_state() -> PPOSaveState:
    return {"epoch": 0, "epoch_batches": 0, "total_steps": 0, "consumed_samples": 0}


# ---------------------------------------------------------------------------------------------
# Setup


def setup(
    master_config: MasterConfig,
    tokenizer: Any,
    train_dataset: TokenizedPromptDataset,
    val_dataset: TokenizedPromptDataset,
) -> tuple[
    Policy,
    GenerationInterface,
    ValueModel,
    RayVirtualCluster,
    StatefulDataLoader,
    StatefulDataLoader,
    ClippedPGLossFn,
    ValueLossFn,
    Logger,
    CheckpointManager,
    PPOSaveState,
    MasterConfig,
]:
    """Build everything `ppo_train` needs but the environment (`build_environment`), resuming
    when asked.

    The critic's workers share the policy's bundles (and the reward model's, when there is one:
    the cluster is built for every worker group). Everything that can fail on a user mistake is
    checked before any worker starts and raises ConfigError.

    Returns:
        (policy, policy_generation, critic, cluster, train_dataloader, val_dataloader, loss_fn,
        value_loss_fn, logger, checkpointer, ppo_save_state, master_config).
    """
    policy_config, grpo_config = master_config["policy"], master_config["grpo"]
    check_config(master_config)
    check_cluster_fits(master_config["cluster"], policy_config)
    check_cluster_fits(master_config["cluster"], master_config["critic"], section="critic")
    if master_config["reward_model"] is not None:
        check_cluster_fits(
            master_config["cluster"], master_config["reward_model"], section="reward_model"
        )
    set_seed(grpo_config["seed"])
    warn_if_random_init_of_trained_model(policy_config)

    checkpointer, resume_path, save_state = open_run_folder(
        master_config, _default_ppo_save_state(), PPOSaveState
    )
    train_dataloader, val_dataloader = (
        build_prompt_dataloader(
            dataset, tokenizer, master_config["data"], batch_size=batch_size, shuffle=shuffle,
            seed=grpo_config["seed"], drop_last=shuffle,
        )
        for dataset, batch_size, shuffle in (
            (train_dataset, grpo_config["num_prompts_per_step"], master_config["data"]["shuffle"]),
            (val_dataset, grpo_config["val_global_batch_size"], False),
        )
    )  # fmt: skip
    logger = resume_loader_and_logger(master_config, resume_path, train_dataloader, save_state)
    cluster = build_cluster(
        master_config["cluster"], "ppo", num_worker_groups=_num_worker_groups(master_config)
    )
    engines = None  # started before the policy: vLLM sizes its memory by what is free then
    if policy_config["generation"]["backend"] == "vllm":
        engines = VllmGeneration.start(
            cluster, policy_config, tokenizer,
            worker_timeout_s=master_config["cluster"]["worker_timeout_s"],
            worker_env_vars=master_config["cluster"]["worker_env_vars"],
        )  # fmt: skip
    policy = build_policy(
        cluster,
        policy_config,
        master_config["cluster"],
        tokenizer,
        init_reference_model=master_config["loss_fn"]["reference_policy_kl_penalty"] > 0,
        reference_cache=None,
        resume_path=resume_path,
    )
    critic = build_value_model(
        cluster, master_config["critic"], master_config["cluster"], tokenizer, section="critic",
        resume_path=resume_path,
    )  # fmt: skip
    return (
        policy, engines or policy, critic, cluster, train_dataloader, val_dataloader,
        ClippedPGLossFn(master_config["loss_fn"]), ValueLossFn(master_config["value_loss_fn"]),
        logger, checkpointer, save_state, master_config,
    )  # fmt: skip


def _num_worker_groups(master_config: MasterConfig) -> int:
    """Worker groups sharing each bundle: the policy and the critic, colocated vLLM engines,
    the reward model."""
    generation = master_config["policy"]["generation"]
    colocated_engines = generation["backend"] == "vllm" and generation["vllm"]["colocated"]
    return 2 + int(colocated_engines) + int(master_config["reward_model"] is not None)


def build_environment(cluster: RayVirtualCluster, master_config: MasterConfig) -> Environment:
    """What scores the completions: the reward model on `cluster` (`reward_model` set), else the
    `env` section's reward function in its Ray actor. Either has `shutdown()`."""
    reward_model = master_config["reward_model"]
    if reward_model is None:
        return RayEnvironment(master_config["env"])
    return RewardModel(
        cluster,
        reward_model,
        worker_timeout_s=master_config["cluster"]["worker_timeout_s"],
        worker_env_vars=master_config["cluster"]["worker_env_vars"],
    )


def check_config(master_config: MasterConfig) -> None:
    """Every check of the config that needs neither data nor a cluster (setup calls it first;
    examples/run_ppo.py calls it before tokenising).

    Raises:
        ConfigError: one line naming the key and what would be right.
    """
    check_ppo_config(master_config)
    check_runtime_config(master_config)  # the policy's attention and optimizer, export, env vars
    if master_config["policy"]["generation"]["backend"] == "vllm":
        check_vllm_version()
    critic = master_config["critic"]
    check_attn_implementation(critic["attn_implementation"], key="critic.attn_implementation")
    check_optimizer_config(critic, section="critic")
    if master_config["reward_model"] is not None:
        check_attn_implementation(
            master_config["reward_model"]["attn_implementation"],
            key="reward_model.attn_implementation",
        )


# ---------------------------------------------------------------------------------------------
# Advantages and the step's training


def compute_advantages(
    rollout: BatchedDataDict, master_config: MasterConfig, *, reduce: MomentsReduce = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """`[N, T]` GAE advantages (whitened when `ppo.whiten_advantages`) and returns of a rollout
    with its `rewards` and the critic's `values` (and `reference_policy_logprobs` for a KL in
    the reward).

    The per-token reward is the completion's reward at its last token, minus
    `loss_fn.reference_policy_kl_penalty` times the KL estimate of every token when
    `loss_fn.kl_in_reward` (else the KL is a term of the policy loss). Everything but the
    whitening is per row; `reduce` sums the whitening's moments when `rollout` is one shard of
    the batch (the engine's reward module).
    """
    loss_config, ppo_config = master_config["loss_fn"], master_config["ppo"]
    beta = loss_config["reference_policy_kl_penalty"]
    kl = None
    if loss_config["kl_in_reward"] and beta > 0:
        kl = kl_estimate(
            rollout["generation_logprobs"],
            rollout["reference_policy_logprobs"],
            loss_config["kl_estimator"],
        )
    mask = rollout["token_mask"]
    rewards = token_rewards(rollout["rewards"], mask, kl=kl, beta=beta)
    advantages, returns = gae(
        rewards,
        rollout["values"],
        mask,
        gamma=ppo_config["gae_gamma"],
        lam=ppo_config["gae_lambda"],
    )
    if ppo_config["whiten_advantages"]:
        valid = mask * rollout["sample_mask"][:, None]
        advantages = masked_whiten(advantages, valid, reduce=reduce)
    return advantages, returns


def train_on_rollout(
    policy: Policy,
    critic: ValueModel,
    rollout: BatchedDataDict,
    loss_fn: ClippedPGLossFn,
    value_loss_fn: ValueLossFn,
    master_config: MasterConfig,
    timer: Timer,
    *,
    train_policy: bool,
) -> dict[str, float]:
    """Values, reference log-probs (KL), advantages, then the critic's optimizer steps and, with
    `train_policy`, the policy's.

    Returns:
        The policy's metrics (when it trained), the critic's as `critic/*` (with
        `critic/explained_variance` of the rollout's values), and the step's counts.
    """
    critic_config = master_config["critic"]
    with timer.time("values"):
        values = critic.get_values(rollout, micro_batches(critic_config["micro_batch"], "logprob"))
    rollout["values"] = values["values"]
    if master_config["loss_fn"]["reference_policy_kl_penalty"] > 0:
        add_reference_logprobs(policy, rollout, master_config, timer)
    rollout["advantages"], rollout["returns"] = compute_advantages(rollout, master_config)
    valid = rollout["token_mask"] * rollout["sample_mask"][:, None]
    variance_explained = explained_variance(rollout["values"], rollout["returns"], valid)

    batch: BatchedDataDict = BatchedDataDict(
        {key: rollout[key] for key in CRITIC_KEYS}, group_size=rollout.group_size
    )
    critic_metrics = _optimize_critic(critic, batch, value_loss_fn, master_config, timer)
    metrics = {f"critic/{key}": value for key, value in critic_metrics.items()}
    metrics["critic/explained_variance"] = variance_explained
    if train_policy:
        metrics |= optimize_policy(policy, rollout, loss_fn, master_config, timer)
    # The rows and tokens of the step, with or without a policy update.
    for key in _COUNTS:
        metrics[key] = critic_metrics[key]
    return metrics


def _optimize_critic(
    critic: ValueModel,
    batch: BatchedDataDict,
    value_loss_fn: ValueLossFn,
    master_config: MasterConfig,
    timer: Timer,
) -> dict[str, float]:
    """`ppo.critic_epochs` passes over the batch, one optimizer step per critic global batch;
    the metrics averaged over the steps, the counts those of one pass."""
    critic_config, epochs = master_config["critic"], master_config["ppo"]["critic_epochs"]
    gbs = critic_config["train_global_batch_size"]
    train_mbs = micro_batches(critic_config["micro_batch"], "train")
    # "training" is the critic's and the policy's optimizer steps (tokens_per_second's time).
    with timer.time("training"), timer.time("critic_training"):
        steps = [
            critic.train(batch.slice(start, start + gbs), value_loss_fn, train_mbs)
            for _ in range(epochs)
            for start in range(0, batch.size, gbs)
        ]
    return merge_critic_steps(steps, epochs)


def merge_critic_steps(steps: list[dict[str, float]], epochs: int) -> dict[str, float]:
    """The metrics of `epochs` passes of critic optimizer steps over a batch: averaged over the
    steps, the counts (rows, tokens) those of one pass."""
    metrics = merge_optimizer_steps(steps)
    return metrics | {key: metrics[key] / epochs for key in _COUNTS}


def save_checkpoint(
    policy: Policy,
    critic: ValueModel,
    checkpointer: CheckpointManager,
    train_dataloader: StatefulDataLoader,
    state: PPOSaveState,
    master_config: MasterConfig,
) -> Path:
    """The policy's checkpoint (utils.save_checkpoint's) with the critic's in `critic/`."""

    def save_models(folder: Path) -> None:
        save_policy(policy, folder, master_config["checkpointing"])
        save_value_model(critic, folder, master_config["checkpointing"], export_hf=False)

    return save_training_checkpoint(
        save_models, checkpointer, train_dataloader, state, master_config
    )


# ---------------------------------------------------------------------------------------------
# Training


def ppo_train(
    policy: Policy,
    policy_generation: GenerationInterface,
    critic: ValueModel,
    train_dataloader: StatefulDataLoader,
    val_dataloader: StatefulDataLoader,
    tokenizer: Any,
    loss_fn: ClippedPGLossFn,
    value_loss_fn: ValueLossFn,
    environment: Environment,
    logger: Logger,
    checkpointer: CheckpointManager,
    ppo_save_state: PPOSaveState,
    master_config: MasterConfig,
    train_dataset: TokenizedPromptDataset | None = None,
) -> PPOSaveState:
    """Train until `grpo.max_num_steps` or `grpo.max_num_epochs`, validating, checkpointing and
    logging; the first `ppo.critic_warmup_steps` steps train the critic only.

    Args:
        train_dataset: the training prompts, needed for the policy's SFT warm-up only.

    Returns the final save state.
    """
    warmup_steps = master_config["ppo"]["critic_warmup_steps"]

    def train_step(rollout: BatchedDataDict, timer: Timer) -> tuple[dict[str, float], bool]:
        train_policy = ppo_save_state["total_steps"] >= warmup_steps
        metrics = train_on_rollout(
            policy, critic, rollout, loss_fn, value_loss_fn, master_config, timer,
            train_policy=train_policy,
        )  # fmt: skip
        return metrics, train_policy

    def save(state: PPOSaveState) -> Path:
        return save_checkpoint(policy, critic, checkpointer, train_dataloader, state, master_config)

    return rl_loop(
        policy, policy_generation, train_dataloader, val_dataloader, tokenizer, environment,
        logger, checkpointer, ppo_save_state, master_config, train_dataset,
        train_step=train_step, save=save, console_metrics=_CONSOLE_METRICS,
    )  # fmt: skip


# What the console shows; every metric goes to metrics.jsonl, TensorBoard and wandb.
_CONSOLE_METRICS = (
    "reward", "loss", "critic/loss", "critic/explained_variance", "response_length",
    "tokens_per_second",
)  # fmt: skip
