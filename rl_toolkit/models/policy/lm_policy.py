"""Policy: the driver side of a group of FSDP2 policy workers.

It holds only what needs the driver: the global batch size check, sharding a batch over the
workers (groups kept whole) and gathering the results in row order, and the reference
log-prob cache. Every other call goes to the workers directly, by method:
``policy.workers.all(PolicyWorker.save_checkpoint, weights_path=...)``.
"""

from transformers.tokenization_utils_base import PreTrainedTokenizerBase

from rl_toolkit.config_schema import MicroBatches, PolicyConfig
from rl_toolkit.distributed.batched_data_dict import BatchedDataDict
from rl_toolkit.distributed.virtual_cluster import RayVirtualCluster
from rl_toolkit.distributed.worker_groups import RayWorkerGroup
from rl_toolkit.models.generation.interfaces import GenerationInterface
from rl_toolkit.models.generation.rollout import new_token_budgets
from rl_toolkit.models.policy.reference_cache import ReferenceLogprobCache
from rl_toolkit.models.policy.worker import LossFn, PolicyWorker
from rl_toolkit.utils.config import ConfigError


class Policy(GenerationInterface):
    """A language-model policy trained with FSDP2 on the workers of ``cluster``.

    It is also generation backend ``hf``: its workers sample responses themselves
    (``generate``), so there are no weights to move to a generator.

    Args:
        cluster: one worker per bundle.
        config: the ``policy`` section of the config.
        tokenizer: the tokenizer (saved with checkpoints and HF exports).
        init_optimizer: build optimizer and scheduler (False for inference only).
        init_reference_model: keep the initial weights as the reference policy.
        reference_cache: reuse each pair's reference log-probs from here (the algorithm
            decides; None computes them every time).
        weights_path: resume the weights (and a synced reference) from this checkpoint.
        optimizer_path: resume optimizer and scheduler state from this checkpoint.
        worker_timeout_s: how long to wait for any call on the workers; None: forever
            (``cluster.worker_timeout_s``).
        worker_env_vars: driver environment variables the workers get besides the built-in
            allow-list (``cluster.worker_env_vars``).

    Attributes:
        workers: the worker group, for calls that need no driver logic.
    """

    def __init__(
        self,
        cluster: RayVirtualCluster,
        config: PolicyConfig,
        tokenizer: PreTrainedTokenizerBase,
        *,
        init_optimizer: bool,
        init_reference_model: bool,
        reference_cache: ReferenceLogprobCache | None = None,
        weights_path: str | None = None,
        optimizer_path: str | None = None,
        worker_timeout_s: float | None,
        worker_env_vars: list[str],
    ) -> None:
        self.global_batch_size = config["train_global_batch_size"]
        # policy.generation is optional: DPO and SFT configs leave it out.
        self.generation = config.get("generation")
        self.max_total_sequence_length = config["max_total_sequence_length"]
        self.pad_token_id = tokenizer.pad_token_id
        self.reference_cache = reference_cache
        worker_kwargs = {
            "config": config,
            "tokenizer": tokenizer,
            "init_optimizer": init_optimizer,
            "init_reference_model": init_reference_model,
            "weights_path": weights_path,
            "optimizer_path": optimizer_path,
        }
        self.workers: RayWorkerGroup[PolicyWorker] = RayWorkerGroup(
            cluster,
            PolicyWorker,
            name_prefix="policy",
            worker_kwargs=worker_kwargs,
            timeout_s=worker_timeout_s,
            env_vars=worker_env_vars,
        )

    def train(
        self, data: BatchedDataDict, loss_fn: LossFn, micro_batches: MicroBatches
    ) -> dict[str, float]:
        """One optimizer step on one global batch; see ``PolicyWorker.train``.

        Raises:
            ValueError: ``data`` is not one global batch (``policy.train_global_batch_size``).
        """
        if data.size != self.global_batch_size:
            raise ValueError(
                f"Policy.train: the batch has {data.size} rows but the global batch size is "
                f"{self.global_batch_size} rows (sequences, i.e. twice the number of pairs)"
            )
        # The workers all-reduce their metrics: every worker returns the global-batch values.
        return self.workers.sharded(PolicyWorker.train, data, loss_fn, micro_batches)[0]

    def evaluate(
        self, data: BatchedDataDict, loss_fn: LossFn, micro_batches: MicroBatches
    ) -> dict[str, float]:
        """The loss and metrics of a batch (any size that splits into whole groups evenly)."""
        return self.workers.sharded(PolicyWorker.evaluate, data, loss_fn, micro_batches)[0]

    def logprobs(self, data: BatchedDataDict, micro_batches: MicroBatches) -> BatchedDataDict:
        """``{"logprobs": [N, T]}`` with the current weights, rows in the order of ``data``."""
        shards = self.workers.sharded(
            PolicyWorker.logprobs, data, micro_batches, response_only=False
        )
        return BatchedDataDict.from_batches(shards)

    def reference_logprobs(
        self, data: BatchedDataDict, micro_batches: MicroBatches
    ) -> BatchedDataDict:
        """``{"reference_logprobs": [N, T]}`` of a batch's response tokens (``token_mask``).

        With a ``reference_cache``, each pair's values are computed once and reused until the
        reference changes (``update_reference_model``).
        """

        def compute(batch: BatchedDataDict) -> BatchedDataDict:
            shards = self.workers.sharded(
                PolicyWorker.reference_logprobs, batch, micro_batches, response_only=True
            )
            return BatchedDataDict.from_batches(shards)

        if self.reference_cache is None:
            return compute(data)
        logprobs = self.reference_cache.get_or_compute(data, compute)
        return BatchedDataDict({"reference_logprobs": logprobs}, group_size=data.group_size)

    # ----- generation (backend hf) -----

    def generate(
        self, data: BatchedDataDict, *, step: int, greedy: bool = False
    ) -> BatchedDataDict:
        """One response per prompt row, sampled by the workers; see ``PolicyWorker.generate``.

        The rows are sharded over the workers (groups whole; a worker may get none) and come
        back in the order of ``data``, right-padded to the longest row.

        Raises:
            ConfigError: the config has no ``policy.generation`` section.
        """
        if self.generation is None:
            raise ConfigError(
                "policy.generation is not set: generating needs its sampling settings "
                "(docs/configuration.md, policy.generation)"
            )
        # Checked here too, so that a prompt too long fails before any worker starts the call.
        new_token_budgets(
            data,
            max_new_tokens=self.generation["max_new_tokens"],
            max_total_sequence_length=self.max_total_sequence_length,
        )
        shards = self.workers.sharded(PolicyWorker.generate, data, step=step, greedy=greedy)
        assert self.pad_token_id is not None, "PolicyWorker.generate pads with it"
        return BatchedDataDict.from_batches(shards, pad_value_dict={"input_ids": self.pad_token_id})

    def prepare_for_generation(self, tags: list[str] | None = None) -> None:
        """Nothing to do: each ``generate`` gathers the weights it needs and frees them."""

    def finish_generation(self) -> None:
        """Nothing to do: ``generate`` holds nothing afterwards (no KV cache, sharded weights)."""

    def update_weights(self, source: "Policy") -> dict[str, float]:
        """Nothing to move: the generator is the policy itself."""
        assert source is self, "backend hf generates with the policy's own weights"
        return {}

    def update_reference_model(self, mixup_alpha: float) -> None:
        """TR-DPO: ``reference <- mixup_alpha * policy + (1 - mixup_alpha) * reference``."""
        self.workers.all(PolicyWorker.update_reference_model, mixup_alpha)
        if self.reference_cache is not None:
            self.reference_cache.clear()  # every cached value belongs to the old reference

    def shutdown(self) -> None:
        """Leave the process group on every worker, then stop the workers.

        After a failed, timed-out or interrupted call only the workers are stopped: a survivor
        may be stuck in a collective with a dead peer and would never answer.
        """
        try:
            if not self.workers.broken:
                self.workers.all(PolicyWorker.shutdown)
        finally:
            self.workers.shutdown()
