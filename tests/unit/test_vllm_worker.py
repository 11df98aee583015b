"""Backend vllm without vLLM: VllmWorker and VllmGeneration against a fake engine in this process
(requests, outputs -> rollout keys, sleep/wake order, a refit from a real policy worker), its
config rules and the version check."""

import importlib.metadata
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch

from rl_toolkit.algorithms.grpo import MasterConfig, check_config
from rl_toolkit.config_schema import (
    PolicyConfig,
    check_grpo_config,
    resolve_local_paths,
)
from rl_toolkit.distributed.batched_data_dict import BatchedDataDict
from rl_toolkit.models.generation import vllm_worker
from rl_toolkit.models.generation.hf_sampling import decoding_attention, sample_responses
from rl_toolkit.models.generation.sampling import row_seed, sampling_uniforms
from rl_toolkit.models.generation.vllm_generation import VllmGeneration
from rl_toolkit.models.generation.vllm_worker import (
    MIN_VLLM_VERSION,
    VllmEngine,
    VllmWorker,
    check_vllm_version,
    responses_from_outputs,
)
from rl_toolkit.models.generation.weight_sync import refit_state_dict
from rl_toolkit.utils.config import ConfigError, load_config
from tests.unit.policy_testing import PAD_ID, make_config, make_tokenizer, new_worker
from tests.unit.test_policy_generation import prompt_batch

REPO = Path(__file__).resolve().parents[2]
EOS_ID = 1  # make_tokenizer's
ROLLOUT_KEYS = ("input_ids", "input_lengths", "token_mask", "generation_logprobs", "truncated")
SAMPLING = {"temperature": 0.8, "top_k": 30, "top_p": 0.9}


def vllm_policy_config(model_dir: Path, *, colocated: bool = True, **sampling: Any) -> PolicyConfig:
    generation = {
        "backend": "vllm", "temperature": 1.0, "top_p": 1.0, "top_k": 0, "max_new_tokens": 6,
        "stop_token_ids": [],
        "vllm": {"tensor_parallel_size": 1, "gpu_memory_utilization": 0.5,
                 "enforce_eager": True, "colocated": colocated, "refit_bucket_mib": 1,
                 "refit_check_threshold": 1.05},
    } | sampling  # fmt: skip
    return make_config(model_dir, generation=generation)


class FakeLLM:
    """vllm.LLM as the worker uses it. With a model, it answers each request as backend hf
    samples one row (hf_sampling.sample_responses with the request's budget, stop tokens,
    temperature, top-k, top-p, and uniforms from the request's seed), in vLLM's output shape:
    so the rollout equals backend hf's exactly when the requests carry what hf uses. Records
    every call; loaded weights land in `loaded`."""

    def __init__(self, hf_model: torch.nn.Module | None, engine_kwargs: dict[str, Any]) -> None:
        self.model, self.engine_kwargs = hf_model, engine_kwargs
        self.calls: list[str] = []
        self.requests: list[tuple[list[int], Any]] = []
        self.loaded: dict[str, torch.Tensor] = {}
        loader = SimpleNamespace(load_weights=self._load_weights)
        self.vllm_worker = SimpleNamespace(model_runner=SimpleNamespace(get_model=lambda: loader))

    def generate(self, prompts: list[dict], sampling_params: list, use_tqdm: bool) -> list:
        self.calls.append("generate")
        requests = [
            (p["prompt_token_ids"], s) for p, s in zip(prompts, sampling_params, strict=True)
        ]
        self.requests += requests
        return [self._complete(ids, params) for ids, params in requests]

    def _complete(self, prompt: list[int], params: Any) -> SimpleNamespace:
        assert self.model is not None, "this fake has no model to sample with"
        greedy = params.temperature == 0.0
        sampling = {"temperature": 1.0 if greedy else params.temperature, "top_p": params.top_p,
                    "top_k": max(params.top_k, 0)}  # fmt: skip
        uniforms = None if greedy else sampling_uniforms([params.seed], params.max_tokens)
        with torch.no_grad(), decoding_attention(self.model):
            responses = sample_responses(
                self.model, torch.tensor([prompt]), torch.tensor([len(prompt)]),
                budgets=torch.tensor([params.max_tokens]), uniforms=uniforms,
                stop_token_ids=torch.tensor(params.stop_token_ids), sampling=sampling,
                pad_token_id=PAD_ID,
            )  # fmt: skip
        num_tokens = int(responses.lengths[0])
        tokens = responses.tokens[0, :num_tokens].tolist()
        values = responses.logprobs[0, :num_tokens].tolist()
        logprobs = [
            {token: SimpleNamespace(logprob=v)} for token, v in zip(tokens, values, strict=True)
        ]
        finish_reason = "length" if responses.truncated[0] else "stop"
        completion = SimpleNamespace(
            token_ids=tokens, logprobs=logprobs, finish_reason=finish_reason
        )
        return SimpleNamespace(outputs=[completion])

    def _load_weights(self, weights: list[tuple[str, torch.Tensor]]) -> None:
        for name, tensor in weights:
            self.loaded[name] = tensor.clone()

    def sleep(self, level: int) -> None:
        self.calls.append(f"sleep({level})")

    def wake_up(self, tags: list[str] | None = None) -> None:
        self.calls.append(f"wake_up({tags})")

    def collective_rpc(self, method: Any, args: tuple = ()) -> list:
        self.calls.append("load")
        return [method(self.vllm_worker, *args)]

    def reset_prefix_cache(self) -> None:
        self.calls.append("reset_prefix_cache")


