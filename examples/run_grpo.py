"""Train a policy with GRPO on prompts scored by an environment.

    uv run examples/run_grpo.py [--config configs/grpo.yaml] [dotted.key=value ...]

Without --config it trains the embedded tiny default, configs/grpo_tiny.yaml: a tiny model on a
verifiable task shipped in the repo, on the CPU, offline. It runs from any working directory:
model and data paths are looked up in the working directory, then in the rl_toolkit checkout;
outputs (results/...) go under the working directory.
"""

import sys
from pathlib import Path

from rl_toolkit.config_schema import GRPOMasterConfig, check_grpo_config, resolve_local_paths
from rl_toolkit.utils.config import run_cli_with_config

EMBEDDED_DEFAULT = Path(__file__).resolve().parents[1] / "configs" / "grpo_tiny.yaml"


def check(config: GRPOMasterConfig) -> None:
    """The checks that need no torch: they answer in about a second."""
    resolve_local_paths(config)
    check_grpo_config(config)


def main(config: GRPOMasterConfig) -> None:
    # Imported only once the config is known to be good: torch, Ray and transformers take ~15 s.
    from rl_toolkit.algorithms.grpo import check_config, grpo_train, setup
    from rl_toolkit.data import PromptDataset, tokenize_prompt_dataset
    from rl_toolkit.distributed.virtual_cluster import init_ray
    from rl_toolkit.distributed.worker_groups import shut_down_at_exit
    from rl_toolkit.environments.reward_fn import load_reward_fn
    from rl_toolkit.environments.worker import RayEnvironment
    from rl_toolkit.utils.hf import check_policy_model, get_tokenizer

    # Everything a user can get wrong is checked before any worker starts (ConfigError).
    check_config(config)
    check_policy_model(config["policy"])
    load_reward_fn(config["env"]["name"], config["env"]["kwargs"])
    tokenizer = get_tokenizer(config["policy"]["tokenizer"])
    dataset = PromptDataset(config["data"])
    policy_config = config["policy"]
    max_prompt_length = (
        policy_config["max_total_sequence_length"] - policy_config["generation"]["max_new_tokens"]
    )
    train_dataset, val_dataset = (
        tokenize_prompt_dataset(
            dataset.formatted_ds[split],
            tokenizer,
            dataset.task_spec,
            config["data"],
            max_prompt_length=max_prompt_length,
        )
        for split in ("train", "validation")
    )
    init_ray()
    (
        policy, policy_generation, cluster, train_dl, val_dl, loss_fn, logger, checkpointer,
        save_state, config,
    ) = setup(config, tokenizer, train_dataset, val_dataset)  # fmt: skip
    environment = RayEnvironment(config["env"])
    shutdowns = [environment.shutdown, policy.shutdown, cluster.shutdown]
    if policy_generation is not policy:  # backend vllm: its engines go first
        shutdowns.insert(0, policy_generation.shutdown)
    with shut_down_at_exit(*shutdowns):
        grpo_train(
            policy,
            policy_generation,
            train_dl,
            val_dl,
            tokenizer,
            loss_fn,
            environment,
            logger,
            checkpointer,
            save_state,
            config,
            train_dataset=train_dataset,
        )


if __name__ == "__main__":
    run_cli_with_config(
        main, sys.argv[1:], EMBEDDED_DEFAULT, __doc__, GRPOMasterConfig, check=check
    )
