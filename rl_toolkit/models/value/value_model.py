"""ValueModel: the driver side of a group of value workers (the PPO critic; the reward model
that examples/run_rm.py trains).

As the ``Policy`` facade: the global batch size check, sharding a batch over the workers (groups
kept whole) and gathering the results in row order; every other call goes to the workers
directly, by method: ``critic.workers.all(ValueWorker.save_checkpoint, weights_path=...)``.
"""

from transformers.tokenization_utils_base import PreTrainedTokenizerBase

from rl_toolkit.config_schema import CriticConfig, MicroBatches
from rl_toolkit.distributed.batched_data_dict import BatchedDataDict
from rl_toolkit.distributed.virtual_cluster import RayVirtualCluster
from rl_toolkit.distributed.worker_groups import RayWorkerGroup
from rl_toolkit.models.fsdp.loops import LossFn
from rl_toolkit.models.value.worker import ValueWorker


class ValueModel:
    """A scalar-head model trained with FSDP2 on the workers of ``cluster``.

    Args:
        cluster: one worker per bundle (shared with the policy's workers when the cluster was
            built for several worker groups).
        config: the model's section.
        tokenizer: the tokenizer (saved with checkpoints and exports).
        section: the section's name ("critic", or "policy" in a reward-model config); also the
            workers' name prefix.
        init_optimizer: build optimizer and scheduler (False for inference only).
        weights_path: resume the weights from this checkpoint.
        optimizer_path: resume optimizer and scheduler state from this checkpoint.
        worker_timeout_s: how long to wait for any call on the workers; None: forever.
        worker_env_vars: driver environment variables the workers get besides the built-in
            allow-list (``cluster.worker_env_vars``).

    Attributes:
        workers: the worker group, for calls that need no driver logic.
    """

    def __init__(
        self,
        cluster: RayVirtualCluster,
        config: CriticConfig,
        tokenizer: PreTrainedTokenizerBase,
        *,
        section: str,
        init_optimizer: bool,
        weights_path: str | None = None,
        optimizer_path: str | None = None,
        worker_timeout_s: float | None,
        worker_env_vars: list[str],
    ) -> None:
        self.global_batch_size = config["train_global_batch_size"]
        self.section = section
        worker_kwargs = {
            "config": config,
            "tokenizer": tokenizer,
            "section": section,
            "init_optimizer": init_optimizer,
            "weights_path": weights_path,
            "optimizer_path": optimizer_path,
        }
        self.workers: RayWorkerGroup[ValueWorker] = RayWorkerGroup(
            cluster,
            ValueWorker,
            name_prefix=section,
            worker_kwargs=worker_kwargs,
            timeout_s=worker_timeout_s,
            env_vars=worker_env_vars,
        )

    def get_values(self, data: BatchedDataDict, micro_batches: MicroBatches) -> BatchedDataDict:
        """``{"values": [N, T]}`` on the response tokens, rows in the order of ``data``; see
        ``ValueWorker.get_values``."""
        shards = self.workers.sharded(ValueWorker.get_values, data, micro_batches)
        return BatchedDataDict.from_batches(shards)

    def get_scores(self, data: BatchedDataDict, micro_batches: MicroBatches) -> BatchedDataDict:
        """``{"scores": [N]}``, one per sequence; see ``ValueWorker.get_scores``."""
        shards = self.workers.sharded(ValueWorker.get_scores, data, micro_batches)
        return BatchedDataDict.from_batches(shards)

    def train(
        self, data: BatchedDataDict, loss_fn: LossFn, micro_batches: MicroBatches
    ) -> dict[str, float]:
        """One optimizer step on one global batch; see ``ValueWorker.train``.

        Raises:
            ValueError: ``data`` is not one global batch (``train_global_batch_size`` rows).
        """
        if data.size != self.global_batch_size:
            raise ValueError(
                f"ValueModel.train: the batch has {data.size} rows but "
                f"{self.section}.train_global_batch_size is {self.global_batch_size}"
            )
        # The workers all-reduce their metrics: every worker returns the global-batch values.
        return self.workers.sharded(ValueWorker.train, data, loss_fn, micro_batches)[0]

    def evaluate(
        self, data: BatchedDataDict, loss_fn: LossFn, micro_batches: MicroBatches
    ) -> dict[str, float]:
        """The loss and metrics of a batch (any size that splits into whole groups evenly)."""
        return self.workers.sharded(ValueWorker.evaluate, data, loss_fn, micro_batches)[0]

    def shutdown(self) -> None:
        """Leave the process group on every worker, then stop the workers (only the latter
        after a failed call, as ``Policy.shutdown``)."""
        try:
            if not self.workers.broken:
                self.workers.all(ValueWorker.shutdown)
        finally:
            self.workers.shutdown()
