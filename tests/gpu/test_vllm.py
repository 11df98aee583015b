"""Backend vllm on a GPU, with the real vLLM (issue 16's GPU checks): run by
tests/gpu/run_vllm_checks.sh on one GPU in under 5 minutes; skipped without CUDA or vLLM.

Every model is built from a config here (no hub): a canary that shows a refit lands (zeroed
lm_head -> uniform log-probs, then restored), the generator/trainer mismatch after a refit of a
random 0.5B Llama in bf16, the memory a colocated engine frees when it sleeps, and 20 colocated
GRPO steps of the embedded task that raise its reward. Figures are printed (run with -s).
"""

import json
import math
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from rl_toolkit.algorithms.refit_check import token_mult_prob_error
from rl_toolkit.algorithms.utils import build_cluster
from rl_toolkit.config_schema import MicroBatches, PolicyConfig
from rl_toolkit.distributed.virtual_cluster import RayVirtualCluster
from rl_toolkit.models.generation.vllm_generation import VllmGeneration
from rl_toolkit.models.generation.vllm_worker import VllmWorker
from rl_toolkit.models.generation.weight_sync import bucket_layout, tensor_view
from rl_toolkit.models.policy.lm_policy import Policy
from rl_toolkit.utils.logger import read_metrics
from tests.conftest import WORKER_TIMEOUT_S
from tests.unit.policy_testing import make_config, make_tokenizer
from tests.unit.test_policy_generation import prompt_batch

pytest.importorskip("vllm", reason="backend vllm needs `uv sync --extra vllm`")
pytestmark = pytest.mark.gpu

REPO = Path(__file__).resolve().parents[2]
LOGPROB_MBS = MicroBatches(packed=False, size=16)


def vllm_config(model_dir: Path, *, max_new_tokens: int, memory: float) -> PolicyConfig:
    """A bf16 policy on one GPU whose rollouts a colocated vLLM engine samples."""
    generation = {
        "backend": "vllm", "temperature": 1.0, "top_p": 1.0, "top_k": 0,
        "max_new_tokens": max_new_tokens, "stop_token_ids": [],
        "vllm": {"tensor_parallel_size": 1, "gpu_memory_utilization": memory,
                 "enforce_eager": True, "colocated": True, "refit_bucket_mib": 256,
                 "refit_check_threshold": 1.05},
    }  # fmt: skip
    return make_config(
        model_dir, precision="bfloat16", attn_implementation="sdpa",
        max_total_sequence_length=256, generation=generation,
    )  # fmt: skip


def save_model(path: Path, config: LlamaConfig) -> LlamaForCausalLM:
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    model.save_pretrained(path)
    make_tokenizer().save_pretrained(path)  # pad 0, EOS 1; vLLM gets token ids only
    return model


@pytest.fixture
def cluster(ray_session: None) -> Iterator[RayVirtualCluster]:
    """One GPU bundle of this process's Ray cluster, shared by the policy and the colocated
    engine."""
    cluster_config = {"gpus_per_node": 1, "num_nodes": 1, "worker_env_vars": [],
                      "worker_timeout_s": WORKER_TIMEOUT_S}  # fmt: skip
    cluster = build_cluster(cluster_config, "gpu_vllm", num_worker_groups=2)
    assert cluster.use_gpus, "the checks need a GPU in the Ray cluster"
    yield cluster
    cluster.shutdown()


def start(cluster: RayVirtualCluster, config: PolicyConfig) -> tuple[Policy, VllmGeneration]:
    """The engine first, then the policy (as grpo.setup: vLLM sizes its memory by what is free)."""
    tokenizer = make_tokenizer()
    generation = VllmGeneration.start(
        cluster, config, tokenizer, worker_timeout_s=WORKER_TIMEOUT_S, worker_env_vars=[]
    )
    policy = Policy(
        cluster, config, tokenizer, init_optimizer=False, init_reference_model=False,
        worker_timeout_s=WORKER_TIMEOUT_S, worker_env_vars=[],
    )  # fmt: skip
    return policy, generation


def test_canary_refit_lands_uniform_then_restored(cluster, tmp_path) -> None:
    config = LlamaConfig(hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=4, head_dim=64,
                         vocab_size=1024, max_position_embeddings=256, pad_token_id=0)  # fmt: skip
    model = save_model(tmp_path / "trained", config)
    lm_head = model.lm_head.weight.detach().clone()
    with torch.no_grad():
        model.lm_head.weight.zero_()
    model.save_pretrained(tmp_path / "canary")
    make_tokenizer().save_pretrained(tmp_path / "canary")
    policy, generation = start(cluster, vllm_config(tmp_path / "canary", max_new_tokens=8,
                                                    memory=0.2))  # fmt: skip
    try:
        generation.update_weights(policy)  # the zero lm_head, by CUDA IPC
        # Greedy: on flat logits the argmax is token 0, never EOS, so every row is 8 tokens.
        rollout = generation.generate(prompt_batch([5, 9, 3, 7]), step=0, greedy=True)
        mask = rollout["token_mask"] > 0
        uniform = -math.log(config.vocab_size)
        assert mask.sum() == 32
        torch.testing.assert_close(
            rollout["generation_logprobs"][mask], torch.full((32,), uniform), atol=1e-4, rtol=0
        )
        # Restore the trained lm_head straight into the engine: the log-probs are no longer flat.
        layout = bucket_layout([("lm_head.weight", lm_head.bfloat16())])
        buffer = torch.empty(layout.nbytes, dtype=torch.uint8)
        tensor_view(buffer, layout.tensors[0]).copy_(lm_head)
        generation.workers.all(VllmWorker.load_refit_bucket, layout, buffer)
        generation.workers.all(VllmWorker.finish_weight_update)
        restored = generation.generate(prompt_batch([5, 9, 3, 7]), step=0, greedy=True)
        gap = (restored["generation_logprobs"] - uniform)[restored["token_mask"] > 0].abs()
        assert gap.max() > 0.05, "the restored lm_head did not land"
    finally:
        generation.shutdown()
        policy.shutdown()


