"""The policy worker: one process, one shard of the policy, its optimizer and its reference.

A plain class on the FSDP2 runtime (rl_toolkit/models/fsdp/): it runs standalone (world size
1), under torchrun, or inside a Ray actor (rl_toolkit/distributed/worker_groups.py builds it
there). It reads RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT from the
environment; without WORLD_SIZE it is a single process.

Every public method is collective: all workers of a group call it together, each with its own
shard of the data. Batch sizes count sequences (rows), never pairs; the driver resolves how
each worker cuts its shard into micro-batches (``MicroBatches``) and passes it in.
"""

import os
from contextlib import AbstractContextManager
from functools import partial
from typing import Any, Literal

import torch
import torch.distributed as dist
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM
from transformers.tokenization_utils_base import PreTrainedTokenizerBase

from rl_toolkit.config_schema import MicroBatches, PolicyConfig
from rl_toolkit.distributed.batched_data_dict import BatchedDataDict
from rl_toolkit.models.fsdp import checkpoint
from rl_toolkit.models.fsdp.build import PRECISIONS, build_sharded_model, without_dropout
from rl_toolkit.models.fsdp.init import build_mesh, init_distributed
from rl_toolkit.models.fsdp.loops import (
    LossFn,
    dummy_micro_batch,
    forward_at,
    inference_outputs,
    loss_over_micro_batches,
    on_grid,
    scored_positions,
)
from rl_toolkit.models.fsdp.parallelize import reshard_all, weights_kept_gathered
from rl_toolkit.models.fsdp.step import optimizer_step
from rl_toolkit.models.generation.hf_sampling import decoding_attention, sample_responses
from rl_toolkit.models.generation.rollout import new_token_budgets, rollout_batch
from rl_toolkit.models.generation.sampling import row_seed, sampling_uniforms
from rl_toolkit.models.generation.weight_sync import (
    BucketLayout,
    CudaIpcHandle,
    RefitTensor,
    gather_bucket,
    plan_refit,
    refit_state_dict,
    share_cuda_buffer,
)
from rl_toolkit.models.lora import adapters_disabled, add_lora
from rl_toolkit.models.optim import build_optimizer, build_scheduler
from rl_toolkit.models.policy.logprobs import LogprobModel, TokenOutputs
from rl_toolkit.models.policy.reference import ReferenceWeights
from rl_toolkit.models.role_config import check_gpu_options, fsdp_options, model_source
from rl_toolkit.utils.hf import looks_local

# The policy's losses (LossFn) are called as
# loss_fn(logprobs [b, T], micro_batch, global_valid_seqs, global_valid_toks); micro_batch is a
# BatchedDataDict[PreferenceBatch], [SFTBatch] or [RolloutBatch] (rl_toolkit/data/collate.py).
# A loss that reads per-token entropies says so with an attribute `needs_entropy = True`; it is
# then called with `entropy=` [b, T] as a keyword as well (only then does the kernel compute it).
__all__ = ["LossFn", "PolicyWorker"]

_ONE_ROW = MicroBatches(packed=False, size=1)  # the micro-batch of a dummy forward
_REFERENCE_DIR = "reference"  # sub-directory of a weights checkpoint holding a synced reference


