"""DPO with a module of your own: a reference written with plain torch, the built-in trainer.

    uv run examples/engine/custom_module.py [--config configs/engine_dpo.yaml] [overrides ...]

`FullSoftmaxReference` keeps the built-in reference's model and dataset (`PolicyReference`) but
computes the reference log-probs in its own `forward_step`: one forward of the Hugging Face
model and a log-softmax over the whole vocabulary. That is what the built-in worker avoids at
scale (it never materialises [rows, tokens, vocab]); for the tiny model it is cheap, and the
losses it gives equal examples/engine/dpo.py's. Replace the body with your own model's code.
"""

from pathlib import Path
from typing import Any

import torch

import rl_toolkit
from rl_toolkit import DPOEngine
from rl_toolkit.engine.builtin import PolicyReference, PolicyTrainer, dataset_rows

DEFAULT = Path(__file__).resolve().parents[2] / "configs" / "engine_dpo.yaml"


class FullSoftmaxReference(PolicyReference):
    """Reference log-probs of the response tokens, from the full logits."""

    def forward_step(self, data: dict[str, Any], iteration: int = 0) -> dict[str, Any]:
        input_ids, lengths = data["input_ids"], data["input_lengths"]
        positions = torch.arange(input_ids.shape[1])
        attention_mask = (positions[None, :] < lengths[:, None]).long()
        model = self.worker.hf_model
        model.eval()
        with torch.no_grad():  # every rank runs its shard: the FSDP2 forward is collective
            logits = model(input_ids=input_ids, attention_mask=attention_mask).logits.float()
        # Position t holds log p(token t | tokens < t); position 0 has no prediction.
        logprobs = torch.zeros(input_ids.shape)
        predicted = torch.log_softmax(logits[:, :-1], dim=-1)
        logprobs[:, 1:] = predicted.gather(-1, input_ids[:, 1:, None]).squeeze(-1)
        return {"reference_policy_logprobs": logprobs * data["token_mask"]}


config = rl_toolkit.init(default=DEFAULT)
engine = DPOEngine(FullSoftmaxReference("reference"), PolicyTrainer("ppo_policy"))
engine.set_dataset(dataset_rows(config, "train"))
engine.set_eval_dataset(dataset_rows(config, "validation"))
engine.learn()
