"""Supervised fine-tuning: the recipe, read top to bottom.

    setup()                      logger, checkpoints (and the state to resume from), data loaders,
                                 cluster, policy, loss
    sft_train()                  for each batch: policy.train -> validate every val_period ->
                                 checkpoint every save_period and at the end -> log

The loss is the negative log-likelihood of the learned tokens (the assistant turns, the
completion, or the whole text: rl_toolkit/data/sft/), divided by the number of learned tokens of
the whole global batch (NLLLossFn), so the update does not depend on the number of workers, the
micro-batch size or packing. The policy is reached only through the `Policy` facade; this module
imports neither Ray nor torch.distributed. Batch sizes count sequences.

The names and signatures follow NeMo RL's `nemo_rl.algorithms.sft`: `setup` returns the
checkpoint manager it built, and `validate` and `sft_train` take the data set's task spec.
"""

from __future__ import annotations

from typing import Any, NotRequired, TypedDict

from torchdata.stateful_dataloader import StatefulDataLoader

from rl_toolkit.algorithms.loss_functions import NLLLossFn
from rl_toolkit.algorithms.utils import (
    build_cluster,
    build_policy,
    check_runtime_config,
    log_step,
    log_timing,
    log_validation,
    open_run_folder,
    push_export_to_hub,
    resume_loader_and_logger,
    save_checkpoint,
    set_seed,
    timed,
)
from rl_toolkit.config_schema import MicroBatches, SFTMasterConfig, check_sft_config, micro_batches
from rl_toolkit.config_schema import SFTConfig as SFTConfig  # NeMo RL's import path
from rl_toolkit.data import TaskDataSpec, build_sft_dataloader, pad_batch_to
from rl_toolkit.data.sft import SFTSequenceDataset
from rl_toolkit.distributed.virtual_cluster import (
    RayVirtualCluster,
    check_cluster_fits,
)
from rl_toolkit.models.policy.lm_policy import Policy
from rl_toolkit.utils.checkpoint import (
    CheckpointManager,
)
from rl_toolkit.utils.hf import warn_if_random_init_of_trained_model
from rl_toolkit.utils.logger import Logger
from rl_toolkit.utils.timer import Timer

MasterConfig = SFTMasterConfig  # NeMo RL's name for it in this module


class SFTSaveState(TypedDict):
    """Where training stands; saved in every checkpoint's training_info.json."""

    epoch: int  # the epoch in progress (0-based)
    step: int  # steps done within that epoch
    total_steps: int  # steps done in all
    val_loss: NotRequired[float]  # the last validation loss, once validation has run
    consumed_samples: int  # sequences trained on


def _default_sft_save_state() -> SFTSaveState:
    return {"epoch": 0, "step": 0, "total_steps": 0, "consumed_samples": 0}


# ---------------------------------------------------------------------------------------------
# Setup


def setup(
    master_config: MasterConfig,
    tokenizer: Any,
    train_dataset: SFTSequenceDataset,
    val_dataset: SFTSequenceDataset,
) -> tuple[
    Policy,
    RayVirtualCluster,
    StatefulDataLoader,
    StatefulDataLoader,
    NLLLossFn,
    Logger,
    CheckpointManager,
    SFTSaveState,
    MasterConfig,
]:
    """Build everything `sft_train` needs, resuming from the last checkpoint when asked.

    Everything that can fail on a user mistake (`check_config`, the checkpoint to resume from,
    the cluster's size) is checked before any worker starts, and raises ConfigError.

    Returns:
        (policy, cluster, train_dataloader, val_dataloader, loss_fn, logger, checkpointer,
        sft_save_state, master_config), as NeMo RL's sft.setup; master_config names the run
        folder that the checkpoint manager chose.
    """
    policy_config = master_config["policy"]
    check_config(master_config)
    check_cluster_fits(master_config["cluster"], policy_config)
    set_seed(master_config["sft"]["seed"])
    warn_if_random_init_of_trained_model(policy_config)

    checkpointer, resume_path, sft_save_state = open_run_folder(
        master_config, _default_sft_save_state(), SFTSaveState
    )
    train_dataloader, val_dataloader = _build_dataloaders(
        master_config, tokenizer, train_dataset, val_dataset
    )
    logger = resume_loader_and_logger(master_config, resume_path, train_dataloader, sft_save_state)
    cluster = build_cluster(master_config["cluster"], "sft_policy")
    policy = build_policy(
        cluster,
        policy_config,
        master_config["cluster"],
        tokenizer,
        init_reference_model=False,
        reference_cache=None,
        resume_path=resume_path,
    )
    return (
        policy,
        cluster,
        train_dataloader,
        val_dataloader,
        NLLLossFn(),
        logger,
        checkpointer,
        sft_save_state,
        master_config,
    )


