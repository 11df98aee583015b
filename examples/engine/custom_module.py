"""DPO with a module of your own: a reference written with plain torch, the built-in trainer.

    uv run examples/engine/custom_module.py [--config configs/engine_dpo.yaml] [overrides ...]

`MyReference` is a user's TorchModule: on each of its workers it builds the Hugging Face model
itself (the same initial weights as the policy: loaded, or from the seed of `policy.random_init`)
as a full replica, and computes the reference log-probs in its own `forward_step` with a
log-softmax over the whole vocabulary. That is what the built-in worker avoids at scale (it
never materialises [rows, tokens, vocab] and shards the model with FSDP2); for the tiny model it
is cheap, and the losses match examples/engine/dpo.py's. Replace the body with your own model.
"""

from pathlib import Path
from typing import Any

import torch
from transformers import AutoConfig, AutoModelForCausalLM

import rl_toolkit
from rl_toolkit import DPOEngine, TorchModule
from rl_toolkit.engine.builtin import PolicyTrainer, dataset_rows, preference_dataset
from rl_toolkit.utils.hf import get_tokenizer

DEFAULT = Path(__file__).resolve().parents[2] / "configs" / "engine_dpo.yaml"


class MyReference(TorchModule):
    """Reference log-probs of the response tokens, from a plain (unsharded) model."""

    def setup(self) -> None:
        policy = self.global_args["policy"]
        self.tokenizer = get_tokenizer(policy["tokenizer"])
        if policy["random_init"]:  # the policy's initial weights: the same seed, the same init
            torch.manual_seed(policy["seed"])
            config = AutoConfig.from_pretrained(policy["model_name"], attn_implementation="sdpa")
            self.model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        else:
            self.model = AutoModelForCausalLM.from_pretrained(policy["model_name"])
        self.model.eval()

    def forward_step(self, data: dict[str, Any], iteration: int = 0) -> dict[str, Any]:
        input_ids, lengths = data["input_ids"], data["input_lengths"]
        attention_mask = (torch.arange(input_ids.shape[1])[None, :] < lengths[:, None]).long()
        with torch.no_grad():
            logits = self.model(input_ids=input_ids, attention_mask=attention_mask).logits
        # Position t holds log p(token t | tokens < t); position 0 has no prediction.
        logprobs = torch.zeros(input_ids.shape)
        predicted = torch.log_softmax(logits[:, :-1].float(), dim=-1)
        logprobs[:, 1:] = predicted.gather(-1, input_ids[:, 1:, None]).squeeze(-1)
        return {"reference_policy_logprobs": logprobs * data["token_mask"]}

    def build_dataset(self, prompts: Any, is_eval: bool = False) -> torch.utils.data.Dataset:
        return preference_dataset(prompts, self.tokenizer, self.global_args)


config = rl_toolkit.init(default=DEFAULT)
engine = DPOEngine(MyReference("reference"), PolicyTrainer("ppo_policy"))
engine.set_dataset(dataset_rows(config, "train"))
engine.set_eval_dataset(dataset_rows(config, "validation"))
engine.learn()
