"""RLHF (PPO) with the engine API: ChatLearn's six modules, the built-in ones, on the embedded
tiny RL task.

    uv run examples/engine/rlhf.py [--config configs/engine_rlhf.yaml] [dotted.key=value ...]

The policy samples completions; the reference and the value model score them; the reward module
scores them too (the `reward_model`, else the `env` reward function) and turns the three into
GAE advantages and returns; the policy and value trainers step, and their weights go back to the
policy and the value model after every episode. docs/guides/engine.md explains the flow.
"""

from pathlib import Path

import rl_toolkit
from rl_toolkit import RLHFEngine
from rl_toolkit.engine.builtin import (
    PolicyInference,
    PolicyReference,
    PolicyTrainer,
    RewardInference,
    ValueInference,
    ValueTrainer,
    dataset_rows,
)

DEFAULT = Path(__file__).resolve().parents[2] / "configs" / "engine_rlhf.yaml"

# init
config = rl_toolkit.init(default=DEFAULT)

# define models
policy_model = PolicyInference("policy")
reference_model = PolicyReference("reference")
reward_model = RewardInference("reward")
value_model = ValueInference("value")
ppo_policy_model = PolicyTrainer("ppo_policy")
ppo_value_model = ValueTrainer("ppo_value")

# define engine
engine = RLHFEngine(
    policy_model, reference_model, reward_model, value_model, ppo_policy_model, ppo_value_model
)

# set dataset
engine.set_dataset(dataset_rows(config, "train"))
engine.set_eval_dataset(dataset_rows(config, "validation"))

# start rlhf training
engine.learn()
