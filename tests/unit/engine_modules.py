"""User-written modules for the engine tests: tiny torch models, and a log of what each call saw.

Every module appends one JSON line per event to `model_args["log"]` (shared by all modules and
ranks), so a test reads what each rank received and in which order things happened.
"""

import json
import os
from typing import Any

import torch
from torch import nn
from torch.utils.data import Dataset

from rl_toolkit.engine import BaseModule, TorchModule
from rl_toolkit.engine.module import state_dict_hash


def record(module: BaseModule, event: str, **fields: Any) -> None:
    line = {"module": module.name, "rank": module.data_parallel_rank, "event": event, **fields}
    with open(module.model_args["log"], "a") as log:
        log.write(json.dumps(line) + "\n")


class Items(Dataset):
    """Items {"id": i, "x": [4 floats]}; collate_fn stacks them."""

    def __init__(self, num_items: int) -> None:
        self.num_items = num_items

    def __len__(self) -> int:
        return self.num_items

    def __getitem__(self, index: int) -> dict[str, Any]:
        return {"id": index, "x": torch.full((4,), float(index))}

    def collate_fn(self, items: list[dict[str, Any]]) -> dict[str, Any]:
        return {
            "id": torch.tensor([item["id"] for item in items]),
            "x": torch.stack([item["x"] for item in items]),
        }


class _Tracked(TorchModule):
    """A Linear(4, 1) that logs onload/offload."""

    def setup(self) -> None:
        torch.manual_seed(0)
        self.model = nn.Linear(4, 1)
        record(self, "setup", world=self.data_parallel_size)

    def onload(self) -> None:
        record(self, "onload")

    def offload(self) -> None:
        record(self, "offload")

    def weights_hash(self) -> str:
        return state_dict_hash(self.model.state_dict())


class Sampler(_Tracked):
    """The 'policy': G=2 'completions' per item (rows id*10+s), scored by its weights."""

    def build_dataset(self, prompts: Any, is_eval: bool = False) -> Dataset:
        return Items(len(prompts))

    def forward_step(self, data: dict[str, Any], iteration: int = 0) -> dict[str, Any]:
        from rl_toolkit.distributed.batched_data_dict import BatchedDataDict

        record(self, "forward", iteration=iteration, hash=self.weights_hash(),
               ids=data["id"].tolist())  # fmt: skip
        ids = data["id"].repeat_interleave(2)
        sample = torch.arange(2).repeat(len(data["id"]))
        with torch.no_grad():
            score = self.model(data["x"].repeat_interleave(2, dim=0)).squeeze(1)
        return BatchedDataDict(
            {"id": ids, "sample": sample, "x": data["x"].repeat_interleave(2, dim=0),
             "score": score},
            group_size=2,
        )  # fmt: skip

    def eval_step(self, data: dict[str, Any]) -> dict[str, Any]:
        return self.forward_step(data)


class Value(_Tracked):
    """The 'value model': `values` of each row from its weights (synced from its trainer)."""

    def forward_step(self, data: dict[str, Any], iteration: int = 0) -> dict[str, Any]:
        record(self, "forward", iteration=iteration, hash=self.weights_hash())
        with torch.no_grad():
            return {"values": self.model(data["x"]).squeeze(1)}


class Reference(BaseModule):
    """Adds `ref` = 2 * id (no torch model)."""

    def forward_step(self, data: dict[str, Any], iteration: int = 0) -> dict[str, Any]:
        return {"ref": data["id"].float() * 2}


class Reward(BaseModule):
    """`rewards` = sample index, so every group has a signal; in an RLHF flow it gets the
    completions, the reference's and the value model's outputs, and records what it saw."""

    def setup(self) -> None:
        record(self, "setup", world=self.data_parallel_size)

    def forward_step(self, data: dict[str, Any], iteration: int = 0) -> dict[str, Any]:
        record(self, "forward", keys=sorted(data))
        return {"rewards": data["sample"].float()}


class Trainer(_Tracked):
    """SGD on (score - rewards)^2 with its own Linear; the new-style signature (train_info).

    With `fail_at_iteration` in its args it raises once at that iteration (the marker file
    `<log>.failed` remembers), as a run killed mid-episode.
    """

    def setup(self) -> None:
        super().setup()
        self.optimizer = torch.optim.SGD(self.model.parameters(), lr=0.1)

    def train_step(self, data: list[dict[str, Any]], train_info: dict[str, Any]) -> dict:
        fail_at, marker = (
            self.model_args.get("fail_at_iteration"),
            self.model_args["log"] + ".failed",
        )
        if train_info["iteration"] == fail_at and not os.path.exists(marker):
            open(marker, "w").close()
            raise RuntimeError("killed mid-episode")
        self.optimizer.zero_grad()
        rows = sum(len(micro["id"]) for micro in data)
        for micro in data:
            loss = ((self.model(micro["x"]).squeeze(1) - micro["rewards"]) ** 2).sum() / rows
            loss.backward()
        # The ranks' gradients are summed, as a data-parallel step does.
        for parameter in self.model.parameters():
            torch.distributed.all_reduce(parameter.grad)
            parameter.grad /= self.data_parallel_size
        self.optimizer.step()
        record(self, "train", **train_info, sizes=[len(m["id"]) for m in data],
               ids=[m["id"].tolist() for m in data], hash=self.weights_hash(),
               groups_whole=all(m["sample"].tolist() == [0, 1] * (len(m["id"]) // 2) for m in data))  # fmt: skip
        return {"loss": loss.item(), "rows": rows}


class OldStyleTrainer(Trainer):
    """The same step with ChatLearn's DPO-style signature: train_step(data, iteration)."""

    def train_step(self, data: list[dict[str, Any]], iteration: int) -> dict:  # type: ignore[override]
        return super().train_step(data, {"iteration": iteration, "episode": -1})


class NoDataset(BaseModule):
    """A module without build_dataset."""

    def forward_step(self, data: dict[str, Any], iteration: int = 0) -> dict[str, Any]:
        return {}
