"""Direct Preference Optimization: the recipe, read top to bottom.

    setup()                      logger, checkpoints (and the state to resume from), data loaders,
                                 cluster, policy, loss
    dpo_train()                  for each batch: reference log-probs -> policy.train -> (sync the
                                 reference) -> validate every val_period -> checkpoint every
                                 save_period and at the end -> log

The policy is reached only through the `Policy` facade; this module imports neither Ray nor
torch.distributed. Batch sizes in the config count sequences, as the policy does: a batch of B
preference pairs is 2B sequences (chosen and rejected interleaved), so every batch size is even.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any, NotRequired, TypedDict

from torchdata.stateful_dataloader import StatefulDataLoader

from rl_toolkit.algorithms.loss_functions import DPOLossFn, validate_dpo_loss_config
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
from rl_toolkit.config_schema import (
    DPOConfig,
    MasterConfig,
    MicroBatches,
    check_master_config,
    micro_batches,
)
from rl_toolkit.data import PreferencePairDataset, TaskDataSpec, build_dataloader, pad_batch_to
from rl_toolkit.data.collate import PreferenceBatch
from rl_toolkit.distributed.batched_data_dict import BatchedDataDict
from rl_toolkit.distributed.virtual_cluster import (
    RayVirtualCluster,
    check_cluster_fits,
)
from rl_toolkit.models.policy.lm_policy import Policy
from rl_toolkit.models.policy.reference_cache import ReferenceLogprobCache
from rl_toolkit.utils.checkpoint import (
    CheckpointManager,
)
from rl_toolkit.utils.hf import warn_if_random_init_of_trained_model
from rl_toolkit.utils.logger import Logger
from rl_toolkit.utils.timer import Timer


class DPOSaveState(TypedDict):
    """Where training stands; saved in every checkpoint's training_info.json."""

    epoch: int  # the epoch in progress (0-based)
    step: int  # steps done within that epoch
    total_steps: int  # steps done in all
    val_loss: NotRequired[float]  # the last validation loss, once validation has run
    consumed_samples: int  # preference pairs trained on


def _default_dpo_save_state() -> DPOSaveState:
    return {"epoch": 0, "step": 0, "total_steps": 0, "consumed_samples": 0}


# ---------------------------------------------------------------------------------------------
# Setup


def setup(
    master_config: MasterConfig,
    tokenizer: Any,
    train_dataset: PreferencePairDataset,
    val_dataset: PreferencePairDataset,
) -> tuple[
    Policy,
    RayVirtualCluster,
    StatefulDataLoader,
    StatefulDataLoader,
    DPOLossFn,
    MasterConfig,
    Logger,
    TaskDataSpec | None,
    DPOSaveState,
]:
    """Build everything `dpo_train` needs, resuming from the last checkpoint when asked.

    Everything that can fail on a user mistake (`check_config`, the checkpoint to resume from,
    the cluster's size) is checked before any worker starts, and raises ConfigError.
    """
    policy_config, dpo_config = master_config["policy"], master_config["dpo"]
    check_config(master_config)
    check_cluster_fits(master_config["cluster"], policy_config)
    set_seed(dpo_config["seed"])
    loss_fn = DPOLossFn(dpo_config)
    warn_if_random_init_of_trained_model(policy_config)

    checkpointer, resume_path, dpo_save_state = open_run_folder(
        master_config, _default_dpo_save_state(), DPOSaveState
    )
    train_dataloader, val_dataloader = _build_dataloaders(
        master_config, tokenizer, train_dataset, val_dataset
    )
    logger = resume_loader_and_logger(master_config, resume_path, train_dataloader, dpo_save_state)
    cluster = build_cluster(master_config["cluster"], "dpo_policy")
    policy = build_policy(
        cluster,
        policy_config,
        master_config["cluster"],
        tokenizer,
        init_reference_model=not dpo_config["reference_free"],
        reference_cache=_reference_cache(dpo_config),
        resume_path=resume_path,
    )
    task_spec = train_dataset.task_spec
    return (
        policy,
        cluster,
        train_dataloader,
        val_dataloader,
        loss_fn,
        master_config,
        logger,
        task_spec,
        dpo_save_state,
    )


