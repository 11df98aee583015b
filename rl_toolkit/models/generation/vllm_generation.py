"""VllmGeneration: the driver side of backend ``vllm``, a group of ``VllmWorker``s.

It holds only what needs the driver: which worker gets which prompts (one engine per
``tensor_parallel_size`` workers, every rank of an engine the same prompts), the order of a
refit (colocated engines: wake the weights, load every bucket, wake the KV cache) and which
transport carries the buckets (``weight_sync``). Everything else is a worker method.
"""

from typing import Literal

from transformers.tokenization_utils_base import PreTrainedTokenizerBase

from rl_toolkit.config_schema import PolicyConfig
from rl_toolkit.distributed.batched_data_dict import BatchedDataDict
from rl_toolkit.distributed.virtual_cluster import RayVirtualCluster
from rl_toolkit.distributed.worker_groups import RayWorkerGroup
from rl_toolkit.models.generation.interfaces import GenerationInterface
from rl_toolkit.models.generation.rollout import new_token_budgets
from rl_toolkit.models.generation.vllm_worker import VllmWorker, check_vllm_version
from rl_toolkit.models.policy.lm_policy import Policy
from rl_toolkit.models.policy.worker import PolicyWorker
from rl_toolkit.utils.config import ConfigError

# How a refit's buckets travel (weight_sync): "object" on CPU (fake engines, tests), "cuda_ipc"
# to engines colocated with the policy, "nccl" to an engine on GPUs of its own.
RefitTransport = Literal["object", "cuda_ipc", "nccl"]


