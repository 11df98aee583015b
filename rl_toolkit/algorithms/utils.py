"""What every recipe does the same way: seeding, the run folder and resume, the cluster and the
policy, checkpoints, and logging a step.

The recipes (dpo.py, sft.py) read top to bottom and call these where their loops meet the
runtime; nothing here decides anything about an algorithm.
"""

import random
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any, TypeVar, cast

import numpy as np
import torch
from torchdata.stateful_dataloader import StatefulDataLoader
from transformers.tokenization_utils_base import PreTrainedTokenizerBase

from rl_toolkit.config_schema import (
    CheckpointingConfig,
    ClusterConfig,
    CriticConfig,
    PolicyConfig,
)
from rl_toolkit.distributed.batched_data_dict import BatchedDataDict
from rl_toolkit.distributed.virtual_cluster import RayVirtualCluster, check_worker_env_vars
from rl_toolkit.models.attention import check_attn_implementation
from rl_toolkit.models.lora import check_lora_config
from rl_toolkit.models.optim import check_optimizer_config
from rl_toolkit.models.policy.lm_policy import Policy
from rl_toolkit.models.policy.reference_cache import ReferenceLogprobCache
from rl_toolkit.models.policy.worker import PolicyWorker
from rl_toolkit.models.value.value_model import ValueModel
from rl_toolkit.models.value.worker import ValueWorker
from rl_toolkit.utils.checkpoint import (
    CheckpointManager,
    load_dataloader_state,
    load_rng_state,
    save_dataloader_state,
    save_rng_state,
)
from rl_toolkit.utils.config import save_config
from rl_toolkit.utils.hf_export import check_hf_export_config, parse_shard_size, push_to_hub
from rl_toolkit.utils.logger import Logger
from rl_toolkit.utils.timer import Timer, tokens_per_second

SaveStateT = TypeVar("SaveStateT")  # a recipe's save state, a TypedDict


def set_seed(seed: int) -> None:
    """Seed Python's, NumPy's and torch's global random number generators."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


# ---------------------------------------------------------------------------------------------
# The run folder and resume


def open_run_folder(
    master_config: Mapping[str, Any], save_state: SaveStateT, save_state_type: type[SaveStateT]
) -> tuple[CheckpointManager, Path | None, SaveStateT]:
    """The checkpoint manager of this run, the checkpoint to resume from, and the save state.

    With resume=never and a used checkpoint_dir the manager picks `<checkpoint_dir>-N`; the logs
    move to `<log_dir>-N` with it. Both are written back into `master_config`, so that the config
    saved in each checkpoint (and a manager built from it) names the run's folders.

    Args:
        master_config: the recipe's whole config.
        save_state: the recipe's save state of a fresh run.
        save_state_type: its TypedDict, whose keys are read from the checkpoint's training info.

    Returns:
        (checkpointer, resume_path or None, the save state to start from).
    """
    checkpointer = CheckpointManager(master_config["checkpointing"])
    configured_dir = Path(master_config["checkpointing"]["checkpoint_dir"])
    if checkpointer.run_dir != configured_dir:
        master_config["logger"]["log_dir"] += checkpointer.run_dir.name[len(configured_dir.name) :]
    master_config["checkpointing"]["checkpoint_dir"] = str(checkpointer.run_dir)
    resume_path = checkpointer.resume_path
    if resume_path is None:
        return checkpointer, None, save_state
    info = checkpointer.load_training_info(resume_path)
    # The training info is what the same recipe saved from such a state (checkpoint.finalize).
    state = {k: v for k, v in info.items() if k in save_state_type.__annotations__}
    print(f"Resuming from {resume_path} (step {state['total_steps']})")
    return checkpointer, resume_path, cast(SaveStateT, state)


def resume_loader_and_logger(
    master_config: Mapping[str, Any],
    resume_path: Path | None,
    train_dataloader: StatefulDataLoader,
    save_state: Mapping[str, Any],
) -> Logger:
    """Put the training loader and the random generators where the checkpoint left them (when
    resuming), and open the run's logger, whose lines of the steps to redo are dropped."""
    resume_step = None
    if resume_path is not None:
        train_dataloader.load_state_dict(load_dataloader_state(resume_path))
        load_rng_state(resume_path)
        resume_step = save_state["total_steps"]
    logger = Logger(master_config["logger"], resume_step=resume_step)
    logger.log_hyperparams(master_config)
    return logger