def _build_dataloaders(
    master_config: MasterConfig,
    tokenizer: Any,
    train_dataset: SFTSequenceDataset,
    val_dataset: SFTSequenceDataset,
) -> tuple[StatefulDataLoader, StatefulDataLoader]:
    """Training batches: shuffled, whole; validation batches: in order, the last one partial."""
    data_config, seed = master_config["data"], master_config["sft"]["seed"]
    train_dataloader = build_sft_dataloader(
        train_dataset,
        tokenizer,
        data_config,
        batch_size=master_config["policy"]["train_global_batch_size"],
        shuffle=data_config["shuffle"],
        seed=seed,
        drop_last=True,
    )
    val_dataloader = build_sft_dataloader(
        val_dataset,
        tokenizer,
        data_config,
        batch_size=master_config["sft"]["val_global_batch_size"],
        shuffle=False,
        seed=seed,
        drop_last=False,
    )
    return train_dataloader, val_dataloader


def check_config(master_config: MasterConfig) -> None:
    """Every check of the config that needs neither data nor a cluster.

    `setup` calls it first. A driver may call it sooner, right after loading the config, so that
    a mistake shows before the data is tokenised (examples/run_sft.py does).

    Raises:
        ConfigError: one line naming the key and what would be right.
    """
    check_sft_config(master_config)
    check_runtime_config(master_config)


# ---------------------------------------------------------------------------------------------
# Validation


def validate(
    policy: Policy,
    val_dataloader: StatefulDataLoader,
    tokenizer: Any,
    loss_fn: NLLLossFn,
    step: int,
    master_config: MasterConfig,
    sft_task_spec: TaskDataSpec,
    val_batches: int,
    val_batch_size: int,
    val_mbs: MicroBatches,
) -> dict[str, float]:
    """The loss on `val_batches` validation batches (all when 0), in eval mode, each in
    `val_mbs` micro-batches.

    A partial last batch is padded with rows that carry no loss, so nothing is dropped.

    Returns:
        `loss`: the mean negative log-likelihood per learned token over all the batches (each
        batch's loss is a mean over its tokens, so it is weighted by its token count), and the
        counts `num_valid_tokens` and `num_valid_samples` (sequences).
    """
    loss_sum, num_tokens, num_samples = 0.0, 0.0, 0.0
    for i, batch in enumerate(val_dataloader):
        if val_batches > 0 and i >= val_batches:
            break
        batch = pad_batch_to(batch, val_batch_size)
        metrics = policy.evaluate(batch, loss_fn, val_mbs)
        loss_sum += metrics["loss"] * metrics["num_valid_tokens"]
        num_tokens += metrics["num_valid_tokens"]
        num_samples += metrics["num_valid_samples"]
    assert num_tokens > 0, (
        f"validation of {sft_task_spec['task_name']} at step {step} saw no tokens"
    )
    return {
        "loss": loss_sum / num_tokens,
        "num_valid_tokens": num_tokens,
        "num_valid_samples": num_samples,
    }


# ---------------------------------------------------------------------------------------------
# Training


