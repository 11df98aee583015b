"""The FSDP2 policy worker: one process, one shard of the model, its optimizer and reference.

A plain class: it runs standalone (world size 1), under torchrun, or inside a Ray actor (the
policy facade's RayWorkerGroup builds it there). It reads RANK, WORLD_SIZE, LOCAL_RANK,
MASTER_ADDR and MASTER_PORT from the environment; without WORLD_SIZE it is a single process.

Every public method is collective: all workers of a group call it together, each with its own
shard of the data. Batch sizes count sequences (rows), never pairs.
"""

import copy
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.fsdp import (
    CPUOffloadPolicy,
    FSDPModule,
    MixedPrecisionPolicy,
    OffloadPolicy,
    fully_shard,
)
from torch.distributed.tensor import DTensor
from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig, PreTrainedModel
from transformers.tokenization_utils_base import PreTrainedTokenizerBase

from rl_toolkit.config_schema import PolicyConfig
from rl_toolkit.distributed.batched_data_dict import BatchedDataDict
from rl_toolkit.models.optim import build_optimizer, build_scheduler
from rl_toolkit.models.policy.attention import VARLEN_ATTENTION
from rl_toolkit.models.policy.logprobs import selected_token_logprobs
from rl_toolkit.models.policy.packing import pack_rows, token_budget_groups
from rl_toolkit.utils.hf_export import load_generation_config, save_hf_model, tied_parameter_names
from rl_toolkit.utils.safe_load import load_dcp, load_weights_only

# loss, metrics = loss_fn(logprobs [b, T], micro_batch, global_valid_seqs, global_valid_toks)
LossFn = Callable[
    [torch.Tensor, BatchedDataDict, torch.Tensor, torch.Tensor],
    tuple[torch.Tensor, dict[str, Any]],
]

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
_REFERENCE_DIR = "reference"  # sub-directory of a weights checkpoint holding a synced reference
_SCHEDULER_FILE = "scheduler.pt"  # torch.save of plain numbers and lists: weights_only loadable


