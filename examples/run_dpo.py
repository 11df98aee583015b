"""Train a policy with DPO.

    uv run examples/run_dpo.py [--config configs/dpo.yaml] [dotted.key=value ...]

Without --config it trains the embedded tiny default, configs/dpo_tiny.yaml: a tiny model on a
preference set shipped in the repo, on the CPU, offline. It runs from any working directory:
model and data paths are looked up in the working directory, then in the rl_toolkit checkout;
outputs (results/...) go under the working directory.
"""

import sys
from pathlib import Path

from rl_toolkit.config_schema import MasterConfig, check_master_config, resolve_local_paths
from rl_toolkit.utils.config import run_cli_with_config

EMBEDDED_DEFAULT = Path(__file__).resolve().parents[1] / "configs" / "dpo_tiny.yaml"


def check(config: MasterConfig) -> None:
    """The config's checks, before the slow imports: about a second for everything but the
    loss's own rules, which need its table of losses (torch: a few seconds more)."""
    resolve_local_paths(config)
    check_master_config(config)
    from rl_toolkit.algorithms.loss_functions import validate_dpo_loss_config

    validate_dpo_loss_config(config["dpo"])


def main(config: MasterConfig) -> None:
    # Imported only once the config is known to be good: torch, Ray and transformers take ~15 s.
    from rl_toolkit.algorithms.dpo import check_config, dpo_train, setup
    from rl_toolkit.data import load_preference_dataset, tokenize_preference_dataset
    from rl_toolkit.distributed.virtual_cluster import init_ray
    from rl_toolkit.distributed.worker_groups import shut_down_at_exit
    from rl_toolkit.utils.checkpoint import CheckpointManager
    from rl_toolkit.utils.hf import check_policy_model, get_tokenizer

    # Everything a user can get wrong is checked before any worker starts (ConfigError).
    check_config(config)
    check_policy_model(config["policy"])
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
    checkpointer = CheckpointManager(config["checkpointing"])
    with shut_down_at_exit(policy.shutdown, cluster.shutdown):
        dpo_train(
            policy, train_dl, val_dl, tokenizer, loss_fn, config, logger, checkpointer, save_state
        )


if __name__ == "__main__":
    run_cli_with_config(main, sys.argv[1:], EMBEDDED_DEFAULT, __doc__, MasterConfig, check=check)