def check_runtime_config(master_config: Mapping[str, Any]) -> None:
    """The checks every recipe shares that need torch: the attention implementation, an
    optimizer dry run, LoRA's target modules against the model (built on the meta device), the
    HF export settings and the worker environment variables.

    Raises:
        ConfigError: one line naming the key and what would be right.
    """
    check_attn_implementation(master_config["policy"]["attn_implementation"])
    check_optimizer_config(master_config["policy"])
    check_lora_config(master_config["policy"])
    check_hf_export_config(master_config["checkpointing"])
    check_worker_env_vars(master_config["cluster"]["worker_env_vars"])


# ---------------------------------------------------------------------------------------------
# Cluster and policy


def build_cluster(
    config: ClusterConfig, name: str, *, num_worker_groups: int = 1
) -> RayVirtualCluster:
    """One bundle per worker: a GPU each, or a CPU each when the Ray cluster has no GPU.

    Args:
        num_worker_groups: worker groups sharing each bundle (2: the policy and colocated
            vLLM engines; each actor then gets half of the bundle's GPU).
    """
    return RayVirtualCluster(
        [config["gpus_per_node"]] * config["num_nodes"],
        use_gpus=True,  # falls back to CPU bundles when the Ray cluster has no GPUs
        num_gpus_per_node=config["gpus_per_node"],
        name=name,
        max_colocated_worker_groups=num_worker_groups,
    )


def build_policy(
    cluster: RayVirtualCluster,
    policy_config: PolicyConfig,
    cluster_config: ClusterConfig,
    tokenizer: PreTrainedTokenizerBase,
    *,
    init_reference_model: bool,
    reference_cache: ReferenceLogprobCache | None,
    resume_path: Path | None,
) -> Policy:
    """The trained policy on `cluster`, from the checkpoint `resume_path` when there is one."""
    paths = policy_paths(resume_path) if resume_path is not None else {}
    return Policy(
        cluster,
        policy_config,
        tokenizer,
        init_optimizer=True,
        init_reference_model=init_reference_model,
        reference_cache=reference_cache,
        weights_path=paths.get("weights_path"),
        optimizer_path=paths.get("optimizer_path"),
        worker_timeout_s=cluster_config["worker_timeout_s"],
        worker_env_vars=cluster_config["worker_env_vars"],
    )


def build_value_model(
    cluster: RayVirtualCluster,
    config: CriticConfig,
    cluster_config: ClusterConfig,
    tokenizer: PreTrainedTokenizerBase,
    *,
    section: str,
    resume_path: Path | None,
) -> ValueModel:
    """A trained scalar-head model (the critic, a reward model in training) on `cluster`, its
    checkpoint under `<checkpoint>/<section>` (from `resume_path` when there is one)."""
    paths = model_paths(resume_path, section) if resume_path is not None else {}
    return ValueModel(
        cluster,
        config,
        tokenizer,
        section=section,
        init_optimizer=True,
        weights_path=paths.get("weights_path"),
        optimizer_path=paths.get("optimizer_path"),
        worker_timeout_s=cluster_config["worker_timeout_s"],
        worker_env_vars=cluster_config["worker_env_vars"],
    )


def save_value_model(
    model: ValueModel, folder: Path, config: CheckpointingConfig, *, export_hf: bool
) -> None:
    """A scalar-head model's part of a checkpoint, under `<folder>/<its section>`; with
    `export_hf` and save_hf also its HF export (`hf/`: a reward model's, which
    `AutoModelForSequenceClassification` loads)."""
    model.workers.all(ValueWorker.save_checkpoint, **model_paths(folder, model.section))
    if export_hf and config["save_hf"]:
        max_shard_size = parse_shard_size(config["hf_max_shard_size"])
        model.workers.all(ValueWorker.export_hf, str(folder / "hf"), max_shard_size=max_shard_size)


# ---------------------------------------------------------------------------------------------
# Checkpoints


def policy_paths(checkpoint: Path) -> dict[str, str]:
    """Where the policy's weights, optimizer and tokenizer go in a checkpoint folder."""
    return model_paths(checkpoint, "policy")


def model_paths(checkpoint: Path, role: str) -> dict[str, str]:
    """Where a role's (policy, critic) weights, optimizer and tokenizer go in a checkpoint."""
    return {
        "weights_path": str(checkpoint / role / "weights"),
        "optimizer_path": str(checkpoint / role / "optimizer"),
        "tokenizer_path": str(checkpoint / role / "tokenizer"),
    }


