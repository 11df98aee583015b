"""The value worker: one process, one shard of a scalar-head model and its optimizer.

The PPO critic, and the reward model that examples/run_rm.py trains: a plain class on the FSDP2
runtime (rl_toolkit/models/fsdp/), built standalone (world size 1), under torchrun or in a Ray
actor (the ``ValueModel`` facade), as the policy worker is. Every public method is collective.
"""

from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from transformers import AutoConfig, AutoModelForSequenceClassification
from transformers.tokenization_utils_base import PreTrainedTokenizerBase

from rl_toolkit.config_schema import CriticConfig, MicroBatches
from rl_toolkit.distributed.batched_data_dict import BatchedDataDict
from rl_toolkit.models.fsdp import checkpoint
from rl_toolkit.models.fsdp.build import PRECISIONS, build_sharded_model
from rl_toolkit.models.fsdp.init import build_mesh, init_distributed
from rl_toolkit.models.fsdp.loops import LossFn, inference_outputs, loss_over_micro_batches
from rl_toolkit.models.fsdp.parallelize import reshard_all
from rl_toolkit.models.fsdp.step import optimizer_step
from rl_toolkit.models.optim import build_optimizer, build_scheduler
from rl_toolkit.models.role_config import check_gpu_options, fsdp_options, model_source
from rl_toolkit.models.value.model import (
    ScalarHeadModel,
    exported_config,
    inference_scores,
    scalar_head_config,
    sequence_scores,
    token_values,
)