def fake_factory(model: torch.nn.Module | None = None):
    def build(**engine_kwargs: Any) -> VllmEngine:
        return VllmEngine(FakeLLM(model, engine_kwargs), SimpleNamespace)

    return build


def fake_worker(config: PolicyConfig, model: torch.nn.Module | None = None) -> VllmWorker:
    return VllmWorker(config=config, tokenizer=make_tokenizer(), engine_factory=fake_factory(model))


# ---------------------------------------------------------------------------------------------
# The engine and its requests


def test_the_engine_is_built_for_refit_token_ids_and_raw_log_probs(tiny, monkeypatch) -> None:
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    llm = fake_worker(vllm_policy_config(tiny[0])).engine.llm
    assert llm.engine_kwargs == {
        "model": str(tiny[0]), "load_format": "dummy", "dtype": "float32", "seed": 7,
        "max_model_len": 32, "tensor_parallel_size": 1, "gpu_memory_utilization": 0.5,
        "enforce_eager": True, "enable_sleep_mode": True, "skip_tokenizer_init": True,
        "logprobs_mode": "raw_logprobs",
    }  # fmt: skip
    monkeypatch.setenv("WORLD_SIZE", "2")  # one of several engines (or tensor-parallel ranks)
    llm = fake_worker(vllm_policy_config(tiny[0], colocated=False)).engine.llm
    assert llm.engine_kwargs["distributed_executor_backend"] == "external_launcher"
    assert llm.engine_kwargs["enable_sleep_mode"] is False