class VllmGeneration(GenerationInterface):
    """vLLM engines sampling the policy's rollouts (``policy.generation.backend: vllm``).

    Built by ``start`` on a Ray cluster; the constructor takes a worker group as it is, so that
    tests can hand it workers in this process.

    Args:
        workers: the ``VllmWorker``s, ``tensor_parallel_size`` consecutive ranks per engine.
        config: the ``policy`` section.
        pad_token_id: pads the rollouts.
        transport: how refit buckets travel.
        cluster: a cluster of the engines' own (not colocated), shut down with them.
    """

    def __init__(
        self,
        workers: RayWorkerGroup[VllmWorker],
        config: PolicyConfig,
        *,
        pad_token_id: int,
        transport: RefitTransport,
        cluster: RayVirtualCluster | None = None,
    ) -> None:
        self.workers = workers
        self.generation = config["generation"]
        vllm = self.generation["vllm"]
        self.tensor_parallel_size = vllm["tensor_parallel_size"]
        self.bucket_bytes = vllm["refit_bucket_mib"] * 2**20
        self.max_total_sequence_length = config["max_total_sequence_length"]
        self.pad_token_id = pad_token_id
        self.transport = transport
        self.cluster = cluster
        self.weights_loaded = False  # the engines start with dummy weights
        self.refit_group_ready = False

    @classmethod
    def start(
        cls,
        policy_cluster: RayVirtualCluster,
        config: PolicyConfig,
        tokenizer: PreTrainedTokenizerBase,
        *,
        worker_timeout_s: float | None,
        worker_env_vars: list[str],
    ) -> "VllmGeneration":
        """Start the engines: on the policy's bundles (colocated; the cluster must allow two
        worker groups a bundle) or on a cluster of ``tensor_parallel_size`` GPUs of their own.

        Raises:
            ConfigError: no GPUs, or vLLM missing or too old (before any worker starts).
        """
        if not policy_cluster.use_gpus:
            raise ConfigError(
                "policy.generation.backend=vllm needs GPUs, and this Ray cluster has none: use "
                "policy.generation.backend=hf on a CPU"
            )
        check_vllm_version()
        vllm = config["generation"]["vllm"]
        own_cluster = None
        if vllm["colocated"]:
            assert policy_cluster.max_colocated_worker_groups >= 2, "room for the engines"
        else:
            tp = vllm["tensor_parallel_size"]
            own_cluster = RayVirtualCluster(
                [tp], use_gpus=True, num_gpus_per_node=tp, name="vllm_generation"
            )
        workers: RayWorkerGroup[VllmWorker] = RayWorkerGroup(
            own_cluster or policy_cluster,
            VllmWorker,
            name_prefix="vllm",
            worker_kwargs={"config": config, "tokenizer": tokenizer},
            timeout_s=worker_timeout_s,
            env_vars=worker_env_vars,
        )
        assert tokenizer.pad_token_id is not None
        return cls(
            workers,
            config,
            pad_token_id=tokenizer.pad_token_id,
            transport="cuda_ipc" if vllm["colocated"] else "nccl",
            cluster=own_cluster,
        )

    def generate(
        self, data: BatchedDataDict, *, step: int, greedy: bool = False
    ) -> BatchedDataDict:
        """One response per prompt row; see ``GenerationInterface.generate``. The rows are
        split over the engines (whole groups), and come back in the order of ``data``."""
        assert self.weights_loaded, "update_weights(policy) first: the engines hold dummy weights"
        new_token_budgets(  # a prompt too long fails here, before any worker is called
            data,
            max_new_tokens=self.generation["max_new_tokens"],
            max_total_sequence_length=self.max_total_sequence_length,
        )
        self.prepare_for_generation()
        num_ranks, tp = self.workers.world_size, self.tensor_parallel_size
        shards = data.shard_by_batch_size(num_ranks // tp)
        rollouts = self.workers.per_rank(
            VllmWorker.generate,
            [shards[rank // tp] for rank in range(num_ranks)],
            step=step,
            greedy=greedy,
        )
        return BatchedDataDict.from_batches(
            rollouts[::tp], pad_value_dict={"input_ids": self.pad_token_id}
        )

    def prepare_for_generation(self, tags: list[str] | None = None) -> None:
        """Wake colocated engines (``tags``: "weights", "kv_cache"; default both)."""
        self.workers.all(VllmWorker.prepare_for_generation, tags)

    def finish_generation(self) -> None:
        """Put colocated engines to sleep, so that the policy has the GPUs to train."""
        self.workers.all(VllmWorker.finish_generation)

    def update_weights(self, source: Policy) -> dict[str, float]:
        """Load the policy's current weights into every engine, bucket by bucket.

        Colocated engines wake their weights first and their KV cache only after the last
        bucket, once the policy has freed its refit buffers (vLLM's staged wake-up); before
        that the policy's optimizer state goes to host memory (its next step brings it back).

        Returns:
            ``refit_gib`` (the bytes sent to each engine worker, in GiB) and ``refit_buckets``.
        """
        if self.transport == "nccl" and not self.refit_group_ready:
            self._init_refit_group(source)
        if self.transport == "cuda_ipc":
            source.workers.all(PolicyWorker.offload_optimizer_state)
        layouts = source.workers.all(PolicyWorker.refit_layouts, self.bucket_bytes)[0]
        self.prepare_for_generation(["weights"])
        for layout in layouts:
            if self.transport == "object":
                buffer = source.workers.all(PolicyWorker.host_refit_bucket, layout)[0]
                assert buffer is not None, "policy rank 0 returns the bucket"
                self.workers.all(VllmWorker.load_refit_bucket, layout, buffer)
            elif self.transport == "cuda_ipc":
                handles = source.workers.all(PolicyWorker.share_refit_bucket, layout)
                self.workers.per_rank(VllmWorker.load_shared_refit_bucket, handles, layout)
            else:
                sending = source.workers.all_async(PolicyWorker.broadcast_refit_bucket, layout)
                receiving = self.workers.all_async(VllmWorker.receive_refit_bucket, layout)
                self.workers.get_results(receiving)
                source.workers.get_results(sending)
        self.workers.all(VllmWorker.finish_weight_update)
        source.workers.all(PolicyWorker.finish_refit)
        self.prepare_for_generation(["kv_cache"])
        self.weights_loaded = True
        num_bytes = sum(layout.nbytes for layout in layouts)
        return {"refit_gib": num_bytes / 2**30, "refit_buckets": float(len(layouts))}

    def _init_refit_group(self, source: Policy) -> None:
        """The NCCL group of policy rank 0 and the engine's workers, hosted by policy rank 0."""
        host, port = source.workers.free_port(0)
        world_size = 1 + self.workers.world_size
        joining = source.workers.all_async(PolicyWorker.init_refit_group, host, port, world_size)
        joining_engine = self.workers.all_async(VllmWorker.init_refit_group, host, port, world_size)
        self.workers.get_results(joining_engine)
        source.workers.get_results(joining)
        self.refit_group_ready = True

    def shutdown(self) -> None:
        """Free the engines, stop their workers and release a cluster of their own."""
        try:
            if not self.workers.broken:
                self.workers.all(VllmWorker.shutdown)
        finally:
            self.workers.shutdown()
            if self.cluster is not None:
                self.cluster.shutdown()