def sft_train(
    policy: Policy,
    train_dataloader: StatefulDataLoader,
    val_dataloader: StatefulDataLoader,
    tokenizer: Any,
    loss_fn: NLLLossFn,
    master_config: MasterConfig,
    logger: Logger,
    sft_task_spec: TaskDataSpec,
    checkpointer: CheckpointManager,
    sft_save_state: SFTSaveState,
) -> SFTSaveState:
    """Train until `max_num_epochs` or `max_num_steps`, validating, checkpointing and logging.

    Returns the final save state.
    """
    sft_config = master_config["sft"]
    state = sft_save_state
    timer = Timer()
    train_mbs = micro_batches(master_config["policy"]["micro_batch"], "train")
    steps_per_epoch = len(train_dataloader)
    total_steps = min(sft_config["max_num_steps"], sft_config["max_num_epochs"] * steps_per_epoch)
    if sft_config["val_at_start"] and state["total_steps"] == 0:
        _run_validation(
            policy, val_dataloader, tokenizer, loss_fn, master_config, sft_task_spec, logger,
            state, timer,
        )  # fmt: skip
        logger.log_metrics(timer.pop_totals(), 0, prefix="timing")

    if state["total_steps"] >= total_steps:
        print(
            f"Training is already complete at step {state['total_steps']} of {total_steps}; "
            "raise sft.max_num_steps / sft.max_num_epochs to go on, or start afresh with "
            "checkpointing.resume=never"
        )
    logger.start_progress(total_steps, initial=state["total_steps"])
    while state["total_steps"] < total_steps:
        for batch in timed(iter(train_dataloader), timer, "data"):
            with timer.time("training"):
                metrics = policy.train(batch, loss_fn, train_mbs)
            state["step"] += 1
            state["total_steps"] += 1
            state["consumed_samples"] += int(metrics["num_valid_samples"])
            if state["step"] == steps_per_epoch:
                state["epoch"], state["step"] = state["epoch"] + 1, 0

            is_last = state["total_steps"] >= total_steps
            val_period = sft_config["val_period"]
            if is_last or (val_period > 0 and state["total_steps"] % val_period == 0):
                _run_validation(
                    policy, val_dataloader, tokenizer, loss_fn, master_config, sft_task_spec,
                    logger, state, timer,
                )  # fmt: skip
            log_step(logger, metrics, timer, state["total_steps"], _CONSOLE_METRICS)
            save_period = master_config["checkpointing"]["save_period"]
            if checkpointer.enabled and (is_last or state["total_steps"] % save_period == 0):
                with timer.time("checkpoint"):
                    saved = save_checkpoint(
                        policy, checkpointer, train_dataloader, state, master_config
                    )
                if is_last and master_config["checkpointing"]["push_to_hub"] is not None:
                    push_export_to_hub(saved, master_config["checkpointing"])
            log_timing(logger, metrics, timer, state["total_steps"])
            if is_last:
                break
    logger.close()
    print(
        f"Done at step {state['total_steps']}: {sft_task_spec['task_name']} validation loss "
        f"{state.get('val_loss', float('nan')):.4f}; checkpoints in {checkpointer.run_dir}, "
        f"metrics in {logger.metrics_path}"
    )
    return state


def _run_validation(
    policy: Policy,
    val_dataloader: StatefulDataLoader,
    tokenizer: Any,
    loss_fn: NLLLossFn,
    master_config: MasterConfig,
    sft_task_spec: TaskDataSpec,
    logger: Logger,
    state: SFTSaveState,
    timer: Timer,
) -> None:
    sft_config = master_config["sft"]
    with timer.time("validation"):
        metrics = validate(
            policy,
            val_dataloader,
            tokenizer,
            loss_fn,
            state["total_steps"],
            master_config,
            sft_task_spec,
            val_batches=sft_config["val_batches"],
            val_batch_size=sft_config["val_global_batch_size"],
            val_mbs=micro_batches(master_config["policy"]["micro_batch"], "logprob"),
        )
    log_validation(logger, metrics, state, _CONSOLE_METRICS)


# What the console shows; every metric goes to metrics.jsonl, TensorBoard and wandb.
_CONSOLE_METRICS = ("loss", "grad_norm", "lr", "tokens_per_second")
