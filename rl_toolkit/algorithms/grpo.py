"""GRPO: the recipe, read top to bottom.

    setup()                      logger, checkpoints (and the state to resume from), prompt
                                 loaders, cluster, policy (with a reference model when the loss
                                 has a KL term), loss
    grpo_train()                 rl_loop(): [sft warm-up] -> for each step:
        sample_rollout()             prompts -> G completions each (policy_generation.generate)
                                     -> rewards (environment.score); dynamic sampling refills
                                     zero-variance groups; overlong filtering
        advantages                   per group (grpo.adv_estimator), on the driver
        policy.train()               one optimizer step per train_global_batch_size rows
        refit                        only when the generator is not the policy itself (vLLM);
                                     the run's first rollout after it is checked
                                     (token_mult_prob_error, refit_check.py)
        validate()                   greedy (or k samples: pass@k) reward on validation prompts
        checkpoint, log

Everything a step computes from the batch as a whole (rewards, advantages, the counts the loss
normalises by) is computed on the driver or summed over workers, so the update does not depend
on the number of workers or the micro-batch size; sampling is seeded per (seed, step, prompt,
sample), so a resumed run samples what the uninterrupted one did. The policy is reached only
through the `Policy` facade and the generation interface, the environment through its `score`;
this module imports neither Ray nor torch.distributed. Batch sizes count sequences.

The names and signatures follow NeMo RL's `nemo_rl.algorithms.grpo`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, NotRequired, TypedDict

import torch
from torchdata.stateful_dataloader import StatefulDataLoader

from rl_toolkit.algorithms.advantages import (
    ADVANTAGE_ESTIMATORS,
    kl_penalized_rewards,
    zero_variance_groups,
)
from rl_toolkit.algorithms.loss_functions import ClippedPGLossFn, NLLLossFn
from rl_toolkit.algorithms.refit_check import check_refit
from rl_toolkit.algorithms.utils import (
    build_cluster,
    build_policy,
    check_runtime_config,
    log_step,
    log_timing,
    open_run_folder,
    push_export_to_hub,
    resume_loader_and_logger,
    save_checkpoint,
    set_seed,
)
from rl_toolkit.config_schema import GRPOConfig as GRPOConfig  # NeMo RL's import path
from rl_toolkit.config_schema import GRPOMasterConfig, check_grpo_config, micro_batches
from rl_toolkit.data import answer_sft_batch, build_prompt_dataloader, repeat_prompts
from rl_toolkit.data.collate import completion_texts
from rl_toolkit.data.prompts import TokenizedPromptDataset
from rl_toolkit.distributed.batched_data_dict import BatchedDataDict
from rl_toolkit.distributed.virtual_cluster import (
    RayVirtualCluster,
    check_cluster_fits,
)
from rl_toolkit.environments import Environment
from rl_toolkit.models.generation.interfaces import GenerationInterface
from rl_toolkit.models.generation.vllm_generation import VllmGeneration
from rl_toolkit.models.generation.vllm_worker import check_vllm_version
from rl_toolkit.models.policy.lm_policy import Policy
from rl_toolkit.utils.checkpoint import CheckpointManager
from rl_toolkit.utils.hf import warn_if_random_init_of_trained_model
from rl_toolkit.utils.logger import Logger
from rl_toolkit.utils.timer import Timer

MasterConfig = GRPOMasterConfig  # NeMo RL's name for it in this module

# The keys a training step sends to the workers (the rollout's lists stay on the driver).
TRAIN_KEYS = (
    "input_ids", "input_lengths", "token_mask", "sample_mask", "advantages",
    "generation_logprobs", "reference_policy_logprobs", "prev_logprobs",
)  # fmt: skip


class GRPOSaveState(TypedDict):
    """Where training stands; saved in every checkpoint's training_info.json."""

    epoch: int  # the epoch in progress (0-based)
    epoch_batches: int  # prompt batches of that epoch used so far
    total_steps: int  # GRPO steps done
    consumed_samples: int  # completions trained on
    val_reward: NotRequired[float]  # the last validation reward, once validation has run