class ValueWorker:
    """One worker of a scalar-head model: its shard, optimizer and scheduler.

    Args:
        config: the model's section (`critic`, or the `policy` of a reward-model config).
        tokenizer: the tokenizer, saved next to checkpoints and exports.
        section: the section's name, for error messages ("critic", "policy").
        init_optimizer: build the optimizer and scheduler (False for inference only).
        weights_path: a checkpoint written by ``save_checkpoint`` to resume the weights from.
        optimizer_path: one to resume the optimizer and scheduler from.
    """

    def __init__(
        self,
        *,
        config: CriticConfig,
        tokenizer: PreTrainedTokenizerBase,
        section: str,
        init_optimizer: bool,
        weights_path: str | None = None,
        optimizer_path: str | None = None,
    ) -> None:
        self.cfg = config
        self.tokenizer = tokenizer
        check_gpu_options(config, section)
        self.device = init_distributed()
        hf_config = scalar_head_config(AutoConfig.from_pretrained(config["model_name"]))
        source = model_source(
            config,
            hf_config,
            AutoModelForSequenceClassification,
            section=section,
            random_init=config["random_init"],
            seed=config["seed"],
        )
        self.model, self.hf_model = build_sharded_model(
            source,
            ScalarHeadModel,
            mesh=build_mesh(self.device),
            device=self.device,
            options=fsdp_options(config),
            adapt=None,
        )
        self.hf_config = exported_config(hf_config, self.hf_model)
        for module in self.model.modules():  # no dropout anywhere (scalar_head_config: the config)
            if isinstance(module, nn.Dropout):
                module.p = 0.0
        self.optimizer, self.scheduler = None, None
        if init_optimizer:
            self.optimizer = build_optimizer(self.model.parameters(), config["optimizer"])
            self.scheduler = build_scheduler(self.optimizer, config["scheduler"])
        if weights_path is not None:
            checkpoint.load_model(self.hf_model, weights_path)
        if optimizer_path is not None:
            assert self.optimizer is not None and self.scheduler is not None, (
                "optimizer_path given with init_optimizer=False"
            )
            checkpoint.load_optimizer(self.hf_model, self.optimizer, self.scheduler, optimizer_path)

    # ----- inference -----

    def get_values(self, data: BatchedDataDict, micro_batches: MicroBatches) -> BatchedDataDict:
        """The value of the state before each response token of this worker's shard.

        Args:
            data: ``input_ids [N, T]``, ``input_lengths [N]``, ``token_mask [N, T]`` (a rollout).
            micro_batches: how to cut the shard.

        Returns:
            ``{"values": [N, T]}`` float32 on CPU: at a response token ``t`` the head's output
            on the hidden state at ``t - 1``; 0.0 elsewhere.
        """
        values = inference_outputs(
            self.model,
            data,
            micro_batches,
            lambda micro_batch: token_values(self.model, micro_batch, micro_batches),
            shape=tuple(data["input_ids"].shape),
            device=self.device,
        )
        return BatchedDataDict({"values": values}, group_size=data.group_size)

    def get_scores(self, data: BatchedDataDict, micro_batches: MicroBatches) -> BatchedDataDict:
        """``{"scores": [N]}``: the head's output after each row's last token (a reward model's
        score of the sequence), float32 on CPU."""
        scores = inference_scores(self.model, data, micro_batches, self.device)
        return BatchedDataDict({"scores": scores}, group_size=data.group_size)

    # ----- training and evaluation -----

    def train(
        self, data: BatchedDataDict, loss_fn: LossFn, micro_batches: MicroBatches
    ) -> dict[str, float]:
        """One optimizer step on one global batch, of which ``data`` is this worker's shard.

        Args:
            data: this worker's rows (a rollout with ``values`` and ``returns`` for the critic;
                a preference batch for a reward model).
            loss_fn: called per micro-batch as
                ``loss_fn(outputs, micro_batch, global_valid_seqs, global_valid_toks)``, where
                ``outputs`` are the values ``[b, T]`` of ``get_values`` or, when the loss has
                ``per_sequence = True``, the scores ``[b]`` of ``get_scores``, with gradients.
            micro_batches: how to cut the shard.

        Returns:
            Metrics of the whole global batch, equal on every worker: ``loss`` and the loss's
            metrics (summed over micro-batches and workers), the global counts, ``grad_norm``
            (before clipping) and ``lr``.
        """
        assert self.optimizer is not None and self.scheduler is not None, (
            "built with init_optimizer=False"
        )
        results = self._loss_over_micro_batches(data, loss_fn, micro_batches, backward=True)
        step = optimizer_step(
            self.model, self.optimizer, self.scheduler, max_grad_norm=self.cfg["max_grad_norm"]
        )
        return results | step

    def evaluate(
        self, data: BatchedDataDict, loss_fn: LossFn, micro_batches: MicroBatches
    ) -> dict[str, float]:
        """The loss and metrics of one global batch, without gradients (as ``train``, without
        ``grad_norm`` and ``lr``); nothing changes."""
        results = self._loss_over_micro_batches(data, loss_fn, micro_batches, backward=False)
        reshard_all(self.model)
        return results

    def _loss_over_micro_batches(
        self, data: BatchedDataDict, loss_fn: LossFn, micro_batches: MicroBatches, *, backward: bool
    ) -> dict[str, float]:
        outputs = sequence_scores if getattr(loss_fn, "per_sequence", False) else token_values

        def forward(micro_batch: BatchedDataDict) -> tuple[torch.Tensor, dict[str, Any]]:
            return outputs(self.model, micro_batch, micro_batches), {}

        return loss_over_micro_batches(
            self.model, data, loss_fn, micro_batches, forward, device=self.device, backward=backward
        )

    # ----- checkpoints -----

    def save_checkpoint(
        self,
        weights_path: str,
        optimizer_path: str | None = None,
        tokenizer_path: str | None = None,
    ) -> None:
        """Save a sharded checkpoint (weights, optimizer and scheduler, tokenizer), loadable by
        any number of workers; as ``PolicyWorker.save_checkpoint``."""
        checkpoint.save_model(self.hf_model, weights_path)
        if optimizer_path is not None:
            assert self.optimizer is not None and self.scheduler is not None, (
                "built with init_optimizer=False"
            )
            checkpoint.save_optimizer(self.hf_model, self.optimizer, self.scheduler, optimizer_path)
        if tokenizer_path is not None and dist.get_rank() == 0:
            self.tokenizer.save_pretrained(tokenizer_path)
        dist.barrier()

    def export_hf(self, path: str, *, max_shard_size: int | None = None) -> None:
        """Write a folder that ``AutoModelForSequenceClassification.from_pretrained`` loads (a
        reward model's export; the weights in the compute dtype); as ``PolicyWorker.export_hf``.
        """
        checkpoint.export_hf(
            self.hf_model,
            path,
            model_name=self.cfg["model_name"],
            hf_config=self.hf_config,
            tokenizer=self.tokenizer,
            dtype=PRECISIONS[self.cfg["precision"]],
            max_shard_size=max_shard_size,
        )

    def shutdown(self) -> None:
        """Leave the process group."""
        if dist.is_initialized():
            dist.destroy_process_group()
