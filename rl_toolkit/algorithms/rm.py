"""Reward-model training on preference pairs: the recipe, read top to bottom.

    setup()                      logger, checkpoints (and the state to resume from), data loaders
                                 (DPO's pairs), cluster, the model (a value model), the loss
    rm_train()                   for each batch: model.train -> validate every val_period ->
                                 checkpoint (and the HF export) every save_period and at the end

The model is a sequence classifier with one label (rl_toolkit/models/value/): a causal backbone,
from a policy (SFT) checkpoint, and a scalar head; its score of a sequence is the head's output
at its last token. The loss is Bradley-Terry's on each pair's two scores (BradleyTerryLossFn),
normalised over the pairs of the whole global batch. The data path is DPO's: the same datasets,
tokenisation, collate (chosen and rejected interleaved) and resumable loaders. A checkpoint's
`hf/` export loads with `AutoModelForSequenceClassification` and is what PPO's `reward_model`
(or `critic`) takes: SFT -> RM -> PPO with this toolkit alone.

The names follow NeMo RL's `nemo_rl.algorithms.rm` (`setup`, `validate`, `rm_train`); this
module imports neither Ray nor torch.distributed.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, NotRequired, TypedDict

from torchdata.stateful_dataloader import StatefulDataLoader

from rl_toolkit.algorithms.loss_functions import RM_PAIR_METRICS, BradleyTerryLossFn
from rl_toolkit.algorithms.utils import (
    build_cluster,
    build_value_model,
    log_step,
    log_timing,
    log_validation,
    open_run_folder,
    push_export_to_hub,
    resume_loader_and_logger,
    save_training_checkpoint,
    save_value_model,
    set_seed,
    timed,
)
from rl_toolkit.config_schema import RMMasterConfig, check_rm_config, micro_batches
from rl_toolkit.data import PreferencePairDataset, build_dataloader, pad_batch_to
from rl_toolkit.distributed.virtual_cluster import RayVirtualCluster, check_cluster_fits
from rl_toolkit.models.attention import check_attn_implementation
from rl_toolkit.models.optim import check_optimizer_config
from rl_toolkit.models.value.value_model import ValueModel
from rl_toolkit.utils.checkpoint import CheckpointManager
from rl_toolkit.utils.hf_export import check_hf_export_config
from rl_toolkit.utils.logger import Logger
from rl_toolkit.utils.timer import Timer

MasterConfig = RMMasterConfig  # NeMo RL's name for it in this module


class RMSaveState(TypedDict):
    """Where training stands; saved in every checkpoint's training_info.json."""

    epoch: int  # the epoch in progress (0-based)
    step: int  # steps done within that epoch
    total_steps: int  # steps done in all
    val_loss: NotRequired[float]  # the last validation loss, once validation has run
    consumed_samples: int  # preference pairs trained on


def _default_rm_save_state() -> RMSaveState:
    return {"epoch": 0, "step": 0, "total_steps": 0, "consumed_samples": 0}


def setup(
    master_config: MasterConfig,
    tokenizer: Any,
    train_dataset: PreferencePairDataset,
    val_dataset: PreferencePairDataset,
) -> tuple[
    ValueModel,
    RayVirtualCluster,
    StatefulDataLoader,
    StatefulDataLoader,
    BradleyTerryLossFn,
    Logger,
    CheckpointManager,
    RMSaveState,
    MasterConfig,
]:
    """Build everything `rm_train` needs, resuming from the last checkpoint when asked.

    Returns:
        (model, cluster, train_dataloader, val_dataloader, loss_fn, logger, checkpointer,
        rm_save_state, master_config).
    """
    policy_config, rm_config = master_config["policy"], master_config["rm"]
    check_config(master_config)
    check_cluster_fits(master_config["cluster"], policy_config)
    set_seed(rm_config["seed"])
    checkpointer, resume_path, save_state = open_run_folder(
        master_config, _default_rm_save_state(), RMSaveState
    )
    data_config = master_config["data"]
    train_dataloader, val_dataloader = (
        build_dataloader(
            dataset, tokenizer, data_config, num_pairs=batch_size // 2, shuffle=shuffle,
            seed=rm_config["seed"], drop_last=shuffle,
        )
        for dataset, batch_size, shuffle in (
            (train_dataset, policy_config["train_global_batch_size"], data_config["shuffle"]),
            (val_dataset, rm_config["val_global_batch_size"], False),
        )
    )  # fmt: skip
    logger = resume_loader_and_logger(master_config, resume_path, train_dataloader, save_state)
    cluster = build_cluster(master_config["cluster"], "rm")
    model = build_value_model(
        cluster, policy_config, master_config["cluster"], tokenizer, section="policy",
        resume_path=resume_path,
    )  # fmt: skip
    return (
        model, cluster, train_dataloader, val_dataloader, BradleyTerryLossFn(), logger,
        checkpointer, save_state, master_config,
    )  # fmt: skip


def check_config(master_config: MasterConfig) -> None:
    """Every check of the config that needs neither data nor a cluster (setup calls it first;
    examples/run_rm.py calls it before tokenising).

    Raises:
        ConfigError: one line naming the key and what would be right.
    """
    check_rm_config(master_config)
    check_attn_implementation(master_config["policy"]["attn_implementation"])
    check_optimizer_config(master_config["policy"])
    check_hf_export_config(master_config["checkpointing"])


