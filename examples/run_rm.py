"""Train a reward model on preference pairs (Bradley-Terry), for PPO's reward_model.

    uv run examples/run_rm.py [--config configs/rm.yaml] [dotted.key=value ...]

Without --config it trains the embedded tiny default, configs/rm_tiny.yaml: a tiny reward model
on a preference set shipped in the repo, on the CPU, offline. Each checkpoint's hf/ folder loads
with AutoModelForSequenceClassification and is what PPO's reward_model.model_name takes. It runs
from any working directory: model and data paths are looked up in the working directory, then in
the rl_toolkit checkout; outputs (results/...) go under the working directory.
"""

import sys
from pathlib import Path

from rl_toolkit.config_schema import RMMasterConfig, check_rm_config, resolve_local_paths
from rl_toolkit.utils.config import run_cli_with_config

EMBEDDED_DEFAULT = Path(__file__).resolve().parents[1] / "configs" / "rm_tiny.yaml"


def check(config: RMMasterConfig) -> None:
    """The checks that need no torch: they answer in about a second."""
    resolve_local_paths(config)
    check_rm_config(config)


def main(config: RMMasterConfig) -> None:
    # Imported only once the config is known to be good: torch, Ray and transformers take ~15 s.
    from rl_toolkit.algorithms.rm import check_config, rm_train, setup
    from rl_toolkit.data import load_preference_dataset, tokenize_preference_dataset
    from rl_toolkit.distributed.virtual_cluster import init_ray
    from rl_toolkit.distributed.worker_groups import shut_down_at_exit
    from rl_toolkit.utils.hf import check_trained_model, get_tokenizer

    # Everything a user can get wrong is checked before any worker starts (ConfigError).
    check_config(config)
    policy = config["policy"]
    check_trained_model(policy["model_name"], random_init=policy["random_init"], section="policy")
    tokenizer = get_tokenizer(policy["tokenizer"])
    dataset = load_preference_dataset(config["data"])
    train_dataset, val_dataset = (
        tokenize_preference_dataset(
            dataset.formatted_ds[split],
            tokenizer,
            dataset.task_spec,
            config["data"],
            max_total_sequence_length=policy["max_total_sequence_length"],
        )
        for split in ("train", "validation")
    )
    init_ray()
    model, cluster, train_dl, val_dl, loss_fn, logger, checkpointer, save_state, config = setup(
        config, tokenizer, train_dataset, val_dataset
    )
    with shut_down_at_exit(model.shutdown, cluster.shutdown):
        rm_train(model, train_dl, val_dl, loss_fn, config, logger, checkpointer, save_state)


if __name__ == "__main__":
    run_cli_with_config(main, sys.argv[1:], EMBEDDED_DEFAULT, __doc__, RMMasterConfig, check=check)