def test_a_refit_0_5b_llama_matches_the_policy_and_sleep_frees_memory(cluster, tmp_path) -> None:
    # Qwen2.5-0.5B's shape as a Llama: 24 layers, hidden 896, GQA 14/2, tied embeddings.
    config = LlamaConfig(hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                         num_attention_heads=14, num_key_value_heads=2, head_dim=64,
                         vocab_size=151936, tie_word_embeddings=True,
                         max_position_embeddings=1024, pad_token_id=0)  # fmt: skip
    save_model(tmp_path / "llama_0_5b", config)
    policy_config = vllm_config(tmp_path / "llama_0_5b", max_new_tokens=128, memory=0.3)
    policy, generation = start(cluster, policy_config)
    try:
        began = time.perf_counter()
        refit = generation.update_weights(policy)
        refit_s = time.perf_counter() - began
        prompts = prompt_batch([16 + i % 48 for i in range(128)], group_size=4)
        began = time.perf_counter()
        rollout = generation.generate(prompts, step=0)
        generate_s = time.perf_counter() - began
        free_awake = torch.cuda.mem_get_info()[0]
        generation.finish_generation()
        free_asleep = torch.cuda.mem_get_info()[0]
        logprobs = policy.logprobs(rollout, LOGPROB_MBS)["logprobs"]
        error = token_mult_prob_error(
            rollout["generation_logprobs"], logprobs, rollout["token_mask"]
        )
    finally:
        generation.shutdown()
        policy.shutdown()
    num_tokens = int(rollout["token_mask"].sum())
    print(
        f"\n[vllm gpu] {torch.cuda.get_device_name()}: refit {refit['refit_gib']:.3f} GiB in "
        f"{refit_s:.2f} s ({refit_s / refit['refit_gib']:.2f} s/GiB, "
        f"{refit['refit_buckets']:.0f} buckets); {num_tokens} tokens in {generate_s:.2f} s "
        f"({num_tokens / generate_s:.0f} tokens/s, first call); token_mult_prob_error "
        f"{error:.4f}; sleep freed {(free_asleep - free_awake) / 2**30:.1f} GiB"
    )
    assert error < 1.02
    assert free_asleep - free_awake > 2**30  # at least the KV cache and the weights


def test_20_colocated_grpo_steps_raise_the_tiny_tasks_reward(tmp_path) -> None:
    # The embedded task's model with head_dim 32 (vLLM's CPU kernels refuse 16; its GPU ones
    # are not tested below 32). examples/run_grpo.py starts a Ray cluster of its own.
    model_dir = tmp_path / "tiny_llama_hd32"
    shutil.copytree(REPO / "assets" / "tiny_llama", model_dir)
    hf_config = json.loads((model_dir / "config.json").read_text())
    hf_config |= {"num_attention_heads": 2, "num_key_value_heads": 2, "head_dim": 32}
    (model_dir / "config.json").write_text(json.dumps(hf_config))
    result = subprocess.run(
        [sys.executable, str(REPO / "examples" / "run_grpo.py"),
         f"policy.model_name={model_dir}", "policy.precision=bfloat16",
         "policy.attn_implementation=sdpa", "policy.generation.backend=vllm",
         "policy.generation.vllm.enforce_eager=true",
         "policy.generation.vllm.gpu_memory_utilization=0.2", "cluster.gpus_per_node=1",
         "grpo.max_num_steps=20", "grpo.val_period=20", "checkpointing.enabled=false",
         f"logger.log_dir={tmp_path / 'logs'}"],
        cwd=tmp_path, capture_output=True, text=True, timeout=240,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    metrics = tmp_path / "logs" / "metrics.jsonl"
    train, validation = read_metrics(metrics, "train"), read_metrics(metrics, "validation")
    print(
        f"\n[vllm gpu] GRPO tiny task, backend vllm: validation reward {validation[0]['reward']:.3f}"
        f" -> {validation[20]['reward']:.3f}; token_mult_prob_error "
        f"{train[1]['token_mult_prob_error']:.4f}"
    )
    assert train[1]["token_mult_prob_error"] < 1.05
    assert validation[20]["reward"] > validation[0]["reward"] + 0.2, validation
