"""DPO with the engine API: ChatLearn's DPO main file with rl_toolkit's names.

    uv run examples/engine/dpo.py [--config configs/engine_dpo.yaml] [dotted.key=value ...]

The two modules are the built-in ones (rl_toolkit/engine/builtin.py) on the config's `policy`,
`data` and `dpo` sections; the default config is the embedded tiny DPO task (about a minute on
two CPU cores). docs/guides/engine.md explains each step and how to write your own modules.
"""

from pathlib import Path

import rl_toolkit
from rl_toolkit import DPOEngine
from rl_toolkit.engine.builtin import PolicyReference, PolicyTrainer, dataset_rows

DEFAULT = Path(__file__).resolve().parents[2] / "configs" / "engine_dpo.yaml"

# init
config = rl_toolkit.init(default=DEFAULT)

# define models
reference_model = PolicyReference("reference")
ppo_policy_model = PolicyTrainer("ppo_policy")

# define engine
engine = DPOEngine(reference_model, ppo_policy_model)

# set dataset
engine.set_dataset(dataset_rows(config, "train"))
engine.set_eval_dataset(dataset_rows(config, "validation"))

# start dpo training
engine.learn()