def _default_grpo_save_state() -> GRPOSaveState:
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
    RayVirtualCluster,
    StatefulDataLoader,
    StatefulDataLoader,
    ClippedPGLossFn,
    Logger,
    CheckpointManager,
    GRPOSaveState,
    MasterConfig,
]:
    """Build everything `grpo_train` needs but the environment, resuming when asked.

    Everything that can fail on a user mistake is checked before any worker starts and raises
    ConfigError. The generator is the policy itself (backend hf) or vLLM engines (backend vllm),
    on the policy's GPUs (colocated) or on their own.

    Returns:
        (policy, policy_generation, cluster, train_dataloader, val_dataloader, loss_fn, logger,
        checkpointer, grpo_save_state, master_config), as NeMo RL's grpo.setup.
    """
    policy_config, grpo_config = master_config["policy"], master_config["grpo"]
    check_config(master_config)
    check_cluster_fits(master_config["cluster"], policy_config)
    set_seed(grpo_config["seed"])
    warn_if_random_init_of_trained_model(policy_config)

    checkpointer, resume_path, grpo_save_state = open_run_folder(
        master_config, _default_grpo_save_state(), GRPOSaveState
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
    logger = resume_loader_and_logger(master_config, resume_path, train_dataloader, grpo_save_state)
    generation = policy_config["generation"]
    colocated_engines = generation["backend"] == "vllm" and generation["vllm"]["colocated"]
    cluster = build_cluster(
        master_config["cluster"], "grpo_policy", num_worker_groups=2 if colocated_engines else 1
    )
    loss_fn = ClippedPGLossFn(master_config["loss_fn"])
    engines = None  # started before the policy: vLLM sizes its memory by what is free then
    if generation["backend"] == "vllm":
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
    return (
        policy, engines or policy, cluster, train_dataloader, val_dataloader, loss_fn, logger,
        checkpointer, grpo_save_state, master_config,
    )  # fmt: skip


def check_config(master_config: MasterConfig) -> None:
    """Every check of the config that needs neither data nor a cluster (setup calls it first;
    examples/run_grpo.py calls it before tokenising).

    Raises:
        ConfigError: one line naming the key and what would be right.
    """
    check_grpo_config(master_config)
    check_runtime_config(master_config)
    if master_config["policy"]["generation"]["backend"] == "vllm":
        check_vllm_version()


# ---------------------------------------------------------------------------------------------
# Rollouts


def generate_and_score(
    policy_generation: GenerationInterface,
    environment: Environment,
    prompts: BatchedDataDict,
    tokenizer: Any,
    *,
    group_size: int,
    step: int,
    greedy: bool = False,
) -> tuple[BatchedDataDict, dict[str, float]]:
    """`group_size` completions of each prompt, with their `rewards` [N], and the
    environment's metrics."""
    rollout = policy_generation.generate(
        repeat_prompts(prompts, group_size), step=step, greedy=greedy
    )
    result = environment.score(
        rollout["prompts"], completion_texts(rollout, tokenizer), rollout["metadata"]
    )
    rollout["rewards"] = torch.tensor(result.rewards, dtype=torch.float32)
    return rollout, result.metrics


def sample_rollout(
    policy_generation: GenerationInterface,
    environment: Environment,
    next_prompts: Callable[[], BatchedDataDict | None],
    tokenizer: Any,
    grpo_config: GRPOConfig,
    step: int,
) -> tuple[BatchedDataDict, dict[str, float]] | None:
    """The step's rollout of `num_prompts_per_step` groups, or None when the epoch has no
    prompts left.

    With dynamic sampling (DAPO), groups whose rewards are all equal are set aside and further
    prompt batches are generated, at most `max_gen_batches` in all (and not past the epoch's
    end); a step still short trains on set-aside groups with sample_mask 0. With overlong
    filtering, truncated completions get sample_mask 0.
    """
    group_size = grpo_config["num_generations_per_prompt"]
    wanted = grpo_config["num_prompts_per_step"] * group_size
    dynamic = grpo_config["dynamic_sampling"]
    kept: list[BatchedDataDict] = []
    set_aside: list[BatchedDataDict] = []
    env_metrics: dict[str, float] = {}
    rewards: list[torch.Tensor] = []
    num_batches = 0
    while sum(b.size for b in kept) < wanted and num_batches < dynamic["max_gen_batches"]:
        prompts = next_prompts()
        if prompts is None:
            break
        num_batches += 1
        rollout, metrics = generate_and_score(
            policy_generation, environment, prompts, tokenizer, group_size=group_size, step=step
        )
        env_metrics = {k: env_metrics.get(k, 0.0) + v for k, v in metrics.items()}
        rewards.append(rollout["rewards"])
        if not dynamic["enabled"]:
            kept.append(rollout)
            break
        flat = zero_variance_groups(rollout["rewards"], group_size)  # [groups]
        rows = flat.repeat_interleave(group_size)
        kept.append(rollout.select_indices((~rows).nonzero().squeeze(1)))
        set_aside.append(rollout.select_indices(rows.nonzero().squeeze(1)))
    if num_batches == 0:
        return None
    rollout = _concat([*kept, *set_aside], tokenizer.pad_token_id).slice(0, wanted)
    num_kept = sum(b.size for b in kept)
    rollout["sample_mask"][num_kept:] = 0.0  # set-aside groups filling the step
    if grpo_config["overlong_filtering"]:
        rollout["sample_mask"] *= (~rollout["truncated"]).float()
    all_rewards = torch.cat(rewards)
    metrics = {
        **{f"env/{k}": v for k, v in env_metrics.items()},
        "reward": all_rewards.mean().item(),  # every completion generated this step
        "zero_variance_groups": zero_variance_groups(all_rewards, group_size).float().mean().item(),
        "gen_batches": num_batches,
        "filled_groups": max(wanted - num_kept, 0) // group_size if dynamic["enabled"] else 0,
        "truncated": rollout["truncated"].float().mean().item(),
        "response_length": rollout["token_mask"].sum(dim=1).mean().item(),
    }
    return rollout, metrics


def _concat(batches: list[BatchedDataDict], pad_token_id: int) -> BatchedDataDict:
    batches = [batch for batch in batches if batch.size > 0]
    return BatchedDataDict.from_batches(batches, pad_value_dict={"input_ids": pad_token_id})


def compute_advantages(rollout: BatchedDataDict, master_config: MasterConfig) -> torch.Tensor:
    """`[N, T]` advantages on the generated tokens: the group estimator of the rewards (minus
    the KL to the reference when `loss_fn.kl_in_reward`), spread over each completion."""
    loss_config, grpo_config = master_config["loss_fn"], master_config["grpo"]
    rewards = rollout["rewards"]
    if loss_config["kl_in_reward"] and loss_config["reference_policy_kl_penalty"] > 0:
        rewards = kl_penalized_rewards(
            rewards,
            rollout["generation_logprobs"],
            rollout["reference_policy_logprobs"],
            rollout["token_mask"],
            beta=loss_config["reference_policy_kl_penalty"],
            estimator=loss_config["kl_estimator"],
        )
    estimator = ADVANTAGE_ESTIMATORS[grpo_config["adv_estimator"]]
    advantages = estimator(rewards, grpo_config["num_generations_per_prompt"])  # (N,)
    return advantages[:, None] * rollout["token_mask"]


def train_on_rollout(
    policy: Policy,
    rollout: BatchedDataDict,
    loss_fn: ClippedPGLossFn,
    master_config: MasterConfig,
    timer: Timer,
) -> dict[str, float]:
    """Reference log-probs (KL), advantages, then one optimizer step per global batch
    (`optimize_policy`)."""
    if master_config["loss_fn"]["reference_policy_kl_penalty"] > 0:
        add_reference_logprobs(policy, rollout, master_config, timer)
    rollout["advantages"] = compute_advantages(rollout, master_config)
    return optimize_policy(policy, rollout, loss_fn, master_config, timer)


def add_reference_logprobs(
    policy: Policy, rollout: BatchedDataDict, master_config: MasterConfig, timer: Timer
) -> None:
    """The reference policy's log-probs of the generated tokens, as the rollout's
    `reference_policy_logprobs` (for a KL term)."""
    logprob_mbs = micro_batches(master_config["policy"]["micro_batch"], "logprob")
    with timer.time("reference_logprobs"):
        reference = policy.reference_logprobs(rollout, logprob_mbs)["reference_logprobs"]
    rollout["reference_policy_logprobs"] = reference


def optimize_policy(
    policy: Policy,
    rollout: BatchedDataDict,
    loss_fn: ClippedPGLossFn,
    master_config: MasterConfig,
    timer: Timer,
) -> dict[str, float]:
    """One optimizer step per `policy.train_global_batch_size` rows of a rollout that has its
    `advantages` (and what the loss reads).

    With several optimizer steps per rollout, the ratio's denominator is the policy before the
    first of them (`prev_logprobs`); with one, the loss uses the current log-probs detached (the
    ratio is 1) and nothing is recomputed.
    """
    policy_config = master_config["policy"]
    gbs = policy_config["train_global_batch_size"]
    if rollout.size > gbs:
        with timer.time("prev_logprobs"):
            logprob_mbs = micro_batches(policy_config["micro_batch"], "logprob")
            logprobs = policy.logprobs(rollout, logprob_mbs)["logprobs"]
            rollout["prev_logprobs"] = logprobs * rollout["token_mask"]
    batch: BatchedDataDict = BatchedDataDict(
        {key: rollout[key] for key in TRAIN_KEYS if key in rollout},
        group_size=rollout.group_size,
    )
    train_mbs = micro_batches(policy_config["micro_batch"], "train")
    step_metrics = []
    with timer.time("training"):
        for start in range(0, batch.size, gbs):
            step_metrics.append(policy.train(batch.slice(start, start + gbs), loss_fn, train_mbs))
    return merge_optimizer_steps(step_metrics)


def merge_optimizer_steps(metrics: list[dict[str, float]]) -> dict[str, float]:
    """The metrics of a rollout's optimizer steps: counts summed, the rest averaged."""
    summed = ("global_num_tokens", "num_valid_samples")
    return {
        key: sum(m[key] for m in metrics) / (1 if key in summed else len(metrics))
        for key in metrics[0]
    }


# ---------------------------------------------------------------------------------------------
# Supervised warm-up


def sft_warmup(
    policy: Policy,
    train_dataset: TokenizedPromptDataset,
    tokenizer: Any,
    master_config: MasterConfig,
    logger: Logger,
) -> None:
    """`grpo.sft_warmup_steps` NLL steps on the prompts' reference answers (the metadata column
    `grpo.sft_warmup_answer_key`), through the same policy: SFT, then RL, in one run.

    Run only before the first GRPO step; a run killed during it repeats it whole.
    """
    grpo_config, policy_config = master_config["grpo"], master_config["policy"]
    loader = build_prompt_dataloader(
        train_dataset, tokenizer, master_config["data"],
        batch_size=policy_config["train_global_batch_size"], shuffle=True,
        seed=grpo_config["seed"] + 1, drop_last=True,
    )  # fmt: skip
    loss_fn, mbs = NLLLossFn(), micro_batches(policy_config["micro_batch"], "train")
    key, losses = grpo_config["sft_warmup_answer_key"], list[float]()
    while len(losses) < grpo_config["sft_warmup_steps"]:
        for prompts in loader:
            answers = [str(metadata[key]) for metadata in prompts["metadata"]]
            batch = answer_sft_batch(
                prompts, answers, tokenizer, policy_config["max_total_sequence_length"]
            )
            losses.append(policy.train(batch, loss_fn, mbs)["loss"])
            if len(losses) == grpo_config["sft_warmup_steps"]:
                break
    # Logged as step 0: the GRPO steps are numbered from 1.
    summary = {"steps": len(losses), "first_loss": losses[0], "loss": losses[-1]}
    logger.log_metrics(summary, 0, prefix="sft_warmup")
    logger.print_metrics(summary, 0, prefix="sft_warmup")


# ---------------------------------------------------------------------------------------------
# Validation


def validate(
    policy_generation: GenerationInterface,
    val_dataloader: StatefulDataLoader,
    environment: Environment,
    tokenizer: Any,
    step: int,
    master_config: MasterConfig,
) -> tuple[dict[str, float], list[dict[str, Any]]]:
    """The reward on the first `max_val_samples` validation prompts: greedy with
    `val_num_generations: 1`, else k samples a prompt and pass@k (the mean over prompts of
    their best sample's reward).

    Returns:
        (metrics, samples): `reward`, `pass@k` (k > 1), `response_length`; and the first
        `num_val_samples_to_log` completions with their prompt and reward.
    """
    grpo_config = master_config["grpo"]
    k = grpo_config["val_num_generations"]
    rewards, lengths, seen = list[torch.Tensor](), list[torch.Tensor](), 0
    samples: list[dict[str, Any]] = []
    for prompts in val_dataloader:
        prompts = prompts.slice(0, min(prompts.size, grpo_config["max_val_samples"] - seen))
        seen += prompts.size
        # Seeds of validation steps differ from training's (steps >= 0).
        rollout, _ = generate_and_score(
            policy_generation, environment, prompts, tokenizer, group_size=k, step=-1 - step,
            greedy=k == 1,
        )  # fmt: skip
        rewards.append(rollout["rewards"])
        lengths.append(rollout["token_mask"].sum(dim=1))
        texts = completion_texts(rollout, tokenizer)
        for row in range(min(rollout.size, grpo_config["num_val_samples_to_log"] - len(samples))):
            samples.append(
                {"prompt": rollout["prompts"][row], "completion": texts[row],
                 "reward": rollout["rewards"][row].item()}
            )  # fmt: skip
        if seen >= grpo_config["max_val_samples"]:
            break
    all_rewards = torch.cat(rewards)
    metrics = {
        "reward": all_rewards.mean().item(),
        "response_length": torch.cat(lengths).mean().item(),
    }
    if k > 1:
        metrics[f"pass@{k}"] = all_rewards.view(-1, k).max(dim=1).values.mean().item()
    return metrics, samples


def run_validation(
    policy_generation: GenerationInterface,
    val_dataloader: StatefulDataLoader,
    environment: Environment,
    tokenizer: Any,
    master_config: MasterConfig,
    logger: Logger,
    state: GRPOSaveState,
    timer: Timer,
) -> None:
    """`validate` at the state's step: the reward in the save state, the metrics and samples in
    the logs."""
    step = state["total_steps"]
    with timer.time("validation"):
        metrics, samples = validate(
            policy_generation, val_dataloader, environment, tokenizer, step, master_config
        )
    state["val_reward"] = metrics["reward"]
    logger.log_metrics(metrics, step, prefix="validation")
    logger.print_metrics(metrics, step, prefix="validation")
    logger.log_samples(samples, step)


# ---------------------------------------------------------------------------------------------
# Training


def grpo_train(
    policy: Policy,
    policy_generation: GenerationInterface,
    train_dataloader: StatefulDataLoader,
    val_dataloader: StatefulDataLoader,
    tokenizer: Any,
    loss_fn: ClippedPGLossFn,
    environment: Environment,
    logger: Logger,
    checkpointer: CheckpointManager,
    grpo_save_state: GRPOSaveState,
    master_config: MasterConfig,
    train_dataset: TokenizedPromptDataset | None = None,
) -> GRPOSaveState:
    """Train until `max_num_steps` or `max_num_epochs`, validating, checkpointing and logging.

    Args:
        train_dataset: the training prompts, needed for the SFT warm-up only.

    Returns the final save state.
    """

    def train_step(rollout: BatchedDataDict, timer: Timer) -> tuple[dict[str, float], bool]:
        return train_on_rollout(policy, rollout, loss_fn, master_config, timer), True

    def save(state: GRPOSaveState) -> Path:
        return save_checkpoint(policy, checkpointer, train_dataloader, state, master_config)

    return rl_loop(
        policy, policy_generation, train_dataloader, val_dataloader, tokenizer, environment,
        logger, checkpointer, grpo_save_state, master_config, train_dataset,
        train_step=train_step, save=save, console_metrics=_CONSOLE_METRICS,
    )  # fmt: skip


def rl_loop(
    policy: Policy,
    policy_generation: GenerationInterface,
    train_dataloader: StatefulDataLoader,
    val_dataloader: StatefulDataLoader,
    tokenizer: Any,
    environment: Environment,
    logger: Logger,
    checkpointer: CheckpointManager,
    state: GRPOSaveState,
    master_config: MasterConfig,
    train_dataset: TokenizedPromptDataset | None,
    *,
    train_step: Callable[[BatchedDataDict, Timer], tuple[dict[str, float], bool]],
    save: Callable[[GRPOSaveState], Path],
    console_metrics: tuple[str, ...],
) -> GRPOSaveState:
    """The loop of GRPO and PPO (the `grpo` section): the SFT warm-up, then per step a rollout,
    `train_step(rollout, timer)` (its metrics, and whether the policy changed), the refit of a
    separate generation engine, validation, logging and `save(state)` every save_period.
    """
    grpo_config = master_config["grpo"]
    timer = Timer()
    is_fresh = state["total_steps"] == 0
    if is_fresh and grpo_config["sft_warmup_steps"] > 0:
        assert train_dataset is not None, "the SFT warm-up trains on the training prompts"
        with timer.time("sft_warmup"):
            sft_warmup(policy, train_dataset, tokenizer, master_config, logger)
    # A separate engine starts with dummy weights: the policy's go in now, and the first rollout
    # after this refit is checked against the policy's log-probs.
    check_next_rollout = policy_generation is not policy
    if check_next_rollout:
        with timer.time("refit"):
            policy_generation.update_weights(policy)
    if is_fresh and grpo_config["val_at_start"]:
        run_validation(
            policy_generation, val_dataloader, environment, tokenizer, master_config, logger,
            state, timer,
        )  # fmt: skip
    logger.log_metrics(timer.pop_totals(), 0, prefix="timing")

    batches: Iterator[BatchedDataDict] = iter(train_dataloader)

    def next_prompts() -> BatchedDataDict | None:
        if state["epoch_batches"] == len(train_dataloader):
            return None
        state["epoch_batches"] += 1
        return next(batches)

    total_steps = grpo_config["max_num_steps"]
    logger.start_progress(total_steps, initial=state["total_steps"])
    while state["total_steps"] < total_steps and state["epoch"] < grpo_config["max_num_epochs"]:
        with timer.time("generation"):
            sampled = sample_rollout(
                policy_generation, environment, next_prompts, tokenizer, grpo_config,
                step=state["total_steps"],
            )  # fmt: skip
        if sampled is None:  # the epoch is over: the loader's next iterator starts another
            assert next(batches, None) is None, "the epoch has no batch left"
            state["epoch"], state["epoch_batches"] = state["epoch"] + 1, 0
            batches = iter(train_dataloader)
            continue
        rollout, rollout_metrics = sampled
        policy_generation.finish_generation()  # a colocated engine sleeps: the GPUs are training's
        if check_next_rollout:
            with timer.time("refit_check"):
                error = check_refit(policy, rollout, master_config["policy"])
            rollout_metrics["token_mult_prob_error"], check_next_rollout = error, False
        metrics, policy_changed = train_step(rollout, timer)
        if policy_changed and policy_generation is not policy:  # the engine needs the weights
            with timer.time("refit"):
                metrics |= policy_generation.update_weights(policy)
        metrics |= rollout_metrics
        state["total_steps"] += 1
        state["consumed_samples"] += int(metrics["num_valid_samples"])

        is_last = state["total_steps"] >= total_steps
        val_period = grpo_config["val_period"]
        if is_last or (val_period > 0 and state["total_steps"] % val_period == 0):
            run_validation(
                policy_generation, val_dataloader, environment, tokenizer, master_config,
                logger, state, timer,
            )  # fmt: skip
        log_step(logger, metrics, timer, state["total_steps"], console_metrics)
        save_period = master_config["checkpointing"]["save_period"]
        if checkpointer.enabled and (is_last or state["total_steps"] % save_period == 0):
            with timer.time("checkpoint"):
                saved = save(state)
            if is_last and master_config["checkpointing"]["push_to_hub"] is not None:
                push_export_to_hub(saved, master_config["checkpointing"])
        log_timing(logger, metrics, timer, state["total_steps"])
    logger.close()
    print(
        f"Done at step {state['total_steps']}: validation reward "
        f"{state.get('val_reward', float('nan')):.4f}; checkpoints in {checkpointer.run_dir}, "
        f"metrics in {logger.metrics_path}"
    )
    return state


# What the console shows; every metric goes to metrics.jsonl, TensorBoard and wandb.
_CONSOLE_METRICS = ("reward", "loss", "kl", "response_length", "tokens_per_second")