class LogprobModel(nn.Module):
    """A causal LM whose forward returns next-token log-probs instead of logits.

    The log-probs are computed inside this module's forward so that the FSDP2 root (this module)
    has its parameters, ``lm_head`` included, gathered while the chunked projection runs.

    Args:
        causal_lm: a Hugging Face ``*ForCausalLM`` model.
        chunk_size: tokens whose full-vocabulary logits exist at once.
    """

    def __init__(self, causal_lm: PreTrainedModel, chunk_size: int) -> None:
        super().__init__()
        if causal_lm.get_output_embeddings().bias is not None:
            raise ValueError(
                f"{type(causal_lm).__name__}: an lm_head with a bias is not supported by the "
                "chunked log-prob computation"
            )
        self.causal_lm = causal_lm
        self.chunk_size = chunk_size

    def forward(
        self,
        input_ids: torch.Tensor,
        target_index: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        cu_seq_lens: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Log-probs of the tokens at ``target_index``, each given the tokens before it.

        Args:
            input_ids: ``[b, T]`` padded rows, or one packed row ``[1, L]``.
            target_index: ``[n]`` flat positions in ``input_ids.view(-1)`` to score.
            attention_mask: ``[b, T]`` 1 on real tokens (padded rows); None for a packed row.
            position_ids: ``[1, L]`` restarting at 0 for every sequence (packed row); None for
                padded rows.
            cu_seq_lens: ``[k + 1]`` cumulative sequence lengths of a packed row, for
                variable-length attention (``pack_rows``); None for padded rows.

        Returns:
            ``[n]`` float32 log-probs.
        """
        varlen_kwargs = {}
        if cu_seq_lens is not None:
            # Read by the varlen and flash attention functions; the others ignore them.
            max_length = int(cu_seq_lens.diff().max())
            varlen_kwargs = {
                "cu_seq_lens_q": cu_seq_lens,
                "cu_seq_lens_k": cu_seq_lens,
                "max_length_q": max_length,
                "max_length_k": max_length,
            }
        hidden = self.causal_lm.base_model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            use_cache=False,
            **varlen_kwargs,
        ).last_hidden_state  # (b, T, H)
        weight = self.causal_lm.get_output_embeddings().weight  # (V, H)
        return selected_token_logprobs(hidden, weight, input_ids, target_index, self.chunk_size)


class FSDP2PolicyWorker:
    """One policy worker: model shard, optimizer, scheduler and reference weights.

    Args:
        config: the ``policy`` section of the config.
        tokenizer: the tokenizer, saved next to checkpoints and HF exports.
        init_optimizer: build the optimizer and scheduler (False for a reference-only worker).
        init_reference_model: keep a host-memory copy of the initial weights for reference
            log-probs.
        weights_path: a checkpoint written by ``save_checkpoint`` to resume the weights from.
        optimizer_path: a checkpoint written by ``save_checkpoint`` to resume the optimizer and
            scheduler from.
    """

    def __init__(
        self,
        *,
        config: PolicyConfig,
        tokenizer: PreTrainedTokenizerBase,
        init_optimizer: bool = True,
        init_reference_model: bool = True,
        weights_path: str | None = None,
        optimizer_path: str | None = None,
    ) -> None:
        self.cfg = config
        self.tokenizer = tokenizer
        _check_gpu_options(config)
        self.device = _init_distributed()
        self.rank, self.world_size = dist.get_rank(), dist.get_world_size()
        self.mesh = init_device_mesh(self.device.type, (self.world_size,))
        self.hf_config = AutoConfig.from_pretrained(config["model_name"])
        self.model = _build_sharded_model(config, self.hf_config, self.mesh, self.device)
        self.reference = ReferenceWeights(self.model) if init_reference_model else None
        self.optimizer, self.scheduler = None, None
        if init_optimizer:
            self.optimizer = build_optimizer(self.model.parameters(), config["optimizer"])
            self.scheduler = build_scheduler(self.optimizer, config["scheduler"])
        if weights_path is not None:
            self._load_weights(weights_path)
        if optimizer_path is not None:
            self._load_optimizer(optimizer_path)

    # ----- log-probs -----

    def get_logprobs(self, data: BatchedDataDict) -> BatchedDataDict:
        """Next-token log-probs of this worker's shard with the current weights.

        Args:
            data: ``input_ids [N, T]`` and ``input_lengths [N]`` (N may differ between workers).

        Returns:
            ``{"logprobs": [N, T]}`` float32 on CPU, in the convention of docs/design.md.
        """
        logprobs = self._inference_logprobs(data, response_only=False)
        return BatchedDataDict({"logprobs": logprobs}, group_size=data.group_size)

    def get_reference_policy_logprobs(self, data: BatchedDataDict) -> BatchedDataDict:
        """Like ``get_logprobs`` with the reference weights, scoring only what the loss reads.

        When ``data`` has a ``token_mask`` (the preference batch), only the response tokens are
        scored and every other position is 0.0: the loss reads nothing else.

        Returns:
            ``{"reference_logprobs": [N, T]}`` float32 on CPU.
        """
        assert self.reference is not None, "built with init_reference_model=False"
        with self.reference.in_model(self.model):
            logprobs = self._inference_logprobs(data, response_only="token_mask" in data)
        return BatchedDataDict({"reference_logprobs": logprobs}, group_size=data.group_size)

    def _inference_logprobs(self, data: BatchedDataDict, response_only: bool) -> torch.Tensor:
        # FSDP2 forwards are collective, so every worker runs as many micro-batches as the
        # worker with the most; the extra ones run on a dummy row and are dropped.
        micro_batch_rows = self._micro_batch_rows(
            data, self.cfg["logprob_batch_size"], self.cfg["sequence_packing"]["logprob_mb_tokens"]
        )
        num_steps = self._max_over_workers(len(micro_batch_rows))
        logprobs = torch.zeros(data["input_ids"].shape)  # (N, T)
        self.model.eval()
        with torch.no_grad():
            for step in range(num_steps):
                if step < len(micro_batch_rows):
                    rows = micro_batch_rows[step]
                    micro_batch = data.select_indices(rows).to(self.device)
                    logprobs[rows] = self._forward(micro_batch, response_only).cpu()
                else:
                    self._forward(_dummy_micro_batch(self.device), response_only=False)
        _reshard_all(self.model)
        return logprobs

    def _micro_batch_rows(
        self, data: BatchedDataDict, max_rows: int, max_tokens: int
    ) -> list[torch.Tensor]:
        """Row indices of each micro-batch of this worker's rows.

        With ``policy.sequence_packing.enabled``: whole groups in order, up to ``max_tokens``
        real tokens each; otherwise ``max_rows`` consecutive rows.
        """
        if self.cfg["sequence_packing"]["enabled"]:
            lengths = data["input_lengths"].cpu()
            return token_budget_groups(lengths, data.group_size, max_tokens)
        return [
            torch.arange(start, min(start + max_rows, data.size))
            for start in range(0, data.size, max_rows)
        ]

    def _max_over_workers(self, value: int) -> int:
        tensor = torch.tensor(value, device=self.device)
        dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
        return int(tensor)

    def _forward(self, micro_batch: BatchedDataDict, response_only: bool) -> torch.Tensor:
        """Log-probs ``[b, T]`` of a micro-batch, packed into one row when packing is on.

        Only positions ``1 <= t < input_lengths`` are scored, and with ``response_only`` only
        those where ``token_mask`` is set; every other position is 0.0.
        """
        input_ids, input_lengths = micro_batch["input_ids"], micro_batch["input_lengths"]
        seq_len = input_ids.shape[1]
        # The driver's data fits every pair to the limit (data.overlong_policy).
        assert seq_len <= self.cfg["max_total_sequence_length"], f"sequence length {seq_len}"
        positions = torch.arange(seq_len, device=input_ids.device)
        scored = (positions[None, :] >= 1) & (positions[None, :] < input_lengths[:, None])
        if response_only:
            scored &= micro_batch["token_mask"] > 0  # (b, T)
        rows, cols = scored.nonzero(as_tuple=True)  # (n,), (n,)
        if self.cfg["sequence_packing"]["enabled"]:
            packed_ids, position_ids, cu_seq_lens = pack_rows(input_ids, input_lengths)
            flat = self.model(
                packed_ids,
                cu_seq_lens[rows] + cols,
                position_ids=position_ids,
                cu_seq_lens=cu_seq_lens.to(torch.int32),
            )
        else:
            attention_mask = (positions[None, :] < input_lengths[:, None]).long()  # (b, T)
            flat = self.model(input_ids, rows * seq_len + cols, attention_mask=attention_mask)
        logprobs = torch.zeros(scored.shape, dtype=flat.dtype, device=flat.device)
        return logprobs.index_put((rows, cols), flat)  # (b, T), differentiable

    # ----- training -----

    def train(
        self,
        data: BatchedDataDict,
        loss_fn: LossFn,
        eval_mode: bool = False,
        gbs: int | None = None,
        mbs: int | None = None,
    ) -> dict[str, float]:
        """One optimizer step on one global batch (or, in eval mode, only the loss).

        Args:
            data: this worker's shard of the global batch, ``gbs // world_size`` rows with the
                keys of the preference batch (docs/design.md).
            loss_fn: called per micro-batch as
                ``loss_fn(logprobs, micro_batch, global_valid_seqs, global_valid_toks)``;
                ``logprobs [b, T]`` are scored on the response tokens (``token_mask``) only and
                are 0.0 elsewhere, since the losses read nothing else.
            eval_mode: compute loss and metrics under no_grad; change nothing.
            gbs: global batch size in rows; default ``policy.train_global_batch_size``.
            mbs: micro-batch size in rows; default ``policy.train_micro_batch_size``.

        Returns:
            Metrics of the whole global batch, equal on every worker: ``loss`` and the loss
            function's metrics (summed over micro-batches and workers), ``num_valid_seqs``,
            ``num_valid_tokens``, ``global_num_tokens`` (non-padding tokens of valid rows) and,
            when training, ``grad_norm`` (before clipping) and ``lr``.
        """
        gbs = self.cfg["train_global_batch_size"] if gbs is None else gbs
        mbs = self.cfg["train_micro_batch_size"] if mbs is None else mbs
        self._check_train_batch(data, gbs, mbs)
        assert eval_mode or self.optimizer is not None, "built with init_optimizer=False"
        data = data.to(self.device)
        counts = self._global_counts(data)
        self.model.train(not eval_mode)
        sums: dict[str, torch.Tensor] = {}
        micro_batch_rows = self._micro_batch_rows(
            data, mbs, self.cfg["sequence_packing"]["train_mb_tokens"]
        )
        num_steps = self._max_over_workers(len(micro_batch_rows))
        with torch.set_grad_enabled(not eval_mode):
            for step in range(num_steps):
                if step >= len(micro_batch_rows):
                    self._dummy_step(eval_mode)  # keeps FSDP2's collectives in step
                    continue
                micro_batch = data.select_indices(micro_batch_rows[step])
                logprobs = self._forward(micro_batch, response_only=True)  # (b, T)
                loss, metrics = loss_fn(
                    logprobs, micro_batch, counts["num_valid_seqs"], counts["num_valid_tokens"]
                )
                if not eval_mode:
                    loss.backward()
                for key, value in {"loss": loss, **metrics}.items():
                    value = torch.as_tensor(value, dtype=torch.float64).detach().cpu()
                    sums[key] = sums.get(key, 0.0) + value
        results = _all_reduce_sum(sums, self.device)
        if eval_mode:
            _reshard_all(self.model)
        else:
            results |= self._optimizer_step()
        return results | {key: float(value) for key, value in counts.items()}

    def _dummy_step(self, eval_mode: bool) -> None:
        logprobs = self._forward(_dummy_micro_batch(self.device), response_only=False)
        if not eval_mode:
            (logprobs.sum() * 0.0).backward()  # zero gradients, but every reduce-scatter runs

    def _check_train_batch(self, data: BatchedDataDict, gbs: int, mbs: int) -> None:
        # The driver checks the batch sizes against the workers (config_schema, Policy.train).
        rows_per_worker = gbs // self.world_size
        assert gbs % (self.world_size * data.group_size) == 0 and data.size == rows_per_worker, (
            f"global batch {gbs} rows over {self.world_size} workers; this shard: {data.size}"
        )
        packing = self.cfg["sequence_packing"]["enabled"]
        assert packing or (mbs % data.group_size == 0 and rows_per_worker % mbs == 0), (
            f"micro-batch {mbs} rows, {rows_per_worker} rows per worker"
        )

    def _global_counts(self, data: BatchedDataDict) -> dict[str, torch.Tensor]:
        """Valid sequences, valid response tokens and non-padding tokens of the global batch."""
        sample_mask = data["sample_mask"].float()  # (n,)
        local = torch.stack(
            [
                sample_mask.sum(),
                (data["token_mask"].float() * sample_mask[:, None]).sum(),
                (data["input_lengths"].float() * sample_mask).sum(),
            ]
        )
        dist.all_reduce(local)
        names = ["num_valid_seqs", "num_valid_tokens", "global_num_tokens"]
        return dict(zip(names, local.unbind(), strict=True))

    def _optimizer_step(self) -> dict[str, float]:
        params = [p for p in self.model.parameters() if p.grad is not None]
        grad_norm = torch.nn.utils.get_total_norm([p.grad for p in params], foreach=True)
        if isinstance(grad_norm, DTensor):
            grad_norm = grad_norm.full_tensor()  # sharded grads give a partial norm
        if self.cfg["max_grad_norm"] is not None:
            torch.nn.utils.clip_grads_with_norm_(
                params, self.cfg["max_grad_norm"], grad_norm, foreach=True
            )
        lr = self.optimizer.param_groups[0]["lr"]  # the rate this step uses
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return {"grad_norm": float(grad_norm), "lr": float(lr)}

    # ----- reference model -----

    def update_reference_model(self, mixup_alpha: float) -> None:
        """TR-DPO sync: ``reference <- mixup_alpha * policy + (1 - mixup_alpha) * reference``.

        Args:
            mixup_alpha: weight of the current policy, in ``[0, 1]``.
        """
        if not 0.0 <= mixup_alpha <= 1.0:
            raise ValueError(
                f"update_reference_model: mixup_alpha must be in [0, 1], got {mixup_alpha}"
            )
        assert self.reference is not None, "built with init_reference_model=False"
        self.reference.mix_in(self.model, mixup_alpha)

    # ----- memory placement -----

    def prepare_for_training(self) -> None:
        """Bring the optimizer state back to the accelerator before ``train``."""
        self._move_optimizer_state(self._optimizer_device())

    def prepare_for_lp_inference(self) -> None:
        """Move the optimizer state to host memory to leave room for large log-prob batches."""
        self._move_optimizer_state(torch.device("cpu"))

    def _optimizer_device(self) -> torch.device:
        return torch.device("cpu") if self.cfg["fsdp"]["cpu_offload"] else self.device

    def _move_optimizer_state(self, device: torch.device) -> None:
        if self.optimizer is None:
            return
        for state in self.optimizer.state.values():
            for key, value in state.items():
                if isinstance(value, torch.Tensor) and value.dim() > 0:
                    state[key] = value.to(device)
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def shutdown(self) -> None:
        """Leave the process group."""
        if dist.is_initialized():
            dist.destroy_process_group()

    # ----- checkpoints -----

    def save_checkpoint(
        self,
        weights_path: str,
        optimizer_path: str | None = None,
        tokenizer_path: str | None = None,
    ) -> None:
        """Save a sharded checkpoint, loadable by any number of workers.

        Args:
            weights_path: directory for the policy weights (torch.distributed.checkpoint), plus
                a ``reference/`` sub-directory once ``update_reference_model`` has moved the
                reference away from the initial weights.
            optimizer_path: directory for the optimizer state and the scheduler.
            tokenizer_path: directory for the tokenizer (``save_pretrained``).
        """
        dcp.save({"model": get_model_state_dict(self.model.causal_lm)}, checkpoint_id=weights_path)
        if self.reference is not None and self.reference.synced:
            with self.reference.in_model(self.model):
                reference_path = os.path.join(weights_path, _REFERENCE_DIR)
                dcp.save(
                    {"model": get_model_state_dict(self.model.causal_lm)},
                    checkpoint_id=reference_path,
                )
        if optimizer_path is not None:
            assert self.optimizer is not None, "built with init_optimizer=False"
            state = get_optimizer_state_dict(self.model.causal_lm, self.optimizer)
            dcp.save({"optimizer": state}, checkpoint_id=optimizer_path)
            if self.rank == 0:
                torch.save(
                    self.scheduler.state_dict(), os.path.join(optimizer_path, _SCHEDULER_FILE)
                )
        if tokenizer_path is not None and self.rank == 0:
            self.tokenizer.save_pretrained(tokenizer_path)
        dist.barrier()

    def _load_weights(self, weights_path: str) -> None:
        _load_model_checkpoint(self.model.causal_lm, weights_path)
        reference_path = os.path.join(weights_path, _REFERENCE_DIR)
        if self.reference is not None and os.path.isdir(reference_path):
            self.reference.load(self.model, reference_path)

    def _load_optimizer(self, optimizer_path: str) -> None:
        assert self.optimizer is not None, "optimizer_path given with init_optimizer=False"
        state = get_optimizer_state_dict(self.model.causal_lm, self.optimizer)
        load_dcp({"optimizer": state}, optimizer_path)
        set_optimizer_state_dict(self.model.causal_lm, self.optimizer, state)
        self.scheduler.load_state_dict(
            load_weights_only(os.path.join(optimizer_path, _SCHEDULER_FILE))
        )

    def export_hf(self, path: str, *, max_shard_size: int | None = None) -> None:
        """Write a Hugging Face model directory that ``from_pretrained`` loads.

        The weights are in the compute dtype (``policy.precision``), tied weights stored once;
        see ``rl_toolkit.utils.hf_export.save_hf_model`` for the files.

        Args:
            path: output directory (rank 0 writes it).
            max_shard_size: the largest weights file in bytes, above which the weights are
                sharded; None writes one file.
        """
        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        state = get_model_state_dict(self.model.causal_lm, options=options)  # empty off rank 0
        if self.rank == 0:
            save_hf_model(
                path,
                state_dict=state,
                tied_names=tied_parameter_names(self.model.causal_lm),
                hf_config=self.hf_config,
                generation_config=load_generation_config(self.cfg["model_name"], self.hf_config),
                tokenizer=self.tokenizer,
                dtype=_DTYPES[self.cfg["precision"]],
                max_shard_size=max_shard_size,
            )
        dist.barrier()


class ReferenceWeights:
    """The reference policy's weights: a host-memory copy of this worker's parameter shards.

    Costs ``4 * num_params / world_size`` bytes of host memory per worker for the copy, plus as
    much again for a staging buffer that holds the policy's shards while the reference ones are
    swapped in. Both are allocated once (pinned on GPU machines) and reused on every call.

    Args:
        model: the sharded model, holding the weights the reference starts from.
    """

    def __init__(self, model: nn.Module) -> None:
        pin = torch.cuda.is_available()
        shards = _local_shards(model)
        self.weights = [torch.empty(t.shape, dtype=t.dtype, pin_memory=pin) for t in shards]
        self.staging = [torch.empty(t.shape, dtype=t.dtype, pin_memory=pin) for t in shards]
        self.synced = False  # True once the reference differs from the initial weights
        with torch.no_grad():
            for weight, shard in zip(self.weights, shards, strict=True):
                weight.copy_(shard)

    @contextmanager
    def in_model(self, model: nn.Module) -> Iterator[None]:
        """Swap the reference shards into ``model``'s parameters for the duration of the block."""
        shards = _local_shards(model)
        with torch.no_grad():
            for shard, weight, staging in zip(shards, self.weights, self.staging, strict=True):
                staging.copy_(shard)
                shard.copy_(weight)
        try:
            yield
        finally:
            with torch.no_grad():
                for shard, staging in zip(shards, self.staging, strict=True):
                    shard.copy_(staging)

    def mix_in(self, model: nn.Module, alpha: float) -> None:
        """``reference <- alpha * policy + (1 - alpha) * reference``, shard by shard."""
        with torch.no_grad():
            shards = _local_shards(model)
            for shard, weight, staging in zip(shards, self.weights, self.staging, strict=True):
                staging.copy_(shard)
                weight.mul_(1.0 - alpha).add_(staging, alpha=alpha)
        self.synced = True

    def load(self, model: nn.Module, path: str) -> None:
        """Load reference weights saved by ``FSDP2PolicyWorker.save_checkpoint``."""
        with self.in_model(model):
            _load_model_checkpoint(model.causal_lm, path)
            with torch.no_grad():
                for weight, shard in zip(self.weights, _local_shards(model), strict=True):
                    weight.copy_(shard)
        self.synced = True


def _check_gpu_options(cfg: PolicyConfig) -> None:
    if torch.cuda.is_available():
        return
    if cfg["precision"] == "bfloat16":
        raise ValueError("policy.precision: bfloat16 needs a GPU; use float32 on CPU")
    if cfg["fsdp"]["cpu_offload"]:
        raise ValueError(
            "policy.fsdp.cpu_offload: true needs a GPU (without one the weights are in host "
            "memory already); set it to false"
        )


def _init_distributed() -> torch.device:
    """Join (or, for a single process, create) the process group; return this worker's device."""
    if torch.cuda.is_available():
        # A Ray actor sees only its own GPU; torchrun shows every GPU of the node.
        local_rank = int(os.environ.get("LOCAL_RANK", "0")) if torch.cuda.device_count() > 1 else 0
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
        backend = "cpu:gloo,cuda:nccl"  # gloo too, for host-memory tensors (CPU offload)
    else:
        device, backend = torch.device("cpu"), "gloo"
    if dist.is_initialized():
        return device
    if "WORLD_SIZE" in os.environ:
        dist.init_process_group(
            backend, rank=int(os.environ["RANK"]), world_size=int(os.environ["WORLD_SIZE"])
        )
    else:
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
    return device


def _build_sharded_model(
    cfg: PolicyConfig, hf_config: PretrainedConfig, mesh: DeviceMesh, device: torch.device
) -> LogprobModel:
    """Build the model on the meta device, shard it with FSDP2, then fill it from rank 0.

    No worker but rank 0 ever holds the full weights: rank 0 loads (or randomly initialises,
    with ``cfg["seed"]``) a full copy in host memory and broadcasts it shard by shard, so the
    weights do not depend on the number of workers.
    """
    train_config = _without_dropout(hf_config)
    causal_lm = _meta_model(cfg, train_config)
    if cfg["fsdp"]["activation_checkpointing"]:
        causal_lm.activation_checkpointing_enable(
            activation_checkpointing_kwargs={"use_reentrant": False}
        )
    model = LogprobModel(causal_lm, cfg["logprob_chunk_size"])
    _apply_fsdp2(model, cfg, mesh)
    model.to_empty(device="cpu" if cfg["fsdp"]["cpu_offload"] else device)
    full = _initial_model_on_rank0(cfg, train_config)
    options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True)
    set_model_state_dict(causal_lm, full.state_dict() if full is not None else {}, options=options)
    _broadcast_buffers(causal_lm, full, device)
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.0
    return model


