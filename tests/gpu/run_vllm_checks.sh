#!/usr/bin/env bash
# The GPU checks of generation backend vllm (issue 16), as one run of under 5 minutes on one GPU:
#
#     bash tests/gpu/run_vllm_checks.sh
#
# tests/gpu/test_vllm.py: canary refit (zeroed lm_head -> uniform log-probs, restored), the
# generator/trainer mismatch after a refit of a random 0.5B Llama in bf16 (< 1.02), the memory a
# sleeping colocated engine frees, and 20 colocated GRPO steps of the embedded task raising its
# reward. Every model is built from a config (no hub). The figures it prints (refit s/GiB,
# tokens/s, token_mult_prob_error, GiB freed) go into docs/benchmarks.md with the device.
#
# Needs a CUDA GPU and vLLM in the project's venv: `uv sync --extra vllm` (vLLM's wheels need
# the network; a GPU machine without it needs a venv prepared elsewhere, as uv.lock pins it).
set -euo pipefail
cd "$(dirname "$0")/../.."

uv run --extra vllm python - <<'PY'
import importlib.metadata
import torch
assert torch.cuda.is_available(), "no CUDA GPU: these checks need one"
print(f"vllm {importlib.metadata.version('vllm')}, torch {torch.__version__}, "
      f"{torch.cuda.get_device_name()}")
PY
# -m gpu: only the GPU checks; -s: show the figures; the timeout keeps a hang from eating a draw.
# With them, the policy worker's GPU test, which moves the optimizer state to host and back.
timeout 290 uv run --extra vllm pytest -q -s -m gpu -p no:cacheprovider tests/gpu/test_vllm.py \
    "tests/unit/test_policy_worker.py::test_bf16_nccl_worker_on_gpu"
