"""Train a policy with PPO: a critic, GAE advantages, and a reward function or reward model.

    uv run examples/run_ppo.py [--config configs/ppo.yaml] [dotted.key=value ...]

Without --config it trains the embedded tiny default, configs/ppo_tiny.yaml: a tiny model on a
verifiable task shipped in the repo, on the CPU, offline. It runs from any working directory:
model and data paths are looked up in the working directory, then in the rl_toolkit checkout;
outputs (results/...) go under the working directory.
"""

import sys
from pathlib import Path

from rl_toolkit.config_schema import PPOMasterConfig, check_ppo_config, resolve_local_paths
from rl_toolkit.utils.config import run_cli_with_config

EMBEDDED_DEFAULT = Path(__file__).resolve().parents[1] / "configs" / "ppo_tiny.yaml"


def check(config: PPOMasterConfig) -> None:
    """The checks that need no torch: they answer in about a second."""
    resolve_local_paths(config)
    check_ppo_config(config)


def main(config: PPOMasterConfig) -> None:
    # Imported only once the config is known to be good: torch, Ray and transformers take ~15 s.
    from rl_toolkit.algorithms.ppo import build_environment, check_config, ppo_train, setup
    from rl_toolkit.data import PromptDataset, tokenize_prompt_dataset
    from rl_toolkit.distributed.virtual_cluster import init_ray
    from rl_toolkit.distributed.worker_groups import shut_down_at_exit
    from rl_toolkit.environments.reward_fn import load_reward_fn
    from rl_toolkit.utils.hf import (
        check_policy_model,
        check_reward_model,
        check_trained_model,
        get_tokenizer,
    )

    # Everything a user can get wrong is checked before any worker starts (ConfigError).
    check_config(config)
    check_policy_model(config["policy"])
    critic = config["critic"]
    check_trained_model(critic["model_name"], random_init=critic["random_init"], section="critic")
    if config["reward_model"] is None:
        load_reward_fn(config["env"]["name"], config["env"]["kwargs"])
    else:
        check_reward_model(config["reward_model"]["model_name"], "reward_model.model_name")
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
        policy, policy_generation, critic_model, cluster, train_dl, val_dl, loss_fn, value_loss_fn,
        logger, checkpointer, save_state, config,
    ) = setup(config, tokenizer, train_dataset, val_dataset)  # fmt: skip
    environment = build_environment(cluster, config)
    shutdowns = [environment.shutdown, critic_model.shutdown, policy.shutdown, cluster.shutdown]
    if policy_generation is not policy:  # backend vllm: its engines go first
        shutdowns.insert(0, policy_generation.shutdown)
    with shut_down_at_exit(*shutdowns):
        ppo_train(
            policy,
            policy_generation,
            critic_model,
            train_dl,
            val_dl,
            tokenizer,
            loss_fn,
            value_loss_fn,
            environment,
            logger,
            checkpointer,
            save_state,
            config,
            train_dataset=train_dataset,
        )


if __name__ == "__main__":
    run_cli_with_config(main, sys.argv[1:], EMBEDDED_DEFAULT, __doc__, PPOMasterConfig, check=check)