def test_requests_carry_prompts_budgets_seeds_stop_tokens_and_greedy(tiny) -> None:
    config = vllm_policy_config(tiny[0], stop_token_ids=[5], top_k=0, temperature=0.7, top_p=0.8)
    worker = fake_worker(config, tiny[1])
    prompts = prompt_batch([3, 28], group_size=2, first_prompt=10)  # 28 + 6 > 32: budget 4
    worker.generate(prompts, step=4, greedy=False)
    requests = worker.engine.llm.requests
    for row, (token_ids, params) in enumerate(requests):
        length = int(prompts["input_lengths"][row])
        assert token_ids == prompts["input_ids"][row, :length].tolist()
        assert params.max_tokens == (6 if length == 3 else 4)
        assert params.seed == row_seed(7, 4, 10 + row // 2, row % 2)
        assert (params.temperature, params.top_p, params.top_k) == (0.7, 0.8, -1)  # -1: off
        assert params.stop_token_ids == [EOS_ID, 5] and params.ignore_eos is True
        assert (params.n, params.logprobs, params.detokenize) == (1, 0, False)
    worker.engine.llm.requests.clear()
    worker.generate(prompts, step=4, greedy=True)
    for _, params in worker.engine.llm.requests:
        assert (params.temperature, params.seed, params.top_k, params.top_p) == (0.0, None, -1, 1.0)


def hf_and_vllm_rollouts(
    tiny, prompts: BatchedDataDict, *, greedy: bool, stop_token_ids: list[int]
) -> tuple[BatchedDataDict, BatchedDataDict]:
    """The rollout of backend hf's PolicyWorker and of a VllmWorker whose fake engine samples
    as hf does, for the same prompts, step and settings."""
    config = vllm_policy_config(tiny[0], stop_token_ids=stop_token_ids, **SAMPLING)
    policy_worker = new_worker(make_config(tiny[0], generation=config["generation"]))
    try:
        hf = policy_worker.generate(prompts, step=2, greedy=greedy)
    finally:
        policy_worker.shutdown()
    return hf, fake_worker(config, tiny[1]).generate(prompts, step=2, greedy=greedy)


@pytest.mark.parametrize("greedy", [False, True])
def test_the_rollout_is_backend_hfs_when_the_engine_samples_as_hf(tiny, greedy) -> None:
    prompts = prompt_batch([5, 2, 28, 3], group_size=2, first_prompt=3)
    hf, rollout = hf_and_vllm_rollouts(tiny, prompts, greedy=greedy, stop_token_ids=[])
    # A token hf sampled second in row 0, as a stop token: some rows end before their budget.
    stop = int(hf["input_ids"][0, prompts["input_lengths"][0] + 1])
    hf_stopped, stopped = hf_and_vllm_rollouts(tiny, prompts, greedy=greedy, stop_token_ids=[stop])
    assert not stopped["truncated"].all()
    for expected, got in ((hf, rollout), (hf_stopped, stopped)):
        assert set(got) == set(expected) and got.group_size == expected.group_size
        for key in (*ROLLOUT_KEYS, "prompt_ids", "sample_idx"):
            torch.testing.assert_close(got[key], expected[key], atol=1e-5, rtol=0, msg=key)


def test_outputs_map_stop_tokens_lengths_and_truncation() -> None:
    def output(ids: list[int], logprobs: list[float], reason: str) -> SimpleNamespace:
        values = [{i: SimpleNamespace(logprob=v)} for i, v in zip(ids, logprobs, strict=True)]
        return SimpleNamespace(
            outputs=[SimpleNamespace(token_ids=ids, logprobs=values, finish_reason=reason)]
        )

    outputs = [
        output([7, 1], [-0.5, -0.25], "stop"),
        output([4, 4, 9], [-1.0, -2.0, -3.0], "length"),
    ]
    responses = responses_from_outputs(outputs, torch.tensor([4, 3]), pad_token_id=PAD_ID)
    assert responses.tokens.tolist() == [[7, 1, 0, 0], [4, 4, 9, 0]]
    assert responses.logprobs.tolist() == [[-0.5, -0.25, 0, 0], [-1.0, -2.0, -3.0, 0]]
    assert responses.lengths.tolist() == [2, 3] and responses.truncated.tolist() == [False, True]
    empty = responses_from_outputs([], torch.zeros(0, dtype=torch.long), pad_token_id=PAD_ID)
    assert empty.tokens.shape == (0, 0)


def test_an_empty_shard_calls_no_engine(tiny) -> None:
    worker = fake_worker(vllm_policy_config(tiny[0]))
    rollout = worker.generate(prompt_batch([3, 4]).slice(0, 0), step=0, greedy=False)
    assert rollout.size == 0 and worker.engine.llm.calls == []


# ---------------------------------------------------------------------------------------------
# Sleep, wake and refit


def test_a_colocated_engine_sleeps_once_and_wakes_weights_then_kv_cache(tiny) -> None:
    worker = fake_worker(vllm_policy_config(tiny[0]))
    llm = worker.engine.llm
    worker.finish_generation()
    worker.finish_generation()  # asleep already
    with pytest.raises(AssertionError, match="prepare_for_generation"):
        worker.load_refit_bucket(*one_bucket())  # asleep: no weights to load into
    worker.prepare_for_generation(["weights"])
    worker.load_refit_bucket(*one_bucket())
    worker.finish_weight_update()
    worker.prepare_for_generation(["kv_cache"])
    worker.prepare_for_generation()  # awake already
    assert llm.calls == ["sleep(1)", "wake_up(['weights'])", "load", "reset_prefix_cache",
                         "wake_up(['kv_cache'])"]  # fmt: skip
    assert torch.equal(llm.loaded["w"], torch.arange(4.0))


def test_a_separate_engine_never_sleeps(tiny) -> None:
    worker = fake_worker(vllm_policy_config(tiny[0], colocated=False))
    worker.finish_generation()
    worker.prepare_for_generation()
    assert worker.engine.llm.calls == []


def one_bucket():
    from rl_toolkit.models.generation.weight_sync import bucket_layout, tensor_view

    layout = bucket_layout([("w", torch.zeros(4))])
    buffer = torch.zeros(layout.nbytes, dtype=torch.uint8)
    tensor_view(buffer, layout.tensors[0]).copy_(torch.arange(4.0))
    return layout, buffer


class LocalGroup:
    """RayWorkerGroup's dispatch over workers in this process."""

    def __init__(self, workers: list) -> None:
        self.workers, self.world_size, self.broken = workers, len(workers), False

    def all(self, method, *args, **kwargs) -> list:
        return [method(worker, *args, **kwargs) for worker in self.workers]

    def per_rank(self, method, values: list, *args, **kwargs) -> list:
        pairs = zip(self.workers, values, strict=True)
        return [method(worker, value, *args, **kwargs) for worker, value in pairs]

    def shutdown(self) -> None:
        self.workers = []


def test_a_refit_moves_the_policys_weights_in_order_and_then_generation_runs(tiny) -> None:
    config = vllm_policy_config(tiny[0], **SAMPLING)
    config["generation"]["vllm"]["refit_bucket_mib"] = 1
    policy_worker = new_worker(config)
    engine_worker = fake_worker(config, tiny[1])
    generation = VllmGeneration(LocalGroup([engine_worker]), config, pad_token_id=PAD_ID,
                                transport="object")  # fmt: skip
    policy = SimpleNamespace(workers=LocalGroup([policy_worker]))
    llm = engine_worker.engine.llm
    try:
        with pytest.raises(AssertionError, match="update_weights"):
            generation.generate(prompt_batch([3]), step=0)
        generation.finish_generation()
        metrics = generation.update_weights(policy)
        expected = {name: tensor.full_tensor() for name, tensor in
                    refit_state_dict(policy_worker.hf_model).items()}  # fmt: skip
    finally:
        policy_worker.shutdown()
    assert llm.calls == ["sleep(1)", "wake_up(['weights'])", "load", "reset_prefix_cache",
                         "wake_up(['kv_cache'])"]  # fmt: skip
    assert metrics["refit_buckets"] == 1.0 and 0 < metrics["refit_gib"] < 2**-10
    assert list(llm.loaded) == list(expected)
    for name, tensor in expected.items():
        assert torch.equal(llm.loaded[name], tensor), name
    assert policy_worker._refit_state is None  # finish_refit dropped it
    prompts = prompt_batch([3, 4], group_size=2)
    rollout = generation.generate(prompts, step=1)
    assert rollout.size == 4 and llm.calls[-1] == "generate"


def test_vllm_generation_needs_gpus(tiny) -> None:
    cpu_cluster = SimpleNamespace(use_gpus=False)
    with pytest.raises(ConfigError, match="backend=vllm needs GPUs"):
        VllmGeneration.start(cpu_cluster, vllm_policy_config(tiny[0]), make_tokenizer(),
                             worker_timeout_s=None, worker_env_vars=[])  # fmt: skip


# ---------------------------------------------------------------------------------------------
# Config and version


def tiny_grpo(*overrides: str) -> MasterConfig:
    config = load_config(REPO / "configs" / "grpo_tiny.yaml", overrides, schema=MasterConfig)
    resolve_local_paths(config)
    return config


def one_line(error: pytest.ExceptionInfo) -> str:
    message = str(error.value)
    assert "\n" not in message, message
    return message


def test_backend_vllm_needs_its_section_and_whole_gpu_groups() -> None:
    config = tiny_grpo("policy.generation.backend=vllm")
    del config["policy"]["generation"]["vllm"]
    with pytest.raises(ConfigError) as error:
        check_grpo_config(config)
    assert "policy.generation.backend=vllm needs the policy.generation.vllm section" in one_line(
        error
    )
    config = tiny_grpo(
        "policy.generation.backend=vllm", "policy.generation.vllm.tensor_parallel_size=3"
    )
    with pytest.raises(ConfigError) as error:
        check_grpo_config(config)
    assert "tensor_parallel_size=3 must divide cluster.gpus_per_node=2" in one_line(error)
    with pytest.raises(ConfigError) as error:
        tiny_grpo("policy.generation.vllm.refit_check_threshold=0.9")
    assert "'policy.generation.vllm.refit_check_threshold': input should be greater" in str(
        error.value
    )
    # Backend hf ignores the section (grpo.yaml carries its defaults).
    check_grpo_config(tiny_grpo("policy.generation.vllm.tensor_parallel_size=3"))


def test_without_vllm_the_config_check_says_how_to_install_it(monkeypatch) -> None:
    def missing(name: str) -> str:
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(vllm_worker.importlib.metadata, "version", missing)
    with pytest.raises(ConfigError) as error:
        check_config(tiny_grpo("policy.generation.backend=vllm"))
    message = one_line(error)
    assert f"needs vLLM >= {MIN_VLLM_VERSION}, which is not installed" in message
    assert "run `uv sync --extra vllm`" in message


def test_the_version_check_names_the_minimum_and_the_command(monkeypatch) -> None:
    monkeypatch.setattr(vllm_worker.importlib.metadata, "version", lambda name: "0.9.2")
    with pytest.raises(ConfigError) as error:
        check_vllm_version()
    message = one_line(error)
    assert f"needs vLLM >= {MIN_VLLM_VERSION}, but 0.9.2 is installed" in message
    assert "`uv sync --extra vllm`" in message
    monkeypatch.setattr(vllm_worker.importlib.metadata, "version", lambda name: "0.30.0+cu130")
    assert check_vllm_version() == "0.30.0+cu130"