def _reference_cache(dpo_config: DPOConfig) -> ReferenceLogprobCache | None:
    """Reference log-probs are reused while the reference is fixed, within dpo.reference_cache_mib."""
    if dpo_config["reference_free"] or dpo_config["reference_cache_mib"] == 0:
        return None
    return ReferenceLogprobCache(max_bytes=dpo_config["reference_cache_mib"] * 2**20)


def _build_dataloaders(
    master_config: MasterConfig,
    tokenizer: Any,
    train_dataset: PreferencePairDataset,
    val_dataset: PreferencePairDataset,
) -> tuple[StatefulDataLoader, StatefulDataLoader]:
    """Training batches: shuffled, whole; validation batches: in order, the last one partial."""
    data_config, seed = master_config["data"], master_config["dpo"]["seed"]
    train_dataloader = build_dataloader(
        train_dataset,
        tokenizer,
        data_config,
        num_pairs=master_config["policy"]["train_global_batch_size"] // 2,
        shuffle=data_config["shuffle"],
        seed=seed,
        drop_last=True,
    )
    val_dataloader = build_dataloader(
        val_dataset,
        tokenizer,
        data_config,
        num_pairs=master_config["dpo"]["val_global_batch_size"] // 2,
        shuffle=False,
        seed=seed,
        drop_last=False,
    )
    return train_dataloader, val_dataloader


def check_config(master_config: MasterConfig) -> None:
    """Every check of the config that needs neither data nor a cluster.

    `setup` calls it first. A driver may call it sooner, right after loading the config, so that
    a mistake shows before the data is tokenised (examples/run_dpo.py does).

    Raises:
        ConfigError: one line naming the key and what would be right.
    """
    check_master_config(master_config)
    validate_dpo_loss_config(master_config["dpo"])
    check_runtime_config(master_config)


# ---------------------------------------------------------------------------------------------
# Reference log-probs and validation