class PolicyWorker:
    """One policy worker: model shard, optimizer, scheduler and reference weights.

    With ``policy.lora`` the model carries LoRA adapters (rl_toolkit/models/lora.py), which are
    all the optimizer trains; the reference is the same model with the adapters off, so no
    reference copy is kept.

    Args:
        config: the ``policy`` section of the config.
        tokenizer: the tokenizer, saved next to checkpoints and HF exports.
        init_optimizer: build the optimizer and scheduler (False for inference only).
        init_reference_model: keep a host-memory copy of the initial weights for reference
            log-probs (nothing to keep with LoRA: the reference is the base model).
        weights_path: a checkpoint written by ``save_checkpoint`` to resume the weights from.
        optimizer_path: a checkpoint written by ``save_checkpoint`` to resume the optimizer and
            scheduler from.
    """

    def __init__(
        self,
        *,
        config: PolicyConfig,
        tokenizer: PreTrainedTokenizerBase,
        init_optimizer: bool,
        init_reference_model: bool,
        weights_path: str | None = None,
        optimizer_path: str | None = None,
    ) -> None:
        self.cfg = config
        self.tokenizer = tokenizer
        check_gpu_options(config, "policy")
        self.device = init_distributed()
        self.hf_config = AutoConfig.from_pretrained(config["model_name"])
        self.lora = config["lora"]
        source = model_source(
            config,
            without_dropout(self.hf_config),
            AutoModelForCausalLM,
            section="policy",
            random_init=config["random_init"],
            seed=config["seed"],
        )
        self.model, self.hf_model = build_sharded_model(
            source,
            lambda causal_lm: LogprobModel(causal_lm, config["logprob_chunk_size"]),
            mesh=build_mesh(self.device),
            device=self.device,
            options=fsdp_options(config),
            adapt=None if self.lora is None else partial(add_lora, config=self.lora),
        )
        for name, module in self.model.named_modules():
            # No dropout in the model (without_dropout: the config); LoRA's is the user's choice.
            if isinstance(module, nn.Dropout) and ".lora_dropout." not in name:
                module.p = 0.0
        self.reference = None
        if init_reference_model and self.lora is None:
            self.reference = ReferenceWeights(self.model)
        self.optimizer, self.scheduler = None, None
        if init_optimizer:
            trained = [p for p in self.model.parameters() if p.requires_grad]  # LoRA: adapters
            self.optimizer = build_optimizer(trained, config["optimizer"])
            self.scheduler = build_scheduler(self.optimizer, config["scheduler"])
        # A weight refit in progress (a separate generation engine; refit_layouts below).
        self._refit_state: dict[str, RefitTensor] | None = None
        self._shared_bucket: torch.Tensor | None = None
        self._refit_group: Any = None  # the NCCL group with a separate engine (rank 0 only)
        # Optimizer state moved to host memory for a colocated engine: (state, key, device).
        self._offloaded_state: list[tuple[dict[str, Any], str, torch.device]] = []
        if weights_path is not None:
            self._load_weights(weights_path)
        if optimizer_path is not None:
            assert self.optimizer is not None and self.scheduler is not None, (
                "optimizer_path given with init_optimizer=False"
            )
            checkpoint.load_optimizer(self.hf_model, self.optimizer, self.scheduler, optimizer_path)

    # ----- log-probs -----

    def logprobs(
        self, data: BatchedDataDict, micro_batches: MicroBatches, *, response_only: bool
    ) -> BatchedDataDict:
        """Next-token log-probs of this worker's shard with the current weights.

        Args:
            data: ``input_ids [N, T]``, ``input_lengths [N]`` and, with ``response_only``,
                ``token_mask [N, T]`` (N may differ between workers).
            micro_batches: how to cut the shard (the driver's ``policy.micro_batch.logprob``).
            response_only: score only where ``token_mask`` is set (what the losses read).

        Returns:
            ``{"logprobs": [N, T]}`` float32 on CPU, 0.0 at unscored positions (docs/design.md).
        """
        logprobs = self._inference_logprobs(data, micro_batches, response_only)
        return BatchedDataDict({"logprobs": logprobs}, group_size=data.group_size)

    def reference_logprobs(
        self, data: BatchedDataDict, micro_batches: MicroBatches, *, response_only: bool
    ) -> BatchedDataDict:
        """Like ``logprobs``, with the reference weights: ``{"reference_logprobs": [N, T]}``."""
        with self._reference_weights():
            logprobs = self._inference_logprobs(data, micro_batches, response_only)
        return BatchedDataDict({"reference_logprobs": logprobs}, group_size=data.group_size)

    def _reference_weights(self) -> AbstractContextManager[None]:
        """Inside the block the model computes the reference policy."""
        if self.lora is not None:
            return adapters_disabled(self.hf_model)
        assert self.reference is not None, "built with init_reference_model=False"
        return self.reference.in_model(self.model)

    def _inference_logprobs(
        self, data: BatchedDataDict, micro_batches: MicroBatches, response_only: bool
    ) -> torch.Tensor:
        return inference_outputs(
            self.model,
            data,
            micro_batches,
            lambda micro_batch: self._forward(micro_batch, micro_batches, response_only).logprobs,
            shape=tuple(data["input_ids"].shape),
            device=self.device,
        )

    def _forward(
        self,
        micro_batch: BatchedDataDict,
        micro_batches: MicroBatches,
        response_only: bool,
        *,
        with_entropy: bool = False,
    ) -> TokenOutputs:
        """Log-probs (and entropies) ``[b, T]`` of a micro-batch, packed into one row when
        ``packed``.

        Only positions ``1 <= t < input_lengths`` are scored, and with ``response_only`` only
        those where ``token_mask`` is set; every other position is 0.0.
        """
        seq_len = micro_batch["input_ids"].shape[1]
        # The driver's data fits every pair to the limit (data.overlong_policy).
        assert seq_len <= self.cfg["max_total_sequence_length"], f"sequence length {seq_len}"
        scored, rows, cols = scored_positions(micro_batch, response_only=response_only)
        flat = forward_at(
            self.model,
            micro_batch,
            packed=micro_batches.packed,
            rows=rows,
            cols=cols,
            with_entropy=with_entropy,
        )
        entropy = None if flat.entropy is None else on_grid(flat.entropy, scored, rows, cols)
        return TokenOutputs(on_grid(flat.logprobs, scored, rows, cols), entropy)

    # ----- generation -----

    def generate(self, data: BatchedDataDict, *, step: int, greedy: bool) -> BatchedDataDict:
        """Sample one response per row of this worker's shard (backend ``hf``, KV cache).

        Collective: every worker gathers the full weights once (one forward of the root), then
        samples its own rows for as many steps as they need, without collectives, so shards of
        any size (none included) and responses of any length never leave a worker waiting.
        The weights are resharded before returning.

        Args:
            data: ``input_ids [N, P]`` right-padded prompts, ``input_lengths [N]``,
                ``prompt_ids [N]`` (the prompt's index in its dataset) and ``sample_idx [N]``
                (which of the prompt's samples the row is); any other key is carried over.
            step: the training step; with ``policy.seed``, ``prompt_ids`` and ``sample_idx`` it
                seeds each row's sampling, so a row's tokens depend on nothing else.
            greedy: take the most likely token (validation) instead of sampling.

        Returns:
            The rollout (docs/design.md, "Generation"): ``input_ids [N, T]`` prompt then
            response, right-padded; ``input_lengths [N]``; ``token_mask [N, T]`` 1.0 on the
            response (stop token included); ``generation_logprobs [N, T]`` the response
            tokens' log-probs at temperature 1 without top-k/top-p (0.0 elsewhere);
            ``truncated [N]`` (no stop token within the budget); the other keys of ``data``.
        """
        sampling = self.cfg["generation"]
        data = data.to(self.device)
        budgets = new_token_budgets(
            data,
            max_new_tokens=sampling["max_new_tokens"],
            max_total_sequence_length=self.cfg["max_total_sequence_length"],
        )
        uniforms = None
        if not greedy:
            seeds = [
                row_seed(self.cfg["seed"], step, int(prompt_id), int(sample_idx))
                for prompt_id, sample_idx in zip(
                    data["prompt_ids"].tolist(), data["sample_idx"].tolist(), strict=True
                )
            ]
            uniforms = sampling_uniforms(seeds, sampling["max_new_tokens"]).to(self.device)
        stop_token_ids = torch.tensor(
            [self.tokenizer.eos_token_id, *sampling["stop_token_ids"]], device=self.device
        )
        self.model.eval()
        reshard = self.cfg["fsdp"]["reshard_after_forward"]
        with (
            torch.no_grad(),
            weights_kept_gathered(self.model, reshard_after_forward=reshard),
            decoding_attention(self.hf_model),
        ):
            # Gathers every FSDP unit, on every worker (collective); the loop then runs alone.
            self._forward(dummy_micro_batch(self.device), _ONE_ROW, response_only=False)
            responses = sample_responses(
                self.hf_model,
                data["input_ids"],
                data["input_lengths"],
                budgets=budgets,
                uniforms=uniforms,
                stop_token_ids=stop_token_ids,
                sampling=sampling,
                pad_token_id=self.tokenizer.pad_token_id,
            )
        return rollout_batch(data, responses, self.tokenizer.pad_token_id).to("cpu")

    # ----- weight refit (a separate generation engine, backend vllm) -----

    def refit_layouts(self, bucket_bytes: int) -> list[BucketLayout]:
        """Start a refit: the buckets the weights go in, the same on every worker (no collective).

        The weights are the Hugging Face state dict without tied duplicates, floating-point
        tensors in the compute dtype (``weight_sync``). Then every worker calls one of the
        ``*_refit_bucket`` methods per bucket, in order, and ``finish_refit``.
        """
        self._refit_state = refit_state_dict(self.hf_model)
        return plan_refit(self._refit_state, PRECISIONS[self.cfg["precision"]], bucket_bytes)

    def _gather_refit_bucket(self, layout: BucketLayout) -> torch.Tensor:
        assert self._refit_state is not None, "refit_layouts starts a refit"
        return gather_bucket(self._refit_state, layout, self.device)

    def host_refit_bucket(self, layout: BucketLayout) -> torch.Tensor | None:
        """Collective: one bucket's flat buffer in host memory on rank 0 (None elsewhere), for
        the engine as a Ray object (CPU)."""
        buffer = self._gather_refit_bucket(layout)
        return buffer.cpu() if dist.get_rank() == 0 else None

    def share_refit_bucket(self, layout: BucketLayout) -> CudaIpcHandle:
        """Collective: a CUDA IPC handle of one bucket's buffer on this worker's GPU, for the
        engine colocated on it; the buffer lives until the next bucket or ``finish_refit``."""
        self._shared_bucket = None  # the engine has loaded the previous one
        self._shared_bucket = self._gather_refit_bucket(layout)
        return share_cuda_buffer(self._shared_bucket)

    def init_refit_group(self, host: str, port: int, world_size: int) -> None:
        """Rank 0 joins a NCCL group with a separate engine's ``world_size - 1`` workers, as the
        group's rank 0 (together with ``VllmWorker.init_refit_group``); other ranks do nothing."""
        if dist.get_rank() == 0:
            from rl_toolkit.models.generation.vllm_worker import nccl_group

            self._refit_group = nccl_group(
                host, port, rank=0, world_size=world_size, device=self.device
            )

    def broadcast_refit_bucket(self, layout: BucketLayout) -> None:
        """Collective: rank 0 broadcasts one bucket's buffer to the separate engine's workers
        (``VllmWorker.receive_refit_bucket``) over the group of ``init_refit_group``."""
        buffer = self._gather_refit_bucket(layout)
        if dist.get_rank() == 0:
            assert self._refit_group is not None, "init_refit_group joins the group first"
            self._refit_group.broadcast(buffer, src=0)

    def offload_optimizer_state(self) -> None:
        """Move the optimizer state from the GPU to host memory, for an engine colocated on it to
        wake into; the next ``train`` moves it back. Nothing to do without a GPU."""
        if self.optimizer is None or self._offloaded_state:
            return
        for state in self.optimizer.state.values():
            for key, value in state.items():
                if isinstance(value, torch.Tensor) and value.is_cuda:
                    state[key] = value.to("cpu")
                    self._offloaded_state.append((state, key, value.device))
        if self._offloaded_state:
            torch.cuda.empty_cache()

    def _reload_optimizer_state(self) -> None:
        for state, key, device in self._offloaded_state:
            state[key] = state[key].to(device)
        self._offloaded_state = []

    def finish_refit(self) -> None:
        """End a refit: drop the references to the weights and the last shared bucket."""
        self._refit_state, self._shared_bucket = None, None
        if self.device.type == "cuda":
            torch.cuda.empty_cache()  # a colocated engine allocates its KV cache next

    # ----- training and evaluation -----

    def train(
        self, data: BatchedDataDict, loss_fn: LossFn, micro_batches: MicroBatches
    ) -> dict[str, float]:
        """One optimizer step on one global batch, of which ``data`` is this worker's shard.

        Args:
            data: this worker's rows of the global batch (docs/design.md, "The preference batch").
            loss_fn: called per micro-batch as
                ``loss_fn(logprobs, micro_batch, global_valid_seqs, global_valid_toks)``, plus
                ``entropy=`` when it has ``needs_entropy = True``; ``logprobs [b, T]`` (and
                ``entropy [b, T]``) are scored on the response tokens (``token_mask``) only and
                are 0.0 elsewhere, since the losses read nothing else.
            micro_batches: how to cut the shard (the driver's ``policy.micro_batch.train``).

        Returns:
            Metrics of the whole global batch, equal on every worker: ``loss`` and the loss
            function's metrics (summed over micro-batches and workers), ``num_valid_seqs``,
            ``num_valid_tokens``, ``global_num_tokens`` (non-padding tokens of valid rows),
            ``grad_norm`` (before clipping) and ``lr``.
        """
        assert self.optimizer is not None and self.scheduler is not None, (
            "built with init_optimizer=False"
        )
        self._reload_optimizer_state()
        results = self._loss_over_micro_batches(data, loss_fn, micro_batches, backward=True)
        step = optimizer_step(
            self.model, self.optimizer, self.scheduler, max_grad_norm=self.cfg["max_grad_norm"]
        )
        return results | step

    def evaluate(
        self, data: BatchedDataDict, loss_fn: LossFn, micro_batches: MicroBatches
    ) -> dict[str, float]:
        """The loss and metrics of one global batch, without gradients; nothing changes.

        As ``train``, without ``grad_norm`` and ``lr``; ``micro_batches`` is usually the
        driver's ``policy.micro_batch.logprob``.
        """
        results = self._loss_over_micro_batches(data, loss_fn, micro_batches, backward=False)
        reshard_all(self.model)
        return results

    def _loss_over_micro_batches(
        self,
        data: BatchedDataDict,
        loss_fn: LossFn,
        micro_batches: MicroBatches,
        *,
        backward: bool,
    ) -> dict[str, float]:
        needs_entropy = getattr(loss_fn, "needs_entropy", False)  # see LossFn

        def forward(micro_batch: BatchedDataDict) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
            outputs = self._forward(
                micro_batch, micro_batches, response_only=True, with_entropy=needs_entropy
            )  # (b, T) each
            extra = {"entropy": outputs.entropy} if outputs.entropy is not None else {}
            return outputs.logprobs, extra

        return loss_over_micro_batches(
            self.model, data, loss_fn, micro_batches, forward, device=self.device, backward=backward
        )

    # ----- reference model -----

    def update_reference_model(self, mixup_alpha: float) -> None:
        """TR-DPO sync: ``reference <- mixup_alpha * policy + (1 - mixup_alpha) * reference``.

        Args:
            mixup_alpha: weight of the current policy, in ``[0, 1]`` (the config checks it).
        """
        assert 0.0 <= mixup_alpha <= 1.0, f"mixup_alpha={mixup_alpha}"
        # With LoRA the reference is the base model, which the config keeps unsynced.
        assert self.reference is not None, "built with init_reference_model=False or LoRA"
        self.reference.mix_in(self.model, mixup_alpha)

    # ----- checkpoints -----

    def save_checkpoint(
        self,
        weights_path: str,
        optimizer_path: str | None = None,
        tokenizer_path: str | None = None,
    ) -> None:
        """Save a sharded checkpoint, loadable by any number of workers.

        Args:
            weights_path: directory for the policy weights (torch.distributed.checkpoint; with
                LoRA the adapters alone, the base model being the initial weights), plus a
                ``reference/`` sub-directory once ``update_reference_model`` has moved the
                reference away from the initial weights.
            optimizer_path: directory for the optimizer state and the scheduler.
            tokenizer_path: directory for the tokenizer (``save_pretrained``).
        """
        checkpoint.save_model(self.hf_model, weights_path)
        if self.reference is not None and self.reference.synced:
            with self.reference.in_model(self.model):
                checkpoint.save_model(self.hf_model, f"{weights_path}/{_REFERENCE_DIR}")
        if optimizer_path is not None:
            assert self.optimizer is not None and self.scheduler is not None, (
                "built with init_optimizer=False"
            )
            checkpoint.save_optimizer(self.hf_model, self.optimizer, self.scheduler, optimizer_path)
        if tokenizer_path is not None and dist.get_rank() == 0:
            self.tokenizer.save_pretrained(tokenizer_path)
        dist.barrier()

    def _load_weights(self, weights_path: str) -> None:
        checkpoint.load_model(self.hf_model, weights_path)
        reference_path = f"{weights_path}/{_REFERENCE_DIR}"
        if self.reference is not None and os.path.isdir(reference_path):
            self.reference.load(self.model, reference_path)

    def export_hf(
        self,
        path: str,
        *,
        max_shard_size: int | None = None,
        export_lora: Literal["adapter", "merged"] = "merged",
    ) -> None:
        """Write a Hugging Face model directory that ``from_pretrained`` loads.

        The weights are in the compute dtype (``policy.precision``), tied weights stored once.

        Args:
            path: output directory (rank 0 writes it).
            max_shard_size: the largest weights file in bytes, above which the weights are
                sharded; None writes one file.
            export_lora: with LoRA, "merged" writes the model with the adapters merged into its
                weights, "adapter" a PEFT adapter directory over ``policy.model_name``
                (``checkpointing.export_lora``); ignored without LoRA.
        """
        dtype = PRECISIONS[self.cfg["precision"]]
        if self.lora is not None and export_lora == "adapter":
            model_name = self.cfg["model_name"]
            checkpoint.export_lora_adapter(
                self.hf_model,
                path,
                base_model=os.path.abspath(model_name) if looks_local(model_name) else model_name,
                tokenizer=self.tokenizer,
                dtype=dtype,
            )
            return
        checkpoint.export_hf(
            self.hf_model,
            path,
            model_name=self.cfg["model_name"],
            hf_config=self.hf_config,
            tokenizer=self.tokenizer,
            dtype=dtype,
            max_shard_size=max_shard_size,
        )

    def shutdown(self) -> None:
        """Leave the process group."""
        if dist.is_initialized():
            dist.destroy_process_group()