def _meta_model(cfg: PolicyConfig, train_config: PretrainedConfig) -> PreTrainedModel:
    """The model without storage, with the attention of ``policy.attn_implementation``."""
    name = cfg["attn_implementation"]
    try:
        with torch.device("meta"):
            # A copy: from_config sets the attention implementation on the config it gets.
            return AutoModelForCausalLM.from_config(
                copy.deepcopy(train_config),
                dtype=torch.float32,
                attn_implementation=VARLEN_ATTENTION if name == "varlen" else name,
            )
    except (ValueError, ImportError) as exc:
        raise ValueError(f"policy.attn_implementation={name!r}: {exc}") from exc


def _without_dropout(hf_config: PretrainedConfig) -> PretrainedConfig:
    # DPO practice: dropout would make the policy's and the reference's log-probs noisy.
    config = copy.deepcopy(hf_config)
    for key, value in config.to_dict().items():
        if "dropout" in key and isinstance(value, float):
            setattr(config, key, 0.0)
    return config


def _apply_fsdp2(model: LogprobModel, cfg: PolicyConfig, mesh: DeviceMesh) -> None:
    """``fully_shard`` every decoder layer, then the root; gradients are summed over workers."""
    layer_classes = set(model.causal_lm._no_split_modules or [])
    if not layer_classes:
        raise ValueError(f"{type(model.causal_lm).__name__} names no decoder layer class to shard")
    if cfg["precision"] == "bfloat16":
        # bf16 compute, fp32 master weights (the sharded parameters) and fp32 reductions.
        mp_policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    else:
        mp_policy = MixedPrecisionPolicy()
    offload_policy = CPUOffloadPolicy() if cfg["fsdp"]["cpu_offload"] else OffloadPolicy()
    kwargs = {"mesh": mesh, "mp_policy": mp_policy, "offload_policy": offload_policy}
    for module in model.causal_lm.modules():
        if type(module).__name__ in layer_classes:
            fully_shard(
                module, reshard_after_forward=cfg["fsdp"]["reshard_after_forward"], **kwargs
            )
    fully_shard(model, **kwargs)
    for module in model.modules():
        if isinstance(module, FSDPModule):
            # The loss is already divided by global counts: sum the gradients, do not average.
            # A plain SUM (not NCCL's PREMUL_SUM) is what gloo supports.
            module.set_gradient_divide_factor(1.0)
            module.set_force_sum_reduction_for_comms(True)