def add_ref_logprobs_to_data(
    dataloader: Iterable[BatchedDataDict[PreferenceBatch]],
    policy: Policy,
    master_config: MasterConfig,
    is_val: bool = False,
) -> Iterator[BatchedDataDict[PreferenceBatch]]:
    """Yield each batch with `reference_policy_logprobs` `[2B, T]` added (unless reference-free).

    A partial validation batch is first padded with masked pairs to the full validation batch
    size, so every worker gets the same number of pairs and nothing is dropped.
    """
    dpo_config = master_config["dpo"]
    logprob_mbs = micro_batches(master_config["policy"]["micro_batch"], "logprob")
    for batch in dataloader:
        if is_val:
            batch = pad_batch_to(batch, dpo_config["val_global_batch_size"] // 2)
        if not dpo_config["reference_free"]:
            reference = policy.reference_logprobs(batch, logprob_mbs)
            batch["reference_policy_logprobs"] = reference["reference_logprobs"]
        yield batch


def validate(
    policy: Policy,
    val_dataloader: StatefulDataLoader,
    tokenizer: Any,
    loss_fn: DPOLossFn,
    step: int,
    master_config: MasterConfig,
    val_batches: int,
    val_batch_size: int,
    val_mbs: MicroBatches,
) -> dict[str, float]:
    """The loss and metrics on `val_batches` validation batches (all when 0), in eval mode.

    Each batch (padded to `val_batch_size` sequences) is evaluated in `val_mbs` micro-batches.

    Returns means over the valid pairs of all batches: each batch's metrics are global-batch
    means, so they are weighted by the batch's number of valid pairs.
    """
    totals: dict[str, float] = {}
    num_pairs: float = 0
    batches = add_ref_logprobs_to_data(val_dataloader, policy, master_config, is_val=True)
    for i, batch in enumerate(batches):
        if val_batches > 0 and i >= val_batches:
            break
        assert batch.size == val_batch_size, f"validation batch of {batch.size} sequences"
        metrics = policy.evaluate(batch, loss_fn, val_mbs)
        weight = metrics["num_valid_samples"]
        num_pairs += weight
        for key, value in metrics.items():
            if key in (
                "num_valid_samples",
                "num_valid_seqs",
                "num_valid_tokens",
                "global_num_tokens",
            ):
                continue
            totals[key] = totals.get(key, 0.0) + value * weight
    assert num_pairs > 0, f"validation at step {step} saw no valid pairs"
    return {**{k: v / num_pairs for k, v in totals.items()}, "num_valid_samples": num_pairs}


# ---------------------------------------------------------------------------------------------
# Training


def dpo_train(
    policy: Policy,
    train_dataloader: StatefulDataLoader,
    val_dataloader: StatefulDataLoader,
    tokenizer: Any,
    loss_fn: DPOLossFn,
    master_config: MasterConfig,
    logger: Logger,
    checkpointer: CheckpointManager,
    dpo_save_state: DPOSaveState,
) -> DPOSaveState:
    """Train until `max_num_epochs` or `max_num_steps`, validating, checkpointing and logging.

    Returns the final save state.
    """
    dpo_config = master_config["dpo"]
    state = dpo_save_state
    timer = Timer()
    train_mbs = micro_batches(master_config["policy"]["micro_batch"], "train")
    steps_per_epoch = len(train_dataloader)
    total_steps = min(dpo_config["max_num_steps"], dpo_config["max_num_epochs"] * steps_per_epoch)
    if dpo_config["val_at_start"] and state["total_steps"] == 0:
        _run_validation(
            policy, val_dataloader, tokenizer, loss_fn, master_config, logger, state, timer
        )
        logger.log_metrics(timer.pop_totals(), 0, prefix="timing")

    if state["total_steps"] >= total_steps:
        print(
            f"Training is already complete at step {state['total_steps']} of {total_steps}; "
            "raise dpo.max_num_steps / dpo.max_num_epochs to go on, or start afresh with "
            "checkpointing.resume=never"
        )
    logger.start_progress(total_steps, initial=state["total_steps"])
    while state["total_steps"] < total_steps:
        batches = add_ref_logprobs_to_data(train_dataloader, policy, master_config)
        # Loading a batch and its reference log-probs are timed as one phase.
        for batch in timed(batches, timer, "reference_logprobs"):
            with timer.time("training"):
                metrics = policy.train(batch, loss_fn, train_mbs)
            state["step"] += 1
            state["total_steps"] += 1
            state["consumed_samples"] += int(metrics["num_valid_samples"])
            if state["step"] == steps_per_epoch:
                state["epoch"], state["step"] = state["epoch"] + 1, 0
            _maybe_sync_reference(policy, dpo_config, state["total_steps"])

            is_last = state["total_steps"] >= total_steps
            val_period = dpo_config["val_period"]
            if is_last or (val_period > 0 and state["total_steps"] % val_period == 0):
                _run_validation(
                    policy, val_dataloader, tokenizer, loss_fn, master_config, logger, state, timer
                )
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
        f"Done at step {state['total_steps']}: validation loss {state.get('val_loss', float('nan')):.4f}; "
        f"checkpoints in {checkpointer.run_dir}, metrics in {logger.metrics_path}"
    )
    return state


def _maybe_sync_reference(policy: Policy, dpo_config: DPOConfig, total_steps: int) -> None:
    if dpo_config["sync_ref_model"] and total_steps % dpo_config["ref_model_sync_steps"] == 0:
        policy.update_reference_model(dpo_config["ref_model_mixup_alpha"])


def _run_validation(
    policy: Policy,
    val_dataloader: StatefulDataLoader,
    tokenizer: Any,
    loss_fn: DPOLossFn,
    master_config: MasterConfig,
    logger: Logger,
    state: DPOSaveState,
    timer: Timer,
) -> None:
    dpo_config = master_config["dpo"]
    with timer.time("validation"):
        metrics = validate(
            policy,
            val_dataloader,
            tokenizer,
            loss_fn,
            state["total_steps"],
            master_config,
            val_batches=dpo_config["val_batches"],
            val_batch_size=dpo_config["val_global_batch_size"],
            val_mbs=micro_batches(master_config["policy"]["micro_batch"], "logprob"),
        )
    log_validation(logger, metrics, state, _CONSOLE_METRICS)


# What the console shows; every metric goes to metrics.jsonl, TensorBoard and wandb.
_CONSOLE_METRICS = (
    "loss",
    "accuracy",
    "reward_margin_mean",
    "grad_norm",
    "lr",
    "tokens_per_second",
)
