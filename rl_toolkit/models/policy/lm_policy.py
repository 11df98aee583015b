"""Policy: the driver-side facade over a group of FSDP2 policy workers.

The recipe talks to a ``Policy``; the ``Policy`` shards each batch over its workers (pairs kept
whole), calls the same method on all of them and gathers the results in row order. All Ray use
is in ``RayWorkerGroup``; the workers are ``FSDP2PolicyWorker`` instances, one per bundle.
"""

from transformers.tokenization_utils_base import PreTrainedTokenizerBase

from rl_toolkit.distributed.batched_data_dict import BatchedDataDict
from rl_toolkit.distributed.virtual_cluster import RayVirtualCluster
from rl_toolkit.distributed.worker_groups import RayWorkerGroup
from rl_toolkit.models.policy import PolicyConfig
from rl_toolkit.models.policy.fsdp2_worker import FSDP2PolicyWorker, LossFn
from rl_toolkit.models.policy.reference_cache import ReferenceLogprobCache


class Policy:
    """A language-model policy trained with FSDP2 on the workers of ``cluster``.

    Args:
        cluster: one worker per bundle.
        config: the ``policy`` section of the config.
        tokenizer: the tokenizer (saved with checkpoints and HF exports).
        init_optimizer: build optimizer and scheduler (False for inference only).
        init_reference_model: keep the initial weights as the reference policy.
        weights_path: resume the weights (and a synced reference) from this checkpoint.
        optimizer_path: resume optimizer and scheduler state from this checkpoint.
        worker_timeout_s: how long to wait for any call on the workers; None: forever
            (``cluster.worker_timeout_s``).
        worker_env_vars: driver environment variables the workers get besides the built-in
            allow-list (``cluster.worker_env_vars``).
    """

    def __init__(
        self,
        cluster: RayVirtualCluster,
        config: PolicyConfig,
        tokenizer: PreTrainedTokenizerBase,
        init_optimizer: bool = True,
        init_reference_model: bool = True,
        weights_path: str | None = None,
        optimizer_path: str | None = None,
        *,
        worker_timeout_s: float | None,
        worker_env_vars: list[str],
    ) -> None:
        self.cfg = config
        worker_kwargs = {
            "config": config,
            "tokenizer": tokenizer,
            "init_optimizer": init_optimizer,
            "init_reference_model": init_reference_model,
            "weights_path": weights_path,
            "optimizer_path": optimizer_path,
        }
        self.worker_group = RayWorkerGroup(
            cluster,
            FSDP2PolicyWorker,
            name_prefix="policy",
            worker_kwargs=worker_kwargs,
            timeout_s=worker_timeout_s,
            env_vars=worker_env_vars,
        )
        self.reference_cache = ReferenceLogprobCache()

    def get_logprobs(self, data: BatchedDataDict) -> BatchedDataDict:
        """Next-token log-probs with the current weights.

        Args:
            data: ``input_ids [N, T]`` and ``input_lengths [N]``, any N (whole groups).

        Returns:
            ``{"logprobs": [N, T]}`` float32, rows in the order of ``data``.
        """
        shards = self.worker_group.run_all_workers_sharded_data("get_logprobs", data=data)
        return BatchedDataDict.from_batches(shards)

    def get_reference_policy_logprobs(self, data: BatchedDataDict) -> BatchedDataDict:
        """Like ``get_logprobs`` with the reference weights: ``{"reference_logprobs": [N, T]}``.

        A preference batch (with ``pair_ids`` and ``token_mask``) is scored on its response
        tokens only, and each pair's values are computed once and then reused from a cache
        on the driver until the reference changes (``update_reference_model``).
        """
        if "pair_ids" in data and "token_mask" in data:
            logprobs = self.reference_cache.get_or_compute(data, self._reference_logprobs)
            return BatchedDataDict({"reference_logprobs": logprobs}, group_size=data.group_size)
        return self._reference_logprobs(data)

    def _reference_logprobs(self, data: BatchedDataDict) -> BatchedDataDict:
        shards = self.worker_group.run_all_workers_sharded_data(
            "get_reference_policy_logprobs", data=data
        )
        return BatchedDataDict.from_batches(shards)

    def train(
        self,
        data: BatchedDataDict,
        loss_fn: LossFn,
        eval_mode: bool = False,
        gbs: int | None = None,
        mbs: int | None = None,
    ) -> dict[str, float]:
        """One optimizer step on one global batch (in eval mode: loss and metrics only).

        Args:
            data: the global batch, ``gbs`` rows (docs/design.md, "The preference batch").
            loss_fn: see docs/design.md, "The loss function".
            eval_mode: no gradients, no update.
            gbs: rows in the global batch; default ``policy.train_global_batch_size``.
            mbs: rows per micro-batch on a worker; default ``policy.train_micro_batch_size``.

        Returns:
            Metrics of the whole global batch; see ``FSDP2PolicyWorker.train``.
        """
        gbs = self.cfg["train_global_batch_size"] if gbs is None else gbs
        if data.size != gbs:
            raise ValueError(
                f"Policy.train: the batch has {data.size} rows but the global batch size is "
                f"{gbs} rows (sequences, i.e. twice the number of pairs)"
            )
        results = self.worker_group.run_all_workers_sharded_data(
            "train",
            data=data,
            batch_size=gbs,
            common_kwargs={"loss_fn": loss_fn, "eval_mode": eval_mode, "gbs": gbs, "mbs": mbs},
        )
        # The workers all-reduce their metrics: every worker returns the global-batch values.
        return results[0]

    def update_reference_model(self, mixup_alpha: float) -> None:
        """TR-DPO: ``reference <- mixup_alpha * policy + (1 - mixup_alpha) * reference``."""
        self.worker_group.run_all_workers_single_data(
            "update_reference_model", mixup_alpha=mixup_alpha
        )
        self.reference_cache.clear()  # every cached value belongs to the old reference

    def prepare_for_training(self) -> None:
        """Bring the optimizer state back to the accelerators."""
        self.worker_group.run_all_workers_single_data("prepare_for_training")

    def prepare_for_lp_inference(self) -> None:
        """Move the optimizer state to host memory before large log-prob batches."""
        self.worker_group.run_all_workers_single_data("prepare_for_lp_inference")

    def save_checkpoint(
        self,
        weights_path: str,
        optimizer_path: str | None = None,
        tokenizer_path: str | None = None,
    ) -> None:
        """Sharded checkpoint, loadable by any number of workers (see the worker's method)."""
        self.worker_group.run_all_workers_single_data(
            "save_checkpoint",
            weights_path=weights_path,
            optimizer_path=optimizer_path,
            tokenizer_path=tokenizer_path,
        )

    def export_hf(self, path: str) -> None:
        """Write a directory that ``AutoModelForCausalLM.from_pretrained`` loads."""
        self.worker_group.run_all_workers_single_data("export_hf", path=path)

    def shutdown(self) -> None:
        """Leave the process group on every worker, then stop the workers.

        After a failed, timed-out or interrupted call only the workers are stopped: a survivor
        may be stuck in a collective with a dead peer and would never answer.
        """
        try:
            if not self.worker_group.broken:
                self.worker_group.run_all_workers_single_data("shutdown")
        finally:
            self.worker_group.shutdown()