def _initial_model_on_rank0(
    cfg: PolicyConfig, train_config: PretrainedConfig
) -> PreTrainedModel | None:
    """The full initial model in host memory on rank 0 (None elsewhere); errors reach all ranks."""
    model, error = None, None
    if dist.get_rank() == 0:
        try:
            model = _load_initial_model(cfg, train_config)
        except (OSError, ValueError) as exc:
            error = str(exc)
    errors = [error]
    dist.broadcast_object_list(errors, src=0)
    if errors[0] is not None:
        raise ValueError(f"policy.model_name={cfg['model_name']!r}: {errors[0]}")
    return model


def _load_initial_model(cfg: PolicyConfig, train_config: PretrainedConfig) -> PreTrainedModel:
    if cfg["random_init"]:
        torch.manual_seed(cfg["seed"])
        return AutoModelForCausalLM.from_config(train_config, dtype=torch.float32)
    try:
        return AutoModelForCausalLM.from_pretrained(
            cfg["model_name"], config=train_config, dtype=torch.float32
        )
    except OSError as exc:
        raise ValueError(
            f"no weights could be loaded ({exc}); set policy.random_init: true to start from "
            "random weights seeded by policy.seed"
        ) from exc


def _broadcast_buffers(
    causal_lm: PreTrainedModel, full: PreTrainedModel | None, device: torch.device
) -> None:
    # Buffers left out of the state dict (e.g. rotary inv_freq) are still empty after
    # to_empty(): copy rank 0's values to every worker.
    full_buffers = dict(full.named_buffers()) if full is not None else {}
    for module_name, module in causal_lm.named_modules():
        for name, buffer in list(module.named_buffers(recurse=False)):
            fqn = f"{module_name}.{name}" if module_name else name
            value = torch.empty_like(buffer, device=device)
            if dist.get_rank() == 0:
                value.copy_(full_buffers[fqn])
            dist.broadcast(value, src=0)
            setattr(module, name, value)


