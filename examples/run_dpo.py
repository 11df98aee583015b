"""Train a policy with DPO.

    uv run examples/run_dpo.py [--config configs/dpo.yaml] [dotted.key=value ...]

With no arguments it trains the embedded tiny model on the embedded preference set (CPU, offline).
"""

import sys
from collections.abc import Callable

from rl_toolkit.algorithms.dpo import MasterConfig, dpo_train, setup
from rl_toolkit.data import load_preference_dataset, tokenize_preference_dataset
from rl_toolkit.distributed.virtual_cluster import init_ray
from rl_toolkit.distributed.worker_groups import WorkerError
from rl_toolkit.utils.checkpoint import CheckpointManager
from rl_toolkit.utils.config import ConfigError, run_cli_with_config
from rl_toolkit.utils.hf import check_model_path, get_tokenizer


def main(config: MasterConfig) -> None:
    # Everything a user can get wrong is checked before any worker starts (ValueError).
    try:
        check_model_path(config["policy"]["model_name"])
        tokenizer = get_tokenizer(config["policy"]["tokenizer"])
        dataset = load_preference_dataset(config["data"])
        train_dataset, val_dataset = (
            tokenize_preference_dataset(
                dataset.formatted_ds[split],
                tokenizer,
                dataset.task_spec,
                config["data"],
                max_total_sequence_length=config["policy"]["max_total_sequence_length"],
            )
            for split in ("train", "validation")
        )
        init_ray()
        policy, cluster, train_dl, val_dl, loss_fn, config, logger, _, save_state = setup(
            config, tokenizer, train_dataset, val_dataset
        )
    except ValueError as e:
        raise ConfigError(str(e)) from None

    checkpointer = CheckpointManager(config["checkpointing"])
    try:
        dpo_train(
            policy, train_dl, val_dl, tokenizer, loss_fn, config, logger, checkpointer, save_state
        )
    except BaseException as error:
        _shut_down_after_failure(policy.shutdown, cluster.shutdown)
        if isinstance(error, WorkerError):
            # Its message names the worker, node, method and cause; the driver's stack adds
            # nothing to that.
            print(f"error: {error}", file=sys.stderr)
            raise SystemExit(1) from None
        raise
    policy.shutdown()
    cluster.shutdown()


def _shut_down_after_failure(*shutdowns: Callable[[], None]) -> None:
    """Best effort: an error while cleaning up must not hide the one that stopped training."""
    for shutdown in shutdowns:
        try:
            shutdown()
        except Exception as error:  # noqa: BLE001 - reported, and the first error goes on
            first_line = str(error).partition("\n")[0]
            print(f"warning: {shutdown.__qualname__} failed: {first_line}", file=sys.stderr)


if __name__ == "__main__":
    run_cli_with_config(main, sys.argv[1:], "configs/dpo.yaml", __doc__, MasterConfig)