def validate(
    model: ValueModel, val_dataloader: StatefulDataLoader, loss_fn: BradleyTerryLossFn,
    master_config: MasterConfig,
) -> dict[str, float]:  # fmt: skip
    """The loss, accuracy and scores on `rm.val_batches` validation batches (all when 0),
    without gradients; a partial last batch is padded with pairs that count for nothing.

    Returns:
        Means over the valid pairs of all the batches (`loss`, RM_PAIR_METRICS) and their
        number (`num_valid_samples`).
    """
    rm_config = master_config["rm"]
    mbs = micro_batches(master_config["policy"]["micro_batch"], "logprob")
    totals: dict[str, float] = {}
    num_pairs = 0.0
    for i, batch in enumerate(val_dataloader):
        if rm_config["val_batches"] > 0 and i >= rm_config["val_batches"]:
            break
        batch = pad_batch_to(batch, rm_config["val_global_batch_size"] // 2)
        metrics = model.evaluate(batch, loss_fn, mbs)
        num_pairs += metrics["num_valid_samples"]  # each metric is a mean over these
        for key in ("loss", *RM_PAIR_METRICS):
            totals[key] = totals.get(key, 0.0) + metrics[key] * metrics["num_valid_samples"]
    assert num_pairs > 0, "validation saw no valid pairs"
    return {**{k: v / num_pairs for k, v in totals.items()}, "num_valid_samples": num_pairs}


def save_checkpoint(
    model: ValueModel,
    checkpointer: CheckpointManager,
    train_dataloader: StatefulDataLoader,
    state: RMSaveState,
    master_config: MasterConfig,
) -> Path:
    """Weights, optimizer and tokenizer in `policy/`, the reward model's HF export in `hf/`
    (save_hf), data-loader and RNG state and the config; finalized as `step_<total_steps>`."""
    return save_training_checkpoint(
        lambda folder: save_value_model(
            model, folder, master_config["checkpointing"], export_hf=True
        ),
        checkpointer,
        train_dataloader,
        state,
        master_config,
    )


def rm_train(
    model: ValueModel,
    train_dataloader: StatefulDataLoader,
    val_dataloader: StatefulDataLoader,
    loss_fn: BradleyTerryLossFn,
    master_config: MasterConfig,
    logger: Logger,
    checkpointer: CheckpointManager,
    rm_save_state: RMSaveState,
) -> RMSaveState:
    """Train until `max_num_epochs` or `max_num_steps`, validating, checkpointing and logging.

    Returns the final save state.
    """
    rm_config, state, timer = master_config["rm"], rm_save_state, Timer()
    train_mbs = micro_batches(master_config["policy"]["micro_batch"], "train")
    steps_per_epoch = len(train_dataloader)
    total_steps = min(rm_config["max_num_steps"], rm_config["max_num_epochs"] * steps_per_epoch)
    if rm_config["val_at_start"] and state["total_steps"] == 0:
        _run_validation(model, val_dataloader, loss_fn, master_config, logger, state, timer)
        logger.log_metrics(timer.pop_totals(), 0, prefix="timing")
    logger.start_progress(total_steps, initial=state["total_steps"])
    while state["total_steps"] < total_steps:
        for batch in timed(iter(train_dataloader), timer, "data"):
            with timer.time("training"):
                metrics = model.train(batch, loss_fn, train_mbs)
            state["step"] += 1
            state["total_steps"] += 1
            state["consumed_samples"] += int(metrics["num_valid_samples"])
            if state["step"] == steps_per_epoch:
                state["epoch"], state["step"] = state["epoch"] + 1, 0

            is_last = state["total_steps"] >= total_steps
            val_period = rm_config["val_period"]
            if is_last or (val_period > 0 and state["total_steps"] % val_period == 0):
                _run_validation(model, val_dataloader, loss_fn, master_config, logger, state, timer)
            log_step(logger, metrics, timer, state["total_steps"], _CONSOLE_METRICS)
            save_period = master_config["checkpointing"]["save_period"]
            if checkpointer.enabled and (is_last or state["total_steps"] % save_period == 0):
                with timer.time("checkpoint"):
                    saved = save_checkpoint(
                        model, checkpointer, train_dataloader, state, master_config
                    )
                if is_last and master_config["checkpointing"]["push_to_hub"] is not None:
                    push_export_to_hub(saved, master_config["checkpointing"])
            log_timing(logger, metrics, timer, state["total_steps"])
            if is_last:
                break
    logger.close()
    print(
        f"Done at step {state['total_steps']}: validation loss "
        f"{state.get('val_loss', float('nan')):.4f}; checkpoints in {checkpointer.run_dir}, "
        f"metrics in {logger.metrics_path}"
    )
    return state


def _run_validation(
    model: ValueModel,
    val_dataloader: StatefulDataLoader,
    loss_fn: BradleyTerryLossFn,
    master_config: MasterConfig,
    logger: Logger,
    state: RMSaveState,
    timer: Timer,
) -> None:
    with timer.time("validation"):
        metrics = validate(model, val_dataloader, loss_fn, master_config)
    log_validation(logger, metrics, state, _CONSOLE_METRICS)


# What the console shows; every metric goes to metrics.jsonl, TensorBoard and wandb.
_CONSOLE_METRICS = ("loss", "accuracy", "margin_mean", "tokens_per_second")