def _load_model_checkpoint(causal_lm: PreTrainedModel, path: str) -> None:
    state = get_model_state_dict(causal_lm)
    load_dcp({"model": state}, path)
    set_model_state_dict(causal_lm, state)


def _local_shards(model: nn.Module) -> list[torch.Tensor]:
    """This worker's shard of every parameter (views: writing them writes the parameters)."""
    _reshard_all(model)  # so that the next forward gathers whatever is written here
    return [p.to_local() if isinstance(p, DTensor) else p for p in model.parameters()]


def _reshard_all(model: nn.Module) -> None:
    # A no-grad forward leaves the root's gathered weights in place (FSDP2 keeps the root
    # unsharded after forward); free them so that in-place writes to the shards are seen.
    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.reshard()


def _dummy_micro_batch(device: torch.device) -> BatchedDataDict:
    return BatchedDataDict(
        {
            "input_ids": torch.zeros(1, 2, dtype=torch.long, device=device),
            "input_lengths": torch.full((1,), 2, dtype=torch.long, device=device),
        }
    )


def _all_reduce_sum(values: dict[str, torch.Tensor], device: torch.device) -> dict[str, float]:
    keys = sorted(values)  # the same order on every worker
    if not keys:
        return {}
    stacked = torch.stack([values[key] for key in keys]).to(device)
    dist.all_reduce(stacked)
    return {key: float(value) for key, value in zip(keys, stacked.tolist(), strict=True)}