def save_checkpoint(
    policy: Policy,
    checkpointer: CheckpointManager,
    train_dataloader: StatefulDataLoader,
    state: Mapping[str, Any],
    master_config: Mapping[str, Any],
) -> Path:
    """Write weights, optimizer, an HF export (save_hf), data-loader and RNG state and the
    config into a temporary folder, then finalize it as `step_<total_steps>`.

    Returns:
        The complete checkpoint's folder.
    """
    return save_training_checkpoint(
        lambda folder: save_policy(policy, folder, master_config["checkpointing"]),
        checkpointer,
        train_dataloader,
        state,
        master_config,
    )


def save_policy(policy: Policy, folder: Path, config: CheckpointingConfig) -> None:
    """The policy's part of a checkpoint: weights, optimizer, tokenizer and the HF export
    (`hf/`, with save_hf)."""
    policy.workers.all(PolicyWorker.save_checkpoint, **policy_paths(folder))
    if config["save_hf"]:
        max_shard_size = parse_shard_size(config["hf_max_shard_size"])
        policy.workers.all(
            PolicyWorker.export_hf,
            str(folder / "hf"),
            max_shard_size=max_shard_size,
            export_lora=config["export_lora"],
        )


def save_training_checkpoint(
    save_models: Callable[[Path], None],
    checkpointer: CheckpointManager,
    train_dataloader: StatefulDataLoader,
    state: Mapping[str, Any],
    master_config: Mapping[str, Any],
) -> Path:
    """`save_checkpoint` for any set of models: `save_models(folder)` writes theirs, then the
    data-loader and RNG state and the config, and the folder is finalized.

    Returns:
        The complete checkpoint's folder.
    """
    tmp = checkpointer.begin(state["total_steps"])
    save_models(tmp)
    save_dataloader_state(tmp, train_dataloader.state_dict())
    save_rng_state(tmp)
    save_config(master_config, tmp / "config.yaml")
    return checkpointer.finalize(tmp, state["total_steps"], dict(state))


def push_export_to_hub(checkpoint: Path, config: CheckpointingConfig) -> None:
    """Upload the checkpoint's HF export to `checkpointing.push_to_hub` (the run's last one)."""
    repo_id = config["push_to_hub"]
    assert repo_id is not None, "called only when checkpointing.push_to_hub is set"
    print(f"Uploading {checkpoint / 'hf'} to the Hugging Face Hub repo {repo_id}")
    url = push_to_hub(checkpoint / "hf", repo_id, private=config["hub_private"])
    print(f"Uploaded: {url}")


# ---------------------------------------------------------------------------------------------
# Logging a step


def timed(
    batches: Iterator[BatchedDataDict], timer: Timer, phase: str
) -> Iterator[BatchedDataDict]:
    """`batches`, the time to produce each one counted as `phase` in `timer`."""
    while True:
        with timer.time(phase):
            batch = next(batches, None)
        if batch is None:
            return
        yield batch


def console_metrics(metrics: Mapping[str, Any], names: tuple[str, ...]) -> dict[str, Any]:
    """The metrics the console shows; every metric goes to metrics.jsonl, TensorBoard, wandb."""
    return {name: metrics[name] for name in names if name in metrics}


def log_step(
    logger: Logger, metrics: dict[str, Any], timer: Timer, step: int, shown: tuple[str, ...]
) -> None:
    """Log the train metrics of `step` and show progress; the phase times stay in `timer`.

    Called before the step's checkpoint is finalized, so that a kill after the checkpoint
    cannot lose them (a resume from it does not redo this step).
    """
    logger.log_metrics(metrics, step, prefix="train")
    throughput = tokens_per_second(metrics["global_num_tokens"], timer.total("training"))
    logger.update_progress(
        step, console_metrics({**metrics, "tokens_per_second": throughput}, shown)
    )


def log_validation(
    logger: Logger, metrics: dict[str, Any], state: Any, shown: tuple[str, ...]
) -> None:
    """Record a validation: `val_loss` in the recipe's save state (a TypedDict with
    `total_steps`; it ranks checkpoints), the metrics in every log, the main ones on the console."""
    state["val_loss"] = metrics["loss"]
    logger.log_metrics(metrics, state["total_steps"], prefix="validation")
    logger.print_metrics(console_metrics(metrics, shown), state["total_steps"], prefix="validation")


def log_timing(logger: Logger, metrics: dict[str, Any], timer: Timer, step: int) -> None:
    """Log the phase times of `step` (its checkpoint included) and the training throughput."""
    timing = timer.pop_totals()
    timing["tokens_per_second"] = tokens_per_second(
        metrics["global_num_tokens"], timing["training"]
    )
    logger.log_metrics(timing, step, prefix="timing")
