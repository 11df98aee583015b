"""GRPO with the engine API: four modules, the built-in ones, on the embedded tiny RL task.

    uv run examples/engine/grpo.py [--config configs/engine_grpo.yaml] [dotted.key=value ...]

The policy samples G completions of each prompt, the reference scores them (only with a KL
term), the rule reward scores them, the trainer steps and its weights go back to the policy
after every episode. docs/guides/engine.md explains the flow.
"""

from pathlib import Path

import rl_toolkit
from rl_toolkit import GRPOEngine
from rl_toolkit.engine.builtin import (
    PolicyInference,
    PolicyReference,
    PolicyTrainer,
    RuleReward,
    dataset_rows,
)

DEFAULT = Path(__file__).resolve().parents[2] / "configs" / "engine_grpo.yaml"

# init
config = rl_toolkit.init(default=DEFAULT)

# define models
policy_model = PolicyInference("policy")
reference_model = PolicyReference("reference")
reward_model = RuleReward("reward")
ppo_policy_model = PolicyTrainer("ppo_policy")

# define engine
engine = GRPOEngine(policy_model, reference_model, reward_model, ppo_policy_model)

# set dataset
engine.set_dataset(dataset_rows(config, "train"))
engine.set_eval_dataset(dataset_rows(config, "validation"))

# start grpo training
engine.learn()
